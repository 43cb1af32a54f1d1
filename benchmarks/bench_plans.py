"""Plan parity: autoseg's planner against nnU-Net v2's ExperimentPlanner on the same fingerprints.

    python benchmarks/bench_plans.py [--datasets NAME,...] [--preset default|resenc-m|resenc-l|resenc-xl]
                                     [--json OUT] [--nnunet-venv /work/bench/nnunet_venv/bin | --no-nnunet]

Each fingerprint is built in memory, without images, to look like a public dataset people train on
(the ten Medical Segmentation Decathlon tasks, KiTS, ACDC, BraTS, the left-atrium LGE challenge, a
2D RGB microscopy set and a 2D electron-microscopy set): every case gets its own spacing and shape,
drawn around the published median spacing and shape with a fixed seed, so the table is the same on
every run. autoseg plans it with `plan_experiment(fingerprint, budget_gb=8)`. nnU-Net gets the same
cases as a `dataset_fingerprint.json` and a `dataset.json` (with empty image files so it finds the
cases) in a temporary nnUNet_raw/nnUNet_preprocessed, and `_nnunet_plan.py`, run by nnU-Net's own
Python, plans them all with its default `ExperimentPlanner` at 8 GB. The script prints both plans
side by side per dataset, the fields that differ, and how many datasets got identical plans.
`--preset resenc-m` (or -l, -xl) compares autoseg's ResEnc preset with nnU-Net's
`nnUNetPlannerResEncM` (L, XL), each at the preset's memory target (8, 24, 40 GB), including the
residual blocks per stage and the decoder's convs.
Only the planners run: well under a second per dataset for autoseg, a few seconds for nnU-Net
(which sizes its candidate networks on torch's meta device; --nnunet-real-weights to not).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from autoseg.fingerprint import CaseFingerprint, Fingerprint, IntensityStats, channel_kind

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _machine  # noqa: E402

NNUNET_PLANNERS = {"default": "ExperimentPlanner", "resenc-m": "nnUNetPlannerResEncM",
                   "resenc-l": "nnUNetPlannerResEncL", "resenc-xl": "nnUNetPlannerResEncXL"}
BUDGET_GB = 8.0  # the default preset's; the others plan at their own target
DEFAULT_NNUNET_VENV = "/work/bench/nnunet_venv/bin"
NNUNET_DRIVER = Path(__file__).resolve().parent / "_nnunet_plan.py"
REPO = Path(__file__).resolve().parents[1]
CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")


class BenchError(Exception):
    """A problem with the benchmark's inputs or nnU-Net's run; printed without a traceback."""


# --- the fingerprints ---------------------------------------------------------------------------

def fg_stats(mean: float, std: float, p00_5: float, p99_5: float, lo: float, hi: float) -> IntensityStats:
    """Foreground intensity statistics of one channel (the median taken as the mean)."""
    return IntensityStats(mean=mean, std=std, min=lo, max=hi, median=mean, percentile_00_5=p00_5, percentile_99_5=p99_5)


def ct_stats(mean: float = 100.0, std: float = 50.0, p00_5: float = -50.0, p99_5: float = 250.0) -> IntensityStats:
    """Hounsfield units of the labelled structures; the scanner range is -1024..3071."""
    return fg_stats(mean, std, p00_5, p99_5, -1024.0, 3071.0)


def mri_stats(mean: float = 500.0, std: float = 200.0) -> IntensityStats:
    """Arbitrary scanner units; only z-scored per case, so the values matter little."""
    return fg_stats(mean, std, max(0.0, mean - 2.5 * std), mean + 2.5 * std, 0.0, mean + 6 * std)


@dataclass(frozen=True)
class DatasetSpec:
    """How the cases of a fingerprint are drawn: published medians plus a realistic spread."""
    name: str
    modelled_on: str
    channel_names: tuple[str, ...]
    labels: tuple[str, ...]                  # index = label value; 0 is background
    num_cases: int
    spacing: tuple[float, float, float]      # median (z, y, x) in mm
    shape: tuple[int, int, int]              # median shape after cropping to the non-zero region
    intensities: tuple[IntensityStats, ...]  # foreground, per channel
    slice_thicknesses: tuple[tuple[float, float], ...] = ()  # (z spacing, share of cases); () = log-normal spread
    spacing_spread: tuple[float, float] = (0.0, 0.0)   # log-normal sigma of z and in-plane spacing
    extent_spread: tuple[float, float, float] = (0.0, 0.0, 0.0)  # log-normal sigma of the extent in mm, per axis
    fixed_matrix: bool = False               # CT: in-plane voxel count fixed (512), in-plane extent follows spacing
    shape_choices: tuple[tuple[tuple[int, int, int], float], ...] = ()  # (shape, share): sizes of 2D image sets
    crop_fraction: tuple[float, float, float] = (1.0, 1.0, 1.0)  # cropped / original shape, per axis
    foreground_fraction: float = 0.05        # labelled share of the cropped volume
    known_nnunet_plan: str = ""              # what nnU-Net is reported to plan for the real dataset

    @property
    def is_2d(self) -> bool:
        return self.shape[0] == 1


MRI4 = ("FLAIR", "T1w", "t1gd", "T2w")
DATASETS: tuple[DatasetSpec, ...] = (
    DatasetSpec("Task01_BrainTumour", "MSD Task01 (BraTS 2016/17 subset)", MRI4,
                ("background", "edema", "non-enhancing tumor", "enhancing tumour"), 484,
                (1.0, 1.0, 1.0), (138, 169, 138), tuple(mri_stats(m, s) for m, s in
                                                        ((600, 250), (500, 150), (700, 350), (800, 300))),
                extent_spread=(0.05, 0.06, 0.07), crop_fraction=(138 / 155, 169 / 240, 138 / 240)),
    DatasetSpec("Task02_Heart", "MSD Task02 (left atrium, mono-modal MRI)", ("MRI",), ("background", "left atrium"), 20,
                (1.37, 1.25, 1.25), (115, 320, 232), (mri_stats(400, 150),),
                extent_spread=(0.08, 0.0, 0.06), crop_fraction=(1.0, 1.0, 232 / 320), foreground_fraction=0.01),
    DatasetSpec("Task03_Liver", "MSD Task03 (LiTS)", ("CT",), ("background", "liver", "cancer"), 131,
                (1.0, 0.77, 0.77), (432, 512, 512), (ct_stats(99.4, 39.4, -17.0, 201.0),),
                slice_thicknesses=((0.7, 0.15), (0.8, 0.15), (1.0, 0.25), (1.5, 0.05), (2.0, 0.1), (2.5, 0.1),
                                   (5.0, 0.2)),
                spacing_spread=(0.0, 0.12), extent_spread=(0.3, 0.0, 0.0), fixed_matrix=True, foreground_fraction=0.03),
    DatasetSpec("Task04_Hippocampus", "MSD Task04", ("MRI",), ("background", "Anterior", "Posterior"), 260,
                (1.0, 1.0, 1.0), (36, 50, 35), (mri_stats(300, 100),),
                extent_spread=(0.08, 0.08, 0.08), foreground_fraction=0.1),
    DatasetSpec("Task05_Prostate", "MSD Task05", ("T2", "ADC"), ("background", "PZ", "TZ"), 32,
                (3.6, 0.62, 0.62), (20, 320, 319), (mri_stats(350, 120), mri_stats(1200, 400)),
                slice_thicknesses=((3.0, 0.2), (3.6, 0.45), (4.0, 0.35)),
                spacing_spread=(0.0, 0.06), extent_spread=(0.1, 0.1, 0.1), foreground_fraction=0.02),
    DatasetSpec("Task06_Lung", "MSD Task06 (NSCLC)", ("CT",), ("background", "cancer"), 63,
                (1.24, 0.79, 0.79), (252, 512, 512), (ct_stats(-160.0, 320.0, -1000.0, 330.0),),
                slice_thicknesses=((0.625, 0.2), (1.0, 0.1), (1.24, 0.3), (2.5, 0.4)),
                spacing_spread=(0.0, 0.1), extent_spread=(0.25, 0.0, 0.0), fixed_matrix=True,
                foreground_fraction=0.002),
    DatasetSpec("Task07_Pancreas", "MSD Task07", ("CT",), ("background", "pancreas", "cancer"), 281,
                (2.5, 0.8, 0.8), (93, 512, 512), (ct_stats(78.0, 75.4, -96.0, 215.0),),
                slice_thicknesses=((0.7, 0.03), (1.0, 0.03), (1.25, 0.02), (2.5, 0.62), (5.0, 0.25), (7.5, 0.05)),
                spacing_spread=(0.0, 0.1), extent_spread=(0.3, 0.0, 0.0), fixed_matrix=True, foreground_fraction=0.003),
    DatasetSpec("Task08_HepaticVessel", "MSD Task08", ("CT",), ("background", "vessel", "tumour"), 303,
                (5.0, 0.8, 0.8), (49, 512, 512), (ct_stats(104.4, 52.6, -10.0, 243.0),),
                slice_thicknesses=((1.5, 0.15), (2.5, 0.05), (5.0, 0.75), (7.5, 0.05)),
                spacing_spread=(0.0, 0.1), extent_spread=(0.3, 0.0, 0.0), fixed_matrix=True, foreground_fraction=0.005),
    DatasetSpec("Task09_Spleen", "MSD Task09", ("CT",), ("background", "spleen"), 41,
                (5.0, 0.79, 0.79), (90, 512, 512), (ct_stats(99.3, 39.5, -41.0, 176.0),),
                slice_thicknesses=((1.5, 0.1), (2.0, 0.05), (2.5, 0.1), (3.0, 0.05), (5.0, 0.65), (8.0, 0.05)),
                spacing_spread=(0.0, 0.1), extent_spread=(0.3, 0.0, 0.0), fixed_matrix=True, foreground_fraction=0.005),
    DatasetSpec("Task10_Colon", "MSD Task10", ("CT",), ("background", "colon cancer"), 126,
                (5.0, 0.78, 0.78), (95, 512, 512), (ct_stats(65.0, 33.0, -30.0, 165.0),),
                slice_thicknesses=((1.25, 0.05), (1.5, 0.05), (2.5, 0.1), (3.0, 0.1), (5.0, 0.65), (7.5, 0.05)),
                spacing_spread=(0.0, 0.1), extent_spread=(0.3, 0.0, 0.0), fixed_matrix=True, foreground_fraction=0.001),
    DatasetSpec("KiTS_like", "KiTS19 (kidney CT, thin and thick slices mixed)", ("CT",),
                ("background", "kidney", "tumor"),
                210, (3.0, 0.78, 0.78), (107, 512, 512), (ct_stats(101.0, 76.9, -79.0, 304.0),),
                slice_thicknesses=((0.5, 0.1), (0.625, 0.05), (0.7, 0.05), (0.8, 0.1), (1.0, 0.05), (1.25, 0.05),
                                   (2.5, 0.05), (3.0, 0.25), (5.0, 0.3)),
                spacing_spread=(0.0, 0.1), extent_spread=(0.25, 0.0, 0.0), fixed_matrix=True, foreground_fraction=0.01),
    DatasetSpec("ACDC_like", "ACDC (cardiac cine MRI, 5-10 mm slices)", ("cineMRI",),
                ("background", "RV", "MLV", "LVC"), 200, (10.0, 1.5625, 1.5625), (9, 256, 216), (mri_stats(150, 80),),
                slice_thicknesses=((5.0, 0.05), (6.5, 0.05), (7.0, 0.05), (8.0, 0.05), (10.0, 0.8)),
                spacing_spread=(0.0, 0.05), extent_spread=(0.15, 0.15, 0.15), foreground_fraction=0.02),
    DatasetSpec("BraTS_like", "BraTS 2021 (4 MRI sequences, 1 mm, skull-stripped)", ("T1", "T1ce", "T2", "FLAIR"),
                ("background", "necrosis", "edema", "enhancing tumour"), 1251, (1.0, 1.0, 1.0), (140, 171, 137),
                tuple(mri_stats(m, s) for m, s in ((500, 150), (700, 350), (800, 300), (600, 250))),
                extent_spread=(0.05, 0.06, 0.07), crop_fraction=(140 / 155, 171 / 240, 137 / 240),
                known_nnunet_plan="3d_fullres patch 128x128x128, batch 2"),
    DatasetSpec("LeftAtrium_LGE", "2018 Atrial Segmentation Challenge (LGE MRI, cropped)", ("LGE",),
                ("background", "left atrium"), 80, (0.625, 0.625, 0.625), (88, 142, 192), (mri_stats(250, 90),),
                extent_spread=(0.1, 0.1, 0.1), foreground_fraction=0.05,
                known_nnunet_plan="3d_fullres patch 96x128x192"),
    DatasetSpec("FewPlanes_Fluo3D", "3D fluorescence stacks of 5 planes (2 um steps, 0.5 um pixels)", ("Fluo",),
                ("background", "cell"), 40, (2.0, 0.5, 0.5), (5, 512, 512), (fg_stats(900.0, 300.0, 300.0, 2500.0,
                                                                                       100.0, 4095.0),),
                extent_spread=(0.0, 0.05, 0.05), foreground_fraction=0.1),
    DatasetSpec("TwoSlice_MRI", "3D MRI volumes of 2 slices at in-plane resolution (1 mm)", ("MRI",),
                ("background", "lesion"), 60, (1.0, 1.0, 1.0), (2, 256, 256), (mri_stats(400, 150),),
                extent_spread=(0.0, 0.05, 0.05), foreground_fraction=0.03),
    DatasetSpec("Microscopy_RGB_2D", "DSB 2018-like nuclei, RGB", ("R", "G", "B"), ("background", "nucleus"), 670,
                (999.0, 1.0, 1.0), (1, 256, 256),
                tuple(fg_stats(m, 60.0, 5.0, 250.0, 0.0, 255.0) for m in (140.0, 120.0, 130.0)),
                shape_choices=(((1, 256, 256), 0.5), ((1, 256, 320), 0.17), ((1, 520, 696), 0.14),
                               ((1, 360, 360), 0.14), ((1, 512, 640), 0.05)), foreground_fraction=0.15),
    DatasetSpec("EM_2D", "ISBI 2012-like EM membranes, greyscale", ("EM",), ("background", "membrane"), 30,
                (999.0, 1.0, 1.0), (1, 512, 512), (fg_stats(80.0, 40.0, 5.0, 200.0, 0.0, 255.0),),
                foreground_fraction=0.2),
)


def _allocate(values: list, shares: tuple[float, ...], n: int, rng: np.random.Generator) -> list:
    """n values in exactly these shares (largest remainder), in random order, so medians are as published."""
    quota = np.array(shares, dtype=float) / sum(shares) * n
    counts = np.floor(quota).astype(int)
    counts[np.argsort(counts - quota)[: n - counts.sum()]] += 1
    out = [v for v, k in zip(values, counts) for _ in range(k)]
    return [out[i] for i in rng.permutation(n)]


def _log_normal(median: float, sigma: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """n values with exactly this sample median, spread log-normally."""
    if sigma == 0:
        return np.full(n, float(median))
    values = median * np.exp(sigma * rng.standard_normal(n))
    return values * (median / np.median(values))


def case_geometry(spec: DatasetSpec, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per case: spacing (z, y, x), shape after cropping and original shape, each (num_cases, 3).

    Spacings come from the slice-thickness mix (in exact shares) (or a log-normal spread) and an in-plane log-normal
    spread; a case's shape is its physical extent over its spacing (a fixed matrix in-plane for CT),
    scaled so the median shape is the published one.
    """
    rng = np.random.default_rng([seed, zlib.crc32(spec.name.encode())])
    n = spec.num_cases
    if spec.slice_thicknesses:
        values, shares = zip(*spec.slice_thicknesses)
        z = np.array(_allocate(list(values), shares, n, rng), dtype=float)
    else:
        z = _log_normal(spec.spacing[0], spec.spacing_spread[0], n, rng)
    y = _log_normal(spec.spacing[1], spec.spacing_spread[1], n, rng)
    if spec.fixed_matrix:  # a scanner's field of view in whole mm over its 512 matrix
        y = np.round(y * spec.shape[1]) / spec.shape[1]
    spacings = np.round(np.stack([z, y, y * spec.spacing[2] / spec.spacing[1]], axis=1), 6)

    if spec.shape_choices:
        shapes, shares = zip(*spec.shape_choices)
        cropped = np.array(_allocate(list(shapes), shares, n, rng))
    else:
        cropped = np.empty((n, 3), dtype=int)
        for axis in range(3):
            if spec.fixed_matrix and axis > 0:
                cropped[:, axis] = spec.shape[axis]
                continue
            extent = _log_normal(spec.shape[axis] * spec.spacing[axis], spec.extent_spread[axis], n, rng)
            voxels = extent / spacings[:, axis]
            cropped[:, axis] = np.maximum(1, np.round(voxels * spec.shape[axis] / np.median(voxels)))
    original = np.maximum(cropped, np.ceil(cropped / np.array(spec.crop_fraction) - 1e-6)).astype(int)
    return spacings, cropped.astype(int), original


def make_fingerprint(spec: DatasetSpec, seed: int = 0) -> Fingerprint:
    """An autoseg Fingerprint of `spec`'s cases (no images): what `autoseg plan` would have measured."""
    spacings, cropped, original = case_geometry(spec, seed)
    cases = []
    for i, (spacing, crop, shape) in enumerate(zip(spacings, cropped, original)):
        lo = (shape - crop) // 2
        bbox = tuple((int(a), int(a + c)) for a, c in zip(lo, crop))
        cases.append(CaseFingerprint(f"case_{i:04d}", tuple(float(s) for s in spacing), tuple(int(s) for s in shape),
                                     bbox, int(spec.foreground_fraction * np.prod(crop)), spec.intensities))
    return Fingerprint(spec.name, spec.channel_names, tuple(channel_kind(c) for c in spec.channel_names),
                       dict(enumerate(spec.labels)), tuple(cases), spec.intensities)


def nnunet_fingerprint(fingerprint: Fingerprint) -> dict:
    """The same fingerprint as nnU-Net's dataset_fingerprint.json."""
    ratios = [math.prod(c.cropped_shape) / math.prod(c.shape) for c in fingerprint.cases]
    return {
        "foreground_intensity_properties_per_channel": {
            str(i): asdict(s) for i, s in enumerate(fingerprint.foreground_intensities)},
        "median_relative_size_after_cropping": float(np.median(ratios)),
        "shapes_after_crop": [list(c.cropped_shape) for c in fingerprint.cases],
        "spacings": [list(c.spacing) for c in fingerprint.cases],
    }


def nnunet_dataset_json(fingerprint: Fingerprint, is_2d: bool) -> dict:
    return {
        "channel_names": {str(i): n for i, n in enumerate(fingerprint.channel_names)},
        "labels": {name: value for value, name in fingerprint.labels.items()},
        "numTraining": len(fingerprint.cases),
        "file_ending": ".png" if is_2d else ".nii.gz",
        # named, so nnU-Net does not open an (empty) example image to pick its reader
        "overwrite_image_reader_writer": "NaturalImage2DIO" if is_2d else "SimpleITKIO",
    }


# --- nnU-Net's side -------------------------------------------------------------------------------

def nnunet_python(venv_bin: str) -> tuple[Path | None, str]:
    """nnU-Net's Python, or None and why not."""
    python = Path(venv_bin) / "python"
    if not python.exists():
        return None, f"{python} not found"
    probe = subprocess.run([str(python), "-c", "import importlib.util, sys; "
                                               "sys.exit(importlib.util.find_spec('nnunetv2') is None)"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return None, f"nnunetv2 is not installed in {venv_bin}"
    return python, ""


def plan_with_nnunet(python: Path, fingerprints: list[tuple[DatasetSpec, Fingerprint]], workdir: Path,
                     real_weights: bool = False, preset: str = "default", budget_gb: float = BUDGET_GB) -> dict:
    """Write nnU-Net's raw/preprocessed folders for every dataset, run its planner on all; return
    {"versions": ..., "import_s": ..., "datasets": {spec name: {"plans": ..., "seconds": ...} or {"error": ...}}}."""
    raw, preprocessed = workdir / "nnUNet_raw", workdir / "nnUNet_preprocessed"
    names = {}
    for number, (spec, fp) in enumerate(fingerprints, start=901):
        name = f"Dataset{number}_{spec.name.replace('_', '')}"
        names[name] = spec.name
        dataset_json = nnunet_dataset_json(fp, spec.is_2d)
        ending = dataset_json["file_ending"]
        (raw / name / "imagesTr").mkdir(parents=True)
        (raw / name / "labelsTr").mkdir()
        (preprocessed / name).mkdir(parents=True)
        for case in fp.cases:  # empty files: the planner only lists them
            for c in range(len(fp.channel_names)):
                (raw / name / "imagesTr" / f"{case.case_id}_{c:04d}{ending}").touch()
            (raw / name / "labelsTr" / f"{case.case_id}{ending}").touch()
        (raw / name / "dataset.json").write_text(json.dumps(dataset_json, indent=1))
        (preprocessed / name / "dataset_fingerprint.json").write_text(json.dumps(nnunet_fingerprint(fp)))
    env = {**os.environ, "nnUNet_raw": str(raw), "nnUNet_preprocessed": str(preprocessed),
           "nnUNet_results": str(workdir / "nnUNet_results"), "nnUNet_n_proc_DA": "1"}
    env.pop("VIRTUAL_ENV", None)
    out = workdir / "nnunet_plans.json"
    cmd = [str(python), str(NNUNET_DRIVER), "--json", str(out), "--budget-gb", str(budget_gb),
           "--planner", NNUNET_PLANNERS[preset],
           *(["--real-weights"] if real_weights else []), *names]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0 or not out.is_file():
        raise BenchError(f"{' '.join(cmd[:3])} ... failed (exit "
                         f"{done.returncode}):\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    result = json.loads(out.read_text())
    datasets = {}
    for name, r in result["datasets"].items():
        if "error" not in r:
            r["plans"] = json.loads(Path(r.pop("plans_file")).read_text())
        datasets[names[name]] = r
    result["datasets"] = datasets
    return result


# --- one record per plan, the same fields for both tools ----------------------------------------

NNUNET_SCHEMES = {"CTNormalization": "ct", "ZScoreNormalization": "zscore", "NoNormalization": "noNorm",
                  "RescaleTo01Normalization": "rescale_to_0_1", "RGBTo01Normalization": "rgb_to_0_1"}


def _configuration(spacing, median_shape, patch, batch, strides, kernels, features, batch_dice,
                   network="unet", encoder_blocks=(), decoder_convs=(), previous_stage=None) -> dict:
    strides = [list(s) for s in strides]
    return {"spacing": [float(s) for s in spacing], "median_shape": [int(round(m)) for m in median_shape],
            "patch_size": list(patch), "batch_size": batch, "n_stages": len(strides),
            "pool_per_axis": [sum(s[a] > 1 for s in strides) for a in range(len(patch))],
            "strides": strides, "kernel_sizes": [list(k) for k in kernels],
            "features_per_stage": list(features), "batch_dice": batch_dice, "network": network,
            "encoder_blocks": [int(n) for n in encoder_blocks], "decoder_convs": [int(n) for n in decoder_convs],
            "previous_stage": previous_stage}


def summarize_autoseg(plans: dict) -> dict:
    """autoseg's plans in their JSON form (`Plans.to_json()`, as in plans.json)."""
    norm = []
    for n in plans["normalization"]:
        entry = {"scheme": n["scheme"], "use_mask": bool(n["use_nonzero_mask"])}
        if n["scheme"] == "ct":
            entry.update(clip=[float(x) for x in n["clip"]], mean=float(n["mean"]), std=float(n["std"]))
        norm.append(entry)
    configs = {}
    for name, c in plans["configurations"].items():
        stages = len(c["features_per_stage"])
        residual = c.get("network") == "residual_encoder_unet"
        decoder = c.get("n_conv_per_stage_decoder") or c["n_conv_per_stage"]
        configs[name] = _configuration(c["spacing"], c["median_shape"], c["patch_size"], c["batch_size"], c["strides"],
                                       c["kernel_sizes"], c["features_per_stage"], c.get("batch_dice"),
                                       "ResidualEncoderUNet" if residual else "PlainConvUNet",
                                       c["residual_blocks"] if residual else [c["n_conv_per_stage"]] * stages,
                                       [decoder] * (stages - 1), c.get("previous_stage"))
    return {"configurations": configs, "transpose_forward": list(plans["transpose_forward"]), "normalization": norm,
            "default_configuration": plans.get("default_configuration"), "only_nnunet": []}


def summarize_nnunet(plans: dict) -> dict:
    configs, derived = {}, []
    for name, c in plans["configurations"].items():
        if "inherits_from" in c:  # the cascade: its parent's plan, with a previous stage
            derived.append((name, c))
            continue
        arch = c["architecture"]["arch_kwargs"]
        configs[name] = _configuration(c["spacing"], c["median_image_size_in_voxels"], c["patch_size"], c["batch_size"],
                                       arch["strides"], arch["kernel_sizes"], arch["features_per_stage"],
                                       c["batch_dice"], c["architecture"]["network_class_name"].rsplit(".", 1)[-1],
                                       arch.get("n_blocks_per_stage") or arch.get("n_conv_per_stage"),
                                       arch["n_conv_per_stage_decoder"])
    only_nnunet = []
    for name, c in derived:
        if c["inherits_from"] in configs and set(c) <= {"inherits_from", "previous_stage"}:
            configs[name] = {**configs[c["inherits_from"]], "previous_stage": c.get("previous_stage")}
        else:
            only_nnunet.append(name)
    first = plans["configurations"]["3d_fullres" if "3d_fullres" in configs else "2d"]
    norm = []
    for i, (scheme, mask) in enumerate(zip(first["normalization_schemes"], first["use_mask_for_norm"])):
        entry = {"scheme": NNUNET_SCHEMES.get(scheme, scheme), "use_mask": bool(mask)}
        if entry["scheme"] == "ct":
            s = plans["foreground_intensity_properties_per_channel"][str(i)]
            entry.update(clip=[s["percentile_00_5"], s["percentile_99_5"]], mean=s["mean"], std=s["std"])
        norm.append(entry)
    return {"configurations": configs, "transpose_forward": list(plans["transpose_forward"]), "normalization": norm,
            "default_configuration": None, "only_nnunet": only_nnunet}


def _close(a, b, rtol: float = 1e-3) -> bool:
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y, rtol) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return a is not None and b is not None and abs(a - b) <= rtol * max(abs(a), abs(b), 1e-9)
    return a == b


CONFIG_FIELDS = ("spacing", "median_shape", "patch_size", "batch_size", "n_stages", "pool_per_axis", "strides",
                 "kernel_sizes", "features_per_stage", "batch_dice", "network", "encoder_blocks", "decoder_convs",
                 "previous_stage")


def differences(ours: dict, theirs: dict, intensity_rtol: float = 1e-3) -> list[str]:
    """Every compared field where the two plans disagree, as readable lines. CT clip, mean and std are
    compared within `intensity_rtol` (relative): on real images both tools draw their own random sample
    of foreground voxels, so these differ by sampling noise."""
    out = []
    a_set, b_set = set(ours["configurations"]), set(theirs["configurations"])
    if a_set != b_set:
        out.append(f"configurations: autoseg {' '.join(sorted(a_set)) or '-'}, nnU-Net "
                   f"{' '.join(sorted(b_set)) or '-'}")
    if ours["transpose_forward"] != theirs["transpose_forward"]:
        out.append(f"transpose_forward: autoseg {ours['transpose_forward']}, nnU-Net {theirs['transpose_forward']}")
    for i, (a, b) in enumerate(zip(ours["normalization"], theirs["normalization"])):
        for key in ("scheme", "use_mask", "clip", "mean", "std"):
            if not _close(a.get(key), b.get(key), intensity_rtol if key in ("clip", "mean", "std") else 1e-3):
                out.append(f"normalization[{i}].{key}: autoseg {_show(a.get(key))}, nnU-Net {_show(b.get(key))}")
    for name in [c for c in CONFIGURATIONS if c in a_set & b_set]:
        for key in CONFIG_FIELDS:
            a, b = ours["configurations"][name][key], theirs["configurations"][name][key]
            if not _close(a, b):
                out.append(f"{name} {key}: autoseg {_show(a, key)}, nnU-Net {_show(b, key)}")
    return out


def _show(value, key: str = "") -> str:
    """Compact text: 1x2x3 for a shape, run-length groups for per-stage lists."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list) and value and isinstance(value[0], list):
        groups: list[list] = []
        for v in value:
            if groups and groups[-1][0] == v:
                groups[-1][1] += 1
            else:
                groups.append([v, 1])
        return " ".join(",".join(map(str, v)) + (f"(x{k})" if k > 1 else "") for v, k in groups)
    if isinstance(value, list):
        sep = "," if key in ("features_per_stage", "clip", "transpose_forward") else "x"
        return sep.join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in value)
    return str(value)


def _norm_text(norm: list[dict]) -> str:
    parts = []
    for n in norm:
        text = n["scheme"] + ("+mask" if n["use_mask"] else "")
        if n["scheme"] == "ct":
            text += f" clip {n['clip'][0]:.4g}..{n['clip'][1]:.4g} mean {n['mean']:.4g} std {n['std']:.4g}"
        parts.append(text)
    if len(set(parts)) == 1 and len(parts) > 1:
        return f"{parts[0]} (x{len(parts)})"
    return ", ".join(parts)


def side_by_side(ours: dict | None, theirs: dict | None, intensity_rtol: float = 1e-3) -> list[str]:
    """Rows of both plans; `*` marks a row that differs."""
    def cell(summary, getter):
        if summary is None:
            return "-"
        try:
            return getter(summary)
        except KeyError:
            return "(not planned)"

    rows = [("configurations", lambda s: " ".join(c for c in CONFIGURATIONS if c in s["configurations"])
             + "".join(f" (+{d})" for d in s["only_nnunet"])),
            ("transpose_forward", lambda s: _show(s["transpose_forward"], "transpose_forward")),
            ("normalization", lambda s: _norm_text(s["normalization"]))]
    names = [c for c in CONFIGURATIONS if any(s and c in s["configurations"] for s in (ours, theirs))]
    for name in names:
        for key in CONFIG_FIELDS:
            rows.append((f"{name} {key}", lambda s, n=name, k=key: _show(s["configurations"][n][k], k)))
    diff_keys = set()
    if ours and theirs:
        for line in differences(ours, theirs, intensity_rtol):
            field = line.split(":", 1)[0]
            diff_keys.add(field.split("[")[0] if field.startswith("normalization") else field)
    width = max(len(cell(ours, g)) for _, g in rows)
    width = min(max(width, 10), 60)
    lines = [f"  {'':<29} {'autoseg':<{width}}   nnU-Net"]
    for label, getter in rows:
        mark = "*" if label in diff_keys else " "
        lines.append(f"{mark} {label:<29} {cell(ours, getter):<{width}}   {cell(theirs, getter)}")
    return lines


# --- the run ----------------------------------------------------------------------------------------

def machine() -> str:
    return f"{_machine.machine()}, {platform.system()} {platform.release()}"


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def autoseg_revision() -> str:
    done = subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def select(names: str | None) -> list[DatasetSpec]:
    if not names:
        return list(DATASETS)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    chosen = [s for s in DATASETS if any(w.lower() in s.name.lower() for w in wanted)]
    if not chosen:
        raise BenchError(f"no dataset matches {names!r}; choose from {', '.join(s.name for s in DATASETS)}")
    return chosen


def _main_config(summary: dict | None) -> str:
    if summary is None:
        return "-"
    configs = summary["configurations"]
    name = "3d_fullres" if "3d_fullres" in configs else "2d" if "2d" in configs else None
    if name is None:
        return "none"
    c = configs[name]
    return f"{name} {_show(c['patch_size'])} b{c['batch_size']}"


def compare_dataset(spec: DatasetSpec, fp: Fingerprint, nnunet_result: dict | None, plan_experiment,
                    preset: str = "default", budget_gb: float = BUDGET_GB) -> dict:
    """Plan `fp` with autoseg (timed) and set it against nnU-Net's result for it (None: not run)."""
    t = time.perf_counter()
    try:
        plans = plan_experiment(fp, budget_gb=budget_gb, preset=preset).to_json()  # as plans.json holds it
        ours, error = summarize_autoseg(plans), None
    except Exception as exc:  # a planner crash is a result too: show it and go on
        plans, ours, error = None, None, f"{type(exc).__name__}: {exc}"
    seconds = time.perf_counter() - t
    theirs_raw = nnunet_result or {}
    theirs = summarize_nnunet(theirs_raw["plans"]) if "plans" in theirs_raw else None
    diffs = differences(ours, theirs) if ours and theirs else None
    return {"name": spec.name, "modelled_on": spec.modelled_on, "spec": asdict(spec),
            "nnunet_fingerprint": nnunet_fingerprint(fp), "autoseg_error": error,
            "autoseg_plans": plans, "autoseg": ours, "autoseg_seconds": seconds,
            "nnunet_plans": theirs_raw.get("plans"), "nnunet": theirs, "nnunet_error": theirs_raw.get("error"),
            "nnunet_seconds": theirs_raw.get("seconds"),
            "differences": diffs, "identical": diffs == [] if diffs is not None else None}


def print_dataset(record: dict, spec: DatasetSpec, fp: Fingerprint) -> None:
    sp, shp = np.median(fp.spacings, axis=0), np.median(fp.cropped_shapes, axis=0)
    print(f"== {spec.name}: {spec.modelled_on}")
    print(f"   {len(fp.cases)} cases, channels {', '.join(spec.channel_names)}, {len(spec.labels)} labels; median "
          f"spacing {_show([float(x) for x in sp])} mm (z {fp.spacings[:, 0].min():g}..{fp.spacings[:, 0].max():g}), "
          f"median cropped shape {_show([int(x) for x in shp])}, cropping keeps {fp.median_cropped_fraction:.0%}")
    if spec.known_nnunet_plan:
        print(f"   nnU-Net is reported to plan: {spec.known_nnunet_plan}")
    if record["autoseg_error"]:
        print(f"   autoseg planner FAILED: {record['autoseg_error']}")
    if record["nnunet_error"]:
        print(f"   nnU-Net planner FAILED: {record['nnunet_error'].strip().splitlines()[-1]}")
    print("\n".join("   " + line for line in side_by_side(record["autoseg"], record["nnunet"])))
    if record["differences"] is not None:
        print(f"   differences ({len(record['differences'])}):" if record["differences"] else "   identical")
        for line in record["differences"]:
            print(f"     - {line}")
    print(f"   planning time: autoseg {record['autoseg_seconds']:.2f} s"
          + (f", nnU-Net {record['nnunet_seconds']:.2f} s" if record["nnunet_seconds"] is not None else ""))
    print()


def print_summary(records: list[dict]) -> None:
    header = f"{'dataset':<22} {'cases':>5} {'ch':>2}  {'autoseg':<30} {'nnU-Net':<30} {'diffs':>5}"
    print("summary (main configuration: 3d_fullres, else 2d)")
    print(header)
    print("-" * len(header))
    for r in records:
        n_diff = "-" if r["differences"] is None else str(len(r["differences"]))
        ours = "FAILED" if r["autoseg_error"] else _main_config(r["autoseg"])
        theirs = "FAILED" if r["nnunet_error"] else _main_config(r["nnunet"])
        print(f"{r['name']:<22} {r['spec']['num_cases']:>5} {len(r['spec']['channel_names']):>2}  "
              f"{ours:<30} {theirs:<30} {n_diff:>5}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", help="comma-separated names (or parts of names) to run; default: all")
    parser.add_argument("--nnunet-venv", default=DEFAULT_NNUNET_VENV, help="bin folder of the venv with nnunetv2")
    parser.add_argument("--no-nnunet", action="store_true", help="plan with autoseg only")
    parser.add_argument("--nnunet-real-weights", action="store_true",
                        help="let nnU-Net build the networks it sizes with real weights (same plans, minutes slower)")
    parser.add_argument("--seed", type=int, default=0, help="changes every case's drawn spacing and shape")
    parser.add_argument("--preset", default="default", choices=sorted(NNUNET_PLANNERS),
                        help="autoseg's planning preset, against the nnU-Net planner of the same name (default: "
                             "default, nnU-Net's ExperimentPlanner)")
    parser.add_argument("--json", type=Path, help="write fingerprints, both plans and the differences here")
    args = parser.parse_args(argv)
    try:
        specs = select(args.datasets)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    import torch

    from autoseg.planning.planner import plan_experiment
    from autoseg.planning.presets import PRESETS

    budget_gb = PRESETS[args.preset].memory_gb
    print(f"machine: {machine()}")
    print(f"autoseg {_version('autoseg')} ({autoseg_revision()}), numpy {np.__version__}, torch {torch.__version__}; "
          f"preset {args.preset}, memory budget {budget_gb:g} GB")
    fingerprints = [(spec, make_fingerprint(spec, args.seed)) for spec in specs]

    nnunet, skipped = None, "--no-nnunet"
    if not args.no_nnunet:
        python, skipped = nnunet_python(args.nnunet_venv)
        if python is not None:
            with tempfile.TemporaryDirectory(prefix="bench_plans_") as tmp:
                t = time.perf_counter()
                try:
                    nnunet = plan_with_nnunet(python, fingerprints, Path(tmp), args.nnunet_real_weights,
                                              args.preset, budget_gb)
                except BenchError as exc:
                    skipped = str(exc)
                nnunet_wall = time.perf_counter() - t
    if nnunet is not None:
        v = nnunet["versions"]
        print(f"nnunetv2 {v['nnunetv2']} (torch {v['torch']}, dynamic_network_architectures "
              f"{v['dynamic_network_architectures']}, Python {v['python']}), {NNUNET_PLANNERS[args.preset]}"
              f"{' (real weights)' if nnunet['real_weights'] else ' (networks sized on the meta device)'}; "
              f"{nnunet_wall:.1f} s for all datasets, {nnunet['import_s']:.1f} s of it importing")
    else:
        print(f"nnU-Net side skipped: {skipped}")
    print()

    records = [compare_dataset(spec, fp, nnunet["datasets"].get(spec.name) if nnunet else None, plan_experiment,
                               args.preset, budget_gb) for spec, fp in fingerprints]
    for record, (spec, fp) in zip(records, fingerprints):
        print_dataset(record, spec, fp)
    compared = [r for r in records if r["identical"] is not None]
    identical = sum(r["identical"] for r in compared)
    print_summary(records)
    if compared:
        print(f"\nidentical plans: {identical} of {len(compared)} datasets compared")
    else:
        print(f"\nidentical plans: not compared ({skipped})")

    if args.json:
        args.json.write_text(json.dumps({
            "machine": machine(), "autoseg_version": _version("autoseg"), "autoseg_revision": autoseg_revision(),
            "torch": torch.__version__, "nnunet_versions": nnunet["versions"] if nnunet else None,
            "nnunet_skipped": None if nnunet else skipped, "budget_gb": budget_gb, "preset": args.preset,
            "seed": args.seed,
            "identical": identical if compared else None, "compared": len(compared), "datasets": records,
        }, indent=1, default=float))
        print(f"wrote {args.json}")
    return 1 if any(r["autoseg_error"] or r["nnunet_error"] for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
