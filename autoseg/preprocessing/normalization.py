"""Apply the plan's per-channel intensity normalization."""

from __future__ import annotations

import numpy as np


def normalize(image: np.ndarray, nonzero_mask: np.ndarray, schemes: list[dict]) -> np.ndarray:
    """Normalize (C, Z, Y, X) float32 in place per channel as `plans["normalization"]` says."""
    for s in schemes:
        c = s["channel"]
        channel = image[c]
        if s["scheme"] == "ct":
            lo, hi = s["clip"]
            np.clip(channel, lo, hi, out=channel)
            channel -= s["mean"]
            channel /= s["std"]
        elif s["scheme"] == "zscore":
            region = channel[nonzero_mask] if s["use_nonzero_mask"] else channel
            mean = float(region.mean()) if region.size else 0.0
            std = float(region.std()) if region.size else 1.0
            channel -= mean
            channel /= max(std, 1e-8)
            if s["use_nonzero_mask"]:
                channel[~nonzero_mask] = 0
        else:
            raise ValueError(f"unknown normalization scheme '{s['scheme']}' for channel {c} in plans.json")
    return image
