"""Checkpoints written atomically and loaded safely (`weights_only=True`).

A checkpoint is a dict of tensors and plain values: format_version, configuration, epoch,
network_state, optimizer_state, grad_scaler_state, best_ema_dice, ema_dice, history, rng.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from autoseg.atomic import atomic_path

FORMAT_VERSION = 1


class CheckpointError(Exception):
    """A checkpoint that cannot be loaded; the message names the file."""


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write to a temporary file and rename, so a crash at any moment leaves the previous file intact."""
    with atomic_path(path) as tmp:
        torch.save({"format_version": FORMAT_VERSION, **state}, tmp)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{path}: cannot be loaded ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not an autoseg checkpoint of format_version {FORMAT_VERSION}")
    return state
