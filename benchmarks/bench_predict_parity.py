"""Prediction parity: `autoseg predict` against `nnUNetv2_predict_from_modelfolder` with the same
trained weights, on the same images.

    python benchmarks/bench_predict_parity.py WORKDIR -i IMAGES [--labels DIR] [--configuration C]
                                              [--fold K] [--cases N] [--no-mirroring] [--keep DIR]
                                              [--json OUT] [--nnunet-venv /work/bench/nnunet_venv/bin]

bench_plan_parity.py shows that both tools make the same preprocessed arrays and plans. This script
checks what comes after training: given one network, do the two predictors (sliding window,
Gaussian weighting, mirroring, export to each input's original grid) write the same label maps?

WORKDIR is an autoseg workspace with a trained fold. `_nnunet_from_autoseg.py`, run by nnunetv2's
own Python, writes an nnU-Net model folder from its plans.json and the fold's checkpoint_final.pt
(the weights copied into nnU-Net's PlainConvUNet layer by layer) and reports nnU-Net's logits for a
random input, which must equal autoseg's network's before anything else is compared. Then autoseg
predicts the first N cases of IMAGES (float32, the plan's step size 0.5, mirroring as asked,
no postprocessing) and nnU-Net predicts the same files (`-f K -chk checkpoint_final.pth -device
cpu`, `--disable_tta` with --no-mirroring). The script prints, per case, the share of voxels with
the same label and each label's Dice between the two predictions, and with --labels each tool's
Dice against the reference label maps.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _machine  # noqa: E402
from bench_plan import BenchError, nnunet_env, require_nnunet_bin  # noqa: E402

DEFAULT_NNUNET_VENV = "/work/bench/nnunet_venv/bin"
DRIVER = Path(__file__).resolve().parent / "_nnunet_from_autoseg.py"
LOGIT_TOLERANCE = 1e-3  # float32 sums in another order; a wrong layer mapping gives differences of order 1


def autoseg_logits(workdir: Path, configuration: str, fold: int, x: np.ndarray) -> np.ndarray:
    """autoseg's network of that fold, loaded as the predictor loads it, applied to `x`."""
    import torch

    from autoseg.inference.predictor import Predictor
    from autoseg.inference.settings import ComputeSettings, ModelChoice

    predictor = Predictor(workdir, ModelChoice([configuration], folds=[fold]),
                          compute=ComputeSettings("cpu", mixed_precision=False))
    with torch.no_grad():
        return predictor.folds[0].network(torch.from_numpy(x)).numpy()


def nnunet_model_folder(python: Path, workdir: Path, configuration: str, fold: int, folder: Path,
                        check: Path) -> None:
    cmd = [str(python), str(DRIVER), str(workdir), configuration, str(fold), str(folder), str(check)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")


def compare_labels(a: np.ndarray, b: np.ndarray, labels: list[int]) -> dict:
    """Share of voxels with the same label, and each label's Dice between `a` and `b` (None: in neither)."""
    from autoseg.evaluation import dice

    scores = {str(label): dice(a == label, b == label) for label in labels}
    return {"agreement": float(np.mean(a == b)) if a.size else 1.0,
            "dice": {k: None if math.isnan(v) else v for k, v in scores.items()}}


def _read(path: Path) -> np.ndarray:
    from autoseg.dataset.image_io import read_label

    return read_label(path)[0]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=Path, help="autoseg workspace with a trained fold")
    parser.add_argument("-i", "--input", type=Path, required=True, help="folder of images to predict")
    parser.add_argument("--labels", type=Path, help="reference label maps of those images (optional)")
    parser.add_argument("--configuration", help="default: the plans' default configuration")
    parser.add_argument("--fold", type=int, default=0, help="fold whose checkpoint_final.pt is used (default: 0)")
    parser.add_argument("--cases", type=int, default=0, help="predict only the first N cases (default: all)")
    parser.add_argument("--no-mirroring", action="store_true", help="both tools without test-time mirroring")
    parser.add_argument("--nnunet-venv", default=DEFAULT_NNUNET_VENV, help="nnunetv2's venv or its bin folder")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="work in DIR (kept) instead of a temporary folder")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        nnunet_bin = require_nnunet_bin(args.nnunet_venv)
        with tempfile.TemporaryDirectory(prefix="bench_predict_parity_") as tmp_name:
            tmp = args.keep or Path(tmp_name)
            tmp.mkdir(parents=True, exist_ok=True)
            record = run(args, nnunet_bin, tmp)
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        args.json.write_text(json.dumps(record, indent=1))
        print(f"wrote {args.json}")
    return 0


def run(args: argparse.Namespace, nnunet_bin: Path, tmp: Path) -> dict:
    from bench_predict import link_inputs

    from autoseg.dataset.image_io import image_suffix
    from autoseg.inference.batch import predict_folder
    from autoseg.inference.original_grid import segmentation_suffix
    from autoseg.inference.settings import BatchOptions, ComputeSettings, ModelChoice, OutputOptions, WindowSettings
    from autoseg.planning.plans import Plans

    workdir = args.workdir.resolve()
    plans = Plans.load(workdir / "plans.json")
    configuration = args.configuration or plans.default_configuration
    if configuration not in plans.configurations:
        raise BenchError(f"{workdir / 'plans.json'} has no configuration {configuration}")
    checkpoint = workdir / "models" / configuration / f"fold_{args.fold}" / "checkpoint_final.pt"
    if not checkpoint.is_file():
        raise BenchError(f"{checkpoint}: not found; train that fold to the end, or pass --configuration/--fold "
                         "of one that was trained")
    config = plans.configuration(configuration)
    labels = plans.foreground_labels
    print(f"machine: {_machine.machine()}")
    print(f"model: {workdir} {configuration} fold {args.fold}, patch {list(config.patch_size)}, "
          f"mirroring {'off' if args.no_mirroring else 'on'}, float32")

    # The same network on both sides, or nothing else means anything.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, plans.num_channels, *config.patch_size)).astype(np.float32)
    check = tmp / "check.npz"
    np.savez(check, x=x)
    model = tmp / "nnunet_model"
    nnunet_model_folder(nnunet_bin / "python", workdir, configuration, args.fold, model, check)
    theirs = np.load(check)["logits"]
    ours = autoseg_logits(workdir, configuration, args.fold, x)
    logit_diff = float(np.abs(ours - theirs).max())
    print(f"network check: logits of a random batch differ by at most {logit_diff:.2e} "
          f"(largest logit {float(np.abs(ours).max()):.1f})")
    if not logit_diff <= LOGIT_TOLERANCE:
        raise BenchError(f"nnU-Net's copy of the network computes something else (logits differ by {logit_diff:.3g}); "
                         "the layer mapping in _nnunet_from_autoseg.py does not fit this network")

    inputs = tmp / "inputs"
    case_ids = link_inputs([args.input.resolve()], plans.num_channels, inputs, args.cases or None)
    out_ours, out_theirs = tmp / "pred_autoseg", tmp / "pred_nnunet"
    t = time.perf_counter()
    report = predict_folder(workdir, [inputs], out_ours, ModelChoice([configuration], folds=[args.fold]),
                            WindowSettings(mirroring=not args.no_mirroring), ComputeSettings(mixed_precision=False),
                            OutputOptions(report_files=False, postprocessing=False),
                            BatchOptions(workers=0, progress=False))
    ours_s = time.perf_counter() - t
    if report.failed:
        raise BenchError(f"autoseg predict failed on {report.failed[:3]}")
    env = nnunet_env(nnunet_bin, tmp)
    cmd = [str(nnunet_bin / "nnUNetv2_predict_from_modelfolder"), "-i", str(inputs), "-o", str(out_theirs),
           "-m", str(model), "-f", str(args.fold), "-chk", "checkpoint_final.pth", "-device", "cpu",
           "-npp", "1", "-nps", "1"] + (["--disable_tta"] if args.no_mirroring else [])
    t = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    theirs_s = time.perf_counter() - t
    if done.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    if not out_theirs.is_dir() or not any(out_theirs.iterdir()):
        raise BenchError(f"{' '.join(cmd)} wrote no prediction (did it find the inputs?):\n{done.stdout[-2000:]}"
                         f"{done.stderr[-2000:]}")
    print(f"predicted {len(case_ids)} case(s): autoseg {ours_s:.1f} s, nnUNetv2_predict_from_modelfolder "
          f"{theirs_s:.1f} s (from launch)\n")

    ending = segmentation_suffix(image_suffix(next(inputs.iterdir())))  # the file type predict writes for it
    rows = []
    header = f"  {'case':<24} {'same label':>11}  " + "  ".join(f"Dice {k:>3}" for k in labels)
    if args.labels:
        header += "   vs reference: " + "  ".join(f"{k} autoseg/nnU-Net" for k in labels)
    print(header)
    for case_id in case_ids:
        a, b = _read(out_ours / f"{case_id}{ending}"), _read(out_theirs / f"{case_id}{ending}")
        if a.shape != b.shape:
            raise BenchError(f"{case_id}: autoseg wrote shape {a.shape}, nnU-Net {b.shape}")
        row = {"case_id": case_id, **compare_labels(a, b, labels)}
        line = f"  {case_id:<24} {row['agreement']:>10.4%}  " + "  ".join(_fmt(row["dice"][str(k)]) for k in labels)
        if args.labels:
            ref = _read(args.labels / f"{case_id}{ending}")
            row["reference_dice"] = {"autoseg": compare_labels(a, ref, labels)["dice"],
                                     "nnunet": compare_labels(b, ref, labels)["dice"]}
            line += "   " + "  ".join(f"{_fmt(row['reference_dice']['autoseg'][str(k)])}/"
                                      f"{_fmt(row['reference_dice']['nnunet'][str(k)])}" for k in labels)
        print(line)
        rows.append(row)
    summary = {"agreement_min": min(r["agreement"] for r in rows),
               "agreement_mean": float(np.mean([r["agreement"] for r in rows])),
               "dice_min": min((d for r in rows for d in r["dice"].values() if d is not None), default=None)}
    if args.labels:
        for tool in ("autoseg", "nnunet"):
            summary[f"reference_dice_mean_{tool}"] = {
                str(k): float(np.mean([r["reference_dice"][tool][str(k)] for r in rows
                                       if r["reference_dice"][tool][str(k)] is not None])) for k in labels}
    print(f"\nsummary: {len(rows)} case(s); same label in {summary['agreement_mean']:.4%} of voxels on average "
          f"(lowest case {summary['agreement_min']:.4%}); lowest label Dice between the two "
          f"{_fmt(summary['dice_min'])}")
    if args.labels:
        print("mean Dice against the reference: " + ", ".join(
            f"label {k} autoseg {summary['reference_dice_mean_autoseg'][str(k)]:.4f} / nnU-Net "
            f"{summary['reference_dice_mean_nnunet'][str(k)]:.4f}" for k in labels))
    return {"machine": _machine.machine(), "workdir": str(workdir), "configuration": configuration,
            "fold": args.fold, "mirroring": not args.no_mirroring, "logit_max_abs_diff": logit_diff,
            "seconds": {"autoseg": ours_s, "nnunet": theirs_s}, "cases": rows, "summary": summary}


def _fmt(value: float | None) -> str:
    return "     -" if value is None else f"{value:.4f}"


if __name__ == "__main__":
    sys.exit(main())
