"""Gather the folds' validation results, pick the best configuration, decide the postprocessing."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from autoseg import workspace
from autoseg.atomic import read_json, write_json
from autoseg.dataset.image_io import read_image
from autoseg.dataset.layout import load_dataset, read_case_label
from autoseg.postprocessing import decide_postprocessing, save_postprocessing_rules

log = logging.getLogger(__name__)


class CrossValidationError(Exception):
    """Missing fold results; the message says which folds to train."""


def collect_validation(workdir: Path, configuration: str, num_folds: int = 5) -> dict:
    """Per-case results of every fold's `validation/summary.json`, pooled, with the mean per label."""
    cases, missing = {}, []
    for fold in range(num_folds):
        path = workspace.fold_dir(workdir, configuration, fold) / "validation" / "summary.json"
        if not path.is_file():
            missing.append(fold)
            continue
        for case_id, metrics in read_json(path)["cases"].items():
            cases[case_id] = {"fold": fold, **metrics}
    labels = sorted({k for c in cases.values() for k in c if k != "fold"}, key=int)
    mean = {}
    for label in labels:
        values = [c[label]["dice"] for c in cases.values() if c[label]["dice"] is not None]
        mean[label] = float(np.mean(values)) if values else None
    defined = [v for v in mean.values() if v is not None]
    return {"configuration": configuration, "missing_folds": missing, "num_cases": len(cases),
            "mean_dice": mean, "foreground_mean_dice": float(np.mean(defined)) if defined else None}


def run_crossval(workdir: Path, configurations: list[str] | None = None, num_folds: int = 5,
                 postprocessing: bool = True) -> dict:
    """Cross-validation Dice per configuration, the best one, and postprocessing rules for it."""
    workdir = Path(workdir)
    plans = read_json(workspace.plans_json(workdir))
    configs = configurations or [c for c in plans["configurations"]
                                 if (workdir / "models" / c).is_dir()]
    results = {c: collect_validation(workdir, c, num_folds) for c in configs}
    complete = {c: r for c, r in results.items() if r["num_cases"] and not r["missing_folds"]}
    if not complete:
        detail = "; ".join(f"{c}: folds {r['missing_folds']} missing" for c, r in results.items()) or "no trained configuration"
        raise CrossValidationError(f"{workdir}: no configuration has all {num_folds} folds validated ({detail}); "
                                   "train them with `autoseg train WORKDIR --fold K`")
    best = max(complete, key=lambda c: complete[c]["foreground_mean_dice"] or -1.0)
    summary = {"format_version": 1, "configurations": results, "best_configuration": best,
               "reason": f"highest mean foreground Dice over the pooled validation cases of all {num_folds} folds"}
    if postprocessing:
        rules = decide_postprocessing(_validation_pairs(workdir, best, num_folds),
                                      [int(k) for k in plans["labels"] if int(k) > 0])
        rules["configuration"] = best
        save_postprocessing_rules(workspace.postprocessing_json(workdir), rules)
        summary["postprocessing"] = rules
    write_json(workspace.crossval_dir(workdir) / "summary.json", summary)
    return summary


def _validation_pairs(workdir: Path, configuration: str, num_folds: int):
    """(prediction, reference) label maps of every validation case, read one at a time."""
    raw = read_json(workspace.dataset_json(workdir))
    cases = {c.case_id: c for c in load_dataset(raw["root"]).cases}
    for fold in range(num_folds):
        folder = workspace.fold_dir(workdir, configuration, fold) / "validation"
        for case_id in read_json(folder / "summary.json")["cases"]:
            prediction, _ = read_image(folder / f"{case_id}{raw.get('file_ending', '.nii.gz')}")
            yield prediction, read_case_label(cases[case_id])
