"""Sparse annotation with the ignore label: the same cases trained with full labels, with labels on a
few slices per case (the rest marked `ignore`), and with those few slices but the rest left as
background (what a user without an ignore label would do), then scored on the same held-out cases.

    python benchmarks/bench_sparse_labels.py DATASET [--cases N] [--test-cases M] [--slices K]
                                             [--configuration 2d] [--batch-size B] [--iterations I]
                                             [--epochs E] [--workers W] [--seed S] [--keep DIR] [--json OUT]

DATASET is a Decathlon-layout dataset (Task04_Hippocampus in ../shared/datasets). `--cases` cases
drawn with `--seed` train, `--test-cases` others are the held-out set. Each arm writes its own
dataset folder (links to the images, label files of its own) and runs `autoseg plan --configs C`,
`autoseg train --fold all` for I iterations (E epochs), `autoseg predict` and `autoseg evaluate`
against the full labels of the held-out cases. The sparse arms keep K slices per case along the
first array axis, evenly spaced over the slices that hold a structure; the ignore arm marks every
other voxel `ignore` (the highest label id), the background arm leaves it 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _machine  # noqa: E402

ARMS = ("full", "sparse_ignore", "sparse_background")


class BenchError(Exception):
    """Bad arguments or a failed step; printed without a traceback."""


def kept_slices(label: np.ndarray, k: int) -> list[int]:
    """K slice indices along axis 0, evenly spaced over the slices holding a structure (all slices if none)."""
    holding = np.flatnonzero(label.reshape(label.shape[0], -1).any(axis=1))
    candidates = holding if len(holding) else np.arange(label.shape[0])
    picks = np.linspace(0, len(candidates) - 1, num=min(k, len(candidates)))
    return sorted({int(candidates[int(round(p))]) for p in picks})


def sparse_label(label: np.ndarray, k: int, fill: int) -> np.ndarray:
    """`label` with only K slices kept; every other voxel set to `fill` (the ignore id, or 0)."""
    out = np.full_like(label, fill)
    keep = kept_slices(label, k)
    out[keep] = label[keep]
    return out


def make_arm(dataset: Path, meta: dict, train: list[dict], arm: str, k: int, root: Path) -> tuple[Path, float]:
    """The arm's dataset folder; returns it and the fraction of the training voxels that are annotated."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    labels = {str(k_): v for k_, v in meta["labels"].items()}
    ignore = len(labels)
    if arm == "sparse_ignore":
        labels[str(ignore)] = "ignore"
    annotated = total = 0
    for entry in train:
        image, label_path = (dataset / entry["image"]).resolve(), (dataset / entry["label"]).resolve()
        os.symlink(image, root / "imagesTr" / image.name)
        target = root / "labelsTr" / label_path.name
        if arm == "full":
            os.symlink(label_path, target)
            continue
        source = sitk.ReadImage(str(label_path))
        array = sitk.GetArrayFromImage(source)
        sparse = sparse_label(array, k, ignore if arm == "sparse_ignore" else 0)
        annotated += int(np.count_nonzero(sparse != ignore)) if arm == "sparse_ignore" else len(
            kept_slices(array, k)) * int(np.prod(array.shape[1:]))
        total += array.size
        written = sitk.GetImageFromArray(sparse.astype(array.dtype))
        written.CopyInformation(source)
        sitk.WriteImage(written, str(target))
    (root / "dataset.json").write_text(json.dumps({**meta, "labels": labels, "numTraining": len(train),
                                                   "training": [{"image": f"./imagesTr/{Path(e['image']).name}",
                                                                 "label": f"./labelsTr/{Path(e['label']).name}"}
                                                                for e in train], "test": []}))
    return root, (annotated / total if total else 1.0)


def run_arm(root: Path, work: Path, test_dir: Path, ref_dir: Path, args) -> dict:
    from autoseg.cli import main as autoseg

    def step(name: str, argv: list[str]) -> float:
        started = time.perf_counter()
        if autoseg(argv) != 0:
            raise BenchError(f"autoseg {name} failed for {root.name}: {' '.join(argv)}")
        return time.perf_counter() - started

    seconds = {"plan": step("plan", ["plan", str(root), "-o", str(work), "--configs", args.configuration,
                                     "--workers", str(args.workers)])}
    iters = max(1, args.iterations // args.epochs)
    seconds["train"] = step("train", ["train", str(work), "--config", args.configuration, "--fold", "all",
                                      "--epochs", str(args.epochs), "--iters-per-epoch", str(iters),
                                      "--no-validation", "--seed", str(args.seed), "--workers", str(args.workers),
                                      *(["--batch-size", str(args.batch_size)] if args.batch_size else [])])
    seconds["predict"] = step("predict", ["predict", str(work), "--config", args.configuration, "--folds", "all",
                                          "-i", str(test_dir), "-o", str(work / "pred"), "--no-report"])
    step("evaluate", ["evaluate", str(work / "pred"), str(ref_dir), "--workers", "1"])
    summary = json.loads((work / "pred" / "summary.json").read_text())
    return {"seconds": seconds, "dice": {k: v["dice"] for k, v in summary["mean"].items()},
            "mean_dice": summary["foreground_mean"]["dice"], "iterations": iters * args.epochs}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path, help="a Decathlon-layout dataset folder (dataset.json with 'training')")
    parser.add_argument("--cases", type=int, default=60, help="training cases (default: 60)")
    parser.add_argument("--test-cases", type=int, default=20, help="held-out cases (default: 20)")
    parser.add_argument("--slices", type=int, default=3,
                        help="labelled slices per case in the sparse arms (default: 3)")
    parser.add_argument("--configuration", default="2d", help="configuration to train (default: 2d)")
    parser.add_argument("--batch-size", type=int, default=8, help="batch size (default: 8; 0: the plan's)")
    parser.add_argument("--iterations", type=int, default=500, help="training iterations per arm (default: 500)")
    parser.add_argument("--epochs", type=int, default=5, help="epochs the iterations are split into (default: 5)")
    parser.add_argument("--workers", type=int, default=2, help="processes and augmentation workers (default: 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the case draw and of training (default: 0)")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"arms to run (default: {','.join(ARMS)})")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="work in DIR (kept) instead of a temporary folder")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    arms = [a for a in args.arms.split(",") if a]
    try:
        if any(a not in ARMS for a in arms):
            raise BenchError(f"--arms: choose from {', '.join(ARMS)}")
        meta = json.loads((args.dataset / "dataset.json").read_text())
        entries = [e for e in meta.get("training", []) if e.get("label")]
        if len(entries) < args.cases + args.test_cases:
            raise BenchError(f"{args.dataset}: {len(entries)} labelled cases, fewer than --cases + --test-cases")
        order = np.random.default_rng(args.seed).permutation(len(entries))
        train = [entries[i] for i in order[:args.cases]]
        test = [entries[i] for i in order[args.cases:args.cases + args.test_cases]]
        with tempfile.TemporaryDirectory(prefix="bench_sparse_") as tmp:
            base = args.keep or Path(tmp)
            test_dir, ref_dir = base / "test_images", base / "test_labels"
            test_dir.mkdir(parents=True, exist_ok=True)
            ref_dir.mkdir(parents=True, exist_ok=True)
            for entry in test:
                for key, folder in (("image", test_dir), ("label", ref_dir)):
                    path = (args.dataset / entry[key]).resolve()
                    if not (folder / path.name).exists():
                        os.symlink(path, folder / path.name)
            results = {}
            for arm in arms:
                root, annotated = make_arm(args.dataset, meta, train, arm, args.slices, base / f"data_{arm}")
                results[arm] = {"annotated_fraction": annotated,
                                **run_arm(root, base / f"work_{arm}", test_dir, ref_dir, args)}
    except (BenchError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"machine: {_machine.machine()}")
    print(f"{args.dataset.name}: {args.cases} training cases, {args.test_cases} held out, {args.configuration}, "
          f"batch {args.batch_size or 'of the plan'}, seed {args.seed}; sparse arms keep {args.slices} slices per case")
    print(f"{'arm':<18} {'annotated':>9} {'iterations':>10} {'train s':>8}  Dice per label, mean")
    for arm, r in results.items():
        dice = ", ".join(f"{k} {v:.4f}" for k, v in r["dice"].items() if v is not None)
        print(f"{arm:<18} {r['annotated_fraction']:>9.1%} {r['iterations']:>10} {r['seconds']['train']:>8.0f}  "
              f"{dice}, mean {r['mean_dice']:.4f}")
    if args.json:
        args.json.write_text(json.dumps({"machine": _machine.machine(), "args": {k: str(v) for k, v in
                                                                                vars(args).items()},
                                         "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
