"""Which device to compute on, and the mixed precision it supports."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager

import torch


class DeviceError(ValueError):
    """A device that this machine does not have."""


def choose_device(requested: str | torch.device | None) -> torch.device:
    """The requested device, or CUDA when available, else the CPU."""
    if requested is None or requested == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {requested}: CUDA is not available on this machine; use --device cpu")
    return device


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN computes bfloat16 natively here (AVX512-BF16 or AMX); emulated bf16 would be slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def mixed_precision_available(device: torch.device) -> bool:
    """CUDA (float16) or a CPU with native bfloat16."""
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())


def autocast_for(device: torch.device, enabled: bool = True) -> Callable[[], ContextManager]:
    """Mixed-precision context factory: float16 on CUDA, bfloat16 on a CPU with native bf16, else none."""
    if not (enabled and mixed_precision_available(device)):
        return nullcontext
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return lambda: torch.autocast(device.type, dtype=dtype)
