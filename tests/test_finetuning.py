"""Fine-tuning: plans carried over from a source workspace, and training that starts from its weights."""

from __future__ import annotations

import pytest
import torch

from autoseg import workspace
from autoseg.atomic import read_json
from autoseg.cli import main
from autoseg.model_files import Checkpoint, save_checkpoint
from autoseg.network.unet import build_unet
from autoseg.planning.plans import Plans
from autoseg.preprocessing import store
from autoseg.training.pretrained import PretrainedWeightsError, load_pretrained_weights

TARGET_LABELS = {0: "background", 1: "liver", 2: "tumour", 3: "vessel"}


def _plan(dataset, workdir, *extra):
    return main(["plan", str(dataset), "-o", str(workdir), "--workers", "1", *extra])


@pytest.fixture
def source_and_target(make_decathlon, tmp_path):
    source_ws = tmp_path / "source_ws"
    assert _plan(make_decathlon(tmp_path / "source"), source_ws, "--steps", "fingerprint", "plan") == 0
    target = make_decathlon(tmp_path / "target", shape=(10, 16, 14), spacing=(2.0, 1.0, 1.0), labels=TARGET_LABELS)
    return source_ws, target


def test_plans_from_a_source_workspace_preprocess_the_target_as_the_source(source_and_target, tmp_path, capsys):
    source_ws, target = source_and_target
    target_ws = tmp_path / "target_ws"
    assert _plan(target, target_ws, "--plans-from", str(source_ws), "--explain") == 0
    assert "plans_transferred_from" in capsys.readouterr().out
    source, plans = read_json(workspace.plans_json(source_ws)), read_json(workspace.plans_json(target_ws))
    assert plans["configurations"] == source["configurations"]
    assert plans["labels"] == {str(k): v for k, v in TARGET_LABELS.items()}
    assert str(workspace.plans_json(source_ws)) in plans["reasons"]["plans_transferred_from"]
    # the target's 2 mm slices are resampled to the source's 1 mm spacing: twice as many along z
    data = store.load_case_image(target_ws / "preprocessed" / "3d_fullres", "case_000")
    assert data.shape[1] == 2 * read_json(target_ws / "fingerprint.json")["cases"][0]["cropped_shape"][0]


def test_plans_from_refuses_images_with_another_channel_count(source_and_target, make_decathlon, tmp_path, capsys):
    source_ws, _ = source_and_target
    two_channels = make_decathlon(tmp_path / "two", channels=("T1", "T2"))
    assert _plan(two_channels, tmp_path / "ws2", "--plans-from", str(source_ws)) == 2
    assert "plans 1 channel(s) (MRI), dataset Synthetic has 2 (T1, T2)" in capsys.readouterr().err
    assert _plan(two_channels, tmp_path / "ws3", "--plans-from", str(source_ws), "--preset", "resenc-m") == 2
    assert "leave out --preset" in capsys.readouterr().err


def _checkpoint(plans: Plans, path, seed=0) -> dict:
    torch.manual_seed(seed)
    network = build_unet(plans.network_topology("3d_fullres"))
    save_checkpoint(path, Checkpoint(network.state_dict(), configuration="3d_fullres", fold="0", epoch=3,
                                     labels=plans.to_json()["labels"]))
    return network.state_dict()


def test_pretrained_weights_fill_the_body_and_heads_only_for_the_same_labels(source_and_target, tmp_path):
    source_ws, target = source_and_target
    assert _plan(target, tmp_path / "target_ws", "--plans-from", str(source_ws), "--steps", "fingerprint",
                 "plan") == 0
    source_plans = Plans.load(workspace.plans_json(source_ws))
    target_plans = Plans.load(workspace.plans_json(tmp_path / "target_ws"))
    weights = _checkpoint(source_plans, tmp_path / "source.pt")

    torch.manual_seed(1)
    network = build_unet(target_plans.network_topology("3d_fullres"))
    fresh_heads = {k: v.clone() for k, v in network.state_dict().items() if k.startswith("decoder.heads.")}
    note = load_pretrained_weights(network, tmp_path / "source.pt", target_plans.labels)
    assert "re-initialised, the labels differ" in note
    for key, value in network.state_dict().items():
        expected = fresh_heads[key] if key.startswith("decoder.heads.") else weights[key]
        assert torch.equal(value, expected), key

    same = build_unet(source_plans.network_topology("3d_fullres"))
    assert "the same labels" in load_pretrained_weights(same, tmp_path / "source.pt", source_plans.labels)
    assert all(torch.equal(v, weights[k]) for k, v in same.state_dict().items())


def test_pretrained_weights_of_another_network_are_refused_by_name(source_and_target, tmp_path):
    source_ws, _ = source_and_target
    plans = Plans.load(workspace.plans_json(source_ws))
    _checkpoint(plans, tmp_path / "source.pt")
    other = Plans.from_json(_with_features(plans.to_json(), 2), "x")
    with pytest.raises(PretrainedWeightsError,
                       match="encoder.stages.0.0.0.weight is .* there, .* here; .*--plans-from"):
        load_pretrained_weights(build_unet(other.network_topology("3d_fullres")), tmp_path / "source.pt", plans.labels)
    with pytest.raises(PretrainedWeightsError, match="checkpoint not found"):
        load_pretrained_weights(build_unet(plans.network_topology("3d_fullres")), tmp_path / "nope.pt", plans.labels)


def _with_features(plans_json: dict, factor: int) -> dict:
    config = plans_json["configurations"]["3d_fullres"]
    config["features_per_stage"] = [f * factor for f in config["features_per_stage"]]
    return plans_json


def test_train_with_pretrained_starts_from_the_source_weights(source_and_target, tmp_path):
    source_ws, target = source_and_target
    target_ws = tmp_path / "target_ws"
    assert _plan(target, target_ws, "--plans-from", str(source_ws)) == 0
    _checkpoint(Plans.load(workspace.plans_json(source_ws)), tmp_path / "source.pt")
    assert main(["train", str(target_ws), "--config", "3d_fullres", "--fold", "all", "--epochs", "1",
                 "--iters-per-epoch", "1", "--val-iters", "1", "--no-validation", "--workers", "0", "--device", "cpu",
                 "--pretrained", str(tmp_path / "source.pt")]) == 0
    log = (workspace.fold_dir(target_ws, "3d_fullres", "all") / "training_log.txt").read_text()
    assert f"initialised from {tmp_path / 'source.pt'}" in log and "re-initialised, the labels differ" in log
