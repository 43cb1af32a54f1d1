"""Segmentation losses: soft Dice (batch or per sample) + cross-entropy, its region-based form (sigmoid outputs,
Dice + binary cross-entropy), and the deep-supervision weighting."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn


def soft_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, ignore_background: bool = True, smooth: float = 1e-5,
    batch_dice: bool = True, sum_terms: Callable[[torch.Tensor], torch.Tensor] | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Negative mean soft Dice over classes (about -1 when perfect); float32 even under autocast.

    `logits` is (B, C, *spatial); `target` holds label ids, shape (B, 1, *spatial). Batch Dice
    sums over the batch and spatial axes per class, so small structures in one sample are not
    drowned by empty samples. Per-sample Dice (`batch_dice=False`) sums over space per sample and
    class, then averages over samples and classes; a class absent from a sample then scores about
    0 there unless the prediction is also (almost exactly) empty. Both as nnU-Net's
    MemoryEfficientSoftDiceLoss, with the background left out by default.

    With batch Dice, `sum_terms` (e.g. `distributed.sum_with_gradient`) sums the per-class terms
    over the processes of a data-parallel run, so the Dice covers the global batch. `mask` (B, 1,
    *spatial), true where a voxel counts, leaves the others out of every term (the ignore label).
    """
    if target.shape[0] != logits.shape[0] or target.shape[2:] != logits.shape[2:] or target.shape[1] != 1:
        raise ValueError(
            f"target must have shape (B, 1, *spatial) matching logits {tuple(logits.shape)}, got {tuple(target.shape)}"
        )
    with torch.autocast(device_type=logits.device.type, enabled=False):
        probs = torch.softmax(logits.float(), dim=1)
        one_hot = torch.zeros_like(probs).scatter_(1, target.long(), 1.0)
        dice = _soft_dice(probs, one_hot, mask, smooth, batch_dice, sum_terms)
        if ignore_background:
            dice = dice[..., 1:]
        return -dice.mean()


def _soft_dice(probs: torch.Tensor, one_hot: torch.Tensor, mask: torch.Tensor | None, smooth: float,
               batch_dice: bool, sum_terms: Callable[[torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    """Soft Dice per channel, (C,) with batch Dice or (B, C) per sample, from float32 probabilities and targets."""
    if mask is not None:
        probs, one_hot = probs * mask, one_hot * mask
    axes = ([0] if batch_dice else []) + list(range(2, probs.dim()))
    intersection = (probs * one_hot).sum(axes)
    denominator = probs.sum(axes) + one_hot.sum(axes)
    if batch_dice and sum_terms is not None:
        intersection, denominator = sum_terms(torch.stack([intersection, denominator])).unbind(0)
    return (2.0 * intersection + smooth) / (denominator + smooth).clamp_min(1e-8)


def region_targets(target: torch.Tensor, regions: Sequence[Sequence[int]]) -> torch.Tensor:
    """(B, 1, *spatial) label ids -> (B, R, *spatial) bool, true where the voxel's label belongs to region r."""
    return torch.cat([torch.isin(target, torch.as_tensor(list(r), device=target.device)) for r in regions], dim=1)


class DiceCELoss(nn.Module):
    """Soft Dice plus cross-entropy, weight 1 each: Dice handles class imbalance, CE gives smooth gradients.

    `batch_dice` comes from the configuration in plans.json; `sum_terms` (see `soft_dice_loss`) is
    set in a data-parallel run. With `ignore_label` (plans.json's label named "ignore"), voxels of that
    label count in neither term, as in nnU-Net v2; a batch without an annotated voxel adds no
    cross-entropy.
    """

    def __init__(self, ignore_background: bool = True, smooth: float = 1e-5, batch_dice: bool = True,
                 sum_terms: Callable[[torch.Tensor], torch.Tensor] | None = None, ignore_label: int | None = None):
        super().__init__()
        self.ignore_background = ignore_background
        self.smooth = smooth
        self.batch_dice = batch_dice
        self.sum_terms = sum_terms
        self.ignore_label = ignore_label

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        mask = None
        if self.ignore_label is not None:
            mask = target != self.ignore_label
            target = torch.where(mask, target, 0)  # any valid class: masked out of both terms below
        dice = soft_dice_loss(logits, target, self.ignore_background, self.smooth, self.batch_dice, self.sum_terms,
                              mask)
        with torch.autocast(device_type=logits.device.type, enabled=False):
            if mask is None:
                ce = F.cross_entropy(logits.float(), target[:, 0].long())
            elif mask.any():
                per_voxel = F.cross_entropy(logits.float(), target[:, 0].long(), reduction="none")
                ce = per_voxel[mask[:, 0]].mean()
            else:
                ce = logits.sum() * 0.0  # nothing annotated here: no gradient from this term
        return dice + ce


class RegionDiceBCELoss(nn.Module):
    """Region-based training (nnU-Net v2's DC_and_BCE_loss): one sigmoid output per region, soft Dice over every
    region (no background channel) plus binary cross-entropy, weight 1 each. Targets stay label maps and are
    turned into region masks here, so augmentation and deep-supervision downsampling are those of labels.
    Voxels of `ignore_label` count in neither term."""

    def __init__(self, regions: Sequence[Sequence[int]], smooth: float = 1e-5, batch_dice: bool = True,
                 sum_terms: Callable[[torch.Tensor], torch.Tensor] | None = None, ignore_label: int | None = None):
        super().__init__()
        if not regions:
            raise ValueError("region-based loss needs at least one region")
        self.regions = [tuple(int(v) for v in r) for r in regions]
        self.smooth = smooth
        self.batch_dice = batch_dice
        self.sum_terms = sum_terms
        self.ignore_label = ignore_label

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if logits.shape[1] != len(self.regions) or target.shape[1] != 1 or target.shape[2:] != logits.shape[2:]:
            raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} do not fit "
                             f"{len(self.regions)} regions: expected (B, R, *spatial) and (B, 1, *spatial)")
        mask = None if self.ignore_label is None else target != self.ignore_label
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits = logits.float()
            regions = region_targets(target, self.regions).float()
            dice = _soft_dice(torch.sigmoid(logits), regions, mask, self.smooth, self.batch_dice, self.sum_terms)
            if mask is None:
                bce = F.binary_cross_entropy_with_logits(logits, regions)
            else:
                per_voxel = F.binary_cross_entropy_with_logits(logits, regions, reduction="none") * mask
                # summed over the regions and averaged over the annotated voxels, as nnU-Net v2.8.1 (so R times
                # the mean of the unmasked case)
                bce = per_voxel.sum() / mask.sum().clamp_min(1e-8)
        return -dice.mean() + bce


def deep_supervision_weights(n_outputs: int) -> list[float]:
    """Weights 1, 1/2, 1/4, ... (full resolution first), the coarsest output dropped, normalized to sum 1."""
    if n_outputs < 1:
        raise ValueError(f"n_outputs must be >= 1, got {n_outputs}")
    weights = [0.5**i for i in range(n_outputs)]
    if n_outputs > 1:
        weights[-1] = 0.0
    total = sum(weights)
    return [w / total for w in weights]


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of a loss over the network's outputs at several resolutions; zero weights are skipped."""

    def __init__(self, loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], weights: Sequence[float]):
        super().__init__()
        self.loss = loss
        self.weights = tuple(float(w) for w in weights)

    def forward(self, outputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(outputs) != len(self.weights) or len(targets) != len(self.weights):
            raise ValueError(
                f"deep supervision expects {len(self.weights)} outputs and targets, got {len(outputs)} and "
                f"{len(targets)}; build the weights with deep_supervision_weights(len(deep_supervision_scales(...)))"
            )
        total = None
        for weight, output, target in zip(self.weights, outputs, targets):
            if weight == 0.0:
                continue
            term = weight * self.loss(output, target)
            total = term if total is None else total + term
        if total is None:
            raise ValueError("all deep supervision weights are zero; at least one output must be weighted")
        return total
