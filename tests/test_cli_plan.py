"""`autoseg plan` end to end on tiny datasets, run in-process."""

import json

import numpy as np
from conftest import write_sitk

from autoseg.atomic import read_json
from autoseg.cli import main
from autoseg.preprocessing import store


def _plan(dataset, workdir, *extra):
    return main(["plan", str(dataset), "-o", str(workdir), "--workers", "1", *extra])


def test_plan_end_to_end_writes_every_artifact_and_explains(make_nnunetv2, tmp_path, capsys):
    workdir = tmp_path / "ws"
    assert _plan(make_nnunetv2(), workdir, "--explain") == 0
    out, err = capsys.readouterr()
    assert "patch_size" in out and "batch_size" in out and "3d_fullres" in out
    for name in ("dataset.json", "verify_report.json", "fingerprint.json", "plans.json"):
        assert (workdir / name).is_file(), name
    assert read_json(workdir / "verify_report.json")["ok"] is True
    plans = read_json(workdir / "plans.json")
    assert plans["channel_names"] == ["T1", "T2"]
    assert plans["labels"] == {"0": "background", "1": "liver", "2": "tumour"}
    full = plans["configurations"]["3d_fullres"]
    assert len(full["patch_size"]) == 3 and full["strides"][0] == [1, 1, 1]
    folder = workdir / "preprocessed" / "3d_fullres"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"case_{i:03d}{s}" for i in range(3) for s in (".b2nd", "_seg.b2nd", ".json"))
    data = store.load_case_image(folder, "case_000")
    assert data.dtype == np.float32 and data.shape[0] == 2
    assert "Traceback" not in out + err


def test_plan_runs_only_the_requested_steps(make_decathlon, tmp_path, capsys):
    workdir = tmp_path / "ws"
    assert _plan(make_decathlon(), workdir, "--steps", "fingerprint", "plan") == 0
    assert (workdir / "fingerprint.json").is_file() and (workdir / "plans.json").is_file()
    assert not (workdir / "preprocessed").exists()
    assert not (workdir / "verify_report.json").exists()
    # Now only preprocess, for one configuration, from the plans already written.
    assert _plan(make_decathlon(), workdir, "--steps", "preprocess", "--configs", "3d_fullres") == 0
    assert len(list((workdir / "preprocessed" / "3d_fullres").glob("*.json"))) == 3


def test_plan_memory_budget_reaches_the_plans(make_decathlon, tmp_path):
    root = make_decathlon()
    assert _plan(root, tmp_path / "ws", "--steps", "fingerprint", "plan", "--memory-gb", "2.5") == 0
    plans = read_json(tmp_path / "ws" / "plans.json")
    assert plans["memory_budget_gb"] == 2.5
    assert all(c["estimated_memory_gb"] <= 2.5 for c in plans["configurations"].values())


def test_plan_on_a_dataset_with_errors_stops_with_a_readable_message(make_decathlon, tmp_path, capsys):
    root = make_decathlon()
    write_sitk(root / "labelsTr" / "case_001.nii.gz", np.full((12, 16, 14), 9, np.uint8))
    (root / "imagesTr" / "case_002.nii.gz").unlink()
    workdir = tmp_path / "ws"
    code = _plan(root, workdir)
    out, err = capsys.readouterr()
    assert code != 0
    assert "labelsTr/case_001.nii.gz" in out and "imagesTr/case_002.nii.gz" in out
    assert "2 error(s)" in err and "verify_report.json" in err
    assert "Traceback" not in out + err
    assert read_json(workdir / "verify_report.json")["ok"] is False
    assert not (workdir / "plans.json").exists() and not (workdir / "preprocessed").exists()


def test_plan_with_broken_dataset_json_or_missing_fingerprint_is_a_readable_error(make_decathlon, tmp_path, capsys):
    root = make_decathlon()
    (root / "dataset.json").write_text("{ not json")
    assert _plan(root, tmp_path / "ws") == 2
    out, err = capsys.readouterr()
    assert "dataset.json" in err and "not valid JSON" in err and "Traceback" not in out + err

    (root / "dataset.json").write_text(json.dumps({"modality": {"0": "MRI"}, "labels": {"0": "background"},
                                                   "training": [{"image": "./imagesTr/case_000.nii.gz",
                                                                 "label": "./labelsTr/case_000.nii.gz"}]}))
    assert _plan(root, tmp_path / "other", "--steps", "plan") == 2
    out, err = capsys.readouterr()
    assert "fingerprint" in err and "Traceback" not in out + err


def test_plan_on_real_hippocampus_cases(hippocampus_subset, tmp_path, capsys):
    workdir = tmp_path / "ws"
    assert _plan(hippocampus_subset, workdir, "--configs", "3d_fullres", "--explain") == 0
    plans = read_json(workdir / "plans.json")
    assert list(plans["configurations"]) == ["3d_fullres"]
    assert plans["configurations"]["3d_fullres"]["spacing"] == [1.0, 1.0, 1.0]
    assert plans["normalization"][0]["scheme"] == "zscore"
    assert len(list((workdir / "preprocessed" / "3d_fullres").glob("*_seg.b2nd"))) == 4
    assert "patch_size" in capsys.readouterr().out


def test_plan_refuses_to_write_the_workspace_into_the_dataset_folder(make_decathlon, capsys):
    from autoseg.cli import main

    root = make_decathlon()
    before = (root / "dataset.json").read_bytes()
    assert main(["plan", str(root), "-o", str(root), "--workers", "1"]) == 2
    assert "must not be the dataset folder" in capsys.readouterr().err
    assert (root / "dataset.json").read_bytes() == before


def test_a_bad_file_in_a_worker_process_gives_a_clean_error(make_decathlon, capsys):
    from autoseg.cli import main

    root = make_decathlon(n_cases=3)
    (root / "imagesTr" / "case_001.nii.gz").write_bytes(b"not an image")
    assert main(["plan", str(root), "-o", str(root.parent / "w"), "--workers", "2", "--steps", "fingerprint"]) == 2
    err = capsys.readouterr().err
    assert "case_001.nii.gz" in err and "Traceback" not in err


def test_preprocessed_data_is_redone_when_the_plan_changes(make_decathlon, tmp_path):
    import json

    from autoseg import workspace
    from autoseg.cli import main
    from autoseg.preprocessing import store

    root = make_decathlon(n_cases=3)
    work = tmp_path / "w"
    assert main(["plan", str(root), "-o", str(work), "--workers", "1", "--configs", "3d_fullres"]) == 0
    folder = workspace.preprocessed_dir(work, "3d_fullres")
    old_shape = store.load_properties(folder, "case_000").shape_after_resampling
    plans = json.loads(workspace.plans_json(work).read_text())
    plans["configurations"]["3d_fullres"]["spacing"] = [2.0, 2.0, 2.0]
    workspace.plans_json(work).write_text(json.dumps(plans))
    # Training refuses data made under other plans ...
    assert main(["train", str(work), "--fold", "all", "--epochs", "1"]) == 2
    # ... and preprocessing redoes it.
    assert main(["plan", str(root), "-o", str(work), "--workers", "1", "--steps", "preprocess"]) == 0
    new_shape = store.load_properties(folder, "case_000").shape_after_resampling
    assert new_shape != old_shape and new_shape[0] == round(old_shape[0] / 2)


def test_resenc_preset_plans_a_residual_encoder_and_keeps_default_data_folders(make_decathlon, tmp_path, capsys):
    root = make_decathlon()
    assert _plan(root, tmp_path / "default", "--steps", "fingerprint", "plan") == 0
    assert _plan(root, tmp_path / "resenc", "--steps", "fingerprint", "plan", "--preset", "resenc-l", "--explain") == 0
    out = capsys.readouterr().out
    assert "resenc-l" in out and "residual_blocks" in out
    default, resenc = read_json(tmp_path / "default" / "plans.json"), read_json(tmp_path / "resenc" / "plans.json")
    assert "preset" not in default and resenc["preset"] == "resenc-l" and resenc["memory_budget_gb"] == 24
    for name, config in resenc["configurations"].items():
        stages = len(config["features_per_stage"])
        assert config["network"] == "residual_encoder_unet" and config["n_conv_per_stage_decoder"] == 1
        assert config["residual_blocks"] == [1, 3, 4, 6, 6, 6][:stages]
        assert config["data_identifier"] == default["configurations"][name]["data_identifier"] == name
        assert "network" not in default["configurations"][name]


def test_planning_another_preset_over_trained_models_is_refused(make_decathlon, tmp_path, capsys):
    root, workdir = make_decathlon(), tmp_path / "ws"
    assert _plan(root, workdir, "--steps", "fingerprint", "plan") == 0
    fold = workdir / "models" / "3d_fullres" / "fold_0"
    fold.mkdir(parents=True)
    (fold / "checkpoint_final.pt").write_bytes(b"")
    assert _plan(root, workdir, "--steps", "plan", "--preset", "resenc-m") == 2
    assert "trained under the default preset (3d_fullres)" in capsys.readouterr().err
    assert "preset" not in read_json(workdir / "plans.json")
    assert _plan(root, workdir, "--steps", "plan") == 0  # the same preset again is fine


def test_the_clis_copied_choice_lists_match_the_library():
    """cli.py keeps copies of a few lists so `--help` needs no heavy import; they must not drift."""
    from autoseg import cli
    from autoseg.evaluation.objects import CHOICES
    from autoseg.plan_workspace import INSTANCE_CHOICES, PLAN_STEPS
    from autoseg.planning.plans import CONFIGURATIONS
    from autoseg.planning.presets import PRESETS
    from autoseg.training.augmentation import AUGMENT_INTERPOLATIONS, LABEL_INTERPOLATIONS, SCALE_DRAWS

    assert cli.PLAN_STEPS == PLAN_STEPS
    assert cli.PLAN_PRESETS == tuple(PRESETS)
    assert cli.CONFIGURATIONS == CONFIGURATIONS
    assert cli.INSTANCE_CHOICES == INSTANCE_CHOICES
    assert cli.OBJECT_METRICS == CHOICES
    assert cli.AUGMENT_INTERPOLATIONS == tuple(AUGMENT_INTERPOLATIONS)
    assert cli.SCALE_DRAWS == SCALE_DRAWS
    assert cli.LABEL_INTERPOLATIONS == tuple(LABEL_INTERPOLATIONS)
    from autoseg.inference.settings import RUNTIMES
    from autoseg.quantization import DEFAULT_CALIBRATION_WINDOWS, DEFAULT_TOLERANCE

    assert cli.RUNTIMES == RUNTIMES
    assert cli.QUANTIZE_CALIBRATION_WINDOWS == DEFAULT_CALIBRATION_WINDOWS
    assert cli.QUANTIZE_TOLERANCE == DEFAULT_TOLERANCE


def test_predict_and_the_python_api_default_to_auto():
    import inspect

    from autoseg import api, cli

    assert inspect.signature(api.load_model).parameters["runtime"].default == "auto"
    assert cli.build_parser().parse_args(["predict", "w", "-i", "x", "-o", "y"]).runtime == "auto"
