"""The `autoseg` command: parse arguments, call one function per command, print results."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
from pathlib import Path

from autoseg import __version__

log = logging.getLogger("autoseg")

PLAN_STEPS = ("verify", "fingerprint", "plan", "preprocess")  # as autoseg.plan_workspace.PLAN_STEPS
PLAN_PRESETS = ("default", "resenc-m", "resenc-l", "resenc-xl")  # as autoseg.planning.presets.PRESETS
CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")  # as autoseg.planning.plans.CONFIGURATIONS
INSTANCE_CHOICES = ("auto", "on", "off")  # as autoseg.plan_workspace.INSTANCE_CHOICES
OBJECT_METRICS = ("auto", "membrane", "instances", "all", "none")  # as autoseg.evaluation.objects.CHOICES
AUGMENT_INTERPOLATIONS = ("cubic", "linear")  # as autoseg.training.augmentation.AUGMENT_INTERPOLATIONS
SCALE_DRAWS = ("batchgenerators", "uniform")  # as autoseg.training.augmentation.SCALE_DRAWS
LABEL_INTERPOLATIONS = ("nearest", "linear")  # as autoseg.training.augmentation.LABEL_INTERPOLATIONS
RUNTIMES = ("torch", "openvino", "openvino-int8", "auto")  # as autoseg.inference.settings.RUNTIMES
QUANTIZE_CALIBRATION_WINDOWS = 128  # as autoseg.quantization.DEFAULT_CALIBRATION_WINDOWS
QUANTIZE_TOLERANCE = 0.005  # as autoseg.quantization.DEFAULT_TOLERANCE
# (copies, so `autoseg --help` starts without importing numpy and torch; tests/test_cli_plan.py keeps them equal)


class CommandError(Exception):
    """A problem with the command line itself; printed without a traceback."""


def _default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2)))


def _default_configuration(workdir: Path) -> str:
    """The configuration plans.json names for use when the user gives no --config."""
    from autoseg import workspace
    from autoseg.planning.plans import Plans

    return Plans.load(workspace.plans_json(workdir)).resolve_configurations(None)[0]


def cmd_verify(args: argparse.Namespace) -> int:
    from autoseg.dataset.layout import load_dataset
    from autoseg.dataset.verify import verify_dataset

    dataset = load_dataset(args.dataset)
    report = verify_dataset(dataset, workers=args.workers)
    print(report.summary())
    return 0 if report.ok else 1


def cmd_plan(args: argparse.Namespace) -> int:
    from autoseg.plan_workspace import PlanWorkspaceError, plan_workspace
    from autoseg.planning.planner import explain_plans

    if args.plans_from is not None and (args.preset != "default" or args.memory_gb is not None):
        raise CommandError("--plans-from takes the source's plans as they are; leave out --preset and --memory-gb")
    if args.plans_from is not None and not args.plans_from.exists():
        raise CommandError(f"--plans-from {args.plans_from}: no such workspace or plans.json")
    try:
        outcome = plan_workspace(args.dataset, args.output, steps=args.steps or PLAN_STEPS,
                                 configurations=args.configs, memory_gb=args.memory_gb, workers=args.workers,
                                 preset=args.preset, plans_from=args.plans_from, instances=args.instances)
    except PlanWorkspaceError as exc:
        if exc.verification is not None:
            print(exc.verification.summary())  # every problem, then the one-line error
        raise
    if outcome.verification is not None and outcome.verification.problems:
        print(outcome.verification.summary())
    if args.explain:
        from autoseg import workspace
        from autoseg.planning.plans import Plans

        print(explain_plans(outcome.plans or Plans.load(workspace.plans_json(args.output))))
    log.info("done: %s", ", ".join(f"{k} {v:.1f} s" for k, v in outcome.seconds.items()) or "nothing to time")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from autoseg.training.trainer import TrainingSettings, train_fold

    fold = args.fold
    overrides = {k: v for k, v in {"epochs": args.epochs, "iters_per_epoch": args.iters_per_epoch,
                                   "val_iters": args.val_iters, "device": args.device, "workers": args.workers,
                                   "seed": args.seed, "checkpoint_every": args.checkpoint_every,
                                   "batch_size": args.batch_size,
                                   "pretrained": None if args.pretrained is None else str(args.pretrained),
                                   }.items() if v is not None}
    if args.no_validation:
        overrides["validate_at_end"] = False
    if args.save_probabilities is not None:
        overrides["save_probabilities"] = args.save_probabilities
    if args.fp32:
        overrides["mixed_precision"] = False
    if args.elastic is not None:
        overrides["elastic"] = args.elastic
    if args.compile is not None:
        overrides["compile"] = args.compile
    if args.augment_interpolation is not None:
        overrides["augment_interpolation"] = args.augment_interpolation
    if args.augment_scale_draw is not None:
        overrides["augment_scale_draw"] = args.augment_scale_draw
    if args.augment_label_interpolation is not None:
        overrides["augment_label_interpolation"] = args.augment_label_interpolation
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    args.config = args.config or _default_configuration(args.workdir)
    from autoseg.device import choose_device
    from autoseg.training.distributed import launch

    device = choose_device(args.device)
    if args.gpus < 1:
        raise CommandError(f"--gpus must be at least 1, got {args.gpus}")
    if args.gpus > 1 and (args.device is None and device.type == "cpu"):
        raise CommandError(f"--gpus {args.gpus}: CUDA is not available; add --device cpu to train with "
                           f"{args.gpus} CPU processes")
    if args.gpus > 1 and device.index is not None:
        raise CommandError(f"--gpus {args.gpus} uses cuda:0..{args.gpus - 1}; pick the devices with "
                           "CUDA_VISIBLE_DEVICES instead of --device cuda:K")
    result = launch(train_fold, (args.workdir, args.config, fold, TrainingSettings(**overrides), args.resume),
                    args.gpus, device.type, args.threads)
    validation = result.get("validation")
    if validation:
        from autoseg.evaluation import format_summary_table

        print(f"validation of {args.config} fold {fold} ({validation['num_cases']} cases):")
        print(format_summary_table(validation))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from autoseg.inference.batch import predict_folder
    from autoseg.inference.settings import (
        DEFAULT_UNCERTAINTY_THRESHOLD,
        BatchOptions,
        ComputeSettings,
        ModelChoice,
        OutputOptions,
        WindowSettings,
    )

    if (args.num_parts is None) != (args.part_id is None):
        raise CommandError("--num-parts and --part-id go together")
    if args.output_format == "dicom-seg" and importlib.util.find_spec("highdicom") is None:
        raise CommandError("--output-format dicom-seg needs highdicom, which is not installed: pip install "
                           "autoseg[dicom]")
    workdir, configurations = _predict_workspace(args)
    threshold = DEFAULT_UNCERTAINTY_THRESHOLD if args.uncertainty_threshold is None else args.uncertainty_threshold
    summary = predict_folder(
        workdir, args.input, args.output,
        model=ModelChoice(configurations, args.folds, args.checkpoint, read_only=args.model is not None),
        window=WindowSettings(step_size=args.step_size, mirroring=not args.no_mirroring),
        compute=ComputeSettings(args.device, mixed_precision=not args.fp32, runtime=args.runtime),
        outputs=OutputOptions(save_probabilities=args.save_probabilities, save_uncertainty=args.save_uncertainty,
                              uncertainty_threshold=threshold, report_files=not args.no_report,
                              postprocessing=not args.no_postprocessing, output_format=args.output_format,
                              model_name=None if args.model is None else args.model.name),
        batch=BatchOptions(skip_existing=args.continue_, num_parts=args.num_parts or 1, part_id=args.part_id or 0,
                           workers=args.workers))
    print(f"{len(summary.written)} written, {len(summary.skipped)} skipped, {len(summary.failed)} failed "
          f"-> {args.output}")
    for key, message in summary.failed:
        print(f"  failed: {key}: {message}", file=sys.stderr)
    return 1 if summary.failed else 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from autoseg.evaluation import evaluate_folders, format_summary_table

    labels = [label for label, _ in args.labels] if args.labels else None
    names = {label: name for label, name in args.labels or [] if name}
    summary = evaluate_folders(args.predictions, args.references, labels=labels, output_dir=args.output,
                               workers=args.workers, label_names=names, object_metrics=args.object_metrics,
                               instances_dir=args.instances)
    print(format_summary_table(summary))
    if summary.get("object_metrics"):
        from autoseg.evaluation.objects import format_block

        print(format_block(summary["object_metrics"]))
    sources = ["--labels" if s == "given" else s for s in summary["label_names_from"]]
    if sources:
        print(f"label names from {' and '.join(sources)}")
    print(f"written: {(args.output or args.predictions) / 'summary.json'} and summary.csv")
    return 0


def _fold_arg(text: str) -> int | str:
    """`--fold`: a fold number or 'all'."""
    if text == "all":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a fold number (0-4) or 'all'") from None


def _label_arg(text: str) -> tuple[int, str | None]:
    """`--labels` item: ID or ID=NAME."""
    label, _, name = text.partition("=")
    try:
        return int(label), (name.strip() or None)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not ID or ID=NAME (e.g. 1 or 1=liver)") from None


def cmd_crossval(args: argparse.Namespace) -> int:
    from autoseg.crossval import run_crossval

    summary = run_crossval(args.workdir, args.configs, postprocessing=not args.no_postprocessing)
    for name, r in summary["configurations"].items():
        dice = ", ".join(f"{k}: {'-' if v is None else f'{v:.4f}'}" for k, v in r["mean_dice"].items())
        missing = f"  (folds missing: {r['missing_folds']})" if r["missing_folds"] else ""
        print(f"{name:11s} {r['num_cases']} cases  Dice per label {dice}{missing}")
    for name, r in summary["ensembles"].items():
        dice = ", ".join(f"{k}: {'-' if v is None else f'{v:.4f}'}" for k, v in r["mean_dice"].items())
        print(f"{name:11s} {r['num_cases']} cases  Dice per label {dice}  (ensemble)")
    best = " ".join(summary["best"])
    print(f"best: {best} ({summary['reason']})")
    print(f"predict with it: autoseg predict {args.workdir} --config {best} -i INPUT -o OUTPUT")
    if "postprocessing" in summary:
        pp = summary["postprocessing"]
        print(f"postprocessing: largest foreground component {pp['foreground_largest_component']}, "
              f"largest component per label {pp['largest_component_labels']}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from autoseg.inference.int8_models import QuantizationError
    from autoseg.model_files import CheckpointError, fold_names
    from autoseg.quantization import check_arguments, quantize_fold

    check_arguments(args.calibration_windows, args.validation_cases, args.tolerance)
    configurations = args.config or [_default_configuration(args.workdir)]
    refused, folds_done = [], {}
    for configuration in configurations:
        try:
            folds = fold_names(args.workdir, configuration, args.folds, args.checkpoint)
        except CheckpointError as exc:
            raise CommandError(str(exc)) from None
        for fold in folds:
            try:
                record = quantize_fold(args.workdir, configuration, fold, checkpoint=args.checkpoint,
                                       calibration=args.calibration_windows, validation_cases=args.validation_cases,
                                       tolerance=args.tolerance, seed=args.seed)
            except QuantizationError as exc:
                print(f"{configuration} fold {fold}: {exc}", file=sys.stderr)
                refused.append(f"{configuration}/fold_{fold}")
                continue
            folds_done.setdefault(configuration, []).append(fold)
            check = record["check"]
            dice = ", ".join(f"{check['names'][k]} {_dice_text(check['dice_float32'][k])} -> "
                             f"{_dice_text(check['dice_int8'][k])}" for k in check["dice_float32"])
            where = "validation" if check["held_out"] else "training (fold all holds none out)"
            print(f"{configuration} fold {fold}: int8 accepted on {len(check['cases'])} {where} case(s), Dice "
                  f"float32 -> int8 {dice} (largest drop {check['max_drop']:.4f} <= {check['tolerance']})")
    if refused:
        print(f"refused: {', '.join(refused)} (nothing installed for them; an int8 model they had before stays)",
              file=sys.stderr)
        return 2
    folds = sorted({f for done in folds_done.values() for f in done})
    choice = "" if args.checkpoint == "final" else f" --checkpoint {args.checkpoint}"
    print(f"predict with it: autoseg predict {args.workdir} --config {' '.join(configurations)} --folds "
          f"{' '.join(folds)}{choice} -i INPUT -o OUTPUT (the default --runtime auto takes them on a CPU run in "
          "float32; a cascade's first stage needs its own int8 models too)")
    return 0


def _dice_text(dice: float | None) -> str:
    return "absent" if dice is None else f"{dice:.4f}"


def _predict_workspace(args: argparse.Namespace) -> tuple[Path, list[str] | None]:
    """The workspace and configurations to predict with: WORKDIR, or the verified --model archive
    extracted once into OUTPUT/.autoseg_model_<hash> (reused by later runs into the same OUTPUT)."""
    from autoseg.model_archive import model_workspace

    if (args.workdir is None) == (args.model is None):
        raise CommandError("give either WORKDIR or --model model.zip (exactly one)")
    if args.model is None:
        return args.workdir, args.config
    if args.checkpoint != "final":
        raise CommandError("--checkpoint does not apply to --model: the archive holds one checkpoint per fold, "
                           "chosen by `autoseg export-model --checkpoint`")
    folder, manifest = model_workspace(args.model, args.output)
    log.info("model %s verified, extracted to %s", args.model, folder)
    return folder, args.config or manifest["configurations"]


def cmd_export_model(args: argparse.Namespace) -> int:
    from autoseg.model_archive import export_model

    manifest = export_model(args.workdir, args.archive, configurations=args.config, folds=args.folds,
                            checkpoint=args.checkpoint)
    folds = "; ".join(f"{c} folds {' '.join(f)}" for c, f in manifest["folds"].items())
    print(f"wrote {args.archive} ({args.archive.stat().st_size / 1e6:.1f} MB): {folds}, "
          f"{len(manifest['members']) + 1} members")
    print(f"predict with it: autoseg predict --model {args.archive} -i INPUT -o OUTPUT")
    return 0


def cmd_import_model(args: argparse.Namespace) -> int:
    from autoseg.model_archive import import_model

    manifest = import_model(args.archive, args.directory)
    folds = "; ".join(f"{c} folds {' '.join(f)}" for c, f in manifest["folds"].items())
    print(f"verified and extracted {args.archive} into {args.directory}: {folds} (see model_card.md there)")
    print(f"predict with it: autoseg predict {args.directory} --config {' '.join(manifest['configurations'])} "
          "-i INPUT -o OUTPUT")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autoseg",
        description="Self-configuring medical image segmentation (3D volumes and 2D images): plan, train and predict a "
                    "U-Net from a labelled dataset. Run the commands in order: plan, train (per fold), predict.",
        epilog="Documentation: docs/ in the source tree (user guide, dataset layouts, workspace layout).")
    parser.add_argument("--version", action="version", version=f"autoseg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debugging details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("verify", help="check a dataset and report every problem at once",
                       description="Check every case of a dataset (files present and readable, channel counts, "
                                   "matching grids, declared label values, finite intensities) and list every problem. "
                                   "Exit status 1 when there are errors.")
    p.add_argument("dataset", type=Path, metavar="DATASET_DIR", help="folder holding dataset.json")
    p.add_argument("--workers", type=int, default=_default_workers(), help="parallel processes (default: %(default)s)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("plan", help="verify, fingerprint, plan and preprocess a dataset into a workspace",
                       description="Verify the dataset, extract its fingerprint, plan each configuration "
                                   "(WORKDIR/plans.json) and preprocess every case for training. "
                                   "Each step can be run alone with --steps; an interrupted preprocessing resumes.")
    p.add_argument("dataset", type=Path, metavar="DATASET_DIR",
                   help="folder holding dataset.json (Decathlon or nnU-Net v2 layout)")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="WORKDIR",
                   help="workspace folder (created if missing)")
    p.add_argument("--workers", type=int, default=_default_workers(), help="parallel processes (default: %(default)s)")
    p.add_argument("--configs", nargs="+", choices=CONFIGURATIONS, metavar="CONFIG",
                   help="configurations to plan and preprocess (default: all that apply; choices: "
                        f"{' '.join(CONFIGURATIONS)}; 3d_cascade_fullres brings its 3d_lowres stage along)")
    p.add_argument("--steps", nargs="+", choices=PLAN_STEPS, metavar="STEP",
                   help="run only these steps (default: verify fingerprint plan preprocess)")
    p.add_argument("--instances", choices=INSTANCE_CHOICES, default="auto",
                   help="instance segmentation: learn each object's rim as one more label so touching objects (cells, "
                        "nuclei) come out as separate objects, and predict an instance map <case>_instances beside "
                        "each label map; auto: when the dataset has instance maps in instancesTr/ (docs/instances.md) "
                        "(default: auto)")
    p.add_argument("--preset", choices=PLAN_PRESETS, default="default",
                   help="network and memory model: default (nnU-Net's plain U-Net) or the residual-encoder presets "
                        "resenc-m, resenc-l, resenc-xl (nnU-Net's ResEnc M/L/XL, which it recommends trying first; "
                        "GPU memory targets 8, 24, 40 GB). Default: %(default)s")
    p.add_argument("--memory-gb", type=float, default=None,
                   help="accelerator memory budget per training step used to size patch and batch (default: the "
                        "preset's target, 8 GB for default)")
    p.add_argument("--plans-from", type=Path, metavar="SOURCE",
                   help="instead of planning, take the plans of another workspace (its folder or plans.json), so "
                        "its trained models can be fine-tuned here with `autoseg train --pretrained`; this "
                        "dataset keeps its own labels and must have as many channels")
    p.add_argument("--explain", action="store_true", help="print every planning decision with its reason")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("train", help="train one fold of one configuration",
                       description="Train one cross-validation fold (0-4, from WORKDIR/splits.json, created on first "
                                   "use) or 'all' (every case, no validation). Writes checkpoints, a log and "
                                   "progress.png to WORKDIR/models/<config>/fold_<K>/, then predicts the fold's "
                                   "validation cases and writes validation/summary.json. The default schedule is 1000 "
                                   "epochs x 250 iterations; shorten it with --epochs/--iters-per-epoch (the learning "
                                   "rate follows).")
    p.add_argument("workdir", type=Path, metavar="WORKDIR", help="workspace written by `autoseg plan`")
    p.add_argument("--fold", required=True, type=_fold_arg, help="fold 0-4, or 'all'")
    p.add_argument("--config", choices=CONFIGURATIONS,
                   help="configuration (default: the plan's default_configuration: 3d_fullres for 3D data, 2d for 2D "
                        "images)")
    p.add_argument("--epochs", type=int, help="number of epochs (default: 1000)")
    p.add_argument("--iters-per-epoch", type=int, help="training iterations per epoch (default: 250)")
    p.add_argument("--val-iters", type=int, help="validation batches per epoch for the pseudo-Dice (default: 50)")
    p.add_argument("--batch-size", type=int, metavar="N",
                   help="patches per iteration instead of the plan's batch_size; for short CPU runs a smaller "
                        "batch takes more, cheaper steps and learns more in the same time (docs/user_guide.md) "
                        "(default: the plan's)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--workers", type=int, help="background augmentation processes (default: CPU cores - 1, at most 12)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice, all cores)")
    p.add_argument("--seed", type=int, help="random seed (default: 0)")
    p.add_argument("--checkpoint-every", type=int, help="epochs between checkpoint_latest writes (default: 1)")
    p.add_argument("--resume", action="store_true", help="continue from checkpoint_latest.pt exactly where training "
                                                         "stopped")
    p.add_argument("--pretrained", type=Path, metavar="CHECKPOINT",
                   help="start from another model's weights (e.g. SOURCE/models/3d_fullres/fold_0/checkpoint_final.pt) "
                        "to fine-tune it; plan this workspace with --plans-from SOURCE first. The segmentation heads "
                        "are re-initialised when the labels differ")
    p.add_argument("--elastic", action=argparse.BooleanOptionalAction, default=None,
                   help="the U-Net paper's elastic deformation of training patches: displacements on a 3 x 3 grid, "
                        "standard deviation 10 pixels, cubic interpolation (settings from the plan's "
                        "elastic_deformation where it has one). Helps small 2D datasets such as EM slices; see "
                        "docs/planning.md (default: as the plan says; off in nnU-Net's default plans)")
    p.add_argument("--augment-interpolation", choices=AUGMENT_INTERPOLATIONS,
                   help="image interpolation of the rotation and scaling augmentation: linear as nnU-Net 2.8.1, or "
                        "cubic (default: linear; see docs/planning.md)")
    p.add_argument("--augment-label-interpolation", choices=LABEL_INTERPOLATIONS,
                   help="label interpolation of the rotation and scaling augmentation: nearest neighbour, or linear "
                        "(each label's indicator interpolated, the highest kept, as nnU-Net 2.8.1) (default: "
                        "nearest; see docs/planning.md)")
    p.add_argument("--augment-scale-draw", choices=SCALE_DRAWS,
                   help="how the scaling augmentation draws its factor in [0.7, 1.4]: uniform over the range, as "
                        "nnU-Net 2.8.1, or batchgenerators (below or above 1 with p 0.5 each; autoseg's earlier "
                        "rule) (default: uniform; see docs/planning.md)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the network for training (compiled at the first step; if compiling fails, "
                        "training goes on uncompiled and the log says why) (default: on with CUDA, off on the CPU, "
                        "as nnU-Net)")
    p.add_argument("--no-validation", action="store_true", help="skip predicting the validation cases at the end")
    p.add_argument("--save-probabilities", action=argparse.BooleanOptionalAction, default=None,
                   help="keep each validation case's probabilities (validation/<case>.npz, float16), which "
                        "`autoseg crossval` needs to score ensembles of configurations; without them validation "
                        "builds label maps slab by slab in bounded memory (default: saved when the plans have "
                        "more than one configuration)")
    p.add_argument("--fp32", action="store_true",
                   help="train and validate in float32 (default: mixed precision, float16 on CUDA, bfloat16 on CPUs "
                        "with native bf16; validation averages the windows in float16)")
    p.add_argument("--gpus", type=int, default=1, metavar="N",
                   help="data-parallel processes on this machine, one per GPU (with --device cpu: CPU processes); the "
                        "batch (the plan's, or --batch-size) is split over them (default: 1). For several machines use "
                        "torchrun, see docs/distributed.md")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="segment new volumes with the trained folds",
                       description="Segment every case of INPUT (a folder of Decathlon-style 3D/4D files, an "
                                   "nnU-Net-style folder of <case>_<cccc> channel files, folders of DICOM series, or a "
                                   "list of files) with the ensemble of the trained folds (of WORKDIR or of --model): "
                                   "the training preprocessing, sliding-window inference with Gaussian weighting and "
                                   "mirroring, logits averaged over a configuration's folds, resampled to each input's "
                                   "exact original geometry before the softmax, configurations averaged as "
                                   "probabilities (nnU-Net v2's rules), written as OUTPUT/<case><ending>; unless "
                                   "--no-report also OUTPUT/volumes.csv, qc/<case>.png and report.html "
                                   "(docs/reports.md). Exit status 1 if any case failed (the others are still "
                                   "written).")
    p.add_argument("workdir", type=Path, nargs="?", metavar="WORKDIR",
                   help="workspace with trained models (leave it out with --model)")
    p.add_argument("--model", type=Path, metavar="MODEL_ZIP",
                   help="predict with a model archive (`autoseg export-model`) instead of WORKDIR; it is verified "
                        "and extracted into OUTPUT/.autoseg_model_<hash>, reused by later runs")
    p.add_argument("-i", "--input", type=Path, nargs="+", required=True, metavar="INPUT", help="input folder or files")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUTPUT", help="output folder")
    p.add_argument("--config", nargs="+", choices=CONFIGURATIONS,
                   help="configuration(s) to ensemble (default: the plan's default_configuration: 3d_fullres for 3D "
                        "data, 2d for 2D images)")
    p.add_argument("--folds", nargs="+", help="folds to ensemble, e.g. 0 1 2 or all (default: every trained fold)")
    p.add_argument("--checkpoint", default="final", choices=("final", "best", "latest"),
                   help="which checkpoint of each fold (default: final, falling back to latest; not with --model)")
    p.add_argument("--no-mirroring", action="store_true",
                   help="switch off mirroring test-time augmentation (8x fewer forward passes in 3D)")
    p.add_argument("--step-size", type=float, default=0.5,
                   help="window step as a fraction of the patch (default: %(default)s)")
    p.add_argument("--save-probabilities", action="store_true",
                   help="also write OUTPUT/<case>.npz with per-label probabilities (holds them for the whole input "
                        "grid: much more memory on large volumes)")
    p.add_argument("--save-uncertainty", action="store_true",
                   help="with >= 2 folds/configurations: also write OUTPUT/<case>_uncertainty<ending>, the voxel-wise "
                        "entropy of the ensemble's probabilities / log(K), float32 on the input's grid (.tif for PNG "
                        "inputs)")
    p.add_argument("--uncertainty-threshold", type=float, metavar="U",
                   help="flag a case's label in volumes.csv and report.html when its uncertainty (mean normalised "
                        "entropy over the label's voxels, 0..1) exceeds U (default: 0.1; docs/prediction.md)")
    p.add_argument("--no-report", action="store_true",
                   help="write no volumes.csv, qc/<case>.png overlays or report.html")
    p.add_argument("--fp32", action="store_true",
                   help="compute in float32 and average the overlapping windows in float32 (default: float16 "
                        "on CUDA, bfloat16 on CPUs with native bf16, and the windows' average held in float16 as "
                        "nnU-Net holds it)")
    p.add_argument("--runtime", choices=RUNTIMES, default="auto",
                   help="what runs the networks: torch; openvino (CPU only, float32; faster than torch's float32 "
                        "on a CPU without native bf16, figures in docs/prediction.md; pip install "
                        "'autoseg[openvino]'); openvino-int8: the folds' int8 networks that `autoseg quantize` "
                        "made and checked against the validation Dice (CPU only); or auto: where torch would compute "
                        "float32 on the CPU and openvino is installed, openvino-int8 when every fold predicted "
                        "together has a current int8 network, else openvino, unless a configuration's windows are "
                        "large enough for torch's low-memory forward; otherwise torch (the log says which; a "
                        "cascade's stages decide each) (default: %(default)s)")
    p.add_argument("--no-postprocessing", action="store_true", help="ignore WORKDIR/postprocessing.json")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    p.add_argument("--continue", dest="continue_", action="store_true",
                   help="skip cases whose output already exists (and, unless --no-report, whose rows volumes.csv "
                        "holds; the others are predicted again)")
    p.add_argument("--num-parts", type=int, help="split the cases into this many parts ...")
    p.add_argument("--part-id", type=int, help="... and predict only this one (0-based)")
    p.add_argument("--workers", type=int, default=1,
                   help="background threads that read/preprocess and export/write while the network runs; 0 runs "
                        "everything in turn (default: %(default)s)")
    p.add_argument("--output-format", choices=("default", "dicom-seg"), default="default",
                   help="default (the default): label maps in the input's format (NIfTI for DICOM series); "
                        "dicom-seg: a DICOM Segmentation OUTPUT/<case>.dcm referencing each input DICOM series "
                        "(needs highdicom: pip install autoseg[dicom]), other inputs still get the default")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("evaluate", help="Dice, IoU, HD95, volumes and object metrics of predictions against references",
                       description="Compare every prediction in PRED_DIR with the reference of the same name in "
                                   "REF_DIR: per case and label Dice, IoU, 95th-percentile Hausdorff distance (mm) and "
                                   "volumes (ml). Writes summary.json and summary.csv and prints the mean per label, "
                                   "by name where known: from --labels, else the plans.json of the workspace that "
                                   "`autoseg predict` recorded in PRED_DIR/prediction_summary.json, else a "
                                   "dataset.json in REF_DIR or its parent. Adds the object metrics that apply and "
                                   "says why: the ISBI 2012 Rand, warping and pixel errors for a label named "
                                   "membrane or boundary, the Data Science Bowl's mAP, F1 and AJI where reference "
                                   "instance maps are given (--instances).")
    p.add_argument("predictions", type=Path, metavar="PRED_DIR")
    p.add_argument("references", type=Path, metavar="REF_DIR")
    p.add_argument("--labels", type=_label_arg, nargs="+", metavar="ID[=NAME]",
                   help="labels to score, each an id or id=name, e.g. 1=liver 2=tumour (default: every label in "
                        "the references)")
    p.add_argument("--instances", type=Path, metavar="DIR",
                   help="folder of reference instance maps (one id per object, named as the references) for mAP, "
                        "F1 and AJI of the objects; the predicted objects are autoseg's <case>_instances maps, else "
                        "the connected components of the label maps (default: an instancesTr/ beside REF_DIR, if any)")
    p.add_argument("--object-metrics", choices=OBJECT_METRICS, default="auto",
                   help="object metrics to add (docs/object_metrics.md): membrane = Rand, warping and pixel error of "
                        "the ISBI 2012 challenge; instances = mAP@0.5:0.95, F1@0.5, AJI, splits and merges; auto: "
                        "membrane ones when a label is named membrane or boundary, instance ones when reference "
                        "instance maps are found (default: auto)")
    p.add_argument("-o", "--output", type=Path, help="where to write the summaries (default: PRED_DIR)")
    p.add_argument("--workers", type=int, default=_default_workers(), help="parallel processes (default: %(default)s)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("crossval", help="cross-validation Dice per configuration; choose the best and the "
                                        "postprocessing",
                       description="Gather the five folds' validation results of each trained configuration, report "
                                   "the cross-validation Dice per label of each configuration and each pair of "
                                   "configurations (averaged), pick the best and decide "
                                   "whether keeping only the largest connected component (per label, and of the "
                                   "foreground) improves Dice; the rules go to WORKDIR/postprocessing.json, which "
                                   "`autoseg predict` applies.")
    p.add_argument("workdir", type=Path, metavar="WORKDIR")
    p.add_argument("--configs", nargs="+", choices=CONFIGURATIONS,
                   help="configurations to compare (default: all trained)")
    p.add_argument("--no-postprocessing", action="store_true", help="do not decide postprocessing")
    p.set_defaults(func=cmd_crossval)

    p = sub.add_parser("quantize", help="make int8 networks for faster CPU prediction, checked on validation Dice",
                       description="Quantize each fold's trained network to int8 for OpenVINO's CPU plugin (NNCF "
                                   "post-training quantization, calibrated on windows of the fold's preprocessed "
                                   "training cases), predict the fold's validation cases in full with the float32 "
                                   "and the int8 network, and keep the int8 network only if no label's mean Dice "
                                   "drops by more than --tolerance. Accepted networks go to "
                                   "models/<config>/fold_<K>/openvino_int8/; `autoseg predict` uses them by "
                                   "default where it would compute float32 on the CPU (--runtime auto), or always "
                                   "with --runtime openvino-int8. Needs pip install 'autoseg[openvino]' (openvino, "
                                   "nncf). "
                                   "See docs/prediction.md.")
    p.add_argument("workdir", type=Path, metavar="WORKDIR", help="workspace with trained folds and their "
                                                                 "preprocessed data")
    p.add_argument("--config", nargs="+", choices=CONFIGURATIONS,
                   help="configuration(s) to quantize (default: the plan's default configuration)")
    p.add_argument("--folds", nargs="+", help="folds, e.g. 0 1 2 or all (default: every trained fold)")
    p.add_argument("--checkpoint", default="final", choices=("final", "best", "latest"),
                   help="which checkpoint of each fold; predict must use the same (default: final)")
    p.add_argument("--calibration-windows", type=int, default=QUANTIZE_CALIBRATION_WINDOWS, metavar="N",
                   help="patches of the fold's training cases that set the int8 ranges, a third centred on "
                        "foreground; at most 1 GiB of them are held in memory, fewer for large patches (default: "
                        "%(default)s)")
    p.add_argument("--validation-cases", type=int, metavar="N",
                   help="check on N of the fold's validation cases drawn at random (default: all of them; fold "
                        "all holds none out and is checked on its training cases, so N saves time there)")
    p.add_argument("--tolerance", type=float, default=QUANTIZE_TOLERANCE, metavar="D",
                   help="largest accepted drop of a label's mean validation Dice (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the calibration windows' draw and of --validation-cases' (default: 0)")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("export-model", help="write trained folds to one portable model archive (.zip)",
                       description="Write the chosen configurations' folds to one zip: plans.json (with the "
                                   "normalization statistics), the network weights, postprocessing.json, a model card "
                                   "(labels, channels, training data summary, validation Dice) and a manifest with the "
                                   "SHA-256 of every member. See docs/model_archive.md.")
    p.add_argument("workdir", type=Path, metavar="WORKDIR", help="workspace with trained models")
    p.add_argument("archive", type=Path, metavar="MODEL_ZIP", help="archive to write, e.g. model.zip")
    p.add_argument("--config", nargs="+", choices=CONFIGURATIONS,
                   help="configuration(s) to export (default: the one(s) postprocessing.json was decided for by "
                        "`autoseg crossval`, else the plan's default_configuration)")
    p.add_argument("--folds", nargs="+", help="folds to export, e.g. 0 1 2 or all (default: every trained fold)")
    p.add_argument("--checkpoint", default="final", choices=("final", "best", "latest"),
                   help="which checkpoint of each fold (default: final, falling back to latest)")
    p.set_defaults(func=cmd_export_model)

    p = sub.add_parser("import-model", help="verify a model archive and extract it into a workspace",
                       description="Check every member of MODEL_ZIP against its manifest (presence, SHA-256, safe "
                                   "paths, format version), check that the weights load safely, and extract it into "
                                   "DIR (new or empty), a workspace `autoseg predict DIR` accepts.")
    p.add_argument("archive", type=Path, metavar="MODEL_ZIP", help="archive written by `autoseg export-model`")
    p.add_argument("directory", type=Path, metavar="DIR", help="new (or empty) folder for the workspace")
    p.set_defaults(func=cmd_import_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    from autoseg.errors import AutosegError

    try:
        return args.func(args)
    except (CommandError, AutosegError) as exc:
        if args.verbose:
            raise
        print(f"autoseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"autoseg {args.command}: interrupted; finished work is kept, run the same command to continue",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
