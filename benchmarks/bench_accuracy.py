"""Equal-budget accuracy: autoseg and nnU-Net v2 each train fold 0 of the same dataset for the same
number of iterations (same batch and patch), predict the same held-out test cases, and the Dice per
label of both is printed side by side with their training and prediction seconds.

    python benchmarks/bench_accuracy.py DATASET --test-images DIR --test-labels DIR --iterations N
                                        [--epochs E] [--val-iters V] [--workers W]
                                        [--configuration 2d|3d_fullres|3d_lowres] [--batch-size B]
                                        [--preset default|resenc-m|resenc-l|resenc-xl] [--seeds N]
                                        [--autoseg-precision float32|auto] [--augment-interpolation cubic|linear]
                                        [--augment-scale-draw batchgenerators|uniform]
                                        [--augment-label-interpolation nearest|linear] [--first-seed S]
                                        [--nnunet-venv /work/bench/nnunet_venv | --no-nnunet] [--no-autoseg]
    python benchmarks/bench_accuracy.py DATASET --hold-out 20 --iterations N      # makes the split itself

DATASET is the raw training set (Decathlon or nnU-Net v2 layout); the test cases must not be in it.
`--hold-out K` instead draws K labelled cases at random (`--seed`) as the test set and trains on the
others, through links in a temporary folder: from dataset.json's "training" list (Decathlon), or
from the cases in labelsTr/ in name order (nnU-Net v2; instance maps in instancesTr/ are not linked,
so the labels are trained as they are).

Both train the same configuration (`--configuration`, default autoseg's default configuration) with
the same batch (`--batch-size`, default the plan's; nnU-Net gets it written into the plans its
trainer reads). On a 2-core CPU the 2d configuration with a small batch reaches a few thousand
iterations within the hour; 3d_fullres on Hippocampus takes 8-15 s an iteration there in float32
(250 iterations of both tools: about 70 minutes; benchmarks/README.md).

autoseg: `autoseg plan` (verify, fingerprint, plan, preprocess that configuration) into a
temporary workspace, `train_fold` of fold 0 for `--epochs` epochs of N / E iterations with
`--val-iters` validation batches per epoch and no validation of whole cases at the end (with the
spatial transform's image interpolation `--augment-interpolation`, default linear, and its scale draw
`--augment-scale-draw`, default uniform, and its label interpolation `--augment-label-interpolation`,
default nearest), then
`predict_folder` of fold 0 (checkpoint_final, mirroring on) on --test-images.

nnU-Net v2 (when its venv is found): the dataset is converted and preprocessed in the same temporary
folder (bench_train.py's `prepare_nnunet`), its fold-0 split is replaced by autoseg's
(`splits_final.json`), so both train on the same cases; `_nnunet_train_step.py --epochs E` runs the
standard `nnUNetTrainer`'s own `run_training()` with `num_epochs`, `num_iterations_per_epoch` and
`num_val_iterations_per_epoch` set; then `nnUNetv2_predict -f 0 -chk checkpoint_final.pth`.
Both predictions are scored with `autoseg.evaluation.evaluate_folders` against --test-labels. A
region-based dataset (dataset.json mapping a name to a list of label ids, with `regions_class_order`)
trains both tools on the regions (nnU-Net reads them from the same dataset.json) and is scored per
region: the union of its label ids in prediction and reference (docs/datasets.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import NNUNET_PLANS, BenchError, machine, nnunet_env, prepare_nnunet  # noqa: E402

if TYPE_CHECKING:
    from autoseg.planning.plans import Plans

DEFAULT_NNUNET_VENV = Path("/work/bench/nnunet_venv")
NNUNET_DRIVER = Path(__file__).resolve().parent / "_nnunet_train_step.py"


def hold_out(dataset: Path, count: int, seed: int, folder: Path) -> tuple[Path, Path, Path]:
    """Split a dataset: (training dataset, test images, test labels) as links under `folder`."""
    meta = json.loads((dataset / "dataset.json").read_text())
    if "training" not in meta:
        return _hold_out_nnunetv2(dataset, meta, count, seed, folder)
    training = meta["training"]
    test = _test_draw(count, len(training), seed)
    train_root, images, labels = _split_folders(dataset, folder)
    kept = []
    for i, entry in enumerate(training):
        if i in test:
            (images / Path(entry["image"]).name).symlink_to((dataset / entry["image"]).resolve())
            (labels / Path(entry["label"]).name).symlink_to((dataset / entry["label"]).resolve())
            continue
        for key in ("image", "label"):
            (train_root / entry[key]).symlink_to((dataset / entry[key]).resolve())
        kept.append(entry)
    meta.update(training=kept, numTraining=len(kept), test=[], numTest=0)
    (train_root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return train_root, images, labels


def _test_draw(count: int, total: int, seed: int) -> set[int]:
    """The indices of the `count` held-out cases among `total`, drawn with `seed` (at least 6 left to train on)."""
    if not 0 < count < total - 5:
        raise BenchError(f"--hold-out {count}: the dataset has {total} cases; keep at least 6 for training")
    return set(np.random.default_rng(seed).choice(total, size=count, replace=False).tolist())


def _split_folders(dataset: Path, folder: Path) -> tuple[Path, Path, Path]:
    """(training dataset root, test images, test labels) under `folder`, created empty; the root keeps the dataset's
    folder name ('TaskNN_Name' or 'DatasetNNN_Name'), which names nnU-Net's converted dataset."""
    train_root = folder / dataset.name
    images, labels = folder / "test_images", folder / "test_labels"
    for sub in (train_root / "imagesTr", train_root / "labelsTr", images, labels):
        sub.mkdir(parents=True)
    return train_root, images, labels


def _hold_out_nnunetv2(dataset: Path, meta: dict, count: int, seed: int, folder: Path) -> tuple[Path, Path, Path]:
    """`hold_out` for the nnU-Net v2 layout: the cases of labelsTr/ in name order, drawn as for a Decathlon list."""
    from autoseg.dataset.layout import DatasetError, load_dataset

    try:
        cases = sorted((c for c in load_dataset(dataset).cases if c.label_file is not None), key=lambda c: c.case_id)
    except DatasetError as exc:
        raise BenchError(f"--hold-out: {exc}") from None
    test = _test_draw(count, len(cases), seed)
    train_root, images, labels = _split_folders(dataset, folder)
    for i, case in enumerate(cases):
        image_folder, label_folder = ((images, labels) if i in test
                                      else (train_root / "imagesTr", train_root / "labelsTr"))
        for path in case.image_files:
            (image_folder / path.name).symlink_to(path.resolve())
        (label_folder / case.label_file.name).symlink_to(case.label_file.resolve())
    meta.update(numTraining=len(cases) - count)
    (train_root / "dataset.json").write_text(json.dumps(meta, indent=1))
    return train_root, images, labels


def plan_autoseg(dataset: Path, workdir: Path, workers: int, configuration: str | None = None,
                 preset: str = "default") -> tuple[Plans, str]:
    """What `autoseg plan DATASET -o WORKDIR` does, preprocessing one configuration (default: the plan's
    default); (plans, configuration)."""
    from autoseg.plan_workspace import PlanWorkspaceError, plan_workspace

    workdir.mkdir(parents=True)  # a fresh workspace, as before: a kept one of an earlier run is not reused
    try:
        # Every configuration is planned (the default and the table need them all); only the one trained
        # is preprocessed.
        plans = plan_workspace(dataset, workdir, steps=("verify", "fingerprint", "plan"), workers=workers,
                               preset=preset).plans
        configuration = configuration or plans.default_configuration
        if configuration not in plans.configurations:
            raise BenchError(f"configuration {configuration} is not planned for {dataset.name} "
                             f"(planned: {', '.join(plans.configurations)})")
        plan_workspace(dataset, workdir, steps=("preprocess",), configurations=[configuration], workers=workers)
    except PlanWorkspaceError as exc:
        if exc.verification is not None:
            raise BenchError(f"{dataset}: the dataset does not verify:\n{exc.verification.summary()}") from None
        raise BenchError(f"{dataset}: {exc}") from None
    return plans, configuration


def dice_per_label(pred_dir: Path, labels_dir: Path, labels: list[int], regions=()) -> dict[int, float | None]:
    """Mean Dice per label id over the test cases; with `regions` (region-based plans: `labels` are the ids they are
    written as), per region, each scored as the union of its label ids in prediction and reference."""
    from autoseg.evaluation import evaluate_folders

    summary = evaluate_folders(pred_dir, labels_dir, labels=None if regions else labels, regions=tuple(regions) or None,
                               output_dir=pred_dir.parent / f"{pred_dir.name}_eval")
    if summary["missing_predictions"]:
        raise BenchError(f"{pred_dir}: no prediction for {summary['missing_predictions'][:5]}")
    return {label: summary["mean"][str(label)]["dice"] for label in labels}


def run_autoseg(workdir: Path, configuration: str, epochs: int, iters_per_epoch: int, val_iters: int,
                workers: int, test_images: Path, out: Path, batch_size: int | None = None,
                mixed_precision: bool = False, seed: int = 0, augment_interpolation: str = "linear",
                augment_scale_draw: str = "uniform", augment_label_interpolation: str = "nearest") -> dict:
    from autoseg.inference.batch import predict_folder
    from autoseg.inference.settings import BatchOptions, ComputeSettings, ModelChoice
    from autoseg.training.trainer import TrainingSettings, train_fold

    settings = TrainingSettings(epochs=epochs, iters_per_epoch=iters_per_epoch, val_iters=val_iters,
                                workers=workers, validate_at_end=False, batch_size=batch_size,
                                mixed_precision=mixed_precision, seed=seed,
                                augment_interpolation=augment_interpolation, augment_scale_draw=augment_scale_draw,
                                augment_label_interpolation=augment_label_interpolation)
    t = time.perf_counter()
    train_fold(workdir, configuration, 0, settings, progress=False)
    train_s = time.perf_counter() - t
    t = time.perf_counter()
    report = predict_folder(workdir, [test_images], out, ModelChoice([configuration], folds=[0]),
                            compute=ComputeSettings(mixed_precision=mixed_precision),
                            batch=BatchOptions(progress=False))
    predict_s = time.perf_counter() - t
    if report.failed:
        raise BenchError(f"autoseg predict failed on {report.failed[:3]}")
    return {"train_s": train_s, "predict_s": predict_s, "cases": len(report.written)}


def cross_validation_folds(workdir: Path, configuration: str) -> list[dict]:
    """autoseg's five folds of the workspace's cases (written to splits.json where training has not yet), which
    nnU-Net gets as its splits_final.json so both tools train on the same cases."""
    from autoseg import workspace
    from autoseg.planning.plans import Plans
    from autoseg.preprocessing import store
    from autoseg.training.splits import load_or_create_splits

    plans = Plans.load(workspace.plans_json(workdir))
    data_dir = workspace.preprocessed_dir(workdir, plans.configuration(configuration).data_identifier)
    return load_or_create_splits(workspace.splits_json(workdir), store.list_cases(data_dir))


def run_nnunet(dataset: Path, workdir: Path, configuration: str, venv: str, folder: Path, epochs: int,
               iters_per_epoch: int, val_iters: int, workers: int, test_images: Path, out: Path,
               batch_size: int | None = None, preset: str = "default", run: int = 0) -> dict:
    from bench_predict import link_inputs
    from bench_train import autoseg_plan_summary, compare_plans, nnunet_plan_summary

    cache = folder / "nnunet"
    nnunet_bin, name, dataset_id = prepare_nnunet(dataset, cache, venv, configuration, preset)
    plans_name = NNUNET_PLANS[preset][1]
    differ = compare_plans(autoseg_plan_summary(workdir, configuration),
                           nnunet_plan_summary(cache, name, configuration, plans_name))
    if "patch_size" in differ or ("batch_size" in differ and batch_size is None):
        print("WARNING: batch or patch differ, so the budgets are not equal", flush=True)
    splits = cross_validation_folds(workdir, configuration)
    preprocessed = cache / "nnUNet_preprocessed" / name
    (preprocessed / "splits_final.json").write_text(json.dumps(splits, indent=1))

    suffix = f"_{run}" if run else ""  # each repeated run trains a model of its own
    results = folder / f"nnunet_results{suffix}"
    env = {**nnunet_env(nnunet_bin, cache, results), "nnUNet_n_proc_DA": str(workers)}
    record = folder / f"nnunet_train{suffix}.json"
    cmd = [str(nnunet_bin / "python"), str(NNUNET_DRIVER), "--dataset-name", name, "--configuration", configuration,
           "--fold", "0", "--epochs", str(epochs), "--iters", str(iters_per_epoch), "--val-iters", str(val_iters),
           "--json", str(record), "--plans-name", plans_name]
    cmd += ["--batch-size", str(batch_size)] if batch_size else []
    log = folder / f"nnunet_train{suffix}.log"
    t = time.perf_counter()
    with open(log, "w") as log_file:
        done = subprocess.run(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    train_wall = time.perf_counter() - t
    if done.returncode != 0 or not record.is_file():
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-25:])
        raise BenchError(f"{' '.join(cmd)} failed (exit {done.returncode}):\n{tail}")
    figures = json.loads(record.read_text())

    inputs = folder / f"nnunet_inputs{suffix}"
    channels = len(json.loads((workdir / "plans.json").read_text())["channel_names"])
    cases = link_inputs([test_images], channels, inputs, None)
    cmd = [str(nnunet_bin / "nnUNetv2_predict"), "-i", str(inputs), "-o", str(out), "-d", str(dataset_id),
           "-c", configuration, "-f", "0", "-chk", "checkpoint_final.pth", "-device", "cpu", "-npp", "2", "-nps", "2",
           "-p", plans_name]
    t = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    predict_s = time.perf_counter() - t
    if done.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return {"train_s": figures["train_s"], "train_wall_s": train_wall, "predict_s": predict_s, "cases": len(cases),
            "torch": figures["torch"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path, help="raw training dataset (Decathlon or nnU-Net v2 layout)")
    parser.add_argument("--test-images", type=Path, help="folder of test images (not in DATASET)")
    parser.add_argument("--test-labels", type=Path, help="folder of their reference label maps")
    parser.add_argument("--hold-out", type=int, metavar="K",
                        help="instead of --test-images/--test-labels: hold K cases of DATASET out as the test set")
    parser.add_argument("--seed", type=int, default=0, help="seed of --hold-out's draw (default: %(default)s)")
    parser.add_argument("--iterations", type=int, required=True, help="training iterations for each tool")
    parser.add_argument("--epochs", type=int,
                        help="epochs the iterations are split into (the learning rate decays per epoch; "
                             "default: one per 250 iterations, at least 1)")
    parser.add_argument("--val-iters", type=int, default=10,
                        help="validation batches per epoch, both tools (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=None, help="augmentation workers for both (default: autoseg's)")
    parser.add_argument("--preset", choices=sorted(NNUNET_PLANS), default="default",
                        help="planning preset for autoseg, and nnU-Net's planner of the same name (resenc-m: "
                             "nnUNetPlannerResEncM, trained and predicted with nnUNetResEncUNetMPlans)")
    parser.add_argument("--configuration", choices=("2d", "3d_fullres", "3d_lowres"),
                        help="configuration both train (default: autoseg's default configuration, 3d_fullres for 3D "
                             "data)")
    parser.add_argument("--batch-size", type=int,
                        help="batch size for both instead of the plan's (nnU-Net gets it written into its plans)")
    parser.add_argument("--autoseg-precision", choices=("float32", "auto"), default="float32",
                        help="float32: autoseg trains and predicts without autocast, as nnU-Net does on the CPU; auto: "
                             "autoseg's default (bfloat16 autocast on a CPU with native bf16) (default: %(default)s)")
    parser.add_argument("--augment-interpolation", choices=("cubic", "linear"), default="linear",
                        help="autoseg's image interpolation in the rotation and scaling augmentation (`autoseg train "
                             "--augment-interpolation`); nnU-Net 2.8.1 interpolates linearly (default: %(default)s)")
    parser.add_argument("--augment-scale-draw", choices=("batchgenerators", "uniform"), default="uniform",
                        help="autoseg's scale draw in the scaling augmentation (`autoseg train --augment-scale-draw`); "
                             "nnU-Net 2.8.1 draws uniformly (default: %(default)s)")
    parser.add_argument("--augment-label-interpolation", choices=("nearest", "linear"), default="nearest",
                        help="autoseg's label interpolation in the rotation and scaling augmentation (`autoseg train "
                             "--augment-label-interpolation`); nnU-Net 2.8.1 interpolates each label's indicator "
                             "linearly (default: %(default)s)")
    parser.add_argument("--nnunet-venv", default=str(DEFAULT_NNUNET_VENV) if DEFAULT_NNUNET_VENV.is_dir() else None,
                        metavar="PATH", help="nnunetv2 venv or its bin folder (default: %(default)s)")
    parser.add_argument("--no-nnunet", action="store_true", help="run autoseg only")
    parser.add_argument("--no-autoseg", action="store_true",
                        help="train and predict with nnU-Net only (autoseg still plans: the split and the plan both "
                             "tools get), to add runs of nnU-Net to an earlier set")
    parser.add_argument("--seeds", type=int, default=1,
                        help="train and predict N times (autoseg with training seeds --first-seed and on; nnU-Net, "
                             "which takes no seed, N fresh runs) and print the mean and range of each Dice "
                             "(default: 1)")
    parser.add_argument("--first-seed", type=int, default=0,
                        help="autoseg's first training seed, so more runs can be added to an earlier set "
                             "(default: 0)")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="work in DIR (kept) instead of a temporary folder")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()

    if args.iterations < 1:
        raise BenchError("--iterations must be at least 1")
    if args.batch_size is not None and args.batch_size < 1:
        raise BenchError("--batch-size must be at least 1")
    if args.seeds < 1:
        raise BenchError("--seeds must be at least 1")
    epochs = args.epochs or max(1, round(args.iterations / 250))
    if epochs < 1 or args.iterations % epochs:
        raise BenchError(f"--iterations {args.iterations} must split into --epochs {epochs} equal epochs")
    iters_per_epoch = args.iterations // epochs
    if (args.hold_out is None) == (args.test_images is None or args.test_labels is None):
        raise BenchError("pass either --test-images and --test-labels, or --hold-out K")
    from autoseg.training.augmentation import default_workers
    workers = default_workers() if args.workers is None else args.workers
    use_nnunet = args.nnunet_venv is not None and not args.no_nnunet
    if args.no_autoseg and not use_nnunet:
        raise BenchError("--no-autoseg leaves nothing to run without nnunetv2 (--nnunet-venv, not --no-nnunet)")

    print(f"machine: {machine()}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average before: {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory(prefix="bench_accuracy_") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        dataset = args.dataset.resolve()
        if args.hold_out is not None:
            dataset, test_images, test_labels = hold_out(dataset, args.hold_out, args.seed, folder / "split")
        else:
            test_images, test_labels = args.test_images.resolve(), args.test_labels.resolve()
        workdir = folder / "autoseg_ws"
        t = time.perf_counter()
        plans, configuration = plan_autoseg(dataset, workdir, workers=2, configuration=args.configuration,
                                            preset=args.preset)
        plan_s = time.perf_counter() - t
        planned = plans.configuration(configuration)
        batch_size = args.batch_size or planned.batch_size
        patch_size = list(planned.patch_size)
        labels = list(plans.scored_structures)  # the foreground labels, or the regions by their written ids
        print(f"configuration {configuration}: batch {batch_size}"
              f"{' (plan: ' + str(planned.batch_size) + ')' if args.batch_size else ''}, patch {patch_size}; "
              f"{args.iterations} iterations = {epochs} epoch(s) x {iters_per_epoch}, {args.val_iters} validation "
              f"batches per epoch, {workers} augmentation worker(s), autoseg precision {args.autoseg_precision}, "
              f"{args.augment_interpolation} image and {args.augment_label_interpolation} label interpolation and "
              f"{args.augment_scale_draw} scale draw in "
              "autoseg's augmentation; "
              f"test cases in {test_images}", flush=True)

        runs = []
        for run in range(args.seeds):
            suffix = f"_{run}" if run else ""
            figures = {}
            if args.no_autoseg:
                print(f"run {run + 1}/{args.seeds}: nnU-Net only", flush=True)
            else:
                figures["autoseg"] = run_autoseg(workdir, configuration, epochs, iters_per_epoch, args.val_iters,
                                                 workers, test_images, folder / f"pred_autoseg{suffix}",
                                                 args.batch_size, mixed_precision=args.autoseg_precision == "auto",
                                                 seed=args.first_seed + run,
                                                 augment_interpolation=args.augment_interpolation,
                                                 augment_scale_draw=args.augment_scale_draw,
                                                 augment_label_interpolation=args.augment_label_interpolation)
                figures["autoseg"]["plan_s"] = plan_s
                figures["autoseg"]["dice"] = dice_per_label(folder / f"pred_autoseg{suffix}", test_labels, labels,
                                                            plans.regions)
                print(f"run {run + 1}/{args.seeds}: autoseg done (seed {args.first_seed + run}): train "
                      f"{figures['autoseg']['train_s']:.1f} s, predict {figures['autoseg']['predict_s']:.1f} s",
                      flush=True)
            if use_nnunet:
                figures["nnunetv2"] = run_nnunet(dataset, workdir, configuration, args.nnunet_venv, folder, epochs,
                                                 iters_per_epoch, args.val_iters, workers, test_images,
                                                 folder / f"pred_nnunet{suffix}", args.batch_size, args.preset, run)
                figures["nnunetv2"]["dice"] = dice_per_label(folder / f"pred_nnunet{suffix}", test_labels, labels,
                                                             plans.regions)
            runs.append(figures)
        print_table(runs, plans, labels, args.iterations, batch_size, patch_size)
        if args.json:
            args.json.write_text(json.dumps({"iterations": args.iterations, "epochs": epochs,
                                             "val_iters": args.val_iters,
                                             "workers": workers, "configuration": configuration,
                                             "autoseg_precision": args.autoseg_precision,
                                             "augment_interpolation": args.augment_interpolation,
                                             "augment_scale_draw": args.augment_scale_draw,
                                             "augment_label_interpolation": args.augment_label_interpolation,
                                             "first_seed": args.first_seed,
                                             "batch_size": batch_size, "patch_size": patch_size,
                                             "runs": runs, **runs[0]}, indent=1, default=str))


def print_table(runs: list[dict], plans: "Plans", labels: list[int], iterations: int, batch_size: int,
                patch_size: list[int]) -> None:
    """Dice per label and tool: the mean over the runs, and with several runs their range [min, max]."""
    tools = list(runs[0])

    def cell(values: list[float | None]) -> str:
        known = [v for v in values if v is not None]
        if len(runs) == 1 or not known:
            return _fmt(_mean(values))
        return f"{_fmt(_mean(values))} [{min(known):.3f}, {max(known):.3f}]"

    width = 12 if len(runs) == 1 else 26
    print(f"\nDice on {next(iter(runs[0].values()))['cases']} test cases, fold 0 after {iterations} iterations "
          f"(batch {batch_size}, patch {patch_size})" + (f", mean [min, max] of {len(runs)} runs:" if len(runs) > 1
                                                         else ":"))
    print(f"{'label':<24}" + "".join(f"{t:>{width}}" for t in tools))
    for label in labels:
        name = f"{label} {plans.output_labels[label]}"
        print(f"{name:<24}" + "".join(f"{cell([r[t]['dice'][label] for r in runs]):>{width}}" for t in tools))
    means = {t: [_mean([r[t]["dice"][label] for label in labels]) for r in runs] for t in tools}
    print(f"{'mean':<24}" + "".join(f"{cell(means[t]):>{width}}" for t in tools))
    for key, title, scale in (("train_s", "training s", 1), ("train_s", "training s/iteration", iterations),
                              ("predict_s", "prediction s", 1)):
        print(f"{title:<24}" + "".join(f"{_mean([r[t][key] / scale for r in runs]):>{width}.2f}" for t in tools))
    print("training s: autoseg's train_fold and nnU-Net's run_training (both with per-epoch validation batches, "
          "without imports); prediction s: autoseg's predict_folder in this process, nnUNetv2_predict from launch "
          "to exit")


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _fmt(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


if __name__ == "__main__":
    try:
        main()
    except BenchError as exc:
        print(f"bench_accuracy: error: {exc}", file=sys.stderr)
        sys.exit(2)
