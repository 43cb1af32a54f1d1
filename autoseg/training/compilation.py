"""`torch.compile` for the training network: on by default on CUDA, as nnU-Net v2 does, with a fallback.

nnU-Net v2.8.1 compiles its network when training on CUDA (`nnUNetTrainer._do_i_compile`: off for
the CPU, MPS and Windows). Here the same default, `autoseg train --compile/--no-compile` to choose,
and one function for every device, so the CPU tests run the very path CUDA takes (inductor compiles
for the CPU too). Compilation happens at the first call; if it fails (no compiler, an unsupported
operation, a driver problem), training goes on with the uncompiled network and the log says why.
The compiled module shares the network's parameters: checkpoints are the network's own state dict.
"""

from __future__ import annotations

import logging
import platform
from typing import Callable

import torch

log = logging.getLogger(__name__)


def compile_by_default(device: torch.device) -> bool:
    """nnU-Net's rule: compile on CUDA, except on Windows; never on the CPU or MPS."""
    return device.type == "cuda" and platform.system() != "Windows"


class CompiledWithFallback:
    """Calls the compiled module; on the first failure says so once and calls the eager module from then on."""

    def __init__(self, module: torch.nn.Module, say: Callable[[str], None] = log.warning):
        self.eager = module
        self.compiled = torch.compile(module)
        self.say = say
        self.failed: str | None = None

    def __call__(self, *args, **kwargs):
        if self.failed is None:
            try:
                return self.compiled(*args, **kwargs)
            except Exception as exc:  # torch._dynamo / inductor errors have no common public base class
                first = (str(exc).strip().splitlines() or [""])[0][:300]
                self.failed = f"{type(exc).__name__}: {first}"
                self.say(f"torch.compile failed ({self.failed}); training continues with the uncompiled network")
        return self.eager(*args, **kwargs)


def training_forward(module: torch.nn.Module, device: torch.device, choice: bool | None,
                     say: Callable[[str], None] = log.info) -> tuple[Callable, str]:
    """The callable a training step runs the network through, and a line for the log saying which it is.

    `choice` None follows `compile_by_default`; True compiles on any device, False never."""
    enabled = compile_by_default(device) if choice is None else choice
    why = "--compile" if choice else "--no-compile" if choice is False else (
        "the default on CUDA, as nnU-Net" if enabled else f"the default on {device.type}, as nnU-Net")
    if not enabled:
        return module, f"torch.compile: off ({why})"
    return CompiledWithFallback(module, say), f"torch.compile: on ({why}; compiled at the first step)"
