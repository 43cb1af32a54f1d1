"""End-of-training validation: predict each validation case at full size, export it to the original
geometry and score it against the original label file (`validation/summary.json`)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from autoseg import workspace
from autoseg.atomic import read_json, write_json
from autoseg.dataset.image_io import Geometry
from autoseg.dataset.layout import load_dataset, read_case_label
from autoseg.evaluation import evaluate_case, mean_per_label, nan_to_none
from autoseg.inference.export import (export_segmentation, probabilities_to_original, save_probabilities,
                                      segmentation_suffix)
from autoseg.inference.sliding_window import sliding_window_predict
from autoseg.preprocessing import store

log = logging.getLogger(__name__)


def validate_fold(network: torch.nn.Module, workdir: Path, plans: dict, configuration: str, val_ids: list[str],
                  out_dir: Path, device: torch.device, mirroring: bool = True, progress: bool = True,
                  mixed_precision: bool = True) -> dict:
    """Dice (and the other metrics) per validation case and label, and their means."""
    config = plans["configurations"][configuration]
    data_dir = workspace.preprocessed_dir(workdir, config["data_identifier"])
    raw = read_json(workspace.dataset_json(workdir))
    dataset = load_dataset(raw["root"])
    cases = {c.case_id: c for c in dataset.cases}
    labels = [int(k) for k in plans["labels"] if int(k) > 0]
    ending = raw.get("file_ending", ".nii.gz")
    network.eval()
    per_case = {}
    for case_id in tqdm(val_ids, desc="validation", unit="case", disable=not progress):
        image = torch.from_numpy(store.load_case_image(data_dir, case_id))
        properties = store.load_properties(data_dir, case_id)
        logits = sliding_window_predict(network, image, config["patch_size"], len(plans["labels"]),
                                        mirror_axes=tuple(range(len(config["patch_size"]))) if mirroring else None,
                                        device=device, use_amp=mixed_precision)
        probabilities = torch.softmax(logits, 0).numpy()
        geometry = Geometry.from_json(properties["original_geometry"])
        original = probabilities_to_original(probabilities, properties, plans)
        # Probabilities are kept so `autoseg crossval` can score ensembles of configurations.
        save_probabilities(out_dir / f"{case_id}.npz", original)
        segmentation = export_segmentation(original, geometry, out_dir / f"{case_id}{segmentation_suffix(ending)}")
        reference = read_case_label(cases[case_id])
        per_case[case_id] = evaluate_case(segmentation, reference, geometry.spacing, labels)
    mean = nan_to_none(mean_per_label(per_case, labels))
    for key in mean:
        mean[key]["name"] = plans["labels"][key]
    dices = [m["dice"] for m in mean.values() if m["dice"] is not None]
    summary = {"format_version": 1, "configuration": configuration, "mirroring": mirroring,
               "num_cases": len(per_case), "mean": mean,
               "foreground_mean_dice": float(np.mean(dices)) if dices else None,
               "cases": nan_to_none(per_case)}
    write_json(out_dir / "summary.json", summary)
    return summary
