"""Boundary metrics for 2D membrane maps: the Rand, warping and pixel errors of the ISBI 2012 EM challenge.

A membrane map is a 2D array of bool (or 0/1) where True marks membrane (cell boundary) and False cell
interior. Cells are the 4-connected components of non-membrane pixels, so membrane separates cells with
8-connectivity; this is the pair of connectivities the challenge's scoring code (Fiji's Trainable
Segmentation metrics) uses both for labelling cells and for deciding which pixels are simple.

Each definition follows that scoring code; docs/object_metrics.md states the formulas, the empty cases
and the tests that check them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

_FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)
_EIGHT_CONNECTED = ndimage.generate_binary_structure(2, 2)

# The challenge swept eleven thresholds (0, 0.1, ..., 1) and kept the best score.
DEFAULT_THRESHOLDS = np.linspace(0.0, 1.0, 11)


# ---------------------------------------------------------------------------------------------
# Inputs


def _as_membrane(membrane: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(membrane)
    if array.ndim != 2:
        raise ValueError(
            f"{name} must be a 2D membrane map, got {array.ndim} dimensions with shape {array.shape}; "
            "score a 3D stack slice by slice"
        )
    if array.dtype != bool:
        if not np.all((array == 0) | (array == 1)):
            raise ValueError(
                f"{name} must hold only 0/1 (or bool) values; threshold a probability map first, "
                "or use maximal_rand_error / maximal_pixel_error for a membrane probability map"
            )
        array = array.astype(bool)
    return array


def _as_membrane_pair(pred_membrane: np.ndarray, ref_membrane: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = _as_membrane(pred_membrane, "pred_membrane")
    ref = _as_membrane(ref_membrane, "ref_membrane")
    if pred.shape != ref.shape:
        raise ValueError(f"pred_membrane has shape {pred.shape} but ref_membrane has shape {ref.shape}")
    return pred, ref


def _as_probability(membrane_probability: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    probability = np.asarray(membrane_probability, dtype=float)
    if probability.shape != shape:
        raise ValueError(f"membrane_probability has shape {probability.shape} but ref_membrane has shape {shape}")
    return probability


def cells_of(membrane: np.ndarray) -> np.ndarray:
    """Label the cells of a membrane map: 4-connected non-membrane regions get 1..n, membrane gets 0."""
    labels, _ = ndimage.label(~_as_membrane(membrane, "membrane"), structure=_FOUR_CONNECTED)
    return labels


# ---------------------------------------------------------------------------------------------
# Rand error


def _rand_pair_sums(pred_labels: np.ndarray, ref_labels: np.ndarray, count_self_pairs: bool) -> tuple[int, int, int]:
    """(pairs together in both, pairs together in the reference, pairs together in the prediction)."""
    inside = ref_labels != 0
    ref = ref_labels[inside]
    pred = pred_labels[inside]
    n = ref.size
    if n == 0:
        return 0, 0, 0
    singletons = pred == 0
    n_singletons = int(np.count_nonzero(singletons))
    _, ref_sizes = np.unique(ref, return_counts=True)
    _, pred_sizes = np.unique(pred[~singletons], return_counts=True)
    _, ref_index = np.unique(ref[~singletons], return_inverse=True)
    _, pred_index = np.unique(pred[~singletons], return_inverse=True)
    joint_code = ref_index.astype(np.int64) * (int(pred_index.max(initial=0)) + 1) + pred_index
    _, joint_sizes = np.unique(joint_code, return_counts=True)

    def squares(sizes: np.ndarray) -> int:
        return int(np.dot(sizes.astype(np.int64), sizes.astype(np.int64)))

    # Ordered pairs drawn with replacement; each predicted-membrane pixel is a segment of its own.
    together_both = squares(joint_sizes) + n_singletons
    together_ref = squares(ref_sizes)
    together_pred = squares(pred_sizes) + n_singletons
    if not count_self_pairs:
        together_both -= n
        together_ref -= n
        together_pred -= n
    return together_both, together_ref, together_pred


def foreground_restricted_rand_error(
    pred_labels: np.ndarray, ref_labels: np.ndarray, *, count_self_pairs: bool = True
) -> float:
    """1 - V_rand, V_rand being the F-score of pixel pairs sharing a segment, over reference-segment pixels.

    Label 0 is boundary. Reference boundary pixels are left out; predicted boundary pixels inside
    reference segments each count as a segment of their own, as in the ISBI 2012 scoring code.
    ``count_self_pairs=True`` (the challenge's N^2 normalisation) counts pairs drawn with replacement;
    False counts pairs of distinct pixels, which is scikit-image's ``adapted_rand_error``. NaN when the
    reference has no segment pixels (nothing to score).
    """
    pred = np.asarray(pred_labels)
    ref = np.asarray(ref_labels)
    if pred.shape != ref.shape:
        raise ValueError(f"pred_labels has shape {pred.shape} but ref_labels has shape {ref.shape}")
    together_both, together_ref, together_pred = _rand_pair_sums(pred, ref, count_self_pairs)
    if together_ref + together_pred == 0:
        return math.nan
    return 1.0 - 2.0 * together_both / (together_ref + together_pred)


def rand_error(pred_membrane: np.ndarray, ref_membrane: np.ndarray) -> float:
    """The challenge's foreground-restricted Rand error between the cells of two membrane maps."""
    pred, ref = _as_membrane_pair(pred_membrane, ref_membrane)
    return foreground_restricted_rand_error(cells_of(pred), cells_of(ref))


def maximal_rand_error(
    membrane_probability: np.ndarray, ref_membrane: np.ndarray, thresholds: np.ndarray = DEFAULT_THRESHOLDS
) -> float:
    """1 - the best Rand F-score over thresholds (membrane where probability >= t): the leaderboard's form."""
    ref = _as_membrane(ref_membrane, "ref_membrane")
    probability = _as_probability(membrane_probability, ref.shape)
    ref_cells = cells_of(ref)
    errors = [foreground_restricted_rand_error(cells_of(probability >= t), ref_cells) for t in thresholds]
    return float(np.min(errors))


# ---------------------------------------------------------------------------------------------
# Pixel error


def _cell_pixel_fscore(pred_cells: np.ndarray, ref_cells: np.ndarray) -> float:
    true_positives = int(np.count_nonzero(pred_cells & ref_cells))
    false_positives = int(np.count_nonzero(pred_cells & ~ref_cells))
    false_negatives = int(np.count_nonzero(~pred_cells & ref_cells))
    # The scoring code's conventions: no false positive means precision 1, no false negative recall 1.
    precision = 1.0 if false_positives == 0 else true_positives / (true_positives + false_positives)
    recall = 1.0 if false_negatives == 0 else true_positives / (true_positives + false_negatives)
    if precision + recall == 0:
        return 0.0
    return 2.0 * precision * recall / (precision + recall)


def pixel_error(pred_membrane: np.ndarray, ref_membrane: np.ndarray) -> float:
    """1 - the F-score of pixel classification with cell interior as the positive class (ISBI 2012)."""
    pred, ref = _as_membrane_pair(pred_membrane, ref_membrane)
    return 1.0 - _cell_pixel_fscore(~pred, ~ref)


def maximal_pixel_error(
    membrane_probability: np.ndarray, ref_membrane: np.ndarray, thresholds: np.ndarray = DEFAULT_THRESHOLDS
) -> float:
    """1 - the best pixel F-score over thresholds (membrane where probability >= t)."""
    ref = _as_membrane(ref_membrane, "ref_membrane")
    probability = _as_probability(membrane_probability, ref.shape)
    return 1.0 - max(_cell_pixel_fscore(probability < t, ~ref) for t in thresholds)


# ---------------------------------------------------------------------------------------------
# Warping error

# Neighbours of a pixel in the order of the bits of a neighbourhood code.
_NEIGHBOUR_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def _topology_tables() -> tuple[np.ndarray, np.ndarray]:
    """For each of the 256 cell/membrane patterns of a pixel's 8 neighbours: may the centre flip, and T4.

    A flip is simple when it changes no topology: the neighbouring cell pixels that touch the centre
    4-wise form one 4-connected group (T4 = 1), and the neighbouring membrane pixels form one 8-connected
    group (T8 = 1); these are Bertrand & Malandain's topological numbers. The challenge's code tests the
    slice embedded in 3D, which gives the same answer for every pattern.
    """
    simple = np.zeros(256, dtype=bool)
    t4 = np.zeros(256, dtype=np.int8)
    for code in range(256):
        cell = np.zeros((3, 3), dtype=bool)
        for bit, (dr, dc) in enumerate(_NEIGHBOUR_OFFSETS):
            cell[1 + dr, 1 + dc] = bool(code >> bit & 1)
        cell_groups, _ = ndimage.label(cell, structure=_FOUR_CONNECTED)
        t4[code] = len({cell_groups[0, 1], cell_groups[1, 0], cell_groups[1, 2], cell_groups[2, 1]} - {0})
        membrane = ~cell
        membrane[1, 1] = False
        _, t8 = ndimage.label(membrane, structure=_EIGHT_CONNECTED)
        simple[code] = t4[code] == 1 and t8 == 1
    return simple, t4


_SIMPLE, _T4 = _topology_tables()


@dataclass(frozen=True)
class WarpedReference:
    """The reference membrane map warped toward a prediction, and the disagreements no warp can remove."""

    warped_membrane: np.ndarray
    mismatches: np.ndarray

    @property
    def error(self) -> float:
        return float(np.count_nonzero(self.mismatches)) / self.mismatches.size


def _neighbour_codes(cells_flat: np.ndarray, positions: np.ndarray, width: int) -> np.ndarray:
    codes = np.zeros(positions.size, dtype=np.intp)
    for bit, (dr, dc) in enumerate(_NEIGHBOUR_OFFSETS):
        codes |= cells_flat[positions + dr * width + dc].astype(np.intp) << bit
    return codes


def warp_reference(pred_membrane: np.ndarray, ref_membrane: np.ndarray) -> WarpedReference:
    """Flip simple reference pixels to agree with the prediction until no disagreeing simple pixel is left.

    Jain et al. 2010's warping. Pixels with the same (row mod 2, column mod 2) are never 8-adjacent, so
    flipping all simple pixels of one such subfield at once equals flipping them one after another; the
    four subfields are swept in turn until a sweep flips nothing. Outside the image counts as membrane,
    as in the challenge's code. The order of flips can change which pixel of an ambiguous error stays;
    the challenge's code visits mismatches in its own order.
    """
    pred, ref = _as_membrane_pair(pred_membrane, ref_membrane)
    padded_width = ref.shape[1] + 2
    cells = np.pad(~ref, 1, constant_values=False)
    target_flat = np.pad(~pred, 1, constant_values=False).ravel()
    cells_flat = cells.ravel()

    mismatch = np.flatnonzero(cells_flat != target_flat)
    subfield = (mismatch // padded_width % 2) * 2 + mismatch % padded_width % 2
    pending = [mismatch[subfield == k] for k in range(4)]
    flipped_any = True
    while flipped_any:
        flipped_any = False
        for k in range(4):
            positions = pending[k]
            if positions.size == 0:
                continue
            simple = _SIMPLE[_neighbour_codes(cells_flat, positions, padded_width)]
            if simple.any():
                flip = positions[simple]
                cells_flat[flip] = target_flat[flip]
                pending[k] = positions[~simple]
                flipped_any = True

    warped_cells = cells[1:-1, 1:-1]
    return WarpedReference(warped_membrane=~warped_cells, mismatches=warped_cells != ~pred)


def count_topological_errors(warped: WarpedReference) -> dict[str, int]:
    """Classify the pixels left after warping by what flipping each alone would do to the warped cells.

    ``splits``: the prediction has membrane that would cut a warped cell in two; ``merges``: the
    prediction has cell interior that would join two or more warped cells; ``other``: the rest (cells or
    membrane islands that appear or vanish, rings that open or close).
    """
    cells = ~warped.warped_membrane
    labels, _ = ndimage.label(cells, structure=_FOUR_CONNECTED)
    padded_labels = np.pad(labels, 1)
    padded_width = labels.shape[1] + 2
    rows, cols = np.nonzero(warped.mismatches)
    positions = (rows + 1) * padded_width + cols + 1
    t4 = _T4[_neighbour_codes((padded_labels > 0).ravel(), positions, padded_width)]
    boxes = ndimage.find_objects(labels)
    splits = merges = 0
    for row, col, touching_groups in zip(rows, cols, t4):
        if touching_groups < 2:
            continue
        if labels[row, col] == 0:
            neighbours = padded_labels[(row, row + 2, row + 1, row + 1), (col + 1, col + 1, col, col + 2)]
            merges += len(set(neighbours[neighbours > 0].tolist())) >= 2
        else:
            splits += _cutting_splits_cell(labels, boxes, row, col)
    return {"splits": splits, "merges": merges, "other": rows.size - splits - merges}


def _cutting_splits_cell(labels: np.ndarray, boxes: list, row: int, col: int) -> bool:
    """Would turning this cell pixel into membrane cut its cell into several pieces?"""
    label = labels[row, col]
    box = boxes[label - 1]
    crop = labels[box] == label
    local_row, local_col = row - box[0].start, col - box[1].start
    crop[local_row, local_col] = False
    pieces, _ = ndimage.label(crop, structure=_FOUR_CONNECTED)
    near = set()
    for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1)):
        r, c = local_row + dr, local_col + dc
        if 0 <= r < crop.shape[0] and 0 <= c < crop.shape[1] and pieces[r, c]:
            near.add(pieces[r, c])
    return len(near) >= 2


def warping_error(pred_membrane: np.ndarray, ref_membrane: np.ndarray) -> float:
    """Fraction of pixels where the prediction still disagrees with the reference after warping.

    Only topological disagreements survive the warp (splits, merges, cells or holes that appear or
    vanish), so a boundary drawn a few pixels off costs nothing here.
    """
    return warp_reference(pred_membrane, ref_membrane).error


def membrane_metrics(pred_membrane: np.ndarray, ref_membrane: np.ndarray) -> dict[str, float]:
    """The three ISBI 2012 errors for one binary membrane map."""
    return {
        "rand_error": rand_error(pred_membrane, ref_membrane),
        "warping_error": warping_error(pred_membrane, ref_membrane),
        "pixel_error": pixel_error(pred_membrane, ref_membrane),
    }
