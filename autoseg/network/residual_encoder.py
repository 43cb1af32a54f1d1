"""The residual encoder of nnU-Net's ResEnc presets ("nnU-Net Revisited", Isensee et al., MICCAI 2024).

A stem convolution at full resolution, then per stage a stack of ResNet-D basic blocks: two
convolutions (the first strided at a stage's start) whose sum with the skip path goes through the
nonlinearity; the skip path average-pools where the block strides and projects with a 1x1 conv
where the channel count changes. The decoder is the plain U-Net's (`unet.Decoder`).

Same function as dynamic-network-architectures' `ResidualEncoderUNet` with `BasicBlockD`, which
nnunetv2's ResEnc planners build (tests/test_network.py loads its weights into this module and
compares outputs). Its convolutions carry a bias that InstanceNorm removes again; here they have
none, so its state dict maps onto this one without those biases.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from autoseg.network.layers import LEAKY_SLOPE, NORM_EPS, ConvBlock


class BasicBlock(nn.Module):
    """conv -> norm -> act -> conv -> norm, plus the skip path, then act (ResNet-D)."""

    def __init__(self, conv: type, norm: type, c_in: int, c_out: int, kernel: Sequence[int],
                 stride: Sequence[int]):
        super().__init__()
        kernel, stride = tuple(kernel), tuple(stride)
        self.conv1 = ConvBlock(conv, norm, c_in, c_out, kernel, stride)
        self.conv2 = nn.Sequential(
            conv(c_out, c_out, kernel, padding=tuple(k // 2 for k in kernel), bias=False),
            norm(c_out, eps=NORM_EPS, affine=True),
        )
        skip: list[nn.Module] = []
        if any(s != 1 for s in stride):
            pool = nn.AvgPool3d if len(stride) == 3 else nn.AvgPool2d
            skip.append(pool(stride, stride))
        if c_in != c_out:
            skip += [conv(c_in, c_out, 1, bias=False), norm(c_out, eps=NORM_EPS, affine=True)]
        self.skip = nn.Sequential(*skip)  # empty: the identity
        self.act = nn.LeakyReLU(LEAKY_SLOPE, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.conv1(x))
        out += self.skip(x)
        return self.act(out)


class ResidualEncoder(nn.Module):
    """Stem, then one stack of basic blocks per stage (`t.residual_blocks`); returns every stage's output."""

    def __init__(self, t, conv: type, norm: type):
        super().__init__()
        f = t.features_per_stage
        self.stem = ConvBlock(conv, norm, t.in_channels, f[0], t.kernel_sizes[0], [1] * t.ndim)
        channels_in = (f[0],) + f[:-1]
        self.stages = nn.ModuleList(
            nn.Sequential(BasicBlock(conv, norm, c_in, c_out, k, s),
                          *(BasicBlock(conv, norm, c_out, c_out, k, [1] * t.ndim) for _ in range(n - 1)))
            for c_in, c_out, k, s, n in zip(channels_in, f, t.kernel_sizes, t.strides, t.residual_blocks)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


def zero_last_norm_of_each_block(module: nn.Module) -> None:
    """Start each residual block as its skip path (nnU-Net's initialization): the norm before the sum at 0."""
    if isinstance(module, BasicBlock):
        nn.init.zeros_(module.conv2[1].weight)
        nn.init.zeros_(module.conv2[1].bias)
