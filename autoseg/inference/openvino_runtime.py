"""float32 CPU inference of a trained U-Net through OpenVINO (the optional extra `autoseg[openvino]`).

On CPUs without native bfloat16 every torch convolution runs in float32 through oneDNN; OpenVINO's
CPU plugin runs the same network in float32 faster, with the same labels (docs/prediction.md has
the figures). The network is converted from the torch module itself, for one patch of the plan's
size. Converting traces the network (seconds, more than predicting a small case), so a fold's
conversion is kept on disk beside its checkpoint and read by the next run:

    models/<config>/fold_<K>/openvino_float32/model.xml, model.bin   the float32 OpenVINO model
    models/<config>/fold_<K>/openvino_float32/conversion.json        format_version, checkpoint,
        checkpoint_sha256, in_channels, patch_size, versions (autoseg, openvino)

It is used only when all of those match; otherwise the network is converted again and the folder
replaced. A folder that cannot be written (read-only models, a model archive's verified extraction)
only costs each run the conversion.
"""

from __future__ import annotations

import importlib.util
import logging
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from autoseg import __version__ as autoseg_version
from autoseg.atomic import ArtifactError, atomic_dir, read_json, write_json
from autoseg.device import cpu_has_native_bf16
from autoseg.errors import AutosegError
from autoseg.model_files import file_sha256

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


def _conversion_key(checkpoint: Path, in_channels: int, patch_size: Sequence[int]) -> dict:
    ov = import_openvino()
    return {"format_version": CONVERSION_FORMAT_VERSION, "checkpoint": checkpoint.name,
            "checkpoint_sha256": file_sha256(checkpoint), "in_channels": int(in_channels),
            "patch_size": [int(p) for p in patch_size],
            "versions": {"autoseg": autoseg_version, "openvino": ov.__version__}}


def converted_model(network: torch.nn.Module, in_channels: int, patch_size: Sequence[int], checkpoint: Path,
                    folder: Path | None):
    """The fold's network as a float32 OpenVINO model: read from `folder` when it holds the conversion of this
    checkpoint for this patch, else converted and saved there for the next run (None: never saved)."""
    ov = import_openvino()
    if folder is None:
        return convert_network(network, in_channels, patch_size)
    key = _conversion_key(checkpoint, in_channels, patch_size)
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
        log.info("%s: the OpenVINO conversion is not kept for the next run (%s)", folder, exc)
    return model


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
        self._request = self._compiled.create_infer_request()
        self.input_shape = shape

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        if tuple(batch.shape[1:]) != self.input_shape[1:]:
            raise ValueError(f"this OpenVINO network was compiled for windows {list(self.input_shape[1:])}, "
                             f"got {list(batch.shape[1:])}")
        windows = batch.detach().to("cpu", torch.float32).numpy()
        outputs = [np.array(self._request.infer({0: windows[i:i + 1]})[0]) for i in range(windows.shape[0])]
        return torch.from_numpy(np.concatenate(outputs, axis=0))
