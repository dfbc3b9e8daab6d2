"""Safe image reading and decoding: every failure becomes a status and a message, never an exception."""

from __future__ import annotations

import dataclasses
import errno
import functools
import hashlib
import io
import math
import os
import time
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from gatrep import io as gio
from gatrep import schemas

# Formats decoded. Anything else Pillow recognises (EPS, PDF, PSD, ICNS, ...) is refused by name.
SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "AVIF"})

# Formats Pillow cannot identify but that are clearly images or documents gatrep could be asked to
# embed: refused as unsupported, not as "not an image". Checked against the first bytes of the file.
_SIGNATURES = (
    (lambda head: head[4:12] in (b"ftypheic", b"ftypheix", b"ftypheif", b"ftypmif1", b"ftyphevc"), "HEIC/HEIF images"),
    (lambda head: head.startswith(b"\xff\x0a") or head[4:8] == b"JXL ", "JPEG XL images"),
    (lambda head: b"<svg" in head[:512].lower(), "SVG images"),
    (lambda head: head.startswith(b"%PDF-"), "PDF documents"),
)
# Signatures of formats Pillow decodes: bytes that start like one but that Pillow cannot open are a
# truncated or corrupt image, not "not an image".
_DECODED_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
)

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a grey image
_ORIENTATION = 0x0112  # the EXIF tag

READ_TRIES = 3  # reads of one file, in all, before a transient error makes it `unreadable`
READ_BACKOFF_S = 0.5  # the sleep before the second read; doubled before each later one

# OSError numbers that object-store clients give a failure that passes: s3fs turns 503 SlowDown and
# ServiceUnavailable into EBUSY, 500 InternalError into EREMOTEIO, and codes it does not know (502, 504
# from a proxy) into EIO. A missing file (ENOENT) or a refusal (EACCES, EPERM) never passes by itself.
_TRANSIENT_ERRNOS = frozenset({errno.EBUSY, getattr(errno, "EREMOTEIO", errno.EIO), errno.EIO, errno.EAGAIN})

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Preprocess:
    """How a backbone wants its input: a `size`x`size` centre crop covering `crop_fraction` of the
    shorter side (0.875 = torchvision's resize-256/crop-224), in `mode` RGB or L."""

    size: int
    crop_fraction: float = 0.875
    mode: str = "RGB"
    resample: int = Image.Resampling.BILINEAR

    @property
    def channels(self) -> int:
        return 3 if self.mode == "RGB" else 1

    @property
    def shape(self) -> tuple[int, int, int]:
        """The shape of one crop: (size, size, channels)."""
        return self.size, self.size, self.channels


@dataclasses.dataclass(frozen=True)
class Decoded:
    """The outcome for one file. `pixels` is uint8 [size, size, channels] when status is ok."""

    status: str
    error: str | None = None
    width: int | None = None
    height: int | None = None
    pixels: np.ndarray | None = None


class _Refused(Exception):
    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


def describe(data: bytes) -> str:
    """What the first bytes say about a file that is not an image, without quoting its content (it may be a
    secret listed by mistake): text or binary, and at most a 4-byte hex signature of binary data."""
    try:
        text = data[:512].decode("utf-8")
    except UnicodeDecodeError:
        text = "\x00"
    if all(c.isprintable() or c.isspace() for c in text):
        return f"{len(data)} bytes of text"
    return f"{len(data)} bytes of binary data starting 0x{data[:4].hex()}"


def content_id(data: bytes) -> str:
    """The image_id of a file: a 128-bit BLAKE2b hash of its bytes, as hex."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def read_file(uri: str, max_bytes: int) -> tuple[bytes | None, Decoded | None]:
    """(bytes, None), or (None, a refusal) when the URI cannot be read or is over `max_bytes`.

    A transient error (see `transient`) is retried; a permanent one, or a transient one still there
    after READ_TRIES reads, makes the file `unreadable`, with the error in the message. A URI without a
    protocol is a local path and is opened as one: fsspec would read `::` in a file name as URL
    chaining. A local name that io.discover_inputs escaped (not valid UTF-8) is opened by its original
    bytes."""
    def read() -> bytes:
        with _open(uri) as f:
            return bytes(f.read(max_bytes + 1))

    try:
        data = with_retries(read)
    except Exception as err:  # any backend error: missing file, permissions, network
        tries = f" ({READ_TRIES} tries)" if transient(err) else ""
        return None, Decoded(schemas.UNREADABLE, f"could not read {uri}{tries}: {type(err).__name__}: {err}")
    if len(data) > max_bytes:
        return None, Decoded(schemas.TOO_LARGE, f"file is larger than the {max_bytes}-byte limit")
    return data, None


def with_retries(read: Callable[[], T]) -> T:
    """`read()`, called again after a short, doubling sleep while it raises a transient error, READ_TRIES times
    in all. Raises a permanent error at once, and the last try's error."""
    for attempt in range(READ_TRIES - 1):
        try:
            return read()
        except Exception as err:
            if not transient(err):
                raise
            time.sleep(READ_BACKOFF_S * 2**attempt)
    return read()


def transient(err: BaseException) -> bool:
    """Whether a read error says the network or the store failed for a moment, so that the same read may work
    a second later: a refused, reset or timed-out connection, a 5xx or throttling answer from an object store.
    A missing file, a refusal or anything unknown is permanent: trying again would only say the same."""
    if isinstance(err, (ConnectionError, TimeoutError, *_client_transients())):  # many are OSErrors without errno
        return True
    if isinstance(err, OSError):
        return err.errno in _TRANSIENT_ERRNOS
    # An HTTP status carried by the error: aiohttp's ClientResponseError (fsspec's HTTP filesystem), gcsfs's HttpError.
    status = getattr(err, "status", None) or getattr(err, "code", None)
    return isinstance(status, int) and (status == 429 or 500 <= status < 600)


@functools.cache
def _client_transients() -> tuple[type[BaseException], ...]:
    """The network errors of the clients fsspec's object stores use, when installed: botocore's failed or
    dropped connections and read timeouts (what s3fs raises once its own retries are spent) and aiohttp's
    (gcsfs, HTTP)."""
    found: list[type[BaseException]] = []
    try:
        from botocore import exceptions as boto

        found += [boto.ConnectionError, boto.HTTPClientError]
    except ImportError:
        pass
    try:
        import aiohttp

        found += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
    except ImportError:
        pass
    return tuple(found)


def _open(uri: str) -> Any:
    if "://" in uri:
        return fsspec.open(uri, "rb")
    if not os.path.exists(uri) and "\\x" in uri:
        return open(gio.unescape_path(uri), "rb")
    return open(uri, "rb")


def decode(data: bytes, prep: Preprocess, max_pixels: int) -> Decoded:
    """Decode, orient by EXIF, convert the mode and crop/resize `data`; never raises.

    `width` and `height` are the image's size as displayed (after EXIF orientation).
    """
    try:
        image = _identify(data, max_pixels)
        width, height = image.size
        if image.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8):
            width, height = height, width
        if image.format in ("JPEG", "MPO"):
            # Decode at the smallest DCT scale still covering the crop: large photos get far cheaper.
            need = math.ceil(prep.size / prep.crop_fraction)
            image.draft("RGB" if image.mode == "RGB" else image.mode, (need, need))
        image.load()
        return Decoded(schemas.OK, None, width, height, _to_array(_exif_transpose(image), prep))
    except _Refused as refused:
        return Decoded(refused.status, str(refused))
    except Image.DecompressionBombError as err:
        return Decoded(schemas.TOO_LARGE, f"decompression bomb: {err}")
    except (OSError, SyntaxError, EOFError, ValueError) as err:
        return Decoded(schemas.TRUNCATED, f"truncated or corrupt image data: {type(err).__name__}: {err}")
    except Exception as err:  # a decoder bug must cost one row, not the batch
        return Decoded(schemas.DECODE_ERROR, f"{type(err).__name__}: {err}")


def jpeg_size(data: bytes, max_pixels: int) -> tuple[int, int] | None:
    """(width, height) of a JPEG that a batched decoder (gatrep.jpeg: torchvision, nvJPEG on a GPU) can take as it
    is, from its header alone: complete (it ends with the end-of-image marker), 8-bit RGB or grayscale, no EXIF
    rotation, within `max_pixels`. None for anything else, which `decode` then handles with Pillow (and its
    precise status). Never raises."""
    if not data.startswith(b"\xff\xd8\xff") or data.rstrip(b"\x00")[-2:] != b"\xff\xd9":
        return None
    try:
        image = Image.open(io.BytesIO(data))
        plain = image.format == "JPEG" and image.mode in ("RGB", "L")
        upright = image.getexif().get(_ORIENTATION, 1) == 1
    except Exception:  # any header Pillow cannot read: `decode` names the problem
        return None
    width, height = image.size
    return (width, height) if plain and upright and width * height <= max_pixels else None


def _identify(data: bytes, max_pixels: int) -> Image.Image:
    """Open (header only) and check format and pixel count; raises _Refused."""
    if not data:
        raise _Refused(schemas.EMPTY, "file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        for matches, name in _SIGNATURES:
            if matches(data[:512]):
                raise _Refused(schemas.UNSUPPORTED_FORMAT, f"{name} are not supported") from None
        for signature, name in _DECODED_SIGNATURES:
            if data.startswith(signature) and (name != "BMP" or len(data) >= 14):
                raise _Refused(schemas.TRUNCATED, f"starts like a {name} image but its header or data is "
                                                  f"cut short or corrupt ({len(data)} bytes)") from None
        raise _Refused(schemas.NOT_AN_IMAGE, f"no image format recognised ({describe(data)})") from None
    if image.format not in SUPPORTED_FORMATS:
        raise _Refused(schemas.UNSUPPORTED_FORMAT,
                       f"{image.format} images are not supported (supported: {', '.join(sorted(SUPPORTED_FORMATS))})")
    pixels = image.size[0] * image.size[1]
    if pixels > max_pixels:
        raise _Refused(schemas.TOO_LARGE,
                       f"{image.size[0]}x{image.size[1]} = {pixels} pixels is over the {max_pixels}-pixel limit")
    return image


def _exif_transpose(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # a malformed EXIF block: keep the pixels, unrotated
        return image


def _to_array(image: Image.Image, prep: Preprocess) -> np.ndarray:
    """Mode-convert, centre-crop and resize in one resampling step: wide images never blow up."""
    rgb = _to_rgb(image)
    if prep.mode == "L":
        rgb = rgb.convert("L")
    width, height = rgb.size
    side = min(width, height) * prep.crop_fraction
    left, top = (width - side) / 2, (height - side) / 2
    out = rgb.resize((prep.size, prep.size), prep.resample, box=(left, top, left + side, top + side))
    array = np.asarray(out, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any Pillow mode: alpha over white, 16-bit and float scaled, CMYK converted."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if mode == "F":
            low, high = float(values.min()), float(values.max())
            values = (values - low) / (high - low or 1.0) * 255.0
        else:
            values = values / 257.0 if mode.startswith("I;16") or values.max() > 255 else values
        return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")
