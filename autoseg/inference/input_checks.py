"""Whether a model can take an input: checked in one place, where a case meets the model, before any
resampling or network work.

`check_input` refuses (InputError naming the file, what it has and what the model needs) what would
give a meaningless result or cannot fit the machine: a 2D picture given to a 3D model, a case whose
prediction would need more memory than the machine has. It warns, without stopping the batch, about
what is probably a mistake but may be right: a case that may not fit the memory available now,
spacing far from the training spacing, a CT channel whose intensities fall outside everything the
model saw, a label map given as the image. The
warnings land in `prediction_summary.json` and `report.html` (docs/prediction.md).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from autoseg.dataset.image_io import Geometry
from autoseg.inference.inputs import InputError
from autoseg.planning.plans import ConfigurationPlan, Plans
from autoseg.preprocessing.preprocess import target_spacing_for
from autoseg.preprocessing.resampling import new_shape_for

SPACING_FACTOR_WARNING = 10.0  # an axis this many times finer or coarser than the training spacing
CT_RANGE_MIN_SHARE = 0.01  # a CT channel with less than this share of voxels in the training foreground range
SAMPLE_VOXELS = 1_000_000  # voxels sampled per channel for the intensity and label-map checks
MEMORY_HEADROOM = 0.9  # refuse when the estimate exceeds this share of the machine's memory


@dataclass(frozen=True)
class InputCheck:
    """What `check_input` found for a case that the model can take."""

    warnings: tuple[str, ...] = ()
    slice_by_slice: bool = False  # a 3D volume given to a model trained on 2D images


def check_input(image: np.ndarray, geometry: Geometry, plans: Plans, configurations: tuple[str, ...],
                source: Path | str, keep_probabilities: bool = False,
                memory_bytes: tuple[int | None, int | None] | None = None) -> InputCheck:
    """Refuse (InputError) or warn about `image` (C, Z, Y, X) on `geometry`, read from `source`, for the
    networks of `configurations`. `memory_bytes`: (the machine's, available now); default: what the
    system reports (`memory_limits`)."""
    source = Path(source)
    configs = [plans.configuration(name) for name in configurations]
    _check_dimensionality(geometry, plans, configs, source)
    estimated = estimate_prediction_bytes(image.shape, geometry, plans, configs, keep_probabilities)
    total, available = memory_limits() if memory_bytes is None else memory_bytes
    size = f"{_fmt(image.shape[1:])} voxels, {image.shape[0]} channel(s)"
    if total is not None and estimated > MEMORY_HEADROOM * total:
        raise InputError(source, f"{source}: predicting it would need about {estimated / 2**30:.1f} GiB of memory "
                                 f"({size}), but this machine has {total / 2**30:.1f} GiB; predict it on a machine "
                                 "with more memory, or crop it to the region of interest")
    warnings = []
    if available is not None and estimated - image.nbytes > available:  # the input itself is already in memory
        warnings.append(f"{source.name}: predicting it needs about {estimated / 2**30:.1f} GiB of memory ({size}); "
                        f"{available / 2**30:.1f} GiB are free now: other work on this machine may have to finish "
                        "first, or the case may fail for lack of memory")
    warnings += [w for config in configs for w in _spacing_warnings(geometry, plans, config, source)]
    warnings += _intensity_warnings(image, plans, source)
    warnings += _label_map_warnings(image, plans, source)
    slice_by_slice = plans.trained_on_2d_images and not geometry.is_2d and geometry.shape[0] > 1
    return InputCheck(tuple(dict.fromkeys(warnings)), slice_by_slice)


def _check_dimensionality(geometry: Geometry, plans: Plans, configs: list[ConfigurationPlan], source: Path) -> None:
    three_d = [c.name for c in configs if c.ndim == 3]
    if geometry.is_2d and three_d:
        advice = ("; predict it with --config 2d, which this model also has" if "2d" in plans.configurations
                  else "; use a model trained on 2D images")
        raise InputError(source, f"{source}: a 2D image ({_fmt(geometry.shape[1:])} pixels), but this model segments "
                                 f"3D volumes ({', '.join(three_d)}){advice}")


def estimate_prediction_bytes(shape: tuple[int, ...], geometry: Geometry, plans: Plans,
                              configs: list[ConfigurationPlan], keep_probabilities: bool = False) -> int:
    """An estimate of the host memory of predicting a (C, Z, Y, X) input, assuming cropping keeps all of it:
    the input, each configuration's resampled image, the label map's running maximum and argmax on the input
    grid, and the network-space logits where they are held whole (several configurations, or probabilities
    kept, which also hold the probabilities on the input grid). Temporaries of resampling and of the
    network come on top, so it is a floor, not a bound."""
    channels, voxels = shape[0], math.prod(shape[1:])
    spacing, network_shape = _network_grid(geometry, plans)
    resampled = [math.prod(new_shape_for(network_shape, spacing, target_spacing_for(c.spacing, spacing)))
                 for c in configs]
    total = 4 * channels * voxels + 4 * channels * sum(resampled) + 9 * voxels
    if len(configs) > 1 or keep_probabilities:
        total += 4 * plans.num_classes * max(resampled)
    if keep_probabilities:
        total += 4 * plans.num_classes * voxels
    return int(total)


def _network_grid(geometry: Geometry, plans: Plans) -> tuple[tuple[float, ...], tuple[int, ...]]:
    """The input's spacing and shape in the network's axis order (after transpose_forward)."""
    forward = plans.transpose_forward
    return tuple(geometry.spacing[a] for a in forward), tuple(geometry.shape[a] for a in forward)


def memory_limits() -> tuple[int | None, int | None]:
    """(The machine's memory, what is available now) in bytes: /proc/meminfo's MemTotal and MemAvailable, each
    capped by a cgroup (container) limit where one is set; the physical pages elsewhere; None where unknown."""
    meminfo = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                meminfo[key] = int(value.split()[0]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    total, available = meminfo.get("MemTotal"), meminfo.get("MemAvailable")
    if total is None:
        try:
            pages = os.sysconf("SC_PAGE_SIZE")
            total, available = os.sysconf("SC_PHYS_PAGES") * pages, os.sysconf("SC_AVPHYS_PAGES") * pages
        except (ValueError, OSError, AttributeError):
            return None, None
    limit = _cgroup_limit()
    if limit is not None:
        total = min(total, limit)
        available = None if available is None else min(available, limit)
    return total, available


def _cgroup_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < 2**60:  # "max" or a huge number: no limit
            return int(text)
    return None


def _spacing_warnings(geometry: Geometry, plans: Plans, config: ConfigurationPlan, source: Path) -> list[str]:
    spacing, network_shape = _network_grid(geometry, plans)
    target = target_spacing_for(config.spacing, spacing)
    axes = range(len(spacing)) if config.ndim == 3 else range(1, len(spacing))  # 2d: slices are not resampled
    ratios = {a: spacing[a] / target[a] for a in axes}
    far = {a: r for a, r in ratios.items() if max(r, 1 / r) >= SPACING_FACTOR_WARNING}
    if not far:
        return []
    axis, ratio = max(far.items(), key=lambda item: max(item[1], 1 / item[1]))
    how = f"{ratio:.0f}x coarser" if ratio > 1 else f"{1 / ratio:.0f}x finer"
    resampled = new_shape_for(network_shape, spacing, target)
    return [f"{source.name}: spacing {_fmt(spacing)} mm is {how} than the {config.name} model's {_fmt(target)} mm "
            f"along axis {axis}; resampled to {_fmt(resampled)} voxels, far from the training data: check the "
            "header's spacing"]


def _sample(channel: np.ndarray) -> np.ndarray:
    flat = channel.reshape(-1)
    return flat[:: max(1, flat.size // SAMPLE_VOXELS)]


def _intensity_warnings(image: np.ndarray, plans: Plans, source: Path) -> list[str]:
    """CT channels only: Hounsfield units are absolute, so an input outside the training range is suspicious."""
    warnings = []
    for scheme in plans.normalization:
        if scheme.scheme != "ct" or scheme.clip is None or scheme.channel >= image.shape[0]:
            continue
        lo, hi = scheme.clip
        values = _sample(image[scheme.channel])
        share = float(np.mean((values >= lo) & (values <= hi))) if values.size else 0.0
        if share < CT_RANGE_MIN_SHARE:
            low, high = np.percentile(values, [1, 99]) if values.size else (math.nan, math.nan)
            warnings.append(f"{source.name}: channel {scheme.channel} ({scheme.name}) has {share:.1%} of its voxels in "
                            f"the CT range the model saw in its foreground ({lo:g} to {hi:g}); its intensities run "
                            f"{low:g} to {high:g}: is it a CT in Hounsfield units, and the right channel?")
    return warnings


def _label_map_warnings(image: np.ndarray, plans: Plans, source: Path) -> list[str]:
    """A few distinct whole numbers in every channel: most likely a label map passed as the image."""
    limit = max(plans.num_classes, 3)
    for channel in image:
        values = _sample(channel)
        if values.size == 0 or not np.array_equal(values, np.round(values)):
            return []
        if np.unique(values).size > limit:
            return []
    return [f"{source.name}: holds only a few distinct whole numbers (at most {limit}), like a label map; is it the "
            "image to segment?"]


def _fmt(values) -> str:
    return " x ".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)
