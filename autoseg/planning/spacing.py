"""Target spacing and axis order, decided from the spacings of all cases."""

from __future__ import annotations

import numpy as np

ANISOTROPY_RATIO = 3.0  # thick axis spacing over the finest spacing beyond which data counts as anisotropic


def is_anisotropic(spacing: np.ndarray | list[float]) -> bool:
    s = np.asarray(spacing, dtype=float)
    return bool(s.max() / s.min() > ANISOTROPY_RATIO)


def choose_target_spacing(spacings: np.ndarray) -> tuple[list[float], str]:
    """Median spacing; for strongly anisotropic data a finer (10th percentile) spacing on the thick axis.

    Resampling the thick axis to its median would throw away the thinner-slice cases' detail, so
    it takes the 10th percentile instead, but never finer than the in-plane spacing.
    """
    median = np.median(spacings, axis=0)
    if not is_anisotropic(median):
        return [float(s) for s in median], "median spacing of all cases"
    thick = int(np.argmax(median))
    in_plane = max(float(median[a]) for a in range(len(median)) if a != thick)
    target = median.copy()
    target[thick] = max(float(np.percentile(spacings[:, thick], 10)), in_plane)
    return ([float(s) for s in target],
            f"anisotropic (axis {thick} spacing {median[thick]:.3g} vs {in_plane:.3g} in-plane): median in-plane, "
            f"10th percentile along the thick axis")


def transpose_thick_axis_first(spacing: list[float]) -> list[int]:
    """Axis order that puts the coarsest axis first, so 2D models slice along it."""
    s = np.asarray(spacing)
    thick = int(np.argmax(s)) if s.max() > s.min() else 0
    return [thick] + [a for a in range(len(spacing)) if a != thick]
