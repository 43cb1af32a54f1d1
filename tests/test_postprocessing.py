import numpy as np
import pytest
import SimpleITK as sitk

from autoseg.postprocessing import (
    PostprocessingError,
    apply_postprocessing,
    decide_postprocessing,
    decide_postprocessing_from_folders,
    keep_largest_component,
    load_postprocessing_rules,
    no_postprocessing,
    save_postprocessing_rules,
)


def test_keep_largest_component_removes_a_small_island():
    mask = np.zeros((10, 10, 10), bool)
    mask[1:5, 1:5, 1:5] = True
    mask[8, 8, 8] = True
    kept = keep_largest_component(mask)
    assert kept.sum() == 64 and not kept[8, 8, 8]
    assert not keep_largest_component(np.zeros((3, 3, 3), bool)).any()


def test_diagonal_neighbours_belong_to_the_same_component():
    mask = np.zeros((5, 5, 5), bool)
    mask[1, 1, 1] = mask[2, 2, 2] = mask[3, 3, 3] = True  # corner-touching voxels: one component
    assert keep_largest_component(mask).sum() == 3


def test_components_tied_for_the_largest_size_are_all_kept():
    mask = np.zeros((9, 9, 9), bool)
    mask[0:2, 0:2, 0:2] = True
    mask[6:8, 6:8, 6:8] = True  # as large as the first: nnU-Net keeps both
    mask[4, 0, 8] = True
    kept = keep_largest_component(mask)
    assert kept.sum() == 16 and not kept[4, 0, 8]


def test_apply_postprocessing_foreground_then_label_rules():
    seg = np.zeros((12, 12, 12), np.uint8)
    seg[1:6, 1:6, 1:6] = 1
    seg[3:5, 3:5, 6:8] = 2  # touches label 1: part of the main foreground component
    seg[10, 10, 10] = 2     # a detached island of label 2
    seg[8, 1:3, 1:3] = 1    # a detached island of label 1
    rules = {"format_version": 1, "foreground_largest_component": True, "largest_component_labels": []}
    out = apply_postprocessing(seg, rules)
    assert out[10, 10, 10] == 0 and out[8, 1, 1] == 0 and (out == 2).sum() == 8
    assert seg[10, 10, 10] == 2  # input untouched

    seg2 = np.zeros((12, 12, 12), np.uint8)
    seg2[1:6, 1:6, 1:6] = 1
    seg2[9:11, 9:11, 9:11] = 2
    seg2[1, 9, 9] = 2
    out2 = apply_postprocessing(seg2, {"format_version": 1, "foreground_largest_component": False,
                                       "largest_component_labels": [2]})
    assert out2[1, 9, 9] == 0 and (out2 == 2).sum() == 8 and (out2 == 1).sum() == 125
    assert np.array_equal(apply_postprocessing(seg2, no_postprocessing()), seg2)


def test_rules_with_unknown_format_version_are_refused():
    with pytest.raises(PostprocessingError, match="format_version"):
        apply_postprocessing(np.zeros((2, 2, 2)), {"format_version": 99, "foreground_largest_component": True,
                                                   "largest_component_labels": []})


def spurious_island_cases(n=4):
    cases = []
    for i in range(n):
        ref = np.zeros((16, 16, 16), np.uint8)
        ref[2:8, 2:8, 2:8] = 1
        ref[4:6, 4:6, 8:11] = 2
        pred = ref.copy()
        pred[13:15, 13:15, 13 - i % 2:15] = 1 + i % 2  # false-positive islands far from the organ
        cases.append((pred, ref))
    return cases


def test_decision_enables_largest_component_when_predictions_have_spurious_islands():
    rules = decide_postprocessing(spurious_island_cases(), labels=[1, 2])
    assert rules["foreground_largest_component"] is True
    assert rules["dice_after"]["foreground_mean"] == pytest.approx(1.0)
    assert rules["dice_before"]["foreground_mean"] < 1.0
    assert "enabled" in rules["reasons"]["foreground"]
    # after the foreground rule, no label has islands left: no label rule adds anything
    assert rules["largest_component_labels"] == []
    pred, ref = spurious_island_cases()[1]
    assert np.array_equal(apply_postprocessing(pred, rules), ref)


def test_decision_keeps_structures_that_truly_have_two_components():
    cases = []
    for shift in range(3):
        ref = np.zeros((16, 16, 16), np.uint8)
        ref[2:7, 2:7, 2:7] = 1
        ref[10:13, 10:13, 10:13] = 1  # label 1 really has two parts (e.g. two kidneys)
        pred = ref.copy()
        pred[2:7, 2:7, 7] = 1 if shift else 0  # small boundary errors, no islands
        cases.append((pred, ref))
    rules = decide_postprocessing(cases, labels=[1])
    assert rules["foreground_largest_component"] is False
    assert rules["largest_component_labels"] == []
    assert "disabled" in rules["reasons"]["foreground"] and "disabled" in rules["reasons"]["1"]
    assert rules["dice_after"] == rules["dice_before"]


def test_label_rule_is_chosen_on_its_own_when_the_foreground_rule_would_hurt():
    cases = []
    for _ in range(3):
        ref = np.zeros((16, 16, 16), np.uint8)
        ref[2:7, 2:7, 2:7] = 1
        ref[10:13, 10:13, 10:13] = 2  # label 2 is a separate structure: foreground has two parts
        pred = ref.copy()
        pred[14, 1, 14] = 2  # a spurious island of label 2
        cases.append((pred, ref))
    rules = decide_postprocessing(cases, labels=[1, 2])
    assert rules["foreground_largest_component"] is False
    assert rules["largest_component_labels"] == [2]
    assert rules["dice_after"]["2"] == pytest.approx(1.0)


def test_foreground_rule_is_judged_on_the_mean_of_the_labels_dice_as_nnunet():
    """A detached true structure predicted with the wrong label: removing it lowers the binary foreground
    Dice but raises label 2's Dice and lowers no label's, so nnU-Net's criterion adopts the rule."""
    cases = []
    for _ in range(3):
        ref = np.zeros((16, 16, 16), np.uint8)
        ref[2:8, 2:8, 2:8] = 1
        ref[3:6, 3:6, 8:10] = 2
        ref[11:14, 11:14, 11:14] = 1
        pred = ref.copy()
        pred[11:14, 11:14, 11:14] = 2  # the second part of label 1, predicted as label 2
        cases.append((pred, ref))
    rules = decide_postprocessing(cases, labels=[1, 2])
    assert rules["foreground_largest_component"] is True
    assert rules["dice_after"]["1"] == rules["dice_before"]["1"]
    assert rules["dice_after"]["2"] == pytest.approx(1.0) and rules["dice_before"]["2"] < 1.0
    assert rules["dice_after"]["foreground_mean"] == pytest.approx((rules["dice_after"]["1"] + 1.0) / 2)


def test_rules_round_trip_through_postprocessing_json(tmp_path):
    rules = decide_postprocessing(spurious_island_cases(2), labels=[1, 2])
    save_postprocessing_rules(tmp_path / "postprocessing.json", rules)
    assert load_postprocessing_rules(tmp_path / "postprocessing.json") == rules


def test_decision_from_folders(tmp_path):
    (tmp_path / "pred").mkdir()
    (tmp_path / "ref").mkdir()
    for i, (pred, ref) in enumerate(spurious_island_cases(3)):
        sitk.WriteImage(sitk.GetImageFromArray(pred), str(tmp_path / "pred" / f"case_{i}.nii.gz"))
        sitk.WriteImage(sitk.GetImageFromArray(ref), str(tmp_path / "ref" / f"case_{i}.nii.gz"))
    rules = decide_postprocessing_from_folders(tmp_path / "pred", tmp_path / "ref", labels=[1, 2])
    assert rules["foreground_largest_component"] is True and rules["num_cases"] == 3
