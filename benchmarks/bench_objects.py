"""Object-level accuracy at an equal budget: arms of one 2D dataset (nnU-Net v2 layout) trained on the same
cases for the same iterations, predicted on held-out cases and scored with the object metrics.

    python benchmarks/bench_objects.py DATASET --test-cases em_018 em_019 ... --arms plain elastic
                                       [--iterations 125] [--epochs 5] [--batch-size 1] [--workers 1]
                                       [--seed 0] [--keep DIR] [--json FILE]
    python benchmarks/bench_objects.py DATASET --test-random 15 --arms semantic instances

Arms (each a fresh workspace; `autoseg plan`, `autoseg train --fold all`, `autoseg predict`,
`autoseg evaluate`):
- `plain`: the default plans, instance segmentation off.
- `elastic`: the same with `autoseg train --elastic` (the U-Net paper's elastic deformation).
- `semantic`: `autoseg plan --instances off`; its objects are the connected components of the label map.
- `instances`: `autoseg plan --instances on` (the dataset needs instancesTr/); its objects are the
  `<case>_instances` maps.

Printed per arm: training seconds, Dice of each label, and the object metrics `autoseg evaluate`
computes (membrane errors when a label is named membrane; mAP, F1, AJI, splits and merges against
instancesTr/). For a membrane label also the challenge's "maximal" Rand and pixel errors: the best
over membrane-probability thresholds 0.0-1.0 (the ISBI 2012 challenge scored submitted probability
maps so), which `evaluate` computes from `predict --save-probabilities`. With instance maps also the
reference's touching pairs and how many of them an arm merged into one object.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine  # noqa: E402

ARMS = ("plain", "elastic", "semantic", "instances")


class BenchError(Exception):
    pass


def case_ids(dataset: Path, ending: str) -> list[str]:
    return sorted(p.name[: -len(ending)] for p in (dataset / "labelsTr").glob(f"*{ending}"))


def split(dataset: Path, test: list[str], root: Path) -> tuple[Path, Path]:
    """Links: `root/train` (a dataset without the test cases) and `root/test/{images,labels,instances}`."""
    meta = json.loads((dataset / "dataset.json").read_text())
    ending = meta.get("file_ending", ".nii.gz")
    train, held = root / "train", root / "test"
    with_instances = (dataset / "instancesTr").is_dir()
    for folder in ("imagesTr", "labelsTr", *(["instancesTr"] if with_instances else [])):
        (train / folder).mkdir(parents=True, exist_ok=True)
    for folder in ("images", "labels", *(["instances"] if with_instances else [])):
        (held / folder).mkdir(parents=True, exist_ok=True)
    for case in case_ids(dataset, ending):
        images = sorted((dataset / "imagesTr").glob(f"{case}_[0-9][0-9][0-9][0-9]{ending}"))
        if case in test:
            links = [(i, held / "images") for i in images] + [(dataset / "labelsTr" / f"{case}{ending}",
                                                              held / "labels")]
            if with_instances:
                links.append((dataset / "instancesTr" / f"{case}{ending}", held / "instances"))
        else:
            links = [(i, train / "imagesTr") for i in images] + [(dataset / "labelsTr" / f"{case}{ending}",
                                                                  train / "labelsTr")]
            if with_instances:
                links.append((dataset / "instancesTr" / f"{case}{ending}", train / "instancesTr"))
        for source, folder in links:
            os.symlink(source.resolve(), folder / source.name)
    (train / "dataset.json").write_text(json.dumps({**meta, "numTraining": len(case_ids(dataset, ending)) - len(test)}))
    return train, held


def shrink_plans(work: Path) -> None:
    """A tiny network (for the smoke test): two stages of 4 and 8 features on 32 x 32 patches."""
    from autoseg import workspace

    plans = json.loads(workspace.plans_json(work).read_text())
    plans["configurations"]["2d"].update(patch_size=[32, 32], batch_size=2, features_per_stage=[4, 8],
                                         kernel_sizes=[[3, 3]] * 2, strides=[[1, 1], [2, 2]])
    workspace.plans_json(work).write_text(json.dumps(plans))


def merged_touching_pairs(pred: np.ndarray, ref: np.ndarray) -> tuple[int, int]:
    """(touching pairs of reference objects, how many of them one predicted object holds both of): each reference
    object is assigned the predicted object overlapping most of it."""
    from autoseg.preprocessing.instance_targets import touching_object_pairs

    pairs = touching_object_pairs(ref)
    inside = ref > 0
    joint, counts = np.unique(np.stack([ref[inside].astype(np.int64), pred[inside].astype(np.int64)]), axis=1,
                              return_counts=True)
    owners: dict[int, tuple[int, int]] = {}
    for (r, p), n in zip(joint.T, counts):
        if p > 0 and n > owners.get(int(r), (0, 0))[1]:
            owners[int(r)] = (int(p), int(n))
    merged = sum(1 for i, j in pairs if i in owners and j in owners and owners[i][0] == owners[j][0])
    return len(pairs), merged


def run_arm(arm: str, train: Path, held: Path, work: Path, args) -> dict:
    from autoseg.cli import main as autoseg
    from autoseg.dataset.image_io import read_image

    def step(name: str, argv: list[str]) -> float:
        started = time.perf_counter()
        if autoseg(argv) != 0:
            raise BenchError(f"autoseg {name} failed for arm {arm}: autoseg {' '.join(argv)}")
        return time.perf_counter() - started

    instances = "on" if arm == "instances" else "off"
    seconds = {"plan": step("plan", ["plan", str(train), "-o", str(work), "--configs", "2d", "--workers", "1",
                                     "--instances", instances])}
    if args.tiny:
        shrink_plans(work)
    iters = max(1, args.iterations // args.epochs)
    seconds["train"] = step("train", ["train", str(work), "--config", "2d", "--fold", "all", "--epochs",
                                      str(args.epochs), "--iters-per-epoch", str(iters), "--val-iters", "1",
                                      "--no-validation", "--seed", str(args.seed), "--workers", str(args.workers),
                                      *(["--elastic"] if arm == "elastic" else []),
                                      *(["--batch-size", str(args.batch_size)] if args.batch_size else [])])
    pred = work / "pred"
    seconds["predict"] = step("predict", ["predict", str(work), "--config", "2d", "--folds", "all", "-i",
                                          str(held / "images"), "-o", str(pred), "--no-report",
                                          *(["--save-probabilities"] if args.membrane is not None else [])])
    step("evaluate", ["evaluate", str(pred), str(held / "labels"), "--workers", "1",
                      *(["--instances", str(held / "instances")] if (held / "instances").is_dir() else [])])
    summary = json.loads((pred / "summary.json").read_text())
    result = {"seconds": seconds, "iterations": iters * args.epochs,
              "dice": {k: v["dice"] for k, v in summary["mean"].items()},
              "objects": (summary.get("object_metrics") or {}).get("mean", {})}
    if (held / "instances").is_dir():
        touching = merged = 0
        for ref_path in sorted((held / "instances").iterdir()):
            ref = read_image(ref_path)[0].astype(np.int64)
            case = ref_path.name.split(".")[0]
            own = next(pred.glob(f"{case}_instances.*"), None)
            if own is not None:
                objects = read_image(own)[0].astype(np.int64)
            else:
                from autoseg.evaluation.objects import connected_objects
                objects = connected_objects(read_image(next(pred.glob(f"{case}.*")))[0])
            t, m = merged_touching_pairs(objects, ref)
            touching, merged = touching + t, merged + m
        result["objects"].update({"touching_pairs": touching, "touching_pairs_merged": merged})
    return result


def format_table(results: dict[str, dict]) -> str:
    arms = list(results)
    keys = list(dict.fromkeys(k for r in results.values() for k in r["objects"]))
    labels = list(dict.fromkeys(k for r in results.values() for k in r["dice"]))
    rows = [("train s", [f"{r['seconds']['train']:.0f}" for r in results.values()])]
    rows += [(f"Dice {k}", [_fmt(results[a]["dice"].get(k)) for a in arms]) for k in labels]
    rows += [(k, [_fmt(results[a]["objects"].get(k)) for a in arms]) for k in keys]
    width = max(len(name) for name, _ in rows)
    lines = [" " * width + "  " + "  ".join(f"{a:>10}" for a in arms)]
    lines += [f"{name:<{width}}  " + "  ".join(f"{v:>10}" for v in values) for name, values in rows]
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None:
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.4f}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", type=Path, help="a 2D dataset in nnU-Net v2 layout (instancesTr/ for instances)")
    test = parser.add_mutually_exclusive_group(required=True)
    test.add_argument("--test-cases", nargs="+", metavar="CASE", help="the held-out cases")
    test.add_argument("--test-random", type=int, metavar="K", help="hold out K cases drawn with --seed")
    parser.add_argument("--arms", nargs="+", choices=ARMS, required=True, help="arms to run, side by side")
    parser.add_argument("--iterations", type=int, default=125, help="training iterations per arm (default: 125)")
    parser.add_argument("--epochs", type=int, default=5, help="epochs the iterations are split into (default: 5)")
    parser.add_argument("--batch-size", type=int, default=0, help="batch size (default: 0, the plan's)")
    parser.add_argument("--workers", type=int, default=1, help="augmentation workers (default: 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the case draw and of training (default: 0)")
    parser.add_argument("--tiny", action="store_true", help="a tiny network (smoke test only)")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="work in DIR (kept) instead of a temporary folder")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        meta = json.loads((args.dataset / "dataset.json").read_text())
        ending = meta.get("file_ending", ".nii.gz")
        ids = case_ids(args.dataset, ending)
        test = args.test_cases or sorted(random.Random(args.seed).sample(ids, args.test_random))
        unknown = [c for c in test if c not in ids]
        if unknown:
            raise BenchError(f"--test-cases: {', '.join(unknown)} not in {args.dataset / 'labelsTr'}")
        from autoseg.evaluation.objects import membrane_label
        args.membrane = membrane_label({str(v): k for k, v in meta["labels"].items()})
        root = Path(tempfile.mkdtemp(prefix="bench_objects_")) if args.keep is None else args.keep
        root.mkdir(parents=True, exist_ok=True)
        train, held = split(args.dataset, test, root / "data")
        results = {}
        for arm in args.arms:
            results[arm] = run_arm(arm, train, held, root / arm, args)
    except BenchError as exc:
        print(f"bench_objects: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep is None and "root" in locals():
            shutil.rmtree(root, ignore_errors=True)
    print(f"# {machine()}")
    print(f"# {args.dataset.name}: {len(ids) - len(test)} training, {len(test)} held-out cases ({', '.join(test)}); "
          f"{results[args.arms[0]]['iterations']} iterations per arm, batch {args.batch_size or 'of the plan'}")
    print(format_table(results))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "test_cases": test, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
