"""JPEGs decoded in the backbone actor (gatrep.jpeg; torchvision on the CPU here, nvJPEG on a GPU): the same crops
as Pillow's, the header check that routes each file, and a bad file that costs only its own row."""

from __future__ import annotations

import io as stdio

import numpy as np
import pytest
import torch
from PIL import Image

from gatrep import backbones, images, schemas
from gatrep.jpeg import BatchDecoder
from gatrep.stages.embed import JPEG, PAYLOAD, prepare_batch

MAX_PIXELS = 10**7


def encoded(array: np.ndarray, fmt: str = "JPEG", **options) -> bytes:
    buffer = stdio.BytesIO()
    Image.fromarray(array).save(buffer, fmt, quality=90, **options) if fmt == "JPEG" else \
        Image.fromarray(array).save(buffer, fmt, **options)
    return buffer.getvalue()


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth colour image with some texture, like a downscaled photo (noise alone would test the resampler's
    behaviour on aliasing, not the pipeline)."""
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    rng = np.random.default_rng(seed)
    channels = [np.sin(6 * x * rng.uniform(0.5, 2) + 4 * y) * 100 + 128 + rng.normal(0, 4, (height, width))
                for _ in range(3)]
    return np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8)


def corrupt(data: bytes) -> bytes:
    """A JPEG whose header and end marker are intact (it passes images.jpeg_size) but whose scan header is
    damaged: both decoders refuse it. (Zeroed entropy-coded data is not enough: both decode it, with a warning.)"""
    scan = data.index(b"\xff\xda") + 4
    return data[:scan] + b"\xff" * 8 + data[scan + 8:]


@pytest.mark.parametrize("backbone", ["mobilenet_v2", "clip-vit-b32"])  # bilinear and bicubic, crops of 0.875 and 1
def test_a_batch_decodes_to_pillows_crops(backbone):
    prep = backbones.get(backbone).preprocess
    files = [encoded(photo(300, 200)), encoded(photo(180, 400, 1)), encoded(photo(300, 200, 2)),
             encoded(photo(240, 240, 3)[:, :, 0])]  # two of one size (one resize), a wide one, a grayscale one
    png = images.decode(encoded(photo(64, 64, 4), "PNG"), prep, MAX_PIXELS).pixels
    payloads = np.array([*files, png.tobytes()], dtype=object)  # a crop Pillow made in the task passes unchanged

    pixels, failed = BatchDecoder(prep, torch.device("cpu"), MAX_PIXELS)(payloads, np.array([1, 1, 1, 1, 0], bool))

    assert failed == {} and pixels.shape == (5, *prep.shape) and pixels.dtype == torch.uint8
    for i, data in enumerate(files):
        reference = images.decode(data, prep, MAX_PIXELS).pixels.astype(int)
        difference = np.abs(pixels[i].numpy().astype(int) - reference)
        # The crop box is rounded to whole pixels here (Pillow resamples from its fractional edges): a level or two.
        assert difference.mean() < 2.5 and difference.max() <= 24, (i, difference.mean(), difference.max())
    assert np.array_equal(pixels[4].numpy(), png)


def test_a_corrupt_jpeg_costs_only_its_own_row():
    prep = backbones.get("tiny-random").preprocess
    good = encoded(photo(120, 100))
    payloads = np.array([good, corrupt(good), good], dtype=object)

    pixels, failed = BatchDecoder(prep, torch.device("cpu"), MAX_PIXELS)(payloads, np.ones(3, bool))

    assert images.jpeg_size(corrupt(good), MAX_PIXELS) == (100, 120)
    assert list(failed) == [1] and failed[1].status == schemas.TRUNCATED
    assert failed[1].error == images.decode(corrupt(good), prep, MAX_PIXELS).error
    assert not pixels[1].any() and pixels[0].any() and torch.equal(pixels[0], pixels[2])


def test_only_plain_complete_upright_jpegs_skip_pillow():
    rgb = photo(60, 80)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: Pillow applies the orientation, the batch decoder would not
    cmyk = stdio.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(cmyk, "JPEG")
    assert images.jpeg_size(encoded(rgb), MAX_PIXELS) == (80, 60)
    assert images.jpeg_size(encoded(rgb[:, :, 0]), MAX_PIXELS) == (80, 60)
    for refused in (encoded(rgb, exif=exif), cmyk.getvalue(), encoded(rgb, "PNG"), encoded(rgb)[:-100], b"",
                    b"\xff\xd8\xff" + bytes(10) + b"\xff\xd9"):
        assert images.jpeg_size(refused, MAX_PIXELS) is None
    assert images.jpeg_size(encoded(rgb), 80 * 60 - 1) is None  # over the pixel limit: Pillow refuses it by name


def test_the_decode_task_passes_jpegs_whole_and_decodes_the_rest(tmp_path):
    prep = backbones.get("tiny-random").preprocess
    files = {"a.jpg": encoded(photo(50, 40)), "b.png": encoded(photo(30, 30), "PNG"), "c.jpg": b"not an image",
             "d.jpg": encoded(photo(50, 40))[:-200]}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    uris = np.array([str(tmp_path / name) for name in files], dtype=object)
    batch = {schemas.URI: uris, schemas.LISTING: np.full(4, None, object), schemas.CATEGORY: np.full(4, None, object)}

    out = prepare_batch(batch, backbone="tiny-random", max_pixels=MAX_PIXELS, max_bytes=10**6, known={},
                        jpegs_to_actor=True)

    assert list(out[JPEG]) == [True, False, False, False]
    assert list(out[schemas.STATUS]) == [schemas.OK, schemas.OK, schemas.NOT_AN_IMAGE, schemas.TRUNCATED]
    assert (out[schemas.WIDTH][0], out[schemas.HEIGHT][0]) == (40, 50)
    assert out[PAYLOAD][0] == files["a.jpg"]
    assert out[PAYLOAD][1] == images.decode(files["b.png"], prep, MAX_PIXELS).pixels.tobytes()
    assert out[PAYLOAD][2] == out[PAYLOAD][3] == b""
