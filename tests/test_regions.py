"""Region-based labels (nnU-Net v2's BraTS-style regions): read from dataset.json, one sigmoid output per region,
Dice + binary cross-entropy, label maps written region by region, and regions scored."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from autoseg import workspace
from autoseg.cli import main
from autoseg.dataset.layout import DatasetError, load_dataset
from autoseg.dataset.regions import Region, label_map_from_regions, order_problems, region_mask
from autoseg.evaluation import evaluate_case
from autoseg.inference.original_grid import LabelMapBuilder, logits_to_original, probabilities_to_labels
from autoseg.planning.plans import Plans
from autoseg.preprocessing.preprocess import sample_class_locations
from autoseg.preprocessing.properties import CaseProperties
from autoseg.training.loss import RegionDiceBCELoss, region_targets

# BraTS 2013's labels as regions: whole tumour (1-4), tumour core (1, 3, 4), enhancing (4)
BRATS = {"background": 0, "whole_tumour": [1, 2, 3, 4], "tumour_core": [1, 3, 4], "enhancing": 4}
BRATS_ORDER = [2, 1, 4]


def _with_labels(root, labels, order=None):
    meta = json.loads((root / "dataset.json").read_text())
    meta["labels"] = labels
    if order is not None:
        meta["regions_class_order"] = order
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_dataset_json_regions_become_regions_with_the_ids_they_are_written_as(make_nnunetv2):
    root = _with_labels(make_nnunetv2(n_cases=1), BRATS, BRATS_ORDER)
    dataset = load_dataset(root)
    assert dataset.regions == (Region("whole_tumour", (1, 2, 3, 4), 2), Region("tumour_core", (1, 3, 4), 1),
                               Region("enhancing", (4,), 4))
    # every id of the label files has a name: its own where dataset.json gives one, else "label_<id>"
    assert dataset.labels == {0: "background", 1: "label_1", 2: "label_2", 3: "label_3", 4: "enhancing"}
    assert order_problems(dataset.regions) == []


@pytest.mark.parametrize("labels, order, message", [
    (BRATS, None, "needs 'regions_class_order'"),
    (BRATS, [2, 1], "has 2 entries for 3 regions"),
    (BRATS, [2, 1, 9], "writes id(s) [9] that no label uses"),
    ({"background": 0, "all": [0, 1, 2]}, [1], "contains the background"),
    ({"background": 0, "whole": [1.5, 2], "core": 2}, [1, 2], "a whole number >= 0"),
    ({"background": 0, "whole": ["a", 2], "core": 2}, [1, 2], "a whole number >= 0"),
    ({"background": 0, "whole": [1, 2], "core": 1, "ignore": 2}, [1, 2], "no region may contain it"),
])
def test_bad_region_definitions_are_refused_naming_dataset_json(make_nnunetv2, labels, order, message):
    root = _with_labels(make_nnunetv2(n_cases=1), labels, order)
    with pytest.raises(DatasetError, match=re.escape(message)) as caught:
        load_dataset(root)
    assert "dataset.json" in str(caught.value)


def test_an_order_that_overwrites_a_region_is_reported():
    inner_first = (Region("core", (2,), 2), Region("whole", (1, 2), 1))
    assert any("'whole' contains 'core'" in p for p in order_problems(inner_first))


def test_written_label_map_gives_each_region_back():
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 5, size=(6, 7, 8))
    regions = load_regions()
    masks = np.stack([region_mask(truth, r) for r in regions]).astype(np.float32)
    written = label_map_from_regions(masks, regions)
    assert set(np.unique(written)) <= {0, 1, 2, 4}
    for r, m in zip(regions, masks):
        assert np.array_equal(region_mask(written, r), m > 0)


def load_regions() -> tuple[Region, ...]:
    return (Region("whole_tumour", (1, 2, 3, 4), 2), Region("tumour_core", (1, 3, 4), 1), Region("enhancing", (4,), 4))


def test_region_loss_is_dice_plus_bce_and_ignores_unannotated_voxels():
    regions = [(1, 2), (2,)]
    target = torch.tensor([[[[0, 1, 2, 2], [0, 0, 1, 2]]]])  # (1, 1, 2, 4)
    wanted = region_targets(target, regions).float()
    assert wanted[0, 0].tolist() == [[0, 1, 1, 1], [0, 0, 1, 1]]
    assert wanted[0, 1].tolist() == [[0, 0, 1, 1], [0, 0, 0, 1]]
    loss = RegionDiceBCELoss(regions, batch_dice=True)
    perfect = loss(20.0 * (2 * wanted - 1), target)
    assert perfect.item() == pytest.approx(-1.0, abs=1e-4)  # Dice 1 per region, BCE ~0
    logits = torch.randn(1, 2, 2, 4)
    by_hand = (-((2 * (torch.sigmoid(logits) * wanted).sum((0, 2, 3)) + 1e-5)
                 / (torch.sigmoid(logits).sum((0, 2, 3)) + wanted.sum((0, 2, 3)) + 1e-5)).mean()
               + torch.nn.functional.binary_cross_entropy_with_logits(logits, wanted))
    assert loss(logits, target).item() == pytest.approx(by_hand.item(), rel=1e-5)
    # voxels marked ignore (label 3) change nothing, whatever the network says there
    sparse = target.clone()
    sparse[0, 0, 1, 0] = 3
    masked = RegionDiceBCELoss(regions, ignore_label=3)
    changed = logits.clone()
    changed[..., 1, 0] += 50.0
    assert masked(logits, sparse).item() == pytest.approx(masked(changed, sparse).item(), rel=1e-6)


def test_foreground_locations_are_stored_per_region_under_its_written_id():
    seg = np.zeros((4, 10, 10), np.int16)
    seg[1, 2:5, 2:5] = 1
    seg[2, 6:9, 6:9] = 4
    locations = sample_class_locations(seg, regions=load_regions())
    assert sorted(locations) == ["1", "2", "4"]
    for r in load_regions():
        coords = np.asarray(locations[str(r.written_as)])
        assert region_mask(seg[tuple(coords.T)], r).all()
    assert len(locations["2"]) == 18 and len(locations["4"]) == 9


def _properties(shape) -> CaseProperties:
    from autoseg.dataset.image_io import Geometry

    geometry = Geometry((1.0,) * 3, (0.0,) * 3, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), shape)
    return CaseProperties(geometry, ((0, shape[0]), (1, shape[1] - 1), (0, shape[2])),
                          (shape[0], shape[1] - 2, shape[2]), (shape[0], 5, shape[2]), (1.0, 1.6, 1.0), "c", {})


@pytest.fixture
def region_plans(make_nnunetv2, tmp_path):
    root = _with_labels(make_nnunetv2(n_cases=2), BRATS, BRATS_ORDER)
    assert main(["plan", str(root), "-o", str(tmp_path / "ws"), "--workers", "1", "--steps", "fingerprint",
                 "plan"]) == 0
    return Plans.load(tmp_path / "ws" / "plans.json")


def test_plans_carry_the_regions_and_the_network_has_one_output_per_region(region_plans):
    assert [r.name for r in region_plans.regions] == ["whole_tumour", "tumour_core", "enhancing"]
    assert region_plans.num_classes == 3
    assert region_plans.network_topology("3d_fullres").num_classes == 3
    assert region_plans.output_labels == {0: "background", 2: "whole_tumour", 1: "tumour_core", 4: "enhancing"}
    assert Plans.from_json(region_plans.to_json()) == region_plans
    assert "regions" in region_plans.reasons


@pytest.mark.parametrize("configurations", [1, 2])
def test_label_map_builder_writes_regions_as_export_does(region_plans, configurations):
    shape = (6, 9, 7)
    properties = _properties(shape)
    rng = np.random.default_rng(configurations)
    logits = [rng.normal(size=(3, 6, 5, 7)).astype(np.float32) for _ in range(configurations)]
    builder = LabelMapBuilder([properties] * configurations, region_plans, 3, uncertainty=True)
    builder.add(0, [p.copy() for p in logits])
    probabilities = np.mean([logits_to_original(p, properties, region_plans) for p in logits], axis=0)
    assert probabilities[:, :, 0].max() == 0.0  # outside the crop: no region
    expected = probabilities_to_labels(probabilities, region_plans)
    assert np.array_equal(builder.labels, expected)
    assert set(np.unique(builder.labels)) <= {0, 1, 2, 4}
    assert all(0.0 <= u <= 1.0 for u in builder.uncertainty().values())


def test_regions_are_scored_by_their_written_id():
    ref = np.array([[0, 1, 2, 3, 4, 4]])
    pred = np.array([[0, 2, 2, 1, 4, 1]])
    scores = evaluate_case(pred, ref, (1.0, 1.0), {r.written_as: r.labels for r in load_regions()})
    assert scores["2"]["dice"] == pytest.approx(1.0)  # whole tumour: the same 5 voxels
    assert scores["1"]["dice"] == pytest.approx(2 * 3 / (3 + 4))  # core: predicted at 3 of its 4 voxels
    assert scores["4"]["dice"] == pytest.approx(2 * 1 / (1 + 2))


def test_region_based_plan_train_predict_evaluate(make_nnunetv2, tmp_path, capsys):
    root = _with_labels(make_nnunetv2(n_cases=5, labels={0: "background", 1: "a", 2: "b"}),
                        {"background": 0, "whole": [1, 2], "core": 2}, [1, 2])
    ws = tmp_path / "ws"
    assert main(["plan", str(root), "-o", str(ws), "--workers", "1", "--configs", "3d_fullres"]) == 0
    plans = json.loads((ws / "plans.json").read_text())
    assert plans["regions"] == [{"name": "whole", "labels": [1, 2], "written_as": 1},
                                {"name": "core", "labels": [2], "written_as": 2}]
    config = plans["configurations"]["3d_fullres"]
    config["features_per_stage"] = [4 * 2 ** i for i in range(len(config["features_per_stage"]))]
    (ws / "plans.json").write_text(json.dumps(plans))
    assert main(["train", str(ws), "--config", "3d_fullres", "--fold", "0", "--epochs", "1", "--iters-per-epoch",
                 "2", "--val-iters", "1", "--workers", "0", "--device", "cpu"]) == 0
    fold = workspace.fold_dir(ws, "3d_fullres", 0)
    assert "binary cross-entropy over 2 regions" in (fold / "training_log.txt").read_text()
    validation = json.loads((fold / "validation" / "summary.json").read_text())
    assert {k: m["name"] for k, m in validation["mean"].items()} == {"1": "whole", "2": "core"}
    out = tmp_path / "out"
    assert main(["predict", str(ws), "--config", "3d_fullres", "--folds", "0", "-i", str(root / "imagesTr"),
                 "-o", str(out), "--no-report", "--no-mirroring", "--save-probabilities"]) == 0
    from autoseg.dataset.image_io import read_image

    labels, _ = read_image(out / "case_000.nii.gz")
    assert set(np.unique(labels)) <= {0, 1, 2}
    with np.load(out / "case_000.npz") as saved:
        probabilities = saved["probabilities"].astype(np.float32)
    assert probabilities.shape[0] == 2 and probabilities.min() >= 0 and probabilities.max() <= 1
    # the label map is the saved (float16) probabilities over 0.5, region by region, away from rounding at 0.5
    again = label_map_from_regions(probabilities, (Region("whole", (1, 2), 1), Region("core", (2,), 2)))
    clear = (np.abs(probabilities - 0.5) > 1e-2).all(axis=0)
    assert clear.sum() > 0.5 * clear.size and np.array_equal(again[clear], labels[clear])
    capsys.readouterr()
    assert main(["evaluate", str(out), str(root / "labelsTr")]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["label_names"] == {"1": "whole", "2": "core"}


def test_evaluate_folders_scores_the_regions_it_is_given(tmp_path):
    from autoseg.dataset.image_io import Geometry, write_image
    from autoseg.evaluation import evaluate_folders

    geometry = Geometry((1.0,) * 3, (0.0,) * 3, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), (1, 2, 6))
    ref = np.array([[[0, 1, 2, 3, 4, 4], [0, 0, 0, 0, 0, 0]]], np.uint8)
    pred = np.array([[[0, 2, 2, 1, 4, 1], [0, 0, 0, 0, 0, 0]]], np.uint8)
    for folder, array in (("pred", pred), ("ref", ref)):
        (tmp_path / folder).mkdir()
        write_image(tmp_path / folder / "c.nii.gz", array, geometry)
    summary = evaluate_folders(tmp_path / "pred", tmp_path / "ref", output_dir=tmp_path, regions=load_regions())
    assert summary["labels"] == [2, 1, 4]
    assert summary["label_names"] == {"2": "whole_tumour", "1": "tumour_core", "4": "enhancing"}
    assert summary["mean"]["2"]["dice"] == pytest.approx(1.0) and summary["mean"]["4"]["dice"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("batch_dice, ignore, expected", [
    (True, False, 0.7677727341651917), (True, True, 1.7824347019195557),
    (False, False, 0.7714451551437378), (False, True, 1.7855122089385986),
])
def test_region_loss_equals_nnunets_dc_and_bce_loss(batch_dice, ignore, expected):
    """Reference values from nnunetv2 2.8.1's DC_and_BCE_loss (MemoryEfficientSoftDiceLoss, do_bg, smooth 1e-5) on
    these inputs, with the ignore label as its last target channel where used (computed in its own venv)."""
    logits = torch.sin(torch.arange(2 * 2 * 3 * 4, dtype=torch.float32) * 0.7).reshape(2, 2, 3, 4) * 3
    labels = (torch.arange(2 * 3 * 4) % 4).reshape(2, 1, 3, 4)  # ids 0..3; 3 marks unannotated voxels
    if not ignore:
        labels = torch.where(labels == 3, 0, labels)
    loss = RegionDiceBCELoss([(1, 2), (2,)], batch_dice=batch_dice, ignore_label=3 if ignore else None)
    assert loss(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_a_single_region_trains_a_one_output_network():
    from autoseg.network.unet import UNetTopology, build_unet

    topology = UNetTopology(in_channels=1, num_classes=1, features_per_stage=(4, 8), kernel_sizes=((3, 3), (3, 3)),
                            strides=((1, 1), (2, 2)))
    network = build_unet(topology, deep_supervision=False)
    logits = network(torch.zeros(2, 1, 8, 8))
    assert logits.shape == (2, 1, 8, 8)
    target = torch.zeros(2, 1, 8, 8, dtype=torch.long)
    target[:, :, 2:5, 2:5] = 2
    RegionDiceBCELoss([(1, 2)])(logits, target).backward()


def test_a_checkpoint_trained_with_other_regions_is_refused(region_plans, tmp_path):
    from dataclasses import replace

    from autoseg.inference.predictor import PredictorError, check_trained_with_these_plans
    from autoseg.model_files import Checkpoint

    state = Checkpoint({}, labels=region_plans.to_json()["labels"], regions=region_plans.to_json()["regions"])
    check_trained_with_these_plans(tmp_path / "c.pt", state, region_plans, "3d_fullres")  # the same: accepted
    fewer = replace(region_plans, regions=region_plans.regions[:2])
    with pytest.raises(PredictorError, match="regions were"):
        check_trained_with_these_plans(tmp_path / "c.pt", state, fewer, "3d_fullres")


def test_regions_on_an_untouched_grid_are_the_sigmoids_over_one_half_written_in_order(region_plans):
    """No crop, no resampling: the label map is computed here by hand from the logits, independently of export."""
    from autoseg.dataset.image_io import Geometry

    shape = (3, 4, 5)
    geometry = Geometry((1.0,) * 3, (0.0,) * 3, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), shape)
    properties = CaseProperties(geometry, tuple((0, n) for n in shape), shape, shape, (1.0,) * 3, "k")
    logits = np.random.default_rng(3).normal(size=(3, *shape)).astype(np.float32)
    builder = LabelMapBuilder([properties], region_plans, 3)
    builder.add(0, [logits.copy()])
    expected = np.zeros(shape, np.uint8)
    for k, written in enumerate((2, 1, 4)):  # whole tumour, core, enhancing
        expected[logits[k] > 0] = written
    assert np.array_equal(builder.labels, expected)


def test_crossval_ensembles_average_the_region_probabilities(region_plans, tmp_path):
    from autoseg.crossval import _ensemble_prediction

    a = np.zeros((3, 1, 2, 2), np.float16)
    b = np.zeros((3, 1, 2, 2), np.float16)
    a[0] = [[[0.9, 0.7], [0.2, 0.6]]]  # whole tumour: mean 0.8, 0.45, 0.3, 0.5 with b's
    b[0] = [[[0.7, 0.2], [0.4, 0.4]]]
    a[1, 0, 0, 0], b[1, 0, 0, 0] = 0.8, 0.4  # core at the first voxel only (mean 0.6)
    for config, p in (("2d", a), ("3d_fullres", b)):
        folder = workspace.fold_dir(tmp_path, config, 0) / "validation"
        folder.mkdir(parents=True)
        np.savez(folder / "c.npz", probabilities=p)
    merged = _ensemble_prediction(tmp_path, ["2d", "3d_fullres"], "c", {"2d": 0, "3d_fullres": 0}, region_plans)
    assert merged.tolist() == [[[1, 0], [0, 0]]]  # core written over the whole tumour; 0.45 and 0.5 are not over
