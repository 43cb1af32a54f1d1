"""benchmarks/bench_plan_parity.py without nnU-Net: its comparisons find a difference where there is
one and none where there is none, and its dataset variants change what they say they change."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import blosc2
import numpy as np
import pytest
import SimpleITK as sitk

from autoseg.cli import main as autoseg_main

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def parity():
    sys.path.insert(0, str(BENCHMARKS))
    import bench_plan_parity

    yield bench_plan_parity
    sys.path.remove(str(BENCHMARKS))


def _as_nnunet(ws: Path, out: Path) -> tuple[dict, Path]:
    """autoseg's fingerprint, plans and arrays written the way nnU-Net writes its own, so the comparison
    has a partner that agrees everywhere until a test changes it."""
    fp = json.loads((ws / "fingerprint.json").read_text())
    plans = json.loads((ws / "plans.json").read_text())
    cases = sorted(fp["cases"], key=lambda c: c["case_id"])
    out.mkdir(parents=True)
    (out / "dataset_fingerprint.json").write_text(json.dumps({
        "spacings": [c["spacing"] for c in cases], "shapes_after_crop": [c["cropped_shape"] for c in cases],
        "median_relative_size_after_cropping": float(np.median([np.prod(c["cropped_shape"]) / np.prod(c["shape"])
                                                                for c in cases])),
        "foreground_intensity_properties_per_channel":
            {str(i): s for i, s in enumerate(fp["foreground_intensities"])}}))
    configurations = {}
    for name, c in plans["configurations"].items():
        configurations[name] = {
            "data_identifier": f"nnUNetPlans_{name}", "spacing": c["spacing"],
            "median_image_size_in_voxels": c["median_shape"], "patch_size": c["patch_size"],
            "batch_size": c["batch_size"], "batch_dice": c["batch_dice"],
            "normalization_schemes": ["ZScoreNormalization" for _ in plans["normalization"]],
            "use_mask_for_norm": [n["use_nonzero_mask"] for n in plans["normalization"]],
            "architecture": {
                "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                "arch_kwargs": {"strides": c["strides"], "kernel_sizes": c["kernel_sizes"],
                                "features_per_stage": c["features_per_stage"],
                                "n_conv_per_stage": [2] * len(c["strides"]),
                                "n_conv_per_stage_decoder": [2] * (len(c["strides"]) - 1)}}}
        shutil.copytree(ws / "preprocessed" / c["data_identifier"], out / f"nnUNetPlans_{name}",
                        ignore=shutil.ignore_patterns("*.json"))
    nnunet_plans = {"configurations": configurations, "transpose_forward": plans["transpose_forward"],
                    "foreground_intensity_properties_per_channel": {}}
    (out / "nnUNetPlans.json").write_text(json.dumps(nnunet_plans))
    return nnunet_plans, out


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    from tests.conftest import synthetic_case, write_sitk  # noqa: F401  (conftest helpers)

    root = tmp_path_factory.mktemp("parity")
    dataset = root / "Task98_Tiny"
    training = []
    for i in range(4):
        image, label = synthetic_case((10, 14, 12), 1, "mri", 2, seed=i)
        write_sitk(dataset / "imagesTr" / f"case_{i:03d}.nii.gz", image[0], (1.0, 1.0, 1.0))
        write_sitk(dataset / "labelsTr" / f"case_{i:03d}.nii.gz", label, (1.0, 1.0, 1.0))
        training.append({"image": f"./imagesTr/case_{i:03d}.nii.gz", "label": f"./labelsTr/case_{i:03d}.nii.gz"})
    (dataset / "dataset.json").write_text(json.dumps({
        "name": "Tiny", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "a", "2": "b"},
        "numTraining": 4, "training": training}))
    ws = root / "ws"
    assert autoseg_main(["plan", str(dataset), "-o", str(ws), "--workers", "0", "--configs", "3d_fullres"]) == 0
    return dataset, ws


def test_identical_outputs_compare_as_identical(parity, planned, tmp_path):
    _, ws = planned
    nnunet_plans, pre = _as_nnunet(ws, tmp_path / "nnunet")
    fp = parity.compare_fingerprints(json.loads((ws / "fingerprint.json").read_text()),
                                     json.loads((pre / "dataset_fingerprint.json").read_text()))
    assert fp["problems"] == []
    arrays = parity.compare_arrays(ws, json.loads((ws / "plans.json").read_text()), pre, nnunet_plans, 0)
    summary = parity.array_summary(arrays["3d_fullres"])
    assert summary["cases"] == summary["same_shape"] == 4
    assert summary["data_max_abs_diff"] == 0.0 and summary["seg_agreement_min"] == 1.0


def test_a_changed_voxel_a_changed_label_and_a_changed_shape_are_each_reported(parity, planned, tmp_path):
    _, ws = planned
    nnunet_plans, pre = _as_nnunet(ws, tmp_path / "nnunet")
    folder = pre / "nnUNetPlans_3d_fullres"
    data = blosc2.open(str(folder / "case_000.b2nd"))[...]
    data[0, 3, 4, 5] += 0.25
    blosc2.asarray(data, urlpath=str(folder / "case_000.b2nd"), mode="w")
    seg = blosc2.open(str(folder / "case_001_seg.b2nd"))[...]
    seg[0][seg[0] == 2] = 1  # label 2 of case_001 read as label 1
    blosc2.asarray(seg, urlpath=str(folder / "case_001_seg.b2nd"), mode="w")
    fp_path = pre / "dataset_fingerprint.json"
    fp = json.loads(fp_path.read_text())
    fp["shapes_after_crop"][2] = [s + 1 for s in fp["shapes_after_crop"][2]]
    fp_path.write_text(json.dumps(fp))

    rows = {r["case_id"]: r for r in parity.compare_arrays(ws, json.loads((ws / "plans.json").read_text()), pre,
                                                           nnunet_plans, 0)["3d_fullres"]}
    assert rows["case_000"]["data_max_abs_diff"] == pytest.approx(0.25) and rows["case_000"]["seg_agreement"] == 1.0
    assert rows["case_001"]["data_max_abs_diff"] == 0.0 and rows["case_001"]["seg_agreement"] < 1.0
    assert rows["case_001"]["seg_dice"]["2"] == 0.0
    problems = parity.compare_fingerprints(json.loads((ws / "fingerprint.json").read_text()), fp)["problems"]
    assert problems == ["shape after cropping differs in 1 case(s): case_002"]


def test_plan_differences_are_listed_by_field(parity, planned, tmp_path):
    _, ws = planned
    nnunet_plans, _ = _as_nnunet(ws, tmp_path / "nnunet")
    nnunet_plans["configurations"]["3d_fullres"]["batch_size"] += 1
    ours = parity.summarize_autoseg(json.loads((ws / "plans.json").read_text()))
    theirs = parity.summarize_nnunet(nnunet_plans)
    diffs = parity.differences(ours, theirs, parity.INTENSITY_RTOL)
    assert len(diffs) == 1 and diffs[0].startswith("3d_fullres batch_size")


def test_variant_respaces_one_axis_per_case_and_renames_channels(parity, planned, tmp_path):
    dataset, _ = planned
    variant = parity.dataset_variant(dataset, tmp_path / "variant", [1.0, 4.0], ["CT"], axis=0)
    assert json.loads((variant / "dataset.json").read_text())["modality"] == {"0": "CT"}
    for i, factor in enumerate([1.0, 4.0, 1.0, 4.0]):
        for sub in ("imagesTr", "labelsTr"):
            image = sitk.ReadImage(str(variant / sub / f"case_{i:03d}.nii.gz"))
            assert image.GetSpacing() == pytest.approx((factor, 1.0, 1.0))
            original = sitk.ReadImage(str(dataset / sub / f"case_{i:03d}.nii.gz"))
            assert np.array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(original))
    renamed_only = parity.dataset_variant(dataset, tmp_path / "renamed", None, ["T1"])
    assert (renamed_only / "imagesTr" / "case_000.nii.gz").is_symlink()
    with pytest.raises(parity.BenchError, match="1 channel"):
        parity.dataset_variant(dataset, tmp_path / "wrong", None, ["T1", "T2"])


def test_without_nnunet_it_says_how_to_get_it(parity, planned, tmp_path, capsys):
    dataset, _ = planned
    assert parity.main([str(dataset), "--nnunet-venv", str(tmp_path / "no_venv")]) == 2
    assert "nnUNetv2_plan_and_preprocess" in capsys.readouterr().err


def test_as_tiff_keeps_voxels_and_spacing_through_json_files(parity, planned, tmp_path):
    from autoseg.dataset.layout import load_dataset, read_case_image, read_case_label

    dataset, _ = planned
    variant = parity.dataset_variant(dataset, tmp_path / "variant", [1.0, 4.0], None)  # z spacing 1, 4, 1, 4
    tiff = parity.as_tiff_stacks(variant, tmp_path / "tiff")
    assert tiff.name == "Dataset996_TinyTiff" and (tiff / "imagesTr" / "case_001.json").is_file()
    original, stacks = load_dataset(variant), load_dataset(tiff)
    assert [c.case_id for c in stacks.cases] == [c.case_id for c in original.cases]
    for a, b in zip(original.cases, stacks.cases):
        (image_a, geometry_a), (image_b, geometry_b) = read_case_image(a, 1), read_case_image(b, 1)
        np.testing.assert_array_equal(image_a, image_b)
        np.testing.assert_array_equal(read_case_label(a), read_case_label(b))
        assert geometry_b.spacing == pytest.approx(geometry_a.spacing)
    assert {read_case_image(c, 1)[1].spacing[0] for c in stacks.cases} == {1.0, 4.0}


def test_as_decathlon_4d_puts_every_channel_in_one_file_with_the_geometry(parity, make_nnunetv2, tmp_path):
    from autoseg.dataset.layout import load_dataset, read_case_image, read_case_label

    source = make_nnunetv2(tmp_path / "Dataset097_Two", n_cases=2, spacing=(2.0, 0.8, 0.8))  # channels T1, T2
    four_d = parity.as_decathlon_4d(source, tmp_path / "out")
    assert four_d.name == "Task96_Two4D"
    original, converted = load_dataset(source), load_dataset(four_d)
    assert converted.layout == "decathlon" and converted.channel_names == ("T1", "T2")
    assert sitk.ReadImage(str(converted.cases[0].image_files[0])).GetDimension() == 4
    for a, b in zip(original.cases, converted.cases):
        (image_a, geometry_a), (image_b, geometry_b) = read_case_image(a, 2), read_case_image(b, 2)
        np.testing.assert_array_equal(image_a, image_b)
        np.testing.assert_array_equal(read_case_label(a), read_case_label(b))
        assert geometry_b.spacing == pytest.approx(geometry_a.spacing)


def test_nnunet_v2_folder_of_any_name_is_linked_under_a_dataset_name_nnunet_finds(make_nnunetv2, tmp_path):
    """bench_plan.py's staging (used by bench_train, bench_predict and bench_accuracy): a split made into a plain
    folder gets a DatasetNNN_Name link; a folder named that way keeps its id."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from bench_plan import stage_nnunet_raw
    finally:
        sys.path.remove(str(BENCHMARKS))
    plain = make_nnunetv2(tmp_path / "train")
    meta = json.loads((plain / "dataset.json").read_text())
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw2").mkdir()
    dataset_id, name, _ = stage_nnunet_raw(plain, meta, tmp_path / "raw", None, tmp_path, {})
    assert (dataset_id, name) == (999, "Dataset999_train") and (tmp_path / "raw" / name / "dataset.json").is_file()
    named = make_nnunetv2(tmp_path / "Dataset042_Liver")
    assert stage_nnunet_raw(named, meta, tmp_path / "raw2", None, tmp_path, {})[:2] == (42, "Dataset042_Liver")
