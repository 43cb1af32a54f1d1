"""The network's building blocks: convolutions (with a float32 rule for CPU bfloat16) and conv -> norm -> act.

Shared by the plain U-Net (`unet.py`) and the residual encoder (`residual_encoder.py`); the number
of entries in a kernel size picks `Conv2d`/`Conv3d` and the matching transposed conv and norm once,
in `layers_for`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

NORM_EPS = 1e-5
LEAKY_SLOPE = 0.01


def kernel_exceeds_map(spatial_shape: Sequence[int], kernel_size: Sequence[int]) -> bool:
    """Whether some axis of a feature map is shorter than the kernel along it (a map of 2 under a 3)."""
    return any(n < k for n, k in zip(spatial_shape, kernel_size))


def float32_under_cpu_bf16(conv: nn.Module, x: torch.Tensor) -> bool:
    """Whether `conv` must leave bfloat16 autocast: oneDNN's bf16 kernels break when the kernel exceeds the map.

    With torch 2.13 and 2.14 on AVX-512 CPUs, a bf16 convolution whose kernel is longer than its input
    along an axis (3x3x3 over a depth of 2, for one) gives outputs and gradients that change from call
    to call, may be NaN, and can corrupt the heap or hang; float32 is right on the same shapes
    (benchmarks/README.md, `bench_conv_bf16.py`). Plans from `autoseg plan` meet such maps only along a
    thin patch axis (2-slice volumes: every convolution falls back); small hand-written plans also
    at the bottom of the U-Net.
    """
    return (x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16 and kernel_exceeds_map(x.shape[2:], conv.kernel_size))


class _Float32WhereCpuBf16Fails:
    """Mixin for nn.ConvNd: float32 for the convolutions that `float32_under_cpu_bf16` names, else as usual."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if float32_under_cpu_bf16(self, x):
            with torch.autocast("cpu", enabled=False):
                return super().forward(x.float())
        return super().forward(x)


class Conv2d(_Float32WhereCpuBf16Fails, nn.Conv2d):
    pass


class Conv3d(_Float32WhereCpuBf16Fails, nn.Conv3d):
    pass


def layers_for(ndim: int) -> tuple[type[nn.Module], type[nn.Module], type[nn.Module]]:
    if ndim == 2:
        return Conv2d, nn.ConvTranspose2d, nn.InstanceNorm2d
    return Conv3d, nn.ConvTranspose3d, nn.InstanceNorm3d


class ConvBlock(nn.Sequential):
    """conv -> InstanceNorm -> LeakyReLU; the conv has no bias since the norm removes it anyway."""

    def __init__(self, conv: type, norm: type, c_in: int, c_out: int, kernel: Sequence[int], stride: Sequence[int]):
        super().__init__(
            conv(c_in, c_out, tuple(kernel), stride=tuple(stride), padding=tuple(k // 2 for k in kernel), bias=False),
            norm(c_out, eps=NORM_EPS, affine=True),
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
        )
