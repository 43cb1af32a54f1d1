"""What a network from a plan costs, without building it: the planner's memory measure.

Pure integer arithmetic and no torch, so `autoseg plan` never loads torch (seconds of start-up) to
size its patches and batches; `unet.py` and `residual_encoder.py` build the networks these count.
"""

from __future__ import annotations

import math
from typing import Sequence


def feature_map_elements(
    patch_size: Sequence[int],
    features_per_stage: Sequence[int],
    strides: Sequence[Sequence[int]],
    num_classes: int,
    n_conv_per_stage: int = 2,
    deep_supervision: bool = False,
    *,
    residual_blocks: Sequence[int] = (),
    n_conv_per_stage_decoder: int | None = None,
) -> int:
    """Output elements of every convolution of one sample: the planner's memory measure.

    Counts what the convolutions write: each encoder and decoder conv (a residual encoder's as
    `encoder_feature_map_elements` says), each transposed conv, and the
    segmentation head (at full resolution only, unless `deep_supervision`), as nnU-Net v2 measures
    its networks when planning, so the planner's budget means the same patches and batches as
    nnU-Net's. Norm outputs, the skip concatenations and the input are not counted; the calibration
    constants in the planner absorb them. Pure integer arithmetic, no modules are built.
    """
    n_stages = len(features_per_stage)
    if len(strides) != n_stages:
        raise ValueError(f"features_per_stage and strides need one entry per stage, got {n_stages} and {len(strides)}")
    shape = [int(p) for p in patch_size]
    voxels_per_stage = []
    for stride in strides:
        if any(n % s for n, s in zip(shape, stride)):
            raise ValueError(f"patch size {list(patch_size)} is not divisible by the strides "
                             f"{[list(s) for s in strides]}")
        shape = [n // s for n, s in zip(shape, stride)]
        voxels_per_stage.append(math.prod(shape))

    if residual_blocks:
        total = encoder_feature_map_elements(voxels_per_stage, features_per_stage, strides, residual_blocks)
    else:
        total = sum(n_conv_per_stage * f * v for f, v in zip(features_per_stage, voxels_per_stage))
    decoder_convs = n_conv_per_stage if n_conv_per_stage_decoder is None else n_conv_per_stage_decoder
    for level, (f, v) in enumerate(zip(features_per_stage[:-1], voxels_per_stage[:-1])):
        total += f * v  # transposed conv up to this resolution
        total += decoder_convs * f * v  # decoder convs
        if deep_supervision or level == 0:
            total += num_classes * v  # segmentation head
    return total


def encoder_feature_map_elements(voxels_per_stage: Sequence[int], features_per_stage: Sequence[int],
                                 strides: Sequence[Sequence[int]], residual_blocks: Sequence[int]) -> int:
    """Conv output elements of the residual encoder for one sample, counted as nnU-Net's
    `compute_conv_feature_map_size` counts them: the stem, two convs per block, and the skip path of
    each stage's first block where it strides or changes the channel count (counted even when the skip
    only pools, as there)."""
    total = features_per_stage[0] * voxels_per_stage[0]  # stem
    channels_in = features_per_stage[0]
    for f, v, stride, n in zip(features_per_stage, voxels_per_stage, strides, residual_blocks):
        total += 2 * n * f * v
        if channels_in != f or any(s != 1 for s in stride):
            total += f * v
        channels_in = f
    return total
