"""Real-data parity: `autoseg plan` against `nnUNetv2_plan_and_preprocess` on the same dataset, from
the images to the arrays training reads.

    python benchmarks/bench_plan_parity.py DATASET [--cases N] [--respace F,F,... [--respace-axis A]]
                                           [--channel-names N,...] [--background-to-zero] [--as-tiff]
                                           [--as-decathlon-4d]
                                           [--memory-gb GB]
                                           [--workers W]
                                           [--configs 2d,3d_fullres,3d_lowres] [--keep DIR] [--json OUT]
                                           [--nnunet-venv /work/bench/nnunet_venv/bin]

bench_plans.py checks the planner alone on fingerprints made up in memory. This script checks what
those cannot: reading real files (4D NIfTI, one file per channel, RGB PNG), the fingerprint taken
from them (spacings, shapes after cropping to the non-zero region, foreground intensities, how much
cropping keeps), the plans that follow, and the preprocessed arrays themselves (crop, normalization,
transpose, resampling, the -1 outside the non-zero mask), case by case.

Both tools run on the same cases, each into its own folder: autoseg with `autoseg plan DATASET -o W
--workers W`, nnU-Net with `nnUNetv2_plan_and_preprocess -d ID -np W -npfp W -c <configs>` after
bench_plan.py's conversion into its raw layout (links; a Decathlon dataset through
nnUNetv2_convert_MSD_dataset). Then it prints:

- fingerprint: per case spacing and shape after cropping (exact), the median fraction cropping keeps,
  and the foreground intensity statistics per channel (relative differences: each tool draws its
  own random sample of foreground voxels);
- plans: both side by side (bench_plans.py's table) and every field that differs;
- arrays: for the first N cases (sorted by id) of each configuration both preprocessed, the shapes,
  the largest and mean absolute difference of the normalized images, and the share of seg voxels
  (labels and the -1 outside the mask) that agree, with the Dice of each label between the two.

`--channel-names CT` renames the channels in a copy of dataset.json, so another normalization (CT's
clip and dataset-wide standardization) is compared on the same images. `--respace 1,2.5,4` copies
the dataset with each case's spacing along one file axis (`--respace-axis`, default z) multiplied
by the factors in turn (headers only, voxels unchanged), so cases differ in spacing and resampling
is compared too: with factors above 3 the thick axis is resampled apart, and along x or y it also
moves the axis order (transpose). The shared datasets are otherwise all at one spacing and need no
resampling. `--background-to-zero` shifts every image by its corner voxel's value, so a constant
background (BraTS here) becomes 0 as in skull-stripped MRI stored with zeros: cropping to the
non-zero region and z-scoring inside the non-zero mask then apply. `--as-tiff` rewrites the cases
(after any of the above) as TIFF stacks in nnU-Net v2's layout with each case's spacing in
`<case>.json` files, nnU-Net's convention for TIFF, which has no slice spacing; `--as-decathlon-4d`
rewrites them in the Decathlon layout with every channel of a case in one 4D NIfTI (nnU-Net
converts that with nnUNetv2_convert_MSD_dataset, autoseg reads it as it is). `--memory-gb 2` shrinks the patches of
both planners, so large volumes plan 3d_lowres.

Needs nnunetv2 in its own venv (benchmarks/README.md says how); without it the script stops.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _machine  # noqa: E402
from bench_plan import BenchError, _dataset_meta, find_autoseg, nnunet_env, require_nnunet_bin, stage_nnunet_raw  # noqa: E402
from bench_plans import CONFIGURATIONS, differences, side_by_side, summarize_autoseg, summarize_nnunet  # noqa: E402

DEFAULT_NNUNET_VENV = "/work/bench/nnunet_venv/bin"
INTENSITY_RTOL = 0.01  # sampling noise between two random draws of 10^7 foreground voxels is far below this
STAT_KEYS = ("mean", "std", "median", "percentile_00_5", "percentile_99_5", "min", "max")


# --- running the two tools ---------------------------------------------------------------------------

def dataset_variant(dataset: Path, out: Path, factors: list[float] | None, channel_names: list[str] | None,
                    axis: int = 2, background_to_zero: bool = False) -> Path:
    """A copy of `dataset` in `out`: case i's spacing along file axis `axis` (x, y, z = 0, 1, 2) times
    factors[i % n] (image channels and label alike; 3D files only), other channel names in its
    dataset.json, and/or every image minus its corner voxel's value (a constant background becomes 0).
    Files left as they are become links. Either layout."""
    import SimpleITK as sitk

    from autoseg.dataset.layout import load_dataset

    ds = load_dataset(dataset)
    target = out / dataset.name
    target.mkdir(parents=True)
    meta = json.loads((dataset / "dataset.json").read_text())
    if channel_names:
        key = "channel_names" if "channel_names" in meta else "modality"
        if len(channel_names) != len(meta[key]):
            raise BenchError(f"--channel-names gives {len(channel_names)} name(s), the dataset has {len(meta[key])} "
                             f"channel(s)")
        meta[key] = {str(i): n for i, n in enumerate(channel_names)}
    (target / "dataset.json").write_text(json.dumps(meta, indent=1))
    for i, case in enumerate(sorted(ds.cases, key=lambda c: c.case_id)):
        for path in (*case.image_files, case.label_file):
            if path is None:
                continue
            dest = target / path.relative_to(dataset.resolve())
            dest.parent.mkdir(parents=True, exist_ok=True)
            is_image = path != case.label_file
            if not factors and not (background_to_zero and is_image):
                dest.symlink_to(path)
                continue
            image = sitk.ReadImage(str(path))
            if factors:
                if image.GetDimension() < 3:
                    raise BenchError(f"{path}: --respace needs 3D images")
                spacing = list(image.GetSpacing())
                spacing[axis] *= factors[i % len(factors)]
                image.SetSpacing(spacing)
            if background_to_zero and is_image:
                if image.GetNumberOfComponentsPerPixel() != 1:
                    raise BenchError(f"{path}: --background-to-zero needs one value per voxel")
                voxels = sitk.GetArrayFromImage(image).astype(np.float32)
                shifted = sitk.GetImageFromArray(voxels - voxels.flat[0], isVector=False)
                shifted.CopyInformation(image)
                image = shifted
            sitk.WriteImage(image, str(dest), useCompression=True)
    return target


def _rewritten(dataset: Path, out: Path, folder: str, option: str):
    """The target folder `out/<folder>` (`{name}` filled with the dataset's bare name) with empty imagesTr
    and labelsTr, and per case (case, image, geometry, label); 2D cases are refused, naming `option`."""
    import re

    from autoseg.dataset.layout import load_dataset, read_case_image, read_case_label

    ds = load_dataset(dataset)
    name = re.sub(r"[^A-Za-z0-9]", "", re.sub(r"^(Task\d+|Dataset\d+)_", "", dataset.name)) or "Dataset"
    target = out / folder.format(name=name)
    for sub in ("imagesTr", "labelsTr"):
        (target / sub).mkdir(parents=True)

    def cases():
        for case in ds.cases:
            image, geometry = read_case_image(case, ds.num_channels)
            if geometry.is_2d:
                raise BenchError(f"{case.image_files[0]}: {option} needs 3D cases")
            yield case, image, geometry, read_case_label(case)

    return ds, name, target, cases()


def as_tiff_stacks(dataset: Path, out: Path) -> Path:
    """`dataset` (either layout, 3D) rewritten in nnU-Net v2's layout as TIFF stacks: one float32
    `imagesTr/<case>_<cccc>.tif` per channel, `labelsTr/<case>.tif`, and each case's spacing in
    `imagesTr/<case>.json` and `labelsTr/<case>.json` (nnU-Net's Tiff3DIO convention)."""
    import SimpleITK as sitk

    ds, _, target, cases = _rewritten(dataset, out, "Dataset996_{name}Tiff", "--as-tiff")
    for case, image, geometry, label in cases:
        spacing = json.dumps({"spacing": [float(s) for s in geometry.spacing]})
        for c in range(ds.num_channels):
            sitk.WriteImage(sitk.GetImageFromArray(image[c].astype(np.float32)),
                            str(target / "imagesTr" / f"{case.case_id}_{c:04d}.tif"))
        sitk.WriteImage(sitk.GetImageFromArray(label.astype(np.uint8 if label.max() < 256 else np.uint16)),
                        str(target / "labelsTr" / f"{case.case_id}.tif"))
        (target / "imagesTr" / f"{case.case_id}.json").write_text(spacing)
        (target / "labelsTr" / f"{case.case_id}.json").write_text(spacing)
    (target / "dataset.json").write_text(json.dumps({
        "channel_names": {str(i): n for i, n in enumerate(ds.channel_names)},
        "labels": {n: k for k, n in ds.labels.items()}, "numTraining": len(ds.cases), "file_ending": ".tif"}, indent=1))
    return target


def as_decathlon_4d(dataset: Path, out: Path) -> Path:
    """`dataset` (either layout, 3D) rewritten in the Medical Segmentation Decathlon's layout: all channels
    of a case in one 4D NIfTI (channels on the 4th axis, as in Task01_BrainTumour or Task05_Prostate),
    the label a 3D NIfTI, the geometry of the first channel kept."""
    import SimpleITK as sitk

    ds, name, target, cases = _rewritten(dataset, out, "Task96_{name}4D", "--as-decathlon-4d")
    training = []
    for case, image, geometry, label in cases:
        volumes = []
        for c in range(ds.num_channels):
            volume = sitk.GetImageFromArray(image[c].astype(np.float32))
            volume.SetSpacing(tuple(reversed(geometry.spacing)))
            volume.SetOrigin(geometry.origin)
            volume.SetDirection(geometry.direction)
            volumes.append(volume)
        sitk.WriteImage(sitk.JoinSeries(volumes), str(target / "imagesTr" / f"{case.case_id}.nii.gz"), True)
        label_image = sitk.GetImageFromArray(label.astype(np.uint8))
        label_image.CopyInformation(volumes[0])
        sitk.WriteImage(label_image, str(target / "labelsTr" / f"{case.case_id}.nii.gz"), True)
        training.append({"image": f"./imagesTr/{case.case_id}.nii.gz", "label": f"./labelsTr/{case.case_id}.nii.gz"})
    (target / "dataset.json").write_text(json.dumps({
        "name": name, "modality": {str(i): n for i, n in enumerate(ds.channel_names)},
        "labels": {str(k): n for k, n in ds.labels.items()}, "numTraining": len(training), "training": training,
        "test": []}, indent=1))
    return target


def run_autoseg(dataset: Path, workdir: Path, workers: int, configs: list[str], memory_gb: float, log: Path) -> float:
    cmd = [*find_autoseg(None), "plan", str(dataset), "-o", str(workdir), "--workers", str(workers),
           "--configs", *configs, "--memory-gb", f"{memory_gb:g}"]
    return _run(cmd, dict(os.environ), log)


def run_nnunet(dataset: Path, tmp: Path, nnunet_bin: Path, workers: int, configs: list[str], memory_gb: float,
               log: Path) -> tuple[Path, float]:
    """Convert and plan-and-preprocess with nnU-Net; its preprocessed dataset folder and the seconds."""
    env = nnunet_env(nnunet_bin, tmp)
    raw, pre = Path(env["nnUNet_raw"]), Path(env["nnUNet_preprocessed"])
    raw.mkdir(parents=True)
    pre.mkdir()
    dataset_id, name, _ = stage_nnunet_raw(dataset, _dataset_meta(dataset), raw, None, nnunet_bin, env)
    cmd = [str(nnunet_bin / "nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "-np",
           *[str(workers)] * len(configs), "-npfp", str(workers), "-c", *configs,
           "-gpu_memory_target", f"{memory_gb:g}"]
    seconds = _run(cmd, env, log)
    return pre / name, seconds


def _run(cmd: list[str], env: dict, log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        tail = log.read_text()[-3000:]
        raise BenchError(f"{' '.join(cmd)} failed (exit {done.returncode}); the end of {log}:\n{tail}")
    return time.perf_counter() - start


# --- comparing -----------------------------------------------------------------------------------

def compare_fingerprints(ours: dict, theirs: dict) -> dict:
    """Per-case geometry (exact) and pooled foreground statistics (relative) of both fingerprints.

    autoseg lists cases in dataset order with their ids; nnU-Net lists them without ids, sorted by id."""
    cases = sorted(ours["cases"], key=lambda c: c["case_id"])
    n_theirs = len(theirs["spacings"])
    out: dict = {"cases": [len(cases), n_theirs], "problems": []}
    if len(cases) != n_theirs:
        out["problems"].append(f"case count: autoseg {len(cases)}, nnU-Net {n_theirs}")
    spacing_diff = [c["case_id"] for c, s in zip(cases, theirs["spacings"])
                    if not np.allclose(c["spacing"], s, rtol=1e-5)]
    shape_diff = [c["case_id"] for c, s in zip(cases, theirs["shapes_after_crop"])
                  if list(c["cropped_shape"]) != [int(x) for x in s]]
    out["spacing_differs"], out["cropped_shape_differs"] = spacing_diff, shape_diff
    for what, ids in (("spacing", spacing_diff), ("shape after cropping", shape_diff)):
        if ids:
            out["problems"].append(f"{what} differs in {len(ids)} case(s): {', '.join(ids[:5])}"
                                   + (" ..." if len(ids) > 5 else ""))
    kept = float(np.median([np.prod(c["cropped_shape"]) / np.prod(c["shape"]) for c in cases]))
    out["median_cropped_fraction"] = [kept, float(theirs["median_relative_size_after_cropping"])]
    if abs(kept - out["median_cropped_fraction"][1]) > 1e-6:
        out["problems"].append(f"median fraction kept by cropping: autoseg {kept:.4f}, nnU-Net "
                               f"{out['median_cropped_fraction'][1]:.4f}")
    stats = []
    for c, a in enumerate(ours["foreground_intensities"]):
        b = theirs["foreground_intensity_properties_per_channel"][str(c)]
        row = {}
        for key in STAT_KEYS:
            x, y = float(a[key]), float(b[key])
            spread = max(abs(float(b["std"])), 1e-12)
            # relative to the channel's spread, so a mean near 0 (pre-standardized data) is judged fairly
            row[key] = {"autoseg": x, "nnunet": y, "rel": abs(x - y) / spread}
            exact = key in ("min", "max")  # drawn with replacement, both samples may miss the extremes
            if not exact and row[key]["rel"] > INTENSITY_RTOL:
                out["problems"].append(f"channel {c} foreground {key}: autoseg {x:.5g}, nnU-Net {y:.5g} "
                                       f"({row[key]['rel']:.2%} of the std)")
        stats.append(row)
    out["foreground_intensities"] = stats
    return out


def _open(path: Path) -> np.ndarray:
    import blosc2

    return blosc2.open(str(path), mode="r")[...]


def compare_case(ours_dir: Path, theirs_dir: Path, case_id: str) -> dict:
    """Shapes, normalized-image differences and seg agreement of one case preprocessed by both."""
    a, b = _open(ours_dir / f"{case_id}.b2nd"), _open(theirs_dir / f"{case_id}.b2nd")
    sa, sb = _open(ours_dir / f"{case_id}_seg.b2nd"), _open(theirs_dir / f"{case_id}_seg.b2nd")
    row = {"case_id": case_id, "shape": [list(a.shape), list(b.shape)], "same_shape": a.shape == b.shape}
    if not row["same_shape"] or sa.shape != sb.shape:
        return row
    diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
    row["data_max_abs_diff"] = float(diff.max()) if diff.size else 0.0
    row["data_mean_abs_diff"] = float(diff.mean()) if diff.size else 0.0
    row["data_std"] = float(b.std()) if b.size else 0.0
    row["seg_agreement"] = float(np.mean(sa == sb)) if sa.size else 1.0
    from autoseg.evaluation import dice

    values = sorted((set(np.unique(sa).tolist()) | set(np.unique(sb).tolist())) - {0})  # each in one at least
    row["seg_dice"] = {str(int(v)): dice(sa == v, sb == v) for v in values}
    return row


def compare_arrays(ours_ws: Path, ours_plans: dict, theirs_pre: Path, theirs_plans: dict, cases: int) -> dict:
    """compare_case for the first `cases` case ids (0: all) of every configuration both preprocessed."""
    out = {}
    for name in CONFIGURATIONS:
        if name not in ours_plans["configurations"] or name not in theirs_plans["configurations"]:
            continue
        ours_dir = ours_ws / "preprocessed" / ours_plans["configurations"][name]["data_identifier"]
        theirs_dir = theirs_pre / theirs_plans["configurations"][name]["data_identifier"]
        if not theirs_dir.is_dir() or not ours_dir.is_dir():
            continue
        ids = sorted(p.name[:-5] for p in ours_dir.glob("*.json"))
        ids = [i for i in ids if (theirs_dir / f"{i}.b2nd").is_file()]
        out[name] = [compare_case(ours_dir, theirs_dir, i) for i in (ids[:cases] if cases else ids)]
    return out


def array_summary(rows: list[dict]) -> dict:
    same = [r for r in rows if r["same_shape"] and "seg_agreement" in r]
    return {"cases": len(rows), "same_shape": len(same),
            "data_max_abs_diff": max((r["data_max_abs_diff"] for r in same), default=None),
            "data_mean_abs_diff": float(np.mean([r["data_mean_abs_diff"] for r in same])) if same else None,
            "seg_agreement_min": min((r["seg_agreement"] for r in same), default=None),
            "seg_dice_min": min((d for r in same for d in r["seg_dice"].values()), default=None)}


# --- printing ------------------------------------------------------------------------------------

def print_fingerprint(fp: dict, channel_names: list[str]) -> None:
    print(f"fingerprint: {fp['cases'][0]} cases (autoseg), {fp['cases'][1]} (nnU-Net); per case spacing "
          f"{'identical' if not fp['spacing_differs'] else 'DIFFERS'}, shape after cropping "
          f"{'identical' if not fp['cropped_shape_differs'] else 'DIFFERS'}; cropping keeps (median) "
          f"{fp['median_cropped_fraction'][0]:.4f} / {fp['median_cropped_fraction'][1]:.4f}")
    print(f"  {'foreground intensities':<28} {'autoseg':>12} {'nnU-Net':>12} {'|diff|/std':>11}")
    for c, row in enumerate(fp["foreground_intensities"]):
        name = channel_names[c] if c < len(channel_names) else str(c)
        for key in STAT_KEYS:
            v = row[key]
            print(f"  {f'{c} {name} {key}':<28} {v['autoseg']:>12.5g} {v['nnunet']:>12.5g} {v['rel']:>10.3%}")


def print_arrays(arrays: dict) -> None:
    for name, rows in arrays.items():
        s = array_summary(rows)
        print(f"arrays {name}: {s['same_shape']} of {s['cases']} case(s) with the same shape")
        print(f"  {'case':<24} {'shape autoseg':<18} {'shape nnU-Net':<18} {'max|diff|':>10} {'mean|diff|':>11} "
              f"{'seg agree':>10}  label Dice")
        for r in rows:
            sa, sb = ("x".join(map(str, s)) for s in r["shape"])
            if "seg_agreement" not in r:
                print(f"  {r['case_id']:<24} {sa:<18} {sb:<18} {'-':>10} {'-':>11} {'-':>10}")
                continue
            dice = " ".join(f"{k}:{v:.4f}" for k, v in r["seg_dice"].items())
            print(f"  {r['case_id']:<24} {sa:<18} {sb:<18} {r['data_max_abs_diff']:>10.3g} "
                  f"{r['data_mean_abs_diff']:>11.3g} {r['seg_agreement']:>10.4%}  {dice}")


# --- the run -------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path, help="raw dataset (Decathlon or nnU-Net v2 layout)")
    parser.add_argument("--cases", type=int, default=5, help="cases whose arrays are compared per configuration "
                                                            "(first by id; 0: all; default: %(default)s)")
    parser.add_argument("--configs", default="2d,3d_fullres,3d_lowres",
                        help="configurations both tools plan and preprocess (default: %(default)s)")
    parser.add_argument("--respace", metavar="F,F,...",
                        help="multiply each case's spacing along --respace-axis by these factors in turn (3D only)")
    parser.add_argument("--respace-axis", type=int, choices=(0, 1, 2), default=2,
                        help="file axis --respace changes: 0 x, 1 y, 2 z (default: %(default)s)")
    parser.add_argument("--background-to-zero", action="store_true",
                        help="subtract each image's corner value, so a constant background becomes 0 and cropping "
                             "and z-scoring inside the non-zero mask are compared")
    parser.add_argument("--as-tiff", action="store_true",
                        help="rewrite the (3D) cases as TIFF stacks whose spacing lives in JSON files beside them")
    parser.add_argument("--as-decathlon-4d", action="store_true",
                        help="rewrite the (3D) cases in the Decathlon layout, every channel in one 4D NIfTI")
    parser.add_argument("--memory-gb", type=float, default=8.0,
                        help="memory target of both planners (autoseg --memory-gb, nnU-Net -gpu_memory_target; "
                             "default: %(default)s); a small one makes large volumes plan 3d_lowres")
    parser.add_argument("--channel-names", metavar="NAME,...",
                        help="rename the channels in a copy of dataset.json (e.g. CT, to compare CT normalization)")
    parser.add_argument("--workers", type=int, default=2, help="processes for each tool (default: %(default)s)")
    parser.add_argument("--nnunet-venv", default=DEFAULT_NNUNET_VENV, help="nnunetv2's venv or its bin folder")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="work in DIR (kept) instead of a temporary folder")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = set(configs) - set(CONFIGURATIONS)
    if unknown:
        print(f"error: unknown configuration(s) {sorted(unknown)}; choose from {', '.join(CONFIGURATIONS)}",
              file=sys.stderr)
        return 2
    try:
        nnunet_bin = require_nnunet_bin(args.nnunet_venv)
        with tempfile.TemporaryDirectory(prefix="bench_plan_parity_") as tmp_name:
            tmp = args.keep or Path(tmp_name)
            tmp.mkdir(parents=True, exist_ok=True)
            record = run(args.dataset.resolve(), tmp, nnunet_bin, args, configs)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        args.json.write_text(json.dumps(record, indent=1, default=float))
        print(f"wrote {args.json}")
    return 0


def run(dataset: Path, tmp: Path, nnunet_bin: Path, args: argparse.Namespace, configs: list[str]) -> dict:
    print(f"machine: {_machine.machine()}")
    factors = [float(f) for f in args.respace.split(",")] if args.respace else None
    names = [n.strip() for n in args.channel_names.split(",")] if args.channel_names else None
    if factors or names or args.background_to_zero:
        dataset = dataset_variant(dataset, tmp / "variant", factors, names, args.respace_axis, args.background_to_zero)
    if args.background_to_zero:
        print("images shifted: each minus its corner voxel, so a constant background is 0")
    if args.as_decathlon_4d:
        dataset = as_decathlon_4d(dataset, tmp / "decathlon")
        print(f"rewritten in the Decathlon layout, channels in one 4D NIfTI: {dataset.name}")
    if args.as_tiff:
        dataset = as_tiff_stacks(dataset, tmp / "tiff")
        print(f"rewritten as TIFF stacks with JSON spacing files (nnU-Net v2 layout): {dataset.name}")
    if factors:
        print(f"dataset respaced: file axis {args.respace_axis} spacing times {', '.join(f'{f:g}' for f in factors)} "
              f"in turn")
    if names:
        print(f"channels renamed: {', '.join(names)}")
    ours_ws = tmp / "autoseg"
    t_ours = run_autoseg(dataset, ours_ws, args.workers, configs, args.memory_gb, tmp / "autoseg.log")
    theirs_pre, t_theirs = run_nnunet(dataset, tmp / "nnunet", nnunet_bin, args.workers, configs, args.memory_gb,
                                      tmp / "nnunet.log")
    print(f"dataset: {dataset}; autoseg plan {t_ours:.1f} s, nnUNetv2_plan_and_preprocess {t_theirs:.1f} s (both with "
          f"{args.workers} workers, configurations {', '.join(configs)}, memory target {args.memory_gb:g} GB)\n")

    ours_fp = json.loads((ours_ws / "fingerprint.json").read_text())
    theirs_fp = json.loads((theirs_pre / "dataset_fingerprint.json").read_text())
    fp = compare_fingerprints(ours_fp, theirs_fp)
    print_fingerprint(fp, ours_fp["channel_names"])

    ours_plans = json.loads((ours_ws / "plans.json").read_text())
    theirs_plans = json.loads((theirs_pre / "nnUNetPlans.json").read_text())
    a, b = summarize_autoseg(ours_plans), summarize_nnunet(theirs_plans)
    # Compare only what was asked of both: nnU-Net plans 2d and 3d_fullres whatever -c says.
    for summary in (a, b):
        summary["configurations"] = {k: v for k, v in summary["configurations"].items() if k in configs}
    plan_diffs = differences(a, b, INTENSITY_RTOL)
    print("\nplans:")
    print("\n".join("  " + line for line in side_by_side(a, b, INTENSITY_RTOL)))
    print(f"  {'identical' if not plan_diffs else f'{len(plan_diffs)} difference(s):'}")
    for line in plan_diffs:
        print(f"    - {line}")

    arrays = compare_arrays(ours_ws, ours_plans, theirs_pre, theirs_plans, args.cases)
    print()
    print_arrays(arrays)
    summaries = {name: array_summary(rows) for name, rows in arrays.items()}
    print("\nsummary: fingerprint " + ("matches" if not fp["problems"] else "; ".join(fp["problems"]))
          + f"; plans {'identical' if not plan_diffs else f'{len(plan_diffs)} difference(s)'}; arrays "
          + ("; ".join(f"{n} {s['same_shape']}/{s['cases']} same shape, max |diff| {s['data_max_abs_diff']:.3g}, "
                       f"seg agreement >= {s['seg_agreement_min']:.4%}" if s["same_shape"] else
                       f"{n} 0/{s['cases']} same shape" for n, s in summaries.items()) or "none compared"))
    return {"machine": _machine.machine(), "dataset": str(dataset), "configs": configs,
            "seconds": {"autoseg": t_ours, "nnunet": t_theirs}, "fingerprint": fp,
            "plans": {"autoseg": a, "nnunet": b, "differences": plan_diffs},
            "arrays": arrays, "array_summary": summaries}


if __name__ == "__main__":
    sys.exit(main())
