"""Connected-component postprocessing, decided on cross-validation predictions.

The rules are stored as `WORKDIR/postprocessing.json`:

    {
      "format_version": 1,
      "foreground_largest_component": true,   # keep only the largest foreground component
      "largest_component_labels": [2],        # then, per label, keep only its largest component
      "reasons": {...}, "dice_before": {...}, "dice_after": {...}   # written by the decision, informative
    }

Applying them: if `foreground_largest_component`, every foreground voxel (label > 0) outside the
largest connected foreground component becomes background; then, for each label listed in
`largest_component_labels`, the voxels of that label outside its largest component become
background. Components use full connectivity (26 neighbours in 3D, 8 in 2D), and components tied
for the largest size are all kept, as in nnU-Net v2. Only the three keys above affect the result;
the others explain the decision.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from autoseg.atomic import read_json, write_json
from autoseg.errors import AutosegError
from autoseg.evaluation import EvaluationError, dice_from_counts, read_label_map, segmentation_files

logger = logging.getLogger(__name__)

RULES_FORMAT_VERSION = 1
_TOLERANCE = 1e-9  # Dice differences below this are float noise, not a change


class PostprocessingError(AutosegError):
    """Invalid postprocessing rules or inputs; the message names the file or key and the fix."""


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    """Boolean mask of the largest fully connected component(s) of `mask`: every component of the
    largest size is kept, as nnU-Net v2 does, so a tie never depends on scan order (all False if empty)."""
    mask = np.asarray(mask).astype(bool, copy=False)
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    components, n = ndimage.label(mask, structure=structure)
    if n <= 1:
        return mask.copy()
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    largest = np.flatnonzero(sizes == sizes.max())
    return components == int(largest[0]) if len(largest) == 1 else np.isin(components, largest)


def no_postprocessing() -> dict:
    """Rules that leave segmentations unchanged."""
    return {"format_version": RULES_FORMAT_VERSION, "foreground_largest_component": False,
            "largest_component_labels": []}


def _check_rules(rules: dict, source: str = "postprocessing rules") -> None:
    version = rules.get("format_version")
    if version != RULES_FORMAT_VERSION:
        raise PostprocessingError(f"{source}: format_version {version!r} is not supported (expected "
                                  f"{RULES_FORMAT_VERSION}); rerun the postprocessing decision")
    if not isinstance(rules.get("foreground_largest_component"), bool):
        raise PostprocessingError(f"{source}: 'foreground_largest_component' must be true or false")
    labels = rules.get("largest_component_labels")
    if not isinstance(labels, list) or not all(
            isinstance(label, int) and not isinstance(label, bool) and label > 0 for label in labels):
        raise PostprocessingError(f"{source}: 'largest_component_labels' must be a list of positive label ids")


def apply_postprocessing(segmentation: np.ndarray, rules: dict) -> np.ndarray:
    """A copy of the label map with the connected-component rules applied (see module docstring)."""
    _check_rules(rules)
    result = np.array(segmentation, copy=True)
    if rules["foreground_largest_component"]:
        foreground = result > 0
        result[foreground & ~keep_largest_component(foreground)] = 0
    for label in rules["largest_component_labels"]:
        label_mask = result == label
        result[label_mask & ~keep_largest_component(label_mask)] = 0
    return result


def save_postprocessing_rules(path: Path | str, rules: dict) -> None:
    """Write the rules (e.g. `WORKDIR/postprocessing.json`) atomically, after checking them."""
    _check_rules(rules)
    write_json(path, rules)


def load_postprocessing_rules(path: Path | str) -> dict:
    """Read and check `postprocessing.json`."""
    path = Path(path)
    if not path.is_file():
        raise PostprocessingError(f"{path}: not found; run the postprocessing decision first")
    rules = read_json(path)
    _check_rules(rules, str(path))
    return rules


# ---------------------------------------------------------------------------------------------
# Deciding the rules from cross-validation predictions


def _case_counts(pred: np.ndarray, ref: np.ndarray, labels: Sequence[int], ignore_label: int | None = None) -> dict:
    """Voxel counts of one case before/after each candidate rule, enough to score any rule set.

    For each starting point (raw prediction, or after the foreground rule) and label: overlap and
    size of the label without and with its own largest-component rule. Label rules touch disjoint
    voxels, so each label's Dice depends on its own rule only. The rules act on the whole prediction;
    only the counting leaves out voxels whose reference is `ignore_label` (unannotated).
    """
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise PostprocessingError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    starts = {"raw": pred, "fg": np.where(keep_largest_component(pred > 0), pred, 0)}
    counts = {"ref": {label: int(np.count_nonzero(ref == label)) for label in labels}}
    annotated = None if ignore_label is None else ref != ignore_label
    for name, seg in starts.items():
        entry = {"labels": {}}
        for label in labels:
            mask, ref_mask = seg == label, ref == label
            kept = keep_largest_component(mask)
            if annotated is not None:
                mask, kept = mask & annotated, kept & annotated
            entry["labels"][label] = {
                "tp": int(np.count_nonzero(mask & ref_mask)), "pred": int(np.count_nonzero(mask)),
                "tp_kept": int(np.count_nonzero(kept & ref_mask)), "pred_kept": int(np.count_nonzero(kept)),
            }
        counts[name] = entry
    return counts


def _mean(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return float(np.mean(values)) if values else math.nan


def _label_dice(cases: list[dict], start: str, label: int, rule: bool) -> float:
    tp_key, pred_key = ("tp_kept", "pred_kept") if rule else ("tp", "pred")
    return _mean([dice_from_counts(c[start]["labels"][label][tp_key], c[start]["labels"][label][pred_key],
                                   c["ref"][label]) for c in cases])


def _foreground_mean(label_means: dict[int, float]) -> float:
    """nnU-Net's "foreground_mean": the mean over labels of each label's mean Dice (NaN if any is NaN)."""
    return float(np.mean(list(label_means.values())))


def _improves(after: float, before: float) -> bool:
    if math.isnan(after) or math.isnan(before):
        return False
    return after > before + _TOLERANCE


def _decreases(after: float, before: float) -> bool:
    if math.isnan(after) or math.isnan(before):
        return False
    return after < before - _TOLERANCE


def _r(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 6)


def decide_postprocessing(cases: Iterable[tuple[np.ndarray, np.ndarray]], labels: Sequence[int],
                          ignore_label: int | None = None) -> dict:
    """Choose connected-component rules that raise the mean Dice on (prediction, reference) pairs, as nnU-Net v2.

    First, keeping only the largest foreground component is adopted if it raises the mean over
    labels of each label's mean Dice (nnU-Net's "foreground_mean") and lowers no label's mean Dice.
    Then, on top of that choice, each label's largest-component rule is adopted if it raises that
    label's mean Dice. Means over cases skip cases where a Dice is undefined (both empty), as in
    `autoseg.evaluation`. Reference voxels of `ignore_label` count for no label. `cases` may be a
    generator; each pair is read once. Returns the rules plus `reasons`, `dice_before` (raw
    predictions) and `dice_after` (with the chosen rules).
    """
    labels = [int(label) for label in labels]
    if any(label <= 0 for label in labels):
        raise PostprocessingError(f"labels {labels}: list foreground label ids only (background 0 is implicit)")
    counts = [_case_counts(pred, ref, labels, ignore_label) for pred, ref in cases]
    if not counts:
        raise PostprocessingError("no (prediction, reference) pairs given; run cross-validation predictions first")

    reasons = {}
    label_before = {label: _label_dice(counts, "raw", label, rule=False) for label in labels}
    label_with_fg = {label: _label_dice(counts, "fg", label, rule=False) for label in labels}
    fg_before, fg_with_rule = _foreground_mean(label_before), _foreground_mean(label_with_fg)
    harmed = [label for label in labels if _decreases(label_with_fg[label], label_before[label])]
    use_fg = _improves(fg_with_rule, fg_before) and not harmed
    if use_fg:
        reasons["foreground"] = (f"enabled: keeping the largest foreground component raises the mean of the labels' "
                                 f"Dice from {fg_before:.4f} to {fg_with_rule:.4f} and lowers no label's Dice")
    elif harmed:
        reasons["foreground"] = (f"disabled: keeping the largest foreground component changes the mean of the "
                                 f"labels' Dice from {fg_before:.4f} to {fg_with_rule:.4f} but lowers the Dice of "
                                 "label(s) " + ", ".join(f"{label} ({label_before[label]:.4f} -> "
                                                         f"{label_with_fg[label]:.4f})" for label in harmed))
    else:
        reasons["foreground"] = (f"disabled: keeping the largest foreground component does not raise the mean of "
                                 f"the labels' Dice ({fg_before:.4f} -> {fg_with_rule:.4f})")
    start = "fg" if use_fg else "raw"

    chosen = []
    label_after = {}
    for label in labels:
        without, with_rule = _label_dice(counts, start, label, False), _label_dice(counts, start, label, True)
        if _improves(with_rule, without):
            chosen.append(label)
            label_after[label] = with_rule
            reasons[str(label)] = (f"enabled: keeping the largest component of label {label} raises its mean Dice "
                                   f"from {without:.4f} to {with_rule:.4f}")
        else:
            label_after[label] = without
            reasons[str(label)] = (f"disabled: keeping the largest component of label {label} does not raise its "
                                   f"mean Dice ({without:.4f} -> {with_rule:.4f})")

    rules = no_postprocessing()
    rules["foreground_largest_component"] = use_fg
    rules["largest_component_labels"] = chosen
    rules["num_cases"] = len(counts)
    rules["reasons"] = reasons
    rules["dice_before"] = {"foreground_mean": _r(fg_before),
                            **{str(label): _r(label_before[label]) for label in labels}}
    rules["dice_after"] = {"foreground_mean": _r(_foreground_mean(label_after)),
                           **{str(label): _r(label_after[label]) for label in labels}}
    for key, reason in reasons.items():
        logger.info("postprocessing %s: %s", key, reason)
    return rules


def decide_postprocessing_from_folders(pred_dir: Path | str, ref_dir: Path | str, labels: Sequence[int]) -> dict:
    """`decide_postprocessing` on every prediction in `pred_dir` and its reference in `ref_dir`."""
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    try:
        predictions, references = segmentation_files(pred_dir), segmentation_files(ref_dir)
    except EvaluationError as exc:
        raise PostprocessingError(str(exc)) from None
    if not predictions:
        raise PostprocessingError(f"{pred_dir}: no prediction files found; run cross-validation predictions first")
    orphans = [p.name for c, p in predictions.items() if c not in references]
    if orphans:
        raise PostprocessingError(f"{pred_dir}: prediction(s) without a reference in {ref_dir}: "
                                  f"{', '.join(orphans[:5])}; check the folders")

    def pairs() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for case_id in tqdm(predictions, desc="postprocessing decision", unit="case"):
            try:
                pred, pred_geometry = read_label_map(predictions[case_id])
                ref, ref_geometry = read_label_map(references[case_id])
            except EvaluationError as exc:
                raise PostprocessingError(str(exc)) from None
            if not pred_geometry.matches(ref_geometry):
                problems = "; ".join(pred_geometry.differences(ref_geometry))
                raise PostprocessingError(f"{predictions[case_id]}: geometry differs from its reference "
                                          f"{references[case_id]} ({problems}); export the prediction on the "
                                          "reference image grid")
            yield pred, ref

    return decide_postprocessing(pairs(), labels)
