"""Which object metrics `autoseg evaluate` computes, per case, and how they are summarized and shown.

Per-pixel scores (Dice, IoU, HD95) miss what matters for membranes and touching cells: one gap in a
membrane merges two cells, one missing rim merges two nuclei. Two families apply (definitions in
docs/object_metrics.md):

- membrane metrics (`membranes.py`: Rand, warping and pixel error of the ISBI 2012 challenge), when
  a label is named membrane or boundary (or when asked): the cells are the connected regions of
  everything else. 2D; a 3D label map is scored slice by slice and the slices averaged.
- instance metrics (`instances.py`: mAP over IoU 0.5:0.05:0.95 of the 2018 Data Science Bowl, F1 at
  IoU 0.5, aggregated Jaccard index, splits and merges), when reference instance maps are given
  (`--instances DIR`, or an `instancesTr/` beside the reference folder). The predicted objects are
  autoseg's `<case>_instances` maps where the prediction folder holds them, otherwise the connected
  components (face connectivity) of the predicted foreground: the semantic baseline.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

MEMBRANE_NAMES = ("membrane", "membranes", "boundary", "boundaries", "border", "borders")
MEMBRANE_KEYS = ("rand_error", "warping_error", "pixel_error")
# The challenge's leaderboard form, from saved probabilities: the best over membrane thresholds 0, 0.1, ..., 1
MAXIMAL_KEYS = ("rand_error_maximal", "pixel_error_maximal")
INSTANCE_KEYS = ("mean_ap", "f1_at_0.5", "aji")
INSTANCE_COUNTS = ("splits", "merges", "n_pred", "n_ref")
CHOICES = ("auto", "membrane", "instances", "all", "none")
INSTANCES_SUFFIX = "_instances"


def membrane_label(label_names: Mapping[str, str]) -> int | None:
    """The id of the label named membrane or boundary (singular or plural, any case), if exactly one is."""
    found = [int(k) for k, name in label_names.items() if str(name).strip().lower() in MEMBRANE_NAMES]
    return found[0] if len(found) == 1 else None


def membrane_scores(pred: np.ndarray, ref: np.ndarray, label: int,
                    probability: np.ndarray | None = None) -> dict[str, float]:
    """The ISBI 2012 errors of one case (a 2D map, or a 3D map slice by slice, averaged); with the membrane
    label's `probability` on the same grid (from `predict --save-probabilities`) also their maximal forms."""
    from autoseg.evaluation.membranes import maximal_pixel_error, maximal_rand_error, membrane_metrics

    pred, ref = np.asarray(pred) == label, np.asarray(ref) == label
    if pred.ndim == 2:
        pred, ref = pred[None], ref[None]
    per_slice = [membrane_metrics(p, r) for p, r in zip(pred, ref)]
    scores = {k: _nanmean([s[k] for s in per_slice]) for k in MEMBRANE_KEYS}
    if probability is not None:
        probability = np.asarray(probability, dtype=np.float32).reshape(ref.shape)
        scores["rand_error_maximal"] = _nanmean([maximal_rand_error(p, r) for p, r in zip(probability, ref)])
        scores["pixel_error_maximal"] = _nanmean([maximal_pixel_error(p, r) for p, r in zip(probability, ref)])
    return scores


def instance_scores(pred_instances: np.ndarray, ref_instances: np.ndarray) -> dict[str, float | int]:
    """mAP, F1 at 0.5, AJI and split/merge counts of one case's instance maps."""
    from autoseg.evaluation.instances import instance_metrics

    return instance_metrics(np.asarray(pred_instances), np.asarray(ref_instances))


def connected_objects(label_map: np.ndarray) -> np.ndarray:
    """Objects of a semantic label map: connected components (face connectivity) of its foreground."""
    from autoseg.evaluation.instances import instances_from_semantic

    return instances_from_semantic(np.asarray(label_map) > 0, connectivity=1)


def summarize(per_case: Mapping[str, Mapping[str, float | int]]) -> dict[str, float | int | None]:
    """Means over cases of the errors and scores (undefined values skipped); totals of the counts."""
    summary: dict[str, float | int | None] = {}
    keys = [k for k in (*MEMBRANE_KEYS, *MAXIMAL_KEYS, *INSTANCE_KEYS) if any(k in c for c in per_case.values())]
    for key in keys:
        value = _nanmean([c[key] for c in per_case.values() if key in c])
        summary[key] = None if math.isnan(value) else value
    for key in INSTANCE_COUNTS:
        if any(key in c for c in per_case.values()):
            summary[key] = int(sum(c[key] for c in per_case.values() if key in c))
    return summary


def format_block(object_metrics: Mapping) -> str:
    """The printed lines: what was computed, why, and the means."""
    lines = []
    for reason in object_metrics.get("reasons", []):
        lines.append(f"object metrics: {reason}")
    means = object_metrics.get("mean") or {}
    if any(k in means for k in MEMBRANE_KEYS):
        lines.append("  " + ", ".join(f"{k.replace('_', ' ')} {_fmt(means.get(k))}" for k in MEMBRANE_KEYS)
                     + " (lower is better)")
    if any(k in means for k in MAXIMAL_KEYS):
        lines.append(f"  best over membrane thresholds 0-1 (the challenge's form, from <case>.npz): Rand error "
                     f"{_fmt(means.get('rand_error_maximal'))}, pixel error {_fmt(means.get('pixel_error_maximal'))}")
    if any(k in means for k in INSTANCE_KEYS):
        lines.append(f"  mAP@0.5:0.95 {_fmt(means.get('mean_ap'))}, F1@0.5 {_fmt(means.get('f1_at_0.5'))}, "
                     f"AJI {_fmt(means.get('aji'))}; {means.get('n_pred', 0)} predicted and {means.get('n_ref', 0)} "
                     f"reference objects, {means.get('merges', 0)} merge(s), {means.get('splits', 0)} split(s)")
    return "\n".join(lines)


def _nanmean(values) -> float:
    array = np.asarray([math.nan if v is None else v for v in values], dtype=float)
    return float(np.mean(array[~np.isnan(array)])) if np.any(~np.isnan(array)) else math.nan


def _fmt(value) -> str:
    return "undefined" if value is None else f"{value:.4f}"
