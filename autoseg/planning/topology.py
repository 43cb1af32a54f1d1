"""U-Net topology for a patch: how often to pool each axis and which kernels to use (nnU-Net v2's rule)."""

from __future__ import annotations

import math
from dataclasses import dataclass

MIN_FEATURE_MAP = 4          # an axis is pooled only while its feature map keeps at least 2x this many voxels
SPACING_RATIO_FOR_POOL = 2.0  # an axis pools (and gets kernel 3) only while under 2x coarser than the finest one
SINGLE_AXIS_MIN_SIZE = 3 * MIN_FEATURE_MAP  # a lone remaining axis pools only while at least this large


@dataclass(frozen=True)
class Topology:
    patch_size: tuple[int, ...]            # rounded up to a multiple of the total stride
    strides: tuple[tuple[int, ...], ...]   # first stage all ones
    kernel_sizes: tuple[tuple[int, ...], ...]
    features_per_stage: tuple[int, ...]

    @property
    def num_stages(self) -> int:
        return len(self.strides)

    @property
    def total_stride(self) -> tuple[int, ...]:
        return tuple(math.prod(s[a] for s in self.strides) for a in range(len(self.patch_size)))


def plan_topology(patch_size: list[float], spacing: list[float], base_features: int = 32,
                  max_features: int = 320) -> Topology:
    """Pool, stage after stage, every axis that can still be pooled; no fixed cap on the number of stages.

    An axis can be pooled while its feature map has at least 2 * MIN_FEATURE_MAP voxels and its
    current spacing is under 2x the finest spacing among the axes that can still be pooled, so an
    axis that has stopped (too small) no longer holds the others back. When a single axis remains
    it needs 3 * MIN_FEATURE_MAP voxels. A kernel is 1 along an axis while that axis is 2x or more
    coarser than the finest axis, and 3 from then on; the bottleneck always gets 3 along every axis.
    """
    ndim = len(spacing)
    size = [float(p) for p in patch_size]
    current = [float(s) for s in spacing]
    kernel = [1] * ndim
    strides: list[tuple[int, ...]] = [(1,) * ndim]
    kernels: list[tuple[int, ...]] = []
    pools = [0] * ndim
    while True:
        big_enough = [a for a in range(ndim) if size[a] >= 2 * MIN_FEATURE_MAP]
        if not big_enough:
            break
        finest = min(current[a] for a in big_enough)
        poolable = [a for a in big_enough if current[a] / finest < SPACING_RATIO_FOR_POOL]
        if len(poolable) == 1 and size[poolable[0]] < SINGLE_AXIS_MIN_SIZE:
            break
        if not poolable:
            break
        overall_finest = min(current)
        kernel = [3 if k == 3 or current[a] / overall_finest < SPACING_RATIO_FOR_POOL else 1
                  for a, k in enumerate(kernel)]
        kernels.append(tuple(kernel))
        stride = tuple(2 if a in poolable else 1 for a in range(ndim))
        for a in poolable:
            pools[a] += 1
            current[a] *= 2
            size[a] = math.ceil(size[a] / 2)
        strides.append(stride)
    kernels.append((3,) * ndim)
    divisor = [2 ** p for p in pools]
    adjusted = tuple(int(math.ceil(p / d - 1e-9) * d) for p, d in zip(patch_size, divisor))
    features = tuple(min(base_features * 2 ** i, max_features) for i in range(len(strides)))
    return Topology(adjusted, tuple(strides), tuple(kernels), features)
