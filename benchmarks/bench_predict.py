"""Seconds per case of `autoseg predict` with one fold and with several, mirroring on and off.

    python benchmarks/bench_predict.py WORKDIR -i INPUT [--folds 0] [--folds 0 1 2 3 4] [--cases N]

Each setting runs `predict_folder` into a fresh temporary folder in this process (the first
setting also pays torch's start-up) and prints wall seconds per case. With `--nnunet-cmd`, a
shell command that runs nnunetv2's predictor on the same inputs is timed the same way, and the
ratio is printed.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import tempfile
import time
from pathlib import Path

from autoseg.inference.inputs import discover_inputs
from autoseg.inference.predictor import predict_folder

from bench_train import machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("-i", "--input", type=Path, nargs="+", required=True)
    parser.add_argument("--config", default="3d_fullres")
    parser.add_argument("--folds", nargs="+", action="append", help="a fold set to time; repeat for several")
    parser.add_argument("--mirroring", choices=("on", "off", "both"), default="both")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--nnunet-cmd", help="shell command predicting the same inputs with nnunetv2 (timed once)")
    args = parser.parse_args()

    print(f"machine: {machine()}")
    fold_sets = args.folds or [["0"]]
    mirror = {"on": [True], "off": [False], "both": [True, False]}[args.mirroring]
    timings = {}
    for folds in fold_sets:
        for m in mirror:
            with tempfile.TemporaryDirectory() as out:
                t = time.perf_counter()
                report = predict_folder(args.workdir, args.input, Path(out), configurations=[args.config], folds=folds,
                                        mirroring=m, num_workers=args.workers, progress=False)
                wall = time.perf_counter() - t
            n = len(report.written)
            timings[(tuple(folds), m)] = wall / max(n, 1)
            print(f"autoseg: {len(folds)} fold(s) {','.join(folds)}, mirroring {'on' if m else 'off'}: "
                  f"{n} cases in {wall:.1f} s = {wall / max(n, 1):.2f} s/case ({len(report.failed)} failed)")
    if args.nnunet_cmd:
        t = time.perf_counter()
        subprocess.run(shlex.split(args.nnunet_cmd), check=True)
        wall = time.perf_counter() - t
        cases, _ = discover_inputs(args.input, 1)
        per_case = wall / max(len(cases), 1)
        print(f"nnunetv2: {len(cases)} cases in {wall:.1f} s = {per_case:.2f} s/case")
        first = next(iter(timings.values()))
        print(f"ratio nnunetv2 / autoseg (first autoseg setting): {per_case / first:.2f}")


if __name__ == "__main__":
    main()
