"""Tests of gatrep.datasets: digits and Fashion-MNIST image trees, IDX parsing, holdout, reruns, the CLI."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import fsspec
import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from gatrep import datasets, io

REPO = Path(__file__).resolve().parents[1]


def _rows(tree: datasets.Tree) -> dict[int, str]:
    """source row -> category of every image in a tree."""
    return dict(zip(tree.source_rows, tree.categories(), strict=True))


def _files_on_disk(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != datasets.MARKER)


def _write_idx(path: Path, array: np.ndarray) -> None:
    """A gzipped uint8 IDX file: magic 0,0,8,ndim, big-endian uint32 dims, then the bytes."""
    header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray]:
    data = load_digits()
    return data.images, data.target


# ----------------------------------------------------------------------------------------------
# digits


def test_digits_counts_sizes_modes(tmp_path: Path) -> None:
    tree = datasets.write_digits(str(tmp_path / "d"), size=16, limit=50)
    assert tree.counts() == {f"digit-{i}": 5 for i in range(10)}
    assert _files_on_disk(tmp_path / "d") == sorted(tree.files)
    for uri in tree.uris()[:5]:
        with Image.open(uri) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", (16, 16))


def test_digits_pixels_and_labels_match_sklearn(tmp_path: Path, digits: tuple[np.ndarray, np.ndarray]) -> None:
    images, target = digits
    tree = datasets.write_digits(str(tmp_path / "d"), size=16, limit=20, resample="nearest")
    for uri, row, category in zip(tree.uris(), tree.source_rows, tree.categories(), strict=True):
        assert category == f"digit-{target[row]}"
        pixels = np.asarray(Image.open(uri))
        assert np.array_equal(pixels[..., 0], pixels[..., 2])  # grey saved as RGB
        # Nearest upscaling by 2: every other pixel is the source value scaled 0..16 -> 0..255.
        np.testing.assert_array_equal(pixels[::2, ::2, 0], np.rint(images[row] * 255 / 16).astype(np.uint8))
    first = np.asarray(Image.open(tree.uris()[0]))
    row = tree.source_rows[0]
    assert first[0, 0, 1] == round(images[row][0, 0] * 255 / 16)
    assert first[9, 7, 0] == round(images[row][4, 3] * 255 / 16)


def test_holdout_is_disjoint_and_stratified(tmp_path: Path, digits: tuple[np.ndarray, np.ndarray]) -> None:
    _, target = digits
    tree = datasets.write_digits(str(tmp_path / "index"), size=8, holdout=0.2, seed=3)
    assert tree.query is not None and tree.query.root == str(tmp_path / "index") + "-query"
    index_rows, query_rows = set(tree.source_rows), set(tree.query.source_rows)
    assert not index_rows & query_rows
    assert index_rows | query_rows == set(range(len(target)))
    class_sizes = Counter(f"digit-{t}" for t in target)
    for category, n in tree.query.counts().items():
        assert abs(n - 0.2 * class_sizes[category]) <= 1, category
    assert not set(_files_on_disk(tmp_path / "index")) & set(_files_on_disk(tmp_path / "index-query"))


def test_holdout_that_cannot_be_stratified_is_refused(tmp_path: Path) -> None:
    with pytest.raises(datasets.DatasetError, match="cannot be stratified"):
        datasets.write_digits(str(tmp_path / "d"), size=8, limit=10, holdout=0.5)
    with pytest.raises(datasets.DatasetError, match="holdout"):
        datasets.write_digits(str(tmp_path / "d"), holdout=1.0)


def test_limit_spreads_over_labels_and_grows_by_subsets() -> None:
    labels = np.repeat(np.arange(4), [10, 3, 7, 5])
    chosen = datasets._select(labels, limit=10, per_class=None, seed=0)
    assert sorted(Counter(labels[chosen]).values()) == [2, 2, 3, 3]
    assert set(datasets._select(labels, 6, None, 0)) <= set(chosen)
    per_class = datasets._select(labels, None, 4, 1)
    assert Counter(labels[per_class]) == {0: 4, 1: 3, 2: 4, 3: 4}
    assert np.array_equal(datasets._select(labels, None, None, 5), np.arange(len(labels)))


def test_rerun_reuses_and_other_parameters_are_refused(tmp_path: Path) -> None:
    root = str(tmp_path / "d")
    first = datasets.write_digits(root, size=8, limit=10)
    again = datasets.write_digits(root, size=8, limit=10)
    assert (first.reused, again.reused) == (False, True)
    assert again.files == first.files and again.source_rows == first.source_rows
    with pytest.raises(datasets.DatasetError, match="other parameters.*--overwrite"):
        datasets.write_digits(root, size=8, limit=20)
    replaced = datasets.write_digits(root, size=8, limit=20, overwrite=True)
    assert len(_files_on_disk(tmp_path / "d")) == len(replaced.files) == 20
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("not ours")
    with pytest.raises(datasets.DatasetError, match="did not write"):
        datasets.write_digits(str(tmp_path / "other"), size=8, limit=10)


def test_writes_to_any_fsspec_uri_and_io_discovers_it() -> None:
    root = "memory://gatrep-test-datasets/digits"
    try:
        tree = datasets.write_digits(root, size=8, limit=10, fmt="jpg")
        inputs = io.discover_inputs(root)
        assert inputs.num_rows == 10  # the marker is not an input
        assert sorted(inputs.column("uri").to_pylist()) == sorted(tree.uris())
        assert inputs.column("category").to_pylist() == inputs.column("listing").to_pylist()
        with fsspec.open(tree.uris()[0], "rb") as f, Image.open(f) as image:
            assert (image.format, image.size) == ("JPEG", (8, 8))
    finally:
        fsspec.filesystem("memory").rm("/gatrep-test-datasets", recursive=True)


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    for kwargs, message in (({"size": 0}, "size"), ({"fmt": "gif"}, "fmt"), ({"resample": "cubic"}, "resample"),
                            ({"limit": 0}, "limit")):
        with pytest.raises(datasets.DatasetError, match=message):
            datasets.write_digits(str(tmp_path / "d"), **kwargs)


# ----------------------------------------------------------------------------------------------
# IDX files and Fashion-MNIST


@pytest.fixture()
def tiny_fashion(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """A Fashion-MNIST-shaped source of 20 images (two per class) with distinct pixels."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(20, 28, 28), dtype=np.uint8)
    labels = np.tile(np.arange(10, dtype=np.uint8), 2)
    source = tmp_path / "source"
    source.mkdir()
    _write_idx(source / "train-images-idx3-ubyte.gz", images)
    _write_idx(source / "train-labels-idx1-ubyte.gz", labels)
    return source, images, labels


def test_read_idx_parses_headers_and_refuses_bad_files(tmp_path: Path) -> None:
    images = np.arange(12, dtype=np.uint8).reshape(2, 2, 3)
    _write_idx(tmp_path / "i.gz", images)
    parsed = datasets.read_idx(str(tmp_path / "i.gz"))
    assert parsed.shape == (2, 2, 3) and parsed[1, 1, 2] == 11
    _write_idx(tmp_path / "l.gz", np.array([7, 3], np.uint8))
    assert datasets.read_idx(str(tmp_path / "l.gz")).tolist() == [7, 3]
    good = gzip.decompress((tmp_path / "i.gz").read_bytes())
    (tmp_path / "short.gz").write_bytes(gzip.compress(good[:-1]))
    with pytest.raises(datasets.DatasetError, match="header says"):
        datasets.read_idx(str(tmp_path / "short.gz"))
    (tmp_path / "float.gz").write_bytes(gzip.compress(bytes([0, 0, 0x0D, 1]) + good[4:]))
    with pytest.raises(datasets.DatasetError, match="not a uint8 IDX"):
        datasets.read_idx(str(tmp_path / "float.gz"))


def test_fashion_mnist_tree_from_a_source(tmp_path: Path, tiny_fashion: tuple[Path, np.ndarray, np.ndarray]) -> None:
    source, images, labels = tiny_fashion
    tree = datasets.write_fashion_mnist(str(tmp_path / "fm"), size=28, fmt="png", source=str(source))
    assert tree.counts() == dict.fromkeys(sorted(datasets.FASHION_MNIST_CATEGORIES), 2)
    assert _rows(tree)[9] == "ankle-boot" and _rows(tree)[0] == "t-shirt"
    for uri, row in zip(tree.uris(), tree.source_rows, strict=True):
        assert np.array_equal(np.asarray(Image.open(uri))[..., 1], images[row])  # size 28: no resampling
        assert uri.endswith(f"/{datasets.FASHION_MNIST_CATEGORIES[labels[row]]}/train-{row:05d}.png")
    one_each = datasets.write_fashion_mnist(str(tmp_path / "one"), size=32, per_class=1, source=str(source))
    assert sorted(one_each.counts().values()) == [1] * 10
    with Image.open(one_each.uris()[0]) as image:
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (32, 32))


def test_missing_fashion_mnist_names_the_package(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(datasets.DatasetError, match="apt-get install -y dataset-fashion-mnist"):
        datasets.write_fashion_mnist(str(tmp_path / "fm"), source=str(tmp_path))
    assert datasets.main(["fashion-mnist", str(tmp_path / "fm"), "--source", str(tmp_path)]) == 1
    assert "dataset-fashion-mnist" in capsys.readouterr().err
    assert not (tmp_path / "fm").exists()


def test_fashion_mnist_from_the_debian_package(tmp_path: Path) -> None:
    names = datasets.FASHION_MNIST_FILES["train"] + datasets.FASHION_MNIST_FILES["test"]
    if not all(os.path.exists(os.path.join(datasets.FASHION_MNIST_DIR, n)) for n in names):
        pytest.skip(f"Debian's {datasets.FASHION_MNIST_PACKAGE} is not installed (apt-get install -y "
                    f"{datasets.FASHION_MNIST_PACKAGE})")
    images, labels = datasets.load_fashion_mnist("train")
    assert images.shape == (60000, 28, 28) and labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    tree = datasets.write_fashion_mnist(str(tmp_path / "fm"), split="test", size=28, limit=30, seed=1)
    assert sorted(tree.counts().values()) == [3] * 10
    test_images, test_labels = datasets.load_fashion_mnist("test")
    for uri, row, category in zip(tree.uris()[:5], tree.source_rows, tree.categories(), strict=False):
        assert category == datasets.FASHION_MNIST_CATEGORIES[test_labels[row]]
        pixels = np.asarray(Image.open(uri))[..., 0].astype(float)
        assert np.abs(pixels - test_images[row]).mean() < 4  # JPEG quality 90 at 28x28


# ----------------------------------------------------------------------------------------------
# command line


def test_cli_writes_digits(tmp_path: Path) -> None:
    root = tmp_path / "cli"
    done = subprocess.run([sys.executable, "-m", "gatrep.datasets", "digits", str(root), "--size", "12",
                           "--limit", "20", "--holdout", "0.5"],
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert f"{root}: 10 images" in done.stdout and f"{root}-query: 10 images" in done.stdout
    assert len(_files_on_disk(root)) == len(_files_on_disk(Path(f"{root}-query"))) == 10


# ----------------------------------------------------------------------------------------------
# colour photo tiles


def test_photo_tiles_are_colour_squares_of_each_photo(tmp_path: Path) -> None:
    tree = datasets.write_photo_tiles(str(tmp_path / "photos"), tile=64, size=32, per_category=10, holdout=0.2)
    assert tree.query is not None and set(tree.counts()) == set(datasets.PHOTOS)
    assert all(tree.counts()[p] + tree.query.counts()[p] == 10 for p in datasets.PHOTOS)
    assert not set(tree.source_rows) & set(tree.query.source_rows)
    coffee = np.asarray(Image.open(tmp_path / "photos" / tree.files[tree.categories().index("coffee")]))
    assert coffee.shape == (32, 32, 3) and np.abs(coffee[..., 0].astype(int) - coffee[..., 2]).mean() > 10, \
        "colour, not grey saved as RGB"
    again = datasets.write_photo_tiles(str(tmp_path / "photos"), tile=64, size=32, per_category=10, holdout=0.2)
    assert again.reused


def test_cli_writes_photo_tiles(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert datasets.main(["photos", str(tmp_path / "p"), "--size", "16", "--per-category", "2"]) == 0
    assert "16 images, wrote in" in capsys.readouterr().out
    assert len(_files_on_disk(tmp_path / "p")) == 16
