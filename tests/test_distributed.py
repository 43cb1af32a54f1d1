"""Data-parallel training: 2 processes on the CPU (gloo), a tiny network on tiny synthetic data."""

from __future__ import annotations

import pytest
import torch
from test_trainer import planned_workspace, plans_format_2

import autoseg.training.trainer as trainer_module
from autoseg import workspace
from autoseg.cli import main
from autoseg.model_files import load_checkpoint
from autoseg.training import distributed
from autoseg.training.loss import DiceCELoss
from autoseg.training.patch_sampling import PatchLoader
from autoseg.training.trainer import TrainingSettings, train_fold

SETTINGS = {"iters_per_epoch": 2, "val_iters": 1, "workers": 0, "seed": 3}
FAST = {"threads": 1, "start_method": "fork"}  # forked ranks skip re-importing torch (`autoseg train --gpus` spawns)


@pytest.fixture
def tiny_workspace(make_decathlon, tmp_path):
    """A preprocessed 6-case dataset planned for a tiny 3-stage network (two outputs, the coarsest without loss)."""
    root = make_decathlon(n_cases=6, shape=(12, 16, 14))
    config = {"data_identifier": "3d_fullres", "spacing": [1.0, 1.0, 1.0], "median_shape": [8, 12, 10],
              "patch_size": [8, 8, 8], "batch_size": 2, "batch_dice": True, "features_per_stage": [2, 4, 4],
              "kernel_sizes": [[3, 3, 3]] * 3, "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]]}
    return planned_workspace(root, tmp_path / "work", plans_format_2("3d_fullres", config))


def _train_and_record(record_dir, *train_args):
    """Runs in each rank: train_fold, recording the weights each rank builds, starts from and ends with."""
    seen, saves = {}, []
    build, save = trainer_module.build_unet, trainer_module.save_checkpoint

    def build_differently_per_rank(topology, deep_supervision=True):
        torch.manual_seed(100 + distributed.rank())  # DDP must replace these by rank 0's weights
        network = build(topology, deep_supervision)
        seen["built"] = _weights(network)

        def first_forward(module, inputs):
            if "start" not in seen:
                seen["start"], seen["batch"] = _weights(module), inputs[0].detach().clone()

        network.register_forward_pre_hook(first_forward)
        seen["network"] = network
        return network

    def recording_save(path, state):
        saves.append(path.name)
        save(path, state)

    trainer_module.build_unet, trainer_module.save_checkpoint = build_differently_per_rank, recording_save
    result = train_fold(*train_args, progress=False)
    record_dir.mkdir(exist_ok=True)
    torch.save({"built": seen["built"], "start": seen["start"], "end": _weights(seen["network"]),
                "batch": seen["batch"], "saves": saves}, record_dir / f"rank{distributed.rank()}.pt")
    return result


def _weights(network) -> dict:
    return {k: v.detach().clone() for k, v in network.state_dict().items()}


def _records(record_dir) -> list[dict]:
    return [torch.load(record_dir / f"rank{r}.pt", weights_only=True) for r in range(2)]


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_ranks_start_from_rank0_weights_stay_identical_and_rank0_alone_writes(tiny_workspace, tmp_path):
    settings = TrainingSettings(**SETTINGS, epochs=2)
    result = distributed.spawn(_train_and_record, (tmp_path / "records", tiny_workspace, "3d_fullres", 0, settings),
                               2, "cpu", **FAST)
    rank0, rank1 = _records(tmp_path / "records")
    assert not _equal(rank0["built"], rank1["built"])  # the test is not trivially true
    assert _equal(rank0["start"], rank0["built"]) and _equal(rank1["start"], rank0["built"])
    assert not _equal(rank0["end"], rank0["start"])
    assert _equal(rank0["end"], rank1["end"])
    # The plan's batch of 2 is split over the ranks, each drawing its own patches.
    assert rank0["batch"].shape[0] == rank1["batch"].shape[0] == 1
    assert not torch.equal(rank0["batch"], rank1["batch"])
    # Rank 0 alone writes checkpoints (each one once), plots and validates.
    assert rank1["saves"] == [] and "checkpoint_final.pt" in rank0["saves"]
    assert rank0["saves"].count("checkpoint_latest.pt") == 2 and rank0["saves"].count("checkpoint_final.pt") == 1
    out = workspace.fold_dir(tiny_workspace, "3d_fullres", 0)
    assert _equal(load_checkpoint(out / "checkpoint_final.pt").network_state, rank0["end"])
    assert result["validation"]["num_cases"] >= 1 and (out / "progress.png").is_file()
    assert "data parallel over 2 processes (gloo): batch per rank [1, 1]" in (out / "training_log.txt").read_text()


def test_a_resumed_ddp_run_continues_where_it_stopped(tiny_workspace, tmp_path):
    first = TrainingSettings(**SETTINGS, epochs=1, validate_at_end=False)
    distributed.spawn(train_fold, (tiny_workspace, "3d_fullres", 1, first), 2, "cpu", **FAST)
    out = workspace.fold_dir(tiny_workspace, "3d_fullres", 1)
    stopped = load_checkpoint(out / "checkpoint_latest.pt")
    assert stopped.epoch == 1

    longer = TrainingSettings(**SETTINGS, epochs=2, validate_at_end=False)
    result = distributed.spawn(_train_and_record, (tmp_path / "records", tiny_workspace, "3d_fullres", 1, longer,
                                                   True), 2, "cpu", **FAST)
    rank0, rank1 = _records(tmp_path / "records")
    assert _equal(rank0["start"], stopped.network_state) and _equal(rank1["start"], stopped.network_state)
    assert _equal(rank0["end"], rank1["end"])
    assert [h["epoch"] for h in result["history"]] == [1, 2]
    assert load_checkpoint(out / "checkpoint_final.pt").epoch == 2
    assert "resumed from epoch 1" in (out / "training_log.txt").read_text()


def _batch_dice_on_half_the_batch(record_dir) -> None:
    g = torch.Generator().manual_seed(0)
    logits, target = torch.randn(4, 3, 6, 6, generator=g), torch.randint(0, 3, (4, 1, 6, 6), generator=g)
    share = slice(2 * distributed.rank(), 2 * distributed.rank() + 2)
    mine = logits[share].clone().requires_grad_()
    loss = DiceCELoss(sum_terms=distributed.sum_with_gradient)(mine, target[share])
    loss.backward()
    whole = logits.clone().requires_grad_()
    whole_loss = DiceCELoss()(whole, target)
    whole_loss.backward()
    torch.save({"loss": loss.detach(), "grad": mine.grad, "whole_loss": whole_loss.detach(),
                "whole_grad": whole.grad[share]}, record_dir / f"rank{distributed.rank()}.pt")


def test_batch_dice_over_two_ranks_gives_the_single_process_loss_and_gradients(tmp_path):
    distributed.spawn(_batch_dice_on_half_the_batch, (tmp_path,), 2, "cpu", **FAST)
    ranks = _records(tmp_path)
    # DDP averages the ranks' losses and gradients: that average is the whole batch's.
    assert (ranks[0]["loss"] + ranks[1]["loss"]) / 2 == pytest.approx(ranks[0]["whole_loss"].item(), rel=1e-5)
    for r in ranks:
        torch.testing.assert_close(r["grad"] / 2, r["whole_grad"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("batch, world", [(2, 2), (3, 2), (5, 3), (7, 4), (12, 5), (2, 1)])
@pytest.mark.parametrize("oversample", [0.0, 0.33, 0.5, 1.0])
def test_the_plans_batch_and_foreground_count_are_kept_over_the_ranks(batch, world, oversample, tmp_path):
    def forced(size: int, fraction: float) -> list[bool]:
        loader = PatchLoader(tmp_path, ["case"], [8, 8, 8], size, fraction)
        return [loader.is_forced(i) for i in range(size)]

    shares = [distributed.batch_share(batch, oversample, r, world) for r in range(world)]
    assert sum(size for size, _ in shares) == batch
    assert max(size for size, _ in shares) - min(size for size, _ in shares) <= 1
    # Rank by rank, the forced samples are those a single process forces at the same global index.
    assert [f for size, fraction in shares for f in forced(size, fraction)] == forced(batch, oversample)


def test_a_batch_smaller_than_the_ranks_is_refused():
    with pytest.raises(distributed.DistributedError, match="batch size 2 cannot be split over 3"):
        distributed.batch_share(2, 0.33, 0, 3)


def test_one_process_is_rank_0_of_1_and_collectives_are_identities():
    network = torch.nn.Linear(2, 2)
    assert not distributed.is_distributed() and distributed.is_main()
    assert (distributed.rank(), distributed.world_size(), distributed.rank_seed(5)) == (0, 1, 5)
    assert distributed.wrap(network, torch.device("cpu")) is network
    assert distributed.sum_over_ranks([1.0, 2.0]).tolist() == [1.0, 2.0]
    assert distributed.main_first(lambda x: x + 1, 1) == 2


def test_gpus_under_torchrun_is_refused(monkeypatch):
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(name, value)
    assert distributed.torchrun_launched()
    with pytest.raises(distributed.DistributedError, match="nproc_per_node"):
        distributed.launch(print, (), 2, "cpu")


def test_train_gpus_without_cuda_asks_for_device_cpu(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["train", str(tmp_path), "--config", "3d_fullres", "--fold", "0", "--gpus", "2"]) == 2
    assert "--device cpu" in capsys.readouterr().err
