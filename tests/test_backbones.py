"""The backbone registry, weight resolution without downloads, and the decode step of a batch."""

from __future__ import annotations

import io as stdio

import numpy as np
import pytest
import torch
from PIL import Image

from gatrep import backbones, images, schemas
from gatrep.backbones import weights
from gatrep.stages.embed import PIXELS, prepare_batch


def test_registry_lists_the_designed_backbones():
    assert {"clip-vit-b32", "resnet50", "mobilenet_v2", "hog", "tiny-random"} <= set(backbones.names())
    with pytest.raises(KeyError, match="unknown backbone 'vgg'; known: clip-vit-b32"):
        backbones.get("vgg")


@pytest.mark.parametrize("name", ["tiny-random", "hog"])
def test_encoders_return_unit_vectors_of_their_dim(name):
    backbone = backbones.get(name)
    p = backbone.preprocess
    pixels = np.random.default_rng(0).integers(0, 255, (3, p.size, p.size, p.channels), dtype=np.uint8)
    features = backbone.load("default", "cpu")(pixels)
    assert features.shape == (3, backbone.dim) and features.dtype == np.float32
    assert np.allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)


def test_random_weights_are_identical_across_loads():
    pixels = np.full((1, 32, 32, 3), 100, np.uint8)
    a = backbones.get("tiny-random").load("random", "cpu")(pixels)
    b = backbones.get("tiny-random").load("random", "cpu")(pixels)
    assert np.array_equal(a, b)


def test_weights_resolution_order_and_message(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    source = weights.WeightsSource(filenames=("net-123.pth",), packages=("no-such-weights-package",),
                                   hf_repo="org/net", hf_files=("model.safetensors",))
    assert weights.resolve("net", "random", source) is None
    with pytest.raises(weights.WeightsNotFound) as err:
        weights.resolve("net", "default", source)
    message = str(err.value)
    assert str(tmp_path / "torch/hub/checkpoints/net-123.pth") in message
    assert "the installed package 'no-such-weights-package'" in message
    assert "Hugging Face cache org/net/model.safetensors" in message
    assert "--weights /path/to/file" in message
    cached = tmp_path / "torch/hub/checkpoints/net-123.pth"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"w")
    assert weights.resolve("net", "default", source) == cached
    with pytest.raises(weights.WeightsNotFound, match="weights file '/nope.pth' does not exist"):
        weights.resolve("net", "/nope.pth", source)


def test_explicit_weights_file_is_loaded(tmp_path):
    torch.manual_seed(5)
    other = backbones.tiny._net()
    torch.save(other.state_dict(), tmp_path / "tiny.pth")
    pixels = np.full((1, 32, 32, 3), 100, np.uint8)
    loaded = backbones.get("tiny-random").load(str(tmp_path / "tiny.pth"), "cpu")(pixels)
    default = backbones.get("tiny-random").load("random", "cpu")(pixels)
    assert not np.allclose(loaded, default)


def test_a_file_that_is_not_weights_is_a_clear_error(tmp_path):
    from gatrep.backbones.torch_encoder import BadWeights

    (tmp_path / "notes.pth").write_text("these are not weights")
    with pytest.raises(BadWeights, match="notes.pth is not a weights file"):
        backbones.get("tiny-random").load(str(tmp_path / "notes.pth"), "cpu")
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    with pytest.raises(BadWeights, match="other.pth is not a tiny-random checkpoint"):
        backbones.get("tiny-random").load(str(tmp_path / "other.pth"), "cpu")


def test_mobilenet_v2_loads_the_installed_imagenet_file():
    """The registered backbone, as the embed job loads it: with its 'default' weights, no download."""
    encoder = backbones.get("mobilenet_v2").load("default", "cpu")
    features = encoder(np.full((1, 224, 224, 3), 128, np.uint8))
    random = backbones.get("mobilenet_v2").load("random", "cpu")(np.full((1, 224, 224, 3), 128, np.uint8))
    assert features.shape == (1, 1280) and not np.allclose(features, random)


def test_a_bad_file_costs_only_its_own_row(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (40, 40), (200, 10, 10)).save(good)
    buffer = stdio.BytesIO()
    Image.new("RGB", (40, 40)).save(buffer, "JPEG")
    (tmp_path / "trunc.jpg").write_bytes(buffer.getvalue()[:100])
    (tmp_path / "empty.jpg").write_bytes(b"")
    uris = [str(tmp_path / n) for n in ("trunc.jpg", "good.png", "missing.jpg", "empty.jpg")]
    batch = {schemas.URI: np.array(uris, dtype=object), schemas.LISTING: np.array(["l"] * 4, dtype=object),
             schemas.CATEGORY: np.array(["c"] * 4, dtype=object)}
    out = prepare_batch(batch, backbone="tiny-random", max_pixels=10**6, max_bytes=10**6, known={})
    assert out[schemas.STATUS].tolist() == [schemas.TRUNCATED, schemas.OK, schemas.UNREADABLE, schemas.EMPTY]
    alone = images.decode(good.read_bytes(), backbones.get("tiny-random").preprocess, 10**6)
    assert np.array_equal(out[PIXELS][1], alone.pixels)
    assert out[schemas.IMAGE_ID][2] is None and out[schemas.IMAGE_ID][1] == images.content_id(good.read_bytes())
    # rows already embedded with the same content are dropped; changed content is not
    known = {uris[1]: images.content_id(good.read_bytes()), uris[0]: "stale-hash"}
    again = prepare_batch(batch, backbone="tiny-random", max_pixels=10**6, max_bytes=10**6, known=known)
    assert again[schemas.URI].tolist() == [uris[0], uris[2], uris[3]]
