"""Crop a case to the region that holds data, and put a cropped result back."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from autoseg.fingerprint import nonzero_bounding_box

__all__ = ["nonzero_bounding_box", "nonzero_mask", "mark_outside_mask", "OUTSIDE_LABEL", "crop", "uncrop"]

OUTSIDE_LABEL = -1  # background voxels outside the non-zero mask, in preprocessed label maps (as nnU-Net)


def nonzero_mask(image: np.ndarray) -> np.ndarray:
    """(Z, Y, X) bool: voxels non-zero in any channel of (C, Z, Y, X), holes enclosed in 3D filled.

    As in nnU-Net the filling is 3D, so a single-slice (2D) image gets none: every zero pixel there
    touches the volume's border. Filling a cropped image gives the crop of the filled full image
    (the crop removes only zeros).
    An all-zero image is all data: there is nothing to tell inside from outside.
    """
    mask = np.any(image != 0, axis=0)
    if not mask.any():
        return np.ones_like(mask)
    return ndimage.binary_fill_holes(mask)


def mark_outside_mask(label: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Copy of `label` as int16 (signed) with OUTSIDE_LABEL where it is background and outside `mask`."""
    marked = label.astype(np.int16, copy=True)
    marked[(marked == 0) & ~mask] = OUTSIDE_LABEL
    return marked


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
