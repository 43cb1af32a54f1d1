"""The 3d cascade: planned with 3d_lowres, trained on its cross-validation predictions, predicted in two stages."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import synthetic_case, write_sitk

from autoseg import workspace
from autoseg.cli import main
from autoseg.training.cascade import (
    MoveSegAsOneHotToData,
    RandomBinaryOperator,
    RemoveRandomComponent,
    load_next_stage,
    next_stage_path,
)


def test_first_stage_labels_become_one_channel_per_foreground_label():
    data = np.zeros((2, 1, 4, 5, 6), np.float32)
    seg = np.zeros((2, 2, 4, 5, 6), np.int16)
    seg[:, 1, 0] = 2
    seg[:, 1, 1] = -1  # outside the volume: no label
    out = MoveSegAsOneHotToData([1, 2])(data=data, seg=seg)
    assert out["data"].shape == (2, 3, 4, 5, 6) and out["seg"].shape == (2, 1, 4, 5, 6)
    assert out["data"][:, 2, 0].all() and not out["data"][:, 1].any() and not out["data"][:, 2, 1:].any()


def test_binary_operators_keep_the_channels_exclusive_and_change_them():
    np.random.seed(0)
    data = np.zeros((4, 3, 20, 20, 20), np.float32)
    data[:, 1, 4:10, 4:10, 4:10] = 1
    data[:, 2, 10:16, 4:10, 4:10] = 1
    before = data.copy()
    out = RandomBinaryOperator(2, p_per_label=1.0, p_per_sample=1.0)(data=data)["data"]
    assert not np.array_equal(out, before)
    assert (out[:, 1:].sum(axis=1) <= 1).all()  # a voxel belongs to one label at most
    assert np.array_equal(out[:, 0], before[:, 0])  # the image channel is untouched


def test_a_random_small_component_is_removed_and_large_ones_kept():
    np.random.seed(0)
    data = np.zeros((1, 2, 20, 20, 20), np.float32)
    data[0, 1, :, :, :10] = 1          # half the patch: never removed
    data[0, 1, 2:4, 2:4, 15:17] = 1    # small
    out = RemoveRandomComponent(1, p_per_label=1.0, p_per_sample=1.0)(data=data.copy())["data"]
    assert out[0, 1, :, :, :10].all() and not out[0, 1, 2:4, 2:4, 15:17].any()


@pytest.fixture(scope="module")
def cascade_workspace(tmp_path_factory):
    """Five 40x48x44 cases planned at 0.02 GB, so 3d_lowres and the cascade are planned."""
    root = tmp_path_factory.mktemp("cascade")
    training = []
    for i in range(5):
        image, label = synthetic_case((40, 48, 44), 1, "mri", 2, seed=i)
        write_sitk(root / "ds" / "imagesTr" / f"case_{i:03d}.nii.gz", image[0])
        write_sitk(root / "ds" / "labelsTr" / f"case_{i:03d}.nii.gz", label)
        training.append({"image": f"./imagesTr/case_{i:03d}.nii.gz", "label": f"./labelsTr/case_{i:03d}.nii.gz"})
    (root / "ds" / "dataset.json").write_text(json.dumps({
        "name": "S", "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "a", "2": "b"},
        "numTraining": 5, "training": training}))
    ws = root / "ws"
    assert main(["plan", str(root / "ds"), "-o", str(ws), "--memory-gb", "0.02", "--configs", "3d_cascade_fullres",
                 "--workers", "1"]) == 0
    plans = json.loads((ws / "plans.json").read_text())
    for config in plans["configurations"].values():  # tiny networks: the test is about the data flow
        config["features_per_stage"] = [4 * 2 ** i for i in range(len(config["features_per_stage"]))]
    (ws / "plans.json").write_text(json.dumps(plans))
    return root, ws


def _train(ws, config, fold):
    return main(["train", str(ws), "--config", config, "--fold", str(fold), "--epochs", "1", "--iters-per-epoch",
                 "1", "--val-iters", "1", "--workers", "0", "--device", "cpu"])


def test_cascade_trains_on_the_first_stage_cross_validation_and_predicts_in_two_stages(cascade_workspace, capsys):
    root, ws = cascade_workspace
    plans = json.loads((ws / "plans.json").read_text())
    assert plans["configurations"]["3d_cascade_fullres"]["previous_stage"] == "3d_lowres"
    assert _train(ws, "3d_cascade_fullres", 0) == 2  # no first stage yet: refused with the fix
    assert "train every fold of it first" in capsys.readouterr().err
    for fold in range(5):
        assert _train(ws, "3d_lowres", fold) == 0
    full = ws / "preprocessed" / "3d_fullres"
    for case in (f"case_{i:03d}" for i in range(5)):  # each case's out-of-fold prediction, on the fullres grid
        labels = load_next_stage(next_stage_path(ws, "3d_lowres", "3d_cascade_fullres", case))
        assert labels.shape == tuple(json.loads((full / f"{case}.json").read_text())["shape_after_resampling"])
    assert _train(ws, "3d_cascade_fullres", 0) == 0
    assert "cascade: input 1 image channel(s) + 2" in (workspace.fold_dir(ws, "3d_cascade_fullres", 0)
                                                         / "training_log.txt").read_text()
    out = root / "out"
    (root / "in").mkdir()
    (root / "in" / "case_000.nii.gz").symlink_to(root / "ds" / "imagesTr" / "case_000.nii.gz")
    assert main(["predict", str(ws), "--config", "3d_cascade_fullres", "-i", str(root / "in"), "-o", str(out),
                 "--no-report", "--no-mirroring"]) == 0
    summary = json.loads((out / "prediction_summary.json").read_text())
    assert sorted((m["configuration"], m["fold"]) for m in summary["settings"]["models"]) == [
        ("3d_cascade_fullres", "0"), *(("3d_lowres", str(k)) for k in range(5))]
    assert (out / "case_000.nii.gz").is_file()
