"""Turn a fingerprint into `plans.json`: one entry per configuration, each decision with its reason.

The rules are nnU-Net v2's (its default ExperimentPlanner, and its ResEnc planners under the
`resenc-*` presets of `presets.py`), so the same fingerprint gives the same configurations, patches,
topologies and batch sizes; docs/planning.md lists every rule and the places where autoseg
deliberately differs, with the measurement behind each.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from autoseg.dataset import ignore_label_id
from autoseg.fingerprint import Fingerprint
from autoseg.network.cost import feature_map_elements
from autoseg.planning.normalization import plan_normalization
from autoseg.planning.plans import (
    CASCADE,
    CONFIGURATIONS,
    CONFIGURATIONS_3D,
    NOT_PLANNED_FOR_2D_DATA,
    ConfigurationPlan,
    PlanError,
    Plans,
    ResamplingPlan,
)
from autoseg.planning.presets import DEFAULT, PRESETS, Preset
from autoseg.planning.spacing import (
    ANISOTROPY_RATIO,
    choose_target_spacing,
    planning_spacings,
    transpose_thick_axis_first,
)
from autoseg.planning.topology import Topology, plan_topology

DEFAULT_MEMORY_BUDGET_GB = PRESETS[DEFAULT].memory_gb
# The memory model: a network's conv-output elements per sample (feature_map_elements) times the
# batch size, against reference points known to fit the reference budget. These are nnU-Net v2's
# calibration per preset (default: a 3D U-Net writing 560 M elements per sample trains at batch 2 in
# 8 GB, a 2D one writing 85 M at batch 12), so the same budget buys the same patches as there.
MIN_BATCH_SIZE = 2
BASE_FEATURES = 32
MAX_FEATURES = {2: 512, 3: 320}
INITIAL_PATCH_VOXELS = {2: 2048 ** 2, 3: 256 ** 3}
LOWRES_PATCH_FRACTION = 0.25  # plan 3d_lowres when a 3d_fullres patch covers less than this of the median volume
LOWRES_SPACING_STEP = 1.03    # ...coarsening the spacing 3% a step until a patch covers that much,
LOWRES_MIN_SHRINK = 2.0       # ...and drop it when it shrinks the median volume less than this


def estimate_memory_gb(topology: Topology, batch_size: int, num_classes: int,
                       preset: Preset = PRESETS[DEFAULT]) -> float:
    """Accelerator memory of one training step under the preset's calibrated model (its network, its reference)."""
    ndim = len(topology.patch_size)
    stages = len(topology.features_per_stage)
    elements = feature_map_elements(topology.patch_size, topology.features_per_stage, topology.strides, num_classes,
                                     residual_blocks=preset.residual_blocks[:stages],
                                     n_conv_per_stage_decoder=preset.n_conv_per_stage_decoder)
    reference_elements, reference_batch = preset.reference[ndim]
    return elements * batch_size / (reference_elements * reference_batch) * preset.reference_gb


def _initial_patch(spacing: list[float], median_shape: list[float]) -> list[float]:
    """A patch shaped like a physical cube (voxel counts inversely proportional to spacing) of
    INITIAL_PATCH_VOXELS, clipped to the median shape."""
    ndim = len(spacing)
    aspect = 1.0 / np.asarray(spacing, dtype=float)
    scale = (INITIAL_PATCH_VOXELS[ndim] / np.prod(aspect)) ** (1.0 / ndim)
    return [float(min(round(a * scale), m)) for a, m in zip(aspect, median_shape)]


def _topology(patch: list[float], spacing: list[float]) -> Topology:
    return plan_topology(patch, spacing, BASE_FEATURES, MAX_FEATURES[len(spacing)])


def _shrink_once(topology: Topology, spacing: list[float], median_shape: list[float]) -> Topology | None:
    """The next smaller patch: shrink the axis whose patch covers most of its median extent by one
    pooling multiple (the multiple of the reduced size, so no valid size is skipped); if that axis
    cannot shrink, the next one. None when no axis can."""
    patch = list(topology.patch_size)
    ratios = [p / m for p, m in zip(patch, median_shape)]
    for axis in sorted(range(len(patch)), key=lambda a: (ratios[a], a), reverse=True):
        trial = list(patch)
        trial[axis] -= topology.total_stride[axis]
        if trial[axis] < 1:
            continue
        step = _topology(trial, spacing).total_stride[axis]
        smaller = list(patch)
        smaller[axis] -= step
        if smaller[axis] < 1:
            continue
        return _topology(smaller, spacing)
    return None


def plan_configuration(spacing: list[float], median_shape: list[float], approximate_dataset_voxels: float,
                       num_classes: int, budget_gb: float, data_identifier: str,
                       preset: Preset = PRESETS[DEFAULT], name: str | None = None) -> ConfigurationPlan:
    """Patch, topology and batch for one configuration under the memory budget (nnU-Net v2's search)."""
    ndim = len(spacing)
    spacing = [float(s) for s in spacing]
    median_shape = [float(m) for m in median_shape]
    topology = _topology(_initial_patch(spacing, median_shape), spacing)
    initial = topology.patch_size
    fit_batch = preset.reference[ndim][1] if preset.shrink_until_reference_batch_fits else MIN_BATCH_SIZE
    while estimate_memory_gb(topology, fit_batch, num_classes, preset) > budget_gb:
        smaller = _shrink_once(topology, spacing, median_shape)
        if smaller is None:
            raise PlanError(f"even the smallest patch {list(topology.patch_size)} at batch {fit_batch} needs "
                            f"{estimate_memory_gb(topology, fit_batch, num_classes, preset):.1f} GB, more than "
                            f"the {budget_gb:g} GB budget; raise --memory-gb")
        topology = smaller
    batch_by_memory = round(budget_gb / estimate_memory_gb(topology, 1, num_classes, preset))
    fraction = preset.max_dataset_fraction_per_batch
    batch_by_data = round(approximate_dataset_voxels * fraction / math.prod(topology.patch_size))
    batch = max(min(batch_by_memory, batch_by_data), MIN_BATCH_SIZE)
    stages = len(topology.features_per_stage)
    shrunk = topology.patch_size != initial
    clipped = any(p < m - 0.5 for p, m in zip(_initial_patch(spacing, [1e9] * ndim), median_shape))
    reasons = {
        "spacing": "",  # filled by the caller, which knows where the spacing came from
        "patch_size": ("shrunk, the axis covering most of its median extent first, until batch "
                       f"{fit_batch} fits the {budget_gb:g} GB budget" if shrunk
                       else "covers the median shape" + (" up to the initial maximum patch" if clipped else ""))
                      + f"; a multiple of the total stride {list(topology.total_stride)}",
        "topology": f"{topology.num_stages} stages: each stage pools every axis whose feature map keeps at least "
                    "8 voxels (12 when it is the only one) and that is under 2x coarser than the finest such axis",
        "kernel_sizes": "3 along an axis under 2x coarser than the finest axis, else 1 until pooling evens them; "
                        "3 everywhere at the bottleneck",
        "batch_size": f"{batch}: memory allows {batch_by_memory}, {fraction:.0%} of the dataset's voxels allows "
                      f"{batch_by_data} (minimum {MIN_BATCH_SIZE})",
    }
    if preset.residual:
        reasons["network"] = (f"{preset.description}: residual blocks per encoder stage "
                              f"{list(preset.residual_blocks[:stages])}, {preset.n_conv_per_stage_decoder} conv per "
                              "decoder stage")
    return ConfigurationPlan(
        name=name or data_identifier,
        data_identifier=data_identifier,
        spacing=tuple(spacing),
        median_shape=tuple(int(round(m)) for m in median_shape),
        patch_size=tuple(int(p) for p in topology.patch_size),
        batch_size=int(batch),
        batch_dice=True,  # set by plan_experiment
        features_per_stage=tuple(topology.features_per_stage),
        kernel_sizes=tuple(tuple(k) for k in topology.kernel_sizes),
        strides=tuple(tuple(st) for st in topology.strides),
        n_conv_per_stage=2,
        estimated_memory_gb=round(estimate_memory_gb(topology, batch, num_classes, preset), 2),
        reasons=reasons,
        residual_blocks=tuple(preset.residual_blocks[:stages]),
        n_conv_per_stage_decoder=preset.n_conv_per_stage_decoder,
    )


def plan_experiment(fingerprint: Fingerprint, budget_gb: float | None = None,
                    configurations: list[str] | None = None, preset: str = DEFAULT) -> Plans:
    """All configurations for a dataset: 2d always, 3d_fullres for 3D data, 3d_lowres where volumes are large.

    `preset` (see `presets.PRESETS`) picks the network and memory model; `budget_gb` defaults to its target."""
    if preset not in PRESETS:
        raise PlanError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    chosen = PRESETS[preset]
    budget_gb = chosen.memory_gb if budget_gb is None else budget_gb
    if not fingerprint.cases:
        raise PlanError("the fingerprint holds no cases")
    wanted = set(configurations or CONFIGURATIONS)
    unknown = wanted - set(CONFIGURATIONS)
    if unknown:
        raise PlanError(f"unknown configuration(s) {sorted(unknown)}; choose from {', '.join(CONFIGURATIONS)}")
    if budget_gb <= 0:
        raise PlanError(f"the memory budget must be positive, got {budget_gb:g} GB")
    # nnU-Net counts the entries of dataset.json's labels: with regions, the background and one per region
    num_classes = (1 + len(fingerprint.regions) + (ignore_label_id(fingerprint.labels) is not None)
                   if fingerprint.regions else len(fingerprint.labels))
    num_cases = len(fingerprint.cases)
    cropped = fingerprint.cropped_shapes
    spacings = planning_spacings(fingerprint.spacings, cropped)
    target, spacing_reason = choose_target_spacing(spacings, cropped)
    transpose = transpose_thick_axis_first(target)
    sp = np.array(target)[transpose]
    new_shapes = np.array([[round(n * s / t) for n, s, t in zip(shape, case_spacing, target)]
                           for shape, case_spacing in zip(cropped, spacings)], dtype=float)
    median_shape = np.median(new_shapes, axis=0)[transpose]
    dataset_voxels = float(np.prod(median_shape) * num_cases)
    is_3d = median_shape[0] != 1
    not_planned: dict[str, str] = {}
    configs: dict[str, ConfigurationPlan] = {}
    if not is_3d:
        for name in CONFIGURATIONS_3D:
            not_planned[name] = NOT_PLANNED_FOR_2D_DATA
    elif wanted & set(CONFIGURATIONS_3D):
        full = plan_configuration(list(sp), list(median_shape), dataset_voxels, num_classes, budget_gb,
                                  chosen.data_identifier("3d_fullres"), chosen, "3d_fullres")
        lowres = _plan_lowres(sp, median_shape, full, num_cases, num_classes, budget_gb, chosen)
        full = replace(full, batch_dice=lowres is not None, reasons={
            **full.reasons, "spacing": spacing_reason,
            "batch_dice": "batch Dice: with a 3d_lowres stage, a fullres patch is a small part of the case"
            if lowres is not None else "per-sample Dice: a patch covers much of a case"})
        if "3d_fullres" in wanted:
            configs["3d_fullres"] = full
        if lowres is None:
            not_planned["3d_lowres"] = (f"a 3d_fullres patch covers "
                                        f"{np.prod(full.patch_size) / np.prod(median_shape):.0%} of the median volume "
                                        f"(planned when under {LOWRES_PATCH_FRACTION:.0%}, kept when it shrinks the "
                                        f"volume at least {LOWRES_MIN_SHRINK:g}x)")
            not_planned[CASCADE] = "no 3d_lowres stage to start from"
        else:
            if "3d_lowres" in wanted or CASCADE in wanted:  # the cascade's first stage
                configs["3d_lowres"] = lowres
            if CASCADE in wanted:
                configs[CASCADE] = replace(full, name=CASCADE, previous_stage="3d_lowres", reasons={
                    **full.reasons, "previous_stage": "3d_fullres's plan, with 3d_lowres's prediction (one channel "
                    "per foreground label) as extra input, as nnU-Net plans it whenever it plans 3d_lowres"})
    if "2d" in wanted:
        c2 = plan_configuration(list(sp[1:]), list(median_shape[1:]), dataset_voxels, num_classes, budget_gb,
                                chosen.data_identifier("2d"), chosen, "2d")
        configs["2d"] = replace(c2, reasons={
            **c2.reasons, "spacing": "in-plane target spacing; each case keeps its own spacing across slices",
            "batch_dice": "batch Dice: a slice is a small part of a case"})
    default = next((c for c in ("3d_fullres", "2d", "3d_lowres") if c in configs), None)
    reasons = {
        "transpose_forward": "coarsest axis first, so 2D slices are taken across it" if transpose != sorted(transpose)
        else "axes kept in file order (axis 0 is the coarsest, or all are equal)",
        "default_configuration": "3D data: the full-resolution 3D U-Net" if default == "3d_fullres"
        else "2D data: only the 2D U-Net applies" if not is_3d else "the only configuration planned",
    }
    if fingerprint.regions:
        reasons["regions"] = (f"dataset.json defines {len(fingerprint.regions)} overlapping regions: one sigmoid "
                              "output per region, Dice + binary cross-entropy, label maps written region by region "
                              "in regions_class_order")
    return Plans(
        dataset_name=fingerprint.dataset_name,
        channel_names=tuple(fingerprint.channel_names),
        labels={int(k): v for k, v in sorted(fingerprint.labels.items(), key=lambda kv: int(kv[0]))},
        default_configuration=default,
        transpose_forward=tuple(int(a) for a in transpose),
        transpose_backward=tuple(int(i) for i in np.argsort(transpose)),
        memory_budget_gb=budget_gb,
        normalization=plan_normalization(fingerprint),
        resampling=ResamplingPlan(
            image_order=3, label_order=1, thick_axis_order=0, anisotropy_threshold=ANISOTROPY_RATIO,
            reason=f"decided per case: where the case's spacing (else the target's) is over {ANISOTROPY_RATIO:g}x "
                   "coarser along one axis, images are resampled cubic in-plane and nearest-neighbour along it, "
                   "so distant slices are not blended; otherwise cubic in 3D. Labels: one label at a time, "
                   "linear (nearest along a thick axis), the most likely label kept"),
        configurations=configs,
        reasons=reasons,
        not_planned=not_planned,
        preset=preset,
        regions=tuple(fingerprint.regions),
    )


def _plan_lowres(sp: np.ndarray, median_shape: np.ndarray, full: ConfigurationPlan, num_cases: int,
                 num_classes: int, budget_gb: float, preset: Preset) -> ConfigurationPlan | None:
    """Coarsen the spacing (the axes over 2x finer than the coarsest first) until a patch covers
    LOWRES_PATCH_FRACTION of the median volume; None when not needed or not worth it."""
    fullres_voxels = float(np.prod(median_shape))
    median_voxels = fullres_voxels
    patch_voxels = float(np.prod(full.patch_size))
    spacing = sp.astype(float).copy()
    lowres = None
    while patch_voxels / median_voxels < LOWRES_PATCH_FRACTION:
        finer = spacing.max() / spacing > 2
        if finer.any():
            spacing[finer] *= LOWRES_SPACING_STEP
        else:
            spacing *= LOWRES_SPACING_STEP
        scaled = sp / spacing * median_shape
        median_voxels = float(np.prod(scaled))
        lowres = plan_configuration(list(spacing), [round(x) for x in scaled], median_voxels * num_cases,
                                    num_classes, budget_gb, preset.data_identifier("3d_lowres"), preset, "3d_lowres")
        patch_voxels = float(np.prod(lowres.patch_size))
    if lowres is None or fullres_voxels / median_voxels < LOWRES_MIN_SHRINK:
        return None
    return replace(lowres, batch_dice=False, reasons={
        **lowres.reasons, "batch_dice": "per-sample Dice: a lowres patch covers much of a case",
        "spacing": f"a 3d_fullres patch covers {np.prod(full.patch_size) / fullres_voxels:.0%} of the median volume; "
                   f"spacing coarsened {LOWRES_SPACING_STEP:g}x a step (axes over 2x finer than the coarsest first) "
                   f"until a patch covers {LOWRES_PATCH_FRACTION:.0%}"})


def explain_plans(plans: Plans) -> str:
    """The decisions as a plain-text table (what `autoseg plan --explain` prints)."""
    reasons = plans.reasons
    preset = PRESETS.get(plans.preset)
    rows = [("all", "preset", plans.preset,
             (preset.description if preset else "") + ("" if plans.preset == DEFAULT else
                                                        "; against the default: residual encoder, 1 conv per decoder "
                                                        "stage, its own memory reference, no 5% cap on the batch, "
                                                        "the patch sized for the reference batch")),
            *([("all", "plans_transferred_from", "yes", reasons["plans_transferred_from"])]
              if "plans_transferred_from" in reasons else []),
            ("all", "default_configuration", str(plans.default_configuration),
             reasons.get("default_configuration", "")),
            ("all", "transpose_forward", str(list(plans.transpose_forward)), reasons.get("transpose_forward", "")),
            ("all", "resampling", f"image order {plans.resampling.image_order}", plans.resampling.reason)]
    for n in plans.normalization:
        rows.append(("all", f"normalization[{n.name}]", n.scheme + (" (non-zero mask)" if n.use_nonzero_mask else ""),
                     n.reason))
    for name, why in plans.not_planned.items():
        rows.append((name, "not planned", "-", why))
    for name, c in plans.configurations.items():
        why = c.reasons.get
        rows += [
            (name, "spacing", _fmt(c.spacing), why("spacing", "")),
            (name, "median_shape", _fmt(c.median_shape), "median cropped shape at this spacing"),
            (name, "patch_size", _fmt(c.patch_size), why("patch_size", "")),
            (name, "features_per_stage", _fmt(c.features_per_stage), "doubling from 32 per stage, capped"),
            *([(name, "residual_blocks", _fmt(c.residual_blocks), why("network", ""))] if c.residual_blocks else []),
            (name, "strides", " ".join(_fmt(s) for s in c.strides), why("topology", "")),
            (name, "kernel_sizes", " ".join(_fmt(k) for k in c.kernel_sizes), why("kernel_sizes", "")),
            (name, "batch_size", str(c.batch_size), why("batch_size", "")),
            (name, "batch_dice", str(c.batch_dice), why("batch_dice", "")),
            *([(name, "previous_stage", c.previous_stage, why("previous_stage", ""))] if c.previous_stage else []),
            (name, "estimated_memory_gb", str(c.estimated_memory_gb), f"of a {plans.memory_budget_gb:g} GB budget"),
        ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    header = ("config", "decision", "value", "reason")
    widths = [max(w, len(h)) for w, h in zip(widths, header)]

    def fmt(r: tuple) -> str:
        return "  ".join(x.ljust(w) for x, w in zip(r[:3], widths)) + "  " + r[3]

    return "\n".join([fmt(header), fmt(tuple("-" * w for w in widths) + ("-" * 6,))] + [fmt(r) for r in rows])


def _fmt(values) -> str:
    return "x".join(f"{v:g}" if isinstance(v, float) else str(v) for v in values)
