"""Seconds per training iteration of `autoseg train` on a planned workspace, split into the time
the network step takes and the time spent waiting for augmented batches; with --nnunet-venv, the
same figures for nnU-Net v2's standard trainer on the same data, and the ratio.

    python benchmarks/bench_train.py WORKDIR [--config 3d_fullres] [--iters 20] [--workers 1]
                                     [--nnunet-venv /work/bench/nnunet_venv/bin]

autoseg: runs one epoch of `--iters` iterations with `--fold all` in a scratch copy of the
workspace (the preprocessed data is linked, not copied), so the workspace itself is untouched.
The first iterations include start-up (allocator, oneDNN kernel selection): `--warmup` of them are
run in a first epoch that is not counted.

nnU-Net v2: the raw dataset the workspace was planned from is converted and preprocessed once
(`nnUNetv2_convert_MSD_dataset`, `nnUNetv2_plan_and_preprocess -c 3d_fullres -np 2 -npfp 2`) into
`--nnunet-cache`, reused on later runs. Then `_nnunet_train_step.py`, run by nnunetv2's own Python,
builds `nnUNetTrainer` (its plans, fold 0, CPU), starts its training and times `--warmup` + `--iters`
calls of its own `train_step(next(dataloader_train))`, the first `--warmup` not counted, with
`--workers` augmentation processes (nnUNet_n_proc_DA). Setup is not timed. nnU-Net computes in
float32 on the CPU; autoseg uses bfloat16 autocast where the CPU has native bf16, so
`--autoseg-precision both` also times autoseg in float32.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from autoseg.training.trainer import TrainingSettings, train_fold

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine  # noqa: E402  (re-exported for bench_predict and bench_accuracy)
from bench_plan import nnunet_env  # noqa: E402  (re-exported for bench_predict and bench_accuracy)

DEFAULT_NNUNET_CACHE = Path("/work/bench/nnunet_cache")
NNUNET_DRIVER = Path(__file__).resolve().parent / "_nnunet_train_step.py"


class BenchError(Exception):
    """A problem with the benchmark's inputs or a tool's run; printed without a traceback."""


# --- nnU-Net v2 side (also used by bench_predict.py) ------------------------------------------------

NNUNET_PLANS = {"default": ("ExperimentPlanner", "nnUNetPlans"),  # autoseg preset -> nnU-Net planner, plans
                "resenc-m": ("nnUNetPlannerResEncM", "nnUNetResEncUNetMPlans"),
                "resenc-l": ("nnUNetPlannerResEncL", "nnUNetResEncUNetLPlans"),
                "resenc-xl": ("nnUNetPlannerResEncXL", "nnUNetResEncUNetXLPlans")}


def prepare_nnunet(dataset: Path, cache: Path, nnunet_venv: str, configuration: str = "3d_fullres",
                   preset: str = "default") -> tuple[Path, str, int]:
    """Convert and preprocess `dataset` for nnU-Net into `cache` unless done; return (bin, dataset name, id).

    Uses bench_plan.py's conversion (links to the cases dataset.json lists, nnUNetv2_convert_MSD_dataset),
    then nnUNetv2_plan_and_preprocess -c CONFIGURATION -np 2 -npfp 2. cache/prepared.json marks it done.
    """
    from bench_plan import BenchError as PlanError
    from bench_plan import _dataset_meta, find_nnunet_bin, stage_nnunet_raw

    try:
        nnunet_bin = find_nnunet_bin(nnunet_venv)
    except PlanError as exc:
        raise BenchError(str(exc)) from exc
    marker = cache / "prepared.json"
    if marker.is_file():
        done = json.loads(marker.read_text())
        if (done["dataset"] == str(dataset) and configuration in done["configurations"]
                and done.get("preset", "default") == preset):
            return nnunet_bin, done["name"], done["id"]
    print(f"nnunetv2: preparing {dataset.name} in {cache} (once; not timed) ...", flush=True)
    for sub in ("nnUNet_raw", "nnUNet_preprocessed", "msd_source", "nnUNet_results"):  # a model of an old plan goes too
        shutil.rmtree(cache / sub, ignore_errors=True)
    (cache / "nnUNet_raw").mkdir(parents=True)
    env = nnunet_env(nnunet_bin, cache)
    try:
        dataset_id, name, _ = stage_nnunet_raw(dataset, _dataset_meta(dataset), cache / "nnUNet_raw", None,
                                               nnunet_bin, env)
    except PlanError as exc:
        raise BenchError(str(exc)) from exc
    cmd = [str(nnunet_bin / "nnUNetv2_plan_and_preprocess"), "-d", str(dataset_id), "-c", configuration,
           "-np", "2", "-npfp", "2", "-pl", NNUNET_PLANS[preset][0]]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    marker.write_text(json.dumps({"dataset": str(dataset), "name": name, "id": dataset_id,
                                  "configurations": [configuration], "preset": preset,
                                  "command": " ".join(cmd)}, indent=1))
    return nnunet_bin, name, dataset_id


def run_nnunet_driver(nnunet_bin: Path, cache: Path, name: str, configuration: str, fold: int, iters: int,
                      warmup: int, workers: int, results: Path, log: Path) -> dict:
    """Run _nnunet_train_step.py with nnunetv2's Python; return its figures (see that file)."""
    env = {**nnunet_env(nnunet_bin, cache, results), "nnUNet_n_proc_DA": str(workers)}
    out = log.with_suffix(".json")
    cmd = [str(nnunet_bin / "python"), str(NNUNET_DRIVER), "--dataset-name", name, "--configuration", configuration,
           "--fold", str(fold), "--iters", str(iters), "--warmup", str(warmup), "--json", str(out)]
    with open(log, "w") as log_file:
        done = subprocess.run(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    if done.returncode != 0 or not out.is_file():
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-25:])
        raise BenchError(f"{' '.join(cmd)} failed (exit {done.returncode}):\n{tail}")
    return json.loads(out.read_text())


def nnunet_plan_summary(cache: Path, name: str, configuration: str, plans_name: str = "nnUNetPlans") -> dict:
    """The fields of nnU-Net's plan that autoseg's plan also has, for printing and comparing."""
    plans = json.loads((cache / "nnUNet_preprocessed" / name / f"{plans_name}.json").read_text())
    conf = plans["configurations"][configuration]
    arch = conf["architecture"]["arch_kwargs"]
    return {"batch_size": conf["batch_size"], "patch_size": list(conf["patch_size"]), "spacing": list(conf["spacing"]),
            "n_stages": arch["n_stages"], "features_per_stage": list(arch["features_per_stage"]),
            "strides": [list(s) for s in arch["strides"]], "kernel_sizes": [list(k) for k in arch["kernel_sizes"]],
            "n_conv_per_stage": list(arch.get("n_blocks_per_stage") or arch["n_conv_per_stage"]),
            "normalization": conf["normalization_schemes"]}


def autoseg_plan_summary(workdir: Path, configuration: str) -> dict:
    plans = json.loads((workdir / "plans.json").read_text())
    conf = plans["configurations"][configuration]
    return {"batch_size": conf["batch_size"], "patch_size": list(conf["patch_size"]), "spacing": list(conf["spacing"]),
            "n_stages": len(conf["features_per_stage"]), "features_per_stage": list(conf["features_per_stage"]),
            "strides": [list(s) for s in conf["strides"]], "kernel_sizes": [list(k) for k in conf["kernel_sizes"]],
            "n_conv_per_stage": (list(conf["residual_blocks"]) if conf.get("residual_blocks")
                                 else [conf["n_conv_per_stage"]] * len(conf["features_per_stage"])),
            "normalization": [n["scheme"] for n in plans["normalization"]]}


def compare_plans(ours: dict, theirs: dict) -> list[str]:
    """Print both plans; return the fields that differ (normalization compared by name, case-insensitively)."""
    print("plan autoseg: " + ", ".join(f"{k} {v}" for k, v in ours.items()))
    print("plan nnunetv2: " + ", ".join(f"{k} {v}" for k, v in theirs.items()))
    differ = []
    for key in ours:
        a, b = ours[key], theirs[key]
        if key == "normalization":
            a = [s.lower().replace("normalization", "") for s in a]
            b = [s.lower().replace("normalization", "") for s in b]
        elif key == "spacing":
            a, b = [round(x, 3) for x in a], [round(x, 3) for x in b]
        if a != b:
            differ.append(key)
    print("plans: " + (f"DIFFER in {', '.join(differ)}" if differ else "the same (batch, patch, spacing, topology, "
                                                                        "normalization)"))
    return differ


def workspace_dataset(workdir: Path) -> Path:
    """The raw dataset folder the workspace was planned from (dataset.json's 'root')."""
    root = json.loads((workdir / "dataset.json").read_text()).get("root")
    if not root or not Path(root).is_dir():
        raise BenchError(f"{workdir / 'dataset.json'}: no 'root' naming an existing dataset folder; pass --dataset")
    return Path(root)


# --- autoseg side and the report ----------------------------------------------------------------------

def time_autoseg(workdir: Path, configuration: str, iters: int, warmup: int, workers: int | None,
                 device: str | None, mixed_precision: bool = True) -> tuple[float, float, float]:
    """(s/iteration, s/iteration waiting for data, wall s of the measured run) for autoseg."""
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        for name in ("plans.json", "dataset.json", "fingerprint.json"):
            shutil.copy(workdir / name, scratch / name)
        os.symlink((workdir / "preprocessed").resolve(), scratch / "preprocessed")
        common = dict(validate_at_end=False, device=device, checkpoint_every=10 ** 6, mixed_precision=mixed_precision)
        if workers is not None:
            common["workers"] = workers
        # A short warm-up run (oneDNN kernel selection, allocator) in this process, then the measured one.
        if warmup:
            train_fold(scratch, configuration, "all", TrainingSettings(epochs=1, iters_per_epoch=warmup, **common),
                       progress=False)
        t = time.perf_counter()
        result = train_fold(scratch, configuration, "all", TrainingSettings(epochs=1, iters_per_epoch=iters, **common),
                            progress=False)
        wall = time.perf_counter() - t
    record = result["history"][-1]
    return record["epoch_s"] / iters, record["data_wait_s"] / iters, wall


def augmentation_rate(workdir: Path, configuration: str, batches: int, warmup: int = 2) -> dict:
    """Augmented training batches per second that one worker produces for this plan, measured in-process.

    Builds the loader and transforms as `train_fold` does (patch read enlarged, then rotated, scaled,
    cropped, deep-supervision targets) and draws `warmup` + `batches` batches with no background
    process. Wall and CPU seconds are both given; on a loaded machine the CPU figure is the steadier.
    """
    import numpy as np

    from autoseg import workspace
    from autoseg.network.unet import deep_supervision_scales
    from autoseg.planning.plans import Plans
    from autoseg.preprocessing import store
    from autoseg.training.augmentation import (
        make_loader,
        rotation_for_patch,
        shutdown_loader,
        training_patch_size,
        training_transforms,
    )
    from autoseg.training.patch_sampling import PatchLoader

    plans = Plans.load(workspace.plans_json(workdir))
    config = plans.configuration(configuration)
    data_dir = workspace.preprocessed_dir(workdir, config.data_identifier)
    case_ids = store.list_cases(data_dir)
    if not case_ids:
        raise BenchError(f"{data_dir}: no preprocessed cases; run `autoseg plan` first")
    patch = list(config.patch_size)
    rotation, _ = rotation_for_patch(patch)
    masked = [n.channel for n in plans.normalization if n.use_nonzero_mask]
    loader = PatchLoader(data_dir, case_ids, training_patch_size(patch), config.batch_size, 0.33, 1, seed=0,
                         final_patch_size=patch)
    transforms = training_transforms(patch, mirror_axes=config.mirror_axes,
                                     deep_supervision_scales=deep_supervision_scales(config.strides),
                                     nonzero_mask_channels=masked)
    batches_iter = make_loader(loader, transforms, 0, seed=0)
    try:
        for _ in range(warmup):
            next(batches_iter)
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(batches):
            next(batches_iter)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        shutdown_loader(batches_iter)
    return {"batches": batches, "batch_size": config.batch_size, "patch_size": list(patch),
            "per_s_wall": batches / wall, "per_s_cpu": batches / max(cpu, 1e-9), "threads": torch.get_num_threads(),
            "numpy": np.__version__}


def workers_to_keep_up(batches_per_s: float, step_s: float) -> int:
    """Augmentation workers (one core each) needed so that a step of `step_s` seconds never waits for data."""
    return max(1, math.ceil(1.0 / (batches_per_s * step_s)))


def autoseg_precisions(choice: str, device: str | None) -> list[tuple[bool, str]]:
    """(mixed_precision setting, what it means here) for each autoseg run --autoseg-precision asks for."""
    from autoseg.device import cpu_has_native_bf16

    on_cpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu"
    default = ("bfloat16 autocast" if cpu_has_native_bf16() else "float32") if on_cpu else "float16 autocast"
    runs = {"auto": [(True, default)], "float32": [(False, "float32")]}
    runs["both"] = runs["auto"] + ([] if default == "float32" else runs["float32"])
    return runs[choice]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--config", default="3d_fullres")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None,
                        help="augmentation workers for both tools (default: autoseg's; nnU-Net gets the same number)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--nnunet-venv", metavar="PATH",
                        help="nnunetv2 venv or its bin folder: also time nnU-Net's nnUNetTrainer.train_step")
    parser.add_argument("--nnunet-cache", type=Path, default=DEFAULT_NNUNET_CACHE,
                        help="where nnU-Net's raw and preprocessed dataset are kept between runs (default: "
                             "%(default)s)")
    parser.add_argument("--dataset", type=Path, help="raw dataset for nnU-Net (default: the workspace's dataset.json "
                                                     "root)")
    parser.add_argument("--skip-autoseg", action="store_true", help="time nnU-Net only")
    parser.add_argument("--augmentation-batches", type=int, default=10,
                        help="batches drawn in-process to measure augmentation batches/s per worker (0: skip; "
                             "default: %(default)s)")
    parser.add_argument("--autoseg-precision", choices=("auto", "float32", "both"), default="auto",
                        help="autoseg's own default (bfloat16 autocast on a CPU with native bf16), float32 "
                             "(mixed_precision=False, as nnU-Net computes on the CPU), or both (default: %(default)s)")
    args = parser.parse_args()
    if args.iters < 1 or args.warmup < 0:
        raise BenchError("--iters must be at least 1 and --warmup at least 0")
    workdir = args.workdir.resolve()
    workers = args.workers
    if workers is None:
        from autoseg.training.augmentation import default_workers
        workers = default_workers()

    print(f"machine: {machine()}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average before: "
          f"{os.getloadavg()[0]:.1f}")
    ours = autoseg_plan_summary(workdir, args.config)
    if args.nnunet_venv:
        if (args.device or "cpu") != "cpu":
            raise BenchError("the nnU-Net side runs on the CPU only; leave --device unset or pass cpu")
        dataset = (args.dataset or workspace_dataset(workdir)).resolve()
        nnunet_bin, name, _ = prepare_nnunet(dataset, args.nnunet_cache, args.nnunet_venv, args.config)
        compare_plans(ours, nnunet_plan_summary(args.nnunet_cache, name, args.config))
    else:
        print("plan autoseg: " + ", ".join(f"{k} {v}" for k, v in ours.items()))

    if args.augmentation_batches > 0:
        rate = augmentation_rate(workdir, args.config, args.augmentation_batches)
        print(f"augmentation ({args.config}, batch {rate['batch_size']}, patch {rate['patch_size']}): "
              f"{rate['per_s_wall']:.2f} batches/s per worker in wall time, {rate['per_s_cpu']:.2f} per CPU second "
              f"({rate['batches']} batches in this process); workers to keep a step fed: "
              + ", ".join(f"{workers_to_keep_up(rate['per_s_cpu'], s)} at {s} s/step" for s in (0.1, 0.3, 1.0)),
              flush=True)

    autoseg_runs = []
    if not args.skip_autoseg:
        for mixed, label in autoseg_precisions(args.autoseg_precision, args.device):
            per_it, wait, wall = time_autoseg(workdir, args.config, args.iters, args.warmup, args.workers, args.device,
                                              mixed)
            autoseg_runs.append((label, (per_it, per_it - wait, wait)))
            print(f"autoseg ({label}): {per_it:.2f} s/iteration over {args.iters} iterations "
                  f"(network step {per_it - wait:.2f} s, waiting for data {wait:.2f} s); run wall {wall:.1f} s; "
                  f"{workers} augmentation worker(s), {torch.get_num_threads()} torch threads", flush=True)
            print("bottleneck:", "data loading" if wait > 0.2 * per_it else "network step")

    if args.nnunet_venv:
        with tempfile.TemporaryDirectory(prefix="bench_train_nnunet_") as tmp:
            figures = run_nnunet_driver(nnunet_bin, args.nnunet_cache, name, args.config, 0, args.iters, args.warmup,
                                        workers, Path(tmp) / "results", Path(tmp) / "driver.log")
        wait = sum(figures["wait_s"]) / args.iters
        step = sum(figures["step_s"]) / args.iters
        per_it = wait + step
        print(f"nnunetv2: {per_it:.2f} s/iteration over {args.iters} iterations (train_step {step:.2f} s, waiting for "
              f"data {wait:.2f} s; median train_step {statistics.median(figures['step_s']):.2f} s); nnUNetTrainer fold "
              f"0, batch {figures['batch_size']}, {figures['augmenter']} with {figures['n_proc_DA']} worker(s), "
              f"float32, {figures['torch_threads']} torch threads, torch {figures['torch']}; setup (not timed) "
              f"{figures['setup_s']:.1f} s")
        print("nnunetv2 trainer ended with on_train_end: " +
              ("all augmentation workers stopped" if not figures["children_left"]
               else f"WARNING: child processes still alive: {figures['children_left']}"))
        for label, ours in autoseg_runs:
            ratios = [b / a if a > 0 else float("nan") for a, b in zip(ours, (per_it, step, wait))]
            print(f"ratio nnunetv2 (float32) / autoseg ({label}): {ratios[0]:.2f}x s/iteration (network step "
                  f"{ratios[1]:.2f}x, waiting for data {ratios[2]:.2f}x)")


if __name__ == "__main__":
    try:
        main()
    except BenchError as exc:
        print(f"bench_train: error: {exc}", file=sys.stderr)
        sys.exit(2)
