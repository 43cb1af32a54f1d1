"""Object-level metrics for instance maps: matching, average precision, F1, AJI, splits and merges.

An instance map is a 2D or 3D integer array with 0 for background and one positive id per object (ids
need not be consecutive). Every metric here starts from the overlaps of predicted and reference
objects, computed once from the pairs of ids found at each pixel, never by looping over objects and
scanning the whole image for each.

Empty images: when neither map has an object, average precision, F1 and AJI are 1.0 (nothing to find,
nothing found); when only one of them has objects they are 0.0. docs/object_metrics.md gives each
definition and the tests that check it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse.csgraph import maximum_bipartite_matching

# The 2018 Data Science Bowl's thresholds: 0.5, 0.55, ..., 0.95.
DSB_THRESHOLDS = np.arange(0.5, 1.0, 0.05)


def _as_instances(instances: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(instances)
    if array.dtype == bool:
        return array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        raise ValueError(
            f"{name} must be an integer instance map (0 = background, one id per object), got dtype "
            f"{array.dtype}; for a binary mask use instances_from_semantic(mask)"
        )
    if array.size and array.min() < 0:
        raise ValueError(f"{name} has negative ids; use 0 for background and positive ids for objects")
    return array


@dataclass(frozen=True)
class InstanceOverlaps:
    """Areas of every object and the intersections of every overlapping (predicted, reference) pair.

    Rows index ``pred_ids``, columns ``ref_ids``; the pairs are stored sparsely (``pair_pred``,
    ``pair_ref`` are indices into the id arrays), so images with thousands of objects stay cheap.
    """

    pred_ids: np.ndarray
    ref_ids: np.ndarray
    pred_areas: np.ndarray
    ref_areas: np.ndarray
    pair_pred: np.ndarray
    pair_ref: np.ndarray
    pair_intersection: np.ndarray

    @property
    def pair_iou(self) -> np.ndarray:
        union = self.pred_areas[self.pair_pred] + self.ref_areas[self.pair_ref] - self.pair_intersection
        return self.pair_intersection / union

    def iou_matrix(self) -> np.ndarray:
        """Dense IoU, shape (number of predicted objects, number of reference objects)."""
        iou = np.zeros((self.pred_ids.size, self.ref_ids.size))
        iou[self.pair_pred, self.pair_ref] = self.pair_iou
        return iou


def match_instances(pred: np.ndarray, ref: np.ndarray) -> InstanceOverlaps:
    """Overlap every predicted object with every reference object, from one histogram of id pairs."""
    pred = _as_instances(pred, "pred")
    ref = _as_instances(ref, "ref")
    if pred.shape != ref.shape:
        raise ValueError(f"pred has shape {pred.shape} but ref has shape {ref.shape}")
    pred_flat = pred.ravel()
    ref_flat = ref.ravel()
    pred_ids, pred_areas = np.unique(pred_flat[pred_flat > 0], return_counts=True)
    ref_ids, ref_areas = np.unique(ref_flat[ref_flat > 0], return_counts=True)
    both = (pred_flat > 0) & (ref_flat > 0)
    pred_index = np.searchsorted(pred_ids, pred_flat[both]).astype(np.int64)
    ref_index = np.searchsorted(ref_ids, ref_flat[both]).astype(np.int64)
    pair_code, pair_intersection = np.unique(pred_index * max(ref_ids.size, 1) + ref_index, return_counts=True)
    return InstanceOverlaps(
        pred_ids=pred_ids,
        ref_ids=ref_ids,
        pred_areas=pred_areas,
        ref_areas=ref_areas,
        pair_pred=pair_code // max(ref_ids.size, 1),
        pair_ref=pair_code % max(ref_ids.size, 1),
        pair_intersection=pair_intersection,
    )


# ---------------------------------------------------------------------------------------------
# Matching at an IoU threshold


def _true_positives(overlaps: InstanceOverlaps, threshold: float) -> int:
    """Matched pairs with IoU > threshold, each object used at most once.

    Above 0.5 a pair with IoU > threshold is unique for both of its objects (two references, being
    disjoint, cannot both have more than half their union with one prediction), so counting the pairs
    is the matching. Below 0.5 it is not, and the count is a maximum one-to-one matching.
    """
    hits = overlaps.pair_iou > threshold
    if threshold >= 0.5:
        return int(np.count_nonzero(hits))
    graph = sparse.csr_array(
        (np.ones(np.count_nonzero(hits)), (overlaps.pair_pred[hits], overlaps.pair_ref[hits])),
        shape=(overlaps.pred_ids.size, overlaps.ref_ids.size),
    )
    return int(np.count_nonzero(maximum_bipartite_matching(graph, perm_type="column") >= 0))


@dataclass(frozen=True)
class AveragePrecision:
    """Counts and the DSB 2018 precision TP / (TP + FP + FN) at each IoU threshold, and their mean."""

    thresholds: np.ndarray
    true_positives: np.ndarray
    false_positives: np.ndarray
    false_negatives: np.ndarray
    precision: np.ndarray
    mean: float


def _average_precision(overlaps: InstanceOverlaps, thresholds: np.ndarray) -> AveragePrecision:
    thresholds = np.atleast_1d(np.asarray(thresholds, dtype=float))
    tp = np.array([_true_positives(overlaps, t) for t in thresholds], dtype=np.int64)
    fp = overlaps.pred_ids.size - tp
    fn = overlaps.ref_ids.size - tp
    denominator = tp + fp + fn
    precision = np.where(denominator > 0, tp / np.maximum(denominator, 1), 1.0)
    return AveragePrecision(thresholds, tp, fp, fn, precision, float(precision.mean()))


def average_precision(pred: np.ndarray, ref: np.ndarray, thresholds: np.ndarray = DSB_THRESHOLDS) -> AveragePrecision:
    """The 2018 Data Science Bowl score: mean over thresholds t of TP/(TP+FP+FN), a hit being IoU > t."""
    return _average_precision(match_instances(pred, ref), thresholds)


def _f1(overlaps: InstanceOverlaps, threshold: float) -> float:
    tp = _true_positives(overlaps, threshold)
    denominator = overlaps.pred_ids.size + overlaps.ref_ids.size
    return 2.0 * tp / denominator if denominator else 1.0


def f1_at(pred: np.ndarray, ref: np.ndarray, threshold: float = 0.5) -> float:
    """Object-level F1 = 2TP / (2TP + FP + FN), a hit being IoU > threshold."""
    return _f1(match_instances(pred, ref), threshold)


# ---------------------------------------------------------------------------------------------
# Aggregated Jaccard index


def _aggregated_jaccard_index(overlaps: InstanceOverlaps) -> float:
    if overlaps.pred_ids.size == 0 and overlaps.ref_ids.size == 0:
        return 1.0
    iou = overlaps.pair_iou
    # Per reference object its best prediction: highest IoU, the lowest predicted id on a tie.
    order = np.lexsort((overlaps.pair_pred, -iou, overlaps.pair_ref))
    sorted_ref = overlaps.pair_ref[order]
    first = order[np.r_[True, sorted_ref[1:] != sorted_ref[:-1]]] if order.size else order
    best_ref = overlaps.pair_ref[first]
    best_pred = overlaps.pair_pred[first]
    intersection = overlaps.pair_intersection[first]
    union = overlaps.ref_areas[best_ref] + overlaps.pred_areas[best_pred] - intersection
    unmatched_ref = np.ones(overlaps.ref_ids.size, dtype=bool)
    unmatched_ref[best_ref] = False
    unused_pred = np.ones(overlaps.pred_ids.size, dtype=bool)
    unused_pred[best_pred] = False
    total_union = union.sum() + overlaps.ref_areas[unmatched_ref].sum() + overlaps.pred_areas[unused_pred].sum()
    return float(intersection.sum() / total_union)


def aggregated_jaccard_index(pred: np.ndarray, ref: np.ndarray) -> float:
    """Kumar et al. 2017's AJI: summed intersections over summed unions, unused predictions in the union.

    Each reference object is paired with the predicted object of highest IoU (a prediction may serve
    several references); AJI = sum |R ∩ P| / (sum |R ∪ P| + sum of the areas of predictions no reference
    chose). A reference that overlaps no prediction adds its area to the union only.
    """
    return _aggregated_jaccard_index(match_instances(pred, ref))


# ---------------------------------------------------------------------------------------------
# Splits and merges


@dataclass(frozen=True)
class SplitsAndMerges:
    """A merge is a predicted object holding at least ``min_overlap`` of the area of two or more reference
    objects; a split is a reference object holding at least ``min_overlap`` of the area of two or more
    predicted objects. The rule is symmetric: the splits of (pred, ref) are the merges of (ref, pred)."""

    splits: int
    merges: int
    refs_in_merges: int
    preds_in_splits: int


def _splits_and_merges(overlaps: InstanceOverlaps, min_overlap: float) -> SplitsAndMerges:
    inside_pred = overlaps.pair_intersection >= min_overlap * overlaps.ref_areas[overlaps.pair_ref]
    refs_per_pred = np.bincount(overlaps.pair_pred[inside_pred], minlength=overlaps.pred_ids.size)
    inside_ref = overlaps.pair_intersection >= min_overlap * overlaps.pred_areas[overlaps.pair_pred]
    preds_per_ref = np.bincount(overlaps.pair_ref[inside_ref], minlength=overlaps.ref_ids.size)
    return SplitsAndMerges(
        splits=int(np.count_nonzero(preds_per_ref >= 2)),
        merges=int(np.count_nonzero(refs_per_pred >= 2)),
        refs_in_merges=int(refs_per_pred[refs_per_pred >= 2].sum()),
        preds_in_splits=int(preds_per_ref[preds_per_ref >= 2].sum()),
    )


def split_merge_counts(pred: np.ndarray, ref: np.ndarray, min_overlap: float = 0.5) -> SplitsAndMerges:
    """Count merged (under-segmented) and split (over-segmented) objects; see ``SplitsAndMerges``."""
    if not 0.0 < min_overlap <= 1.0:
        raise ValueError(f"min_overlap must lie in (0, 1], got {min_overlap}")
    return _splits_and_merges(match_instances(pred, ref), min_overlap)


# ---------------------------------------------------------------------------------------------
# Baseline and summary


def instances_from_semantic(mask: np.ndarray, connectivity: int = 1) -> np.ndarray:
    """Connected components of a binary mask, the "semantic model + connected components" baseline.

    ``connectivity`` 1 joins pixels that share a face (4-neighbours in 2D, 6 in 3D); ``mask.ndim`` joins
    any touching pixels (8 in 2D, 26 in 3D).
    """
    mask = np.asarray(mask)
    if not 1 <= connectivity <= mask.ndim:
        raise ValueError(f"connectivity must be between 1 and {mask.ndim} for a {mask.ndim}D mask, got {connectivity}")
    structure = ndimage.generate_binary_structure(mask.ndim, connectivity)
    labels, _ = ndimage.label(mask > 0, structure=structure, output=np.int32)
    return labels


def instance_metrics(pred: np.ndarray, ref: np.ndarray) -> dict[str, float | int]:
    """The usual summary of one instance map, from a single matching."""
    overlaps = match_instances(pred, ref)
    counts = _splits_and_merges(overlaps, 0.5)
    return {
        "mean_ap": _average_precision(overlaps, DSB_THRESHOLDS).mean,
        "f1_at_0.5": _f1(overlaps, 0.5),
        "aji": _aggregated_jaccard_index(overlaps),
        "splits": counts.splits,
        "merges": counts.merges,
        "n_pred": int(overlaps.pred_ids.size),
        "n_ref": int(overlaps.ref_ids.size),
    }
