"""Fixtures shared by the test modules: one local Ray per module that asks for it, stage writers, and an S3
bucket on a loopback moto server."""

from __future__ import annotations

import dataclasses
import os
import pathlib
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
import pytest

from gatrep import io, schemas

# Ray Train's controller polls its workers every 2 s by default, and starting, finishing and restarting a worker
# group each wait for a poll: on these tiny runs that is seconds of idle time per training (about 14 s of
# tests/test_classnodes_stage.py's 71 s). Set before any Ray instance starts, so that its processes inherit it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    """One `ray.init(num_cpus=2)` shared by the tests of a module, shut down after them."""
    import ray

    ray.init(num_cpus=2, object_store_memory=300 * 1024**2, include_dashboard=False)
    yield
    ray.shutdown()


def clustered_vectors(n_per: int, clusters: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    """Unit vectors in tight clusters around random centres, cluster-major order."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim))
    x = np.repeat(centres, n_per, axis=0) + 0.05 * rng.standard_normal((clusters * n_per, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def publish_embeddings(run: str, vectors: np.ndarray, listings: list[str] | None = None,
                       categories: list[str] | None = None, status: list[str] | None = None,
                       dtype: str = "float32", publish: bool = True) -> str:
    """Publish `<run>/embeddings` with one row per vector; uris sort in row order (img-0000, img-0001, ...)."""
    n, dim = vectors.shape
    status = status or [schemas.OK] * n
    ok = [s == schemas.OK for s in status]
    flat = pa.array(vectors.reshape(-1).astype(dtype), type=schemas.vector_type(dim, dtype).value_type)
    embedding = pa.FixedSizeListArray.from_arrays(flat, dim)
    embedding = pa.array([e if good else None for e, good in zip(embedding.to_pylist(), ok, strict=True)],
                         type=schemas.vector_type(dim, dtype))
    table = pa.table({
        schemas.IMAGE_ID: [f"id-{i}" for i in range(n)],
        schemas.URI: [f"mem://imgs/img-{i:04d}.png" for i in range(n)],
        schemas.LISTING: listings or [None] * n,
        schemas.CATEGORY: categories or [None] * n,
        schemas.WIDTH: pa.array([8] * n, pa.int32()),
        schemas.HEIGHT: pa.array([8] * n, pa.int32()),
        schemas.STATUS: status,
        schemas.ERROR: [None if good else "bad" for good in ok],
        schemas.EMBEDDING: embedding,
        schemas.FINGERPRINT: [None] * n,
    }, schema=schemas.embeddings(dim, dtype))
    stage = io.join(run, schemas.EMBEDDINGS)
    file_uri = io.write_table(table, io.new_run_dir(stage))
    if publish:
        io.publish(stage, schemas.EMBEDDINGS, [file_uri], config={"test": True}, rows=n)
    return stage


@pytest.fixture(scope="session")
def clustered() -> Callable[..., np.ndarray]:
    """`clustered(n_per, clusters, dim=8, seed=0)`: unit vectors in tight clusters, cluster-major order."""
    return clustered_vectors


@pytest.fixture(scope="session")
def write_embeddings() -> Callable[..., str]:
    """`write_embeddings(run, vectors, listings=, categories=, status=, dtype=, publish=)`: a published
    embeddings stage of hand-made vectors; returns its URI."""
    return publish_embeddings


# ----------------------------------------------------------------------------------------------
# Object storage: a real S3-compatible server (moto's server mode) on loopback


@dataclasses.dataclass(frozen=True)
class S3Bucket:
    """A bucket on the loopback S3 server. `uri` is "s3://<bucket>"; `secret` is the sentinel secret access
    key every client in the session signs with (botocore, s3fs, pyarrow, Ray workers): it must never show up
    in anything gatrep writes or prints. The bucket lives as long as the session: give each test a prefix
    of its own."""

    uri: str
    endpoint: str
    secret: str

    def upload(self, local_dir: str | os.PathLike[str], uri: str) -> str:
        """Copy every file under `local_dir` to the same relative keys under `uri` (an s3:// prefix in this
        bucket); returns `uri`."""
        import s3fs

        fs = s3fs.S3FileSystem()
        root = pathlib.Path(local_dir)
        files = {io.join(uri, p.relative_to(root).as_posix()): p.read_bytes()
                 for p in sorted(root.rglob("*")) if p.is_file()}
        assert files, f"nothing to upload under {root}"
        fs.pipe(files)
        fs.invalidate_cache()
        return uri

    def objects(self, prefix: str = "") -> dict[str, bytes]:
        """Every object of the bucket under `prefix` (a key prefix, or an s3:// URI), as {s3 URI: bytes}."""
        import s3fs

        fs = s3fs.S3FileSystem()
        fs.invalidate_cache()
        root = prefix if prefix.startswith("s3://") else io.join(self.uri, prefix)
        return {f"s3://{key}": fs.cat_file(key) for key in fs.find(root)}


@pytest.fixture(scope="session")
def s3_bucket() -> Iterator[S3Bucket]:
    """`S3Bucket` on a moto server on 127.0.0.1 (a free port), in memory, for the whole session.

    Clients find it the usual way, through the environment: AWS_ENDPOINT_URL_S3 (botocore, hence s3fs,
    and pyarrow, which Ray Data uses, read it), AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (the sentinel
    `S3Bucket.secret`) and AWS_DEFAULT_REGION. Pytest sets a session fixture up before the module fixtures of
    the same test, so the Ray instance of `local_ray` and its workers inherit that environment: name it in
    the module's pytestmark, `pytest.mark.usefixtures("s3_bucket", "local_ray")`. Any AWS profile or credentials
    file of the machine is hidden so that nothing else is ever signed for or sent."""
    import s3fs

    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        pytest.fail("s3_bucket must be set up before local_ray, whose workers would not see the S3 settings: "
                    "request it in the module's pytestmark (usefixtures) or in its first test")
    # moto in a process of its own: run in this one (ThreadedMotoServer), every request of every Ray worker would
    # wait for this process's GIL, which the driver of the job under test holds most of the time.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        host, port = probe.getsockname()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", host, "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        with socket.socket() as client:
            if client.connect_ex((host, port)) == 0:
                break
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail(f"the moto server on port {port} did not start (exit code {server.poll()})")
        time.sleep(0.1)
    bucket = S3Bucket("s3://gatrep-test", f"http://{host}:{port}", f"sentinel-{secrets.token_hex(16)}")
    environment = {
        "AWS_ENDPOINT_URL_S3": bucket.endpoint, "AWS_ACCESS_KEY_ID": "gatrep-test-key",
        "AWS_SECRET_ACCESS_KEY": bucket.secret, "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in environment.items():
            patch.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
            patch.delenv(name, raising=False)
        s3fs.S3FileSystem.clear_instance_cache()  # an instance made before would keep its old settings
        s3fs.S3FileSystem().mkdir(bucket.uri)
        try:
            yield bucket
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            server.terminate()
            server.wait()
