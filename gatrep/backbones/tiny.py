"""A tiny convolutional backbone with fixed random weights, for tests and smoke runs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gatrep.backbones import Backbone, Encoder, register
from gatrep.images import Preprocess

if TYPE_CHECKING:
    from torch import nn

_DIM = 32
_STYLE_LAYERS, _STYLE_DIM = ("1", "3"), 2 * (8 + 16)  # its two ReLUs


def _net() -> nn.Module:
    from torch import nn  # imported when loaded, not registered (see torchvision_nets)

    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, _DIM),
    )


def _load(weights_spec: str, device: str) -> Encoder:
    import torch

    from gatrep.backbones.torch_encoder import IMAGENET_MEAN, IMAGENET_STD, TorchEncoder, load_into

    torch.manual_seed(0)  # the same random weights in every process
    model = _net()
    if weights_spec not in ("default", "random"):
        load_into(model, weights_spec, "tiny-random")
    return TorchEncoder(model, _DIM, IMAGENET_MEAN, IMAGENET_STD, device, _STYLE_LAYERS, _STYLE_DIM)


register(Backbone(
    name="tiny-random", dim=_DIM, preprocess=Preprocess(size=32, crop_fraction=1.0), load=_load,
    description="two random conv layers, 32-d: for tests only, its features mean little", style_dim=_STYLE_DIM,
))
