"""float32 CPU inference of a trained U-Net through OpenVINO (the optional extra `autoseg[openvino]`).

On CPUs without native bfloat16 every torch convolution runs in float32 through oneDNN; OpenVINO's
CPU plugin runs the same network in float32 faster, with the same labels (docs/prediction.md has
the figures). The network is converted from the torch module itself, for one patch of the plan's
size. Converting traces the network (seconds, more than predicting a small case), so a fold's
conversion is kept on disk beside its checkpoint and read by the next run:

    models/<config>/fold_<K>/openvino_float32/<key>/model.xml, model.bin   the float32 OpenVINO model
    models/<config>/fold_<K>/openvino_float32/<key>/conversion.json        what it was made from:
        format_version, checkpoint, checkpoint_sha256, patch_size, topology, network_code_sha256,
        versions (autoseg, openvino, torch)

<key> is a hash of that record, so a conversion is used only when all of it matches; another one is
made otherwise, and conversions of the same checkpoint file with another record are removed. A
folder that cannot be written (read-only models) only costs each run the conversion; a model
archive's verified extraction is never written to (ModelChoice.read_only).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import logging
import shutil
import threading
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from autoseg import __version__ as autoseg_version
from autoseg.atomic import ArtifactError, atomic_dir, read_json, write_json
from autoseg.device import cpu_has_native_bf16
from autoseg.errors import AutosegError

log = logging.getLogger(__name__)

CONVERTED_DIR = "openvino_float32"
CONVERSION_RECORD = "conversion.json"
CONVERSION_FORMAT_VERSION = 1


class OpenVINOUnavailable(AutosegError):
    """openvino is not installed."""


def choose_runtime(requested: str, device: torch.device, mixed_precision: bool) -> tuple[str, str]:
    """The runtime `--runtime auto` stands for, and why: OpenVINO where the torch path would compute in float32 on the
    CPU (it was measured faster there with the same labels, docs/prediction.md), torch everywhere else."""
    if requested != "auto":
        return requested, "asked for"
    if device.type != "cpu":
        return "torch", f"OpenVINO runs on the CPU only, the networks run on {device}"
    if mixed_precision and cpu_has_native_bf16():
        return "torch", "bfloat16 on this CPU's native bf16 was measured faster than OpenVINO's float32"
    if importlib.util.find_spec("openvino") is None:
        return "torch", "openvino is not installed (pip install 'autoseg[openvino]' for faster float32 on this CPU)"
    return "openvino", "float32 on a CPU without native bf16: OpenVINO was measured faster than torch, same labels"


def import_openvino(why: str = "--runtime openvino"):
    """The openvino module, or OpenVINOUnavailable saying how to install it."""
    try:
        import openvino as ov
    except ImportError:
        raise OpenVINOUnavailable(f"{why} needs the openvino package, which is not installed: "
                                  "pip install 'autoseg[openvino]'") from None
    return ov


def convert_network(network: torch.nn.Module, in_channels: int, patch_size: Sequence[int]):
    """The torch network as an OpenVINO model for one window (1, C, *patch) in float32."""
    ov = import_openvino()
    shape = (1, int(in_channels), *(int(p) for p in patch_size))
    network = network.to("cpu").eval()
    with torch.no_grad(), warnings.catch_warnings():  # outside inference mode: tracing cannot record its tensors
        # The network's input checks read shapes, which tracing fixes as constants: right for one patch size.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # openvino's converter traces with torch.jit
        return ov.convert_model(network, example_input=torch.zeros(shape), input=[shape])


@functools.cache
def _network_code_sha256() -> str:
    """SHA-256 of autoseg/network/*.py: a change to the forward pass that keeps the weights' shapes must not be
    served from a conversion of the old code. Read once per process, not once per fold."""
    digest = hashlib.sha256()
    for path in sorted((Path(__file__).resolve().parents[1] / "network").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def conversion_key(checkpoint: Path, checkpoint_sha256: str, topology, patch_size: Sequence[int]) -> dict:
    """Everything a kept conversion depends on, as its conversion.json holds it."""
    ov = import_openvino()
    key = {"format_version": CONVERSION_FORMAT_VERSION, "checkpoint": checkpoint.name,
           "checkpoint_sha256": checkpoint_sha256, "patch_size": [int(p) for p in patch_size],
           "topology": dataclasses.asdict(topology), "network_code_sha256": _network_code_sha256(),
           "versions": {"autoseg": autoseg_version, "openvino": ov.__version__, "torch": torch.__version__}}
    return json.loads(json.dumps(key))  # tuples as lists, as read back


def conversion_dir(checkpoint: Path, key: dict) -> Path:
    """One folder per key, so runs with another checkpoint choice or version never swap a folder under a reader."""
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return checkpoint.parent / CONVERTED_DIR / name


def converted_model(network: torch.nn.Module, in_channels: int, patch_size: Sequence[int], checkpoint: Path,
                    checkpoint_sha256: str | None, topology):
    """The fold's network as a float32 OpenVINO model: read from disk when this checkpoint (by its SHA-256, taken
    before its weights were loaded into `network`) was converted before with the same patch, network code and
    versions; else converted, and kept for the next run (never with `checkpoint_sha256` None)."""
    ov = import_openvino()
    if checkpoint_sha256 is None:
        return convert_network(network, in_channels, patch_size)
    key = conversion_key(checkpoint, checkpoint_sha256, topology, patch_size)
    folder = conversion_dir(checkpoint, key)
    try:
        if read_json(folder / CONVERSION_RECORD) == key:
            return ov.Core().read_model(str(folder / "model.xml"))
    except (ArtifactError, OSError, RuntimeError):  # absent, damaged or unreadable: convert again
        pass
    model = convert_network(network, in_channels, patch_size)
    try:
        with atomic_dir(folder) as tmp:
            # compress_to_fp16=False: saving would otherwise halve the weights' precision behind the user's back
            ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
            write_json(tmp / CONVERSION_RECORD, key)
    except (OSError, RuntimeError) as exc:
        if not (folder / CONVERSION_RECORD).is_file():  # else a parallel run (--num-parts) kept the same one
            log.info("%s: the OpenVINO conversion is not kept for the next run (%s)", folder, exc)
        return model
    _remove_stale_conversions(folder, checkpoint.name)
    return model


def _remove_stale_conversions(kept: Path, checkpoint_name: str) -> None:
    """Other conversions of the same checkpoint file are of weights or code it no longer has."""
    for other in kept.parent.iterdir():
        if other == kept or other.name.startswith(".") or not other.is_dir():
            continue
        try:
            stale = read_json(other / CONVERSION_RECORD).get("checkpoint") == checkpoint_name
        except (ArtifactError, OSError, AttributeError):
            stale = False
        if stale:
            shutil.rmtree(other, ignore_errors=True)


class OpenVINONetwork:
    """Callable like the torch network on (B, C, *patch) float32 CPU tensors, computed by OpenVINO.

    Compiled for one patch at a time (a static shape is OpenVINO's fast path); a batch of several
    windows runs them one after the other. Built from the torch network, or (`model`) from an OpenVINO
    model already converted, such as an int8 one (autoseg/quantization.py).
    """

    def __init__(self, network: torch.nn.Module | None, in_channels: int, patch_size: Sequence[int],
                 threads: int | None = None, model=None):
        ov = import_openvino()
        shape = (1, int(in_channels), *(int(p) for p in patch_size))
        if model is None:
            model = convert_network(network, in_channels, patch_size)
        # f32: never bf16/f16 behind the user's back (an int8 model's quantized layers stay int8)
        config = {"INFERENCE_PRECISION_HINT": "f32",
                  "INFERENCE_NUM_THREADS": str(threads or torch.get_num_threads())}
        self._compiled = ov.Core().compile_model(model, "CPU", config)
        self._requests = threading.local()  # an infer request serves one call at a time: one per thread
        self.input_shape = shape

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if tuple(batch.shape[1:]) != self.input_shape[1:]:
            raise ValueError(f"this OpenVINO network was compiled for windows {list(self.input_shape[1:])}, "
                             f"got {list(batch.shape[1:])}")
        windows = batch.detach().to("cpu", torch.float32).numpy()
        request = getattr(self._requests, "request", None)
        if request is None:
            request = self._requests.request = self._compiled.create_infer_request()
        outputs = [np.array(request.infer({0: windows[i:i + 1]})[0]) for i in range(windows.shape[0])]
        return torch.from_numpy(np.concatenate(outputs, axis=0))
