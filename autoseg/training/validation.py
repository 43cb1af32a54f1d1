"""End-of-training validation: predict each validation case at full size through the same `Predictor`
`autoseg predict` uses, export it to the original geometry and score it against the original label
file (`validation/summary.json`). In a cascade, the first stage's validation also writes its label
maps for the second stage's training (training/cascade.py), and the second stage's validation reads
them as its extra input."""

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
from autoseg.inference.instance_maps import write_instances
from autoseg.inference.original_grid import save_probabilities as save_npz
from autoseg.inference.original_grid import segmentation_suffix, write_segmentation
from autoseg.inference.predictor import Predictor, PreparedCase
from autoseg.inference.settings import ComputeSettings, WindowSettings
from autoseg.planning.plans import Plans
from autoseg.preprocessing import store
from autoseg.preprocessing.preprocess import label_to_network_grid, one_hot_labels
from autoseg.training.cascade import load_next_stage, next_stage_path, save_next_stage

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
    structures = plans.scored_structures  # labels, or regions; object rims (instance segmentation) never
    ending = raw.get("file_ending", ".nii.gz")
    config = plans.configuration(configuration)
    next_stages = [name for name, c in plans.configurations.items() if c.previous_stage == configuration]
    per_case = {}
    for case_id in tqdm(val_ids, desc="validation", unit="case", disable=not progress):
        properties = store.load_properties(data_dir, case_id)
        geometry = properties.original_geometry
        image = store.load_case_image(data_dir, case_id)
        if config.previous_stage is not None:
            previous = load_next_stage(next_stage_path(workdir, config.previous_stage, configuration, case_id))
            image = np.concatenate([image, one_hot_labels(previous, plans.foreground_labels)])
        prepared = PreparedCase(geometry, (configuration,), (image,), (properties,))
        path = out_dir / f"{case_id}{segmentation_suffix(ending)}"
        if keep_probabilities:
            logits = predictor.run_networks(prepared)
            save_npz(out_dir / f"{case_id}.npz", predictor.to_original(prepared, logits))
            predicted = predictor.segment_logits(prepared, logits)
            del logits
        else:
            predicted = predictor.segment(prepared)
        segmentation = write_segmentation(predicted.labels, geometry, path)
        if predicted.instances is not None:
            write_instances(predicted.instances, segmentation, geometry, case_id, path, plans.output_labels)
        for name in next_stages:
            _write_for_next_stage(segmentation, workdir, plans, configuration, name, case_id)
        reference = read_case_label(cases[case_id])
        per_case[case_id] = evaluate_case(segmentation, reference, geometry.spacing, structures, plans.ignore_label)
    mean = nan_to_none(mean_per_label(per_case, list(structures)))
    for key in mean:
        mean[key]["name"] = plans.output_labels[int(key)]
    dices = [m["dice"] for m in mean.values() if m["dice"] is not None]
    summary = {"format_version": 1, "configuration": configuration, "mirroring": window.mirroring,
               "probabilities_saved": bool(keep_probabilities),
               "num_cases": len(per_case), "mean": mean,
               "foreground_mean_dice": float(np.mean(dices)) if dices else None,
               "cases": nan_to_none(per_case)}
    write_json(out_dir / "summary.json", summary)
    return summary


def _write_for_next_stage(segmentation: np.ndarray, workdir: Path, plans: Plans, configuration: str, next_stage: str,
                          case_id: str) -> None:
    """This stage's label map of a validation case, on the next stage's grid, for the next stage's training."""
    next_data = workspace.preprocessed_dir(workdir, plans.configuration(next_stage).data_identifier)
    try:
        properties = store.load_properties(next_data, case_id)
    except store.PreprocessedDataError:
        log.warning("%s: %s is not preprocessed, so this prediction is not kept for %s's training; run `autoseg "
                    "plan DATASET -o WORKDIR --steps preprocess` and validate this fold again", case_id, next_stage,
                    next_stage)
        return
    grid = label_to_network_grid(segmentation, properties, plans)
    save_next_stage(next_stage_path(workdir, configuration, next_stage, case_id), grid.astype(np.int16))
