"""End-of-training validation: predict each validation case at full size through the same `Predictor`
`autoseg predict` uses, export it to the original geometry and score it against the original label
file (`validation/summary.json`)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from autoseg import workspace
from autoseg.atomic import read_json, write_json
from autoseg.dataset.layout import load_dataset, read_case_label
from autoseg.evaluation import evaluate_case, mean_per_label, nan_to_none
from autoseg.inference.original_grid import export_segmentation, segmentation_suffix, write_segmentation
from autoseg.inference.original_grid import save_probabilities as save_npz
from autoseg.inference.predictor import Predictor, PreparedCase
from autoseg.inference.settings import ComputeSettings, WindowSettings
from autoseg.planning.plans import Plans
from autoseg.preprocessing import store

log = logging.getLogger(__name__)

# Windows per forward pass in validation on any device, as validation has always run (prediction: 1 on the CPU).
VALIDATION_TILES_PER_BATCH = 4


def validate_fold(network: torch.nn.Module, workdir: Path, plans: Plans, configuration: str, val_ids: list[str],
                  out_dir: Path, compute: ComputeSettings, window: WindowSettings | None = None,
                  save_probabilities: bool | None = None, progress: bool = True) -> dict:
    """Dice (and the other metrics) per validation case and label, and their means.

    Each case's label map is written beside `summary.json`. Its probabilities on the input grid
    (`<case>.npz`, float16) are written only with `save_probabilities`, which `autoseg crossval`
    needs to score ensembles of configurations; None (the default) writes them when the plans
    have more than one configuration. Without them, the label map is built slab by slab as `autoseg
    predict` builds it, so a large case needs no per-label probabilities of its full size (docs/prediction.md).
    """
    keep_probabilities = len(plans.configurations) > 1 if save_probabilities is None else save_probabilities
    window = window or WindowSettings(tiles_per_batch=VALIDATION_TILES_PER_BATCH)
    predictor = Predictor.from_networks(plans, configuration, [network], window, compute, workdir)
    data_dir = workspace.preprocessed_dir(workdir, plans.configuration(configuration).data_identifier)
    raw = read_json(workspace.dataset_json(workdir))
    cases = {c.case_id: c for c in load_dataset(raw["root"]).cases}
    labels = plans.foreground_labels
    ending = raw.get("file_ending", ".nii.gz")
    per_case = {}
    for case_id in tqdm(val_ids, desc="validation", unit="case", disable=not progress):
        properties = store.load_properties(data_dir, case_id)
        geometry = properties.original_geometry
        prepared = PreparedCase(geometry, (configuration,), (store.load_case_image(data_dir, case_id),), (properties,))
        path = out_dir / f"{case_id}{segmentation_suffix(ending)}"
        if keep_probabilities:
            probabilities = predictor.to_original(prepared, predictor.run_networks(prepared))
            save_npz(out_dir / f"{case_id}.npz", probabilities)
            segmentation = export_segmentation(probabilities, geometry, path)
            del probabilities
        else:
            segmentation = write_segmentation(predictor.segment(prepared).labels, geometry, path)
        reference = read_case_label(cases[case_id])
        per_case[case_id] = evaluate_case(segmentation, reference, geometry.spacing, labels)
    mean = nan_to_none(mean_per_label(per_case, labels))
    for key in mean:
        mean[key]["name"] = plans.labels[int(key)]
    dices = [m["dice"] for m in mean.values() if m["dice"] is not None]
    summary = {"format_version": 1, "configuration": configuration, "mirroring": window.mirroring,
               "probabilities_saved": bool(keep_probabilities),
               "num_cases": len(per_case), "mean": mean,
               "foreground_mean_dice": float(np.mean(dices)) if dices else None,
               "cases": nan_to_none(per_case)}
    write_json(out_dir / "summary.json", summary)
    return summary
