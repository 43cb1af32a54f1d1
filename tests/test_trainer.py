"""Training loop: a short run, resume, checkpoint safety, splits, fold validation."""

from __future__ import annotations

import json

import pytest
import torch

import autoseg.training.trainer as trainer_module
from autoseg import model_files, workspace
from autoseg.cli import main
from autoseg.device import autocast_context, configure_cudnn, gradient_scaler, pin_memory_for
from autoseg.model_files import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from autoseg.network import UNetTopology, build_unet
from autoseg.training.loss import DeepSupervisionLoss, DiceCELoss
from autoseg.training.splits import make_splits
from autoseg.training.trainer import TrainingError, TrainingSettings, _to_device, backward_and_step, poly_lr, train_fold


def plans_format_2(configuration: str, config: dict) -> dict:
    """plans.json (format 2, docs in the shared contract) for make_decathlon's data: one MRI channel, 3 labels."""
    return {
        "format_version": 2, "dataset_name": "Synthetic", "channel_names": ["MRI"],
        "labels": {"0": "background", "1": "liver", "2": "tumour"}, "default_configuration": configuration,
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2], "memory_budget_gb": 8.0,
        "normalization": [{"channel": 0, "name": "MRI", "scheme": "zscore", "use_nonzero_mask": True,
                           "reason": "test fixture"}],
        "resampling": {"image_order": 3, "label_order": 1, "thick_axis_order": 0, "anisotropy_threshold": 3.0,
                       "reason": "test fixture"},
        "reasons": {},
        "configurations": {configuration: {"n_conv_per_stage": 2, "estimated_memory_gb": 0.01, "reasons": {},
                                           **config}},
    }


def planned_workspace(root, work, plans: dict):
    """Verify and fingerprint `root` into `work`, write `plans` by hand, and preprocess with them."""
    assert main(["plan", str(root), "-o", str(work), "--workers", "1", "--steps", "verify", "fingerprint"]) == 0
    workspace.plans_json(work).write_text(json.dumps(plans))
    assert main(["plan", str(root), "-o", str(work), "--workers", "1", "--steps", "preprocess"]) == 0
    return work


@pytest.fixture
def tiny_workspace(make_decathlon, tmp_path):
    """A preprocessed 6-case dataset planned for a tiny 3D network."""
    root = make_decathlon(n_cases=6, shape=(12, 16, 14))
    config = {"data_identifier": "3d_fullres", "spacing": [1.0, 1.0, 1.0], "median_shape": [8, 12, 10],
              "patch_size": [8, 8, 8], "batch_size": 2, "batch_dice": True, "features_per_stage": [4, 8],
              "kernel_sizes": [[3, 3, 3]] * 2, "strides": [[1, 1, 1], [2, 2, 2]]}
    return planned_workspace(root, tmp_path / "work", plans_format_2("3d_fullres", config))


@pytest.fixture
def dice_modes(monkeypatch) -> list[bool]:
    """The batch_dice setting of every Dice + CE loss the trainer builds."""
    modes = []

    class RecordingDiceCELoss(DiceCELoss):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            modes.append(self.batch_dice)

    monkeypatch.setattr(trainer_module, "DiceCELoss", RecordingDiceCELoss)
    return modes


SETTINGS = dict(epochs=2, iters_per_epoch=2, val_iters=1, workers=0, seed=3)


def test_short_run_writes_every_artifact_and_validation_summary(tiny_workspace, dice_modes):
    result = train_fold(tiny_workspace, "3d_fullres", 0, TrainingSettings(**SETTINGS), progress=False)
    assert dice_modes == [True]
    out = workspace.fold_dir(tiny_workspace, "3d_fullres", 0)
    for name in ("checkpoint_latest.pt", "checkpoint_best.pt", "checkpoint_final.pt", "training_log.txt",
                 "progress.png"):
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
    assert "read as [12, 12, 12]" in log and "batch Dice" in log  # nnU-Net's read patch for an 8^3 patch
    assert "non-zero mask in channels [0]" in log


def test_validation_keeps_probabilities_only_when_asked_and_gives_the_same_labels_either_way(tiny_workspace):
    """One configuration planned: no ensembles to score, so no .npz; asked for, they come with the same labels."""
    import numpy as np

    from autoseg.dataset.image_io import read_image
    from autoseg.inference.settings import ComputeSettings
    from autoseg.planning.plans import Plans
    from autoseg.training.validation import validate_fold

    train_fold(tiny_workspace, "3d_fullres", 0, TrainingSettings(**SETTINGS), progress=False)
    out = workspace.fold_dir(tiny_workspace, "3d_fullres", 0)
    streamed = json.loads((out / "validation" / "summary.json").read_text())
    assert streamed["probabilities_saved"] is False and not list((out / "validation").glob("*.npz"))

    plans = Plans.load(workspace.plans_json(tiny_workspace))
    network = build_unet(UNetTopology.from_plan(plans.configurations["3d_fullres"], 1, 3), deep_supervision=False)
    network.load_state_dict(load_checkpoint(out / "checkpoint_final.pt").network_state)
    val_ids = sorted(streamed["cases"])
    kept = validate_fold(network, tiny_workspace, plans, "3d_fullres", val_ids, tmp := out / "with_npz",
                         ComputeSettings(torch.device("cpu")), progress=False, save_probabilities=True)
    assert kept["probabilities_saved"] is True
    for case_id in val_ids:
        probabilities = np.load(tmp / f"{case_id}.npz")["probabilities"]
        labels, _ = read_image(tmp / f"{case_id}.nii.gz")
        assert probabilities.shape[0] == 3 and probabilities.shape[1:] == labels.shape
        np.testing.assert_array_equal(labels, read_image(out / "validation" / f"{case_id}.nii.gz")[0])
    assert kept["mean"] == streamed["mean"]


def test_resumed_run_ends_in_the_same_state_as_an_uninterrupted_one(tiny_workspace, tmp_path):
    settings = TrainingSettings(**{**SETTINGS, "epochs": 3, "validate_at_end": False})
    train_fold(tiny_workspace, "3d_fullres", 1, settings, progress=False)
    uninterrupted = load_checkpoint(workspace.fold_dir(tiny_workspace, "3d_fullres", 1) / "checkpoint_final.pt")

    # Stop after one epoch (as if interrupted), then resume the same 3-epoch schedule.
    first = TrainingSettings(**{**SETTINGS, "epochs": 3, "validate_at_end": False})
    calls = {"n": 0}
    original_save = model_files.save_checkpoint

    def interrupt_after_first_latest(path, state):
        original_save(path, state)
        if path.name == "checkpoint_latest.pt":
            calls["n"] += 1
            if calls["n"] == 1:
                raise KeyboardInterrupt

    trainer_module.save_checkpoint = interrupt_after_first_latest
    try:
        with pytest.raises(KeyboardInterrupt):
            train_fold(tiny_workspace, "3d_fullres", 2, first, progress=False)
    finally:
        trainer_module.save_checkpoint = original_save
    fold2 = workspace.fold_dir(tiny_workspace, "3d_fullres", 2)
    assert load_checkpoint(fold2 / "checkpoint_latest.pt").epoch == 1
    train_fold(tiny_workspace, "3d_fullres", 2, first, resume=True, progress=False)
    resumed = load_checkpoint(fold2 / "checkpoint_final.pt")

    assert resumed.epoch == uninterrupted.epoch == 3
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    assert [h["lr"] for h in resumed.history] == pytest.approx([h["lr"] for h in uninterrupted.history])
    # The optimizer carried its momentum buffers and step over the interruption.
    assert resumed.optimizer_state["state"], "optimizer state lost on resume"
    assert "resumed from epoch 1" in (fold2 / "training_log.txt").read_text()


def test_a_checkpoint_write_that_crashes_midway_never_replaces_a_good_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_latest.pt"
    save_checkpoint(path, Checkpoint(epoch=1, network_state={"w": torch.ones(3)}))

    def crash_midway(obj, f, *args, **kwargs):
        with open(f, "wb") as handle:
            handle.write(b"PK\x03\x04 truncated")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError):
        save_checkpoint(path, Checkpoint(epoch=2, network_state={"w": torch.zeros(3)}))
    state = load_checkpoint(path)
    assert state.epoch == 1 and torch.equal(state.network_state["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_latest.pt"]


def test_truncated_checkpoint_gives_a_clear_error(tmp_path):
    path = tmp_path / "checkpoint_latest.pt"
    save_checkpoint(path, Checkpoint(epoch=1, network_state={"w": torch.ones(1000)}))
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


@pytest.mark.parametrize("n", [5, 23, 208])
def test_folds_are_nnunets_so_fold_k_holds_out_the_same_cases_in_both_tools(n):
    """nnU-Net v2 splits with scikit-learn's KFold(5, shuffle=True, random_state=12345) over the sorted ids."""
    model_selection = pytest.importorskip("sklearn.model_selection")
    ids = sorted(f"hippocampus_{i:03d}" for i in range(1, 2 * n, 2))
    kfold = model_selection.KFold(n_splits=5, shuffle=True, random_state=12345)
    expected = [{"train": [ids[i] for i in train], "val": [ids[i] for i in val]} for train, val in kfold.split(ids)]
    assert make_splits(list(reversed(ids))) == expected


def test_nnunets_splits_final_json_is_read_as_splits_json(tmp_path):
    """A user comparing with nnU-Net can copy its splits_final.json (a list of folds) to WORKDIR/splits.json."""
    from autoseg.training.splits import fold_cases, load_or_create_splits

    ids = [f"c{i}" for i in range(6)]
    nnunet = [{"train": ids[2:], "val": ids[:2]}, {"train": ids[:2] + ids[4:], "val": ids[2:4]}]
    (tmp_path / "splits.json").write_text(json.dumps(nnunet))
    splits = load_or_create_splits(tmp_path / "splits.json", ids)
    assert fold_cases(splits, 1, ids) == (ids[:2] + ids[4:], ids[2:4])


def test_learning_rate_follows_a_shortened_schedule():
    assert poly_lr(0.01, 0, 10) == pytest.approx(0.01)
    assert poly_lr(0.01, 5, 10) == pytest.approx(0.01 * 0.5 ** 0.9)
    assert poly_lr(0.01, 9, 10) < poly_lr(0.01, 9, 1000)


def test_train_cli_reports_a_missing_workspace_without_traceback(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nowhere"), "--fold", "0"]) == 2
    err = capsys.readouterr().err
    assert "plans.json" in err and "Traceback" not in err


def test_2d_configuration_trains_and_validates_with_per_sample_dice(make_decathlon, tmp_path, dice_modes):
    root = make_decathlon(n_cases=6, shape=(6, 16, 16))
    config = {"data_identifier": "2d", "spacing": [1.0, 1.0], "median_shape": [12, 12], "patch_size": [8, 8],
              "batch_size": 4, "batch_dice": False, "features_per_stage": [4, 8], "kernel_sizes": [[3, 3]] * 2,
              "strides": [[1, 1], [2, 2]]}
    work = planned_workspace(root, tmp_path / "work2d", plans_format_2("2d", config))
    result = train_fold(work, "2d", 0, TrainingSettings(**SETTINGS), progress=False)
    assert dice_modes == [False]
    assert len(result["history"]) == 2
    assert result["validation"]["num_cases"] >= 1
    assert (workspace.fold_dir(work, "2d", 0) / "validation" / "summary.json").is_file()


@pytest.mark.parametrize("field", ["epochs", "iters_per_epoch", "val_iters", "checkpoint_every"])
def test_a_schedule_of_zero_is_refused_with_its_option_name(field):
    with pytest.raises(TrainingError, match=field.replace("_", "-")):
        TrainingSettings(**{field: 0})


# --- the CUDA-only branches, run on the CPU through the same functions -----------------------------


def test_float16_step_with_gradient_scaling_skips_a_step_whose_gradients_overflow():
    topology = UNetTopology(in_channels=1, num_classes=2, features_per_stage=[2, 4],
                            kernel_sizes=[[3, 3, 3]] * 2, strides=[[1, 1, 1], [2, 2, 2]])
    torch.manual_seed(0)
    network = build_unet(topology, deep_supervision=False)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1, momentum=0.9)
    scaler = gradient_scaler("cpu", torch.float16)  # the trainer's CUDA choice: float16 needs loss scaling
    assert scaler.is_enabled() and not gradient_scaler("cpu", torch.bfloat16).is_enabled()
    autocast = autocast_context("cpu", torch.float16)
    data, target = torch.randn(2, 1, 8, 8, 8), torch.randint(0, 2, (2, 1, 8, 8, 8))

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            logits = network(data)
            assert logits.dtype == torch.float16
            loss = DiceCELoss()(logits, target)
        backward_and_step(loss, network, optimizer, scaler, grad_clip=12.0)
        return loss

    before = [p.detach().clone() for p in network.parameters()]
    step()
    assert any(not torch.equal(a, p) for a, p in zip(before, network.parameters())), "a finite step must update"

    weights, scale = [p.detach().clone() for p in network.parameters()], scaler.get_scale()
    hook = next(network.parameters()).register_hook(lambda grad: torch.full_like(grad, float("inf")))
    step()
    hook.remove()
    assert all(torch.equal(a, p) for a, p in zip(weights, network.parameters())), "an overflowing step must be skipped"
    assert scaler.get_scale() == scale / 2


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_a_step_with_nan_gradients_is_skipped_without_loss_scaling_too(dtype):
    topology = UNetTopology(in_channels=1, num_classes=2, features_per_stage=[2, 4],
                            kernel_sizes=[[3, 3, 3]] * 2, strides=[[1, 1, 1], [2, 2, 2]])
    torch.manual_seed(0)
    network = build_unet(topology, deep_supervision=False)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1, momentum=0.9)
    scaler = gradient_scaler("cpu", dtype)
    data, target = torch.randn(2, 1, 8, 8, 8), torch.randint(0, 2, (2, 1, 8, 8, 8))

    def step() -> bool:
        optimizer.zero_grad(set_to_none=True)
        with autocast_context("cpu", dtype)():
            loss = DiceCELoss()(network(data), target)
        return backward_and_step(loss, network, optimizer, scaler, grad_clip=12.0)

    before = [p.detach().clone() for p in network.parameters()]
    assert step() is True
    assert any(not torch.equal(a, p) for a, p in zip(before, network.parameters())), "a finite step must update"
    weights = [p.detach().clone() for p in network.parameters()]
    hook = next(network.parameters()).register_hook(lambda grad: torch.full_like(grad, float("nan")))
    assert step() is False
    hook.remove()
    assert all(torch.equal(a, p) for a, p in zip(weights, network.parameters())), "a NaN step must be skipped"
    assert step() is True and all(torch.isfinite(p).all() for p in network.parameters())


def test_an_epoch_of_only_nan_steps_stops_training_and_checkpoints_the_last_good_state(tiny_workspace, monkeypatch):
    settings = TrainingSettings(**{**SETTINGS, "epochs": 3, "validate_at_end": False, "mixed_precision": False,
                                   "checkpoint_every": 5})  # the epoch-1 state exists only in memory
    calls = {"n": 0}

    class NaNFromEpochTwo(DeepSupervisionLoss):
        def forward(self, outputs, targets):
            calls["n"] += 1
            loss = super().forward(outputs, targets)
            return loss * float("nan") if calls["n"] > settings.iters_per_epoch else loss

    monkeypatch.setattr(trainer_module, "DeepSupervisionLoss", NaNFromEpochTwo)
    with pytest.raises(TrainingError, match="diverged: every step of epoch 2 had inf or NaN gradients.*after epoch 1"):
        train_fold(tiny_workspace, "3d_fullres", 0, settings, progress=False)
    out = workspace.fold_dir(tiny_workspace, "3d_fullres", 0)
    kept = load_checkpoint(out / "checkpoint_latest.pt")
    assert kept.epoch == 1 and not (out / "checkpoint_final.pt").exists()
    assert all(torch.isfinite(v).all() for v in kept.network_state.values() if v.is_floating_point())


def test_batches_go_to_the_device_through_pinned_memory_when_pinning(monkeypatch):
    pinned = []

    def fake_pin(tensor):  # pinning itself needs CUDA; the copy path around it is what runs here
        pinned.append(tensor.shape)
        return tensor

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    data, targets = torch.randn(2, 1, 4, 4, 4), [torch.zeros(2, 1, 4, 4, 4), torch.zeros(2, 1, 2, 2, 2)]
    moved = _to_device(data, torch.device("cpu"), torch.channels_last_3d, pin_memory=True)
    moved_targets = _to_device(targets, torch.device("cpu"), None, pin_memory=True)
    assert pinned == [data.shape] + [t.shape for t in targets]
    assert torch.equal(moved, data) and moved.is_contiguous(memory_format=torch.channels_last_3d)
    assert [t.shape for t in moved_targets] == [t.shape for t in targets]
    pinned.clear()
    _to_device(data, torch.device("cpu"))
    assert pinned == []


def test_host_memory_is_pinned_only_for_an_available_cuda_device(monkeypatch):
    assert not pin_memory_for(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert not pin_memory_for(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pin_memory_for(torch.device("cuda", 1))
    assert not pin_memory_for(torch.device("cpu"))


def test_cudnn_autotuning_is_switched_on_for_cuda_only(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    configure_cudnn(torch.device("cpu"))
    assert torch.backends.cudnn.benchmark is False
    configure_cudnn(torch.device("cuda", 0))
    assert torch.backends.cudnn.benchmark is True and torch.backends.cudnn.deterministic is False


def test_batch_size_option_replaces_the_plans_batch_and_the_log_says_so(tiny_workspace, monkeypatch):
    sizes = []

    class RecordingLoader(trainer_module.PatchLoader):
        def __init__(self, data_dir, case_ids, patch_size, batch_size, *args, **kwargs):
            sizes.append(batch_size)
            super().__init__(data_dir, case_ids, patch_size, batch_size, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "PatchLoader", RecordingLoader)
    settings = TrainingSettings(**{**SETTINGS, "batch_size": 3, "validate_at_end": False})
    train_fold(tiny_workspace, "3d_fullres", 0, settings, progress=False)
    assert sizes and set(sizes) == {3}  # training and validation patches, not the plan's 2
    log = (workspace.fold_dir(tiny_workspace, "3d_fullres", 0) / "training_log.txt").read_text()
    assert "batch 3 (plan: 2)" in log
    with pytest.raises(TrainingError, match="batch-size"):
        TrainingSettings(batch_size=0)
