"""Which device to compute on, and the mixed precision it supports."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Callable, ContextManager

import torch

from autoseg.errors import AutosegError


class DeviceError(AutosegError):
    """A device that this machine does not have."""


def choose_device(requested: str | torch.device | None) -> torch.device:
    """The requested device, or CUDA when available, else the CPU."""
    if requested is None or requested == "":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(f"device {requested}: CUDA is not available on this machine; use --device cpu")
    return device


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str] | None:
    """The CPU's feature flags (x86 "flags", Arm "Features"); None where the system has no /proc/cpuinfo."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware (AVX512-BF16 or AMX on x86, BF16 on Arm) through oneDNN.

    oneDNN also takes bf16 on AVX-512 CPUs without BF16 (Skylake to Ice Lake servers) and emulates
    it there, slower than float32 (benchmarks/README.md), so such CPUs compute in float32. Without /proc/cpuinfo,
    oneDNN decides.
    """
    if not _onednn_takes_bf16():
        return False
    flags = cpu_flags()
    return flags is None or bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def _onednn_takes_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def mixed_precision_available(device: torch.device) -> bool:
    """CUDA (float16) or a CPU with native bfloat16."""
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())


def mixed_precision_dtype(device: torch.device, enabled: bool = True) -> torch.dtype | None:
    """float16 on CUDA, bfloat16 on a CPU with native bf16, None (float32) otherwise or when not enabled."""
    if not (enabled and mixed_precision_available(device)):
        return None
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def autocast_context(device_type: str, dtype: torch.dtype | None) -> Callable[[], ContextManager]:
    """Context factory computing in `dtype` under autocast; no autocast (float32) when `dtype` is None."""
    if dtype is None:
        return nullcontext
    return lambda: torch.autocast(device_type, dtype=dtype)


def autocast_for(device: torch.device, enabled: bool = True) -> Callable[[], ContextManager]:
    """Mixed-precision context factory: float16 on CUDA, bfloat16 on a CPU with native bf16, else none."""
    return autocast_context(device.type, mixed_precision_dtype(device, enabled))


def gradient_scaler(device_type: str, dtype: torch.dtype | None) -> torch.amp.GradScaler:
    """Loss scaling for float16 (whose small gradients would underflow); a no-op scaler for other dtypes.

    It skips an optimizer step whose gradients hold inf or NaN and then lowers the scale.
    """
    return torch.amp.GradScaler(device_type, enabled=dtype == torch.float16)


def pin_memory_for(device: torch.device) -> bool:
    """Whether to pin host batches: only for a CUDA device (pinned memory needs CUDA, and lets copies overlap)."""
    return device.type == "cuda" and torch.cuda.is_available()


def configure_cudnn(device: torch.device) -> None:
    """On CUDA let cuDNN benchmark convolution algorithms once per input shape (the patch is fixed in training)."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.deterministic = False
