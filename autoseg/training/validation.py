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
from autoseg.inference.export import (LabelMapBuilder, export_segmentation, logits_to_original,
                                      segmentation_suffix, write_segmentation)
from autoseg.inference.export import save_probabilities as save_npz
from autoseg.inference.predictor import add_slabs
from autoseg.inference.sliding_window import accumulator_dtype_for, sliding_window_predict, sliding_window_slabs
from autoseg.network.low_memory import inference_forward
from autoseg.network.unet import UNet
from autoseg.preprocessing import store

log = logging.getLogger(__name__)


def validate_fold(network: torch.nn.Module, workdir: Path, plans: dict, configuration: str, val_ids: list[str],
                  out_dir: Path, device: torch.device, mirroring: bool = True, progress: bool = True,
                  mixed_precision: bool = True, save_probabilities: bool | None = None) -> dict:
    """Dice (and the other metrics) per validation case and label, and their means.

    Each case's label map is written beside `summary.json`. Its probabilities on the input grid
    (`<case>.npz`, float16) are written only with `save_probabilities`, which `autoseg crossval` needs to
    score ensembles of configurations; None (the default) writes them when the plans have more than one
    configuration. Without them, the label map is built slab by slab as `autoseg predict` builds it,
    so a large case needs no per-label probabilities of its full size (docs/prediction.md).
    """
    if save_probabilities is None:
        save_probabilities = len(plans["configurations"]) > 1
    config = plans["configurations"][configuration]
    data_dir = workspace.preprocessed_dir(workdir, config["data_identifier"])
    raw = read_json(workspace.dataset_json(workdir))
    dataset = load_dataset(raw["root"])
    cases = {c.case_id: c for c in dataset.cases}
    labels = [int(k) for k in plans["labels"] if int(k) > 0]
    ending = raw.get("file_ending", ".nii.gz")
    network.eval()
    # As `autoseg predict` runs the windows (large ones through low_memory_forward).
    forward = inference_forward(network, config["patch_size"], device) if isinstance(network, UNet) else network
    window = dict(patch_size=config["patch_size"], num_classes=len(plans["labels"]),
                  mirror_axes=tuple(range(len(config["patch_size"]))) if mirroring else None, device=device,
                  use_amp=mixed_precision, accumulator_dtype=accumulator_dtype_for(mixed_precision))
    per_case = {}
    for case_id in tqdm(val_ids, desc="validation", unit="case", disable=not progress):
        image = torch.from_numpy(store.load_case_image(data_dir, case_id))
        properties = store.load_properties(data_dir, case_id)
        geometry = Geometry.from_json(properties["original_geometry"])
        path = out_dir / f"{case_id}{segmentation_suffix(ending)}"
        if save_probabilities:
            # Kept so `autoseg crossval` can score ensembles of configurations.
            logits = sliding_window_predict(forward, image, **window).numpy()
            original = logits_to_original(logits, properties, plans)
            del logits
            save_npz(out_dir / f"{case_id}.npz", original)
            segmentation = export_segmentation(original, geometry, path)
            del original
        else:
            builder = LabelMapBuilder([properties], plans, len(plans["labels"]))
            if builder.streams:
                add_slabs(builder, [sliding_window_slabs(forward, image, **window)])
            else:
                builder.add(0, [sliding_window_predict(forward, image, **window).numpy()])
            segmentation = write_segmentation(builder.labels, geometry, path)
            del builder
        reference = read_case_label(cases[case_id])
        per_case[case_id] = evaluate_case(segmentation, reference, geometry.spacing, labels)
    mean = nan_to_none(mean_per_label(per_case, labels))
    for key in mean:
        mean[key]["name"] = plans["labels"][key]
    dices = [m["dice"] for m in mean.values() if m["dice"] is not None]
    summary = {"format_version": 1, "configuration": configuration, "mirroring": mirroring,
               "probabilities_saved": bool(save_probabilities),
               "num_cases": len(per_case), "mean": mean,
               "foreground_mean_dice": float(np.mean(dices)) if dices else None,
               "cases": nan_to_none(per_case)}
    write_json(out_dir / "summary.json", summary)
    return summary
