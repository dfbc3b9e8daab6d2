"""Fixtures shared by the test modules: one local Ray per module that asks for it, and stage writers."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
import pytest

from gatrep import io, schemas


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
