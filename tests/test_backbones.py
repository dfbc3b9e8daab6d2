"""The backbone registry, weight resolution without downloads, and the decode step of a batch."""

from __future__ import annotations

import io as stdio

import numpy as np
import pytest
import torch
from PIL import Image

from gatrep import backbones, images, schemas
from gatrep.backbones import weights
from gatrep.backbones.torch_encoder import style_statistics as backbone_style
from gatrep.stages.embed import PIXELS, prepare_batch


def test_registry_lists_the_designed_backbones():
    assert {"clip-vit-b32", "resnet50", "mobilenet_v2", "vgg19", "hog", "tiny-random"} <= set(backbones.names())
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


@pytest.mark.parametrize("name", backbones.with_style())
def test_style_vectors_come_from_the_same_forward_pass(name):
    backbone = backbones.get(name)
    p = backbone.preprocess
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, (p.size, p.size, p.channels), dtype=np.uint8)
    ramp = np.broadcast_to(np.linspace(0, 255, p.size, dtype=np.uint8)[None, :, None], noise.shape)
    pixels = np.stack([noise, ramp * np.array([0, 0, 1], np.uint8)])  # a grainy image, a smooth blue one
    encoder = backbone.load("random", "cpu")
    content, style = encoder.embed(pixels)
    assert np.array_equal(content, encoder(pixels)), "the hooks change nothing of the content features"
    assert style.shape == (2, backbone.style_dim) and style.dtype == np.float32
    assert np.allclose(np.linalg.norm(style, axis=1), 1.0, atol=1e-5)
    assert backbone.style_dim <= 2 * backbone.dim, "style vectors store at most twice the content's width"
    # The look, not the layout: a mirrored image has the same per-channel statistics in every layer (up to the
    # padding at the borders), a differently coloured one does not.
    mirrored = encoder.embed(pixels[:, :, ::-1])[1]
    assert float(style[0] @ mirrored[0]) > 0.95 > 0.9 > float(style[0] @ style[1])


def test_style_statistics_weigh_every_layer_equally():
    small = torch.zeros(1, 2, 4, 4)
    small[0, 0] = 1.0  # channel 0 on: mean (1, 0), std (0, 0)
    large = torch.full((1, 3, 2, 2), 50.0)
    style = backbone_style([small, large])
    assert style.shape == (1, 2 * 2 + 2 * 3)
    # Each layer's (mean, std) part is scaled to the same norm before the whole vector is: 1/sqrt(2) each.
    assert np.linalg.norm(style[0, :4]) == pytest.approx(np.linalg.norm(style[0, 4:])) == pytest.approx(0.5**0.5)


def test_backbones_without_feature_maps_refuse_style():
    from gatrep.config import ConfigError, EmbedConfig

    assert set(backbones.with_style()) == {"mobilenet_v2", "resnet50", "tiny-random", "vgg19"}
    with pytest.raises(ConfigError, match="--style: hog has no convolutional feature maps to take style from; "
                                          "use one of mobilenet_v2, resnet50, tiny-random, vgg19"):
        EmbedConfig(input="x", run="y", backbone="hog", style=True)
    with pytest.raises(ValueError, match="backbone 'clip-vit-b32' has no style vectors; these do: mobilenet_v2"):
        backbones.load_with_style("clip-vit-b32", "random", "cpu")
