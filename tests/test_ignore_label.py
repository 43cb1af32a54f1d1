"""The ignore label (nnU-Net v2's sparse annotation): read from dataset.json, left out of the loss, the
scores and the predictions, and patches centred where something is annotated."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from autoseg.cli import main
from autoseg.dataset.layout import load_dataset
from autoseg.evaluation import evaluate_case
from autoseg.planning.plans import Plans
from autoseg.postprocessing import decide_postprocessing
from autoseg.preprocessing.preprocess import sample_class_locations
from autoseg.training.loss import DiceCELoss
from autoseg.training.patch_sampling import ANNOTATED_KEY, sample_patch_box


def test_dataset_json_with_an_ignore_label_plans_a_network_without_it(make_nnunetv2, tmp_path):
    root = make_nnunetv2(labels={0: "background", 1: "liver", 2: "tumour", 3: "ignore"})
    dataset = load_dataset(root)
    assert dataset.labels[3] == "ignore"
    assert main(["plan", str(root), "-o", str(tmp_path / "ws"), "--workers", "1", "--steps", "fingerprint",
                 "plan"]) == 0
    plans = Plans.load(tmp_path / "ws" / "plans.json")
    assert plans.ignore_label == 3 and plans.num_classes == 3 and plans.foreground_labels == [1, 2]
    assert plans.network_topology("3d_fullres").num_classes == 3


def test_loss_does_not_see_the_ignored_voxels():
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 6, 8, requires_grad=True)
    target = torch.randint(0, 3, (2, 1, 6, 8))
    target[:, :, :3] = 3  # the top half unannotated
    loss = DiceCELoss(ignore_label=3, batch_dice=False)
    value = loss(logits, target)
    value.backward()
    assert torch.all(logits.grad[:, :, :3] == 0) and torch.any(logits.grad[:, :, 3:] != 0)
    changed = logits.detach().clone()
    changed[:, :, :3] = torch.randn(2, 3, 3, 8) * 10  # anything at unannotated voxels
    assert torch.allclose(loss(changed, target), value.detach())
    # the annotated half alone, scored without any ignore label, is the same loss
    assert torch.allclose(DiceCELoss(batch_dice=False)(logits.detach()[:, :, 3:], target[:, :, 3:]), value.detach())
    nothing = torch.full_like(target, 3)
    assert torch.isfinite(loss(logits.detach(), nothing))  # a batch with nothing annotated adds no NaN


def test_scores_leave_the_ignored_voxels_out():
    ref = np.zeros((10, 10), np.uint8)
    ref[2:5, 2:5] = 1
    ref[:, 7:] = 3  # unannotated: the prediction may say anything there
    pred = np.zeros_like(ref)
    pred[2:5, 2:5] = 1
    pred[:, 8:] = 1
    scores = evaluate_case(pred, ref, (1.0, 1.0), [1], ignore_label=3)
    assert scores["1"]["dice"] == 1.0 and scores["1"]["fp"] == 0
    assert evaluate_case(pred, ref, (1.0, 1.0), [1])["1"]["fp"] == 20
    # postprocessing counts the same way: the island in unannotated voxels costs nothing
    rules = decide_postprocessing([(pred, ref)] * 2, [1], ignore_label=3)
    assert rules["dice_before"]["1"] == 1.0 and rules["largest_component_labels"] == []


def test_random_patches_are_centred_on_annotated_voxels():
    seg = np.full((1, 40, 40), 3, np.int8)  # all unannotated but one corner
    seg[0, 30:, 30:] = 0
    seg[0, 35, 35] = 1
    locations = {ANNOTATED_KEY if k == "annotated" else int(k): np.asarray(v)
                 for k, v in sample_class_locations(seg, ignore_label=3).items()}
    assert set(locations) == {1, ANNOTATED_KEY} and len(locations[ANNOTATED_KEY]) == 100
    rng = np.random.default_rng(0)
    for _ in range(50):
        lower, upper = sample_patch_box((1, 40, 40), (8, 8), rng, None, locations)
        assert lower[1] >= 30 - 4 and lower[2] >= 30 - 4  # centred on the annotated corner


@pytest.mark.parametrize("layout", ["decathlon", "nnunetv2"])
def test_evaluate_finds_the_ignore_label_in_dataset_json(tmp_path, layout, capsys):
    import SimpleITK as sitk

    pred_dir, ref_dir = tmp_path / "pred", tmp_path / "data" / "labelsTr"
    pred_dir.mkdir()
    ref_dir.mkdir(parents=True)
    ref = np.zeros((4, 6, 6), np.uint8)
    ref[1:3, 1:3, 1:3] = 1
    ref[:, :, 5] = 2
    pred = np.where(ref == 2, 1, ref).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(ref), str(ref_dir / "a.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(pred), str(pred_dir / "a.nii.gz"))
    labels = ({"0": "background", "1": "organ", "2": "ignore"} if layout == "decathlon"
              else {"background": 0, "organ": 1, "ignore": 2})
    (tmp_path / "data" / "dataset.json").write_text(json.dumps({"labels": labels}))
    assert main(["evaluate", str(pred_dir), str(ref_dir)]) == 0
    summary = json.loads((pred_dir / "summary.json").read_text())
    assert summary["labels"] == [1] and summary["mean"]["1"]["dice"] == 1.0
