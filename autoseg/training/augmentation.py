"""How training patches are augmented (batchgenerators transforms) and fed from background workers.

The rules are nnU-Net v2's (its nnUNetTrainer), decided per configuration from the patch shape:
`rotation_for_patch` gives the rotation range and whether a 3D patch is a slab augmented slice by
slice; `training_patch_size` gives the enlarged patch the loader reads (nnU-Net's initial patch
size). The spatial transform rotates and scales about the centre of that read patch and crops the
network's patch from its centre, so the final patch lies where `patch_sampling` puts it. The
enlargement covers the rotation and a zoom-out of 1/0.85 only, as in nnU-Net, while scaling goes
up to 1.4: samples reaching past the read patch get image 0 and label -1 there.

Probabilities are per sample unless stated:

1. Spatial: rotation with p 0.2 (2D: +-15 degrees for elongated patches, else +-180; 3D: about
   each axis by +-30 degrees, slabs in-plane only by +-180), isotropic scaling in [0.7, 1.4]
   (above 1 zooms out) with p 0.2, the factor uniform over the range as nnU-Net 2.8.1 draws it
   (`--augment-scale-draw batchgenerators`: below or above 1 with p 0.5 each); linear
   interpolation for images (`--augment-interpolation`) with 0 outside, nearest for labels with -1
   outside (`--augment-label-interpolation linear`: the label whose linearly interpolated indicator
   is highest, as nnU-Net 2.8.1). Slab patches are transformed slice by slice (axis 0 untouched). Before it, where the
   plan or `autoseg train --elastic` asks, the U-Net paper's elastic deformation
   (`GridElasticDeformation`: a 3 x 3 grid of displacements with a standard deviation of 10 voxels,
   cubic interpolation; off by default, as in nnU-Net).
2. Gaussian noise, variance in [0, 0.1], p 0.1.
3. Gaussian blur, sigma in [0.5, 1] drawn per axis, p 0.2, each channel with p 0.5 and its own sigmas.
4. Multiplicative brightness in [0.75, 1.25], p 0.15.
5. Contrast in [0.75, 1.25] (value range preserved), p 0.15.
6. Simulated low resolution: nearest downsampling by 0.5-1 (one factor for all axes) and linear
   upsampling, p 0.25, each channel with p 0.5 (slabs: axis 0 kept).
7. Gamma in [0.7, 1.5] on the inverted image, p 0.1; then gamma in [0.7, 1.5], p 0.3 (mean and
   standard deviation retained).
8. Mirroring along each of `mirror_axes` with p 0.5.
9. Masking: in the channels normalized within the non-zero mask, the image is set to 0 wherever
   the label is -1 (outside that mask, outside the volume, outside the read patch), which is what
   inference sees there.
10. Labels: -1 becomes background 0; labels are downsampled (nearest) to each deep-supervision
    scale and converted to tensors: `data` float32 (B, C, *patch), `target` a list of int64
    (B, 1, *scaled patch).
"""

from __future__ import annotations

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
from batchgenerators.transforms.color_transforms import (
    BrightnessMultiplicativeTransform,
    ContrastAugmentationTransform,
    GammaTransform,
)
from batchgenerators.transforms.noise_transforms import GaussianBlurTransform, GaussianNoiseTransform
from batchgenerators.transforms.resample_transforms import SimulateLowResolutionTransform
from batchgenerators.transforms.spatial_transforms import MirrorTransform, SpatialTransform
from batchgenerators.transforms.utility_transforms import NumpyToTensor
from scipy import ndimage

from autoseg.planning.plans import ElasticDeformation
from autoseg.training.cascade import MoveSegAsOneHotToData, RandomBinaryOperator, RemoveRandomComponent

logger = logging.getLogger(__name__)

DEFAULT_SCALE_RANGE = (0.7, 1.4)
# `autoseg train --augment-interpolation`: the spline order of the spatial transform's image interpolation.
# Linear is nnU-Net 2.8.1's rule and the default: an equal-budget ablation found no loss against cubic and
# a 2.7x cheaper transform (docs/planning.md)
AUGMENT_INTERPOLATIONS = {"cubic": 3, "linear": 1}
DEFAULT_AUGMENT_INTERPOLATION = "linear"
# How the spatial transform draws its scale factor (docs/planning.md): "uniform" over the whole range (nnU-Net
# 2.8.1's batchgeneratorsv2 draw: below 1 with p (1 - lo) / (hi - lo), 0.43 for [0.7, 1.4]; the default since the
# equal-budget ablation found it at least as good) or "batchgenerators" (below or above 1 with p 0.5 each, uniform on
# each side; autoseg's earlier rule)
SCALE_DRAWS = ("batchgenerators", "uniform")
DEFAULT_SCALE_DRAW = "uniform"
# `autoseg train --augment-label-interpolation`: how the spatial transform resamples label maps. "nearest" takes the
# nearest voxel's label (autoseg's rule, the default); "linear" interpolates each label's indicator linearly and
# keeps the label scoring highest, ties settled by the nearest voxel (nnU-Net 2.8.1's batchgeneratorsv2 rule;
# batchgenerators' order_seg=1 computes the same argmax). docs/planning.md has the ablation
LABEL_INTERPOLATIONS = {"nearest": 0, "linear": 1}
DEFAULT_LABEL_INTERPOLATION = "nearest"
SLAB_RATIO = 3.0  # a 3D patch whose largest side exceeds this times axis 0 is augmented in-plane only
ELONGATED_2D_RATIO = 1.5  # a 2D patch longer than this times its width rotates by +-15 degrees only
READ_PATCH_ZOOM_OUT = 0.85  # the read patch covers scaling down to this factor (nnU-Net's value)


def rotation_for_patch(patch_size: Sequence[int]) -> tuple[tuple[float, float], bool]:
    """Rotation range in radians, and whether a 3D patch is rotated and scaled within its slices only.

    nnU-Net's rule. 2D: +-15 degrees when the longer side exceeds 1.5 times the shorter, else
    +-180. 3D: a slab (largest side more than 3 times axis 0) is turned about axis 0 only, by up to
    +-180 degrees; any other patch about every axis by up to +-30 degrees. The flag is False for 2D
    patches, which have no axis 0 to keep.
    """
    patch = [int(p) for p in patch_size]
    if len(patch) == 2:
        limit = 15.0 if max(patch) / min(patch) > ELONGATED_2D_RATIO else 180.0
        return (-math.radians(limit), math.radians(limit)), False
    if len(patch) == 3:
        in_plane_only = max(patch) / patch[0] > SLAB_RATIO
        limit = 180.0 if in_plane_only else 30.0
        return (-math.radians(limit), math.radians(limit)), in_plane_only
    raise ValueError(f"patch_size must have 2 or 3 entries, got {patch}")


def training_patch_size(patch_size: Sequence[int]) -> list[int]:
    """The patch to read before the spatial transform: nnU-Net's initial patch size, margins made whole.

    nnU-Net's rule: turn the patch's corner vector by the largest angle of `rotation_for_patch`
    (at most 90 degrees) about each axis in turn, take per axis the largest absolute value and the
    patch itself, divide by 0.85 and truncate; a slab keeps its axis 0. Then each axis grows by one
    voxel where needed so that read and final patch differ by an even number: batchgenerators'
    centre crop then takes exactly the box `patch_sampling` describes, and the centre of a rotated
    patch falls on a voxel.
    """
    patch = [int(p) for p in patch_size]
    rotation, in_plane_only = rotation_for_patch(patch)
    angle = min(max(abs(a) for a in rotation), math.pi / 2)
    corner = np.array(patch, dtype=float)
    reach = corner.copy()
    if len(patch) == 2:
        reach = np.maximum(reach, np.abs(rotate_coords_2d(corner, angle)))
    else:
        for angles in ((angle, 0, 0), (0, angle, 0), (0, 0, angle)):
            reach = np.maximum(reach, np.abs(rotate_coords_3d(corner, *angles)))
    read = [int(r / READ_PATCH_ZOOM_OUT) for r in reach]
    if in_plane_only:
        read[0] = patch[0]
    return [r + (r - p) % 2 for r, p in zip(read, patch)]


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


class MaskImageOutsideNonzero(AbstractTransform):
    """Set `channels` of the image to 0 wherever the label is negative (-1: outside the non-zero mask).

    For the channels normalized within the non-zero mask, which inference sees as 0 there; the
    other channels are left alone.
    """

    def __init__(self, channels: Sequence[int]):
        self.channels = [int(c) for c in channels]

    def __call__(self, **data_dict):
        if self.channels:
            outside = np.asarray(data_dict["seg"])[:, 0] < 0
            data = data_dict["data"]
            for c in self.channels:
                data[:, c][outside] = 0
        return data_dict


class GridElasticDeformation(AbstractTransform):
    """The U-Net paper's elastic deformation: random displacements on a coarse grid, smoothly interpolated.

    Ronneberger et al. (2015) draw one displacement vector per node of a 3 x 3 grid over the tile from
    a normal distribution with a standard deviation of 10 pixels and interpolate the per-pixel
    displacements bicubically. Here the grid has `grid_points` nodes per deformed axis, the field is
    upsampled by cubic spline (scipy's `zoom`, order 3, corners on corners), and the image is sampled
    cubically (0 outside), the labels by nearest neighbour (-1 outside, as the spatial transform fills).
    It runs on the read patch, before rotation and scaling, so the margins that the field pulls in
    from outside mostly fall outside the final, centre-cropped patch. `in_plane_only` (3D slabs)
    deforms axes 1 and 2 with one field for every slice.
    """

    def __init__(self, grid_points: int = 3, sigma: float = 10.0, p_per_sample: float = 1.0,
                 in_plane_only: bool = False):
        if grid_points < 2:
            raise ValueError(f"grid_points must be at least 2, got {grid_points}")
        self.grid_points, self.sigma, self.p_per_sample = int(grid_points), float(sigma), float(p_per_sample)
        self.in_plane_only = in_plane_only

    def field(self, shape: Sequence[int]) -> np.ndarray:
        """Per-voxel displacements (len(shape), *shape) in voxels, from one draw of the coarse grid."""
        ndim = len(shape)
        coarse = np.random.normal(0.0, self.sigma, (ndim,) + (self.grid_points,) * ndim)
        factors = [n / self.grid_points for n in shape]  # output n voxels, the first and last on the end nodes
        out = np.empty((ndim, *shape), dtype=np.float32)
        for axis in range(ndim):
            fine = ndimage.zoom(coarse[axis], factors, order=3, mode="nearest", grid_mode=False)
            out[axis] = _fit(fine, shape)
        return out

    def __call__(self, **data_dict):
        data, seg = data_dict["data"], data_dict.get("seg")
        for b in range(data.shape[0]):
            if np.random.uniform() >= self.p_per_sample:
                continue
            spatial = data.shape[2:]
            deformed_axes = spatial[1:] if self.in_plane_only else spatial
            displacement = self.field(deformed_axes)
            coords = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in deformed_axes], indexing="ij")
            coords = np.stack([c + d for c, d in zip(coords, displacement)])
            slices = range(spatial[0]) if self.in_plane_only else [None]
            for z in slices:
                index = (b, slice(None)) if z is None else (b, slice(None), z)
                data[index] = [ndimage.map_coordinates(channel, coords, order=3, mode="constant", cval=0.0)
                               for channel in data[index]]
                if seg is not None:
                    seg[index] = [ndimage.map_coordinates(channel, coords, order=0, mode="constant", cval=-1)
                                  for channel in seg[index]]
        return data_dict


def _fit(array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Crop or edge-pad `array` to `shape` (zoom's output can be one voxel off by rounding)."""
    array = array[tuple(slice(0, n) for n in shape)]
    pad = [(0, n - s) for n, s in zip(shape, array.shape)]
    return np.pad(array, pad, mode="edge") if any(p for _, p in pad) else array


class RoundSegToLabels(AbstractTransform):
    """Turn the labels left by the transforms into integer ids; -1 (outside) becomes background 0.

    int16, so label ids above 127 stay exact.
    """

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


class UniformScaleDraw(AbstractTransform):
    """A spatial transform whose scale factor is uniform over [lo, hi], from two batchgenerators SpatialTransforms.

    batchgenerators draws below 1 or above 1 with p 0.5 each. Sending a share q = 2 (1 - lo) / (hi - lo) of the
    samples through a transform over [lo, hi] (half of them below 1) and the others through one over [1, hi]
    puts (1 - lo) / (hi - lo) of the scaled samples below 1, each side still uniform: the uniform draw over [lo, hi],
    with the rotation, its probabilities and the interpolation unchanged."""

    def __init__(self, whole_range: AbstractTransform, upper_range: AbstractTransform, share_whole: float):
        self.whole_range, self.upper_range, self.share_whole = whole_range, upper_range, share_whole

    def __call__(self, **data_dict):
        data, seg = data_dict["data"], data_dict.get("seg")
        outputs = []
        for i in range(data.shape[0]):
            transform = self.whole_range if np.random.random() < self.share_whole else self.upper_range
            one = {"data": data[i:i + 1]}
            if seg is not None:
                one["seg"] = seg[i:i + 1]
            outputs.append(transform(**one))
        data_dict["data"] = np.concatenate([o["data"] for o in outputs])
        if seg is not None:
            data_dict["seg"] = np.concatenate([o["seg"] for o in outputs])
        return data_dict


def _to_tensors() -> list[AbstractTransform]:
    return [NumpyToTensor(["data"], "float"), NumpyToTensor(["target"], "long")]


def training_transforms(
    patch_size: Sequence[int],
    *,
    mirror_axes: Sequence[int] | None,
    deep_supervision_scales: list[list[float]] | None,
    nonzero_mask_channels: Sequence[int] = (),
    scale_range: Sequence[float] = DEFAULT_SCALE_RANGE,
    elastic: ElasticDeformation | None = None,
    previous_stage_labels: Sequence[int] = (),
    image_order: int = AUGMENT_INTERPOLATIONS[DEFAULT_AUGMENT_INTERPOLATION],
    scale_draw: str = DEFAULT_SCALE_DRAW,
    label_order: int = LABEL_INTERPOLATIONS[DEFAULT_LABEL_INTERPOLATION],
) -> Compose:
    """The training augmentation (see the module docstring) for patches read at `training_patch_size`.

    `nonzero_mask_channels` lists the channels normalized within the non-zero mask (plans.json
    "use_nonzero_mask"); they are set to 0 where the label is -1. `elastic` adds the U-Net paper's
    elastic deformation with those settings. `previous_stage_labels` (a cascade's
    second stage) turns seg channel 1 into one input channel per label and perturbs them
    (training/cascade.py). `image_order` is the spline order of the spatial transform's image
    interpolation (1 linear as nnU-Net 2.8.1, the default; 3 cubic). `label_order` is that of the labels: 0
    nearest (the default), 1 the argmax of each label's linearly interpolated indicator (nnU-Net 2.8.1's), the
    voxels outside the read patch -1 either way. `scale_draw` is one of SCALE_DRAWS.
    """
    if scale_draw not in SCALE_DRAWS:
        raise ValueError(f"scale_draw must be one of {', '.join(SCALE_DRAWS)}, got {scale_draw!r}")
    if label_order not in LABEL_INTERPOLATIONS.values():
        raise ValueError(f"label_order must be one of {sorted(LABEL_INTERPOLATIONS.values())}, got {label_order!r}")
    patch = [int(p) for p in patch_size]
    ndim = len(patch)
    rotation, in_plane_only = rotation_for_patch(patch)
    spatial_patch = patch[1:] if in_plane_only else patch
    other_axes = rotation if len(spatial_patch) == 3 else (0.0, 0.0)  # a 2D transform turns about one axis

    def spatial_over(scales: tuple[float, float]) -> SpatialTransform:
        return SpatialTransform(
            spatial_patch, patch_center_dist_from_border=None,
            do_elastic_deform=False,
            do_rotation=True, angle_x=rotation, angle_y=other_axes, angle_z=other_axes,
            p_rot_per_sample=0.2, do_scale=True, scale=scales, p_scale_per_sample=0.2,
            border_mode_data="constant", border_cval_data=0, order_data=image_order,
            border_mode_seg="constant", border_cval_seg=-1, order_seg=label_order, random_crop=False,
        )

    low, high = (float(s) for s in scale_range)
    spatial: AbstractTransform = spatial_over((low, high))
    if scale_draw == "uniform" and low < 1 < high:
        spatial = UniformScaleDraw(spatial, spatial_over((1.0, high)), 2 * (1 - low) / (high - low))
    transforms: list[AbstractTransform] = []
    if elastic is not None:
        transforms.append(GridElasticDeformation(elastic.grid_points, elastic.sigma, elastic.probability,
                                                 in_plane_only=in_plane_only))
    transforms += [_FoldAxis0IntoChannels(), spatial, _UnfoldAxis0FromChannels()] if in_plane_only else [spatial]
    transforms += [
        GaussianNoiseTransform(noise_variance=(0.0, 0.1), p_per_sample=0.1),
        GaussianBlurTransform(blur_sigma=(0.5, 1.0), different_sigma_per_channel=True, different_sigma_per_axis=True,
                              p_isotropic=0.0, p_per_channel=0.5, p_per_sample=0.2),
        BrightnessMultiplicativeTransform(multiplier_range=(0.75, 1.25), per_channel=True, p_per_sample=0.15),
        ContrastAugmentationTransform(contrast_range=(0.75, 1.25), preserve_range=True, per_channel=True,
                                      p_per_sample=0.15),
        SimulateLowResolutionTransform(zoom_range=(0.5, 1.0), per_channel=True, p_per_channel=0.5,
                                       order_downsample=0, order_upsample=1, p_per_sample=0.25,
                                       ignore_axes=(0,) if in_plane_only else None),
        GammaTransform(gamma_range=(0.7, 1.5), invert_image=True, per_channel=True, retain_stats=True,
                       p_per_sample=0.1),
        GammaTransform(gamma_range=(0.7, 1.5), invert_image=False, per_channel=True, retain_stats=True,
                       p_per_sample=0.3),
    ]
    if mirror_axes:
        if max(mirror_axes) >= ndim:
            raise ValueError(f"mirror_axes {list(mirror_axes)} refer to spatial axes of a {ndim}D patch {patch}")
        transforms.append(MirrorTransform(tuple(mirror_axes)))
    transforms += [MaskImageOutsideNonzero(nonzero_mask_channels), RoundSegToLabels()]
    if previous_stage_labels:
        n = len(previous_stage_labels)
        transforms += [MoveSegAsOneHotToData(previous_stage_labels), RandomBinaryOperator(n), RemoveRandomComponent(n)]
    transforms.append(DownsampleSegForDeepSupervision(deep_supervision_scales))
    return Compose(transforms + _to_tensors())


def validation_transforms(deep_supervision_scales: list[list[float]] | None,
                          previous_stage_labels: Sequence[int] = ()) -> Compose:
    """No augmentation: labels (-1 becomes 0), a cascade's first-stage channels, deep-supervision targets and
    tensors (loader reads the final patch)."""
    previous = [MoveSegAsOneHotToData(previous_stage_labels)] if previous_stage_labels else []
    return Compose([RoundSegToLabels(), *previous, DownsampleSegForDeepSupervision(deep_supervision_scales)]
                   + _to_tensors())


def default_workers() -> int:
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


def make_loader(loader, transforms: Compose, workers: int, seed: int, pin_memory: bool = False
                ) -> AugmentedBatches:
    """Iterator of augmented batches; `workers` background processes, or in-process when 0.

    Each worker seeds numpy's global generator (used by the transforms) from `seed`; the loader's
    own sampling is seeded by the loader. With 0 workers this process's numpy and `random` global
    generators are seeded, so the batches are reproducible; workers draw the Gaussian-noise variance
    from `random`, which Python reseeds from the OS in each child. Infinite loaders use a
    non-deterministic order across workers (whichever batch is ready first); a finite loader keeps
    the round-robin order. `pin_memory` pins the tensors when CUDA is available.
    """
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    steps = list(transforms.transforms)
    n_numpy = len(steps)
    while n_numpy > 0 and isinstance(steps[n_numpy - 1], NumpyToTensor):
        n_numpy -= 1
    numpy_transforms, to_tensors = Compose(steps[:n_numpy]), steps[n_numpy:]
    if workers == 0:
        state = int(np.random.SeedSequence(seed).generate_state(1)[0])
        np.random.seed(state)
        random.seed(state)
        return AugmentedBatches(SingleThreadedAugmenter(loader, numpy_transforms), to_tensors, pin_memory)
    seeds = [int(s) for s in np.random.SeedSequence(seed).generate_state(workers)]
    if getattr(loader, "infinite", True):
        augmenter = NonDetMultiThreadedAugmenter(loader, numpy_transforms, workers,
                                                 num_cached=max(3, workers), seeds=seeds)
    else:
        if getattr(loader, "number_of_threads_in_multithreaded", workers) != workers:
            logger.warning("finite loader was built for %s workers but runs with %s; cases may repeat or be "
                           "skipped", loader.number_of_threads_in_multithreaded, workers)
        augmenter = MultiThreadedAugmenter(loader, numpy_transforms, workers, num_cached_per_queue=2,
                                           seeds=seeds)
    return AugmentedBatches(augmenter, to_tensors, pin_memory)


def shutdown_loader(batches: AugmentedBatches) -> None:
    """Stop the background workers of an iterator from `make_loader` (no-op when in-process)."""
    batches.close()
