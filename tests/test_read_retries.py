"""Reading an image's bytes: a transient error is retried, a permanent one becomes an `unreadable` row (no Ray)."""

from __future__ import annotations

import collections
import errno
import io
import types
from typing import Any, ClassVar

import aiohttp
import fsspec
import numpy as np
import pytest
from botocore import exceptions as boto
from fsspec.implementations.memory import MemoryFileSystem
from PIL import Image

from gatrep import images, schemas
from gatrep.stages import embed


class FlakyFileSystem(MemoryFileSystem):
    """`flaky://`: an in-memory filesystem whose opens for reading fail on demand. `failures[path] = (n, error)` raises
    `error` on the first n opens of `path` (every open when n is None); `opens` counts the opens of each path."""

    protocol = "flaky"
    store: ClassVar[dict[str, Any]] = {}
    pseudo_dirs: ClassVar[list[str]] = [""]
    failures: ClassVar[dict[str, tuple[int | None, BaseException]]] = {}
    opens: ClassVar[collections.Counter[str]] = collections.Counter()

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        return super()._strip_protocol(path.removeprefix("flaky://"))

    def _open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        path = self._strip_protocol(path)
        if "r" in mode:
            self.opens[path] += 1
            times, error = self.failures.get(path, (0, None))
            if error is not None and (times is None or self.opens[path] <= times):
                raise error
        return super()._open(path, mode, **kwargs)


@pytest.fixture
def flaky(monkeypatch):
    """The flaky filesystem, emptied, holding a PNG at flaky://imgs/good.png; sleeps between reads are recorded in
    `flaky.sleeps` instead of slept."""
    fsspec.register_implementation("flaky", FlakyFileSystem, clobber=True)
    FlakyFileSystem.store.clear()
    FlakyFileSystem.failures.clear()
    FlakyFileSystem.opens.clear()
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, "PNG")
    FlakyFileSystem().pipe_file("/imgs/good.png", buffer.getvalue())
    sleeps: list[float] = []
    monkeypatch.setattr(images, "time", types.SimpleNamespace(sleep=sleeps.append))
    fs = FlakyFileSystem()
    fs.sleeps = sleeps  # type: ignore[attr-defined]
    return fs


def copy(fs, name, times=None, error=None):
    """flaky://imgs/<name>: the good PNG's bytes, failing its first `times` opens with `error` when given."""
    fs.pipe_file(f"/imgs/{name}", fs.cat_file("/imgs/good.png"))
    if error is not None:
        fs.failures[f"/imgs/{name}"] = (times, error)
    return f"flaky://imgs/{name}"


TRANSIENT = {
    "connection reset": ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
    "timeout": TimeoutError("read timed out"),
    "s3fs SlowDown (503)": OSError(errno.EBUSY, "Please reduce your request rate."),
    "s3fs InternalError (500)": OSError(errno.EREMOTEIO, "We encountered an internal error."),
    "botocore read timeout": boto.ReadTimeoutError(endpoint_url="http://127.0.0.1:9000/b/k"),
    "botocore connect timeout": boto.ConnectTimeoutError(endpoint_url="http://127.0.0.1:9000/b/k"),
    "botocore no endpoint": boto.EndpointConnectionError(endpoint_url="http://127.0.0.1:9000/b/k"),
    "aiohttp disconnect": aiohttp.ServerDisconnectedError(),
    "HTTP 503": aiohttp.ClientResponseError(None, (), status=503),  # type: ignore[arg-type]
    "HTTP 429": aiohttp.ClientResponseError(None, (), status=429),  # type: ignore[arg-type]
}
PERMANENT = {
    "missing": FileNotFoundError(errno.ENOENT, "No such file", "b/k"),
    "forbidden": PermissionError(errno.EACCES, "Access Denied"),
    "s3fs InvalidRange": OSError(errno.EINVAL, "The requested range is not satisfiable"),
    "HTTP 403": aiohttp.ClientResponseError(None, (), status=403),  # type: ignore[arg-type]
    "bad URI": ValueError("Protocol not known: nope"),
}


@pytest.mark.parametrize("error", TRANSIENT.values(), ids=TRANSIENT.keys())
def test_network_and_store_hiccups_are_transient(error):
    assert images.transient(error)


@pytest.mark.parametrize("error", PERMANENT.values(), ids=PERMANENT.keys())
def test_missing_forbidden_and_unknown_errors_are_permanent(error):
    assert not images.transient(error)


@pytest.mark.parametrize("error", [TRANSIENT["connection reset"], TRANSIENT["botocore read timeout"]],
                         ids=["connection reset", "botocore read timeout"])
def test_a_read_that_fails_then_works_is_retried_with_a_doubling_backoff(flaky, error):
    uri = copy(flaky, "slow.png", images.READ_TRIES - 1, error)
    data, refused = images.read_file(uri, max_bytes=10_000)
    assert refused is None and data == flaky.cat_file("/imgs/good.png")
    assert flaky.opens["/imgs/slow.png"] == images.READ_TRIES
    assert flaky.sleeps == [images.READ_BACKOFF_S * 2**i for i in range(images.READ_TRIES - 1)]


def test_a_transient_error_that_lasts_makes_the_file_unreadable(flaky):
    uri = copy(flaky, "down.png", None, TRANSIENT["s3fs SlowDown (503)"])
    data, refused = images.read_file(uri, max_bytes=10_000)
    assert data is None and refused is not None and refused.status == schemas.UNREADABLE
    assert refused.error == (f"could not read {uri} ({images.READ_TRIES} tries): OSError: "
                             f"[Errno {errno.EBUSY}] Please reduce your request rate.")
    assert flaky.opens["/imgs/down.png"] == images.READ_TRIES and len(flaky.sleeps) == images.READ_TRIES - 1


@pytest.mark.parametrize("error", [PERMANENT["forbidden"], PERMANENT["s3fs InvalidRange"]], ids=["forbidden", "range"])
def test_a_permanent_error_is_not_retried(flaky, error):
    uri = copy(flaky, "locked.png", None, error)
    _, refused = images.read_file(uri, max_bytes=10_000)
    assert refused is not None and refused.status == schemas.UNREADABLE
    assert refused.error == f"could not read {uri}: {type(error).__name__}: {error}"
    assert flaky.opens["/imgs/locked.png"] == 1 and flaky.sleeps == []


def test_prepare_batch_gives_each_file_its_row_and_never_raises(flaky):
    uris = ["flaky://imgs/good.png", copy(flaky, "slow.png", 1, TRANSIENT["timeout"]), "flaky://imgs/gone.png",
            copy(flaky, "down.png", None, TRANSIENT["aiohttp disconnect"]), copy(flaky, "also-good.png")]
    batch = {schemas.URI: np.array(uris, dtype=object), schemas.LISTING: np.array(["l"] * 5, dtype=object),
             schemas.CATEGORY: np.array(["c"] * 5, dtype=object)}
    out = embed.prepare_batch(batch, backbone="tiny-random", max_pixels=10_000, max_bytes=10_000, known={})
    assert list(out[schemas.URI]) == uris
    assert list(out[schemas.STATUS]) == ["ok", "ok", "unreadable", "unreadable", "ok"]
    errors = list(out[schemas.ERROR])
    assert errors[:2] == [None, None] and errors[4] is None
    assert errors[2].startswith("could not read flaky://imgs/gone.png: FileNotFoundError")
    assert errors[3] == (f"could not read flaky://imgs/down.png ({images.READ_TRIES} tries): "
                         "ServerDisconnectedError: Server disconnected")
    assert out[schemas.IMAGE_ID][2] is None and out[schemas.IMAGE_ID][1] == out[schemas.IMAGE_ID][0]
    assert flaky.opens["/imgs/gone.png"] == 1 and flaky.opens["/imgs/slow.png"] == 2
    assert out[embed.PIXELS].shape[0] == 5 and not out[embed.PIXELS][3].any() and out[embed.PIXELS][1].any()
