"""U-Net topology for a patch: how often to pool each axis and which kernels to use."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MIN_FEATURE_MAP = 4          # the coarsest feature map keeps at least this many voxels per axis
SPACING_RATIO_FOR_3X3 = 2.0  # an axis much coarser than the finest one gets kernel 1 and no pooling yet


@dataclass(frozen=True)
class Topology:
    patch_size: tuple[int, ...]            # adjusted to be divisible by the total stride
    strides: tuple[tuple[int, ...], ...]   # first stage all ones
    kernel_sizes: tuple[tuple[int, ...], ...]
    features_per_stage: tuple[int, ...]

    @property
    def num_stages(self) -> int:
        return len(self.strides)


def plan_topology(patch_size: list[int], spacing: list[float], max_stages: int,
                  base_features: int = 32, max_features: int = 320) -> Topology:
    """Pool an axis while its feature map stays >= MIN_FEATURE_MAP and it is not much coarser than the finest axis.

    Along a thick axis this gives no pooling and 1-wide kernels (3x3 in-plane only) in the early
    stages, until in-plane pooling has made the voxels about as coarse.
    """
    shape = [float(p) for p in patch_size]
    current = [float(s) for s in spacing]
    ndim = len(shape)
    strides: list[tuple[int, ...]] = [(1,) * ndim]
    kernels: list[tuple[int, ...]] = [_kernel(current)]
    while len(strides) < max_stages:
        finest = min(current)
        pool = [shape[a] >= 2 * MIN_FEATURE_MAP and current[a] <= SPACING_RATIO_FOR_3X3 * finest for a in range(ndim)]
        if not any(pool):
            break
        stride = tuple(2 if p else 1 for p in pool)
        shape = [math.floor(n / s) for n, s in zip(shape, stride)]
        current = [c * s for c, s in zip(current, stride)]
        strides.append(stride)
        # An axis keeps kernel 3 once it has it; only the early stages of a thick axis use 1.
        kernels.append(tuple(max(k, n) for k, n in zip(kernels[-1], _kernel(current))))
    total = np.prod(np.array(strides), axis=0)
    adjusted = tuple(int(math.ceil(p / t) * t) for p, t in zip(patch_size, total))
    features = tuple(min(base_features * 2 ** i, max_features) for i in range(len(strides)))
    return Topology(adjusted, tuple(strides), tuple(kernels), features)


def _kernel(spacing: list[float]) -> tuple[int, ...]:
    finest = min(spacing)
    return tuple(3 if s <= SPACING_RATIO_FOR_3X3 * finest else 1 for s in spacing)
