"""`autoseg crossval`: pooled fold results, configuration ensembles, postprocessing rules."""

from __future__ import annotations

import json

import numpy as np
import pytest

from autoseg import workspace
from autoseg.cli import main
from autoseg.crossval import CrossValidationError, ensemble_candidates, run_crossval
from autoseg.planning.plans import Plans
from autoseg.postprocessing import load_postprocessing_rules
from autoseg.training.trainer import TrainingSettings, train_fold

TINY = {"3d_fullres": dict(patch_size=[8, 8, 8], batch_size=2, features_per_stage=[4, 8],
                           kernel_sizes=[[3, 3, 3]] * 2, strides=[[1, 1, 1], [2, 2, 2]]),
        "2d": dict(patch_size=[8, 8], batch_size=2, features_per_stage=[4, 8],
                   kernel_sizes=[[3, 3]] * 2, strides=[[1, 1], [2, 2]])}


@pytest.fixture(scope="module")
def trained_workspace(tmp_path_factory):
    """Both configurations, five folds each, trained for one iteration: what crossval needs, quickly."""
    from tests.conftest import LABELS, synthetic_case, write_sitk  # noqa: F401  (shared builders)

    root = tmp_path_factory.mktemp("ds")
    training = []
    for i in range(5):
        image, label = synthetic_case((6, 12, 12), 1, "mri", 2, seed=i)
        write_sitk(root / "imagesTr" / f"c{i}.nii.gz", image[0])
        write_sitk(root / "labelsTr" / f"c{i}.nii.gz", label)
        training.append({"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"modality": {"0": "MRI"},
                                                   "labels": {str(k): v for k, v in LABELS.items()},
                                                   "training": training}))
    work = tmp_path_factory.mktemp("work")
    assert main(["plan", str(root), "-o", str(work), "--workers", "1", "--configs", "2d", "3d_fullres"]) == 0
    plans = json.loads(workspace.plans_json(work).read_text())
    for name, tiny in TINY.items():
        plans["configurations"][name].update(tiny)
    workspace.plans_json(work).write_text(json.dumps(plans))
    settings = TrainingSettings(epochs=1, iters_per_epoch=1, val_iters=1, workers=0)
    for name in TINY:
        for fold in range(5):
            train_fold(work, name, fold, settings, progress=False)
    return work


def test_crossval_scores_configurations_and_their_ensemble_and_writes_rules(trained_workspace):
    summary = run_crossval(trained_workspace, progress=False)
    assert set(summary["configurations"]) == {"2d", "3d_fullres"}
    assert all(r["num_cases"] == 5 and not r["missing_folds"] for r in summary["configurations"].values())
    assert list(summary["ensembles"]) == ["2d+3d_fullres"] or list(summary["ensembles"]) == ["3d_fullres+2d"]
    candidates = {"+".join(sorted([c])): r["foreground_mean_dice"] or 0 for c, r in summary["configurations"].items()}
    candidates.update({k: r["foreground_mean_dice"] or 0 for k, r in summary["ensembles"].items()})
    assert candidates["+".join(summary["best"])] == pytest.approx(max(candidates.values()))
    rules = load_postprocessing_rules(workspace.postprocessing_json(trained_workspace))
    assert rules["configuration"] == summary["best"]
    assert (workspace.crossval_dir(trained_workspace) / "summary.json").is_file()


def test_ensembles_are_the_pairs_of_configurations_as_in_nnunet():
    assert ensemble_candidates(["2d", "3d_fullres", "3d_lowres"]) == [
        ("2d", "3d_fullres"), ("2d", "3d_lowres"), ("3d_fullres", "3d_lowres")]
    assert ensemble_candidates(["2d"]) == []


def test_ensemble_dice_is_that_of_the_averaged_probabilities(trained_workspace):
    from autoseg.crossval import _ensemble_prediction, collect_validation

    results = {c: collect_validation(trained_workspace, c) for c in TINY}
    case_id = sorted(results["2d"]["case_folds"])[0]
    folds = {c: results[c]["case_folds"][case_id] for c in TINY}
    p = [np.load(workspace.fold_dir(trained_workspace, c, folds[c]) / "validation" / f"{case_id}.npz")["probabilities"]
         .astype(np.float32) for c in TINY]
    expected = np.argmax(p[0] + p[1], axis=0)
    plans = Plans.load(workspace.plans_json(trained_workspace))
    assert np.array_equal(_ensemble_prediction(trained_workspace, list(TINY), case_id, folds, plans), expected)


def test_crossval_names_the_missing_folds(trained_workspace, tmp_path):
    import shutil

    work = tmp_path / "partial"
    shutil.copytree(trained_workspace, work)
    shutil.rmtree(workspace.fold_dir(work, "2d", 3))
    shutil.rmtree(workspace.fold_dir(work, "3d_fullres", 1))
    with pytest.raises(CrossValidationError, match=r"folds \[3\] missing"):
        run_crossval(work, progress=False)


def test_ensembles_without_kept_probabilities_are_skipped_with_the_fix(trained_workspace, tmp_path):
    import shutil

    work = tmp_path / "no_npz"
    shutil.copytree(trained_workspace, work)
    for npz in (workspace.fold_dir(work, "2d", 0).parent).glob("fold_*/validation/*.npz"):
        npz.unlink()  # as after `autoseg train --no-save-probabilities`
    summary = run_crossval(work, progress=False)
    assert summary["ensembles"] == {}
    (name, reason), = summary["ensembles_not_scored"].items()
    assert set(name.split("+")) == set(TINY) and "--save-probabilities" in reason
    assert summary["best"][0] in TINY and len(summary["best"]) == 1


def test_crossval_on_an_unplanned_folder_gives_a_clean_error(tmp_path, capsys):
    assert main(["crossval", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "plans.json" in err and "Traceback" not in err
