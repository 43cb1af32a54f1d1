import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.distance import cdist

from autoseg.evaluation import (
    EvaluationError,
    dice,
    evaluate_case,
    evaluate_folders,
    format_summary_table,
    hausdorff95,
    iou,
    volume_ml,
)


def cube(shape=(12, 12, 12), start=(2, 2, 2), size=4):
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(s, s + size) for s in start)] = True
    return mask


def test_cubes_overlapping_by_half_have_dice_half_and_iou_third():
    ref = cube(start=(2, 2, 2))
    pred = cube(start=(2, 2, 4))  # shifted by half its width along x
    assert dice(pred, ref) == pytest.approx(0.5)
    assert iou(pred, ref) == pytest.approx(32 / 96)
    assert dice(ref, ref) == 1.0 and iou(ref, ref) == 1.0


def test_empty_cases_are_undefined_not_perfect():
    empty, full = np.zeros((5, 5, 5), bool), cube(shape=(5, 5, 5), start=(1, 1, 1), size=2)
    assert math.isnan(dice(empty, empty)) and math.isnan(iou(empty, empty))
    assert dice(empty, full) == 0.0 and dice(full, empty) == 0.0 and iou(full, empty) == 0.0
    assert math.isnan(hausdorff95(empty, full, (1, 1, 1)))
    assert math.isnan(hausdorff95(full, empty, (1, 1, 1)))
    assert math.isnan(hausdorff95(empty, empty, (1, 1, 1)))


@pytest.mark.parametrize("axis, shift", [(0, 2), (1, 3), (2, 1)])
def test_hd95_of_shifted_cube_is_shift_times_spacing_along_that_axis(axis, shift):
    spacing = (3.0, 0.7, 0.5)
    ref = cube(shape=(20, 20, 20), start=(4, 4, 4), size=6)
    start = [4, 4, 4]
    start[axis] += shift
    pred = cube(shape=(20, 20, 20), start=tuple(start), size=6)
    assert hausdorff95(pred, ref, spacing) == pytest.approx(shift * spacing[axis])
    assert hausdorff95(ref, ref, spacing) == 0.0


def brute_force_hd95(pred, ref, spacing):
    from scipy import ndimage

    def surface_points(mask):
        eroded = ndimage.binary_erosion(mask, ndimage.generate_binary_structure(3, 1), border_value=0)
        return np.argwhere(mask & ~eroded) * np.asarray(spacing)

    d = cdist(surface_points(pred), surface_points(ref))
    return np.percentile(np.concatenate([d.min(axis=1), d.min(axis=0)]), 95)


def test_hd95_cropping_matches_brute_force_on_irregular_shapes_touching_the_border():
    rng = np.random.default_rng(0)
    spacing = (2.5, 0.8, 1.1)
    for _ in range(3):
        ref = np.zeros((16, 18, 20), bool)
        pred = np.zeros_like(ref)
        for mask in (ref, pred):
            for _ in range(3):
                lo = rng.integers(0, 12, size=3)
                hi = lo + rng.integers(2, 8, size=3)
                mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = True
        assert hausdorff95(pred, ref, spacing) == pytest.approx(brute_force_hd95(pred, ref, spacing))


def test_volume_in_millilitres_uses_spacing():
    mask = np.zeros((20, 20, 20), bool)
    mask[:10, :10, :10] = True  # 1000 voxels of 2 * 1 * 0.5 = 1 mm^3
    assert volume_ml(mask, (2.0, 1.0, 0.5)) == pytest.approx(1.0)
    assert volume_ml(np.zeros((3, 3, 3)), (1, 1, 1)) == 0.0


def test_evaluate_case_reports_per_label_metrics_and_voxel_counts():
    ref = np.zeros((10, 10, 10), np.uint8)
    pred = np.zeros_like(ref)
    ref[cube((10, 10, 10), (1, 1, 1), 4)] = 1
    pred[cube((10, 10, 10), (1, 1, 3), 4)] = 1
    pred[8, 8, 8] = 2  # label 2 predicted where the reference has none
    result = evaluate_case(pred, ref, (1.0, 1.0, 1.0), labels=[1, 2, 3])
    assert result["1"]["dice"] == pytest.approx(0.5)
    assert (result["1"]["tp"], result["1"]["fp"], result["1"]["fn"]) == (32, 32, 32)
    assert result["1"]["ref_volume_ml"] == pytest.approx(0.064)
    assert result["2"]["dice"] == 0.0 and result["2"]["fp"] == 1 and math.isnan(result["2"]["hd95_mm"])
    assert math.isnan(result["3"]["dice"]) and result["3"]["pred_volume_ml"] == 0.0


def write(path, array, spacing=(1.0, 1.0, 1.0)):
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing(tuple(reversed(spacing)))
    sitk.WriteImage(image, str(path))


@pytest.fixture
def folders(tmp_path):
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    pred_dir.mkdir()
    ref_dir.mkdir()
    spacing = (2.0, 1.0, 1.0)
    # case_a: label 1 half-overlapping, label 2 perfect
    ref = np.zeros((8, 10, 10), np.uint8)
    ref[1:5, 1:5, 1:5] = 1
    ref[6:8, 6:9, 6:9] = 2
    pred = np.zeros_like(ref)
    pred[1:5, 1:5, 3:7] = 1
    pred[6:8, 6:9, 6:9] = 2
    write(ref_dir / "case_a.nii.gz", ref, spacing)
    write(pred_dir / "case_a.nii.gz", pred, spacing)
    # case_b: only label 1, predicted perfectly; label 2 absent in both (Dice undefined)
    ref = np.zeros((8, 10, 10), np.uint8)
    ref[2:6, 2:6, 2:6] = 1
    write(ref_dir / "case_b.nii.gz", ref, spacing)
    write(pred_dir / "case_b.nii.gz", ref, spacing)
    # case_c: a reference nobody predicted
    write(ref_dir / "case_c.nii.gz", ref, spacing)
    return pred_dir, ref_dir


def test_evaluate_folders_summarises_cases_labels_and_missing_predictions(folders, tmp_path):
    pred_dir, ref_dir = folders
    out = tmp_path / "eval"
    summary = evaluate_folders(pred_dir, ref_dir, output_dir=out)

    assert summary["labels"] == [1, 2]  # union of the reference labels
    assert summary["missing_predictions"] == ["case_c"]
    assert set(summary["cases"]) == {"case_a", "case_b"}
    assert summary["cases"]["case_a"]["1"]["dice"] == pytest.approx(0.5)
    assert summary["cases"]["case_b"]["2"]["dice"] is None  # both empty: undefined, null in JSON
    assert summary["mean"]["1"]["dice"] == pytest.approx(0.75)
    assert summary["mean"]["2"]["dice"] == pytest.approx(1.0)
    assert summary["mean"]["2"]["cases_used"]["dice"] == 1
    assert summary["foreground_mean"]["dice"] == pytest.approx((0.75 + 1.0) / 2)
    assert summary["cases"]["case_a"]["1"]["hd95_mm"] > 0

    assert json.loads((out / "summary.json").read_text()) == summary
    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4  # two cases x two labels
    row = next(r for r in rows if r["case_id"] == "case_b" and r["label"] == "2")
    assert row["dice"] == "" and row["tp"] == "0"

    table = format_summary_table(summary, label_names={"1": "tumour"})
    assert "tumour" in table and "foreground mean" in table and "0.7500" in table


def test_evaluate_folders_with_workers_and_explicit_labels(folders, tmp_path):
    pred_dir, ref_dir = folders
    summary = evaluate_folders(pred_dir, ref_dir, labels=[1], output_dir=tmp_path / "eval", workers=2)
    assert summary["labels"] == [1]
    assert list(summary["cases"]["case_a"]) == ["1"]
    assert summary["mean"]["1"]["dice"] == pytest.approx(0.75)


def test_geometry_mismatch_names_the_prediction_file(folders, tmp_path):
    pred_dir, ref_dir = folders
    write(pred_dir / "case_b.nii.gz", np.zeros((8, 10, 10), np.uint8), spacing=(3.0, 1.0, 1.0))
    with pytest.raises(EvaluationError, match="case_b.nii.gz.*geometry.*spacing"):
        evaluate_folders(pred_dir, ref_dir, output_dir=tmp_path / "eval")


def test_prediction_without_reference_is_an_error(folders, tmp_path):
    pred_dir, ref_dir = folders
    write(pred_dir / "stray.nii.gz", np.zeros((8, 10, 10), np.uint8))
    with pytest.raises(EvaluationError, match="stray.nii.gz"):
        evaluate_folders(pred_dir, ref_dir, output_dir=tmp_path / "eval")


def test_a_2d_image_is_measured_in_2d_not_across_its_pseudo_slice():
    """PNG inputs are read as one slice 999 'mm' thick: distances stay in-plane, areas count a 1 mm slab."""
    from autoseg.evaluation import evaluate_case

    ref = np.zeros((1, 20, 20), np.uint8)
    ref[0, 5:15, 5:15] = 1
    pred = np.zeros_like(ref)
    pred[0, 5:15, 8:18] = 1  # shifted 3 px to the right
    flat = evaluate_case(pred, ref, (999.0, 0.5, 0.5), [1])["1"]
    plain = evaluate_case(pred[0], ref[0], (0.5, 0.5), [1])["1"]
    assert flat["hd95_mm"] == pytest.approx(plain["hd95_mm"]) and flat["hd95_mm"] <= 1.5
    assert flat["ref_volume_ml"] == pytest.approx(100 * 0.25 / 1000)


# ---------------------------------------------------------------------------------------------
# What a person reads: label names and undefined values in words


def table_rows(table):
    """First cell (the label) -> the rest of the row, for the rows of the printed table."""
    return {line.split("  ")[0].strip(): line for line in table.splitlines()[2:]}


def test_evaluate_prints_names_given_as_id_equals_name(folders, tmp_path, capsys):
    from autoseg.cli import main

    pred_dir, ref_dir = folders
    out = tmp_path / "eval"
    assert main(["evaluate", str(pred_dir), str(ref_dir), "--labels", "1=liver", "2", "-o", str(out),
                 "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    rows = table_rows(printed)
    assert "liver" in rows and "2" in rows  # label 2 has no name anywhere: its id is shown
    assert "label names from --labels" in printed

    summary = json.loads((out / "summary.json").read_text())
    assert summary["label_names"] == {"1": "liver"}
    assert summary["mean"]["1"]["name"] == "liver" and summary["mean"]["2"]["name"] is None
    assert summary["mean"]["1"]["dice"] == pytest.approx(0.75)  # id keys unchanged
    with open(out / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {(r["label"], r["label_name"]) for r in rows} == {("1", "liver"), ("2", "")}


def test_evaluate_rejects_a_labels_item_that_is_neither_id_nor_id_equals_name(folders, capsys):
    from autoseg.cli import main

    pred_dir, ref_dir = folders
    with pytest.raises(SystemExit):
        main(["evaluate", str(pred_dir), str(ref_dir), "--labels", "liver"])
    assert "ID=NAME" in capsys.readouterr().err


# prediction_summary.json is what `autoseg predict` writes; prediction_report.json what earlier versions wrote.
@pytest.mark.parametrize("summary_file", ["prediction_summary.json", "prediction_report.json"])
def test_names_come_from_the_plans_of_the_workspace_that_predicted(folders, tmp_path, summary_file):
    pred_dir, ref_dir = folders
    workdir = tmp_path / "workspace"
    workdir.mkdir()
    (workdir / "plans.json").write_text(json.dumps({"labels": {"0": "background", "1": "liver", "2": "tumour"}}))
    (pred_dir / summary_file).write_text(json.dumps({"settings": {"workdir": str(workdir)}}))
    (ref_dir.parent / "dataset.json").write_text(json.dumps({"labels": {"0": "bg", "1": "other", "2": "names"}}))

    summary = evaluate_folders(pred_dir, ref_dir, output_dir=tmp_path / "eval")
    assert summary["label_names"] == {"1": "liver", "2": "tumour"}  # the plan wins over dataset.json
    assert summary["label_names_from"] == [str(workdir / "plans.json")]
    assert {"liver", "tumour"} <= set(table_rows(format_summary_table(summary)))


@pytest.mark.parametrize("where, labels", [
    ("parent", {"0": "background", "1": "liver", "2": "tumour"}),  # Decathlon: {id: name}
    ("folder", {"background": 0, "liver": 1, "tumour": 2, "whole": [1, 2]}),  # nnU-Net v2: {name: id}, a region
])
def test_names_come_from_the_dataset_json_beside_the_references(folders, tmp_path, where, labels):
    pred_dir, ref_dir = folders
    meta_dir = ref_dir.parent if where == "parent" else ref_dir
    (meta_dir / "dataset.json").write_text(json.dumps({"labels": labels}))

    summary = evaluate_folders(pred_dir, ref_dir, output_dir=tmp_path / "eval")
    assert summary["label_names"] == {"1": "liver", "2": "tumour"}
    rows = table_rows(format_summary_table(summary))
    assert "liver" in rows and "tumour" in rows and "1" not in rows


def test_without_any_source_labels_are_shown_by_id(folders, tmp_path):
    pred_dir, ref_dir = folders
    summary = evaluate_folders(pred_dir, ref_dir, output_dir=tmp_path / "eval")
    assert summary["label_names"] == {} and summary["label_names_from"] == []
    assert {"1", "2"} <= set(table_rows(format_summary_table(summary)))


@pytest.fixture
def absent_structures(tmp_path):
    """Label 1 found in both; label 2 only ever predicted (never in a reference); label 3 missed."""
    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "ref"
    pred_dir.mkdir()
    ref_dir.mkdir()
    for case, (pred_labels, ref_labels) in {"a": ((1, 2), (1, 3)), "b": ((1,), (1,))}.items():
        pred, ref = np.zeros((6, 8, 8), np.uint8), np.zeros((6, 8, 8), np.uint8)
        for image, labels in ((pred, pred_labels), (ref, ref_labels)):
            for label in labels:
                image[1:3, 2 * label - 1:2 * label + 1, 1:4] = label
        write(pred_dir / f"case_{case}.nii.gz", pred)
        write(ref_dir / f"case_{case}.nii.gz", ref)
    (ref_dir / "dataset.json").write_text(json.dumps({"labels": {"0": "background", "1": "liver", "2": "cyst",
                                                                 "3": "tumour"}}))
    return pred_dir, ref_dir


def test_absent_structures_read_as_words_not_nan(absent_structures, tmp_path):
    pred_dir, ref_dir = absent_structures
    summary = evaluate_folders(pred_dir, ref_dir, labels=[1, 2, 3], output_dir=tmp_path / "eval")
    assert summary["mean"]["2"]["hd95_mm"] is None  # JSON keeps null

    table = format_summary_table(summary)
    assert "nan" not in table.lower()
    rows = table_rows(table)
    assert "undefined" in rows["cyst"] and "undefined" in rows["tumour"]  # HD95 defined in no case
    assert "undefined" not in rows["liver"]
    assert "undefined: no case had the structure in both" in table  # the footnote says why
    assert "cyst: not in reference: case_a; absent in both: case_b" in table
    assert "tumour: missing in prediction: case_a; absent in both: case_b" in table


def test_a_label_in_no_image_has_undefined_dice_explained(absent_structures, tmp_path):
    pred_dir, ref_dir = absent_structures
    summary = evaluate_folders(pred_dir, ref_dir, labels=[1, 4], output_dir=tmp_path / "eval")
    table = format_summary_table(summary, label_names={"4": "spleen"})
    assert table_rows(table)["spleen"].split()[1:] == ["undefined", "undefined", "undefined", "0"]
    assert "undefined: no case to average; Dice and IoU need the structure in prediction or reference" in table
    assert "spleen: absent in both: case_a, case_b" in table


def test_training_validation_summary_prints_names_and_no_nan():
    """`autoseg train` prints validation/summary.json (written by training/validation.py) with this table."""
    from autoseg.evaluation import mean_per_label, nan_to_none

    ref = np.zeros((6, 8, 8), np.uint8)
    ref[1:4, 1:4, 1:4] = 1
    pred = ref.copy()
    pred[5, 6, 6] = 2  # a tumour voxel where the reference has none
    per_case = {"case_a": evaluate_case(pred, ref, (1, 1, 1), [1, 2])}
    mean = nan_to_none(mean_per_label(per_case, [1, 2]))
    for key, name in (("1", "liver"), ("2", "tumour")):
        mean[key]["name"] = name
    validation = {"num_cases": 1, "mean": mean, "foreground_mean_dice": 0.5, "cases": nan_to_none(per_case)}

    table = format_summary_table(validation)
    assert "nan" not in table.lower()
    assert table_rows(table)["liver"].split()[1] == "1.0000"
    assert "tumour: not in reference: case_a" in table


def test_no_predictions_names_every_accepted_format(tmp_path):
    (tmp_path / "pred").mkdir()
    (tmp_path / "ref").mkdir()
    with pytest.raises(EvaluationError, match=r"\.png.*\.tif.*\.jpg"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref")
