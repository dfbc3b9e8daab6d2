"""JPEG decoding in the backbone actor: torchvision's batched `decode_jpeg` (nvJPEG when the actor has a GPU,
libjpeg-turbo on a CPU), then the backbone's centre crop and resize as tensor operations on the same device.

The decode tasks only read, hash and check the header of a JPEG (`images.jpeg_size`); the actor decodes a whole
batch in one call. With Pillow decoding 256-px JPEGs in the tasks, 16 CPU cores fed an H100 running ViT-B/32 at
about 5,100 images/s; decoded here, about 10,000 (bench/embed.py, README). Files that fail here are decoded again
by Pillow (`images.decode`), one by one, which either succeeds or gives the file its precise status: the batch
never loses a good image.
"""

from __future__ import annotations

import collections
import warnings

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as tvf

from gatrep import images

_INTERPOLATION: dict[int, InterpolationMode] = {Image.Resampling.BILINEAR: InterpolationMode.BILINEAR,
                  Image.Resampling.BICUBIC: InterpolationMode.BICUBIC}


class BatchDecoder:
    """Turns a batch of payloads (whole JPEG files, or crops Pillow already made in the decode task, as raw bytes)
    into one uint8 [n, size, size, channels] tensor on `device`."""

    def __init__(self, prep: images.Preprocess, device: torch.device, max_pixels: int) -> None:
        self.prep = prep
        self.device = device
        self.max_pixels = max_pixels
        self.mode = ImageReadMode.RGB if prep.channels == 3 else ImageReadMode.GRAY
        self.interpolation = _INTERPOLATION.get(prep.resample, InterpolationMode.BILINEAR)

    def __call__(self, payloads: np.ndarray, is_jpeg: np.ndarray) -> tuple[torch.Tensor, dict[int, images.Decoded]]:
        """(pixels [n, size, size, channels] uint8 NHWC on the device, {row: failure}). A failed row's pixels are
        zeros and its Decoded holds the status and message Pillow gave it."""
        prep = self.prep
        out = torch.zeros((len(payloads), prep.channels, prep.size, prep.size), dtype=torch.uint8, device=self.device)
        failed: dict[int, images.Decoded] = {}
        crops = [i for i in range(len(payloads)) if not is_jpeg[i]]
        if crops:
            raw = np.stack([np.frombuffer(payloads[i], np.uint8) for i in crops])
            shape = (len(crops), prep.size, prep.size, prep.channels)
            out[crops] = torch.from_numpy(raw.reshape(shape)).to(self.device).permute(0, 3, 1, 2)
        jpegs = [i for i in range(len(payloads)) if is_jpeg[i]]
        decoded = self._decode([payloads[i] for i in jpegs])
        by_shape: dict[tuple[int, ...], list[int]] = collections.defaultdict(list)
        tensors: dict[int, torch.Tensor] = {}
        for row, image in zip(jpegs, decoded, strict=True):
            if image is not None:
                tensors[row] = image
                by_shape[tuple(image.shape)].append(row)
                continue
            result = images.decode(payloads[row], prep, self.max_pixels)  # Pillow decodes it, or says what is wrong
            if result.pixels is None:
                failed[row] = result
            else:
                out[row] = torch.from_numpy(result.pixels).to(self.device).permute(2, 0, 1)
        for (_, height, width), rows in by_shape.items():  # one resize per image size: few kernels per batch
            out[rows] = self._crop(torch.stack([tensors[r] for r in rows]), height, width)
        return out.permute(0, 2, 3, 1), failed

    def _decode(self, payloads: list[bytes]) -> list[torch.Tensor | None]:
        """Each file decoded, or None where torchvision cannot decode it. One batched call; when that fails (one
        bad file fails the whole call), each file alone."""
        data = [torch.frombuffer(bytearray(p), dtype=torch.uint8) for p in payloads]
        if not data:
            return []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision 0.29 marks its decoders deprecated in favour of TorchCodec
            try:
                return list(decode_jpeg(data, mode=self.mode, device=self.device))
            except RuntimeError:
                pass
            found: list[torch.Tensor | None] = []
            for one in data:
                try:
                    found.append(decode_jpeg(one, mode=self.mode, device=self.device))
                except RuntimeError:
                    found.append(None)
            return found

    def _crop(self, batch: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The backbone's centre crop (`crop_fraction` of the shorter side) resized to size x size, like
        images.decode does with Pillow (to the nearest pixel of the crop box), antialiased."""
        side = min(height, width) * self.prep.crop_fraction
        top, left = round((height - side) / 2), round((width - side) / 2)
        crop = round(side)
        resized = tvf.resized_crop(batch.float(), top, left, crop, crop, [self.prep.size, self.prep.size],
                                   interpolation=self.interpolation, antialias=True)
        return resized.round_().clamp_(0, 255).to(torch.uint8)

