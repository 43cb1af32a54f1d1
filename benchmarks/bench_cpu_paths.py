"""Seconds of one U-Net step of a plan under each CPU execution path, on random data (weights and data
do not change the work): which memory layout, torch.compile, or runtime is fastest on this CPU.

    python benchmarks/bench_cpu_paths.py WORKDIR [--config 3d_fullres] --step train      [--compile]
    python benchmarks/bench_cpu_paths.py WORKDIR [--config 3d_fullres] --step inference  [--compile]

train: forward + Dice/CE loss with deep supervision + backward + SGD step of the plan's batch
(`--batch` to change it), float32, in the default (contiguous) layout and in channels_last(_3d), and
on a CPU with native bf16 also under bfloat16 autocast in channels_last;
with --compile also torch.compile of the network (its compile time is printed apart).
inference: forward of `--batch` windows (default 2 in 3D, 8 in 2D) without deep supervision, float32:
torch eager in both layouts, torch with oneDNN switched off, torch.compile (with --compile),
ONNX Runtime and OpenVINO when installed (each also prints its largest difference from torch).
Each figure is the median of --iters timed steps after --warmup untimed ones.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from autoseg.device import autocast_context, cpu_has_native_bf16
from autoseg.network.unet import UNetTopology, build_unet, deep_supervision_scales
from autoseg.training.loss import DeepSupervisionLoss, DiceCELoss, deep_supervision_weights

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import machine  # noqa: E402


def median_seconds(step: Callable[[], object], iters: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def channels_last(ndim: int) -> torch.memory_format:
    return torch.channels_last_3d if ndim == 3 else torch.channels_last


def topology(config: dict, channels: int, classes: int) -> UNetTopology:
    """The U-Net of one plans.json configuration, read as JSON (features_per_stage, kernel_sizes, strides,
    n_conv_per_stage)."""
    return UNetTopology(in_channels=channels, num_classes=classes, features_per_stage=config["features_per_stage"],
                        kernel_sizes=config["kernel_sizes"], strides=config["strides"],
                        n_conv_per_stage=int(config.get("n_conv_per_stage", 2)))


def train_paths(config: dict, channels: int, classes: int, batch: int, args) -> dict[str, float]:
    patch = config["patch_size"]
    scales = deep_supervision_scales(config["strides"])
    loss_fn = DeepSupervisionLoss(DiceCELoss(batch_dice=config["batch_dice"]), deep_supervision_weights(len(scales)))
    x = torch.randn(batch, channels, *patch)
    y = torch.randint(0, classes, (batch, 1, *patch))
    targets = [y] + [F.interpolate(y.float(), size=[round(p * s) for p, s in zip(patch, scale)]).long()
                     for scale in scales[1:]]
    results = {}
    variants = [("contiguous", torch.contiguous_format, False, None),
                ("channels_last", channels_last(len(patch)), False, None)]
    if cpu_has_native_bf16():
        variants.append(("channels_last, bfloat16 autocast (autoseg train's default here)", channels_last(len(patch)),
                         False, torch.bfloat16))
    if args.compile:
        variants.append(("contiguous + torch.compile", torch.contiguous_format, True, None))
    for name, layout, compiled, dtype in variants:
        torch.manual_seed(0)
        network = build_unet(topology(config, channels, classes)).to(memory_format=layout)
        optimizer = torch.optim.SGD(network.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
        model = torch.compile(network) if compiled else network
        data = x.contiguous(memory_format=layout)

        def step():
            optimizer.zero_grad(set_to_none=True)
            with autocast_context("cpu", dtype)():
                loss = loss_fn(model(data), targets)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(network.parameters(), 12)
            optimizer.step()

        if compiled:
            t = time.perf_counter()
            step()
            name += f" (compile {time.perf_counter() - t:.0f} s)"
        results[name] = median_seconds(step, args.iters, args.warmup)
    return results


def inference_paths(config: dict, channels: int, classes: int, batch: int, args) -> dict[str, float]:
    patch = config["patch_size"]
    torch.manual_seed(0)
    network = build_unet(topology(config, channels, classes), deep_supervision=False).eval()
    x = torch.randn(batch, channels, *patch)
    results = {}
    with torch.no_grad():
        reference = network(x).numpy()
        results["torch eager, contiguous"] = median_seconds(lambda: network(x), args.iters, args.warmup)
        layout = channels_last(len(patch))
        network_cl, x_cl = network.to(memory_format=layout), x.contiguous(memory_format=layout)
        results["torch eager, channels_last"] = median_seconds(lambda: network_cl(x_cl), args.iters, args.warmup)
        network = network.to(memory_format=torch.contiguous_format)
        torch._C._set_mkldnn_enabled(False)
        try:
            results["torch eager, oneDNN off"] = median_seconds(lambda: network(x), max(1, args.iters // 2), 1)
        finally:
            torch._C._set_mkldnn_enabled(True)
        if args.compile:
            t = time.perf_counter()
            compiled = torch.compile(network)
            compiled(x)
            results[f"torch.compile (compile {time.perf_counter() - t:.0f} s)"] = \
                median_seconds(lambda: compiled(x), args.iters, args.warmup)
    try:
        import onnxruntime as ort
    except ImportError:
        print("onnxruntime: not installed (pip install onnx onnxruntime)")
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "unet.onnx")
            torch.onnx.export(network, (x,), path, dynamo=False, opset_version=17, input_names=["x"])
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
            inputs = {"x": x.numpy()}
            results["onnxruntime CPU"] = median_seconds(lambda: session.run(None, inputs), args.iters, args.warmup)
            print(f"onnxruntime: largest difference from torch "
                  f"{np.abs(session.run(None, inputs)[0] - reference).max():.1e}")
    try:
        from autoseg.inference.openvino_runtime import OpenVINONetwork, OpenVINOUnavailable
        openvino = OpenVINONetwork(network, channels, patch)
    except OpenVINOUnavailable:
        print("openvino: not installed (pip install 'autoseg[openvino]')")
    else:
        results["openvino CPU, float32 (autoseg --runtime openvino)"] = \
            median_seconds(lambda: openvino(x), args.iters, args.warmup)
        print(f"openvino: largest difference from torch {np.abs(openvino(x).numpy() - reference).max():.1e}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdir", type=Path, help="workspace with plans.json (no training needed)")
    parser.add_argument("--config", default="3d_fullres")
    parser.add_argument("--step", choices=("train", "inference"), required=True)
    parser.add_argument("--batch", type=int, help="train: the plan's batch; inference: 2 in 3D, 8 in 2D")
    parser.add_argument("--compile", action="store_true", help="also torch.compile (tens of seconds to compile)")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    plans = json.loads((args.workdir / "plans.json").read_text())
    if args.config not in plans["configurations"]:
        parser.error(f"{args.workdir / 'plans.json'} has no configuration {args.config}")
    config = plans["configurations"][args.config]
    channels, classes = len(plans["channel_names"]), len(plans["labels"])
    ndim = len(config["patch_size"])
    batch = args.batch or (config["batch_size"] if args.step == "train" else (2 if ndim == 3 else 8))
    print(f"machine: {machine()}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load average before: {os.getloadavg()[0]:.1f}")
    print(f"{args.step}: {args.config}, batch {batch}, patch {config['patch_size']}, features "
          f"{config['features_per_stage']}, float32 unless a line says bfloat16; median of {args.iters} after "
          f"{args.warmup} warm-up")
    paths = train_paths if args.step == "train" else inference_paths
    results = paths(config, channels, classes, batch, args)
    fastest = min(results.values())
    for name, seconds in results.items():
        print(f"  {name:55s} {seconds:7.3f} s   {seconds / fastest:5.2f}x the fastest")


if __name__ == "__main__":
    main()
