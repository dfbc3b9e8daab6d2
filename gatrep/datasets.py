"""Labelled image trees `<root>/<category>/<image>` for demos, tests and benchmarks: digits, Fashion-MNIST, colour
tiles of scikit-image's photographs, and near-duplicate listings `<root>/<category>/<listing>/<image>` of them."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import posixpath
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import fsspec
import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

from gatrep import io as gio
from gatrep.errors import UserError

DIGIT_CATEGORIES = tuple(f"digit-{i}" for i in range(10))
FASHION_MNIST_CATEGORIES = (
    "t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot",
)
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"  # Debian's package of the IDX files
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# scikit-image's bundled colour photographs (no download): the categories of write_photo_tiles.
PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry", "motorcycle", "retina",
          "rocket")
MARKER = ".gatrep-dataset.json"  # written last; hidden, so io.discover_inputs does not take it for an input
FORMATS = {"png": "PNG", "jpg": "JPEG"}
RESAMPLING = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR}
JPEG_QUALITY = 90
_CHUNK = 256  # images encoded in memory before one fs.pipe call (concurrent PUTs on object stores)


class DatasetError(UserError, ValueError):
    """A dataset source that is missing or malformed, or a tree that cannot be written as asked."""


@dataclasses.dataclass(frozen=True)
class Tree:
    """An image tree written by this module: `root` as io.discover_inputs spells its URIs, `files` the
    `<category>/<name>` paths under it, `source_rows` the row of each file in the source array. `query` is
    the held-out query tree, if any; `reused` is True when an identical tree was already complete and
    nothing was written."""

    root: str
    files: tuple[str, ...]
    source_rows: tuple[int, ...]
    query: Tree | None = None
    reused: bool = False

    def uris(self) -> list[str]:
        """Full URIs of the images, in the order of `files`."""
        return [gio.join(self.root, f) for f in self.files]

    def categories(self) -> list[str]:
        """The category of each image, in the order of `files`."""
        return [f.split("/", 1)[0] for f in self.files]

    def listings(self) -> list[str]:
        """The listing of each image as io.discover_inputs names it: `<category>/<listing>` for
        `<category>/<listing>/<image>`, the category for `<category>/<image>`."""
        return ["/".join(f.split("/")[:2]) if f.count("/") >= 2 else f.split("/", 1)[0] for f in self.files]

    def counts(self) -> dict[str, int]:
        """Images per category, sorted by category name."""
        return dict(sorted(Counter(self.categories()).items()))


@dataclasses.dataclass(frozen=True)
class _Source:
    """Images in memory: uint8 [n, h, w] (grey) or [n, h, w, 3] pixels, integer labels, a category name per label."""

    pixels: np.ndarray
    labels: np.ndarray
    categories: tuple[str, ...]
    prefix: str  # file name prefix, e.g. "digits" or "train"


@dataclasses.dataclass(frozen=True)
class _Render:
    """How each image is written: `size`x`size` pixels, format key of FORMATS, resampling key of RESAMPLING."""

    size: int
    fmt: str
    resample: str


# ----------------------------------------------------------------------------------------------
# Public writers


def write_digits(root: str, size: int = 64, fmt: str = "png", limit: int | None = None, holdout: float = 0.0,
                 seed: int = 0, resample: str = "bilinear", query_root: str | None = None,
                 overwrite: bool = False) -> Tree:
    """Write scikit-learn's digits (1,797 8x8 images, values 0..16) as `<root>/digit-<d>/digits-<row>.<fmt>`.

    Values are scaled to 0..255 (16 -> 255; white strokes on black, unlike sklearn's gray_r plots) and
    upscaled to `size` pixels, 8-bit grey saved as RGB. `limit` keeps that many images spread evenly over
    the ten digits. With `holdout` > 0 a stratified fraction goes to a query tree at `query_root` (default
    `<root>-query`), never into the index tree. Returns the index tree with `.query` set when held out.
    Refuses bad arguments, a holdout that cannot be stratified, and a root holding other files unless
    `overwrite` (see `_prepare_root`).
    """
    render = _check_render(size, fmt, resample)
    source = _digits_source()
    rows = _select(source.labels, limit, None, seed)
    params = {"dataset": "digits", "size": size, "fmt": fmt, "resample": resample, "limit": limit,
              "holdout": holdout, "seed": seed}
    return _write_split(root, source, rows, render, params, holdout, seed, query_root, overwrite)


def write_fashion_mnist(root: str, split: str = "train", size: int = 256, fmt: str = "jpg",
                        limit: int | None = None, per_class: int | None = None, seed: int = 0,
                        source: str = FASHION_MNIST_DIR, overwrite: bool = False) -> Tree:
    """Write Fashion-MNIST's `split` ("train": 60,000, "test": 10,000) as `<root>/<class>/<split>-<row>.<fmt>`.

    Reads the IDX files of Debian's dataset-fashion-mnist package (or any fsspec `source` directory
    holding the same four .gz files); 28x28 grey images upscaled bilinearly to `size`, saved as RGB
    (JPEG at quality 90). `per_class` keeps at most that many images per class, then `limit` at most
    that many in all, spread evenly over the classes; rows are drawn with `seed`. Returns the tree.
    Refuses a missing package (naming it), malformed files, bad arguments, and a root holding other
    files unless `overwrite`.
    """
    if split not in FASHION_MNIST_FILES:
        raise DatasetError(f"split must be one of {', '.join(FASHION_MNIST_FILES)}, not {split!r}")
    render = _check_render(size, fmt, "bilinear")
    pixels, labels = load_fashion_mnist(split, source)
    data = _Source(pixels, labels.astype(np.int64), FASHION_MNIST_CATEGORIES, split)
    rows = _select(data.labels, limit, per_class, seed)
    params = {"dataset": "fashion-mnist", "split": split, "size": size, "fmt": fmt, "limit": limit,
              "per_class": per_class, "seed": seed, "source": source, "role": "index"}
    return _write_tree(root, data, rows, render, params, overwrite)


def write_fashion_mnist_copies(root: str, count: int, split: str = "train", size: int = 256, fmt: str = "jpg",
                               source: str = FASHION_MNIST_DIR) -> list[str]:
    """`count` image files under the local folder `root`, for benchmarks at scale: the split's images (at most
    `count`), then hard links to them under other names (`<name>-copy<k>`) until there are `count`, each read,
    hashed and embedded like any file. Written once: an existing `root` is kept as it is. Returns its files."""
    if not os.path.isdir(root):
        write_fashion_mnist(root + ".tmp", split=split, size=size, fmt=fmt, limit=count, source=source)
        written = gio.discover_inputs(root + ".tmp")["uri"].to_pylist()
        for n in range(len(written), count):
            base, ext = os.path.splitext(written[n % len(written)])
            os.link(written[n % len(written)], f"{base}-copy{n // len(written)}{ext}")
        os.rename(root + ".tmp", root)
    return gio.discover_inputs(root)["uri"].to_pylist()


def write_photo_tiles(root: str, tile: int = 64, size: int = 128, per_category: int = 40, holdout: float = 0.0,
                      seed: int = 0, query_root: str | None = None, overwrite: bool = False) -> Tree:
    """Write colour tiles of scikit-image's eight bundled colour photographs (PHOTOS) as
    `<root>/<photo>/photos-<row>.png`: the photo is the category, so a category shares a look (palette,
    texture, grain) while its tiles show different things. Non-overlapping `tile`-pixel squares, flat ones
    (pixel standard deviation under 8: sky, black borders) left out, at most `per_category` per photo spread
    evenly, upscaled to `size`. `holdout`, `query_root`, `overwrite`: as write_digits."""
    render = _check_render(size, "png", "bilinear")
    source = _photo_source(tile, per_category)
    rows = np.arange(len(source.labels))
    params = {"dataset": "photo-tiles", "tile": tile, "size": size, "per_category": per_category,
              "holdout": holdout, "seed": seed}
    return _write_split(root, source, rows, render, params, holdout, seed, query_root, overwrite)


def write_listings(root: str, source: str = "fashion-mnist", listings: int = 100, views: int = 5,
                   families: Sequence[str] | None = None, size: int = 128, seed: int = 0,
                   fashion_dir: str = FASHION_MNIST_DIR, overwrite: bool = False) -> Tree:
    """Write a near-duplicate benchmark set: `listings` source images, each as a listing
    `<root>/<category>/<prefix>-<row>/` holding `original.png` and `views` transformed copies
    `view-<j>-<family>.<png|jpg>` (JPEG only for the jpeg family, at its own low quality).

    `source` is one of LISTING_SOURCES: Fashion-MNIST's training images (read from `fashion_dir`), sklearn's
    digits, or the colour photo tiles of write_photo_tiles (64-pixel tiles, photo = category). Sources are
    upscaled bilinearly to `size` pixels; every view is a transform of the original file's exact pixels.
    Rows are spread evenly over the categories and drawn with `seed`; the view families of a listing are
    `families` (default: every family of TRANSFORMS) in turn from a seeded offset, so a listing repeats a
    family only when `views` exceeds their number, and each view's parameters come from its own seeded
    generator. Equal arguments write equal bytes. Returns the tree (`Tree.listings()` and `view_family` recover
    each file's listing and family). Refuses an unknown source or family, `listings` or `views` under 1, more
    listings than the source holds, and a root holding other files unless `overwrite`.
    """
    chosen = _check_families(families)
    if source not in LISTING_SOURCES:
        raise DatasetError(f"source must be one of {', '.join(LISTING_SOURCES)}, not {source!r}")
    for name, value in (("listings", listings), ("views", views)):
        if value < 1:
            raise DatasetError(f"{name} must be at least 1, not {value}")
    render = _check_render(size, "png", "bilinear")
    data = _listing_source(source, fashion_dir)
    if listings > len(data.labels):
        raise DatasetError(f"source {source} holds {len(data.labels)} images, fewer than listings={listings}")
    rows = _select(data.labels, listings, None, seed)
    params = {"dataset": "listings", "source": source, "listings": listings, "views": views, "families": chosen,
              "size": size, "seed": seed, "role": "index"}
    if source == "fashion-mnist":
        params["fashion_dir"] = fashion_dir
    fs, path = gio.url_to_fs(root)
    root = gio.full_uri(fs, path)
    existing = _prepare_root(fs, path, root, params, overwrite)
    if existing is not None:
        return existing
    plans = {int(r): _view_families(chosen, views, seed, int(r)) for r in rows}
    files, file_rows = _listing_files(data, plans)
    encoded = (image for r, plan in plans.items() for image in _listing_images(data, r, plan, render, seed))
    return _store_tree(fs, path, root, files, file_rows, encoded, params)


def view_family(file: str) -> str:
    """The transformation family of a listing's image file, from its name: "original" for `original.png`, the
    family for `view-<j>-<family>.<ext>`. Raises DatasetError for any other name."""
    name = posixpath.basename(file)
    stem, _, ext = name.rpartition(".")
    if name == "original.png":
        return "original"
    parts = stem.split("-", 2)
    if len(parts) == 3 and parts[0] == "view" and parts[1].isdigit() and parts[2] in TRANSFORMS \
            and ext == _view_format(parts[2]):
        return parts[2]
    raise DatasetError(f"{file}: not an image of a listings tree (expected original.png or "
                       "view-<j>-<family>.<png|jpg>)")


def transform_view(image: Image.Image, family: str, rng: np.random.Generator) -> Image.Image:
    """`image` (converted to RGB) transformed by the named family of TRANSFORMS with parameters drawn from `rng`,
    at the same size. Raises DatasetError for an unknown family."""
    _check_families([family])
    return TRANSFORMS[family](image.convert("RGB"), rng)


# ----------------------------------------------------------------------------------------------
# Listings: transformation families, each a deterministic function of (RGB image, random generator)


def _random_resized_crop(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A box of 50-90% of the area at an aspect ratio of 3/4 to 4/3, placed at random, resized to the full size."""
    w, h = image.size
    area, ratio = rng.uniform(0.5, 0.9) * w * h, math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    cw, ch = min(w, round(math.sqrt(area * ratio))), min(h, round(math.sqrt(area / ratio)))
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    return image.resize((w, h), Image.Resampling.BILINEAR, box=(left, top, left + cw, top + ch))


def _flip(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The horizontal mirror image (no parameters)."""
    return ImageOps.mirror(image)


def _rotate(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Rotated 10-30 degrees either way about the centre, same size, corners filled with the top-left pixel's
    colour (the background of a product shot)."""
    angle = float(rng.uniform(10, 30) * rng.choice([-1, 1]))
    fill = image.getpixel((0, 0))
    return image.rotate(angle, Image.Resampling.BILINEAR, expand=False, fillcolor=fill)


def _colour_jitter(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Brightness and contrast scaled by 0.6-1.4 and saturation by 0.5-1.5 (ImageEnhance), in that order."""
    for enhancer, low, high in ((ImageEnhance.Brightness, 0.6, 1.4), (ImageEnhance.Contrast, 0.6, 1.4),
                                (ImageEnhance.Color, 0.5, 1.5)):
        image = enhancer(image).enhance(float(rng.uniform(low, high)))
    return image


def _jpeg(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Re-compressed as JPEG at quality 5-20, decoded again: a JpegImageFile, which the writer saves with its own
    quantization tables (`quality="keep"`)."""
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=int(rng.integers(5, 21)))
    decoded = Image.open(io.BytesIO(buffer.getvalue()))
    decoded.load()
    return decoded


def _blur(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A Gaussian blur of radius 1-2.5% of the shorter side."""
    return image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.01, 0.025)) * min(image.size)))


_CAPTIONS = ("SALE", "NEW", "50% OFF", "© shop", "FREE SHIPPING", "sample", "HOT DEAL", "watermark")


def _text(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A caption of _CAPTIONS in Pillow's default font, 8-16% of the height tall (shrunk to fit the width), at a
    random place, in a random colour at 50-100% opacity: added text or a watermark."""
    w, h = image.size
    caption = str(rng.choice(_CAPTIONS))
    colour = tuple(int(c) for c in rng.integers(0, 256, 3)) + (int(rng.integers(128, 256)),)
    font_size = max(6, round(h * rng.uniform(0.08, 0.16)))
    overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    while True:
        font = ImageFont.load_default(font_size)
        left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)
        if right - left <= w - 2 or font_size <= 6:
            break
        font_size -= 1
    x = int(rng.integers(0, max(1, w - int(right - left)))) - int(left)
    y = int(rng.integers(0, max(1, h - int(bottom - top)))) - int(top)
    draw.text((x, y), caption, fill=colour, font=font)
    return Image.alpha_composite(image.convert("RGBA"), overlay).convert("RGB")


def _letterbox(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Shrunk to 60-85% of its size and centred on a canvas of the original size filled black, white or grey."""
    w, h = image.size
    scale = rng.uniform(0.6, 0.85)
    small = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", image.size, _PADDING[int(rng.integers(len(_PADDING)))])
    canvas.paste(small, ((w - small.width) // 2, (h - small.height) // 2))
    return canvas


_PADDING = ((0, 0, 0), (255, 255, 255), (128, 128, 128))


def _grayscale(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Pillow's luma (L) copied to all three channels (no parameters; the identity on a grey source)."""
    return image.convert("L").convert("RGB")


Transform = Callable[[Image.Image, np.random.Generator], Image.Image]
TRANSFORMS: dict[str, Transform] = {
    "crop": _random_resized_crop, "flip": _flip, "rotate": _rotate, "jitter": _colour_jitter, "jpeg": _jpeg,
    "blur": _blur, "text": _text, "letterbox": _letterbox, "grayscale": _grayscale,
}
LISTING_SOURCES = ("fashion-mnist", "digits", "photos")
_LISTING_TILE = 64  # photo tiles: the side write_photo_tiles uses by default


def _check_families(families: Sequence[str] | None) -> list[str]:
    """The families as a list (default: all of TRANSFORMS), or DatasetError for none, an unknown or a repeated one."""
    chosen = list(TRANSFORMS) if families is None else list(families)
    unknown = [f for f in chosen if f not in TRANSFORMS]
    if unknown:
        raise DatasetError(f"unknown transformation famil{'y' if len(unknown) == 1 else 'ies'} "
                           f"{', '.join(map(repr, unknown))}; known: {', '.join(TRANSFORMS)}")
    if not chosen or len(set(chosen)) != len(chosen):
        raise DatasetError(f"families must name at least one family, each once (got {chosen})")
    return chosen


def _listing_source(source: str, fashion_dir: str) -> _Source:
    """The images listings are made of: Fashion-MNIST's training split, digits, or every non-flat photo tile."""
    if source == "digits":
        return _digits_source()
    if source == "photos":
        return _photo_source(_LISTING_TILE, 2**31)
    pixels, labels = load_fashion_mnist("train", fashion_dir)
    return _Source(pixels, labels.astype(np.int64), FASHION_MNIST_CATEGORIES, "train")


def _view_families(families: Sequence[str], views: int, seed: int, row: int) -> list[str]:
    """The family of each view of the listing of source `row`: `families` in turn from a seeded offset."""
    offset = int(np.random.default_rng([seed, row]).integers(len(families)))
    return [families[(offset + j) % len(families)] for j in range(views)]


def _listing_files(source: _Source, plans: dict[int, list[str]]) -> tuple[list[str], list[int]]:
    """(`<category>/<prefix>-<row>/<image>` paths, source row of each) of the listings planned as {row: families}."""
    files, rows = [], []
    for row, plan in plans.items():
        folder = f"{source.categories[source.labels[row]]}/{source.prefix}-{row:05d}"
        names = ["original.png"] + [f"view-{j + 1:02d}-{f}.{_view_format(f)}" for j, f in enumerate(plan)]
        files += [f"{folder}/{name}" for name in names]
        rows += [row] * len(names)
    return files, rows


def _view_format(family: str) -> str:
    return "jpg" if family == "jpeg" else "png"


def _listing_images(source: _Source, row: int, plan: Sequence[str], render: _Render, seed: int) -> Iterator[bytes]:
    """The encoded original of `row` (PNG, as _encode writes it), then each view of `plan` transformed from the
    original's exact pixels, view j drawing its parameters from generator (seed, row, j)."""
    original = _encode(source.pixels[row], render)
    yield original
    with Image.open(io.BytesIO(original)) as decoded:
        image = decoded.convert("RGB")
    for j, family in enumerate(plan):
        view = transform_view(image, family, np.random.default_rng([seed, row, j + 1]))
        buffer = io.BytesIO()
        if family == "jpeg":
            view.save(buffer, "JPEG", quality="keep", subsampling="keep")
        else:
            view.save(buffer, "PNG")
        yield buffer.getvalue()


# ----------------------------------------------------------------------------------------------
# Sources in memory


def _digits_source() -> _Source:
    """scikit-learn's digits (bundled: no download), values 0..16 scaled to 0..255."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return _Source(pixels, digits.target.astype(np.int64), DIGIT_CATEGORIES, "digits")


def _photo_source(tile: int, per_category: int) -> _Source:
    """Non-overlapping `tile`-pixel squares of each photo of PHOTOS, flat ones (pixel standard deviation under
    8) left out, at most `per_category` per photo spread evenly over it."""
    import skimage.data

    tiles, labels = [], []
    for label, name in enumerate(PHOTOS):
        photo = skimage.data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skimage.data, name)()
        squares = [photo[y:y + tile, x:x + tile] for y in range(0, photo.shape[0] - tile + 1, tile)
                   for x in range(0, photo.shape[1] - tile + 1, tile)]
        squares = [t for t in squares if t.std() >= 8]
        keep = np.linspace(0, len(squares) - 1, min(per_category, len(squares))).round().astype(int)
        tiles += [squares[i] for i in keep]
        labels += [label] * len(keep)
    return _Source(np.stack(tiles), np.asarray(labels, np.int64), PHOTOS, "photos")


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST's IDX files


def load_fashion_mnist(split: str = "train", source: str = FASHION_MNIST_DIR) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images [n, 28, 28], uint8 labels [n]) of a Fashion-MNIST split read from `source`.

    Raises DatasetError naming the Debian package to install when the files are missing, and when the
    files are malformed or disagree in length.
    """
    fs, path = gio.url_to_fs(source)
    names = FASHION_MNIST_FILES[split]
    missing = [n for n in names if not fs.exists(posixpath.join(path, n))]
    if missing:
        raise DatasetError(
            f"Fashion-MNIST {split} files not found in {source}: {', '.join(missing)}. Install Debian's "
            f"{FASHION_MNIST_PACKAGE} package (apt-get install -y {FASHION_MNIST_PACKAGE}), or point "
            f"source/--source at a directory holding {', '.join(names)}"
        )
    images, labels = (read_idx(gio.join(source, n)) for n in names)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetError(f"{source}: {names[0]} holds {images.shape}, {names[1]} holds {labels.shape}; "
                           "expected [n, rows, cols] images and [n] labels")
    if labels.max(initial=0) >= len(FASHION_MNIST_CATEGORIES):
        raise DatasetError(f"{gio.join(source, names[1])}: label {labels.max()} is not a Fashion-MNIST class")
    return images, labels


def read_idx(uri: str) -> np.ndarray:
    """The uint8 array in an IDX file (gzipped when `uri` ends in .gz): [n] labels or [n, rows, cols] images.

    Parsed by hand with numpy: a 4-byte magic (0, 0, type 0x08 = uint8, number of dimensions), one
    big-endian uint32 per dimension (8 header bytes for labels, 16 for images), then the data. Raises
    DatasetError for another type, or a length that does not match the header.
    """
    try:
        with fsspec.open(uri, "rb", compression="infer") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise DatasetError(f"{uri} could not be read: {err}") from err
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise DatasetError(f"{uri} is not a uint8 IDX file (magic bytes {data[:4].hex() or 'missing'})")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(f"{uri}: IDX header of {ndim} dimensions is truncated")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    if len(data) - header != math.prod(dims):
        raise DatasetError(f"{uri}: header says {dims} = {math.prod(dims)} bytes, file holds {len(data) - header}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims)


# ----------------------------------------------------------------------------------------------
# Choosing rows


def _select(labels: np.ndarray, limit: int | None, per_class: int | None, seed: int) -> np.ndarray:
    """Sorted rows to write: at most `per_class` per label, then at most `limit` spread evenly over labels.

    All rows when both are None. Rows are drawn in a `seed`ed random order, so equal arguments pick
    equal rows and a smaller limit picks a subset of a larger one's.
    """
    for name, value in (("limit", limit), ("per_class", per_class)):
        if value is not None and value <= 0:
            raise DatasetError(f"{name} must be positive, not {value}")
    order = np.random.default_rng(seed).permutation(len(labels))
    rank = np.empty(len(labels), np.int64)  # position of each row among its label's rows, in `order`
    for label in np.unique(labels):
        members = order[labels[order] == label]
        rank[members] = np.arange(len(members))
    keep = order if per_class is None else order[rank[order] < per_class]
    if limit is not None and limit < len(keep):
        # Round-robin over labels: every label's first row comes before any label's second row.
        keep = keep[np.lexsort((labels[keep], rank[keep]))][:limit]
    return np.sort(keep)


def _holdout_split(rows: np.ndarray, labels: np.ndarray, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(index rows, query rows), sorted and disjoint, with `holdout` of each label's rows as queries.

    Raises DatasetError when scikit-learn cannot stratify (a label with one row, or fewer query rows
    than labels).
    """
    from sklearn.model_selection import train_test_split

    try:
        index, query = train_test_split(rows, test_size=holdout, stratify=labels[rows], random_state=seed)
    except ValueError as err:
        raise DatasetError(f"holdout={holdout} of {len(rows)} images cannot be stratified over "
                           f"{len(np.unique(labels[rows]))} categories ({err}); raise limit or holdout") from err
    return np.sort(index), np.sort(query)


# ----------------------------------------------------------------------------------------------
# Writing a tree


def _check_render(size: int, fmt: str, resample: str) -> _Render:
    """The render settings, or DatasetError naming the bad one."""
    if not 1 <= size <= 4096:
        raise DatasetError(f"size must be between 1 and 4096 pixels, not {size}")
    if fmt not in FORMATS:
        raise DatasetError(f"fmt must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if resample not in RESAMPLING:
        raise DatasetError(f"resample must be one of {', '.join(RESAMPLING)}, not {resample!r}")
    return _Render(size, fmt, resample)


def _encode(pixels: np.ndarray, render: _Render) -> bytes:
    """One uint8 [h, w] grey or [h, w, 3] colour image resized to render.size, as RGB PNG or JPEG (quality 90)
    bytes."""
    image = Image.fromarray(pixels)
    if image.size != (render.size, render.size):
        image = image.resize((render.size, render.size), RESAMPLING[render.resample])
    buffer = io.BytesIO()
    options = {"quality": JPEG_QUALITY} if render.fmt == "jpg" else {}
    image.convert("RGB").save(buffer, FORMATS[render.fmt], **options)
    return buffer.getvalue()


def _write_split(root: str, source: _Source, rows: np.ndarray, render: _Render, params: dict[str, Any],
                 holdout: float, seed: int, query_root: str | None, overwrite: bool) -> Tree:
    """Write `rows` as one index tree, or with `holdout` > 0 a stratified fraction of them as a query tree at
    `query_root` (default `<root>-query`) and the rest as the index tree, returned with `.query` set. Refuses a
    holdout outside [0, 1)."""
    if not 0.0 <= holdout < 1.0:
        raise DatasetError(f"holdout must be in [0, 1), not {holdout}")
    if holdout == 0.0:
        return _write_tree(root, source, rows, render, {**params, "role": "index"}, overwrite)
    index_rows, query_rows = _holdout_split(rows, source.labels, holdout, seed)
    query_root = query_root or root.rstrip("/") + "-query"
    query = _write_tree(query_root, source, query_rows, render, {**params, "role": "query"}, overwrite)
    index = _write_tree(root, source, index_rows, render, {**params, "role": "index"}, overwrite)
    return dataclasses.replace(index, query=query)


def _write_tree(root: str, source: _Source, rows: np.ndarray, render: _Render, params: dict[str, Any],
                overwrite: bool) -> Tree:
    """Write `rows` of `source` under `root`, then the marker; returns the tree (or the identical one found)."""
    fs, path = gio.url_to_fs(root)
    root = gio.full_uri(fs, path)  # canonical, so uris() equal io.discover_inputs' uris
    existing = _prepare_root(fs, path, root, params, overwrite)
    if existing is not None:
        return existing
    files = [f"{source.categories[source.labels[r]]}/{source.prefix}-{r:05d}.{render.fmt}" for r in rows]
    return _store_tree(fs, path, root, files, rows, (_encode(source.pixels[r], render) for r in rows), params)


def _store_tree(fs: fsspec.AbstractFileSystem, path: str, root: str, files: Sequence[str], rows: Iterable[int],
                encoded: Iterable[bytes], params: dict[str, Any]) -> Tree:
    """Write `encoded` (one image's bytes per file, in order) as `files` under `path`, _CHUNK images per fs.pipe
    call, then the marker last; returns the tree, `rows` being the source row of each file."""
    for folder in sorted({posixpath.dirname(f) for f in files}):
        fs.makedirs(posixpath.join(path, folder), exist_ok=True)
    chunk: dict[str, bytes] = {}
    for name, data in zip(files, encoded, strict=True):
        chunk[posixpath.join(path, name)] = data
        if len(chunk) == _CHUNK:
            fs.pipe(chunk)
            chunk = {}
    if chunk:
        fs.pipe(chunk)
    tree = Tree(root, tuple(files), tuple(int(r) for r in rows))
    marker = {"params": params, "counts": tree.counts(), "files": list(files), "source_rows": list(tree.source_rows)}
    fs.pipe_file(posixpath.join(path, MARKER), json.dumps(marker).encode())
    return tree


def _prepare_root(fs: fsspec.AbstractFileSystem, path: str, root: str, params: dict[str, Any],
                  overwrite: bool) -> Tree | None:
    """The tree already at `root` if its marker records equal `params` (a rerun writes nothing), else None
    once `root` is empty. Files there are trusted to be as the marker lists them. Raises DatasetError
    when `root` holds other files, unless `overwrite`, which deletes them first."""
    marker_path = posixpath.join(path, MARKER)
    try:
        marker = json.loads(fs.cat_file(marker_path)) if fs.exists(marker_path) else None
    except json.JSONDecodeError:
        marker = None  # a damaged marker: treated like files this module did not write
    if marker is not None and marker.get("params") == params and not overwrite:
        return Tree(root, tuple(marker["files"]), tuple(marker["source_rows"]), reused=True)
    if fs.exists(path) and fs.ls(path, detail=False):
        if not overwrite:
            what = "a tree written with other parameters" if marker else "files this module did not write"
            raise DatasetError(f"{root} already holds {what}; pass overwrite=True (--overwrite) to replace "
                               "them, or choose an empty root")
        fs.rm(path, recursive=True)
    return None


# ----------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gatrep.datasets",
                                     description="Write a labelled image tree <root>/<category>/[<listing>/]<image>.")
    sub = parser.add_subparsers(dest="dataset", required=True)
    digits = sub.add_parser("digits", help="scikit-learn's 1,797 8x8 digits, upscaled")
    digits.add_argument("root", help="output tree, any fsspec URI")
    digits.add_argument("--size", type=int, default=64, help="pixels per side (default: 64)")
    digits.add_argument("--fmt", choices=sorted(FORMATS), default="png", help="(default: png)")
    digits.add_argument("--resample", choices=sorted(RESAMPLING), default="bilinear", help="(default: bilinear)")
    digits.add_argument("--limit", type=int, help="at most this many images, spread evenly over digits")
    digits.add_argument("--holdout", type=float, default=0.0, help="stratified fraction for a query tree")
    digits.add_argument("--query-root", help="where held-out queries go (default: <root>-query)")
    fashion = sub.add_parser("fashion-mnist", help=f"Fashion-MNIST from Debian's {FASHION_MNIST_PACKAGE}")
    fashion.add_argument("root", help="output tree, any fsspec URI")
    fashion.add_argument("--split", choices=sorted(FASHION_MNIST_FILES), default="train", help="(default: train)")
    fashion.add_argument("--size", type=int, default=256, help="pixels per side (default: 256)")
    fashion.add_argument("--fmt", choices=sorted(FORMATS), default="jpg", help="(default: jpg)")
    fashion.add_argument("--limit", type=int, help="at most this many images, spread evenly over classes")
    fashion.add_argument("--per-class", type=int, help="at most this many images per class")
    fashion.add_argument("--source", default=FASHION_MNIST_DIR, help=f"IDX directory (default: {FASHION_MNIST_DIR})")
    photos = sub.add_parser("photos", help="colour tiles of scikit-image's eight photographs (photo = category)")
    photos.add_argument("root", help="output tree, any fsspec URI")
    photos.add_argument("--tile", type=int, default=64, help="tile side in the photo, pixels (default: 64)")
    photos.add_argument("--size", type=int, default=128, help="pixels per side written (default: 128)")
    photos.add_argument("--per-category", type=int, default=40, help="at most this many tiles per photo")
    photos.add_argument("--holdout", type=float, default=0.0, help="stratified fraction for a query tree")
    photos.add_argument("--query-root", help="where held-out queries go (default: <root>-query)")
    listings = sub.add_parser("listings", help="near-duplicate listings: each an original and transformed views")
    listings.add_argument("root", help="output tree <root>/<category>/<listing>/<image>, any fsspec URI")
    listings.add_argument("--source", choices=LISTING_SOURCES, default="fashion-mnist",
                          help="images the listings are made of (default: fashion-mnist)")
    listings.add_argument("--listings", type=int, default=100, help="listings, spread over categories (default: 100)")
    listings.add_argument("--views", type=int, default=5, help="transformed views per listing (default: 5)")
    listings.add_argument("--families", help=f"comma-separated transformation families (default: all of "
                                             f"{','.join(TRANSFORMS)})")
    listings.add_argument("--size", type=int, default=128, help="pixels per side (default: 128)")
    listings.add_argument("--fashion-dir", default=FASHION_MNIST_DIR,
                          help=f"Fashion-MNIST IDX directory (default: {FASHION_MNIST_DIR})")
    for p in (digits, fashion, photos, listings):
        p.add_argument("--seed", type=int, default=0, help="which rows limit/holdout pick (default: 0)")
        p.add_argument("--overwrite", action="store_true", help="replace whatever the root holds")
    return parser


def _describe(tree: Tree, seconds: float) -> str:
    verb = "found complete" if tree.reused else f"wrote in {seconds:.1f} s"
    counts = ", ".join(f"{c}={n}" for c, n in tree.counts().items())
    nested = any(f.count("/") >= 2 for f in tree.files)
    grouped = f" in {len(set(tree.listings()))} listings" if nested else ""
    return f"{tree.root}: {len(tree.files)} images{grouped}, {verb} ({counts})"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns 0, or 1 with the reason on stderr when a DatasetError is raised."""
    args = _parser().parse_args(argv)
    start = time.perf_counter()
    try:
        if args.dataset == "digits":
            tree = write_digits(args.root, args.size, args.fmt, args.limit, args.holdout, args.seed,
                                args.resample, args.query_root, args.overwrite)
        elif args.dataset == "listings":
            families = None if args.families is None else [f.strip() for f in args.families.split(",")]
            tree = write_listings(args.root, args.source, args.listings, args.views, families, args.size, args.seed,
                                  args.fashion_dir, args.overwrite)
        elif args.dataset == "photos":
            tree = write_photo_tiles(args.root, args.tile, args.size, args.per_category, args.holdout, args.seed,
                                     args.query_root, args.overwrite)
        else:
            tree = write_fashion_mnist(args.root, args.split, args.size, args.fmt, args.limit, args.per_class,
                                       args.seed, args.source, args.overwrite)
    except DatasetError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    seconds = time.perf_counter() - start
    for t in (tree, tree.query):
        if t is not None:
            print(_describe(t, seconds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
