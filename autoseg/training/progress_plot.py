"""`progress.png`: loss, pseudo-Dice per label and learning-rate curves, redrawn every epoch."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from matplotlib.figure import Figure

from autoseg.atomic import atomic_path

MAX_LABELS_IN_LEGEND = 12


def plot_progress(history: list[dict], path: Path, label_names: Sequence[str] | None = None) -> Figure:
    """Draw the training history to `path` and return the figure (its lines carry their labels).

    `label_names` names the foreground labels in the order of each record's `dice_per_label`;
    without it the curves are called "label 1", "label 2", ...
    """
    epochs = [h["epoch"] for h in history]
    fig = Figure(figsize=(9, 10))  # no pyplot: nothing global to close, safe beside other threads
    ax_loss, ax_dice, ax_lr = fig.subplots(3, 1, sharex=True, gridspec_kw={"height_ratios": [2, 2, 1]})

    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train loss", color="tab:blue")
    if any(h.get("val_loss") is not None for h in history):
        ax_loss.plot(epochs, [_value(h.get("val_loss")) for h in history], label="validation loss", color="tab:red")
    ax_loss.set_ylabel("loss")
    ax_loss.legend(loc="upper right")

    num_labels = max((len(h.get("dice_per_label") or []) for h in history), default=0)
    names = list(label_names) if label_names is not None and len(label_names) == num_labels else \
        [f"label {k}" for k in range(1, num_labels + 1)]
    colours = _colours(num_labels)
    per_label = []
    for k, name in enumerate(names):
        dice = [_value((h.get("dice_per_label") or [None] * num_labels)[k]) for h in history]
        per_label += ax_dice.plot(epochs, dice, linewidth=1, alpha=0.8, color=colours[k], label=name)
    summary_lines = []
    if any(h.get("ema_dice") is not None for h in history):
        summary_lines += ax_dice.plot(epochs, [_value(h.get("mean_dice")) for h in history], ":", linewidth=2,
                                      color="black", label="mean pseudo-Dice")
        summary_lines += ax_dice.plot(epochs, [_value(h.get("ema_dice")) for h in history], linewidth=2,
                                      color="black", label="mean pseudo-Dice (EMA)")
    ax_dice.set_ylabel("pseudo-Dice")
    ax_dice.set_ylim(0, 1)
    shown = summary_lines + (per_label if num_labels <= MAX_LABELS_IN_LEGEND else [])
    if shown:
        title = None if num_labels <= MAX_LABELS_IN_LEGEND else f"{num_labels} labels, one thin line each"
        ax_dice.legend(shown, [line.get_label() for line in shown], loc="lower right", fontsize="small",
                       ncol=1 + len(shown) // 8, title=title, title_fontsize="small")

    ax_lr.plot(epochs, [h["lr"] for h in history], color="black")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("epoch")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    return fig


def _value(value: float | None) -> float:
    return float("nan") if value is None else float(value)


def _colours(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "turbo"]
    return [cmap(k) if n <= 20 else cmap(k / max(n - 1, 1)) for k in range(n)]
