"""Per-channel intensity normalization scheme, decided from the channel names and the fingerprint."""

from __future__ import annotations

import math

from autoseg.fingerprint import Fingerprint
from autoseg.planning.plans import ChannelNormalization, PlanError

NONZERO_MASK_FRACTION = 0.75  # crop keeps less than this of the volume: z-score inside the non-zero region only

_REASONS = {
    "noNorm": "channel named noNorm: intensities are used as they are",
    "rescale_to_0_1": "channel named rescale_to_0_1: each case rescaled from its own min..max to 0..1",
    "rgb_to_0_1": "channel named rgb_to_0_1: 8-bit colour values divided by 255",
}


def plan_normalization(fingerprint: Fingerprint) -> tuple[ChannelNormalization, ...]:
    """One scheme per channel: the kind the fingerprint read from the channel name (fingerprint.channel_kind).

    CT: clip to the foreground 0.5/99.5 percentiles, standardize with the dataset-wide foreground
    mean and std (Hounsfield units are absolute). z-score (every other name): each case on its
    own, since MRI and microscopy have no absolute scale; when cropping to the non-zero region
    removed much of the volume (median kept fraction under 3/4, as in skull-stripped brain MRI),
    only the non-zero region is used and the outside stays 0.
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
            schemes.append(ChannelNormalization(
                channel=c, name=name, scheme="ct", use_nonzero_mask=False,
                clip=(s.percentile_00_5, s.percentile_99_5), mean=s.mean, std=max(s.std, 1e-8),
                reason="CT channel: Hounsfield units are absolute, so clip to the foreground 0.5/99.5 "
                       "percentiles and standardize with the dataset's foreground mean and std"))
        elif kind == "zscore":
            schemes.append(ChannelNormalization(
                channel=c, name=name, scheme="zscore", use_nonzero_mask=use_mask,
                reason=f"channel '{name}': intensities have no absolute scale, so z-score each case"
                       + (f"; inside the non-zero region, as cropping keeps only {cropped:.0%} of the median volume"
                          if use_mask else "")))
        elif kind in _REASONS:
            schemes.append(ChannelNormalization(channel=c, name=name, scheme=kind, use_nonzero_mask=False,
                                                reason=_REASONS[kind]))
        else:
            raise PlanError(f"channel {name}: unknown intensity kind '{kind}' in the fingerprint; rerun "
                            "`autoseg plan --steps fingerprint plan`")
    return tuple(schemes)
