"""Turn a fingerprint into `plans.json`: one entry per configuration, each decision with its reason."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from autoseg.atomic import read_json, write_json
from autoseg.fingerprint import Fingerprint
from autoseg.network.unet import feature_map_elements
from autoseg.planning import PlanError  # noqa: F401  (raised here; imported from here by callers)
from autoseg.planning.normalization import plan_normalization
from autoseg.planning.spacing import choose_target_spacing, is_anisotropic, transpose_thick_axis_first
from autoseg.planning.topology import Topology, plan_topology

FORMAT_VERSION = 1
DEFAULT_MEMORY_BUDGET_GB = 8.0
# Bytes of accelerator memory per activation element kept for the backward pass, covering
# mixed-precision copies, cuDNN workspace and the allocator's slack: calibrated so that a 3D U-Net
# of 6 stages (32..320 features) on a 128^3 patch with batch 2 is estimated at about 8 GB, the
# size that plan is known to train in.
BYTES_PER_ACTIVATION = 4.0
MAX_BATCH_FRACTION_OF_DATASET = 0.05
MIN_BATCH_SIZE = 2
LOWRES_TRIGGER = 4.0  # plan 3d_lowres when the median volume holds more than this many patches
LOWRES_TARGET = 2.0   # ...and coarsen its spacing until the median volume holds at most this many
SETTINGS = {
    "2d": {"max_stages": 7, "max_features": 512, "initial_patch_voxels": 2048 ** 2, "max_batch": 512},
    "3d": {"max_stages": 6, "max_features": 320, "initial_patch_voxels": 256 ** 3, "max_batch": 512},
}


def estimate_memory_gb(topology: Topology, batch_size: int, in_channels: int, num_classes: int) -> float:
    """Accelerator memory of one training step, as the network reports its feature maps."""
    elements = feature_map_elements(topology.patch_size, topology.features_per_stage, topology.strides, num_classes)
    elements += math.prod(topology.patch_size) * (in_channels - 1)
    params = sum(f_in * f_out * math.prod(k) * 2 for f_in, f_out, k in
                 zip((in_channels,) + topology.features_per_stage, topology.features_per_stage, topology.kernel_sizes))
    return (elements * batch_size * BYTES_PER_ACTIVATION + params * 4 * 4) / 1e9


def _initial_patch(median_shape: np.ndarray, spacing: np.ndarray, voxels: int) -> list[float]:
    """A patch shaped like a physical cube (voxel counts inversely proportional to spacing), clipped to the median shape."""
    aspect = 1.0 / np.asarray(spacing)
    aspect = aspect / np.prod(aspect) ** (1.0 / len(aspect))
    patch = aspect * voxels ** (1.0 / len(aspect))
    return [float(p) for p in np.minimum(patch, median_shape)]


def plan_configuration(spacing: list[float], median_shape: list[float], total_voxels: float,
                       in_channels: int, num_classes: int, budget_gb: float) -> dict:
    """Patch, topology and batch for one configuration under the memory budget."""
    kind = "2d" if len(spacing) == 2 else "3d"
    s = SETTINGS[kind]
    patch = _initial_patch(np.array(median_shape), np.array(spacing), s["initial_patch_voxels"])

    def topology_for(p: list[float]) -> Topology:
        return plan_topology([max(1, round(x)) for x in p], spacing, s["max_stages"], max_features=s["max_features"])

    topology = topology_for(patch)
    shrunk = False
    while estimate_memory_gb(topology, MIN_BATCH_SIZE, in_channels, num_classes) > budget_gb:
        # Shrink the axis whose patch covers most of its median extent, by one pooling multiple.
        ratios = [p / m for p, m in zip(topology.patch_size, median_shape)]
        axis = int(np.argmax(np.array(ratios) + 1e-6 * np.array(topology.patch_size)))
        step = int(np.prod([st[axis] for st in topology.strides]))
        new = list(topology.patch_size)
        new[axis] -= step
        if new[axis] < 2 * 4:  # cannot shrink further; keep the smallest viable patch
            break
        topology = topology_for(new)
        shrunk = True
    per_sample = estimate_memory_gb(topology, 1, in_channels, num_classes)
    batch_by_memory = max(MIN_BATCH_SIZE, int(budget_gb / per_sample))
    batch_by_data = max(MIN_BATCH_SIZE, int(MAX_BATCH_FRACTION_OF_DATASET * total_voxels / math.prod(topology.patch_size)))
    batch = min(batch_by_memory, batch_by_data, s["max_batch"])
    reasons = {
        "spacing": "",  # filled by the caller, which knows where the spacing came from
        "patch_size": ("shrunk from the median shape until batch 2 fits the memory budget" if shrunk
                       else "covers the median shape"
                       + (" (capped at the initial maximum patch)" if any(np.array(patch) < np.array(median_shape) - 0.5) else ""))
                      + f", rounded up to multiples of the total stride {[int(x) for x in np.prod(topology.strides, axis=0)]}",
        "topology": f"{topology.num_stages} stages: pool an axis while its feature map stays >= 4 voxels and it is "
                    "not over 2x coarser than the finest axis; kernel 1 along such a coarse axis",
        "batch_size": f"{batch}: memory allows {batch_by_memory}, 5% of the dataset's voxels allows {batch_by_data}"
                      f" (minimum {MIN_BATCH_SIZE}, maximum {s['max_batch']})",
    }
    return {
        "spacing": [float(x) for x in spacing],
        "median_shape": [int(round(m)) for m in median_shape],
        "patch_size": list(topology.patch_size),
        "batch_size": int(batch),
        "features_per_stage": list(topology.features_per_stage),
        "kernel_sizes": [list(k) for k in topology.kernel_sizes],
        "strides": [list(st) for st in topology.strides],
        "n_conv_per_stage": 2,
        "estimated_memory_gb": round(estimate_memory_gb(topology, batch, in_channels, num_classes), 2),
        "reasons": reasons,
    }


def plan_experiment(fingerprint: Fingerprint, budget_gb: float = DEFAULT_MEMORY_BUDGET_GB,
                    configurations: list[str] | None = None) -> dict:
    """All configurations for a dataset; 3d_lowres only where the median volume is much larger than a patch."""
    if not fingerprint.cases:
        raise PlanError("the fingerprint holds no cases")
    wanted = set(configurations or ["2d", "3d_fullres", "3d_lowres"])
    unknown = wanted - {"2d", "3d_fullres", "3d_lowres"}
    if unknown:
        raise PlanError(f"unknown configuration(s) {sorted(unknown)}; choose from 2d, 3d_fullres, 3d_lowres")
    in_channels, num_classes = len(fingerprint.channel_names), len(fingerprint.labels)
    spacing, spacing_reason = choose_target_spacing(fingerprint.spacings)
    transpose = transpose_thick_axis_first(spacing)
    sp = np.array(spacing)[transpose]
    shapes = fingerprint.cropped_shapes[:, transpose] * fingerprint.spacings[:, transpose] / sp
    median_shape = np.median(shapes, axis=0)
    total_voxels = float(np.sum(np.prod(shapes, axis=1)))
    anisotropic = is_anisotropic(sp)
    resampling = {
        "image_order": 3, "label_order": 1,
        "thick_axis_order": 1 if anisotropic else None,
        "reason": ("anisotropic: cubic spline in-plane, linear along the thick axis (axis 0) to avoid ringing "
                   "between distant slices" if anisotropic else "cubic spline for images")
        + "; labels resampled one label at a time, linearly, then the most likely label is kept, "
          "so no label value appears that was not there",
    }
    plans: dict = {
        "format_version": FORMAT_VERSION,
        "dataset_name": fingerprint.dataset_name,
        "channel_names": list(fingerprint.channel_names),
        "labels": {str(k): v for k, v in fingerprint.labels.items()},
        "transpose_forward": transpose,
        "transpose_backward": [int(i) for i in np.argsort(transpose)],
        "anisotropic": anisotropic,
        "memory_budget_gb": budget_gb,
        "normalization": plan_normalization(fingerprint),
        "resampling": resampling,
        "reasons": {
            "transpose_forward": "coarsest axis first, so 2D slices are taken across it" if transpose != sorted(transpose)
            else "axes kept in file order (axis 0 is the coarsest or all are equal)",
            "anisotropic": f"coarsest/finest target spacing {sp.max() / sp.min():.2f} "
                           f"{'>' if anisotropic else '<='} 3: {'rotate in-plane only during augmentation' if anisotropic else 'rotate about all axes'}",
        },
        "configurations": {},
    }
    full = plan_configuration(list(sp), list(median_shape), total_voxels, in_channels, num_classes, budget_gb)
    full["data_identifier"] = "fullres"
    full["reasons"]["spacing"] = spacing_reason
    if "3d_fullres" in wanted:
        plans["configurations"]["3d_fullres"] = full
    if "2d" in wanted:
        c2 = plan_configuration(list(sp[1:]), list(median_shape[1:]), total_voxels, in_channels, num_classes, budget_gb)
        c2["data_identifier"] = "fullres"
        c2["spacing"] = list(map(float, sp))
        c2["median_shape"] = [int(round(m)) for m in median_shape]
        c2["reasons"]["spacing"] = "same data as 3d_fullres; slices along axis 0"
        plans["configurations"]["2d"] = c2
    coverage = float(np.prod(median_shape) / np.prod(full["patch_size"]))
    if "3d_lowres" in wanted and coverage > LOWRES_TRIGGER:
        plans["configurations"]["3d_lowres"] = _plan_lowres(sp, shapes, in_channels, num_classes, budget_gb, coverage)
    return plans


def _plan_lowres(sp: np.ndarray, shapes: np.ndarray, in_channels: int, num_classes: int,
                 budget_gb: float, fullres_coverage: float) -> dict:
    """Coarsen the spacing (finest axes first, 3% a step) until the median volume holds at most LOWRES_TARGET patches."""
    spacing = sp.copy()
    while True:
        finest = spacing.min()
        grow = spacing < spacing.max() * 0.999 if spacing.max() / finest > 1.001 else np.ones_like(spacing, bool)
        spacing = np.where(grow, np.minimum(spacing * 1.03, spacing.max() if not grow.all() else np.inf), spacing)
        scaled = shapes * sp / spacing
        median = np.median(scaled, axis=0)
        c = plan_configuration(list(spacing), list(median), float(np.sum(np.prod(scaled, axis=1))),
                               in_channels, num_classes, budget_gb)
        if np.prod(median) / np.prod(c["patch_size"]) <= LOWRES_TARGET or spacing.min() > 8 * sp.min():
            break
    c["data_identifier"] = "lowres"
    c["reasons"]["spacing"] = (f"fullres median volume holds {fullres_coverage:.1f} patches; spacing coarsened until "
                               f"it holds at most {LOWRES_TARGET:g}")
    return c


def save_plans(plans: dict, path: Path) -> None:
    write_json(path, plans)


def load_plans(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"{path}: not found; run `autoseg plan` first")
    plans = read_json(path)
    if plans.get("format_version") != FORMAT_VERSION:
        raise PlanError(f"{path}: format_version {plans.get('format_version')} is not {FORMAT_VERSION}; rerun `autoseg plan`")
    return plans


def explain_plans(plans: dict) -> str:
    """The decisions as a plain-text table (what `autoseg plan --explain` prints)."""
    rows = [("all", "transpose_forward", str(plans["transpose_forward"]), plans["reasons"]["transpose_forward"]),
            ("all", "anisotropic", str(plans["anisotropic"]), plans["reasons"]["anisotropic"]),
            ("all", "resampling", f"image order {plans['resampling']['image_order']}", plans["resampling"]["reason"])]
    for n in plans["normalization"]:
        rows.append(("all", f"normalization[{n['name']}]", n["scheme"] + (" (non-zero mask)" if n["use_nonzero_mask"] else ""), n["reason"]))
    for name, c in plans["configurations"].items():
        rows += [
            (name, "spacing", _fmt(c["spacing"]), c["reasons"]["spacing"]),
            (name, "median_shape", _fmt(c["median_shape"]), "median cropped shape at this spacing"),
            (name, "patch_size", _fmt(c["patch_size"]), c["reasons"]["patch_size"]),
            (name, "features_per_stage", _fmt(c["features_per_stage"]), "doubling from 32 per stage, capped"),
            (name, "strides", " ".join(_fmt(s) for s in c["strides"]), c["reasons"]["topology"]),
            (name, "kernel_sizes", " ".join(_fmt(k) for k in c["kernel_sizes"]), "3 per axis; 1 along an axis over 2x coarser"),
            (name, "batch_size", str(c["batch_size"]), c["reasons"]["batch_size"]),
            (name, "estimated_memory_gb", str(c["estimated_memory_gb"]), f"of a {plans['memory_budget_gb']:g} GB budget"),
        ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    header = ("config", "decision", "value", "reason")
    widths = [max(w, len(h)) for w, h in zip(widths, header)]
    fmt = lambda r: "  ".join(x.ljust(w) for x, w in zip(r[:3], widths)) + "  " + r[3]
    return "\n".join([fmt(header), fmt(tuple("-" * w for w in widths) + ("-" * 6,))] + [fmt(r) for r in rows])


def _fmt(values) -> str:
    return "x".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)
