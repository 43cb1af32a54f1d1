"""Trained models on disk: the checkpoint format, which checkpoint a fold uses, which folds exist.

Training writes checkpoints, prediction and model archives read them; all three use this module, so
prediction needs nothing from training. A fold lives in `WORKDIR/models/<configuration>/fold_<K>/`
(docs/workspace.md) and holds up to three checkpoints: `checkpoint_latest.pt` (written every epoch
or every --checkpoint-every epochs, for --resume), `checkpoint_best.pt` (best EMA pseudo-Dice) and
`checkpoint_final.pt` (end of training).

A checkpoint file is a dict of tensors and plain values loaded with `weights_only=True`, so a
checkpoint cannot run code: format_version, configuration, fold, epoch, epochs, network_state,
optimizer_state, grad_scaler_state, best_ema_dice, ema_dice, history, plans_configuration, labels,
channel_names.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from autoseg import workspace
from autoseg.atomic import atomic_path
from autoseg.errors import AutosegError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# Which file each `--checkpoint` choice loads, in order of preference: a fold whose training was
# stopped before the end has no checkpoint_final.pt, and then its latest state is used.
CHECKPOINT_FILES = {
    "final": ("checkpoint_final.pt", "checkpoint_latest.pt"),
    "latest": ("checkpoint_latest.pt",),
    "best": ("checkpoint_best.pt",),
}
# What a model archive keeps of a checkpoint: enough to rebuild and describe the network.
PREDICTION_KEYS = ("configuration", "fold", "epoch", "epochs", "network_state", "plans_configuration", "labels",
                   "channel_names", "best_ema_dice", "ema_dice", "regions")


class CheckpointError(AutosegError):
    """A checkpoint or fold folder that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class Checkpoint:
    """One saved state of a fold's training (or, from a model archive, its weights alone)."""

    network_state: dict[str, torch.Tensor]
    configuration: str | None = None
    fold: str | None = None
    epoch: int | None = None  # epochs completed when it was written
    epochs: int | None = None  # length of the schedule
    optimizer_state: dict | None = None
    grad_scaler_state: dict | None = None
    best_ema_dice: float | None = None
    ema_dice: float | None = None
    history: list[dict] = field(default_factory=list)
    plans_configuration: dict | None = None  # the configuration's plans.json entry it was trained with
    labels: dict[str, str] | None = None
    channel_names: list[str] | None = None
    regions: list[dict] | None = None  # plans.json's "regions" it was trained with (region-based plans only)

    def to_dict(self, keys: Sequence[str] | None = None) -> dict[str, Any]:
        """Plain values for `torch.save` (weights_only loading takes no dataclasses); `keys` keeps only those."""
        # getattr, not dataclasses.asdict: that would deep-copy every tensor
        data = {k: getattr(self, k) for k in Checkpoint.__dataclass_fields__ if keys is None or k in keys}
        return {"format_version": FORMAT_VERSION, **data}


def file_sha256(path: Path) -> str:
    """The SHA-256 of a checkpoint file: what a converted or quantized network records, so it is never used with
    other weights."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(path: Path, checkpoint: Checkpoint) -> None:
    """Write to a temporary file and rename, so a crash at any moment leaves the previous file intact."""
    with atomic_path(path) as tmp:
        torch.save(checkpoint.to_dict(), tmp)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f"{path}: cannot be loaded ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: not an autoseg checkpoint of format_version {FORMAT_VERSION}")
    if not isinstance(state.get("network_state"), dict):
        raise CheckpointError(f"{path}: holds no network weights (network_state); train the fold again")
    known = {k: state[k] for k in Checkpoint.__dataclass_fields__ if k in state}
    if known.get("fold") is not None:
        known["fold"] = str(known["fold"])
    return Checkpoint(**known)


def fold_names(workdir: Path, configuration: str, folds: Sequence[int | str] | None = None,
               choice: str = "final") -> list[str]:
    """`folds` as names after checking each holds a checkpoint for `choice`, or every `fold_*` folder that
    holds one (0, 1, ... then 'all'); a fold folder without one is left out with a warning."""
    files = _checkpoint_files(choice)
    models = workspace.fold_dir(workdir, configuration, 0).parent
    if folds is not None:
        names = [str(f) for f in dict.fromkeys(folds)]
        missing = [n for n in names if not workspace.fold_dir(workdir, configuration, n).is_dir()]
        if missing:
            raise CheckpointError(f"{models}: no fold_{', fold_'.join(missing)} folder; train those folds or "
                                  "choose others with --folds")
        for name in names:
            checkpoint_path(workdir, configuration, name, choice)  # raises, naming the folder, when it has none
        return names
    found, unusable = [], []
    for folder in sorted((p for p in models.glob("fold_*") if p.is_dir()), key=lambda p: _fold_order(p.name)):
        (found if any((folder / f).is_file() for f in files) else unusable).append(folder)
    if not found:
        raise CheckpointError(f"{models}: no fold with a {' or '.join(files)} for {configuration}; train it "
                              "first (`autoseg train`) or choose another configuration")
    for folder in unusable:
        log.warning("%s: no %s; this fold is left out (train it, or choose folds with --folds)", folder,
                    " or ".join(files))
    return [folder.name.removeprefix("fold_") for folder in found]


def _fold_order(name: str) -> tuple:
    fold = name.removeprefix("fold_")
    return (0, int(fold), "") if fold.isdigit() else (1, 0, fold)


def _checkpoint_files(choice: str) -> tuple[str, ...]:
    if choice not in CHECKPOINT_FILES:
        raise CheckpointError(f"checkpoint must be one of {', '.join(CHECKPOINT_FILES)}, got {choice!r}")
    return CHECKPOINT_FILES[choice]


def checkpoint_path(workdir: Path, configuration: str, fold: str, choice: str = "final") -> Path:
    """The file a fold uses for `choice` ("final" falls back to checkpoint_latest.pt, with a warning)."""
    folder = workspace.fold_dir(workdir, configuration, fold)
    candidates = [folder / name for name in _checkpoint_files(choice)]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise CheckpointError(f"{folder}: no {' or '.join(p.name for p in candidates)}; train this fold "
                              "(`autoseg train`) or leave it out with --folds")
    if path != candidates[0]:
        log.warning("%s: no %s (training did not finish); using %s", folder, candidates[0].name, path.name)
    return path


def load_fold(workdir: Path, configuration: str, fold: str, choice: str = "final") -> tuple[Path, Checkpoint]:
    """A fold's chosen checkpoint, checked to belong to `configuration`."""
    path = checkpoint_path(workdir, configuration, fold, choice)
    checkpoint = load_checkpoint(path)
    if checkpoint.configuration not in (None, configuration):
        raise CheckpointError(f"{path}: trained for configuration {checkpoint.configuration}, not {configuration}; "
                              "the models folder is mixed up")
    return path, checkpoint
