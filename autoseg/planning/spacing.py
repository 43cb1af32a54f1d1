"""Target spacing and axis order, decided from the spacings and shapes of all cases (nnU-Net v2's rule)."""

from __future__ import annotations

import numpy as np

from autoseg.dataset.image_io import PSEUDO_SPACING_2D

ANISOTROPY_RATIO = 3.0  # thick axis spacing over the others' beyond which data counts as anisotropic


def planning_spacings(spacings: np.ndarray, shapes: np.ndarray) -> np.ndarray:
    """Spacings with PSEUDO_SPACING_2D along an axis where the median case has a single slice.

    A stack of 2D images stored as single-slice 3D files then plans like a 2D dataset whatever
    spacing the header gives the missing axis (a thin 0.3 mm slice would otherwise look like the
    finest axis, and the 3D plan would pool across a single voxel).
    """
    spacings = np.array(spacings, dtype=float)
    missing = np.median(shapes, axis=0) <= 1
    spacings[:, missing] = np.maximum(spacings[:, missing], PSEUDO_SPACING_2D)
    return spacings


def choose_target_spacing(spacings: np.ndarray, shapes: np.ndarray) -> tuple[list[float], str]:
    """Median spacing; for anisotropic data whose thick axis also has few voxels, its 10th percentile.

    Both conditions must hold (nnU-Net's rule): the thick axis is over 3x coarser than every other
    axis, and the median case has over 3x fewer voxels along it than along any other. Resampling
    the thick axis to its median would then throw away the detail of the thinner-slice cases; the
    10th percentile keeps it, but never finer than the in-plane spacing. A 2.5 mm CT with 200
    slices has enough voxels along z and keeps the median.
    """
    spacings = np.asarray(spacings, dtype=float)
    median = np.median(spacings, axis=0)
    median_shape = np.median(np.asarray(shapes, dtype=float), axis=0)
    thick = int(np.argmax(median))
    others = [a for a in range(len(median)) if a != thick]
    max_other_spacing = max(float(median[a]) for a in others)
    aniso_spacing = median[thick] > ANISOTROPY_RATIO * max_other_spacing
    aniso_voxels = median_shape[thick] * ANISOTROPY_RATIO < min(float(median_shape[a]) for a in others)
    if not (aniso_spacing and aniso_voxels):
        why = "median spacing of all cases"
        if aniso_spacing:
            why += (f" (axis {thick} is over {ANISOTROPY_RATIO:g}x coarser, but its median "
                    f"{median_shape[thick]:.0f} voxels are not {ANISOTROPY_RATIO:g}x fewer than in-plane)")
        return [float(s) for s in median], why
    target = median.copy()
    tenth = float(np.percentile(spacings[:, thick], 10))
    target[thick] = tenth if tenth >= max_other_spacing else max_other_spacing + 1e-5
    return ([float(s) for s in target],
            f"anisotropic (axis {thick}: {median[thick]:.3g} mm vs {max_other_spacing:.3g} in-plane, "
            f"{median_shape[thick]:.0f} voxels): median in-plane, 10th percentile along the thick axis")


def transpose_thick_axis_first(spacing: list[float]) -> list[int]:
    """Axis order that puts the coarsest axis first (the first one on ties), so 2D models slice across it."""
    thick = int(np.argmax(np.asarray(spacing)))
    return [thick] + [a for a in range(len(spacing)) if a != thick]
