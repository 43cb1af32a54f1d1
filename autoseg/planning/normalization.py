"""Per-channel intensity normalization scheme, decided from the fingerprint."""

from __future__ import annotations

import math

from autoseg.fingerprint import Fingerprint
from autoseg.planning import PlanError

NONZERO_MASK_FRACTION = 0.75  # crop keeps less than this of the volume: normalize inside the non-zero region only


def plan_normalization(fingerprint: Fingerprint) -> list[dict]:
    """CT: clip to foreground 0.5/99.5 percentiles, standardize with dataset-wide foreground stats.

    Other modalities have no absolute scale, so each case is z-scored on its own; when cropping
    removed much of the volume, only the non-zero region is used (and the outside stays 0).
    """
    cropped = fingerprint.median_cropped_fraction
    use_mask = cropped < NONZERO_MASK_FRACTION
    schemes = []
    for c, (name, kind) in enumerate(zip(fingerprint.channel_names, fingerprint.channel_kinds)):
        if kind == "ct":
            s = fingerprint.foreground_intensities[c]
            if not math.isfinite(s.mean):
                raise PlanError(f"channel {name}: no case has labelled foreground, so CT normalization has no "
                                "intensities to learn from; check the label files")
            schemes.append({
                "channel": c, "name": name, "scheme": "ct", "use_nonzero_mask": False,
                "clip": [s.percentile_00_5, s.percentile_99_5], "mean": s.mean, "std": max(s.std, 1e-8),
                "reason": "CT channel: Hounsfield units are absolute, so clip to the foreground 0.5/99.5 "
                          "percentiles and standardize with the dataset's foreground mean and std"})
        else:
            schemes.append({
                "channel": c, "name": name, "scheme": "zscore", "use_nonzero_mask": use_mask,
                "reason": "non-CT channel: intensities have no absolute scale, so z-score each case"
                          + (f"; inside the non-zero region, as cropping keeps only {cropped:.0%} of the median volume"
                             if use_mask else "")})
    return schemes
