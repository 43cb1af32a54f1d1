import math

from autoseg.training.progress_plot import plot_progress


def history(num_epochs=3, validation=True):
    records = []
    for epoch in range(1, num_epochs + 1):
        record = {"epoch": epoch, "train_loss": 1.0 / epoch, "lr": 0.01 * (1 - epoch / 10), "data_wait_s": 0.0}
        if validation:
            record.update({"val_loss": 1.2 / epoch, "dice_per_label": [0.2 * epoch, None if epoch == 1 else 0.1],
                           "mean_dice": 0.2 * epoch, "ema_dice": 0.1 * epoch})
        records.append(record)
    return records


def dice_lines(figure):
    """The pseudo-Dice panel's curves by their label."""
    ax = next(a for a in figure.axes if a.get_ylabel() == "pseudo-Dice")
    return {line.get_label(): line for line in ax.get_lines()}


def test_progress_plot_draws_one_pseudo_dice_curve_per_named_label(tmp_path):
    path = tmp_path / "progress.png"
    figure = plot_progress(history(), path, label_names=["liver", "tumour"])
    assert path.read_bytes()[:4] == b"\x89PNG"
    lines = dice_lines(figure)
    assert set(lines) == {"liver", "tumour", "mean pseudo-Dice", "mean pseudo-Dice (EMA)"}
    assert list(lines["liver"].get_ydata()) == [0.2, 0.4, 0.6000000000000001]
    assert math.isnan(lines["tumour"].get_ydata()[0])  # undefined pseudo-Dice is a gap, not zero
    legend = next(a for a in figure.axes if a.get_ylabel() == "pseudo-Dice").get_legend()
    assert {"liver", "tumour"} <= {t.get_text() for t in legend.get_texts()}


def test_progress_plot_without_names_numbers_the_labels(tmp_path):
    lines = dice_lines(plot_progress(history(), tmp_path / "progress.png"))
    assert {"label 1", "label 2"} <= set(lines)


def test_progress_plot_of_a_fold_without_validation(tmp_path):
    """Fold 'all' has no validation: losses and learning rate only, no Dice curves."""
    figure = plot_progress(history(validation=False), tmp_path / "progress.png", label_names=["liver"])
    assert (tmp_path / "progress.png").is_file() and dice_lines(figure) == {}
