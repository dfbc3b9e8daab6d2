"""Backbone registry: a name maps to its preprocessing, feature size and a loader of its weights."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Protocol, cast

import numpy as np

from gatrep.images import Preprocess


class Encoder(Protocol):
    """A loaded backbone: uint8 pixels [N, H, W, C] in, L2-normalised float32 features [N, dim] out."""

    dim: int

    def __call__(self, pixels: np.ndarray) -> np.ndarray: ...


class StyleEncoder(Encoder, Protocol):
    """A backbone that also describes each image's look: `embed(pixels)` returns (content [N, dim],
    style [N, style_dim]), both L2-normalised, from one forward pass (see TorchEncoder.embed)."""

    style_dim: int

    def embed(self, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


@dataclasses.dataclass(frozen=True)
class Backbone:
    """A registered backbone. `load(weights, device)` returns an Encoder; `weights` is 'default'
    (files in the standard caches or installed weight packages), 'random' (tests), or a file path."""

    name: str
    dim: int
    preprocess: Preprocess
    load: Callable[[str, str], Encoder]
    description: str
    style_dim: int = 0  # width of its style vectors (embed --style); 0: it has no feature maps to take them from


_REGISTRY: dict[str, Backbone] = {}


def register(backbone: Backbone) -> Backbone:
    """Add a backbone to the registry; refuses a name already taken."""
    if backbone.name in _REGISTRY:
        raise ValueError(f"backbone {backbone.name!r} is already registered")
    _REGISTRY[backbone.name] = backbone
    return backbone


def get(name: str) -> Backbone:
    """The backbone called `name`; raises KeyError listing the known names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown backbone {name!r}; known: {', '.join(names())}") from None


def names() -> list[str]:
    """Registered backbone names, sorted."""
    return sorted(_REGISTRY)


def load_with_style(name: str, weights: str, device: str) -> StyleEncoder:
    """The backbone's encoder, which also gives style vectors; refuses (ValueError) a backbone without them."""
    backbone = get(name)
    if not backbone.style_dim:
        raise ValueError(f"backbone {name!r} has no style vectors; these do: {', '.join(with_style())}")
    return cast(StyleEncoder, backbone.load(weights, device))


def with_style() -> list[str]:
    """Names of the backbones that can write style vectors, sorted."""
    return [name for name in names() if _REGISTRY[name].style_dim]


# Registration happens on import of each family module.
from gatrep.backbones import clip, hog, tiny, torchvision_nets  # noqa: E402, F401
