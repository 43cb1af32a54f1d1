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
