"""Resample images, label maps and probabilities to a new grid covering the same physical extent.

When either grid is anisotropic, the thick axis is resampled apart from the other two: in-plane with
the given order, slice by slice, and along the thick axis with `thick_axis_order` (0, nearest
neighbour, by default), so a 5 mm case never gets cubic interpolation between distant slices.
`separate_axis_for` decides, per case, which axis that is (nnU-Net v2's rule).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage


def new_shape_for(shape: Sequence[int], spacing: Sequence[float], target_spacing: Sequence[float]) -> tuple[int, ...]:
    """Voxels per axis that cover the same extent at `target_spacing` (at least 1)."""
    return tuple(max(1, int(round(s / t * n))) for n, s, t in zip(shape, spacing, target_spacing))


def separate_axis_for(current_spacing: Sequence[float], target_spacing: Sequence[float],
                      anisotropy_threshold: float) -> int | None:
    """The axis to resample on its own, or None for plain 3D resampling.

    The current grid decides first: if it is anisotropic (coarsest/finest > threshold), its coarsest
    axis; otherwise, if the target grid is, the target's coarsest axis. When several axes share the
    coarsest spacing of the grid that decides, there is no single thick axis: None.
    """
    for spacing in (np.asarray(current_spacing, float), np.asarray(target_spacing, float)):
        if spacing.max() / spacing.min() > anisotropy_threshold:
            coarsest = np.flatnonzero(spacing == spacing.max())
            return int(coarsest[0]) if len(coarsest) == 1 else None
    return None


def _zoom(volume: np.ndarray, shape: Sequence[int], order: int) -> np.ndarray:
    """Resample a whole array; voxel edges stay aligned, so the physical extent is kept.

    Splines of order 2 and up overshoot at sharp edges (a brain against a constant background rings
    below the background value), so their result is clipped to the input's range, as scikit-image's
    `resize` does for nnU-Net; the two then give the same values (benchmarks/bench_plan_parity.py)."""
    shape = tuple(shape)
    if volume.shape == shape:
        return volume
    factors = [n / o for n, o in zip(shape, volume.shape)]
    out = ndimage.zoom(volume, factors, order=order, mode="nearest", grid_mode=True, prefilter=order > 1)
    if out.shape != shape:  # zoom rounds; guard against an off-by-one
        out = out[tuple(slice(0, n) for n in shape)]
        out = np.pad(out, [(0, n - o) for n, o in zip(shape, out.shape)], mode="edge")
    if order > 1 and volume.size:
        np.clip(out, volume.min(), volume.max(), out=out)
    return out


def _in_plane(volume: np.ndarray, axis: int, shape: Sequence[int], order: int) -> np.ndarray:
    """Resample every slice across `axis` to the other two entries of `shape`."""
    plane = tuple(n for a, n in enumerate(shape) if a != axis)
    if tuple(np.delete(volume.shape, axis)) == plane:
        return volume
    return np.stack([_zoom(np.take(volume, i, axis=axis), plane, order) for i in range(volume.shape[axis])], axis=axis)


def _along_axis(volume: np.ndarray, axis: int, n_out: int, order: int) -> np.ndarray:
    """Resample along `axis` only. Order 0 copies whole input slices (the nearest by voxel centre)."""
    n_in = volume.shape[axis]
    if n_in == n_out:
        return volume
    if order == 0:
        centres = n_in / n_out * (np.arange(n_out) + 0.5) - 0.5
        nearest = ndimage.map_coordinates(np.arange(n_in, dtype=float), centres[None], order=0, mode="nearest")
        return np.take(volume, nearest.astype(np.intp), axis=axis)
    shape = list(volume.shape)
    shape[axis] = n_out
    return _zoom(volume, shape, order)


def _resample_volume(volume: np.ndarray, shape: Sequence[int], order: int, separate_axis: int | None,
                     thick_axis_order: int) -> np.ndarray:
    """One (Z, Y, X) float volume to `shape`, the separate axis (if any) apart from the other two."""
    if separate_axis is None:
        return _zoom(volume, shape, order)
    n_out = shape[separate_axis]
    if thick_axis_order == 0 and n_out < volume.shape[separate_axis]:
        # Copying slices commutes with in-plane resampling: pick them first, so fewer slices are resampled.
        return _in_plane(_along_axis(volume, separate_axis, n_out, 0), separate_axis, shape, order)
    return _along_axis(_in_plane(volume, separate_axis, shape, order), separate_axis, n_out, thick_axis_order)


def resample_image(image: np.ndarray, shape: Sequence[int], order: int = 3, separate_axis: int | None = None,
                   thick_axis_order: int = 0) -> np.ndarray:
    """Resample every channel of (C, Z, Y, X) to float32 of spatial `shape`."""
    shape = tuple(shape)
    if tuple(image.shape[1:]) == shape:
        return image.astype(np.float32, copy=False)
    out = np.empty((image.shape[0], *shape), dtype=np.float32)
    for c in range(image.shape[0]):
        out[c] = _resample_volume(image[c].astype(np.float32, copy=False), shape, order, separate_axis,
                                  thick_axis_order)
    return out


def resample_label(label: np.ndarray, shape: Sequence[int], order: int = 1, separate_axis: int | None = None,
                   thick_axis_order: int = 0) -> np.ndarray:
    """Resample a (Z, Y, X) label map one label at a time: each voxel takes the label whose interpolated
    mask is largest, so no label value appears that was not there (-1 included; interpolating the ids
    would put a 1 between a 0 and a 2). An exact tie, which an even resize factor makes at every
    boundary, goes to the nearest-neighbour label where it is one of the tied labels, else to the
    lowest: nnU-Net v2's rule (batchgenerators 0.25's `resize_segmentation`), checked voxel for voxel
    by benchmarks/bench_plan_parity.py."""
    shape = tuple(shape)
    if tuple(label.shape) == shape:
        return label
    values = np.unique(label)
    if len(values) == 1:
        return np.full(shape, values[0], dtype=label.dtype)
    nearest = _resample_volume(label.astype(np.float32), shape, 0, separate_axis, 0)
    out = np.empty(shape, dtype=label.dtype)
    best = None
    nearest_on_top = np.empty(shape, dtype=bool)  # the nearest neighbour's label holds the top weight so far
    for v in values:
        # float64 as nnU-Net: ties are decided by exact equality, and float32 rounding would make more of them
        weight = _resample_volume((label == v).astype(np.float64), shape, order, separate_axis, thick_axis_order)
        is_nearest = nearest == v
        if best is None:
            best = weight
            out[...] = v
            np.logical_and(is_nearest, weight > 0, out=nearest_on_top)
            continue
        # The nearest label drawing level with the leader keeps (or puts) it on top; any label taking the
        # lead outright decides afresh. Two labels both weighing 0 are absent, not tied.
        nearest_on_top |= is_nearest & (weight == best) & (weight > 0)
        better = weight > best
        np.copyto(nearest_on_top, is_nearest, where=better)
        out[better] = v
        np.maximum(best, weight, out=best)
    np.copyto(out, nearest.astype(label.dtype), where=nearest_on_top)
    return out


def resample_probabilities(probabilities: np.ndarray, shape: Sequence[int], order: int = 1,
                           separate_axis: int | None = None, thick_axis_order: int = 0) -> np.ndarray:
    """Resample class probabilities or logits (K, Z, Y, X) back to an original grid (linear and nearest
    keep probabilities in [0, 1]); returns the input itself when the shape is already `shape`.
    Pass `separate_axis_for(network_spacing, original_spacing, threshold)` as
    `separate_axis` to undo preprocessing the way nnU-Net does; without it, plain 3D."""
    shape = tuple(shape)
    if tuple(probabilities.shape[1:]) == shape:
        return probabilities
    return np.stack([_resample_volume(p.astype(np.float32, copy=False), shape, order, separate_axis, thick_axis_order)
                     for p in probabilities])
