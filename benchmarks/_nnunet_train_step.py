"""Driver run with nnunetv2's own Python by bench_train.py, bench_predict.py and bench_accuracy.py; not part of autoseg.

Builds nnU-Net v2's standard `nnUNetTrainer` for one dataset, configuration and fold on the CPU,
runs its `on_train_start` (network, optimizer, data augmentation workers), times `--warmup` and then
`--iters` calls of its own `train_step(next(self.dataloader_train))`, and ends with its
`on_train_end`, which writes `checkpoint_final.pth` and stops the augmentation workers. With
`--iters 0 --warmup 0` it only writes that checkpoint (initial weights), a model folder for timing
`nnUNetv2_predict`.

With `--epochs E` it instead trains: the trainer's own `run_training()` with `num_epochs = E`,
`num_iterations_per_epoch = --iters` and `num_val_iterations_per_epoch = --val-iters` set on the
instance before it initializes (its learning-rate schedule is built from `num_epochs` then), so no
trainer subclass is needed. bench_accuracy.py uses this for an equal-budget run.

The nnUNet_raw, nnUNet_preprocessed and nnUNet_results variables must be set by the caller, and
nnUNet_n_proc_DA for the number of augmentation workers. The figures are written as JSON to --json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from pathlib import Path


def _child_pids() -> list[int]:
    """Live (not zombie) child processes of this one, read from /proc."""
    me = os.getpid()
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me and fields[0] != "Z":
            children.append(int(stat.parent.name))
    return children


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset-name", required=True, help="e.g. Dataset004_Hippocampus")
    parser.add_argument("--configuration", default="3d_fullres")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=0,
                        help="train with run_training() for this many epochs of --iters iterations (0: time steps)")
    parser.add_argument("--val-iters", type=int, default=50, help="validation batches per epoch with --epochs")
    parser.add_argument("--batch-size", type=int, default=0,
                        help="train with this batch size instead of the plans' (written into the plans it reads)")
    parser.add_argument("--plans-name", default="nnUNetPlans",
                        help="the plans file to train with (default: %(default)s)")
    args = parser.parse_args()

    t_start = time.perf_counter()
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    folder = Path(nnUNet_preprocessed) / args.dataset_name
    plans = load_json(str(folder / f"{args.plans_name}.json"))
    if args.batch_size:
        plans["configurations"][args.configuration]["batch_size"] = args.batch_size
    plans["continue_training"] = False  # what run_training's get_trainer_from_args sets for a new run
    dataset_json = load_json(str(folder / "dataset.json"))
    trainer = nnUNetTrainer(plans, args.configuration, args.fold, dataset_json, device=torch.device("cpu"))
    if args.epochs:
        _train(trainer, args, time.perf_counter() - t_start)
        return
    trainer.initialize()
    trainer.on_train_start()
    setup_s = time.perf_counter() - t_start
    waits, steps, losses = [], [], []
    try:
        trainer.on_train_epoch_start()
        for i in range(args.warmup + args.iters):
            t0 = time.perf_counter()
            batch = next(trainer.dataloader_train)
            t1 = time.perf_counter()
            losses.append(float(trainer.train_step(batch)["loss"]))
            t2 = time.perf_counter()
            if i >= args.warmup:
                waits.append(t1 - t0)
                steps.append(t2 - t1)
    finally:
        trainer.on_train_end()
    # on_train_end calls _finish on both augmenters; check that none of their workers is left.
    deadline = time.perf_counter() + 10
    while multiprocessing.active_children() and time.perf_counter() < deadline:
        time.sleep(0.1)
    left = _child_pids()
    checkpoint = Path(trainer.output_folder) / "checkpoint_final.pth"
    record = {
        "iters": args.iters, "warmup": args.warmup,
        "wait_s": waits, "step_s": steps, "losses": losses,
        "setup_s": setup_s,
        "batch_size": trainer.batch_size,
        "patch_size": list(trainer.configuration_manager.patch_size),
        "oversample_foreground_percent": trainer.oversample_foreground_percent,
        "augmenter": type(trainer.dataloader_train).__name__,
        "n_proc_DA": os.environ.get("nnUNet_n_proc_DA"),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "checkpoint": str(checkpoint) if checkpoint.is_file() else None,
        "model_folder": str(trainer.output_folder_base),
        "children_left": left,
    }
    args.json.write_text(json.dumps(record, indent=1))


def _train(trainer, args: argparse.Namespace, setup_s: float) -> None:
    """A shortened standard training run: run_training() with the epoch and iteration counts set."""
    import torch

    trainer.num_epochs = args.epochs
    trainer.num_iterations_per_epoch = args.iters
    trainer.num_val_iterations_per_epoch = args.val_iters
    t = time.perf_counter()
    trainer.run_training()
    train_s = time.perf_counter() - t
    checkpoint = Path(trainer.output_folder) / "checkpoint_final.pth"
    args.json.write_text(json.dumps({
        "epochs": args.epochs, "iters_per_epoch": args.iters, "val_iters": args.val_iters, "train_s": train_s,
        "setup_s": setup_s, "batch_size": trainer.batch_size,
        "patch_size": list(trainer.configuration_manager.patch_size), "n_proc_DA": os.environ.get("nnUNet_n_proc_DA"),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "checkpoint": str(checkpoint) if checkpoint.is_file() else None,
        "model_folder": str(trainer.output_folder_base), "children_left": _child_pids()}, indent=1))


if __name__ == "__main__":
    main()
