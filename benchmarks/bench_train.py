"""Seconds per training iteration of `autoseg train` on a planned workspace, split into the time
the network step takes and the time spent waiting for augmented batches.

    python benchmarks/bench_train.py WORKDIR [--config 3d_fullres] [--iters 20] [--workers 1]

Runs one epoch of `--iters` iterations with `--fold all` in a scratch copy of the workspace
(the preprocessed data is linked, not copied), so the workspace itself is untouched. The first
iterations include start-up (allocator, oneDNN kernel selection): `--warmup` of them are run in a
first epoch that is not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from autoseg.training.trainer import TrainingSettings, train_fold


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else platform.processor()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} logical cores, {gpu}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--config", default="3d_fullres")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--workers", type=int, default=None, help="augmentation workers (default: autoseg's)")
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        for name in ("plans.json", "dataset.json", "fingerprint.json"):
            shutil.copy(args.workdir / name, scratch / name)
        os.symlink((args.workdir / "preprocessed").resolve(), scratch / "preprocessed")
        common = dict(validate_at_end=False, device=args.device, checkpoint_every=10 ** 6)
        if args.workers is not None:
            common["num_workers"] = args.workers
        # A short warm-up run (oneDNN kernel selection, allocator) in this process, then the measured one.
        train_fold(scratch, args.config, "all", TrainingSettings(epochs=1, iters_per_epoch=args.warmup, **common),
                   progress=False)
        t = time.perf_counter()
        result = train_fold(scratch, args.config, "all", TrainingSettings(epochs=1, iters_per_epoch=args.iters, **common),
                            progress=False)
        wall = time.perf_counter() - t
    record = result["history"][-1]
    plan = json.loads((args.workdir / "plans.json").read_text())["configurations"][args.config]
    per_it = record["epoch_s"] / args.iters
    wait = record["data_wait_s"] / args.iters
    print(f"machine: {machine()}")
    print(f"plan: {args.config}, batch {plan['batch_size']}, patch {plan['patch_size']}, features {plan['features_per_stage']}")
    print(f"autoseg: {per_it:.2f} s/iteration over {args.iters} iterations "
          f"(network step {per_it - wait:.2f} s, waiting for data {wait:.2f} s); run wall {wall:.1f} s")
    print("bottleneck:", "data loading" if wait > 0.2 * per_it else "network step")


if __name__ == "__main__":
    main()
