"""Metrics and summaries: compare predicted label maps with reference label maps.

Empty cases follow the usual convention of segmentation challenges:

- Dice and IoU are NaN when prediction and reference are both empty for a label (nothing to
  find, nothing found: undefined, not perfect). One empty and the other not gives 0.0.
- HD95 is NaN when either mask is empty (no surface to measure from).
- Means over cases skip NaN values (nanmean) and report how many cases they used.

In `summary.json` (and the dict `evaluate_folders` returns) an undefined value is written as
null. Labels are keyed by their id as a string ("1", "2", ...), as in plans.json's labels; their
names, where known, are in `label_names` and in each label's `mean` entry. The printed table says
in words why a value is undefined ("absent in both", "missing in prediction", "not in reference").
"""

from __future__ import annotations

import csv
import logging
import math
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from scipy import ndimage
from tqdm import tqdm

from autoseg import workspace
from autoseg.atomic import atomic_path, read_json, write_json
from autoseg.dataset import ignore_label_id
from autoseg.dataset.image_io import (
    PSEUDO_SPACING_2D,
    SUPPORTED_SUFFIXES,
    Geometry,
    ImageReadError,
    image_suffix,
    read_image,
    strip_suffix,
)
from autoseg.dataset.layout import INSTANCES_DIR as INSTANCE_MAPS_DIR
from autoseg.dataset.regions import Region, RegionError, has_regions, ids_mask, parse_regions
from autoseg.errors import AutosegError
from autoseg.evaluation import objects
from autoseg.fingerprint import nonzero_bounding_box

logger = logging.getLogger(__name__)

SUMMARY_FORMAT_VERSION = 1
CASE_METRICS = ("dice", "iou", "hd95_mm", "pred_volume_ml", "ref_volume_ml", "tp", "fp", "fn")
MEAN_METRICS = ("dice", "iou", "hd95_mm", "pred_volume_ml", "ref_volume_ml")
FOREGROUND_METRICS = ("dice", "iou", "hd95_mm")


class EvaluationError(AutosegError):
    """Predictions and references cannot be compared; the message names the file and the fix."""


# ---------------------------------------------------------------------------------------------
# Array-level metrics


def dice_from_counts(tp: int, pred_count: int, ref_count: int) -> float:
    """Dice from voxel counts; NaN when both masks are empty."""
    total = pred_count + ref_count
    return 2.0 * tp / total if total else math.nan


def iou_from_counts(tp: int, pred_count: int, ref_count: int) -> float:
    """IoU (Jaccard) from voxel counts; NaN when both masks are empty."""
    union = pred_count + ref_count - tp
    return tp / union if union else math.nan


def _counts(pred_mask: np.ndarray, ref_mask: np.ndarray) -> tuple[int, int, int]:
    pred, ref = _as_bool_pair(pred_mask, ref_mask)
    return int(np.count_nonzero(pred & ref)), int(np.count_nonzero(pred)), int(np.count_nonzero(ref))


def dice(pred_mask: np.ndarray, ref_mask: np.ndarray) -> float:
    """2|P∩R| / (|P| + |R|); NaN when both are empty so that the case drops out of means."""
    return dice_from_counts(*_counts(pred_mask, ref_mask))


def iou(pred_mask: np.ndarray, ref_mask: np.ndarray) -> float:
    """|P∩R| / |P∪R|; NaN when both are empty."""
    return iou_from_counts(*_counts(pred_mask, ref_mask))


def volume_ml(mask: np.ndarray, spacing: Sequence[float]) -> float:
    """Volume of the non-zero voxels in millilitres, spacing in mm per array axis."""
    mask = np.asarray(mask)
    _check_spacing(mask, spacing)
    return float(np.count_nonzero(mask)) * float(np.prod(spacing)) / 1000.0


def hausdorff95(pred_mask: np.ndarray, ref_mask: np.ndarray, spacing: Sequence[float]) -> float:
    """95th percentile of the symmetric surface distances in mm; NaN if either mask is empty.

    Surfaces are the mask voxels that touch the background through a face (mask minus its
    erosion; outside the array counts as background). The distances from every predicted surface
    voxel to the reference surface and from every reference surface voxel to the predicted
    surface are pooled, and their 95th percentile is returned. Both masks are cropped to their
    joint bounding box first, which does not change the result but makes large volumes fast.
    """
    pred, ref = _as_bool_pair(pred_mask, ref_mask)
    _check_spacing(pred, spacing)
    if not pred.any() or not ref.any():
        return math.nan
    crop = tuple(slice(max(lo - 1, 0), min(hi + 1, n))  # one voxel of margin keeps the surfaces intact
                 for (lo, hi), n in zip(nonzero_bounding_box((pred | ref)[None]), pred.shape))
    pred, ref = pred[crop], ref[crop]
    pred_surface, ref_surface = _surface(pred), _surface(ref)
    sampling = tuple(float(s) for s in spacing)
    to_ref = ndimage.distance_transform_edt(~ref_surface, sampling=sampling)[pred_surface]
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=sampling)[ref_surface]
    return float(np.percentile(np.concatenate([to_ref, to_pred]), 95))


def _surface(mask: np.ndarray) -> np.ndarray:
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _as_bool_pair(pred_mask: np.ndarray, ref_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, ref = np.asarray(pred_mask).astype(bool, copy=False), np.asarray(ref_mask).astype(bool, copy=False)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    return pred, ref


def _check_spacing(mask: np.ndarray, spacing: Sequence[float]) -> None:
    if len(spacing) != mask.ndim:
        raise ValueError(f"spacing {tuple(spacing)} needs one value per array axis ({mask.ndim} axes, "
                         f"shape {mask.shape})")


def _drop_missing_axes(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]):
    """A 2D image read as one slice with the pseudo-spacing of a missing axis is measured in 2D:
    distances in-plane, and areas as volumes of a 1 mm thick slab."""
    keep = [a for a, (n, s) in enumerate(zip(ref.shape, spacing)) if not (n == 1 and s >= PSEUDO_SPACING_2D)]
    if len(keep) == ref.ndim or not keep:
        return pred, ref, spacing
    squeeze = tuple(a for a in range(ref.ndim) if a not in keep)
    return pred.squeeze(squeeze), ref.squeeze(squeeze), [float(spacing[a]) for a in keep]


def without_unannotated(pred: np.ndarray, ref: np.ndarray,
                        ignore_label: int | None) -> tuple[np.ndarray, np.ndarray]:
    """(pred, ref) with the voxels whose reference is `ignore_label` set to background in both, so they count for
    no label, as nnU-Net v2 scores sparse annotations; unchanged without an ignore label."""
    if ignore_label is None:
        return pred, ref
    unannotated = ref == ignore_label
    if not unannotated.any():
        return pred, ref
    return np.where(unannotated, 0, pred), np.where(unannotated, 0, ref)


def evaluate_case(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
                  labels: Sequence[int] | Mapping[int, Sequence[int]],
                  ignore_label: int | None = None) -> dict[str, dict[str, float | int]]:
    """Per-label metrics of one case, keyed by label id as a string; NaN marks an undefined value.

    `labels` lists the ids to score, or maps each id to score to the ids its structure unites (regions,
    dataset/regions.py: a region written as 2 may be labels 1, 2 and 3 in both maps). Voxels whose
    reference is `ignore_label` (unannotated) count for no label, as nnU-Net v2 scores them."""
    pred, ref = np.asarray(pred), np.asarray(ref)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from reference shape {ref.shape}")
    pred, ref = without_unannotated(pred, ref, ignore_label)
    _check_spacing(ref, spacing)
    pred, ref, spacing = _drop_missing_axes(pred, ref, spacing)
    voxel_mm3 = float(np.prod(spacing))
    structures = labels.items() if isinstance(labels, Mapping) else [(label, (label,)) for label in labels]
    result = {}
    for label, members in structures:
        pred_mask, ref_mask = ids_mask(pred, members), ids_mask(ref, members)
        tp, n_pred, n_ref = _counts(pred_mask, ref_mask)
        result[str(int(label))] = {
            "dice": dice_from_counts(tp, n_pred, n_ref),
            "iou": iou_from_counts(tp, n_pred, n_ref),
            "hd95_mm": hausdorff95(pred_mask, ref_mask, spacing),
            "pred_volume_ml": n_pred * voxel_mm3 / 1000.0,
            "ref_volume_ml": n_ref * voxel_mm3 / 1000.0,
            "tp": tp,
            "fp": n_pred - tp,
            "fn": n_ref - tp,
        }
    return result


def _absent_label_metrics() -> dict[str, float | int]:
    """Metrics of a label found neither in the prediction nor in the reference of a case."""
    return {"dice": math.nan, "iou": math.nan, "hd95_mm": math.nan, "pred_volume_ml": 0.0,
            "ref_volume_ml": 0.0, "tp": 0, "fp": 0, "fn": 0}


def presence(metrics: Mapping[str, float | int]) -> str:
    """Where a case's structure is, from its voxel counts: 'in both', 'absent in both',
    'missing in prediction' or 'not in reference' (the last three leave HD95 undefined)."""
    in_pred = metrics["tp"] + metrics["fp"] > 0
    in_ref = metrics["tp"] + metrics["fn"] > 0
    if in_pred and in_ref:
        return "in both"
    if in_ref:
        return "missing in prediction"
    return "not in reference" if in_pred else "absent in both"


# ---------------------------------------------------------------------------------------------
# Folder-level evaluation


def segmentation_files(folder: Path | str) -> dict[str, Path]:
    """Image files of a folder keyed by case id (file name without extension), sorted by id."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EvaluationError(f"{folder}: folder not found")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_file() or image_suffix(path) is None:
            continue
        case_id = strip_suffix(path)
        if case_id in files:
            raise EvaluationError(f"{path}: case '{case_id}' also stored as {files[case_id].name}; "
                                  "keep one file per case")
        files[case_id] = path
    return dict(sorted(files.items()))


def read_label_map(path: Path) -> tuple[np.ndarray, Geometry]:
    """A label map as an integer array with its geometry; errors become EvaluationError."""
    try:
        array, geometry = read_image(path)
    except ImageReadError as exc:
        raise EvaluationError(str(exc)) from None
    if array.ndim != len(geometry.shape):
        raise EvaluationError(f"{path}: has {array.shape[0]} channels; a label map must be a single 3D volume")
    if not np.issubdtype(array.dtype, np.integer):
        rounded = np.rint(array)
        if not np.array_equal(rounded, array):
            raise EvaluationError(f"{path}: contains non-integer values; a label map holds label ids only")
        array = rounded.astype(np.int64)
    return array, geometry


def _evaluate_pair(case_id: str, pred_path: Path, ref_path: Path, labels: Sequence[int] | None,
                   ignore_label: int | None = None, membrane: int | None = None, ref_instances: Path | None = None,
                   pred_instances: Path | None = None) -> tuple[str, dict, list[int], dict]:
    """Worker: metrics of one case, the labels present in its reference, and its object metrics (membrane ones
    for the label `membrane`, instance ones against `ref_instances`; see objects.py)."""
    ref, ref_geometry = read_label_map(ref_path)
    pred, pred_geometry = read_label_map(pred_path)
    if not pred_geometry.matches(ref_geometry):
        problems = "; ".join(pred_geometry.differences(ref_geometry))
        raise EvaluationError(f"{pred_path}: geometry differs from its reference {ref_path} ({problems}); "
                              "export the prediction on the reference image grid")
    ref_labels = [int(v) for v in np.unique(ref) if v != 0 and v != ignore_label]
    if labels is None:  # every label seen in either image; labels absent from all references are dropped later
        labels = sorted(set(ref_labels) | {int(v) for v in np.unique(pred) if v != 0 and v != ignore_label})
    scores = {}
    if membrane is not None:
        saved = pred_path.with_name(f"{case_id}.npz")  # `predict --save-probabilities`
        probability = None
        if saved.is_file():
            with np.load(saved) as npz:
                saved_probabilities = npz["probabilities"] if "probabilities" in npz else None  # read once
            if saved_probabilities is not None and saved_probabilities.shape[1:] == ref.shape:
                probability = saved_probabilities[membrane]
        scores.update(objects.membrane_scores(pred, ref, membrane, probability))
    if ref_instances is not None:
        reference_objects, _ = read_label_map(ref_instances)
        if reference_objects.shape != ref.shape:
            raise EvaluationError(f"{ref_instances}: shape {list(reference_objects.shape)} differs from the "
                                  f"reference label map {ref_path} ({list(ref.shape)})")
        predicted_objects = (read_label_map(pred_instances)[0] if pred_instances is not None
                             else objects.connected_objects(pred))
        scores.update(objects.instance_scores(predicted_objects, reference_objects))
    return case_id, evaluate_case(pred, ref, ref_geometry.spacing, labels, ignore_label), ref_labels, scores


def find_label_names(pred_dir: Path | str, ref_dir: Path | str) -> tuple[dict[str, str], Path | None]:
    """Label names {"1": "liver", ...} for a pair of folders, and the file they came from.

    The first source found wins: the plans.json of the workspace that `autoseg predict` recorded in
    `pred_dir/prediction_summary*.json` (`prediction_report*.json` from earlier versions), then a dataset.json
    in `ref_dir` or its parent (Decathlon {id: name} or nnU-Net v2 {name: id}). Nothing found: ({}, None), and
    ids are shown.
    """
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    for report in workspace.prediction_summaries(pred_dir):
        content = _read_json_or_none(report)
        settings = content.get("settings") if isinstance(content, dict) else None
        workdir = settings.get("workdir") if isinstance(settings, dict) else None
        plans_path = workspace.plans_json(Path(workdir)) if workdir else None
        names = _label_names_of(plans_path) if plans_path is not None and plans_path.is_file() else {}
        if names:
            return names, plans_path
    for meta_path in (ref_dir / "dataset.json", ref_dir.parent / "dataset.json"):
        names = _label_names_of(meta_path) if meta_path.is_file() else {}
        if names:
            return names, meta_path
    return {}, None


def _read_json_or_none(path: Path):
    try:
        return read_json(path)
    except (OSError, ValueError) as exc:
        logger.debug("%s: not read for label names (%s)", path, exc)
        return None


def _label_names_of(path: Path) -> dict[str, str]:
    """The "labels" of a plans.json or dataset.json as {id: name}; regions (lists of ids) are skipped."""
    meta = _read_json_or_none(path)
    labels = meta.get("labels") if isinstance(meta, dict) else None
    if not isinstance(labels, dict):
        return {}
    if all(_is_label_id(k) for k in labels):  # Decathlon and plans.json: {id: name}
        return {str(int(k)): str(v) for k, v in labels.items()}
    return {str(int(v)): str(k) for k, v in labels.items() if _is_label_id(v)}  # nnU-Net v2: {name: id}


def regions_of(path: Path | None) -> tuple[Region, ...]:
    """The regions a plans.json or an nnU-Net v2 dataset.json defines (dataset/regions.py); () when none, or when
    they cannot be used (logged)."""
    meta = _read_json_or_none(path) if path is not None else None
    if not isinstance(meta, dict) or not isinstance(meta.get("labels"), dict):
        return ()
    try:
        if isinstance(meta.get("regions"), list):  # plans.json
            return tuple(Region.from_json(r, str(path)) for r in meta["regions"])
        if has_regions(meta["labels"]):  # dataset.json
            return parse_regions(path, meta["labels"], meta.get("regions_class_order"))[1]
    except RegionError as exc:  # names may still come from it; the labels are scored one by one
        logger.warning("%s; scoring labels, not regions", exc)
    return ()


def _is_label_id(value) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, str) and value.strip().isdigit()


def evaluate_folders(pred_dir: Path | str, ref_dir: Path | str, labels: Sequence[int] | None = None,
                     output_dir: Path | str | None = None, workers: int = 1,
                     label_names: Mapping[int | str, str] | None = None, object_metrics: str = "auto",
                     instances_dir: Path | str | None = None, regions: Sequence[Region] | None = None) -> dict:
    """Evaluate every prediction against the reference with the same case id.

    Labels default to the union of the non-zero values in the references; where the plans.json or dataset.json
    that names them defines regions (or `regions` are given), the regions are scored instead, each under the id
    it is written as. Label names given in
    `label_names` win over those `find_label_names` finds. A label named "ignore" (nnU-Net v2's
    unannotated voxels) is not scored, and its voxels count for no label. Writes `summary.json` and `summary.csv`
    into `output_dir` (default: `pred_dir`) and returns the summary (the same content as
    `summary.json`, with null for undefined values).

    `object_metrics` (auto, membrane, instances, all, none) adds the object metrics of objects.py under
    "object_metrics": auto computes the membrane errors when a label is named membrane or boundary, and
    the instance metrics when reference instance maps are found (`instances_dir`, else an instancesTr/
    beside `ref_dir`). Predicted objects are the `<case>_instances` maps in `pred_dir`, else the connected
    components of each predicted label map.
    """
    if object_metrics not in objects.CHOICES:
        raise EvaluationError(f"object metrics must be one of {', '.join(objects.CHOICES)}, got {object_metrics!r}")
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    predictions, references = segmentation_files(pred_dir), segmentation_files(ref_dir)
    # autoseg's instance maps lie beside the label maps: they are objects to score, not cases
    pred_instance_files = {c: predictions.pop(f"{c}{objects.INSTANCES_SUFFIX}") for c in list(predictions)
                           if f"{c}{objects.INSTANCES_SUFFIX}" in predictions and f"{c}{objects.INSTANCES_SUFFIX}"
                           not in references}
    if not predictions:
        raise EvaluationError(f"{pred_dir}: no prediction files found (expected {', '.join(SUPPORTED_SUFFIXES)})")
    orphans = [predictions[c] for c in predictions if c not in references]
    if orphans:
        names = ", ".join(p.name for p in orphans[:5]) + (" ..." if len(orphans) > 5 else "")
        raise EvaluationError(f"{pred_dir}: {len(orphans)} prediction(s) without a reference in {ref_dir}: "
                              f"{names}; check the folders or remove the stray predictions")
    missing = [c for c in references if c not in predictions]
    if missing:
        logger.warning("%d reference case(s) in %s have no prediction in %s: %s", len(missing), ref_dir,
                       pred_dir, ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""))

    if regions and labels is not None:
        raise EvaluationError("give labels or regions to score, not both")
    found, found_in = find_label_names(pred_dir, ref_dir)
    if regions is None:
        regions = regions_of(found_in) if found_in is not None and labels is None else ()
    if regions:  # scored as regions, each under the id it is written as (dataset/regions.py)
        found = {**found, **{str(r.written_as): r.name for r in regions}}
    given = {str(int(k)): str(v) for k, v in (label_names or {}).items()}
    names = {**found, **given}
    ignore_label = ignore_label_id(names)  # regions are never written as the ignore id (dataset/regions.py)
    if labels is not None:
        labels = [label for label in labels if int(label) != ignore_label]
    membrane, ref_instances, reasons = _object_plan(object_metrics, names, ref_dir, instances_dir, predictions,
                                                    bool(pred_instance_files))
    scored = {r.written_as: r.labels for r in regions} if regions else labels
    jobs = [(case_id, predictions[case_id], references[case_id], scored, ignore_label, membrane,
             ref_instances.get(case_id) if ref_instances is not None else None, pred_instance_files.get(case_id))
            for case_id in predictions]
    results = _run_jobs(jobs, workers)

    if regions:
        labels = [r.written_as for r in regions]
    elif labels is None:
        labels = sorted({label for result in results.values() for label in result[2]})
    labels = [int(label) for label in labels]
    cases = {}
    for case_id in predictions:
        metrics = results[case_id][1]
        cases[case_id] = {str(label): metrics.get(str(label), _absent_label_metrics()) for label in labels}

    names_from = []  # where the names came from: "given" (label_names) and/or the file found
    if any(str(label) in given for label in labels):
        names_from.append("given")
    if any(str(label) in found and str(label) not in given for label in labels):
        names_from.append(str(found_in))
    summary = _summarize(cases, labels, missing, pred_dir, ref_dir,
                         {str(label): names[str(label)] for label in labels if str(label) in names}, names_from)
    if reasons:
        per_case = {case_id: results[case_id][3] for case_id in predictions}
        summary["object_metrics"] = nan_to_none({"reasons": reasons, "mean": objects.summarize(per_case),
                                                 "cases": per_case})
    output_dir = Path(output_dir) if output_dir is not None else pred_dir
    write_json(output_dir / "summary.json", summary)
    _write_csv(output_dir / "summary.csv", summary)
    return summary


def _object_plan(choice: str, names: Mapping[str, str], ref_dir: Path, instances_dir: Path | str | None,
                 predictions: Mapping[str, Path], have_instance_maps: bool
                 ) -> tuple[int | None, dict[str, Path] | None, list[str]]:
    """Which object metrics apply: the membrane label, the reference instance map of each case, and the reasons
    in words (for the table and summary.json)."""
    reasons: list[str] = []
    membrane = None
    if choice in ("auto", "membrane", "all"):
        membrane = objects.membrane_label(names)
        if membrane is not None:
            reasons.append(f"Rand, warping and pixel error (ISBI 2012) of label {membrane} "
                           f"'{names[str(membrane)]}', the cells being the connected regions of the rest")
        elif choice != "auto":
            raise EvaluationError("membrane metrics need one label named membrane or boundary (give names with "
                                  "--labels, e.g. --labels 1=membrane)")
    ref_instances = None
    if choice in ("auto", "instances", "all"):
        folder = Path(instances_dir) if instances_dir is not None else ref_dir.parent / INSTANCE_MAPS_DIR
        if instances_dir is not None and not folder.is_dir():
            raise EvaluationError(f"{folder}: folder of reference instance maps not found")
        if folder.is_dir():
            found = segmentation_files(folder)
            lacking = [c for c in predictions if c not in found]
            if lacking:
                raise EvaluationError(f"{folder}: no instance map of {len(lacking)} case(s) (e.g. {lacking[0]}); "
                                      "give one per reference, named as the label maps")
            ref_instances = {c: found[c] for c in predictions}
            source = ("autoseg's <case>_instances maps" if have_instance_maps
                      else "connected components of the label maps (no <case>_instances maps)")
            reasons.append(f"mAP, F1 and AJI of the objects against the instance maps in {folder}; predicted objects: "
                           f"{source}")
        elif choice != "auto":
            raise EvaluationError(f"instance metrics need reference instance maps: give their folder with --instances "
                                  f"DIR (none at {folder})")
    return membrane, ref_instances, reasons


def _run_jobs(jobs: list[tuple], workers: int) -> dict[str, tuple]:
    progress = tqdm(total=len(jobs), desc="evaluating", unit="case")
    results = {}
    try:
        if workers <= 1:
            for job in jobs:
                results[job[0]] = _evaluate_pair(*job)
                progress.update()
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = [pool.submit(_evaluate_pair, *job) for job in jobs]
                for future in as_completed(futures):
                    result = future.result()
                    results[result[0]] = result
                    progress.update()
    finally:
        progress.close()
    return results


def _summarize(cases: dict[str, dict[str, dict]], labels: Sequence[int], missing: list[str],
               pred_dir: Path, ref_dir: Path, label_names: dict[str, str], label_names_from: list[str]) -> dict:
    mean = {}
    for label in labels:
        key = str(label)
        values = {m: np.array([cases[c][key][m] for c in cases], dtype=float) for m in MEAN_METRICS}
        mean[key] = {"name": label_names.get(key), **{m: _nanmean(v) for m, v in values.items()}}
        mean[key]["cases_used"] = {m: int(np.count_nonzero(~np.isnan(v))) for m, v in values.items()}
    foreground = {}
    for metric in FOREGROUND_METRICS:
        per_label = np.array([mean[str(label)][metric] for label in labels], dtype=float)
        foreground[metric] = _nanmean(per_label)
    foreground["labels_used"] = {m: int(np.count_nonzero(~np.isnan([mean[str(label)][m] for label in labels])))
                                 for m in FOREGROUND_METRICS}
    summary = {
        "format_version": SUMMARY_FORMAT_VERSION,
        "pred_dir": str(pred_dir),
        "ref_dir": str(ref_dir),
        "labels": list(labels),
        "label_names": label_names,
        "label_names_from": label_names_from,
        "num_cases": len(cases),
        "missing_predictions": list(missing),
        "mean": mean,
        "foreground_mean": foreground,
        "cases": cases,
    }
    return nan_to_none(summary)


def mean_per_label(cases: Mapping[str, Mapping[str, Mapping[str, float]]], labels: Sequence[int],
                   metrics: Sequence[str] = ("dice", "iou", "hd95_mm")) -> dict[str, dict[str, float]]:
    """Mean of each metric per label over cases (as `evaluate_case` returns them), skipping undefined (NaN) values."""
    return {str(label): {m: _nanmean(np.array([cases[c][str(label)][m] for c in cases], dtype=float)) for m in metrics}
            for label in labels}


def _nanmean(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=float)
    return float(np.mean(values[~np.isnan(values)])) if np.any(~np.isnan(values)) else math.nan


def nan_to_none(value):
    """NaN (undefined metric) -> None, recursively, for JSON."""
    if isinstance(value, dict):
        return {k: nan_to_none(v) for k, v in value.items()}
    if isinstance(value, list):
        return [nan_to_none(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _write_csv(path: Path, summary: dict) -> None:
    names = summary.get("label_names") or {}
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["case_id", "label", *CASE_METRICS, "label_name"])  # name last: column positions stay
            for case_id, per_label in summary["cases"].items():
                for label, metrics in per_label.items():
                    writer.writerow([case_id, label, *("" if metrics[m] is None else metrics[m] for m in CASE_METRICS),
                                     names.get(label, "")])


UNDEFINED = "undefined"
PRESENCE_ORDER = ("missing in prediction", "not in reference", "absent in both")


def format_summary_table(summary: Mapping, label_names: Mapping[str, str] | None = None,
                         max_cases_named: int = 3) -> str:
    """Plain-text table of the mean metrics per label and the foreground mean, for a person to read.

    Takes a summary of `evaluate_folders` or of the end-of-training validation. Labels show their
    names where known (`label_names` wins over the summary's). An undefined mean reads
    "undefined" with a footnote, and each label whose HD95 is undefined in some cases gets a line
    naming those cases in words ("missing in prediction: case_7").
    """
    names = {**(summary.get("label_names") or {}),
             **{k: m["name"] for k, m in summary["mean"].items() if m.get("name")}, **(label_names or {})}
    cases = summary.get("cases") or {}
    header = ["label", "Dice", "IoU", "HD95 mm", "cases"]
    rows, notes = [], []
    for key, metrics in summary["mean"].items():
        name = names.get(key, key)
        where = {c: presence(cases[c][key]) for c in cases if key in cases[c]}
        rows.append([name, _fmt(metrics["dice"]), _fmt(metrics["iou"]), _fmt(metrics["hd95_mm"], 2),
                     str(sum(w != "absent in both" for w in where.values()))])
        undefined_in = {}
        for case_id, w in where.items():
            if w != "in both":
                undefined_in.setdefault(w, []).append(case_id)
        if undefined_in:
            notes.append(f"  {name}: " + "; ".join(f"{w}: {_some(undefined_in[w], max_cases_named)}"
                                                   for w in PRESENCE_ORDER if w in undefined_in))
    fg = {m: _nanmean(np.array([_none_to_nan(v[m]) for v in summary["mean"].values()], dtype=float))
          for m in FOREGROUND_METRICS}
    rows.append(["foreground mean", _fmt(fg["dice"]), _fmt(fg["iou"]), _fmt(fg["hd95_mm"], 2),
                 str(summary["num_cases"])])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if any(UNDEFINED in row[1:3] for row in rows):
        lines.append(f"{UNDEFINED}: no case to average; Dice and IoU need the structure in prediction or reference, "
                     "HD95 in both.")
    elif any(UNDEFINED in row for row in rows):
        lines.append(f"{UNDEFINED}: no case had the structure in both prediction and reference (HD95 needs both).")
    if notes:
        lines.append("Where a structure is not in both, HD95 is undefined and left out of the mean:")
        lines.extend(notes)
    missing = summary.get("missing_predictions") or []
    if missing:
        lines.append(f"{len(missing)} reference case(s) without a prediction were not evaluated.")
    return "\n".join(lines)


def _some(case_ids: list[str], limit: int) -> str:
    shown = ", ".join(case_ids[:limit])
    return shown if len(case_ids) <= limit else f"{shown} and {len(case_ids) - limit} more"


def _none_to_nan(value: float | None) -> float:
    return math.nan if value is None else float(value)


def _fmt(value: float | None, digits: int = 4) -> str:
    return UNDEFINED if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"
