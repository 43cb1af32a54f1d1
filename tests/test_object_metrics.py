"""Object metrics (autoseg.evaluation.instances) and ISBI 2012 membrane metrics (autoseg.evaluation.membranes).

Hand-made maps with answers worked out on paper, plus checks against scikit-image's adapted Rand
error on random and real label maps.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from skimage.metrics import adapted_rand_error

from autoseg.evaluation.instances import (
    DSB_THRESHOLDS,
    aggregated_jaccard_index,
    average_precision,
    f1_at,
    instance_metrics,
    instances_from_semantic,
    match_instances,
    split_merge_counts,
)
from autoseg.evaluation.membranes import (
    _NEIGHBOUR_OFFSETS,
    _SIMPLE,
    cells_of,
    count_topological_errors,
    foreground_restricted_rand_error,
    maximal_pixel_error,
    maximal_rand_error,
    membrane_metrics,
    pixel_error,
    rand_error,
    warp_reference,
    warping_error,
)

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
EM_LABEL = SHARED_DATASETS / "Dataset011_ISBI2012EM" / "labelsTr" / "em_000.png"
DSB_INSTANCES = SHARED_DATASETS / "Dataset010_DSB2018Nuclei" / "instancesTr" / "dsb_000.png"


def _square(shape, top, left, height, width, value=1, out=None):
    out = np.zeros(shape, dtype=np.int32) if out is None else out
    out[top:top + height, left:left + width] = value
    return out


def _blobs(seed: int, shape=(64, 64), sigma=3.0, level=0.1) -> np.ndarray:
    """Random instance map: connected components of smoothed noise."""
    noise = ndimage.gaussian_filter(np.random.default_rng(seed).standard_normal(shape), sigma)
    labels, _ = ndimage.label(noise > level)
    return labels


def _em_reference() -> np.ndarray:
    if not EM_LABEL.exists():
        pytest.skip(f"{EM_LABEL} is not available")
    return np.array(Image.open(EM_LABEL)) == 1


# ---------------------------------------------------------------------------------------------
# Instances


def test_identical_instance_maps_score_perfectly():
    ref = _blobs(0)
    metrics = instance_metrics(ref, ref.copy())
    assert metrics == {
        "mean_ap": 1.0, "f1_at_0.5": 1.0, "aji": 1.0, "splits": 0, "merges": 0,
        "n_pred": int(ref.max()), "n_ref": int(ref.max()),
    }


def test_iou_from_pair_histogram_equals_object_by_object_loop():
    pred, ref = _blobs(1), _blobs(2)
    pred[pred > 0] += 7  # ids need not be consecutive
    overlaps = match_instances(pred, ref)
    expected = np.array([
        [np.count_nonzero((pred == p) & (ref == r)) / np.count_nonzero((pred == p) | (ref == r))
         for r in overlaps.ref_ids]
        for p in overlaps.pred_ids
    ])
    np.testing.assert_allclose(overlaps.iou_matrix(), expected)
    assert overlaps.pred_ids.tolist() == sorted(set(np.unique(pred).tolist()) - {0})


def test_two_touching_references_predicted_as_one_object_is_a_merge():
    ref = _square((20, 30), 5, 5, 10, 10, 1)  # 100 pixels
    _square(ref.shape, 5, 15, 10, 5, 2, out=ref)  # 50 pixels, touching the first
    pred = (ref > 0).astype(np.int32)  # one object of 150 pixels: IoU 2/3 and 1/3
    counts = split_merge_counts(pred, ref)
    assert (counts.merges, counts.refs_in_merges, counts.splits) == (1, 2, 0)
    ap = average_precision(pred, ref)
    # t = 0.5 .. 0.65: TP 1, FP 0, FN 1 -> 1/2; t = 0.7 .. 0.95: TP 0, FP 1, FN 2 -> 0.
    np.testing.assert_allclose(ap.precision, [0.5] * 4 + [0.0] * 6)
    assert ap.mean == pytest.approx(0.2)
    assert f1_at(pred, ref) == pytest.approx(2 / 3)
    # Both references pick the one prediction: (100 + 50) / (150 + 150).
    assert aggregated_jaccard_index(pred, ref) == pytest.approx(0.5)


def test_one_reference_predicted_as_two_halves_is_a_split():
    ref = _square((20, 20), 5, 5, 10, 10, 3)
    pred = _square(ref.shape, 5, 5, 10, 5, 1)
    _square(ref.shape, 5, 10, 10, 5, 2, out=pred)
    counts = split_merge_counts(pred, ref)
    assert (counts.splits, counts.preds_in_splits, counts.merges) == (1, 2, 0)
    assert split_merge_counts(ref, pred).merges == 1  # the rule is symmetric
    # IoU of each half is exactly 0.5, not above it: no hit at any DSB threshold.
    assert average_precision(pred, ref).mean == 0.0
    assert f1_at(pred, ref) == 0.0
    # The reference picks the first half (tie -> lower id); the other half is unused: 50 / (100 + 50).
    assert aggregated_jaccard_index(pred, ref) == pytest.approx(1 / 3)
    # Three pieces, each a third of the reference but lying wholly inside it, are one split too.
    ref = _square((20, 20), 5, 5, 10, 12, 3)
    pred = sum(_square(ref.shape, 5, 5 + 4 * k, 10, 4, k + 1) for k in range(3))
    counts = split_merge_counts(pred, ref)
    assert (counts.splits, counts.preds_in_splits) == (1, 3)


def test_average_precision_matches_hand_counts():
    shape = (40, 60)
    ref = _square(shape, 2, 2, 10, 10, 1)
    _square(shape, 2, 20, 10, 10, 2, out=ref)
    _square(shape, 20, 2, 10, 10, 3, out=ref)  # missed: FN at every threshold
    pred = _square(shape, 2, 3, 10, 10, 5)  # shifted one column: IoU 90/110 = 0.818
    _square(shape, 2, 23, 10, 10, 6, out=pred)  # shifted three columns: IoU 70/130 = 0.538
    _square(shape, 25, 40, 5, 5, 7, out=pred)  # touches nothing: FP at every threshold
    ap = average_precision(pred, ref)
    np.testing.assert_array_equal(ap.true_positives, [2] + [1] * 6 + [0] * 3)
    np.testing.assert_array_equal(ap.false_positives, [1] + [2] * 6 + [3] * 3)
    np.testing.assert_array_equal(ap.false_negatives, [1] + [2] * 6 + [3] * 3)
    np.testing.assert_allclose(ap.precision, [2 / 4] + [1 / 5] * 6 + [0.0] * 3)
    assert ap.mean == pytest.approx((0.5 + 6 * 0.2) / 10)
    assert f1_at(pred, ref, 0.5) == pytest.approx(4 / 6)
    assert f1_at(pred, ref, 0.8) == pytest.approx(2 / 6)
    assert f1_at(pred, ref, 0.85) == 0.0


def test_below_half_iou_matching_stays_one_to_one():
    ref = _square((20, 30), 5, 5, 10, 10, 1)
    _square(ref.shape, 5, 15, 10, 10, 2, out=ref)
    pred = (ref > 0).astype(np.int32)  # IoU 0.5 with each of the two references
    ap = average_precision(pred, ref, thresholds=np.array([0.3]))
    assert (ap.true_positives[0], ap.false_positives[0], ap.false_negatives[0]) == (1, 0, 1)
    assert ap.precision[0] == pytest.approx(0.5)


def test_aggregated_jaccard_index_counts_unused_predictions():
    shape = (30, 30)
    ref = _square(shape, 0, 0, 10, 10, 1)  # 100 pixels
    pred = _square(shape, 2, 0, 9, 10, 4)  # 90 pixels, 80 inside the reference: union 110
    _square(shape, 20, 20, 4, 5, 9, out=pred)  # 20 pixels of false positive
    assert aggregated_jaccard_index(pred, ref) == pytest.approx(80 / (110 + 20))
    # An IoU tie (40/100 and 50/125) goes to the lower predicted id; the other prediction is unused.
    pred = _square(shape, 0, 0, 4, 10, 1)
    _square(shape, 5, 0, 5, 10, 2, out=pred)
    _square(shape, 10, 0, 5, 5, 2, out=pred)
    assert aggregated_jaccard_index(pred, ref) == pytest.approx(40 / (100 + 75))


def test_empty_images_follow_the_documented_conventions():
    empty = np.zeros((8, 8), dtype=np.int32)
    one = _square((8, 8), 2, 2, 3, 3)
    assert instance_metrics(empty, empty)["mean_ap"] == 1.0
    assert instance_metrics(empty, empty)["f1_at_0.5"] == 1.0
    assert instance_metrics(empty, empty)["aji"] == 1.0
    for pred, ref in ((empty, one), (one, empty)):
        metrics = instance_metrics(pred, ref)
        assert (metrics["mean_ap"], metrics["f1_at_0.5"], metrics["aji"]) == (0.0, 0.0, 0.0)


def test_connected_components_baseline_respects_connectivity():
    mask = np.zeros((6, 6), dtype=bool)
    mask[0:2, 0:2] = True
    mask[2:4, 2:4] = True  # touches the first square only at a corner
    assert instances_from_semantic(mask, connectivity=1).max() == 2
    assert instances_from_semantic(mask, connectivity=2).max() == 1
    with pytest.raises(ValueError, match="connectivity"):
        instances_from_semantic(mask, connectivity=3)


def test_instance_inputs_are_checked():
    with pytest.raises(ValueError, match="shape"):
        match_instances(np.zeros((4, 4), int), np.zeros((4, 5), int))
    with pytest.raises(ValueError, match="instances_from_semantic"):
        match_instances(np.zeros((4, 4)), np.zeros((4, 4), int))


def test_real_nuclei_against_their_own_connected_components():
    if not DSB_INSTANCES.exists():
        pytest.skip(f"{DSB_INSTANCES} is not available")
    ref = np.array(Image.open(DSB_INSTANCES))
    assert ref.dtype == np.uint16
    pred = instances_from_semantic(ref > 0)
    metrics = instance_metrics(pred, ref)
    # Touching nuclei become one component: merges appear, nothing is split, AP drops below 1.
    assert metrics["merges"] >= 1 and metrics["splits"] == 0
    assert metrics["n_pred"] < metrics["n_ref"]
    assert 0.0 < metrics["mean_ap"] < 1.0
    assert list(metrics) == ["mean_ap", "f1_at_0.5", "aji", "splits", "merges", "n_pred", "n_ref"]
    assert len(DSB_THRESHOLDS) == 10


# ---------------------------------------------------------------------------------------------
# Membranes


def _two_cells(shape=(32, 32), column=16) -> np.ndarray:
    """Two cells separated by a one-pixel membrane line that runs the full height."""
    membrane = np.zeros(shape, dtype=bool)
    membrane[:, column] = True
    return membrane


def test_identical_membrane_maps_have_no_error():
    ref = _em_reference()
    assert membrane_metrics(ref, ref.copy()) == {"rand_error": 0.0, "warping_error": 0.0, "pixel_error": 0.0}


def test_cells_are_four_connected():
    membrane = np.ones((3, 3), dtype=bool)
    membrane[0, 0] = membrane[1, 1] = False  # diagonal neighbours: two cells
    assert cells_of(membrane).max() == 2


@pytest.mark.parametrize("gap", [1, 3])
def test_gap_in_membrane_merging_two_cells_is_a_topological_error(gap):
    ref = _two_cells()
    pred = ref.copy()
    pred[10:10 + gap, 16] = False
    warped = warp_reference(pred, ref)
    assert warped.error == pytest.approx(gap / ref.size)
    assert warping_error(pred, ref) == pytest.approx(gap / ref.size)
    assert count_topological_errors(warped) == {"splits": 0, "merges": gap, "other": 0}
    assert rand_error(pred, ref) > 0.1  # two cells of 496 pixels scored as one
    assert pixel_error(pred, ref) > 0.0


def test_shifted_boundary_costs_pixels_but_no_topology():
    ref = _two_cells(column=16)
    pred = _two_cells(column=17)
    assert warping_error(pred, ref) == 0.0
    # Cells positive: TP 30*32, FP 32 (old line), FN 32 (new line) -> F = 1920 / 1984.
    assert pixel_error(pred, ref) == pytest.approx(1 - 1920 / 1984)


def test_cut_through_a_cell_leaves_one_split_pixel():
    ref = np.zeros((20, 20), dtype=bool)
    pred = ref.copy()
    pred[8, :] = True  # a membrane line across the single reference cell
    warped = warp_reference(pred, ref)
    assert count_topological_errors(warped) == {"splits": 1, "merges": 0, "other": 0}


def test_opening_or_closing_a_ring_cell_is_neither_split_nor_merge():
    ring = np.ones((9, 9), dtype=bool)  # membrane everywhere but a one-pixel-wide square ring of cell
    ring[2, 2:7] = ring[6, 2:7] = ring[2:7, 2] = ring[2:7, 6] = False
    cut = ring.copy()
    cut[2, 4] = True
    for pred, ref in ((cut, ring), (ring, cut)):
        warped = warp_reference(pred, ref)
        assert warped.error == pytest.approx(1 / ring.size)
        assert count_topological_errors(warped) == {"splits": 0, "merges": 0, "other": 1}


def test_warping_keeps_reference_topology_and_stops_at_non_simple_pixels():
    ref = _em_reference()
    pred = ndimage.binary_erosion(ref, iterations=2) | ndimage.binary_dilation(np.roll(ref, 3, axis=0)) & ~ref
    warped = warp_reference(pred, ref)
    # Only simple flips: the warped reference has as many cells and membrane pieces as the reference.
    # Outside the image counts as membrane, so membrane pieces are counted with that frame.
    eight = ndimage.generate_binary_structure(2, 2)
    assert cells_of(warped.warped_membrane).max() == cells_of(ref).max()
    framed = [np.pad(m, 1, constant_values=True) for m in (warped.warped_membrane, ref)]
    assert ndimage.label(framed[0], eight)[1] == ndimage.label(framed[1], eight)[1]
    # What is left disagrees with the prediction and cannot be flipped.
    np.testing.assert_array_equal(warped.mismatches, warped.warped_membrane != pred)
    cells = np.pad(~warped.warped_membrane, 1)
    rows, cols = np.nonzero(warped.mismatches)
    codes = sum(
        cells[rows + 1 + dr, cols + 1 + dc].astype(int) << bit for bit, (dr, dc) in enumerate(_NEIGHBOUR_OFFSETS)
    )
    assert not _SIMPLE[codes].any()
    assert 0.0 < warped.error < np.mean(pred != ref)


def test_simple_point_table_matches_the_challenge_3d_criterion():
    """The challenge's code embeds the 3x3 patch in the middle of an empty 3x3x3 block and tests 3D
    simplicity with 6-connected cells and 26-connected background (Bertrand & Malandain's T6 and T26)."""
    six, twenty_six = ndimage.generate_binary_structure(3, 1), ndimage.generate_binary_structure(3, 3)
    n26 = np.ones((3, 3, 3), dtype=bool)
    n26[1, 1, 1] = False
    n18 = n26.copy()
    n18[np.ix_((0, 2), (0, 2), (0, 2))] = False
    touching_centre = np.zeros((3, 3, 3), dtype=bool)
    for axis, side in itertools.product(range(3), (0, 2)):
        index = [1, 1, 1]
        index[axis] = side
        touching_centre[tuple(index)] = True
    for code in range(256):
        cell = np.zeros((3, 3, 3), dtype=bool)
        for bit, (dr, dc) in enumerate(_NEIGHBOUR_OFFSETS):
            cell[1, 1 + dr, 1 + dc] = bool(code >> bit & 1)
        cell_groups, _ = ndimage.label(cell & n18, six)
        t6 = len(set(cell_groups[touching_centre & (cell_groups > 0)].tolist()))
        _, t26 = ndimage.label(~cell & n26, twenty_six)
        assert _SIMPLE[code] == (t6 == 1 and t26 == 1), code
    assert 0 < np.count_nonzero(_SIMPLE) < 256


def test_rand_error_is_scikit_image_adapted_rand_where_definitions_coincide():
    rng = np.random.default_rng(3)
    for seed in range(4):
        ref = _blobs(seed, shape=(48, 48))
        pred = _blobs(seed + 10, shape=(48, 48))
        pred[pred == 0] = pred.max() + 1  # no predicted boundary: nothing to treat as singletons
        expected = adapted_rand_error(ref, pred, ignore_labels=(0,))[0]
        assert foreground_restricted_rand_error(pred, ref, count_self_pairs=False) == pytest.approx(expected)
    # With predicted boundary pixels: scikit-image sees them as singletons once each gets its own id.
    ref = rng.integers(0, 5, size=(30, 30))
    pred = rng.integers(0, 4, size=(30, 30))
    singletons = pred.copy()
    singletons[pred == 0] = 100 + np.arange(np.count_nonzero(pred == 0))
    expected = adapted_rand_error(ref, singletons, ignore_labels=(0,))[0]
    assert foreground_restricted_rand_error(pred, ref, count_self_pairs=False) == pytest.approx(expected)


def test_rand_error_counts_ordered_pairs_with_replacement_by_default():
    rng = np.random.default_rng(4)
    ref = rng.integers(0, 3, size=(5, 5)).ravel()
    pred = rng.integers(0, 3, size=(5, 5)).ravel()
    inside = np.flatnonzero(ref)
    both = ref_together = pred_together = 0
    for a, b in itertools.product(inside, inside):
        same_pred = a == b or (pred[a] != 0 and pred[a] == pred[b])
        same_ref = ref[a] == ref[b]
        both += same_pred and same_ref
        ref_together += same_ref
        pred_together += same_pred
    expected = 1 - 2 * both / (ref_together + pred_together)
    assert foreground_restricted_rand_error(pred, ref) == pytest.approx(expected)


def test_rand_error_on_a_real_slice_agrees_with_scikit_image():
    ref = _em_reference()
    ref_cells = cells_of(ref)
    # Thinner membranes: predicted membrane lies inside reference membrane, the definitions coincide.
    eroded = ndimage.binary_erosion(ref)
    expected = adapted_rand_error(ref_cells, cells_of(eroded), ignore_labels=(0,))[0]
    distinct_pairs = foreground_restricted_rand_error(cells_of(eroded), ref_cells, count_self_pairs=False)
    assert distinct_pairs == pytest.approx(expected)
    assert rand_error(eroded, ref) == pytest.approx(expected, abs=1e-3)  # self pairs: a small shift
    assert expected > 0.1  # erosion opens thin membranes and merges cells
    # Thicker membranes: predicted membrane inside reference cells, one segment per pixel.
    dilated = ndimage.binary_dilation(ref)
    pred_cells = cells_of(dilated)
    singletons = pred_cells.copy()
    singletons[pred_cells == 0] = pred_cells.max() + 1 + np.arange(np.count_nonzero(pred_cells == 0))
    expected = adapted_rand_error(ref_cells, singletons, ignore_labels=(0,))[0]
    assert foreground_restricted_rand_error(pred_cells, ref_cells, count_self_pairs=False) == pytest.approx(expected)
    assert rand_error(dilated, ref) == pytest.approx(expected, abs=1e-3)


def test_maximal_errors_pick_the_best_threshold():
    ref = _two_cells()
    probability = np.where(ref, 0.8, 0.1)
    probability[5:9, 3:7] = 0.4  # a false membrane blob that only low thresholds keep
    assert maximal_rand_error(probability, ref) == 0.0
    assert maximal_pixel_error(probability, ref) == 0.0
    assert rand_error(probability >= 0.3, ref) > 0.0
    assert pixel_error(probability >= 0.3, ref) > 0.0


def test_pixel_error_scores_cell_interior_as_positive_class():
    ref = np.zeros((4, 4), dtype=bool)
    ref[:, 0] = True
    pred = np.zeros((4, 4), dtype=bool)
    pred[:, :2] = True
    # TP 8, FP 0, FN 4: precision 1, recall 2/3, F = 0.8.
    assert pixel_error(pred, ref) == pytest.approx(0.2)
    assert pixel_error(np.ones((4, 4), bool), np.ones((4, 4), bool)) == 0.0


def test_membrane_inputs_are_checked():
    with pytest.raises(ValueError, match="2D"):
        rand_error(np.zeros((2, 4, 4), bool), np.zeros((2, 4, 4), bool))
    with pytest.raises(ValueError, match="0/1"):
        warping_error(np.full((4, 4), 0.5), np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="shape"):
        pixel_error(np.zeros((4, 4), bool), np.zeros((4, 5), bool))
