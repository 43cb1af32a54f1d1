"""Training loop: a short run, resume, checkpoint safety, splits, fold validation."""

from __future__ import annotations

import json

import pytest
import torch

from autoseg import workspace
from autoseg.cli import main
from autoseg.training import checkpoint as checkpoint_module
from autoseg.training.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from autoseg.training.splits import make_splits
from autoseg.training.trainer import TrainingSettings, poly_lr, train_fold


@pytest.fixture
def tiny_workspace(make_decathlon, tmp_path):
    """A planned and preprocessed 6-case dataset, with the plan shrunk to a tiny network."""
    root = make_decathlon(n_cases=6, shape=(12, 16, 14))
    work = tmp_path / "work"
    assert main(["plan", str(root), "-o", str(work), "--workers", "1", "--configs", "3d_fullres"]) == 0
    plans = json.loads(workspace.plans_json(work).read_text())
    c = plans["configurations"]["3d_fullres"]
    c.update(patch_size=[8, 8, 8], batch_size=2, features_per_stage=[4, 8], kernel_sizes=[[3, 3, 3]] * 2,
             strides=[[1, 1, 1], [2, 2, 2]])
    workspace.plans_json(work).write_text(json.dumps(plans))
    return work


SETTINGS = dict(epochs=2, iters_per_epoch=2, val_iters=1, num_workers=0, seed=3)


def test_short_run_writes_every_artifact_and_validation_summary(tiny_workspace):
    result = train_fold(tiny_workspace, "3d_fullres", 0, TrainingSettings(**SETTINGS), progress=False)
    out = workspace.fold_dir(tiny_workspace, "3d_fullres", 0)
    for name in ("checkpoint_latest.pt", "checkpoint_best.pt", "checkpoint_final.pt", "training_log.txt", "progress.png"):
        assert (out / name).is_file(), name
    assert len(result["history"]) == 2
    summary = json.loads((out / "validation" / "summary.json").read_text())
    val_ids = json.loads(workspace.splits_json(tiny_workspace).read_text())["folds"][0]["val"]
    assert sorted(summary["cases"]) == sorted(val_ids)
    assert set(summary["mean"]) == {"1", "2"}
    # Validation predictions are label maps in the original geometry of each case.
    assert all((out / "validation" / f"{cid}.nii.gz").is_file() for cid in val_ids)
    log = (out / "training_log.txt").read_text()
    assert "epoch 2/2" in log and "pseudo-Dice" in log and "lr" in log


def test_resumed_run_ends_in_the_same_state_as_an_uninterrupted_one(tiny_workspace, tmp_path):
    settings = TrainingSettings(**{**SETTINGS, "epochs": 3, "validate_at_end": False})
    train_fold(tiny_workspace, "3d_fullres", 1, settings, progress=False)
    uninterrupted = load_checkpoint(workspace.fold_dir(tiny_workspace, "3d_fullres", 1) / "checkpoint_final.pt")

    # Stop after one epoch (as if interrupted), then resume the same 3-epoch schedule.
    first = TrainingSettings(**{**SETTINGS, "epochs": 3, "validate_at_end": False})
    calls = {"n": 0}
    original_save = checkpoint_module.save_checkpoint

    def interrupt_after_first_latest(path, state):
        original_save(path, state)
        if path.name == "checkpoint_latest.pt":
            calls["n"] += 1
            if calls["n"] == 1:
                raise KeyboardInterrupt

    import autoseg.training.trainer as trainer_module
    trainer_module.save_checkpoint = interrupt_after_first_latest
    try:
        with pytest.raises(KeyboardInterrupt):
            train_fold(tiny_workspace, "3d_fullres", 2, first, progress=False)
    finally:
        trainer_module.save_checkpoint = original_save
    fold2 = workspace.fold_dir(tiny_workspace, "3d_fullres", 2)
    assert load_checkpoint(fold2 / "checkpoint_latest.pt")["epoch"] == 1
    train_fold(tiny_workspace, "3d_fullres", 2, first, resume=True, progress=False)
    resumed = load_checkpoint(fold2 / "checkpoint_final.pt")

    assert resumed["epoch"] == uninterrupted["epoch"] == 3
    assert [h["epoch"] for h in resumed["history"]] == [1, 2, 3]
    assert [h["lr"] for h in resumed["history"]] == pytest.approx([h["lr"] for h in uninterrupted["history"]])
    # The optimizer carried its momentum buffers and step over the interruption.
    assert resumed["optimizer_state"]["state"], "optimizer state lost on resume"
    assert "resumed from epoch 1" in (fold2 / "training_log.txt").read_text()


def test_a_checkpoint_write_that_crashes_midway_never_replaces_a_good_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_latest.pt"
    save_checkpoint(path, {"epoch": 1, "network_state": {"w": torch.ones(3)}})

    def crash_midway(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"PK\x03\x04 truncated")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError):
        save_checkpoint(path, {"epoch": 2, "network_state": {"w": torch.zeros(3)}})
    state = load_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["network_state"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_latest.pt"]


def test_truncated_checkpoint_gives_a_clear_error(tmp_path):
    path = tmp_path / "checkpoint_latest.pt"
    save_checkpoint(path, {"epoch": 1, "network_state": {"w": torch.ones(1000)}})
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="checkpoint_latest.pt"):
        load_checkpoint(path)


def test_splits_are_deterministic_disjoint_and_cover_every_case():
    ids = [f"case_{i:03d}" for i in range(23)]
    a, b = make_splits(ids, seed=7), make_splits(list(reversed(ids)), seed=7)
    assert a == b
    vals = [set(f["val"]) for f in a]
    assert set().union(*vals) == set(ids) and sum(len(v) for v in vals) == len(ids)
    for f in a:
        assert not set(f["train"]) & set(f["val"])


def test_learning_rate_follows_a_shortened_schedule():
    assert poly_lr(0.01, 0, 10) == pytest.approx(0.01)
    assert poly_lr(0.01, 5, 10) == pytest.approx(0.01 * 0.5 ** 0.9)
    assert poly_lr(0.01, 9, 10) < poly_lr(0.01, 9, 1000)


def test_train_cli_reports_a_missing_workspace_without_traceback(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nowhere"), "--fold", "0"]) == 2
    err = capsys.readouterr().err
    assert "plans.json" in err and "Traceback" not in err


def test_2d_configuration_trains_and_validates(make_decathlon, tmp_path):
    root = make_decathlon(n_cases=6, shape=(6, 16, 16))
    work = tmp_path / "work2d"
    assert main(["plan", str(root), "-o", str(work), "--workers", "1", "--configs", "2d"]) == 0
    plans = json.loads(workspace.plans_json(work).read_text())
    plans["configurations"]["2d"].update(patch_size=[8, 8], batch_size=4, features_per_stage=[4, 8],
                                         kernel_sizes=[[3, 3]] * 2, strides=[[1, 1], [2, 2]])
    workspace.plans_json(work).write_text(json.dumps(plans))
    result = train_fold(work, "2d", 0, TrainingSettings(**SETTINGS), progress=False)
    assert len(result["history"]) == 2
    assert result["validation"]["num_cases"] >= 1
    assert (workspace.fold_dir(work, "2d", 0) / "validation" / "summary.json").is_file()


@pytest.mark.parametrize("field", ["epochs", "iters_per_epoch", "val_iters", "checkpoint_every"])
def test_a_schedule_of_zero_is_refused_with_its_option_name(field):
    with pytest.raises(ValueError, match=field.replace("_", "-")):
        TrainingSettings(**{field: 0})
