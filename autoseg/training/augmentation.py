"""How training patches are augmented (batchgenerators transforms) and fed from background workers.

The loader reads an enlarged patch (`training_patch_size`); the spatial transform rotates/scales
about its centre and centre-crops to the network's patch size, so no empty corners appear.
Probabilities are per sample unless stated; ranges are the values commonly used for U-Net
training on CT/MR:

1. Spatial: rotation with p 0.2 (isotropic 3D: about each axis in [-30, 30] degrees; 2D and
   anisotropic 3D: in-plane only, about axis 0, in [-180, 180] degrees), isotropic scaling in
   [0.7, 1.4] with p 0.2, optional elastic deformation (off by default; alpha 0-200, sigma 9-13,
   p 0.2); cubic interpolation for images, nearest for labels, zeros outside. Anisotropic 3D
   patches are transformed slice by slice (axis 0 untouched).
2. Gaussian noise, variance in [0, 0.1], p 0.1.
3. Gaussian blur, sigma in [0.5, 1], p 0.2, each channel with p 0.5 and its own sigma.
4. Multiplicative brightness in [0.75, 1.25], p 0.15.
5. Contrast in [0.75, 1.25] (value range preserved), p 0.15.
6. Simulated low resolution: nearest downsampling by 0.5-1 and cubic upsampling, p 0.25, each
   channel with p 0.5 (anisotropic 3D: axis 0 kept).
7. Gamma in [0.7, 1.5] on the inverted image, p 0.1; then gamma in [0.7, 1.5], p 0.3 (mean and
   standard deviation retained).
8. Mirroring along each of `mirror_axes` with p 0.5.
9. Labels rounded to ids, downsampled (nearest) to each deep-supervision scale, converted to
   tensors: `data` float32 (B, C, *patch), `target` a list of int64 (B, 1, *scaled patch).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import random
from typing import Sequence

import numpy as np
import torch
from batchgenerators.augmentations.utils import rotate_coords_2d, rotate_coords_3d
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from batchgenerators.transforms.abstract_transforms import AbstractTransform, Compose
from batchgenerators.transforms.color_transforms import (BrightnessMultiplicativeTransform,
                                                         ContrastAugmentationTransform, GammaTransform)
from batchgenerators.transforms.noise_transforms import GaussianBlurTransform, GaussianNoiseTransform
from batchgenerators.transforms.resample_transforms import SimulateLowResolutionTransform
from batchgenerators.transforms.spatial_transforms import MirrorTransform, SpatialTransform
from batchgenerators.transforms.utility_transforms import NumpyToTensor

logger = logging.getLogger(__name__)

DEFAULT_SCALE_RANGE = (0.7, 1.4)


def default_rotation_range(ndim: int, anisotropic: bool) -> tuple[float, float]:
    """Rotation angle range in radians: +-30 degrees for isotropic 3D, full in-plane turn otherwise."""
    if ndim == 3 and not anisotropic:
        return (-math.pi / 6, math.pi / 6)
    return (-math.pi, math.pi)


def training_patch_size(
    patch_size: Sequence[int],
    rotation_range_rad: Sequence[float] | None = None,
    scale_range: Sequence[float] = DEFAULT_SCALE_RANGE,
    *,
    anisotropic: bool = False,
) -> list[int]:
    """Patch to read so that any rotation/scaling in range, centre-cropped to `patch_size`, stays inside it.

    Anisotropic 3D rotates and scales in-plane only, so axis 0 keeps its size. Each enlarged axis
    differs from `patch_size` by an even number, so the plain centre crop needs no interpolation.
    """
    patch = [int(p) for p in patch_size]
    ndim = len(patch)
    if ndim not in (2, 3):
        raise ValueError(f"patch_size must have 2 or 3 entries, got {patch}")
    if rotation_range_rad is None:
        rotation_range_rad = default_rotation_range(ndim, anisotropic)
    in_plane = patch[1:] if ndim == 3 and anisotropic else patch
    lo, hi = float(rotation_range_rad[0]), float(rotation_range_rad[1])
    angles = np.unique(np.concatenate([np.linspace(lo, hi, 25 if len(in_plane) == 2 else 9),
                                       [0.0] if lo <= 0 <= hi else []]))
    half = np.array([(p - 1) / 2 for p in in_plane])
    corners = np.array(list(itertools.product(*[(-h, h) for h in half]))).T  # (dim, n_corners)
    reach = np.abs(corners).max(axis=1)
    if len(in_plane) == 2:
        for a in angles:
            reach = np.maximum(reach, np.abs(rotate_coords_2d(corners, a)).max(axis=1))
    else:
        for ax, ay, az in itertools.product(angles, repeat=3):
            reach = np.maximum(reach, np.abs(rotate_coords_3d(corners, ax, ay, az)).max(axis=1))
    reach *= max(1.0, float(max(scale_range)))
    enlarged = []
    for p, r in zip(in_plane, reach):
        size = max(p, math.ceil(2 * r + 1 - 1e-6))
        enlarged.append(size + (size - p) % 2)
    return patch[:1] + enlarged if ndim == 3 and anisotropic else enlarged


class _FoldAxis0IntoChannels(AbstractTransform):
    """(B, C, Z, Y, X) -> (B, C*Z, Y, X) so a 2D spatial transform treats every slice alike."""

    def __init__(self, keys: Sequence[str] = ("data", "seg")):
        self.keys = tuple(keys)

    def __call__(self, **data_dict):
        data_dict["_channels_before_fold"] = {}
        for key in self.keys:
            array = data_dict[key]
            data_dict["_channels_before_fold"][key] = array.shape[1]
            data_dict[key] = array.reshape(array.shape[0], -1, *array.shape[3:])
        return data_dict


class _UnfoldAxis0FromChannels(AbstractTransform):
    """Inverse of `_FoldAxis0IntoChannels`."""

    def __call__(self, **data_dict):
        for key, channels in data_dict.pop("_channels_before_fold").items():
            array = data_dict[key]
            data_dict[key] = array.reshape(array.shape[0], channels, -1, *array.shape[2:])
        return data_dict


class RoundSegToLabels(AbstractTransform):
    """Turn the float labels left by spatial transforms back into integer ids (negatives become 0)."""

    def __init__(self, key: str = "seg"):
        self.key = key

    def __call__(self, **data_dict):
        seg = np.rint(np.asarray(data_dict[self.key]))
        seg[seg < 0] = 0
        data_dict[self.key] = seg.astype(np.int16)
        return data_dict


def _nearest_indices(n_in: int, n_out: int) -> np.ndarray:
    return np.minimum(((np.arange(n_out) + 0.5) * n_in / n_out).astype(np.int64), n_in - 1)


class DownsampleSegForDeepSupervision(AbstractTransform):
    """Write `target`: the labels at each deep-supervision scale (nearest neighbour), in the order given.

    Each scale lists a factor per spatial axis; the output size is ceil(size * factor), which is the
    size a stride-s convolution with 'same' padding produces. `input_key` is removed.
    """

    def __init__(self, scales: Sequence[Sequence[float]] | None, input_key: str = "seg",
                 output_key: str = "target"):
        self.scales = None if scales is None else [[float(f) for f in s] for s in scales]
        self.input_key = input_key
        self.output_key = output_key

    def __call__(self, **data_dict):
        seg = data_dict.pop(self.input_key)
        spatial = seg.shape[2:]
        targets = []
        for scale in self.scales or [[1.0] * len(spatial)]:
            if len(scale) != len(spatial):
                raise ValueError(f"deep-supervision scale {scale} does not match a patch of shape {spatial}")
            out = [max(1, math.ceil(n * f - 1e-6)) for n, f in zip(spatial, scale)]
            if list(out) == list(spatial):
                targets.append(seg)
            else:
                index = np.ix_(*[_nearest_indices(n, o) for n, o in zip(spatial, out)])
                targets.append(np.ascontiguousarray(seg[(slice(None), slice(None)) + index]))
        data_dict[self.output_key] = targets
        return data_dict


def _to_tensors() -> list[AbstractTransform]:
    return [NumpyToTensor(["data"], "float"), NumpyToTensor(["target"], "long")]


def training_transforms(
    patch_size: Sequence[int],
    *,
    anisotropic: bool,
    mirror_axes: Sequence[int] | None,
    deep_supervision_scales: list[list[float]] | None,
    rotation_rad: Sequence[float] | None = None,
    scale_range: Sequence[float] = DEFAULT_SCALE_RANGE,
    elastic: bool = False,
) -> Compose:
    """The training augmentation (see the module docstring); input patches come from `training_patch_size`."""
    patch = [int(p) for p in patch_size]
    ndim = len(patch)
    anisotropic_3d = ndim == 3 and anisotropic
    rotation = tuple(rotation_rad) if rotation_rad is not None else default_rotation_range(ndim, anisotropic)
    spatial_patch = patch[1:] if anisotropic_3d else patch
    in_plane_only = len(spatial_patch) == 2 or anisotropic_3d
    spatial = SpatialTransform(
        spatial_patch, patch_center_dist_from_border=None,
        do_elastic_deform=elastic, alpha=(0.0, 200.0), sigma=(9.0, 13.0), p_el_per_sample=0.2,
        do_rotation=True, angle_x=rotation,
        angle_y=(0.0, 0.0) if in_plane_only else rotation, angle_z=(0.0, 0.0) if in_plane_only else rotation,
        p_rot_per_sample=0.2, do_scale=True, scale=tuple(scale_range), p_scale_per_sample=0.2,
        border_mode_data="constant", border_cval_data=0, order_data=3,
        border_mode_seg="constant", border_cval_seg=0, order_seg=0, random_crop=False,
    )
    transforms: list[AbstractTransform] = (
        [_FoldAxis0IntoChannels(), spatial, _UnfoldAxis0FromChannels()] if anisotropic_3d else [spatial])
    transforms += [
        GaussianNoiseTransform(noise_variance=(0.0, 0.1), p_per_sample=0.1),
        GaussianBlurTransform(blur_sigma=(0.5, 1.0), different_sigma_per_channel=True, p_per_channel=0.5,
                              p_per_sample=0.2),
        BrightnessMultiplicativeTransform(multiplier_range=(0.75, 1.25), per_channel=True, p_per_sample=0.15),
        ContrastAugmentationTransform(contrast_range=(0.75, 1.25), preserve_range=True, per_channel=True,
                                      p_per_sample=0.15),
        SimulateLowResolutionTransform(zoom_range=(0.5, 1.0), per_channel=True, p_per_channel=0.5,
                                       order_downsample=0, order_upsample=3, p_per_sample=0.25,
                                       ignore_axes=(0,) if anisotropic_3d else None),
        GammaTransform(gamma_range=(0.7, 1.5), invert_image=True, per_channel=True, retain_stats=True,
                       p_per_sample=0.1),
        GammaTransform(gamma_range=(0.7, 1.5), invert_image=False, per_channel=True, retain_stats=True,
                       p_per_sample=0.3),
    ]
    if mirror_axes:
        if max(mirror_axes) >= ndim:
            raise ValueError(f"mirror_axes {list(mirror_axes)} refer to spatial axes of a {ndim}D patch {patch}")
        transforms.append(MirrorTransform(tuple(mirror_axes)))
    transforms += [RoundSegToLabels(), DownsampleSegForDeepSupervision(deep_supervision_scales)]
    return Compose(transforms + _to_tensors())


def validation_transforms(deep_supervision_scales: list[list[float]] | None) -> Compose:
    """No augmentation: label clean-up, deep-supervision targets and tensors (loader reads the final patch)."""
    return Compose([RoundSegToLabels(), DownsampleSegForDeepSupervision(deep_supervision_scales)] + _to_tensors())


def default_num_workers() -> int:
    """Background augmentation workers: one core left for the training process, at most 12."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(12, cores - 1))


class AugmentedBatches:
    """Iterator over augmented batches from `make_loader`; call `close()` (or `shutdown_loader`) when done.

    Workers send numpy arrays; the trailing tensor conversion runs here, in the training process.
    Passing torch tensors between processes relies on file-descriptor sharing, which fails when a
    worker exits before its batch is read (at shutdown) and can exhaust open files in long runs.
    """

    def __init__(self, augmenter, to_tensors: Sequence[AbstractTransform], pin_memory: bool):
        self.augmenter = augmenter
        self.to_tensors = Compose(list(to_tensors))
        self.pin_memory = pin_memory and torch.cuda.is_available()

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        batch = self.to_tensors(**next(self.augmenter))
        if self.pin_memory:
            batch = {k: _pinned(v) for k, v in batch.items()}
        return batch

    def close(self) -> None:
        finish = getattr(self.augmenter, "_finish", None)
        if finish is not None:
            finish()


def _pinned(value):
    if isinstance(value, torch.Tensor):
        return value.pin_memory()
    if isinstance(value, list):
        return [_pinned(v) for v in value]
    return value


def make_loader(loader, transforms: Compose, num_workers: int, seed: int, pin_memory: bool = False
                ) -> AugmentedBatches:
    """Iterator of augmented batches; `num_workers` background processes, or in-process when 0.

    Each worker seeds numpy's global generator (used by the transforms) from `seed`; the loader's
    own sampling is seeded by the loader. With 0 workers this process's numpy and `random` global
    generators are seeded, so the batches are reproducible; workers draw the Gaussian-noise variance
    from `random`, which Python reseeds from the OS in each child. Infinite loaders use a
    non-deterministic order across workers (whichever batch is ready first); a finite loader keeps
    the round-robin order. `pin_memory` pins the tensors when CUDA is available.
    """
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    steps = list(transforms.transforms)
    n_numpy = len(steps)
    while n_numpy > 0 and isinstance(steps[n_numpy - 1], NumpyToTensor):
        n_numpy -= 1
    numpy_transforms, to_tensors = Compose(steps[:n_numpy]), steps[n_numpy:]
    if num_workers == 0:
        state = int(np.random.SeedSequence(seed).generate_state(1)[0])
        np.random.seed(state)
        random.seed(state)
        return AugmentedBatches(SingleThreadedAugmenter(loader, numpy_transforms), to_tensors, pin_memory)
    seeds = [int(s) for s in np.random.SeedSequence(seed).generate_state(num_workers)]
    if getattr(loader, "infinite", True):
        augmenter = NonDetMultiThreadedAugmenter(loader, numpy_transforms, num_workers,
                                                 num_cached=max(3, num_workers), seeds=seeds)
    else:
        if getattr(loader, "number_of_threads_in_multithreaded", num_workers) != num_workers:
            logger.warning("finite loader was built for %s workers but runs with %s; cases may repeat or be "
                           "skipped", loader.number_of_threads_in_multithreaded, num_workers)
        augmenter = MultiThreadedAugmenter(loader, numpy_transforms, num_workers, num_cached_per_queue=2,
                                           seeds=seeds)
    return AugmentedBatches(augmenter, to_tensors, pin_memory)


def shutdown_loader(batches: AugmentedBatches) -> None:
    """Stop the background workers of an iterator from `make_loader` (no-op when in-process)."""
    batches.close()
