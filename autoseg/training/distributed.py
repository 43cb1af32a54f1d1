"""Data-parallel training: one process per device, gradients averaged by torch's DistributedDataParallel.

A run is distributed when torch.distributed's process group is initialized, either by `spawn`
(`autoseg train --gpus N`, one machine) or after `torchrun` started this process (`launch` reads
torchrun's RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT). NCCL joins CUDA devices,
gloo joins CPU processes. Every function here also works in a single process (rank 0 of 1), so the
training loop calls them unconditionally. docs/distributed.md shows the launch commands.
"""

from __future__ import annotations

import logging
import os
import pickle
import socket
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_autograd
from torch.nn.parallel import DistributedDataParallel

from autoseg.errors import AutosegError

log = logging.getLogger(__name__)

TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(AutosegError):
    """A distributed launch that cannot work (too few devices, a batch smaller than the ranks, a rank that failed)."""


def torchrun_launched() -> bool:
    """Whether torchrun (or another launcher setting its variables) started this process."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """This process's index on its machine, which picks its GPU."""
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


def is_main() -> bool:
    """Rank 0 alone logs, plots, validates and writes checkpoints."""
    return rank() == 0


def backend_for(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def init_process_group(device_type: str) -> None:
    """Join the group described by the environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT)."""
    if device_type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend_for(device_type))


def destroy_process_group() -> None:
    if is_distributed():
        dist.destroy_process_group()


def process_device(device: torch.device) -> torch.device:
    """This process's device: cuda:LOCAL_RANK in a distributed CUDA run, else `device` unchanged."""
    if is_distributed() and device.type == "cuda":
        return torch.device("cuda", local_rank())
    return device


def batch_share(global_batch: int, oversample_foreground: float, rank: int, world_size: int) -> tuple[int, float]:
    """This rank's part of the plan's batch, and its foreground fraction, so the global batch is unchanged.

    The batch is split as evenly as possible (lower ranks take the remainder). A rank forces foreground
    in exactly those of its samples whose index in the global batch a single process would force
    (`PatchLoader.is_forced`: the last `B - round(B * (1 - oversample))`), so the global fraction holds.
    """
    if global_batch < world_size:
        raise DistributedError(f"the plan's batch size {global_batch} cannot be split over {world_size} processes; "
                               f"use at most {global_batch} devices (or plan a larger batch)")
    sizes = [global_batch // world_size + (1 if r < global_batch % world_size else 0) for r in range(world_size)]
    first, size = sum(sizes[:rank]), sizes[rank]
    first_forced = round(global_batch * (1 - oversample_foreground)) if oversample_foreground > 0 else global_batch
    forced = max(0, first + size - max(first, first_forced))
    return size, forced / size


def rank_seed(seed: int) -> int:
    """A data seed of its own for each rank; rank 0 keeps `seed`, so a one-process run is unchanged."""
    return seed + 7919 * rank()


def wrap(network: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around `network` (which broadcasts rank 0's weights), or `network` alone.

    Every parameter that requires a gradient must get one in each step (freeze the others first).
    Gradients live in the communication buckets, which keeps their memory layout (channels_last)
    and saves a copy.
    """
    if not is_distributed():
        return network
    # 1x1x1 kernels in channels_last have strides that differ only along size-1 axes: the same memory layout.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides", category=UserWarning)
    return DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda" else None,
                                   gradient_as_bucket_view=True)


def sum_with_gradient(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of `tensor` over the ranks, differentiable: each rank's gradient reaches every rank's input.

    Used for batch Dice's terms so the Dice covers the global batch; since every rank then holds the
    same loss and DistributedDataParallel averages over the ranks, the gradients equal a single
    process's on the whole batch.
    """
    if not is_distributed():
        return tensor
    return torch.stack(dist_autograd.all_gather(tensor)).sum(0)


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_over_ranks(values: np.ndarray | float) -> np.ndarray:
    """Element-wise sum over the ranks (float64), for counts and losses that are not differentiated."""
    array = np.asarray(values, dtype=np.float64)
    if not is_distributed():
        return array
    tensor = torch.from_numpy(array.copy()).to(_collective_device())
    dist.all_reduce(tensor)
    return tensor.cpu().numpy()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def main_first(fn: Callable[..., Any], *args) -> Any:
    """Call fn on rank 0, then on the other ranks: for work that writes a file the others then read."""
    if is_main():
        result = fn(*args)
        barrier()
        return result
    barrier()
    return fn(*args)


def launch(fn: Callable[..., Any], args: tuple, processes: int, device_type: str,
           threads: int | None = None) -> Any:
    """Run fn(*args) distributed when asked for; returns the result of rank 0 (or of this rank under torchrun).

    Under torchrun this process joins torchrun's group; otherwise with `processes` > 1, `spawn`
    starts them on this machine; else fn runs here alone.
    """
    if torchrun_launched():
        if processes > 1:
            raise DistributedError("--gpus is for a launch on one machine; under torchrun, set the number of "
                                   "processes with torchrun's --nproc_per_node")
        init_process_group(device_type)
        try:
            return fn(*args)
        finally:
            destroy_process_group()
    if processes > 1:
        return spawn(fn, args, processes, device_type, threads)
    return fn(*args)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn: Callable[..., Any], args: tuple, processes: int, device_type: str, threads: int | None = None,
          start_method: str = "spawn") -> Any:
    """Run fn(*args) in `processes` new processes on this machine, joined in one group; returns rank 0's result.

    On the CPU each process gets an equal share of the cores unless `threads` is given. With the
    default start method `fn` and `args` must be picklable (a module-level function); "fork" starts
    faster (nothing to import again) but is unsafe once CUDA is initialized, so it is for CPU tests.
    """
    if device_type == "cuda" and torch.cuda.device_count() < processes:
        raise DistributedError(f"--gpus {processes}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                               "visible (CUDA_VISIBLE_DEVICES)")
    if threads is None and device_type == "cpu":
        threads = max(1, (os.cpu_count() or 1) // processes)
    with tempfile.TemporaryDirectory(prefix="autoseg_ranks_") as tmp:
        result_file = Path(tmp) / "rank0_result.pkl"
        context = torch.multiprocessing.start_processes(
            _run_rank, args=(processes, _free_port(), device_type, threads, logging.getLogger().getEffectiveLevel(),
                             fn, args, result_file),
            nprocs=processes, join=False, start_method=start_method)
        try:
            while not context.join():
                pass
        except torch.multiprocessing.ProcessRaisedException as exc:
            message = str(exc).strip().splitlines()
            log.debug("%s", exc)
            raise DistributedError(f"a training process failed: {message[-1] if message else exc}") from None
        except torch.multiprocessing.ProcessExitedException as exc:
            raise DistributedError(f"a training process ended abnormally: {exc}") from None
        return pickle.loads(result_file.read_bytes())


def _run_rank(index: int, processes: int, port: int, device_type: str, threads: int | None, log_level: int,
              fn: Callable[..., Any], args: tuple, result_file: Path) -> None:
    logging.basicConfig(level=log_level, format="%(message)s")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(index), LOCAL_RANK=str(index),
                      WORLD_SIZE=str(processes))
    if threads:
        torch.set_num_threads(threads)
    init_process_group(device_type)
    try:
        result = fn(*args)
        if index == 0:
            result_file.write_bytes(pickle.dumps(result))
    finally:
        destroy_process_group()
