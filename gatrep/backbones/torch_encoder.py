"""Run a torch module on uint8 pixel batches: normalise, forward (mixed precision on GPU), L2-normalise."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from gatrep.errors import UserError
from gatrep.vectors import normalise

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TorchEncoder:
    """An Encoder around an nn.Module that maps a normalised NCHW float batch to features. With `style_layers`
    (names of its submodules, in forward order) it is also a StyleEncoder of `style_dim` wide style vectors."""

    def __init__(self, module: torch.nn.Module, dim: int, mean: Sequence[float], std: Sequence[float],
                 device: str, style_layers: Sequence[str] = (), style_dim: int = 0) -> None:
        self.dim = dim
        self.device = torch.device(device)
        self.module = module.eval().to(self.device).to(memory_format=torch.channels_last)
        self.scale = (1.0 / (255.0 * torch.tensor(std, device=self.device))).view(1, -1, 1, 1)
        self.shift = (torch.tensor(mean, device=self.device) / torch.tensor(std, device=self.device)).view(1, -1, 1, 1)
        submodules = dict(self.module.named_modules())
        self.style_modules = [submodules[name] for name in style_layers]
        self.style_dim = style_dim

    def _forward(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Features of NHWC uint8 pixels: an array, or a tensor already decoded on the device (gatrep.jpeg)."""
        if isinstance(pixels, np.ndarray):
            pixels = torch.from_numpy(np.ascontiguousarray(pixels))
        # NHWC uint8 -> NCHW view in channels_last layout: no copy before the device transfer.
        x = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        x = x.float() * self.scale - self.shift
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            return self.module(x).float()

    @torch.inference_mode()
    def __call__(self, pixels: np.ndarray | torch.Tensor) -> np.ndarray:
        return normalise(self._forward(pixels).cpu().numpy())

    @torch.inference_mode()
    def embed(self, pixels: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """(content [N, dim], style [N, style_dim]) from one forward pass: the style layers' feature maps are
        caught by forward hooks on the way to the content features."""
        maps: dict[int, torch.Tensor] = {}
        hooks = [m.register_forward_hook(lambda _m, _in, out, i=i: maps.__setitem__(i, out))
                 for i, m in enumerate(self.style_modules)]
        try:
            content = self._forward(pixels)
        finally:
            for hook in hooks:
                hook.remove()
        style = style_statistics([maps[i] for i in range(len(self.style_modules))])
        if style.shape[1] != self.style_dim:
            raise RuntimeError(f"style vectors are {style.shape[1]}-d, the backbone registers {self.style_dim}")
        return normalise(content.cpu().numpy()), style


def style_statistics(feature_maps: Sequence[torch.Tensor]) -> np.ndarray:
    """Style vectors [N, 2 * sum(C_l)]: each layer's per-channel mean and standard deviation over its pixels
    (the thesis's compact alternative to Gram matrices, whose C_l^2 size would be up to 1000x larger), each
    layer's part L2-normalised so that the cosine of two style vectors is the mean of their per-layer
    cosines (the thesis's layer-weighted Gram similarity with equal weights)."""
    parts = []
    for maps in feature_maps:
        flat = maps.float().flatten(2)  # [N, C, H*W]
        stats = torch.cat([flat.mean(2), flat.std(2, correction=0)], dim=1)
        parts.append(torch.nn.functional.normalize(stats, dim=1))
    return normalise(torch.cat(parts, dim=1).cpu().numpy())


class BadWeights(UserError, ValueError):
    """A weights file that is not a checkpoint of tensors, or not one of this backbone."""


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors, read safely (`weights_only=True`, or safetensors). Refuses (BadWeights) a file
    that is not a checkpoint."""
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch and safetensors raise many types (pickle, zip, header errors) for a bad file
        raise BadWeights(f"{path} is not a weights file ({type(err).__name__}: {err}"[:300] + "); pass a "
                         "torchvision/open_clip checkpoint (.pth, .pt, .bin or .safetensors)") from err
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise BadWeights(f"{path} holds no mapping of tensor names to tensors; it is not a weights file")
    return state


def load_into(model: torch.nn.Module, path: str, backbone: str) -> None:
    """Load a checkpoint into `model`; refuses (BadWeights) one of another architecture, naming the backbone."""
    try:
        model.load_state_dict(load_state_dict(path))
    except RuntimeError as err:  # missing or unexpected keys, wrong shapes
        raise BadWeights(f"{path} is not a {backbone} checkpoint: {str(err)[:300]}") from err
