"""Preprocess cases exactly as the plan says: crop, transpose, normalize, resample, store."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from autoseg.dataset.image_io import Geometry
from autoseg.dataset.layout import Case, Dataset, read_case_image, read_case_label
from autoseg.parallel import map_cases
from autoseg.planning.planner import PlanError
from autoseg.preprocessing import store
from autoseg.preprocessing.cropping import crop, nonzero_bounding_box
from autoseg.preprocessing.normalization import normalize
from autoseg.workspace import preprocessed_dir
from autoseg.preprocessing.resampling import new_shape_for, resample_image, resample_label

log = logging.getLogger(__name__)

LOCATIONS_PER_LABEL = 2000  # voxel coordinates kept per label for foreground oversampling


def preprocessing_key(plans: dict, configuration: str) -> str:
    """Short hash of every plan setting that shapes the preprocessed arrays (reasons left out), so data
    made under other plans is never taken for complete."""
    strip = lambda d: {k: v for k, v in d.items() if k != "reason"}  # noqa: E731
    relevant = {"transpose_forward": plans["transpose_forward"], "spacing": plans["configurations"][configuration]["spacing"],
                "normalization": [strip(n) for n in plans["normalization"]], "resampling": strip(plans["resampling"])}
    return hashlib.sha1(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def is_current(folder: Path, case_id: str, key: str) -> bool:
    """Complete and made with the current plans."""
    return store.is_complete(folder, case_id) and store.load_properties(folder, case_id).get("preprocessing_key") == key


def preprocess_case(image: np.ndarray, label: np.ndarray | None, geometry: Geometry, plans: dict,
                    configuration: str) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """One case (C, Z, Y, X) in file orientation -> network-ready arrays and the properties to go back.

    Used by both `autoseg plan` and `autoseg predict`, so prediction sees exactly the training
    preprocessing.
    """
    config = plans["configurations"][configuration]
    transpose = plans["transpose_forward"]
    bbox = nonzero_bounding_box(image)
    image = crop(image, bbox).astype(np.float32, copy=True)
    nonzero_mask = np.any(image != 0, axis=0)
    normalize(image, nonzero_mask, plans["normalization"])
    image = image.transpose(0, *(a + 1 for a in transpose))
    spacing = tuple(geometry.spacing[a] for a in transpose)
    target_spacing = tuple(config["spacing"])
    shape = new_shape_for(image.shape[1:], spacing, target_spacing)
    r = plans["resampling"]
    image = np.ascontiguousarray(resample_image(image, shape, r["image_order"], r["thick_axis_order"]))
    properties = {
        "original_geometry": geometry.to_json(),
        "nonzero_bbox": [list(b) for b in bbox],
        "shape_after_crop": [hi - lo for lo, hi in bbox],
        "shape_after_resampling": list(shape),
        "spacing": list(target_spacing),
        "preprocessing_key": preprocessing_key(plans, configuration),
    }
    seg = None
    if label is not None:
        seg = crop(label, bbox).transpose(*transpose)
        seg = np.ascontiguousarray(resample_label(seg, shape, r["label_order"]))[None].astype(np.int8)
        properties["class_locations"] = _sample_class_locations(seg[0], seed=int(np.prod(shape)) % (2 ** 31))
    return image, seg, properties


def _sample_class_locations(seg: np.ndarray, seed: int) -> dict[str, list[list[int]]]:
    rng = np.random.default_rng(seed)
    locations = {}
    for value in np.unique(seg):
        if value <= 0:
            continue
        coords = np.argwhere(seg == value)
        if len(coords) > LOCATIONS_PER_LABEL:
            coords = coords[rng.choice(len(coords), LOCATIONS_PER_LABEL, replace=False)]
        locations[str(int(value))] = coords.tolist()
    return locations


def _preprocess_job(args: tuple[Case, int, dict, str, Path]) -> str:
    case, num_channels, plans, configuration, folder = args
    image, geometry = read_case_image(case, num_channels)
    label = read_case_label(case) if case.label_file is not None else None
    data, seg, properties = preprocess_case(image, label, geometry, plans, configuration)
    store.save_case(folder, case.case_id, data, seg, {"case_id": case.case_id, **properties})
    return case.case_id


def preprocess_dataset(dataset: Dataset, plans: dict, workdir: Path, configurations: list[str] | None = None,
                       workers: int = 1, progress: bool = True) -> dict[str, int]:
    """Preprocess every case for each configuration's data (shared between configurations that use the
    same data). Cases already complete are skipped, so an interrupted run resumes. Returns the number
    of cases written per data folder."""
    configs = list(plans["configurations"]) if configurations is None else configurations
    done_ids: dict[str, str] = {}
    for name in configs:
        if name not in plans["configurations"]:
            raise PlanError(f"configuration '{name}' is not in plans.json (has {', '.join(plans['configurations'])})")
        done_ids.setdefault(plans["configurations"][name]["data_identifier"], name)
    written = {}
    for identifier, name in done_ids.items():
        folder = preprocessed_dir(workdir, identifier)
        key = preprocessing_key(plans, name)
        todo = [c for c in dataset.cases if not is_current(folder, c.case_id, key)]
        skipped = len(dataset.cases) - len(todo)
        if skipped:
            log.info("%s: %d case(s) already preprocessed, %d to do", folder, skipped, len(todo))
        jobs = [(c, dataset.num_channels, plans, name, folder) for c in todo]
        map_cases(_preprocess_job, jobs, workers, f"preprocess {identifier}", progress, chunksize=2)
        written[identifier] = len(jobs)
    return written
