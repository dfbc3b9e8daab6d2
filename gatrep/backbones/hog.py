"""Histogram of oriented gradients (scikit-image), the paper's Experiment IV-A2 baseline; no weights."""

from __future__ import annotations

import numpy as np
from skimage.feature import hog

from gatrep.backbones import Backbone, Encoder, register
from gatrep.images import Preprocess
from gatrep.vectors import normalise

_SIZE, _CELL, _BLOCK, _ORIENTATIONS = 128, 16, 2, 9
_DIM = ((_SIZE // _CELL) - _BLOCK + 1) ** 2 * _BLOCK**2 * _ORIENTATIONS


class HogEncoder:
    """HOG descriptors of 128x128 grayscale crops."""

    dim = _DIM

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        rows = [hog(p[:, :, 0], orientations=_ORIENTATIONS, pixels_per_cell=(_CELL, _CELL),
                    cells_per_block=(_BLOCK, _BLOCK), feature_vector=True) for p in pixels]
        return normalise(np.stack(rows) if rows else np.zeros((0, _DIM)))


def _load(weights_spec: str, device: str) -> Encoder:
    if weights_spec not in ("default", "random"):
        raise ValueError(f"hog has no weights; got --weights {weights_spec!r}")
    return HogEncoder()


register(Backbone(
    name="hog", dim=_DIM, preprocess=Preprocess(size=_SIZE, crop_fraction=1.0, mode="L"), load=_load,
    description=f"scikit-image HOG on 128x128 grayscale, {_DIM}-d",
))
