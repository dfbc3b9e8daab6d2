"""Tests of gatrep.datasets' near-duplicate listings: the tree, every transformation family, seeds, the CLI, errors."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter
from sklearn.datasets import load_digits

from gatrep import datasets, io

NAME = re.compile(r"^(original\.png|view-(\d\d)-([a-z]+)\.(png|jpg))$")


def _pixels(uri: str) -> np.ndarray:
    with Image.open(uri) as image:
        return np.asarray(image.convert("RGB")).astype(np.int64)


def _colour_image(size: int = 64) -> Image.Image:
    """Red rising left to right, green top to bottom, blue a checkerboard: colour, texture and position all show."""
    y, x = np.mgrid[0:size, 0:size]
    ramp = (np.arange(size) * 255 // (size - 1)).astype(np.uint8)
    blue = (((x // 4) + (y // 4)) % 2 * 200).astype(np.uint8)
    return Image.fromarray(np.stack([ramp[x], ramp[y], blue], axis=-1))


def _view(image: Image.Image, family: str, seed: int = 0) -> np.ndarray:
    return np.asarray(datasets.transform_view(image, family, np.random.default_rng(seed))).astype(np.int64)


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> datasets.Tree:
    """12 digit listings with one view of every family each, 32 pixels."""
    root = tmp_path_factory.mktemp("listings") / "digits"
    return datasets.write_listings(str(root), "digits", listings=12, views=len(datasets.TRANSFORMS), size=32, seed=5)


# ----------------------------------------------------------------------------------------------
# The tree


def test_layout_names_and_discovery(tree: datasets.Tree) -> None:
    root = Path(tree.root)
    on_disk = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != datasets.MARKER)
    assert on_disk == sorted(tree.files)
    assert len(tree.files) == 12 * (1 + len(datasets.TRANSFORMS))
    assert len(set(tree.listings())) == 12
    target = load_digits().target
    for file, listing, row in zip(tree.files, tree.listings(), tree.source_rows, strict=True):
        category, folder, name = file.split("/")
        assert category == f"digit-{target[row]}" and folder == f"digits-{row:05d}"
        assert listing == f"{category}/{folder}"
        assert NAME.match(name), name
    inputs = io.discover_inputs(tree.root).to_pydict()
    by_uri = dict(zip(tree.uris(), tree.listings(), strict=True))
    assert {u: lst for u, lst in zip(inputs["uri"], inputs["listing"], strict=True)} == by_uri


def test_every_listing_has_each_family_once_in_numbered_views(tree: datasets.Tree) -> None:
    for listing in sorted(set(tree.listings())):
        names = sorted(f.rsplit("/", 1)[1] for f, lst in zip(tree.files, tree.listings(), strict=True)
                       if lst == listing)
        families = [datasets.view_family(n) for n in names]
        assert families.count("original") == 1
        assert sorted(f for f in families if f != "original") == sorted(datasets.TRANSFORMS)
        assert [int(NAME.match(n).group(2)) for n in names if n != "original.png"] == list(  # type: ignore[union-attr]
            range(1, len(datasets.TRANSFORMS) + 1))
        assert all(n.endswith(".jpg") == (datasets.view_family(n) == "jpeg") for n in names)


def test_fewer_views_than_families_still_cover_every_family(tmp_path: Path) -> None:
    tree = datasets.write_listings(str(tmp_path / "d"), "digits", listings=40, views=3, size=16, seed=1)
    families = [datasets.view_family(f) for f in tree.files]
    assert families.count("original") == 40 and len(families) == 160
    assert set(families) - {"original"} == set(datasets.TRANSFORMS)
    for listing in set(tree.listings()):  # a listing's views are of different families
        own = [f for f, lst in zip(families, tree.listings(), strict=True) if lst == listing and f != "original"]
        assert len(set(own)) == 3


def test_original_holds_the_source_pixels(tmp_path: Path) -> None:
    tree = datasets.write_listings(str(tmp_path / "d"), "digits", listings=5, views=1, size=8, seed=0)
    images = load_digits().images
    for uri, row, file in zip(tree.uris(), tree.source_rows, tree.files, strict=True):
        if file.endswith("original.png"):
            np.testing.assert_array_equal(_pixels(uri)[..., 1], np.rint(images[row] * 255 / 16))


def test_same_seed_same_bytes_other_seed_other_set(tmp_path: Path) -> None:
    a = datasets.write_listings(str(tmp_path / "a"), "digits", listings=10, views=4, size=24, seed=3)
    b = datasets.write_listings(str(tmp_path / "b"), "digits", listings=10, views=4, size=24, seed=3)
    c = datasets.write_listings(str(tmp_path / "c"), "digits", listings=10, views=4, size=24, seed=4)
    assert a.files == b.files
    assert all(Path(x).read_bytes() == Path(y).read_bytes() for x, y in zip(a.uris(), b.uris(), strict=True))
    assert a.files != c.files


def test_rerun_reuses_and_other_parameters_are_refused(tmp_path: Path) -> None:
    root = str(tmp_path / "d")
    first = datasets.write_listings(root, "digits", listings=4, views=2, size=16, seed=0)
    again = datasets.write_listings(root, "digits", listings=4, views=2, size=16, seed=0)
    assert again.reused and not first.reused and again.files == first.files
    with pytest.raises(datasets.DatasetError, match="other parameters"):
        datasets.write_listings(root, "digits", listings=4, views=3, size=16, seed=0)
    replaced = datasets.write_listings(root, "digits", listings=4, views=3, size=16, seed=0, overwrite=True)
    assert len(replaced.files) == 16 and not replaced.reused


def test_photo_and_fashion_sources(tmp_path: Path) -> None:
    photos = datasets.write_listings(str(tmp_path / "p"), "photos", listings=8, views=2, size=32, seed=0)
    assert set(photos.categories()) == set(datasets.PHOTOS)
    originals = [u for u, f in zip(photos.uris(), photos.files, strict=True) if f.endswith("original.png")]
    assert any(np.ptp(_pixels(u)[..., :3].mean(axis=(0, 1))) > 5 for u in originals)  # colour, not grey
    if not os.path.exists(os.path.join(datasets.FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")):
        pytest.skip(f"{datasets.FASHION_MNIST_PACKAGE} is not installed")
    fashion = datasets.write_listings(str(tmp_path / "f"), "fashion-mnist", listings=10, views=1, size=28, seed=0)
    assert set(fashion.categories()) == set(datasets.FASHION_MNIST_CATEGORIES)
    assert all(f.split("/")[1].startswith("train-") for f in fashion.files)


# ----------------------------------------------------------------------------------------------
# Each family changes the image the way its name says


def test_grayscale_has_equal_channels() -> None:
    image = _colour_image()
    view = _view(image, "grayscale")
    assert np.array_equal(view[..., 0], view[..., 1]) and np.array_equal(view[..., 1], view[..., 2])
    assert not np.array_equal(view, np.asarray(image))


def test_flip_mirrors() -> None:
    image = _colour_image()
    np.testing.assert_array_equal(_view(image, "flip"), np.asarray(image)[:, ::-1])


def test_letterbox_pads_every_border_with_one_fill_colour() -> None:
    image = _colour_image(64)
    for seed in range(5):
        view = _view(image, "letterbox", seed)
        fill = view[0, 0]
        assert tuple(fill) in {(0, 0, 0), (255, 255, 255), (128, 128, 128)}
        border = np.concatenate([view[:4].reshape(-1, 3), view[-4:].reshape(-1, 3), view[:, :4].reshape(-1, 3),
                                 view[:, -4:].reshape(-1, 3)])  # a scale of at most 0.85 leaves >= 4 pixels a side
        assert (border == fill).all()
        centre = view[24:40, 24:40]
        assert centre.std() > 20  # the shrunk picture, not padding


def test_jpeg_is_a_low_quality_jpeg_file_that_differs(tree: datasets.Tree) -> None:
    for uri, file in zip(tree.uris(), tree.files, strict=True):
        if datasets.view_family(file) != "jpeg":
            continue
        with Image.open(uri) as view:
            assert view.format == "JPEG"
            tables = view.quantization  # type: ignore[attr-defined]
        assert np.mean(tables[0]) > 40  # quality 90 gives a mean luma step near 3; quality 20 near 40
        original = _pixels(uri.rsplit("/", 1)[0] + "/original.png")
        assert np.abs(_pixels(uri) - original).mean() > 1


def test_rotate_turns_a_bar_by_10_to_30_degrees() -> None:
    bar = np.zeros((65, 65, 3), np.uint8)
    bar[30:35, 8:57] = 255
    for seed in range(5):
        view = _view(Image.fromarray(bar), "rotate", seed)[..., 0]
        ys, xs = np.nonzero(view > 128)
        dy, dx = ys - ys.mean(), xs - xs.mean()
        angle = math.degrees(0.5 * math.atan2(2 * (dx * dy).mean(), (dx * dx).mean() - (dy * dy).mean()))
        assert 8 <= abs(angle) <= 32, angle
        assert view[32, 32] == 255  # about the centre


def test_crop_keeps_a_part_of_the_image_at_full_size() -> None:
    image = _colour_image(64)
    for seed in range(5):
        view = _view(image, "crop", seed)
        assert view.shape == (64, 64, 3)
        width = (view[..., 0].max() - view[..., 0].min()) / 255  # red spans the crop's width
        height = (view[..., 1].max() - view[..., 1].min()) / 255
        assert 0.4 <= width * height <= 0.95


def test_jitter_changes_colour_not_layout() -> None:
    image = _colour_image()
    source = np.asarray(image).astype(np.int64)
    for seed in range(3):
        view = _view(image, "jitter", seed)
        assert np.abs(view - source).mean() > 3
        assert np.corrcoef(view[..., 0].ravel(), source[..., 0].ravel())[0, 1] > 0.9


def test_blur_removes_fine_detail() -> None:
    y, x = np.mgrid[0:128, 0:128]
    image = Image.fromarray(((x + y) % 2 * 255).astype(np.uint8))  # one-pixel checkerboard: only fine detail

    def detail(pixels: np.ndarray) -> float:
        edges = Image.fromarray(pixels.astype(np.uint8)).convert("L").filter(ImageFilter.FIND_EDGES)
        return float(np.asarray(edges, np.float64).var())

    for seed in range(3):
        assert detail(_view(image, "blur", seed)) < 0.1 * detail(np.asarray(image.convert("RGB")))


def test_text_changes_one_band_of_the_image() -> None:
    image = Image.new("RGB", (128, 128), (40, 40, 40))
    for seed in range(5):
        changed = np.abs(_view(image, "text", seed) - 40).sum(axis=-1) > 0
        ys, xs = np.nonzero(changed)
        assert 0.002 < changed.mean() < 0.3
        assert ys.max() - ys.min() <= 0.2 * 128  # one line of text, at most 16% of the height tall


# ----------------------------------------------------------------------------------------------
# Names, the CLI and errors


def test_view_family_reads_names_and_refuses_others() -> None:
    assert datasets.view_family("a/b/original.png") == "original"
    assert datasets.view_family("view-03-jpeg.jpg") == "jpeg"
    assert datasets.view_family("c/l/view-12-letterbox.png") == "letterbox"
    for bad in ("view-03-jpeg.png", "view-3-foo.png", "digits-00001.png", "original.jpg"):
        with pytest.raises(datasets.DatasetError, match="not an image of a listings tree"):
            datasets.view_family(bad)


def test_cli_writes_and_reuses(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path / "cli")
    argv = ["listings", root, "--source", "digits", "--listings", "6", "--views", "2", "--size", "16", "--seed", "2",
            "--families", "flip,jpeg"]
    assert datasets.main(argv) == 0
    assert "18 images in 6 listings, wrote in" in capsys.readouterr().out  # 6 originals + 12 views
    assert datasets.main(argv) == 0
    out = capsys.readouterr().out
    assert "18 images in 6 listings, found complete" in out
    names = {f.rsplit("/", 1)[1].split("-", 2)[-1] for f in datasets.write_listings(
        root, "digits", 6, 2, ["flip", "jpeg"], 16, 2).files}
    assert names == {"original.png", "flip.png", "jpeg.jpg"}


@pytest.mark.parametrize(("argv", "message"), [
    (["--views", "0"], "views must be at least 1, not 0"),
    (["--listings", "0"], "listings must be at least 1, not 0"),
    (["--families", "crop,sepia"], "unknown transformation family 'sepia'; known: crop, flip"),
    (["--families", "crop,crop"], "each once"),
    (["--size", "0"], "size must be between 1 and 4096"),
    (["--source", "photos", "--listings", "100000"], "holds 948 images, fewer than listings=100000"),
])
def test_cli_errors_say_what_was_wrong(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str],
                                       message: str) -> None:
    base = ["listings", str(tmp_path / "x"), "--source", "digits"]
    assert datasets.main(base + argv) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_api_refuses_an_unknown_source_and_an_unknown_family(tmp_path: Path) -> None:
    with pytest.raises(datasets.DatasetError, match="source must be one of fashion-mnist, digits, photos, not 'mnist'"):
        datasets.write_listings(str(tmp_path / "x"), "mnist")
    with pytest.raises(datasets.DatasetError, match="unknown transformation family 'sepia'"):
        datasets.transform_view(_colour_image(), "sepia", np.random.default_rng(0))
    with pytest.raises(datasets.DatasetError, match="at least one family"):
        datasets.write_listings(str(tmp_path / "x"), "digits", families=[])


def test_each_view_is_its_family_applied_to_the_original(tree: datasets.Tree) -> None:
    """View j of the listing of row r is transform_view(original, family, generator (seed=5, r, j)): exactly for
    PNG views, to within re-encoding with the same tables for the JPEG view."""
    for uri, file, row in zip(tree.uris(), tree.files, tree.source_rows, strict=True):
        family = datasets.view_family(file)
        if family == "original":
            continue
        j = int(file.rsplit("/", 1)[1].split("-")[1])
        with Image.open(uri.rsplit("/", 1)[0] + "/original.png") as original:
            rng = np.random.default_rng([5, row, j])
            expected = np.asarray(datasets.transform_view(original, family, rng)).astype(np.int64)
        if family == "jpeg":
            assert np.abs(_pixels(uri) - expected).mean() < 2
        else:
            np.testing.assert_array_equal(_pixels(uri), expected)
