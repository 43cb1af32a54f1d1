"""Apply the plan's per-channel intensity normalization.

Schemes (`ChannelNormalization.scheme` in plans.json's `normalization`):
- "ct": clip to the plan's foreground percentiles, then subtract the plan's mean and divide by its std
  (one set of numbers for the whole dataset).
- "zscore": per case, (x - mean) / std; with `use_nonzero_mask`, mean and std come from inside the
  non-zero mask and everything outside it is set to 0.
- "noNorm": only cast to float32.
- "rescale_to_0_1": per case, (x - min) / (max - min); a constant image becomes all 0.
- "rgb_to_0_1": x / 255 for 8-bit colour channels. Values outside [0, 255] raise NormalizationError
  (as nnU-Net refuses them): silently clipping would hide images that are not 8-bit.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from autoseg.errors import AutosegError
from autoseg.planning.plans import NORMALIZATION_SCHEMES as SCHEMES
from autoseg.planning.plans import ChannelNormalization


class NormalizationError(AutosegError):
    """plans.json's normalization does not fit the image."""


def normalize(image: np.ndarray, nonzero_mask: np.ndarray, schemes: Sequence[ChannelNormalization]) -> np.ndarray:
    """Normalize float32 (C, Z, Y, X) in place, channel c as the scheme whose `channel` is c says.

    `nonzero_mask` (Z, Y, X) is the hole-filled mask of voxels holding data; only "zscore" with
    `use_nonzero_mask` reads it.
    """
    planned = sorted(s.channel for s in schemes)
    if planned != list(range(image.shape[0])):
        raise NormalizationError(f"plans.json normalizes channels {planned} but the image has {image.shape[0]} "
                                 f"channel(s); plan the dataset again")
    for s in schemes:
        c, scheme = s.channel, s.scheme
        channel = image[c]
        if scheme == "ct":
            lo, hi = s.clip
            np.clip(channel, lo, hi, out=channel)
            channel -= s.mean
            channel /= max(s.std, 1e-8)
        elif scheme == "zscore":
            if s.use_nonzero_mask:
                inside = channel[nonzero_mask]
                mean = float(inside.mean()) if inside.size else 0.0
                std = float(inside.std()) if inside.size else 1.0
                channel[nonzero_mask] = (inside - mean) / max(std, 1e-8)
                channel[~nonzero_mask] = 0
            else:
                mean, std = float(channel.mean()), float(channel.std())
                channel -= mean
                channel /= max(std, 1e-8)
        elif scheme == "noNorm":
            pass  # already float32
        elif scheme == "rescale_to_0_1":
            lo, hi = float(channel.min()), float(channel.max())
            channel -= lo
            if hi > lo:
                channel /= hi - lo
        elif scheme == "rgb_to_0_1":
            lo, hi = float(channel.min()), float(channel.max())
            if lo < 0 or hi > 255:
                raise NormalizationError(f"channel {c} ({s.name or '?'}) has values in [{lo:g}, {hi:g}], outside "
                                         f"the [0, 255] of 8-bit colour; set its scheme in plans.json to "
                                         f"'rescale_to_0_1' or 'zscore'")
            channel /= 255.0
        else:
            raise NormalizationError(f"unknown normalization scheme '{scheme}' for channel {c} in plans.json; "
                                     f"choose one of {', '.join(SCHEMES)}")
    return image
