"""Run a torch module on uint8 pixel batches: normalise, forward (mixed precision on GPU), L2-normalise."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from gatrep.vectors import normalise

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class TorchEncoder:
    """An Encoder around an nn.Module that maps a normalised NCHW float batch to features."""

    def __init__(self, module: torch.nn.Module, dim: int, mean: Sequence[float], std: Sequence[float],
                 device: str) -> None:
        self.dim = dim
        self.device = torch.device(device)
        self.module = module.eval().to(self.device).to(memory_format=torch.channels_last)
        self.scale = (1.0 / (255.0 * torch.tensor(std, device=self.device))).view(1, -1, 1, 1)
        self.shift = (torch.tensor(mean, device=self.device) / torch.tensor(std, device=self.device)).view(1, -1, 1, 1)

    @torch.inference_mode()
    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        # NHWC uint8 -> NCHW view in channels_last layout: no copy before the device transfer.
        x = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        x = x.float() * self.scale - self.shift
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            features = self.module(x)
        return normalise(features.float().cpu().numpy())


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors, read safely (`weights_only=True`, or safetensors)."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state
