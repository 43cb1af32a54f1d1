"""CPU seconds per training batch of the augmentation, autoseg against nnU-Net v2, for a large 3D plan, and the
CPU cores that keep a GPU step of 0.1-0.3 s fed.

    python benchmarks/bench_augmentation.py [--patch 128 128 128] [--channels 2] [--labels 4] [--batch 2]
                                            [--batches 5] [--augment-interpolation cubic|linear]
                                            [--augment-label-interpolation nearest|linear] [--augment-scale-draw D]
                                            [--nnunet-venv /work/bench/nnunet_venv | --no-nnunet]

Both run their own default training transforms (spatial with rotation +-30 degrees and scaling, noise,
blur, brightness, contrast, low resolution, gamma, mirroring, deep-supervision targets) on random
data of their own read patch (autoseg's `training_patch_size`, nnU-Net's initial patch size) in one
process with one torch thread, as each runs in an augmentation worker; warm-up excluded. Random
data exercises every transform with its probabilities. `--augment-interpolation` sets autoseg's
image interpolation in the spatial transform (`autoseg train --augment-interpolation`: linear, its
default as nnU-Net 2.8.1's, or cubic), `--augment-label-interpolation` and `--augment-scale-draw` its label
interpolation and scale draw (as `autoseg train`). nnU-Net's side runs
`_nnunet_augmentation.py` in its venv. The cores a GPU needs: CPU seconds per batch / GPU seconds
per step (augmentation only; reading patches adds a little).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _machine import machine  # noqa: E402

DRIVER = Path(__file__).resolve().parent / "_nnunet_augmentation.py"
DEFAULT_NNUNET_VENV = Path("/work/bench/nnunet_venv")


def autoseg_seconds(patch: list[int], channels: int, labels: int, batch: int, batches: int,
                    scales: int = 5, interpolation: str = "linear", label_interpolation: str = "nearest",
                    scale_draw: str = "uniform") -> dict:
    import torch

    from autoseg.training.augmentation import (
        AUGMENT_INTERPOLATIONS,
        LABEL_INTERPOLATIONS,
        training_patch_size,
        training_transforms,
    )

    torch.set_num_threads(1)
    read = training_patch_size(patch)
    transforms = training_transforms(patch, mirror_axes=tuple(range(len(patch))),
                                     deep_supervision_scales=[[1.0 / 2 ** i] * len(patch) for i in range(scales)],
                                     image_order=AUGMENT_INTERPOLATIONS[interpolation],
                                     label_order=LABEL_INTERPOLATIONS[label_interpolation], scale_draw=scale_draw)
    rng = np.random.default_rng(0)
    data = rng.normal(size=(batch, channels, *read)).astype(np.float32)
    seg = rng.integers(0, labels + 1, size=(batch, 1, *read)).astype(np.int16)
    np.random.seed(0)
    transforms(data=data.copy(), seg=seg.copy())  # warm-up
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(batches):
        transforms(data=data.copy(), seg=seg.copy())
    return {"cpu_s_per_batch": (time.process_time() - cpu) / batches,
            "wall_s_per_batch": (time.perf_counter() - wall) / batches, "read_patch": read}


def nnunet_seconds(venv: Path, patch: list[int], channels: int, labels: int, batch: int, batches: int) -> dict | None:
    python = venv / "bin" / "python"
    if not python.is_file():
        return None
    command = [str(python), str(DRIVER), "--patch", *map(str, patch), "--channels", str(channels), "--labels",
               str(labels), "--batch", str(batch), "--batches", str(batches)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patch", type=int, nargs=3, default=[128, 128, 128])
    parser.add_argument("--channels", type=int, default=2)
    parser.add_argument("--labels", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--augment-interpolation", choices=("cubic", "linear"), default="linear",
                        help="autoseg's image interpolation in the spatial transform (default: %(default)s)")
    parser.add_argument("--augment-label-interpolation", choices=("nearest", "linear"), default="nearest",
                        help="autoseg's label interpolation in the spatial transform (default: %(default)s)")
    parser.add_argument("--augment-scale-draw", choices=("batchgenerators", "uniform"), default="uniform",
                        help="autoseg's scale draw in the spatial transform (default: %(default)s)")
    parser.add_argument("--nnunet-venv", type=Path, default=DEFAULT_NNUNET_VENV)
    parser.add_argument("--no-nnunet", action="store_true")
    args = parser.parse_args(argv)
    ours = autoseg_seconds(args.patch, args.channels, args.labels, args.batch, args.batches,
                           interpolation=args.augment_interpolation,
                           label_interpolation=args.augment_label_interpolation, scale_draw=args.augment_scale_draw)
    theirs = None if args.no_nnunet else nnunet_seconds(args.nnunet_venv, args.patch, args.channels, args.labels,
                                                         args.batch, args.batches)
    print(f"# {machine()}")
    print(f"patch {args.patch}, {args.channels} channels, {args.labels} labels, batch {args.batch}, "
          f"{args.batches} batches after one warm-up, one torch thread; autoseg's image interpolation "
          f"{args.augment_interpolation}, label interpolation {args.augment_label_interpolation}, scale draw "
          f"{args.augment_scale_draw}")
    rows = [("autoseg", ours)] + ([("nnunetv2", theirs)] if theirs else [])
    for name, r in rows:
        cores = ", ".join(f"{r['cpu_s_per_batch'] / step:.0f} cores for a {step:g} s step" for step in (0.1, 0.3))
        print(f"{name:9s} {r['cpu_s_per_batch']:.2f} CPU s per batch ({r['wall_s_per_batch']:.2f} s wall): {cores}")
    if theirs:
        print(f"ratio nnunetv2 / autoseg CPU s per batch: {theirs['cpu_s_per_batch'] / ours['cpu_s_per_batch']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
