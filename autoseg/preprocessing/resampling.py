"""Resample images, label maps and probabilities to a new grid covering the same physical extent."""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def new_shape_for(shape: tuple[int, ...], spacing: tuple[float, ...], target_spacing: tuple[float, ...]) -> tuple[int, ...]:
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, target_spacing))


def _zoom(volume: np.ndarray, shape: tuple[int, ...], order: int) -> np.ndarray:
    """Resample one (Z, Y, X) volume; voxel edges stay aligned, so the physical extent is kept."""
    if tuple(volume.shape) == tuple(shape):
        return volume
    factors = [n / o for n, o in zip(shape, volume.shape)]
    out = ndimage.zoom(volume, factors, order=order, mode="nearest", grid_mode=True, prefilter=order > 1)
    if out.shape != tuple(shape):  # zoom rounds; guard against an off-by-one
        out = out[tuple(slice(0, n) for n in shape)]
        out = np.pad(out, [(0, n - o) for n, o in zip(shape, out.shape)], mode="edge")
    return out


def resample_image(image: np.ndarray, shape: tuple[int, ...], order: int = 3,
                   thick_axis_order: int | None = None) -> np.ndarray:
    """Resample every channel of (C, Z, Y, X). With `thick_axis_order`, axis 0 (the thick axis)
    is resampled separately with that lower order, after the in-plane axes."""
    if tuple(image.shape[1:]) == tuple(shape):
        return image.astype(np.float32, copy=False)
    out = np.empty((image.shape[0], *shape), dtype=np.float32)
    for c in range(image.shape[0]):
        volume = image[c].astype(np.float32, copy=False)
        if thick_axis_order is None:
            out[c] = _zoom(volume, shape, order)
        else:
            in_plane = np.stack([_zoom(s, shape[1:], order) for s in volume])
            out[c] = _zoom(in_plane, shape, thick_axis_order)
    return out


def resample_label(label: np.ndarray, shape: tuple[int, ...], order: int = 1) -> np.ndarray:
    """Resample a (Z, Y, X) label map one label at a time and keep the most likely label per voxel,
    so no label value appears that was not there."""
    if tuple(label.shape) == tuple(shape):
        return label
    values = np.unique(label)
    best = np.zeros(shape, dtype=np.float32)
    out = np.full(shape, values[0], dtype=label.dtype)
    for v in values:
        weight = _zoom((label == v).astype(np.float32), shape, order)
        better = weight > best
        out[better] = v
        best[better] = weight[better]
    return out


def resample_probabilities(probabilities: np.ndarray, shape: tuple[int, ...], order: int = 1) -> np.ndarray:
    """Resample class probabilities (K, Z, Y, X) back to an original grid (linear: stays in [0, 1])."""
    if tuple(probabilities.shape[1:]) == tuple(shape):
        return probabilities
    return np.stack([_zoom(p.astype(np.float32, copy=False), shape, order) for p in probabilities])
