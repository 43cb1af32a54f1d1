"""`progress.png`: loss, pseudo-Dice and learning-rate curves, redrawn every epoch."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from autoseg.atomic import atomic_path  # noqa: E402


def plot_progress(history: list[dict], path: Path) -> None:
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(9, 8), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train loss", color="tab:blue")
    if any(h.get("val_loss") is not None for h in history):
        ax_loss.plot(epochs, [h.get("val_loss") for h in history], label="validation loss", color="tab:red")
    ax_loss.set_ylabel("loss")
    ax_dice = ax_loss.twinx()
    if any(h.get("ema_dice") is not None for h in history):
        ax_dice.plot(epochs, [h.get("mean_dice") for h in history], ":", label="pseudo-Dice", color="tab:green")
        ax_dice.plot(epochs, [h.get("ema_dice") for h in history], label="pseudo-Dice (EMA)", color="tab:green")
    ax_dice.set_ylabel("pseudo-Dice")
    ax_dice.set_ylim(0, 1)
    lines = ax_loss.get_legend_handles_labels()[0] + ax_dice.get_legend_handles_labels()[0]
    ax_loss.legend(lines, [line.get_label() for line in lines], loc="upper right")
    ax_lr.plot(epochs, [h["lr"] for h in history], color="black")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("epoch")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
