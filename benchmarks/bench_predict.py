"""Seconds per case of `autoseg predict` with one fold and with several, mirroring on and off; with
--nnunet-venv, the same for `nnUNetv2_predict` on the same cases and a plan of the same shape, and
the ratio.

    python benchmarks/bench_predict.py WORKDIR -i INPUT [--folds 0] [--folds 0 1 2 3 4]
                                       [--mirroring both] [--cases N]
                                       [--nnunet-venv /work/bench/nnunet_venv/bin]

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

from autoseg.inference.inputs import discover_inputs
from autoseg.inference.predictor import predict_folder

from bench_train import (DEFAULT_NNUNET_CACHE, BenchError, autoseg_precisions, machine, nnunet_env, prepare_nnunet,
                         run_nnunet_driver, workspace_dataset)


NNUNET_TRAINER_FOLDER = "nnUNetTrainer__nnUNetPlans__{configuration}"
# nnUNetv2_predict's first line after its imports and model loading, and the line its first case
# starts with (after its preprocessing processes have been spawned and have read that case).
NNUNET_MARKERS = (("ready", "There are"), ("first_case", "Predicting "))


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
        if len(case.files) != num_channels:
            raise BenchError(f"{case.files[0]}: one file holding {num_channels} channels; nnU-Net needs one file "
                             "per channel (<case>_<cccc>), so pass those")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("-i", "--input", type=Path, nargs="+", required=True)
    parser.add_argument("--config", default="3d_fullres")
    parser.add_argument("--folds", nargs="+", action="append", help="a fold set to time; repeat for several")
    parser.add_argument("--mirroring", choices=("on", "off", "both"), default="both")
    parser.add_argument("--workers", type=int, default=1, help="autoseg's background threads (default: %(default)s)")
    parser.add_argument("--cases", type=int, help="predict only the first N cases (by id), with both tools")
    parser.add_argument("--nnunet-venv", metavar="PATH", help="nnunetv2 venv or its bin folder: also time nnUNetv2_predict")
    parser.add_argument("--nnunet-cache", type=Path, default=DEFAULT_NNUNET_CACHE,
                        help="nnU-Net's raw, preprocessed and model folders, kept between runs (default: %(default)s)")
    parser.add_argument("--nnunet-processes", type=int, default=2,
                        help="nnUNetv2_predict -npp N -nps N (default: %(default)s; nnU-Net's own default is 3)")
    parser.add_argument("--dataset", type=Path, help="raw dataset for nnU-Net (default: the workspace's dataset.json root)")
    parser.add_argument("--autoseg-precision", choices=("auto", "float32", "both"), default="auto",
                        help="autoseg's own default (bfloat16 autocast on a CPU with native bf16), float32 "
                             "(as nnU-Net computes on the CPU), or both (default: %(default)s)")
    args = parser.parse_args()
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
        precisions = autoseg_precisions(args.autoseg_precision, None)
        for mixed, label in precisions:
            for folds in fold_sets:
                for m in mirror:
                    with tempfile.TemporaryDirectory() as out:
                        t = time.perf_counter()
                        report = predict_folder(workdir, [inputs], Path(out), configurations=[args.config],
                                                folds=folds, mirroring=m, num_workers=args.workers, progress=False,
                                                mixed_precision=mixed)
                        wall = time.perf_counter() - t
                    n = len(report.written)
                    timings[(label, tuple(folds), m)] = wall / max(n, 1)
                    print(f"autoseg ({label}): {len(folds)} fold(s) {','.join(folds)}, mirroring {'on' if m else 'off'}: "
                          f"{n} cases in {wall:.1f} s = {wall / max(n, 1):.2f} s/case ({len(report.failed)} failed; "
                          f"{args.workers} background threads)", flush=True)

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
            for _, label in precisions if one_fold is not None else []:
                ours = timings[(label, tuple(one_fold), m)]
                print(f"ratio nnunetv2 (float32) / autoseg ({label}), 1 fold, mirroring {'on' if m else 'off'}: "
                      f"{per_case / ours:.2f}x ({steady / ours:.2f}x counting nnU-Net only from its first case on)")
        import_s = time_import(sys.executable, "autoseg.inference.predictor", dict(os.environ))
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
