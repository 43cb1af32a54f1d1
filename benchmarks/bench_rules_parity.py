"""Training-time rules against nnunetv2's own code on the same random inputs: where patches go, which
voxels foreground oversampling may start from, and which postprocessing is chosen.

    python benchmarks/bench_rules_parity.py [--boxes N] [--trials N] [--seed S] [--json OUT]
                                            [--nnunet-venv /work/bench/nnunet_venv/bin]

Each part draws its inputs from `--seed`, runs autoseg's function here and nnU-Net's in nnunetv2's
venv (benchmarks/_nnunet_rules.py), and prints how many of them agree exactly:

- patch placement (`autoseg.training.patch_sampling` against nnU-Net's `nnUNetDataLoader.get_bbox`):
  for `--boxes` random (volume shape, read patch, final patch) triples, the range a random patch's
  lower corner is drawn from, and the corner of a patch forced onto one voxel anywhere in the volume,
  cases smaller than the patch included;
- foreground locations (`autoseg.preprocessing.preprocess.sample_class_locations` against
  `DefaultPreprocessor._sample_foreground_locations`): the same coordinates in the same order for
  label maps of 30 to 2 million voxels per label, with -1 outside the mask, and one with an ignore
  label, whose annotated voxels both sample for random patches;
- largest component (`autoseg.postprocessing.keep_largest_component` against acvl_utils'
  `remove_all_but_largest_component`), ties included;
- the postprocessing decision (`autoseg.postprocessing.decide_postprocessing` against
  `determine_postprocessing` on NIfTI folders): `--trials` sets of four predictions with spurious
  islands, mislabelled parts and missing parts, and the rules each tool adopts.

Needs nnunetv2 in its own venv (benchmarks/README.md says how); without it the script stops.
"""

from __future__ import annotations

import argparse
import json
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
DRIVER = Path(__file__).resolve().parent / "_nnunet_rules.py"


def make_inputs(boxes: int, trials: int, seed: int) -> dict[str, np.ndarray]:
    """Every input of both tools, as the arrays written to the driver's .npz."""
    rng = np.random.default_rng(seed)
    final = rng.integers(1, 65, size=(boxes, 3))
    read = final + rng.integers(0, 21, size=(boxes, 3))
    shape = rng.integers(1, 81, size=(boxes, 3))
    voxel = np.where(np.arange(boxes)[:, None] % 2 == 0, -1, (rng.random((boxes, 3)) * shape).astype(int))
    inputs = {"box_shape": shape, "box_read": read, "box_final": final, "box_voxel": voxel}

    big = np.zeros((40, 250, 250), np.int8)
    big[:, :, :200] = 1                      # 2,000,000 voxels: the 1% rule
    big[:10, :, 200:] = 2                    # 125,000 voxels: the 10,000 cap
    big[-1, -1, -30:] = 3                    # 30 voxels: all of them
    big[20:, :5, 200:] = -1
    small = rng.integers(-1, 4, size=(12, 30, 31)).astype(np.int8)
    sparse = rng.integers(0, 3, size=(8, 40, 44)).astype(np.int8)  # labels 0-2, 3 = ignore (unannotated)
    sparse[:, 10:30] = 3
    sparse[:2] = -1
    inputs.update({"seg_0": big, "seg_1": small, "seg_2": (rng.random((1, 120, 90)) > 0.4).astype(np.int8) * 2,
                   "seg_3": sparse, "ignore_seg_3": np.array(3)})

    for i in range(12):
        mask = rng.random((14, 15, 16) if i % 2 else (40, 41)) > 0.8
        if i % 3 == 0:  # two equally large cubes apart from the rest: a tie for the largest
            mask[:] = False
            mask[(slice(0, 3),) * mask.ndim] = True
            mask[(slice(6, 9),) * mask.ndim] = True
            mask[(slice(11, 12),) * mask.ndim] = True
        inputs[f"mask_{i:02d}"] = mask

    for trial in range(trials):
        for case in range(4):
            ref = np.zeros((24, 24, 24), np.uint8)
            ref[3:12, 3:12, 3:12] = 1
            ref[5:9, 5:9, 12:15] = 2
            if rng.random() < 0.5:
                ref[16:20, 16:20, 16:20] = 1 if rng.random() < 0.5 else 2  # a true second part
            pred = ref.copy()
            for _ in range(int(rng.integers(0, 3))):  # spurious islands of a random label and size
                corner, size = rng.integers(0, 20, 3), rng.integers(1, 4, 3)
                pred[tuple(slice(c, c + s) for c, s in zip(corner, size))] = int(rng.integers(1, 3))
            if rng.random() < 0.3:
                pred[16:20, 16:20, 16:20] = int(rng.integers(0, 3))  # the second part missed or mislabelled
            if rng.random() < 0.3:
                pred[3:5, 3:12, 3:12] = 0  # a missing slab
            inputs[f"pred_{trial:03d}_{case}"] = pred
            inputs[f"ref_{trial:03d}_{case}"] = ref
        inputs[f"labels_{trial:03d}"] = np.array([1, 2])
    return inputs


def autoseg_results(inputs: dict[str, np.ndarray]) -> dict:
    """The same four parts as the driver's output, computed by autoseg."""
    from autoseg.postprocessing import decide_postprocessing, keep_largest_component
    from autoseg.preprocessing.preprocess import sample_class_locations
    from autoseg.training.patch_sampling import lower_corner_range, sample_patch_box

    boxes = []
    for shape, read, final, voxel in zip(inputs["box_shape"], inputs["box_read"], inputs["box_final"],
                                         inputs["box_voxel"]):
        if voxel[0] < 0:
            boxes.append({"range": [list(lower_corner_range(int(s), int(r), int(f)))
                                    for s, r, f in zip(shape, read, final)]})
        else:
            lower, _ = sample_patch_box(shape, read, np.random.default_rng(0), 1, {1: voxel[None]},
                                        final_patch_size=final)
            boxes.append({"forced": lower})
    locations = [{label: coords.tolist() for label, coords in sample_class_locations(
                      inputs[k], int(inputs[f"ignore_{k}"]) if f"ignore_{k}" in inputs else None).items()}
                 for k in sorted(k for k in inputs if k.startswith("seg_"))]
    components = [np.flatnonzero(keep_largest_component(inputs[k])).tolist()
                  for k in sorted(k for k in inputs if k.startswith("mask_"))]
    decisions = []
    for trial in sorted({k.split("_")[1] for k in inputs if k.startswith("pred_")}):
        cases = [(inputs[f"pred_{trial}_{c}"], inputs[f"ref_{trial}_{c}"]) for c in range(4)]
        rules = decide_postprocessing(cases, [int(v) for v in inputs[f"labels_{trial}"]])
        decisions.append({k: rules[k] for k in ("foreground_largest_component", "largest_component_labels")})
    return {"boxes": boxes, "locations": locations, "components": components, "postprocessing": decisions}


def compare(ours: dict, theirs: dict) -> dict:
    """Per part: how many items agree exactly, out of how many, and the first few that differ."""
    report = {}
    for part in ("boxes", "locations", "components", "postprocessing"):
        a, b = ours[part], theirs[part]
        same = [i < len(a) and i < len(b) and json.dumps(a[i], sort_keys=True) == json.dumps(b[i], sort_keys=True)
                for i in range(max(len(a), len(b)))]
        differing = [i for i, agrees in enumerate(same) if not agrees]
        report[part] = {"agree": max(len(a), len(b)) - len(differing), "total": max(len(a), len(b)),
                        "first_differences": [{"index": i, "autoseg": a[i] if i < len(a) else None,
                                               "nnunet": b[i] if i < len(b) else None} for i in differing[:3]]}
    return report


def run_nnunet(nnunet_bin: Path, inputs: dict[str, np.ndarray], tmp: Path) -> dict:
    np.savez(tmp / "inputs.npz", **inputs)
    work = tmp / "nnunet"
    work.mkdir()
    cmd = [str(nnunet_bin / "python"), str(DRIVER), str(tmp / "inputs.npz"), str(tmp / "nnunet.json"), str(work)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=nnunet_env(nnunet_bin, tmp))
    if done.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}{done.stderr[-3000:]}")
    return json.loads((tmp / "nnunet.json").read_text())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--boxes", type=int, default=2000, help="random patch placements to compare (default: 2000)")
    parser.add_argument("--trials", type=int, default=20,
                        help="postprocessing decisions to compare, four cases each (default: 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default: 0)")
    parser.add_argument("--nnunet-venv", default=DEFAULT_NNUNET_VENV, help="nnunetv2's venv or its bin folder")
    parser.add_argument("--json", type=Path, help="also write the comparison to this file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        nnunet_bin = require_nnunet_bin(args.nnunet_venv)
        inputs = make_inputs(args.boxes, args.trials, args.seed)
        start = time.perf_counter()
        ours = autoseg_results(inputs)
        with tempfile.TemporaryDirectory(prefix="bench_rules_parity_") as tmp:
            theirs = run_nnunet(nnunet_bin, inputs, Path(tmp))
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    report = compare(ours, theirs)
    print(f"machine: {_machine.machine()}")
    print(f"inputs: seed {args.seed}, {args.boxes} patch placements, {args.trials} postprocessing trials "
          f"({time.perf_counter() - start:.0f} s)")
    for part, result in report.items():
        print(f"{part:15s} {result['agree']}/{result['total']} identical")
        for difference in result["first_differences"]:
            print(f"    differs at {difference['index']}: autoseg {str(difference['autoseg'])[:200]} "
                  f"nnunet {str(difference['nnunet'])[:200]}")
    decisions = ours["postprocessing"]
    print(f"postprocessing adopted by autoseg: the foreground rule in "
          f"{sum(d['foreground_largest_component'] for d in decisions)} of {len(decisions)} trials, a label rule in "
          f"{sum(bool(d['largest_component_labels']) for d in decisions)}")
    if args.json:
        args.json.write_text(json.dumps({"machine": _machine.machine(), "seed": args.seed, **report}, indent=2))
    return 0 if all(r["agree"] == r["total"] for r in report.values()) else 2


if __name__ == "__main__":
    sys.exit(main())
