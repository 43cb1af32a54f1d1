"""One line that says what a benchmark ran on: CPU model, cores, the SIMD features that decide
float32 and bfloat16 speed (AVX2, AVX-512, AVX-512 BF16, AMX), GPU, torch; every figure quotes it."""

from __future__ import annotations

import os
import platform
from pathlib import Path

SIMD_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_model_and_flags() -> tuple[str, set[str]]:
    model, flags = None, None
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.exists() else []:
        key, _, value = line.partition(":")
        if key.strip() == "model name" and model is None:
            model = value.strip()
        elif key.strip() == "flags" and flags is None:
            flags = set(value.split())
    return model or platform.processor() or platform.machine(), flags or set()


def machine() -> str:
    """e.g. 'AMD EPYC 9B14, 2 logical cores, avx2 yes, avx512f no, avx512_bf16 no, amx_bf16 no, no GPU,
    torch 2.13.0+cpu (2 threads)'."""
    model, flags = cpu_model_and_flags()
    simd = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in SIMD_FLAGS)
    text = f"{model}, {os.cpu_count()} logical cores, {simd}"
    try:
        import torch
    except ImportError:
        return f"{text}, Python {platform.python_version()}"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{text}, {gpu}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}")
