"""Crop a case to the region that holds data, and put a cropped result back."""

from __future__ import annotations

import numpy as np

from autoseg.fingerprint import nonzero_bounding_box

__all__ = ["nonzero_bounding_box", "crop", "uncrop"]


def crop(array: np.ndarray, bbox: tuple[tuple[int, int], ...]) -> np.ndarray:
    """Crop the trailing len(bbox) axes of `array` to [lo, hi) per axis."""
    lead = (slice(None),) * (array.ndim - len(bbox))
    return array[lead + tuple(slice(lo, hi) for lo, hi in bbox)]


def uncrop(cropped: np.ndarray, bbox: tuple[tuple[int, int], ...], full_shape: tuple[int, ...],
           fill: float | np.ndarray = 0) -> np.ndarray:
    """Place `cropped` (leading axes kept) back into an array of spatial shape `full_shape`.

    `fill` may be one value per leading channel (e.g. background probability 1, others 0).
    """
    lead_shape = cropped.shape[: cropped.ndim - len(bbox)]
    out = np.empty(lead_shape + tuple(full_shape), dtype=cropped.dtype)
    fill = np.asarray(fill, dtype=cropped.dtype)
    out[...] = fill.reshape(fill.shape + (1,) * len(full_shape)) if fill.ndim else fill
    lead = (slice(None),) * len(lead_shape)
    out[lead + tuple(slice(lo, hi) for lo, hi in bbox)] = cropped
    return out
