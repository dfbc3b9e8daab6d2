"""Decoding and the error taxonomy, on generated files of every bad and odd kind."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from gatrep import images, schemas

PREP = images.Preprocess(size=16, crop_fraction=1.0)
LIMIT = 10_000_000


def encode(image: Image.Image, fmt: str, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


def halves(size=(40, 20), left=(255, 0, 0), right=(0, 0, 255)) -> Image.Image:
    """Left half one colour, right half another: shows rotations and crops."""
    array = np.zeros((size[1], size[0], 3), np.uint8)
    array[:, : size[0] // 2] = left
    array[:, size[0] // 2 :] = right
    return Image.fromarray(array)


def decode(data: bytes, prep=PREP, limit=LIMIT) -> images.Decoded:
    return images.decode(data, prep, limit)


# --- bad files: a status, a precise message, no pixels --------------------------------------


@pytest.mark.parametrize(
    ("data", "status", "message"),
    [
        (b"", schemas.EMPTY, "file is empty (0 bytes)"),
        (b"hello, I am text named photo.jpg\n", schemas.NOT_AN_IMAGE, "no image format recognised"),
        (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', schemas.UNSUPPORTED_FORMAT,
         "SVG images are not supported"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", schemas.UNSUPPORTED_FORMAT,
         "HEIC/HEIF images are not supported"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", schemas.UNSUPPORTED_FORMAT,
         "EPS images are not supported"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj", schemas.UNSUPPORTED_FORMAT, "PDF documents are not supported"),
        (b"\x89PNG\r\n\x1a\n", schemas.TRUNCATED, "starts like a PNG image but its header or data is cut short"),
        (b"\xff\xd8\xff\xe0\x00\x10JF", schemas.TRUNCATED, "truncated or corrupt image data"),
    ],
)
def test_bad_bytes_get_a_status_and_message(data, status, message):
    result = decode(data)
    assert result.status == status
    assert message in result.error
    assert result.pixels is None


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_file_is_refused(fmt):
    data = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)), fmt)
    result = decode(data[: len(data) // 2])
    assert result.status == schemas.TRUNCATED
    assert result.error.startswith("truncated or corrupt image data")


def test_pixel_limit_refuses_decompression_bombs_before_decoding():
    data = encode(Image.new("L", (3000, 2000)), "PNG")  # compresses to a few kB
    result = decode(data, limit=5_000_000)
    assert result.status == schemas.TOO_LARGE
    assert result.error == "3000x2000 = 6000000 pixels is over the 5000000-pixel limit"
    assert decode(data, limit=6_000_000).status == schemas.OK


def test_messages_never_quote_a_file_that_is_not_an_image():
    secret = decode(b"TOKEN=ghp_abcdefghijklmnopqrstuvwxyz0123456789\n")
    assert secret.status == schemas.NOT_AN_IMAGE and "ghp_" not in secret.error and "TOKEN" not in secret.error
    assert secret.error == "no image format recognised (47 bytes of text)"
    binary = decode(b"\x00\x01\x02\x03\x04secret-binary")
    assert binary.error == "no image format recognised (18 bytes of binary data starting 0x00010203)"


def test_missing_uri_is_unreadable(tmp_path):
    data, refused = images.read_file(str(tmp_path / "nope.jpg"), max_bytes=100)
    assert data is None
    assert refused.status == schemas.UNREADABLE
    assert "nope.jpg" in refused.error and "FileNotFoundError" in refused.error


def test_byte_limit(tmp_path):
    path = tmp_path / "big.bin"
    path.write_bytes(b"x" * 101)
    assert images.read_file(str(path), max_bytes=101) == (b"x" * 101, None)
    data, refused = images.read_file(str(path), max_bytes=100)
    assert data is None and refused.status == schemas.TOO_LARGE
    assert refused.error == "file is larger than the 100-byte limit"


# --- odd but valid images: decoded correctly ------------------------------------------------


def test_grayscale_becomes_three_equal_channels():
    result = decode(encode(Image.new("L", (20, 20), 77), "PNG"))
    assert result.status == schemas.OK
    assert result.pixels.shape == (16, 16, 3)
    assert (result.pixels == 77).all()


def test_palette_with_transparency_is_composited_on_white():
    image = Image.new("P", (10, 10), 0)
    image.putpalette([0, 255, 0] + [0, 0, 0] * 255)
    image.info["transparency"] = 0
    result = decode(encode(image, "PNG", transparency=0))
    assert result.status == schemas.OK
    assert (result.pixels == 255).all()  # fully transparent green -> white


def test_palette_without_transparency_keeps_its_colour():
    image = Image.new("P", (10, 10), 0)
    image.putpalette([0, 255, 0] + [0, 0, 0] * 255)
    pixel = decode(encode(image, "GIF")).pixels[5, 5]
    assert tuple(pixel) == (0, 255, 0)


def test_rgba_half_transparent_is_blended_with_white():
    result = decode(encode(Image.new("RGBA", (8, 8), (0, 0, 0, 128)), "PNG"))
    assert np.allclose(result.pixels, 127, atol=1)


def test_cmyk_jpeg_is_converted():
    result = decode(encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95))  # pure red ink
    assert result.status == schemas.OK
    r, g, b = result.pixels[8, 8].astype(int)
    assert r > 240 and g < 15 and b < 15


def test_16_bit_grayscale_is_scaled_not_clipped():
    values = np.array([[0, 32768, 65535, 65535]] * 4, dtype=np.uint16)
    result = decode(encode(Image.fromarray(values), "PNG"), prep=images.Preprocess(4, 1.0, "L",
                                                                                  Image.Resampling.NEAREST))
    assert result.status == schemas.OK
    assert result.pixels[0, :, 0].tolist() == [0, 128, 255, 255]


def test_exif_orientation_is_applied_and_size_reported_as_displayed():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encode(halves(size=(40, 20)), "JPEG", exif=exif, quality=95)
    result = decode(data, prep=images.Preprocess(size=20, crop_fraction=1.0))
    assert (result.width, result.height) == (20, 40)
    top, bottom = result.pixels[2, 10].astype(int), result.pixels[17, 10].astype(int)
    assert top[0] > 200 and top[2] < 60  # the stored left half (red) is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_one_pixel_image():
    result = decode(encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"))
    assert result.status == schemas.OK and (result.width, result.height) == (1, 1)
    assert tuple(result.pixels[0, 0]) == (10, 20, 30)


def test_very_wide_image_is_centre_cropped_without_blowing_up():
    image = halves(size=(20_000, 3), left=(255, 0, 0), right=(0, 0, 255))
    result = decode(encode(image, "PNG"))
    assert result.status == schemas.OK and result.pixels.shape == (16, 16, 3)
    assert (result.width, result.height) == (20_000, 3)
    # the centre crop straddles the colour boundary: red on the left, blue on the right
    assert result.pixels[8, 0, 0] > 200 and result.pixels[8, 15, 2] > 200


def test_large_jpeg_draft_decoding_matches_full_decoding():
    rng = np.random.default_rng(1)
    smooth = np.kron(rng.integers(0, 255, (12, 12, 3)), np.ones((100, 100, 1))).astype(np.uint8)
    data = encode(Image.fromarray(smooth), "JPEG", quality=95)
    fast = decode(data, prep=images.Preprocess(size=64, crop_fraction=1.0))
    full = images.Preprocess(size=64, crop_fraction=1.0)
    reference = np.asarray(Image.open(io.BytesIO(data)).convert("RGB").resize((64, 64), full.resample))
    assert (fast.width, fast.height) == (1200, 1200)
    assert np.abs(fast.pixels.astype(int) - reference.astype(int)).mean() < 3


def test_content_id_is_a_stable_hash_of_the_bytes():
    assert images.content_id(b"abc") == images.content_id(b"abc")
    assert images.content_id(b"abc") != images.content_id(b"abd")
    assert len(images.content_id(b"")) == 32
