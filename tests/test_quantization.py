"""`autoseg quantize` and `predict --runtime openvino-int8`: int8 networks checked on validation Dice."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from autoseg import quantization, workspace
from autoseg.cli import main
from autoseg.dataset.image_io import read_image
from autoseg.inference.int8_models import quantized_dir
from autoseg.model_files import file_sha256
from autoseg.quantization import QuantizationCheck, calibration_windows

pytest.importorskip("openvino")
pytest.importorskip("nncf")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small 3D U-Net trained on fold 0 of six synthetic cases until it segments both labels a little."""
    from tests.conftest import LABELS, synthetic_case, write_sitk

    root = tmp_path_factory.mktemp("ds")
    training = []
    for i in range(6):
        image, label = synthetic_case((12, 20, 20), 1, "mri", 2, seed=i)
        write_sitk(root / "imagesTr" / f"c{i}.nii.gz", image[0])
        write_sitk(root / "labelsTr" / f"c{i}.nii.gz", label)
        training.append({"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"modality": {"0": "MRI"}, "training": training,
                                                   "labels": {str(k): v for k, v in LABELS.items()}}))
    work = tmp_path_factory.mktemp("work")
    assert main(["plan", str(root), "-o", str(work), "--workers", "1", "--configs", "3d_fullres"]) == 0
    plans = json.loads(workspace.plans_json(work).read_text())
    plans["configurations"]["3d_fullres"].update(patch_size=[8, 8, 8], batch_size=2, features_per_stage=[8, 16],
                                                 kernel_sizes=[[3, 3, 3]] * 2, strides=[[1, 1, 1], [2, 2, 2]])
    workspace.plans_json(work).write_text(json.dumps(plans))
    assert main(["train", str(work), "--fold", "0", "--epochs", "3", "--iters-per-epoch", "40", "--val-iters", "1",
                 "--workers", "0", "--no-validation"]) == 0
    return root, work


def record_of(work):
    return json.loads((quantized_dir(work, "3d_fullres", "0") / "quantization.json").read_text())


def test_quantize_installs_a_checked_int8_model_that_predict_uses(trained, tmp_path, capsys):
    root, work = trained
    assert main(["quantize", str(work), "--folds", "0", "--calibration-windows", "16", "--tolerance", "0.05"]) == 0
    printed = capsys.readouterr().out
    assert "int8 accepted on 2 validation case(s)" in printed and "the default --runtime auto takes them" in printed
    calibration = record_of(work)["calibration"]
    assert calibration["preset"] in ("mixed", "performance")
    assert set(calibration["max_drop_per_preset"]) == {"mixed", "performance"}
    assert calibration["max_drop_per_preset"][calibration["preset"]] == min(calibration["max_drop_per_preset"].values())
    folder = quantized_dir(work, "3d_fullres", "0")
    assert (folder / "model.xml").is_file() and (folder / "model.bin").is_file()
    record = json.loads((folder / "quantization.json").read_text())
    splits = json.loads(workspace.splits_json(work).read_text())["folds"]
    assert record["check"]["cases"] == sorted(splits[0]["val"]) and record["check"]["held_out"]
    assert record["check"]["max_drop"] <= 0.05 and record["calibration"]["windows"] == 16
    assert max(record["check"]["dice_float32"].values()) > 0.3  # the check compared a model that segments
    assert record["checkpoint_sha256"] == file_sha256(
        workspace.fold_dir(work, "3d_fullres", "0") / "checkpoint_final.pt")
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left

    labels = {}
    for runtime in ("openvino", "openvino-int8"):
        out = tmp_path / runtime
        assert main(["predict", str(work), "-i", str(root / "imagesTr"), "-o", str(out), "--no-report",
                     "--runtime", runtime]) == 0
        labels[runtime] = [read_image(out / f"c{i}.nii.gz")[0] for i in range(6)]
    agree = np.mean([(a == b).mean() for a, b in zip(labels["openvino"], labels["openvino-int8"])])
    assert agree > 0.98


def test_predict_refuses_a_missing_or_stale_int8_model(trained, tmp_path, capsys):
    root, work = trained
    args = ["predict", str(work), "-i", str(root / "imagesTr"), "-o", str(tmp_path / "out"), "--no-report",
            "--runtime", "openvino-int8"]
    folder = quantized_dir(work, "3d_fullres", "0")
    if not folder.exists():
        assert main(["quantize", str(work), "--folds", "0", "--calibration-windows", "8", "--tolerance", "0.5"]) == 0
    hidden = folder.with_name("hidden")
    folder.rename(hidden)
    try:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert "openvino_int8: no int8 model (" in err and "make it with `autoseg quantize" in err
    finally:
        hidden.rename(folder)
    record = json.loads((folder / "quantization.json").read_text())
    stale = {**record, "checkpoint_sha256": "0" * 64}  # as after training the fold again
    (folder / "quantization.json").write_text(json.dumps(stale))
    try:
        assert main(args) == 2
        assert "made from another checkpoint_final.pt" in capsys.readouterr().err
    finally:
        (folder / "quantization.json").write_text(json.dumps(record))
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.nii.gz"))


def test_an_int8_network_that_loses_dice_is_refused_and_not_installed(trained, monkeypatch, capsys):
    """A network that forgets the structures (here: quantization replaced by zeroed weights) must not be used."""
    from autoseg.inference.openvino_runtime import convert_network
    from autoseg.network.unet import build_unet
    from autoseg.planning.plans import Plans

    _, work = trained
    plans = Plans.load(workspace.plans_json(work))
    broken = build_unet(plans.network_topology("3d_fullres"), deep_supervision=False)
    with torch.no_grad():
        for p in broken.parameters():
            p.zero_()
    monkeypatch.setattr(quantization, "quantize_model",
                        lambda model, windows, preset: convert_network(broken, 1, [8, 8, 8]))
    if not quantized_dir(work, "3d_fullres", "0").exists():
        assert main(["quantize", str(work), "--folds", "0", "--calibration-windows", "8", "--tolerance", "0.5"]) == 0
    before = sorted(p.name for p in workspace.fold_dir(work, "3d_fullres", "0").iterdir())
    record = (quantized_dir(work, "3d_fullres", "0") / "quantization.json").read_text()
    assert main(["quantize", str(work), "--folds", "0", "--calibration-windows", "4"]) == 2
    err = capsys.readouterr().err
    assert "int8 refused, a label's validation Dice drops by" in err and "tolerance 0.005" in err
    assert "largest drop per preset: mixed" in err and ", performance " in err
    assert "refused: 3d_fullres/fold_0 (nothing installed for them" in err
    assert sorted(p.name for p in workspace.fold_dir(work, "3d_fullres", "0").iterdir()) == before
    assert (quantized_dir(work, "3d_fullres", "0") / "quantization.json").read_text() == record  # the earlier one stays


def test_the_check_refuses_a_drop_beyond_the_tolerance_on_any_label():
    ok = QuantizationCheck({"1": 0.80, "2": 0.70}, {"1": 0.797, "2": 0.701}, 0.005)
    assert ok.accepted and ok.max_drop == pytest.approx(0.003)
    bad = QuantizationCheck({"1": 0.80, "2": 0.70}, {"1": 0.81, "2": 0.69}, 0.005)
    assert not bad.accepted and bad.describe({1: "a", 2: "b"}) == "a 0.8000 -> 0.8100; b 0.7000 -> 0.6900"
    absent = QuantizationCheck({"1": 0.8, "2": None}, {"1": 0.8, "2": None}, 0.005)  # a label in no case
    assert absent.accepted and absent.drops == {"1": 0.0}
    invented = QuantizationCheck({"1": 0.8, "2": None}, {"1": 0.8, "2": 0.0}, 0.005)  # int8 paints a label nobody has
    assert not invented.accepted and invented.drops["2"] == 1.0
    assert not QuantizationCheck({}, {}, 0.005).accepted  # nothing scored is no evidence


def test_calibration_windows_cover_foreground_and_load_each_case_once():
    rng = np.random.default_rng(0)
    images = {"a": rng.normal(size=(2, 6, 20, 20)).astype(np.float32),
              "b": rng.normal(size=(2, 3, 5, 30)).astype(np.float32)}  # smaller than the patch along y
    foreground = {"a": [np.array([[5, 19, 19]]), np.zeros((0, 3), int)], "b": []}
    loads = []

    def load(case_id):
        loads.append(case_id)
        return images[case_id], foreground[case_id]

    windows = calibration_windows(["a", "b"], load, (4, 8, 8), 60, seed=1)
    assert len(windows) == 60 and sorted(loads) == ["a", "b"]
    assert all(w.shape == (1, 2, 4, 8, 8) and w.dtype == np.float32 for w in windows)
    # windows centred on a's corner voxel hold it at the window's centre, with zeros beyond the volume
    corner = images["a"][:, 5, 19, 19]
    centred = [w for w in windows if np.array_equal(w[0, :, 2, 4, 4], corner) and not w[0, :, 3, 5:].any()]
    assert 5 <= len(centred) <= 25
    flat = calibration_windows(["a"], load, (8, 8), 10, seed=2)  # a 2D network on a stack: one slice each
    assert all(w.shape == (1, 2, 8, 8) for w in flat)


def test_runtime_auto_takes_a_checked_int8_model_and_falls_back_when_it_is_stale(trained, monkeypatch):
    from autoseg.inference import openvino_runtime
    from autoseg.inference.predictor import Predictor
    from autoseg.inference.settings import ComputeSettings, ModelChoice

    _, work = trained
    monkeypatch.setattr(openvino_runtime, "cpu_has_native_bf16", lambda: False)  # an AVX2-only CPU
    folder = quantized_dir(work, "3d_fullres", "0")
    if not folder.exists():
        assert main(["quantize", str(work), "--folds", "0", "--calibration-windows", "8", "--tolerance", "0.5"]) == 0
    auto = ComputeSettings("cpu", runtime="auto")
    assert Predictor(work, ModelChoice(folds=("0",)), compute=auto).runtime == "openvino-int8"
    record = (folder / "quantization.json").read_text()
    (folder / "quantization.json").write_text(json.dumps({**json.loads(record), "checkpoint_sha256": "0" * 64}))
    try:
        assert Predictor(work, ModelChoice(folds=("0",)), compute=auto).runtime == "openvino"
    finally:
        (folder / "quantization.json").write_text(record)


def test_bench_predict_times_every_runtime_the_workspace_supports(trained):
    import subprocess
    import sys
    from pathlib import Path

    root, work = trained
    if not quantized_dir(work, "3d_fullres", "0").exists():
        assert main(["quantize", str(work), "--folds", "0", "--calibration-windows", "8", "--tolerance", "0.5"]) == 0
    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    command = [sys.executable, str(benchmarks / "bench_predict.py"), str(work), "-i", str(root / "imagesTr"),
               "--cases", "2", "--mirroring", "off", "--runtime", "all", "--autoseg-precision", "float32"]
    result = subprocess.run(command, cwd=benchmarks, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for label in ("float32", "openvino float32", "openvino int8"):
        assert f"autoseg ({label}): 1 fold(s) 0, mirroring off: 2 cases in" in result.stdout, result.stdout


def test_quantize_refuses_unusable_settings_and_a_workspace_without_splits(trained, capsys):
    _, work = trained
    assert main(["quantize", str(work), "--validation-cases", "0"]) == 2
    assert "--validation-cases must be at least 1, got 0" in capsys.readouterr().err
    assert main(["quantize", str(work), "--tolerance", "-0.1"]) == 2
    assert "--tolerance must be a Dice difference in [0, 1)" in capsys.readouterr().err
    splits = workspace.splits_json(work)
    saved = splits.read_text()
    splits.unlink()
    try:
        assert main(["quantize", str(work), "--folds", "0"]) == 2
        assert "splits.json: missing, so fold 0's validation cases are unknown" in capsys.readouterr().err
        assert not splits.exists()  # quantize never writes new splits
    finally:
        splits.write_text(saved)


@pytest.mark.parametrize("preset, expected", [("mixed", "MIXED"), ("performance", "PERFORMANCE")])
def test_quantization_passes_nncf_the_preset(monkeypatch, preset, expected):
    """Which preset keeps the Dice depends on the model (docs/prediction.md): each reaches NNCF as asked."""
    nncf = pytest.importorskip("nncf")
    seen = {}
    monkeypatch.setattr(nncf, "quantize", lambda model, dataset, **kw: seen.update(kw) or model)
    windows = [np.zeros((1, 1, 8, 8), np.float32)] * 3
    assert quantization.quantize_model("model", windows, preset) == "model"
    assert seen["preset"] == getattr(nncf.QuantizationPreset, expected) and seen["subset_size"] == 3
