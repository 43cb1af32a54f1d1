"""Seconds per case of `autoseg predict` with one fold and with several, mirroring on and off; with
--nnunet-venv, the same for `nnUNetv2_predict` on the same cases and a plan of the same shape, and
the ratio.

    python benchmarks/bench_predict.py WORKDIR -i INPUT [--folds 0] [--folds 0 1 2 3 4]
                                       [--mirroring both] [--cases N]
                                       [--nnunet-venv /work/bench/nnunet_venv/bin]

Large-volume mode (no workspace needed): peak resident memory and seconds of one `autoseg predict`
process on a synthetic CT-like volume, with a 3d_fullres plan made by autoseg's planner for a
dataset of such volumes and a fold of random weights (weights change the labels, not the work):

    python benchmarks/bench_predict.py --large 400x512x512 --labels 14 [--spacing 1.5x0.8x0.8]
                                       [--mirroring off] [--step-size 1.0] [--workers 0]

With --nnunet-venv, `nnUNetv2_predict_from_modelfolder` runs on the same file with a model folder of
the same plan and topology (written by _nnunet_model_folder.py with nnU-Net's own network builder).
Peak memory: autoseg's is the kernel's RSS high-water mark of its one process (wait4's ru_maxrss),
activations, threads and torch included; for the comparison, both tools' process trees are sampled
every 0.2 s for their proportional set size (nnU-Net runs worker processes, whose shared libraries
RSS would count once per process).

The input cases are linked into a temporary folder in nnU-Net's naming (`<case>_0000.nii.gz`, one
file per channel), which both tools read, so they predict exactly the same files (`--cases N`: the
first N case ids only). Each autoseg setting runs `predict_folder` into a fresh temporary folder in
this process (the first setting also pays torch's start-up) and prints wall seconds per case.

nnU-Net v2 is given a model folder of the plan it makes for the same raw dataset (prepared once in
`--nnunet-cache`, as bench_train.py does; bench_train.py checks that plan equals autoseg's). Its
`checkpoint_final.pth` holds initial weights written by nnU-Net's own trainer (`on_train_end` right
after `on_train_start`): the weights do not change the work done, only the labels. For each
mirroring setting, `nnUNetv2_predict -f 0 -chk checkpoint_final.pth -device cpu -npp 2 -nps 2`
(`--disable_tta` when mirroring is off) is timed from launch to exit, and also from the moment it
reports the cases it found (after its imports and start-up) to exit. Its ratio is taken against
autoseg's first one-fold setting with the same mirroring.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from bench_train import (
    DEFAULT_NNUNET_CACHE,
    BenchError,
    autoseg_precisions,
    machine,
    nnunet_env,
    prepare_nnunet,
    run_nnunet_driver,
    workspace_dataset,
)

from autoseg.inference.batch import predict_folder
from autoseg.inference.inputs import discover_inputs
from autoseg.inference.settings import BatchOptions, ComputeSettings, ModelChoice, WindowSettings

if TYPE_CHECKING:
    from autoseg.planning.plans import ConfigurationPlan

NNUNET_TRAINER_FOLDER = "nnUNetTrainer__nnUNetPlans__{configuration}"
# nnUNetv2_predict's first line after its imports and model loading, and the line its first case
# starts with (after its preprocessing processes have been spawned and have read that case).
NNUNET_MARKERS = (("ready", "There are"), ("first_case", "Predicting "))


NNUNET_MULTICHANNEL_ENDINGS = (".png", ".bmp")  # nnunetv2's NaturalImage2DIO reads an RGB file as 3 channels


def link_inputs(inputs: list[Path], num_channels: int, folder: Path, max_cases: int | None) -> list[str]:
    """Link the input cases into `folder` as <case>_<cccc><ending>; return their ids."""
    cases, problems = discover_inputs(inputs, num_channels)
    if problems:
        raise BenchError("unusable inputs: " + "; ".join(f"{path}: {why}" for path, why in problems[:5]))
    cases = cases[:max_cases] if max_cases else cases
    if not cases:
        raise BenchError(f"no input cases found in {', '.join(map(str, inputs))}")
    folder.mkdir(parents=True)
    for case in cases:
        # nnU-Net's natural-image reader takes a colour PNG as all its channels, as the training images are stored
        colour_png = len(case.files) == 1 and case.ending in NNUNET_MULTICHANNEL_ENDINGS
        if len(case.files) != num_channels and not colour_png:
            raise BenchError(f"{case.files[0]}: one file holding {num_channels} channels; nnU-Net takes that only as "
                             f"a {' or '.join(NNUNET_MULTICHANNEL_ENDINGS)} (its natural-image reader), so pass one "
                             "file per channel (<case>_<cccc>)")
        for channel, path in enumerate(case.files):
            (folder / f"{case.case_id}_{channel:04d}{case.ending}").symlink_to(path.resolve())
    return [case.case_id for case in cases]


def nnunet_model(nnunet_bin: Path, cache: Path, name: str, configuration: str) -> Path:
    """The fold_0/checkpoint_final.pth of an nnU-Net model of this plan, written by its trainer if missing."""
    checkpoint = (cache / "nnUNet_results" / name / NNUNET_TRAINER_FOLDER.format(configuration=configuration)
                  / "fold_0" / "checkpoint_final.pth")
    if not checkpoint.is_file():
        print(f"nnunetv2: writing a model folder with initial weights at {checkpoint.parent.parent} (once; not timed)",
              flush=True)
        with tempfile.TemporaryDirectory(prefix="bench_predict_nnunet_") as tmp:
            figures = run_nnunet_driver(nnunet_bin, cache, name, configuration, 0, 0, 0, 0, cache / "nnUNet_results",
                                        Path(tmp) / "driver.log")
        if figures["checkpoint"] != str(checkpoint):
            raise BenchError(f"nnU-Net's trainer wrote {figures['checkpoint']}, expected {checkpoint}")
    return checkpoint


def _size(text: str, kind=int) -> tuple:
    try:
        values = tuple(kind(v) for v in text.lower().split("x"))
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) <= 0:
        raise argparse.ArgumentTypeError(f"expected three positive numbers as ZxYxX, got {text!r}")
    return values


def large_volume_workspace(folder: Path, shape: tuple[int, ...], spacing: tuple[float, ...],
                           num_labels: int) -> ConfigurationPlan:
    """A workspace with autoseg's 3d_fullres plan for a dataset of `shape` volumes at `spacing` (CT) and a
    fold 0 of random weights; returns the configuration's plan."""
    import torch

    from autoseg import workspace
    from autoseg.fingerprint import CaseFingerprint, Fingerprint, IntensityStats
    from autoseg.model_files import Checkpoint, save_checkpoint
    from autoseg.network.unet import build_unet
    from autoseg.planning.planner import plan_experiment

    stats = IntensityStats(40.0, 60.0, -200.0, 400.0, 40.0, -100.0, 250.0)
    cases = tuple(CaseFingerprint(f"ct_{i:03d}", spacing, shape, tuple((0, n) for n in shape), 10**6, (stats,))
                  for i in range(20))
    labels = {0: "background", **{k: f"structure_{k}" for k in range(1, num_labels)}}
    plans = plan_experiment(Fingerprint("synthetic_ct", ("CT",), ("ct",), labels, cases, (stats,)),
                            configurations=["3d_fullres"])
    plans.save(workspace.plans_json(folder))
    torch.manual_seed(0)
    network = build_unet(plans.network_topology("3d_fullres"), deep_supervision=True)
    save_checkpoint(workspace.fold_dir(folder, "3d_fullres", 0) / "checkpoint_final.pt",
                    Checkpoint(network_state=network.state_dict(), configuration="3d_fullres", epoch=0))
    return plans.configuration("3d_fullres")


def synthetic_ct(path: Path, shape: tuple[int, ...], spacing: tuple[float, ...]) -> None:
    """An int16 CT-like volume: air around an elliptic body of soft tissue with denser blobs, written as .mha."""
    import numpy as np

    from autoseg.dataset.image_io import Geometry, write_image

    rng = np.random.default_rng(0)
    z, y, x = shape
    yy, xx = np.ogrid[:y, :x]
    body = ((yy - y / 2) / (0.42 * y)) ** 2 + ((xx - x / 2) / (0.47 * x)) ** 2 < 1
    volume = np.full(shape, -1000, dtype=np.int16)
    for k in range(z):  # slice by slice: no float copy of the whole volume
        plane = np.where(body, 40, -1000).astype(np.int16)
        plane += rng.integers(-20, 20, (y, x), dtype=np.int16)
        volume[k] = plane
    for _ in range(12):
        c = [int(rng.integers(n // 4, 3 * n // 4)) for n in shape]
        r = [max(2, n // 12) for n in shape]
        volume[c[0] - r[0]:c[0] + r[0], c[1] - r[1]:c[1] + r[1], c[2] - r[2]:c[2] + r[2]] += int(rng.integers(50, 300))
    write_image(path, volume, Geometry(spacing, (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), shape))


def _tree_pss(root: int) -> int:
    """Proportional set size of `root` and all its descendants now, in bytes (/proc/PID/smaps_rollup): pages
    shared between processes, such as torch's libraries in every worker, are split among them, not counted
    in each as RSS would."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        total += next((int(line.split()[1]) * 1024 for line in rollup.splitlines() if line.startswith("Pss:")), 0)
    return total


def run_with_peak_memory(cmd: list[str], log_path: Path, env: dict[str, str] | None = None
                         ) -> tuple[float, float, float]:
    """Run `cmd`; (wall seconds, peak PSS of its process tree sampled every 0.2 s, the main process's
    own RSS high-water mark from wait4), memory in GiB. Raises BenchError with the log's tail if it fails."""
    import subprocess

    start = time.perf_counter()
    peak = 0
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            peak = max(peak, _tree_pss(proc.pid))
            time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} failed (exit "
                         f"{proc.returncode}):\n{log_path.read_text(errors='replace')[-3000:]}")
    return wall, peak / 2**30, usage.ru_maxrss / 2**20


def run_large(args: argparse.Namespace) -> None:
    """--large: `autoseg predict` (and with --nnunet-venv `nnUNetv2_predict_from_modelfolder`) on one synthetic
    volume with the same plan; peak memory and seconds of each."""
    shape, spacing = args.large, args.spacing
    print(f"machine: {machine()}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average before: {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="bench_predict_large_") as tmp:
        tmp = Path(tmp)
        config = large_volume_workspace(tmp / "work", shape, spacing, args.labels)
        print(f"plan (autoseg's planner, 3d_fullres): patch {list(config.patch_size)}, spacing {list(config.spacing)}, "
              f"features {list(config.features_per_stage)}; {args.labels} labels")
        t = time.perf_counter()
        synthetic_ct(tmp / "input" / "ct_0000.mha", shape, spacing)
        print(f"input: synthetic int16 CT {'x'.join(map(str, shape))} at {spacing} mm "
              f"(written in {time.perf_counter() - t:.0f} s, not timed)", flush=True)
        nnunet_bin = None
        if args.nnunet_venv:
            nnunet_bin = Path(args.nnunet_venv)
            nnunet_bin = nnunet_bin if nnunet_bin.name == "bin" else nnunet_bin / "bin"
            model = tmp / "nnunet_model"
            run_with_peak_memory([str(nnunet_bin / "python"), str(Path(__file__).with_name("_nnunet_model_folder.py")),
                                  str(tmp / "work" / "plans.json"), str(model)], tmp / "nnunet_model.log")
        size = f"{'x'.join(map(str, shape))}, {args.labels} labels"
        for m in {"on": [True], "off": [False], "both": [True, False]}[args.mirroring]:
            setting = f"mirroring {'on' if m else 'off'}, step {args.step_size}"
            cmd = [sys.executable, "-m", "autoseg.cli", "predict", str(tmp / "work"), "-i", str(tmp / "input"),
                   "-o", str(tmp / f"out_{m}"), "--config", "3d_fullres", "--folds", "0", "--device", "cpu",
                   "--workers", str(args.workers), "--step-size", str(args.step_size)]
            cmd += ([] if m else ["--no-mirroring"]) + ["--runtime", args.runtime]
            wall, tree, own = run_with_peak_memory(cmd, tmp / f"autoseg_{m}.log")
            print(f"autoseg ({args.runtime}): {size}, {setting}: {wall:.1f} s, peak RSS {own:.2f} GiB "
                  f"(process tree PSS sampled: {tree:.2f} GiB; --workers {args.workers})", flush=True)
            if nnunet_bin is None:
                continue
            cmd = [str(nnunet_bin / "nnUNetv2_predict_from_modelfolder"), "-i", str(tmp / "input"),
                   "-o", str(tmp / f"nnunet_out_{m}"), "-m", str(model), "-f", "0", "-step_size", str(args.step_size),
                   "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_progress_bar"]
            cmd += [] if m else ["--disable_tta"]
            env = {**os.environ, **{k: str(tmp / k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}}
            n_wall, n_tree, n_own = run_with_peak_memory(cmd, tmp / f"nnunet_{m}.log", env)
            print(f"nnunetv2: {size}, {setting}: {n_wall:.1f} s, peak PSS of its process tree {n_tree:.2f} GiB "
                  f"(sampled; its main process's peak RSS {n_own:.2f} GiB; -npp 1 -nps 1)", flush=True)
            print(f"ratio nnunetv2 / autoseg: {n_wall / wall:.2f}x seconds, {n_tree / tree:.2f}x peak memory "
                  "(process trees, PSS)", flush=True)


def runtimes_to_time(choice: str, workdir: Path, configuration: str, fold_sets: list[list[str]]) -> list[str]:
    """The runtimes `--runtime` names; for "all", those this machine and workspace support (said when left out)."""
    if choice != "all":
        return ["torch", "openvino"] if choice == "both" else [choice]
    import importlib.util

    from autoseg.inference.int8_models import int8_problem
    from autoseg.model_files import checkpoint_path

    runtimes = ["torch"]
    if importlib.util.find_spec("openvino") is None:
        print("runtime openvino and openvino-int8: skipped, openvino is not installed (pip install "
              "'autoseg[openvino]')")
        return runtimes
    runtimes.append("openvino")
    problems = [int8_problem(workdir, configuration, f, checkpoint_path(workdir, configuration, f))
                for f in sorted({f for folds in fold_sets for f in folds})]
    problems = [p for p in problems if p is not None]
    if problems:
        print(f"runtime openvino-int8: skipped: {problems[0]}")
    else:
        runtimes.append("openvino-int8")
    return runtimes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=Path, nargs="?")
    parser.add_argument("-i", "--input", type=Path, nargs="+")
    parser.add_argument("--large", type=_size, metavar="ZxYxX",
                        help="large-volume mode: a synthetic volume of this size (no WORKDIR or INPUT)")
    parser.add_argument("--labels", type=int, default=14,
                        help="--large: labels including background (default: %(default)s)")
    parser.add_argument("--spacing", type=lambda t: _size(t, float), default=(1.5, 0.8, 0.8), metavar="ZxYxX",
                        help="--large: voxel spacing in mm (default: 1.5x0.8x0.8)")
    parser.add_argument("--step-size", type=float, default=0.5, help="--large: window step (default: %(default)s)")
    parser.add_argument("--config", default="3d_fullres")
    parser.add_argument("--folds", nargs="+", action="append", help="a fold set to time; repeat for several")
    parser.add_argument("--mirroring", choices=("on", "off", "both"), default="both")
    parser.add_argument("--workers", type=int, default=1, help="autoseg's background threads (default: %(default)s)")
    parser.add_argument("--cases", type=int, help="predict only the first N cases (by id), with both tools")
    parser.add_argument("--nnunet-venv", metavar="PATH",
                        help="nnunetv2 venv or its bin folder: also time nnUNetv2_predict")
    parser.add_argument("--nnunet-cache", type=Path, default=DEFAULT_NNUNET_CACHE,
                        help="nnU-Net's raw, preprocessed and model folders, kept between runs (default: %(default)s)")
    parser.add_argument("--nnunet-processes", type=int, default=2,
                        help="nnUNetv2_predict -npp N -nps N (default: %(default)s; nnU-Net's own default is 3)")
    parser.add_argument("--dataset", type=Path, help="raw dataset for nnU-Net (default: the workspace's dataset.json "
                                                     "root)")
    parser.add_argument("--autoseg-precision", choices=("auto", "float32", "both"), default="auto",
                        help="autoseg's own default (bfloat16 autocast on a CPU with native bf16), float32 "
                             "(as nnU-Net computes on the CPU), or both (default: %(default)s)")
    parser.add_argument("--runtime", choices=("torch", "openvino", "openvino-int8", "both", "all"), default="torch",
                        help="what runs autoseg's networks: torch, openvino (float32), openvino-int8 (the folds' int8 "
                             "networks from `autoseg quantize`), both (torch and openvino), or all (every runtime "
                             "this machine and workspace support: openvino only where it is installed, int8 only "
                             "where the folds were quantized) (default: %(default)s)")
    args = parser.parse_args()
    if args.large:
        if args.runtime not in ("torch", "openvino"):
            parser.error("--large runs one autoseg runtime: --runtime torch or --runtime openvino")
        return run_large(args)
    if args.workdir is None or not args.input:
        parser.error("WORKDIR and -i INPUT are required (or use --large)")
    if args.nnunet_venv:
        import bench_plan
        if bench_plan.psutil is None:
            raise BenchError("--nnunet-venv measures nnU-Net's processes with psutil: pip install -e '.[bench]'")
    workdir = args.workdir.resolve()
    plans = json.loads((workdir / "plans.json").read_text())
    num_channels = len(plans["channel_names"])

    print(f"machine: {machine()}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average before: {os.getloadavg()[0]:.1f}")
    fold_sets = args.folds or [["0"]]
    mirror = {"on": [True], "off": [False], "both": [True, False]}[args.mirroring]
    with tempfile.TemporaryDirectory(prefix="bench_predict_") as tmp:
        inputs = Path(tmp) / "input"
        case_ids = link_inputs(args.input, num_channels, inputs, args.cases)
        print(f"input: {len(case_ids)} cases ({case_ids[0]} .. {case_ids[-1]}) from {', '.join(map(str, args.input))}")
        nnunet = None
        if args.nnunet_venv:
            dataset = (args.dataset or workspace_dataset(workdir)).resolve()
            nnunet_bin, name, dataset_id = prepare_nnunet(dataset, args.nnunet_cache, args.nnunet_venv, args.config)
            nnunet = (nnunet_bin, dataset_id, nnunet_model(nnunet_bin, args.nnunet_cache, name, args.config))

        timings = {}
        precisions = []
        for runtime in runtimes_to_time(args.runtime, workdir, args.config, fold_sets):
            if runtime == "openvino":
                precisions.append((False, "openvino float32", runtime))
            elif runtime == "openvino-int8":
                precisions.append((False, "openvino int8", runtime))
            else:
                precisions += [(mixed, label, runtime)
                               for mixed, label in autoseg_precisions(args.autoseg_precision, None)]
        for mixed, label, runtime in precisions:
            for folds in fold_sets:
                for m in mirror:
                    with tempfile.TemporaryDirectory() as out:
                        t = time.perf_counter()
                        report = predict_folder(workdir, [inputs], Path(out), ModelChoice([args.config], folds),
                                                WindowSettings(mirroring=m),
                                                ComputeSettings(mixed_precision=mixed, runtime=runtime),
                                                batch=BatchOptions(workers=args.workers, progress=False))
                        wall = time.perf_counter() - t
                    n = len(report.written)
                    timings[(label, tuple(folds), m)] = wall / max(n, 1)
                    print(f"autoseg ({label}): {len(folds)} fold(s) {','.join(folds)}, mirroring "
                          f"{'on' if m else 'off'}: {n} cases in {wall:.1f} s = {wall / max(n, 1):.2f} s/case "
                          f"({len(report.failed)} failed; {args.workers} background threads)", flush=True)

        if nnunet is None:
            return
        from bench_plan import run_measured, time_import

        nnunet_bin, dataset_id, checkpoint = nnunet
        env = nnunet_env(nnunet_bin, args.nnunet_cache)
        one_fold = next((folds for folds in fold_sets if len(folds) == 1), None)
        for m in mirror:
            out = Path(tmp) / f"nnunet_out_{'on' if m else 'off'}"
            cmd = [str(nnunet_bin / "nnUNetv2_predict"), "-i", str(inputs), "-o", str(out), "-d", str(dataset_id),
                   "-c", args.config, "-f", "0", "-chk", checkpoint.name, "-device", "cpu",
                   "-npp", str(args.nnunet_processes), "-nps", str(args.nnunet_processes)]
            cmd += [] if m else ["--disable_tta"]
            result = run_measured("nnunetv2", cmd, env, Path(tmp) / f"nnunet_{'on' if m else 'off'}.log",
                                  NNUNET_MARKERS, pss_every=0)
            if result.returncode != 0:
                raise BenchError(f"{' '.join(cmd)} failed (exit {result.returncode}):\n{result.log_tail}")
            n = len(list(out.glob("*.nii.gz")))
            ready = result.stage_starts_s.get("ready", float("nan"))
            first = result.stage_starts_s.get("first_case", float("nan"))
            per_case = result.wall_s / max(n, 1)
            steady = (result.wall_s - first) / max(n, 1)
            print(f"nnunetv2: 1 fold 0, mirroring {'on' if m else 'off'}: {n} cases in {result.wall_s:.1f} s = "
                  f"{per_case:.2f} s/case from launch (CPU {result.cpu_s:.0f} s; -npp {args.nnunet_processes} "
                  f"-nps {args.nnunet_processes}); start-up {ready:.1f} s, first case starts at {first:.1f} s, "
                  f"from then {steady:.2f} s/case", flush=True)
            if n != len(case_ids):
                print(f"nnunetv2: WARNING: wrote {n} of {len(case_ids)} cases; log tail:\n{result.log_tail}")
            for _, label, _ in precisions if one_fold is not None else []:
                ours = timings[(label, tuple(one_fold), m)]
                print(f"ratio nnunetv2 (float32) / autoseg ({label}), 1 fold, mirroring {'on' if m else 'off'}: "
                      f"{per_case / ours:.2f}x ({steady / ours:.2f}x counting nnU-Net only from its first case on)")
        import_s = time_import(sys.executable, "autoseg.inference.batch", dict(os.environ))
        print(f"autoseg ran in this process; a fresh `autoseg predict` would add its import of {import_s:.1f} s "
              f"(= {import_s / len(case_ids):.2f} s/case here)")
        shown = {str(inputs): "INPUT", str(out): "OUT"}
        print(f"nnunetv2 command (last): {' '.join(shown.get(c, c) for c in cmd)}")


if __name__ == "__main__":
    try:
        main()
    except BenchError as exc:
        print(f"bench_predict: error: {exc}", file=sys.stderr)
        sys.exit(2)
