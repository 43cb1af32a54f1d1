"""Where each stage's artifact lives inside a workspace folder (see docs/workspace.md)."""

from __future__ import annotations

from pathlib import Path


def dataset_json(workdir: Path) -> Path:
    return Path(workdir) / "dataset.json"


def verify_report(workdir: Path) -> Path:
    return Path(workdir) / "verify_report.json"


def fingerprint_json(workdir: Path) -> Path:
    return Path(workdir) / "fingerprint.json"


def plans_json(workdir: Path) -> Path:
    return Path(workdir) / "plans.json"


def preprocessed_dir(workdir: Path, data_identifier: str) -> Path:
    return Path(workdir) / "preprocessed" / data_identifier


def splits_json(workdir: Path) -> Path:
    return Path(workdir) / "splits.json"


def fold_dir(workdir: Path, configuration: str, fold: int | str) -> Path:
    return Path(workdir) / "models" / configuration / f"fold_{fold}"


def postprocessing_json(workdir: Path) -> Path:
    return Path(workdir) / "postprocessing.json"


def crossval_dir(workdir: Path) -> Path:
    return Path(workdir) / "crossval"


# `autoseg predict` writes into an output folder of the user's, not into the workspace; it names the run's
# record here so that the commands reading it back (evaluate, the HTML report) find it by the same rule.
def prediction_summary_json(output_dir: Path, num_parts: int = 1, part_id: int = 0) -> Path:
    """`prediction_summary.json`, or one per part so parallel parts do not overwrite each other's."""
    name = "prediction_summary.json" if num_parts == 1 else f"prediction_summary_part{part_id}of{num_parts}.json"
    return Path(output_dir) / name


def prediction_summaries(output_dir: Path) -> list[Path]:
    """Every run record in `output_dir`, those of earlier versions (`prediction_report*.json`) last."""
    output_dir = Path(output_dir)
    return sorted(output_dir.glob("prediction_summary*.json")) + sorted(output_dir.glob("prediction_report*.json"))
