"""Gather the folds' validation results, pick the best configuration or ensemble of configurations,
and decide the postprocessing for it."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Iterator

import numpy as np
from tqdm import tqdm

from autoseg import workspace
from autoseg.atomic import read_json, write_json
from autoseg.dataset.image_io import read_image
from autoseg.dataset.layout import load_dataset, read_case_label
from autoseg.dataset.regions import ids_mask
from autoseg.errors import AutosegError
from autoseg.evaluation import dice_from_counts, without_unannotated
from autoseg.inference.instance_maps import without_rims
from autoseg.inference.original_grid import probabilities_to_labels, segmentation_suffix
from autoseg.planning.plans import Plans
from autoseg.postprocessing import decide_postprocessing, save_postprocessing_rules

log = logging.getLogger(__name__)


class CrossValidationError(AutosegError):
    """Missing fold results; the message says which folds to train."""


class MissingProbabilities(CrossValidationError):
    """A fold's validation kept no probabilities (`autoseg train --no-save-probabilities`), so ensembles with
    its configuration cannot be scored; the configurations alone still can."""


def collect_validation(workdir: Path, configuration: str, num_folds: int = 5) -> dict:
    """Per-case results of every fold's `validation/summary.json`, pooled, with the mean Dice per label."""
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
            "mean_dice": mean, "foreground_mean_dice": float(np.mean(defined)) if defined else None,
            "case_folds": {cid: c["fold"] for cid, c in cases.items()}}


def ensemble_candidates(configurations: list[str]) -> list[tuple[str, str]]:
    """The ensembles scored: every pair of configurations, as nnU-Net v2's find_best_configuration does
    (three configurations give three pairs; an ensemble of all three is not tried)."""
    return list(itertools.combinations(configurations, 2))


def run_crossval(workdir: Path, configurations: list[str] | None = None, num_folds: int = 5,
                 postprocessing: bool = True, progress: bool = True) -> dict:
    """Cross-validation Dice of each configuration and of every pair of them averaged; the best one;
    postprocessing rules decided on the best one's validation predictions."""
    workdir = Path(workdir)
    plans = Plans.load(workspace.plans_json(workdir))
    structures = plans.scored_structures  # labels, or regions by the id they are written as
    labels = list(structures)
    configs = configurations or [c for c in plans.configurations if (workdir / "models" / c).is_dir()]
    results = {c: collect_validation(workdir, c, num_folds) for c in configs}
    complete = [c for c, r in results.items() if r["num_cases"] and not r["missing_folds"]]
    if not complete:
        detail = ("; ".join(f"{c}: folds {r['missing_folds']} missing" for c, r in results.items())
                  or "no trained configuration")
        raise CrossValidationError(f"{workdir}: no configuration has all {num_folds} folds validated ({detail}); "
                                   "train them with `autoseg train WORKDIR --fold K`")
    cases, ending = _references(workdir)
    candidates = {c: results[c]["foreground_mean_dice"] or 0.0 for c in complete}
    ensembles = {}
    skipped = {}
    for members in ensemble_candidates(complete):
        name = "+".join(members)
        try:
            ensembles[name] = _score_ensemble(workdir, list(members), results, structures, cases, progress, plans)
        except MissingProbabilities as exc:
            log.warning("ensemble %s not scored: %s", name, exc)
            skipped[name] = str(exc)
            continue
        candidates[name] = ensembles[name]["foreground_mean_dice"] or 0.0
    best = max(candidates, key=candidates.get)
    summary = {"format_version": 1,
               "configurations": {c: {k: v for k, v in r.items() if k != "case_folds"} for c, r in results.items()},
               "ensembles": ensembles, "ensembles_not_scored": skipped, "best": best.split("+"),
               "reason": f"highest mean foreground Dice ({candidates[best]:.4f}) over the pooled validation cases "
                         f"of all {num_folds} folds, among {', '.join(candidates)}"}
    if postprocessing and plans.regions:
        summary["postprocessing_not_decided"] = ("region-based plans: keeping the largest component is decided per "
                                                 "label, and regions overlap; label maps are written as predicted")
        log.info("postprocessing not decided: %s", summary["postprocessing_not_decided"])
    elif postprocessing:
        pairs = _validation_pairs(workdir, best.split("+"), results, cases, ending, plans)
        rules = decide_postprocessing(pairs, labels, plans.ignore_label)
        rules["configuration"] = best.split("+")
        save_postprocessing_rules(workspace.postprocessing_json(workdir), rules)
        summary["postprocessing"] = rules
    write_json(workspace.crossval_dir(workdir) / "summary.json", summary)
    return summary


def _references(workdir: Path) -> tuple[dict, str]:
    """Raw cases by id (for their label files) and the dataset's file ending."""
    raw = read_json(workspace.dataset_json(workdir))
    return {c.case_id: c for c in load_dataset(raw["root"]).cases}, raw.get("file_ending", ".nii.gz")


def _ensemble_prediction(workdir: Path, members: list[str], case_id: str, folds: dict[str, int],
                         plans: Plans) -> np.ndarray:
    """Label map of the averaged validation probabilities of several configurations (object rims, where the plans
    train them, given to their objects; regions over 0.5 written in order)."""
    total = None
    for c in members:
        path = workspace.fold_dir(workdir, c, folds[c]) / "validation" / f"{case_id}.npz"
        if not path.is_file():
            raise MissingProbabilities(f"{path}: missing; validation of {c} fold {folds[c]} kept no probabilities "
                                       f"(rerun it with `autoseg train WORKDIR --config {c} --fold {folds[c]} "
                                       "--resume --save-probabilities`)")
        p = np.load(path)["probabilities"].astype(np.float32)
        total = p if total is None else total + p
    return without_rims(probabilities_to_labels(total / len(members), plans), plans.boundary_label)


def _score_ensemble(workdir: Path, members: list[str], results: dict, structures: dict[int, tuple[int, ...]],
                    cases: dict, progress: bool, plans: Plans) -> dict:
    case_ids = sorted(set.intersection(*(set(results[c]["case_folds"]) for c in members)))
    dice = {label: [] for label in structures}
    for case_id in tqdm(case_ids, desc=f"ensemble {'+'.join(members)}", unit="case", disable=not progress):
        prediction = _ensemble_prediction(workdir, members, case_id,
                                          {c: results[c]["case_folds"][case_id] for c in members}, plans)
        prediction, reference = without_unannotated(prediction, read_case_label(cases[case_id]), plans.ignore_label)
        for label, members_of in structures.items():
            p, r = ids_mask(prediction, members_of), ids_mask(reference, members_of)
            d = dice_from_counts(int(np.logical_and(p, r).sum()), int(p.sum()), int(r.sum()))
            if not np.isnan(d):
                dice[label].append(d)
    mean = {str(label): (float(np.mean(v)) if v else None) for label, v in dice.items()}
    defined = [v for v in mean.values() if v is not None]
    return {"members": members, "num_cases": len(case_ids), "mean_dice": mean,
            "foreground_mean_dice": float(np.mean(defined)) if defined else None}


def _validation_pairs(workdir: Path, members: list[str], results: dict, cases: dict,
                      ending: str, plans: Plans) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(prediction, reference) label maps of every validation case of the chosen model, one at a time."""
    case_ids = sorted(set.intersection(*(set(results[c]["case_folds"]) for c in members)))
    for case_id in case_ids:
        folds = {c: results[c]["case_folds"][case_id] for c in members}
        if len(members) == 1:
            fold_dir = workspace.fold_dir(workdir, members[0], folds[members[0]])
            prediction, _ = read_image(fold_dir / "validation" / f"{case_id}{segmentation_suffix(ending)}")
        else:
            prediction = _ensemble_prediction(workdir, members, case_id, folds, plans)
        yield prediction, read_case_label(cases[case_id])
