"""Predict a whole volume with a patch-sized network: overlapping windows, Gaussian-weighted, mirrored."""

from __future__ import annotations

import functools
import itertools
import logging
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from autoseg.device import autocast_for

logger = logging.getLogger(__name__)

HOST = torch.device("cpu")
# Finished rows are handed out in slabs this deep, so the caller's per-slab work (resampling, argmax)
# stays small beside the accumulator band.
SLAB_ROWS = 8
# Share of the free device memory the accumulator may take; the rest is left for the forward passes.
_DEVICE_ACCUMULATOR_SHARE = 0.5
# The accumulated logits are held in float16 by default, as nnU-Net v2 holds them: half the memory of the
# largest array of a large case, for a rounding of about 5e-4 of each logit (docs/prediction.md).
DEFAULT_ACCUMULATOR_DTYPE = torch.float16


def accumulator_dtype_for(mixed_precision: bool) -> torch.dtype:
    """The band's dtype for a run: float16 by default, float32 when float32 was asked for throughout (--fp32)."""
    return DEFAULT_ACCUMULATOR_DTYPE if mixed_precision else torch.float32


def gaussian_importance_map(patch_size: Sequence[int], sigma_scale: float = 1 / 8, device=None,
                            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Weights that trust a patch's centre more than its borders; max 1, >0 everywhere.

    The tensor is cached and shared between calls: don't modify it in place.
    """
    if sigma_scale <= 0:
        raise ValueError(f"sigma_scale must be > 0, got {sigma_scale}")
    patch = tuple(int(p) for p in patch_size)
    if not patch or min(patch) < 1:
        raise ValueError(f"patch_size must be a non-empty list of positive ints, got {list(patch_size)}")
    device = torch.device("cpu") if device is None else torch.device(device)
    return _cached_gaussian(patch, float(sigma_scale), device, dtype)


@functools.lru_cache(maxsize=16)
def _cached_gaussian(patch: tuple[int, ...], sigma_scale: float, device: torch.device,
                     dtype: torch.dtype) -> torch.Tensor:
    weights = torch.ones((), dtype=torch.float64)
    for profile in _gaussian_profiles(patch, sigma_scale):
        weights = weights[..., None] * profile
    weights = weights.to(dtype)  # max 1: each profile's is
    # Far from the centre the Gaussian underflows; a zero weight would divide by zero where only borders cover.
    smallest = weights[weights > 0].min()
    return torch.where(weights > 0, weights, smallest).to(device)


def _gaussian_profiles(patch: Sequence[int], sigma_scale: float = 1 / 8) -> list[torch.Tensor]:
    """Per axis the 1D Gaussian (float64, max 1) whose outer product is the importance map: nnU-Net v2's,
    centred on voxel size // 2 (half a voxel past the middle of an even patch) and cut to 0 beyond
    4 sigma, as a Gaussian filter of a one-voxel impulse there gives it."""
    profiles = []
    for size in patch:
        sigma = size * sigma_scale
        offset = torch.arange(size, dtype=torch.float64) - size // 2
        profile = torch.exp(-0.5 * (offset / sigma) ** 2)
        profile[offset.abs() > int(4.0 * sigma + 0.5)] = 0
        profiles.append(profile / profile.max())
    return profiles


class _EarlierWeights:
    """At each voxel of a window, the summed Gaussian weights of the windows run before it, without a
    volume of weight sums: the weights are a product of 1D profiles and the windows a grid run in the
    order z, y, x, so the sum is three products of per-axis sums (prefix sums over the starts)."""

    def __init__(self, tiles: list[tuple[slice, ...]], spatial: tuple[int, ...], patch: tuple[int, ...],
                 device: torch.device):
        profiles = _gaussian_profiles(patch)
        if len(patch) == 2:  # a 2D network runs every z-slice: one-row windows of weight 1 along z
            profiles.insert(0, torch.ones(1, dtype=torch.float64))
        self.profiles = [p.float().to(device) for p in profiles]
        self.index, self.prefix = [], []
        for axis, profile in enumerate(profiles):
            starts = sorted({t[axis].start for t in tiles})
            prefix = torch.zeros((len(starts) + 1, spatial[axis]), dtype=torch.float64)
            for j, start in enumerate(starts):
                prefix[j + 1] = prefix[j]
                prefix[j + 1, start:start + len(profile)] += profile
            self.index.append({start: j for j, start in enumerate(starts)})
            self.prefix.append(prefix.float().to(device))

    def __call__(self, tile: tuple[slice, ...]) -> torch.Tensor:
        """(pz, py, px) float32: the weights of the earlier windows over `tile` (0 where none reached)."""
        (i, j, k) = (self.index[a][tile[a].start] for a in range(3))
        (pz, py, _), (qz, qy, qx) = self.profiles, self.prefix
        before_z, before_y, before_x = qz[i, tile[0]], qy[j, tile[1]], qx[k, tile[2]]
        all_y, all_x = qy[-1, tile[1]], qx[-1, tile[2]]
        # earlier z rows of windows, then earlier windows of this row, then earlier ones of this column
        earlier = before_z[:, None, None] * (all_y[:, None] * all_x)[None]
        earlier += pz[:, None, None] * (before_y[:, None] * all_x)[None]
        earlier += pz[:, None, None] * (py[:, None] * before_x)[None]
        return earlier


def window_starts(image_size: Sequence[int], patch_size: Sequence[int], step_size: float = 0.5) -> list[list[int]]:
    """Per axis, evenly spaced window starts from 0 to image - patch, nnU-Net v2's: as few as keep them at most
    step_size * patch apart, each rounded to the nearest voxel (a gap may be that distance rounded up)."""
    if len(image_size) != len(patch_size):
        raise ValueError(f"image_size {list(image_size)} and patch_size {list(patch_size)} "
                         "must have the same number of axes")
    if not 0 < step_size <= 1:
        raise ValueError(f"step_size must be in (0, 1] so that windows overlap or touch, got {step_size}")
    starts = []
    for image, patch in zip(image_size, patch_size):
        if image < patch:
            raise ValueError(f"image_size {list(image_size)} is smaller than patch_size {list(patch_size)}; "
                             "pad the image to at least the patch size first")
        span = image - patch
        n = math.ceil(span / (patch * step_size)) + 1
        starts.append([0] if n == 1 else [round(span / (n - 1) * i) for i in range(n)])  # half to even, as np.round
    return starts


@dataclass(frozen=True)
class SlidingWindow:
    """How one network is slid over a volume: the one set of settings `sliding_window_predict`,
    `sliding_window_slabs`, the predictor and validation share."""

    patch_size: tuple[int, ...]  # 3 entries: a 3D network; 2: a 2D network on every z-slice
    num_classes: int
    step_size: float = 0.5  # window step as a fraction of the patch
    mirror_axes: tuple[int, ...] = ()  # axes of the patch; all 2**n flip combinations are averaged
    tiles_per_batch: int = 4
    device: torch.device = HOST
    mixed_precision: bool | None = None  # None: on CUDA only
    # The running mean's dtype: float16 as nnU-Net (docs/prediction.md), float32 to keep float32 rounding.
    accumulator_dtype: torch.dtype = DEFAULT_ACCUMULATOR_DTYPE
    accumulate_on: str = "auto"  # "auto": the device when the band fits half its free memory, else the host
    progress: bool = False

    def __post_init__(self) -> None:
        patch = tuple(int(p) for p in self.patch_size)
        object.__setattr__(self, "patch_size", patch)
        object.__setattr__(self, "mirror_axes", tuple(sorted(set(int(a) for a in self.mirror_axes or ()))))
        object.__setattr__(self, "device", torch.device(self.device))
        if len(patch) not in (2, 3):
            raise ValueError(f"patch_size must have 3 entries (3D network) or 2 (2D network on z-slices), "
                             f"got {list(patch)}")
        if min(patch) < 1:
            raise ValueError(f"patch_size entries must be positive, got {list(patch)}")
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if not 0 < self.step_size <= 1:
            raise ValueError(f"step_size must be in (0, 1], got {self.step_size}")
        bad_axes = [a for a in self.mirror_axes if not 0 <= a < len(patch)]
        if bad_axes:
            raise ValueError(f"mirror_axes {list(self.mirror_axes)} must be axes of the {len(patch)}D patch "
                             f"(0..{len(patch) - 1}), not of the channel-first image")
        if self.tiles_per_batch < 1:
            raise ValueError(f"tiles_per_batch must be >= 1, got {self.tiles_per_batch}")
        if self.accumulate_on not in ("auto", "device", "host"):
            raise ValueError(f"accumulate_on must be 'auto', 'device' or 'host', got {self.accumulate_on!r}")
        if self.accumulator_dtype not in (torch.float16, torch.float32):
            raise ValueError(f"accumulator_dtype must be torch.float16 or torch.float32, got {self.accumulator_dtype}")


def sliding_window_predict(network: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor | np.ndarray,
                           window: SlidingWindow) -> torch.Tensor:
    """Logits (num_classes, Z, Y, X), float32 on the CPU, for a (C, Z, Y, X) image (no softmax: export takes it).

    The caller owns the network: put it on `window.device` and in eval mode before calling. Holds the
    whole result; for large volumes consume `sliding_window_slabs` instead.
    """
    image = _as_image(image)
    # Created outside inference mode so the returned tensor is an ordinary one the caller may modify.
    logits = None
    for z0, slab in sliding_window_slabs(network, image, window):
        if logits is None:
            logits = torch.empty((window.num_classes, *image.shape[1:]), dtype=torch.float32)
        logits[:, z0:z0 + slab.shape[1]] = slab
    return logits


def sliding_window_slabs(network: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor | np.ndarray,
                         window: SlidingWindow) -> Iterator[tuple[int, torch.Tensor]]:
    """`sliding_window_predict`'s logits as consecutive z-slabs `(z0, logits[:, z0:z0 + n])`, each yielded
    as soon as no later window touches it, so only one patch-deep band of the volume is accumulated
    (the values are the same, bit for bit). Slabs are float32 CPU tensors the caller may keep.

    Each voxel's value is the Gaussian-weighted mean of the windows covering it, kept as a running mean
    in `window.accumulator_dtype`; the weights themselves are never summed in that dtype, so a window's
    small border weights cannot underflow, and need no volume of their own (`_EarlierWeights`).

    On CUDA an out-of-memory error while accumulating on the device restarts the accumulation in host
    memory (slabs already yielded are not yielded again).
    """
    image = _as_image(image)
    patch, device, num_classes = window.patch_size, window.device, window.num_classes
    mixed_precision = device.type == "cuda" if window.mixed_precision is None else window.mixed_precision
    flip_dims = _flip_combinations(list(window.mirror_axes))

    padded, crop = _pad_to_patch(image.float(), patch)
    spatial = tuple(padded.shape[1:])
    tiles = _tile_slices(spatial, patch, window.step_size)
    band_depth = patch[0] if len(patch) == 3 else 1
    band_bytes = num_classes * window.accumulator_dtype.itemsize * band_depth * math.prod(spatial[1:])
    target = _accumulator_device(window.accumulate_on, device, band_bytes)
    logger.debug("sliding window: %d tiles of %s over %s, %d mirror passes, accumulating on %s",
                 len(tiles), list(patch), list(spatial), len(flip_dims), target)
    done = 0  # image rows already yielded
    while True:
        try:
            for z0, slab in _accumulate_slabs(network, padded, crop, tiles, window, band_depth, flip_dims,
                                              target, mixed_precision, done):
                done = z0 + slab.shape[1]
                yield z0, slab
            return
        except torch.OutOfMemoryError:
            if target == HOST:
                raise
        # Outside the handler, whose traceback still holds the failed attempt's tensors.
        logger.warning("out of memory accumulating logits on %s; continuing in host memory from row %d",
                       target, done)
        if target.type == "cuda":
            torch.cuda.empty_cache()
        target = HOST


def _as_image(image: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(np.array(image, dtype=np.float32))
    if not isinstance(image, torch.Tensor):
        raise TypeError(f"image must be a torch.Tensor or numpy array, got {type(image).__name__}")
    if image.ndim != 4:
        raise ValueError(f"image must be channel-first 3D (C, Z, Y, X), got shape {list(image.shape)}; "
                         "add a channel axis or a singleton Z axis")
    return image


def _new_band(num_classes: int, depth: int, plane: tuple[int, ...], target: torch.device,
              dtype: torch.dtype) -> torch.Tensor:
    """Zeroed weighted-mean logits (K, depth, *plane) in `dtype`."""
    return torch.zeros((num_classes, depth, *plane), dtype=dtype, device=target)


def _add_to_mean(means: torch.Tensor, region: tuple[slice, ...], prediction: torch.Tensor, gaussian: torch.Tensor,
                 earlier: torch.Tensor) -> None:
    """Fold one window's float32 logits into the running weighted means of `region`, one label at a time
    (float32 temporaries of one label's window only); `earlier`: the weights already averaged there."""
    share = gaussian / (earlier + gaussian)  # the new window's part of the voxel's weight so far
    for k in range(means.shape[0]):
        mean = means[(k, *region)]
        if mean.dtype == torch.float32:
            mean += (prediction[k] - mean).mul_(share)
        else:
            exact = mean.float()
            exact += (prediction[k] - exact).mul_(share)
            mean.copy_(exact)


def _accumulate_slabs(network: Callable[[torch.Tensor], torch.Tensor], padded: torch.Tensor, crop: tuple[slice, ...],
                      tiles: list[tuple[slice, ...]], window: SlidingWindow, depth: int,
                      flip_dims: list[tuple[int, ...]], target: torch.device, mixed_precision: bool,
                      skip_rows: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Tiles in order (z-start outermost), averaged into a band of `depth` rows starting at padded row `top`;
    rows above the next tile's start are final: cropped and yielded as float32."""
    patch, num_classes, device = window.patch_size, window.num_classes, window.device
    is_2d = len(patch) == 2
    spatial = tuple(padded.shape[1:])
    gaussian = gaussian_importance_map(patch, device=target)
    if is_2d:
        gaussian = gaussian[None]
    logits = _new_band(num_classes, depth, spatial[1:], target, window.accumulator_dtype)
    top = 0
    skip_padded = skip_rows + crop[0].start  # windows that end above this only touch rows already yielded
    tiles = [t for t in tiles if t[0].stop > skip_padded]
    earlier_weights = _EarlierWeights(tiles, spatial, patch, target)

    def finish(rows: int) -> Iterator[tuple[int, torch.Tensor]]:
        """The band's first `rows` rows, cropped, in float32 slabs of at most SLAB_ROWS rows; then the band
        moves down by `rows`."""
        nonlocal top
        lo, hi = max(top, crop[0].start, skip_padded), min(top + rows, crop[0].stop)
        for start in range(lo, hi, SLAB_ROWS):
            part = (slice(None), slice(start - top, min(start + SLAB_ROWS, hi) - top), *crop[1:])
            yield start - crop[0].start, logits[part].to("cpu", torch.float32, copy=True).contiguous()
        with torch.no_grad():
            for row in range(depth - rows):  # move the live rows up, one at a time (source below target)
                logits[:, row].copy_(logits[:, row + rows])
            logits[:, depth - rows:] = 0
        top += rows

    autocast = autocast_for(device, mixed_precision)
    with tqdm(total=len(tiles), desc="sliding window", unit="tile", disable=not window.progress) as bar:
        for batch_tiles in _chunks(tiles, window.tiles_per_batch):
            batch = torch.stack([padded[(slice(None), *tile)] for tile in batch_tiles])
            if is_2d:
                batch = batch.squeeze(2)
            batch = batch.to(device, non_blocking=True)
            with torch.inference_mode():
                with autocast():
                    prediction = _mirrored_forward(network, batch, flip_dims, num_classes)
                prediction = prediction.to(target)
            # Outside inference mode (thread-wide state that must not leak to the caller between slabs), so
            # slabs are ordinary tensors the caller may modify.
            for tile_prediction, tile in zip(prediction, batch_tiles):
                if tile[0].start > top:  # windows start at most one patch apart (step_size <= 1)
                    yield from finish(tile[0].start - top)
                if is_2d:
                    tile_prediction = tile_prediction[:, None]
                rows = slice(tile[0].start - top, tile[0].stop - top)
                with torch.no_grad():
                    _add_to_mean(logits, (rows, *tile[1:]), tile_prediction, gaussian,
                                 earlier_weights(tile).reshape(gaussian.shape))
            bar.update(len(batch_tiles))
    while top < spatial[0]:
        yield from finish(min(spatial[0] - top, depth))


def _flip_combinations(axes: list[int]) -> list[tuple[int, ...]]:
    """Batch dims to flip for every subset of the mirror axes, the unflipped pass first."""
    return [tuple(2 + a for a in subset)
            for r in range(len(axes) + 1) for subset in itertools.combinations(axes, r)]


def _pad_to_patch(image: torch.Tensor, patch: tuple[int, ...]) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Zero-pad the patch's axes (the last len(patch)) up to the patch size, centred; return the crop back."""
    spatial = image.shape[1:]
    n_free = len(spatial) - len(patch)
    before, after = [0] * len(spatial), [0] * len(spatial)
    for axis, p in enumerate(patch, start=n_free):
        missing = max(0, p - spatial[axis])
        before[axis], after[axis] = missing // 2, missing - missing // 2
    crop = tuple(slice(b, b + s) for b, s in zip(before, spatial))
    if not any(before) and not any(after):
        return image, crop
    pad = [width for axis in reversed(range(len(spatial))) for width in (before[axis], after[axis])]
    return F.pad(image, pad, mode="constant", value=0.0), crop


def _tile_slices(spatial: tuple[int, ...], patch: tuple[int, ...], step_size: float) -> list[tuple[slice, ...]]:
    """Every window as slices over all spatial axes; a 2D patch gets one z-slice per window."""
    starts = window_starts(spatial[len(spatial) - len(patch):], patch, step_size)
    per_axis = [[slice(s, s + p) for s in axis_starts] for axis_starts, p in zip(starts, patch)]
    if len(patch) < len(spatial):
        per_axis.insert(0, [slice(z, z + 1) for z in range(spatial[0])])
    return list(itertools.product(*per_axis))


def _accumulator_device(accumulate_on: str, device: torch.device, n_bytes: int) -> torch.device:
    if accumulate_on == "host":
        return torch.device("cpu")
    if accumulate_on == "device" or device.type != "cuda":
        return device
    free, _ = torch.cuda.mem_get_info(device)
    # Memory cached by PyTorch's allocator is free for new tensors too.
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if n_bytes <= _DEVICE_ACCUMULATOR_SHARE * free:
        return device
    logger.info("accumulating %.1f GiB of logits in host memory: only %.1f GiB free on %s",
                n_bytes / 2**30, free / 2**30, device)
    return torch.device("cpu")


def _mirrored_forward(network: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor,
                      flip_dims: list[tuple[int, ...]], num_classes: int) -> torch.Tensor:
    """Float32 logits averaged over all flips, each flipped back before summing."""
    total = None
    for dims in flip_dims:
        out = network(torch.flip(batch, dims) if dims else batch)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"network returned {type(out).__name__}, expected one logits tensor; "
                            "turn off deep supervision for inference")
        if out.shape[0] != batch.shape[0] or out.shape[1] != num_classes or out.shape[2:] != batch.shape[2:]:
            expected = [batch.shape[0], num_classes, *batch.shape[2:]]
            raise ValueError(f"network mapped a batch {list(batch.shape)} to {list(out.shape)}, expected "
                             f"{expected}; check num_classes and patch_size")
        out = out.float()
        if dims:
            out = torch.flip(out, dims)
        total = out if total is None else total + out
    return total / len(flip_dims)


def _chunks(items: list, size: int) -> Iterator[list]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
