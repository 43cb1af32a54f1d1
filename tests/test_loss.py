"""Dice + cross-entropy loss and its deep-supervision weighting."""

import pytest
import torch
import torch.nn.functional as F

from autoseg.network import UNetTopology, build_unet, deep_supervision_scales
from autoseg.training.loss import DeepSupervisionLoss, DiceCELoss, deep_supervision_weights, soft_dice_loss


def _random_target(shape=(2, 1, 4, 8, 8), num_classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, num_classes, shape, generator=g)


def _confident_logits(target, num_classes=3):
    return 20.0 * F.one_hot(target[:, 0].long(), num_classes).movedim(-1, 1).float()


def test_perfect_prediction_reaches_the_minimum():
    target = _random_target()
    logits = _confident_logits(target)
    assert soft_dice_loss(logits, target).item() == pytest.approx(-1.0, abs=1e-4)
    assert F.cross_entropy(logits, target[:, 0]).item() < 1e-6
    assert DiceCELoss()(logits, target).item() == pytest.approx(-1.0, abs=1e-4)
    wrong = DiceCELoss()(_confident_logits((target + 1) % 3), target)
    assert wrong.item() > 5.0


def test_dice_is_float32_under_bf16_autocast():
    target = _random_target()
    logits = _confident_logits(target).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = DiceCELoss()(logits, target)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(-1.0, abs=1e-3)


def test_per_sample_dice_differs_from_batch_dice_when_one_sample_is_empty():
    """nnU-Net's two Dice variants on a batch whose second sample has no foreground (background left out)."""
    target = torch.zeros(2, 1, 4, 4, dtype=torch.long)
    target[0, 0, :2, :2] = 1  # 4 foreground voxels in sample 0, none in sample 1
    p_foreground = torch.where(target == 1, 0.9, 0.1).float()
    logits = torch.cat([torch.log(1 - p_foreground), torch.log(p_foreground)], dim=1)
    s = 1e-5
    # sample 0: intersection 4 * 0.9, predicted 4 * 0.9 + 12 * 0.1, reference 4; sample 1: 0, 16 * 0.1, 0
    dice_0, dice_1 = (7.2 + s) / (3.6 + 1.2 + 4 + s), s / (1.6 + s)
    per_sample = soft_dice_loss(logits, target, batch_dice=False)
    batch = soft_dice_loss(logits, target, batch_dice=True)
    assert per_sample.item() == pytest.approx(-(dice_0 + dice_1) / 2, rel=1e-5)  # the empty sample scores ~0
    assert batch.item() == pytest.approx(-(7.2 + s) / (3.6 + 2.8 + 4 + s), rel=1e-5)  # pooled over the batch
    assert per_sample.item() > batch.item() + 0.25
    ce = F.cross_entropy(logits, target[:, 0]).item()
    assert DiceCELoss(batch_dice=False)(logits, target).item() == pytest.approx(per_sample.item() + ce, rel=1e-5)
    assert DiceCELoss()(logits, target).item() == pytest.approx(batch.item() + ce, rel=1e-5)  # batch Dice by default
    with_background = soft_dice_loss(logits, target, ignore_background=False, batch_dice=False)
    assert with_background.item() < per_sample.item()  # background Dice (near 1) now enters the mean


def test_deep_supervision_weights():
    assert deep_supervision_weights(1) == [1.0]
    assert deep_supervision_weights(2) == [1.0, 0.0]
    weights = deep_supervision_weights(4)
    assert weights == pytest.approx([4 / 7, 2 / 7, 1 / 7, 0.0])
    assert sum(weights) == pytest.approx(1.0)


def test_deep_supervision_loss_skips_zero_weight_outputs():
    calls = []

    def recording_loss(output, target):
        calls.append(output.shape[-1])
        return DiceCELoss()(output, target)

    target = _random_target()
    outputs = [_confident_logits(target), torch.zeros(2, 3, 2, 4, 4), torch.zeros(2, 3, 1, 2, 2)]
    targets = [target, target[..., ::2, ::2, ::2], target[..., ::4, ::4, ::4]]
    loss = DeepSupervisionLoss(recording_loss, deep_supervision_weights(3))(outputs, targets)
    assert calls == [8, 4]
    assert loss.item() == pytest.approx(2 / 3 * -1.0 + 1 / 3 * DiceCELoss()(outputs[1], targets[1]).item(), abs=1e-4)
    with pytest.raises(ValueError, match="expects 3 outputs"):
        DeepSupervisionLoss(recording_loss, deep_supervision_weights(3))(outputs[:2], targets[:2])


def test_tiny_network_overfits_one_sample():
    torch.manual_seed(0)
    plan = {"features_per_stage": [4, 8, 16], "kernel_sizes": [[3, 3, 3]] * 3,
            "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]]}
    net = build_unet(UNetTopology(in_channels=1, num_classes=3, **plan))
    target = torch.zeros(1, 1, 8, 16, 16, dtype=torch.long)
    target[..., 2:6, 3:9, 3:9] = 1
    target[..., 1:5, 10:14, 9:15] = 2
    image = target.float() + 0.3 * torch.randn(target.shape)
    scales = deep_supervision_scales(plan["strides"])
    targets = [F.interpolate(target.float(), scale_factor=s, mode="nearest").long() for s in scales]
    criterion = DeepSupervisionLoss(DiceCELoss(), deep_supervision_weights(len(scales)))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = criterion(net(image), targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5
    net.deep_supervision = False
    with torch.no_grad():
        prediction = net(image).argmax(1, keepdim=True)
    assert (prediction == target).float().mean() > 0.9


def test_batch_dice_terms_summed_over_ranks_give_the_dice_of_the_global_batch():
    """As two data-parallel ranks holding the same half-batch: summing the terms equals Dice on both halves."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 4, 8, 8, generator=g)
    target = _random_target()
    as_if_two_ranks = soft_dice_loss(logits, target, sum_terms=lambda terms: 2 * terms)
    whole = soft_dice_loss(torch.cat([logits, logits]), torch.cat([target, target]))
    assert as_if_two_ranks.item() == pytest.approx(whole.item(), rel=1e-6)
    # Per-sample Dice has no terms to share between ranks: sum_terms is left out.
    assert soft_dice_loss(logits, target, batch_dice=False, sum_terms=lambda terms: 2 * terms).item() == \
        pytest.approx(soft_dice_loss(logits, target, batch_dice=False).item())
