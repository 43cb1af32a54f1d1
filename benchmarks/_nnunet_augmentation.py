"""Driver run in nnU-Net's venv by bench_augmentation.py: CPU seconds per batch of nnunetv2's own training
transforms (`nnUNetTrainer.get_training_transforms`) on random data of its initial patch size.

    python _nnunet_augmentation.py --patch 128 128 128 --channels 2 --labels 4 --batch 2 --batches 5

Prints one JSON line: cpu_s_per_batch, wall_s_per_batch, initial_patch_size.
"""

import argparse
import json
import time

import numpy as np
import torch
from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--patch", type=int, nargs=3, required=True)
    parser.add_argument("--channels", type=int, default=2)
    parser.add_argument("--labels", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--batches", type=int, default=5)
    parser.add_argument("--scales", type=int, default=5, help="deep-supervision outputs")
    args = parser.parse_args()
    torch.set_num_threads(1)  # as nnU-Net's augmentation workers
    rotation = (-30.0 / 360 * 2 * np.pi, 30.0 / 360 * 2 * np.pi)
    initial = [int(i) for i in get_patch_size(args.patch, rotation, rotation, rotation, (0.85, 1.25))]
    scales = [[1.0 / 2 ** i] * 3 for i in range(args.scales)]
    transforms = nnUNetTrainer.get_training_transforms(
        args.patch, rotation, scales, (0, 1, 2), False, use_mask_for_norm=[False] * args.channels,
        is_cascaded=False, foreground_labels=list(range(1, args.labels + 1)), regions=None, ignore_label=None)
    rng = np.random.default_rng(0)
    image = torch.from_numpy(rng.normal(size=(args.channels, *initial)).astype(np.float32))
    seg = torch.from_numpy(rng.integers(0, args.labels + 1, size=(1, *initial)).astype(np.int16))
    transforms(image=image.clone(), segmentation=seg.clone())  # warm-up
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(args.batches):
        for _ in range(args.batch):
            transforms(image=image.clone(), segmentation=seg.clone())
    print(json.dumps({"cpu_s_per_batch": (time.process_time() - cpu) / args.batches,
                      "wall_s_per_batch": (time.perf_counter() - wall) / args.batches, "initial_patch_size": initial}))


if __name__ == "__main__":
    main()
