"""Preprocess cases exactly as the plan says: crop, normalize, transpose, resample, store."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Sequence

import numpy as np

from autoseg.dataset.image_io import Geometry
from autoseg.dataset.layout import Case, Dataset, read_case_image, read_case_instances, read_case_label
from autoseg.dataset.regions import Region
from autoseg.errors import AutosegError
from autoseg.parallel import map_cases
from autoseg.planning.plans import Plans
from autoseg.preprocessing import store
from autoseg.preprocessing.cropping import crop, mark_outside_mask, nonzero_bounding_box, nonzero_mask
from autoseg.preprocessing.instance_targets import boundary_target
from autoseg.preprocessing.normalization import NormalizationError, normalize
from autoseg.preprocessing.properties import CaseProperties
from autoseg.preprocessing.resampling import new_shape_for, resample_image, resample_label, separate_axis_for
from autoseg.workspace import preprocessed_dir

log = logging.getLogger(__name__)

# Voxel coordinates kept per label for foreground oversampling, as nnU-Net v2.8.1: up to 10,000, and
# at least 1% of the label's voxels, drawn with its seed.
LOCATIONS_PER_LABEL = 10_000
LOCATIONS_MIN_FRACTION = 0.01
LOCATIONS_SEED = 1234
ANNOTATED = "annotated"  # with an ignore label: where random patches may start (every annotated voxel)
PREPROCESSING_VERSION = 4  # 2: -1 outside the non-zero mask, per-case separate axis, int16 seg for large label ids;
# 3: cubic resampling clipped to the input range, label ties to the nearest neighbour (both as nnU-Net v2);
# 4: foreground locations sampled as nnU-Net v2 (count, seed, the annotated voxels with an ignore label)


class PreprocessingError(AutosegError):
    """A case or plans.json that preprocessing cannot follow."""


def preprocessing_key(plans: Plans, configuration: str) -> str:
    """Short hash of every plan setting that shapes the preprocessed arrays (reasons left out), so data
    made under other plans, or by an older version of these rules, is never taken for complete."""
    def strip(d: dict) -> dict:
        return {k: v for k, v in d.items() if k != "reason"}

    config = plans.configuration(configuration)
    relevant = {"version": PREPROCESSING_VERSION, "transpose_forward": list(plans.transpose_forward),
                "data_identifier": config.data_identifier, "spacing": list(config.spacing),
                "normalization": [strip(n.to_json()) for n in plans.normalization],
                "resampling": strip(plans.resampling.to_json()),
                "seg_dtype": np.dtype(seg_dtype(plans.labels)).name,
                # instance segmentation changes the stored labels (object rims); plans without it keep their hash
                **({"instances": plans.instances.to_json() | {"reason": None}} if plans.instances else {}),
                # regions change the stored foreground locations (one entry per region)
                **({"regions": [r.to_json() for r in plans.regions]} if plans.regions else {})}
    return hashlib.sha1(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def is_current(folder: Path, case_id: str, key: str) -> bool:
    """Complete and made with the current plans."""
    if not store.is_complete(folder, case_id):
        return False
    try:
        return store.load_properties(folder, case_id).preprocessing_key == key
    except store.PreprocessedDataError:  # damaged or foreign properties: the case is done again
        return False


def seg_dtype(labels: dict) -> type[np.integer]:
    """int8 when every label id of the plans' labels fits it, else int16 (-1 marks outside the data)."""
    largest = max(int(k) for k in labels)
    if largest > np.iinfo(np.int16).max:
        raise PreprocessingError(f"label id {largest} in plans.json does not fit int16 (at most 32767); "
                                 f"renumber the labels")
    return np.int8 if largest <= np.iinfo(np.int8).max else np.int16


def target_spacing_for(config_spacing: tuple[float, ...], case_spacing: tuple[float, ...]) -> tuple[float, ...]:
    """A 3D configuration's spacing, or for "2d" (in-plane spacing only) the case's own axis-0 spacing
    followed by the plan's in-plane spacing: slices are never resampled across."""
    if len(config_spacing) == len(case_spacing):
        return tuple(float(s) for s in config_spacing)
    if len(config_spacing) == len(case_spacing) - 1:
        return (float(case_spacing[0]), *(float(s) for s in config_spacing))
    raise PreprocessingError(f"plans.json spacing {config_spacing} has {len(config_spacing)} entries; a "
                             f"{len(case_spacing)}D case needs {len(case_spacing)} (or {len(case_spacing) - 1} for 2d)")


def preprocess_case(image: np.ndarray, label: np.ndarray | None, geometry: Geometry, plans: Plans,
                    configuration: str, instances: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray | None, CaseProperties]:
    """One case (C, Z, Y, X) in file orientation -> network-ready arrays and the properties to go back.

    Crop to the non-zero region, normalize (inside the hole-filled non-zero mask where planned),
    transpose, resample (the thick axis apart, decided for this case). The seg (1, Z, Y, X) holds -1
    where the case is background outside the mask. Used by both `autoseg plan` and `autoseg predict`,
    so prediction sees exactly the training preprocessing. With the plans' instance segmentation,
    `instances` (the case's instance map) draws the object rims into the labels (instance_targets.py).
    """
    config = plans.configuration(configuration)
    transpose = plans.transpose_forward
    r = plans.resampling
    bbox = nonzero_bounding_box(image)
    image = crop(image, bbox).astype(np.float32, copy=True)
    mask = nonzero_mask(image)
    normalize(image, mask, plans.normalization)
    image = image.transpose(0, *(a + 1 for a in transpose))
    spacing = tuple(float(geometry.spacing[a]) for a in transpose)
    target_spacing = target_spacing_for(config.spacing, spacing)
    shape = new_shape_for(image.shape[1:], spacing, target_spacing)
    axis = separate_axis_for(spacing, target_spacing, r.anisotropy_threshold)
    image = np.ascontiguousarray(resample_image(image, shape, r.image_order, axis, r.thick_axis_order))
    properties = CaseProperties(
        original_geometry=geometry,
        nonzero_bbox=tuple((int(lo), int(hi)) for lo, hi in bbox),
        shape_after_crop=tuple(int(hi - lo) for lo, hi in bbox),
        shape_after_resampling=tuple(int(s) for s in shape),
        spacing=tuple(float(s) for s in target_spacing),
        preprocessing_key=preprocessing_key(plans, configuration),
    )
    seg = None
    if label is not None:
        dtype = seg_dtype(plans.labels)
        seg = crop(label, bbox)
        if seg.size and (seg.min() < 0 or seg.max() > np.iinfo(dtype).max):
            raise PreprocessingError(f"label values [{seg.min()}, {seg.max()}] do not fit {np.dtype(dtype).name} "
                                     f"(plans.json's largest label id is {max(plans.labels)}); "
                                     f"check the label file against dataset.json")
        seg = mark_outside_mask(seg, mask).transpose(*transpose)
        if plans.instances is not None:
            if instances is None:
                raise PreprocessingError("the plans train object boundaries (instance_segmentation) but no "
                                         "instance map was given")
            rims = crop(np.asarray(instances)[None], bbox)[0].transpose(*transpose)
            seg = boundary_target(seg, rims, plans.instances.boundary_label, in_plane=config.ndim == 2)
        seg = resample_label(seg, shape, r.label_order, axis, r.thick_axis_order)
        seg = np.ascontiguousarray(seg)[None].astype(dtype)
        locations = sample_class_locations(seg[0], plans.ignore_label, plans.regions)
        properties = replace(properties, class_locations=locations)
    return image, seg, properties


def label_to_network_grid(label: np.ndarray, properties: CaseProperties, plans: Plans) -> np.ndarray:
    """A label map on the case's original grid (Z, Y, X) -> the grid of its preprocessed data, as `preprocess_case`
    takes the training labels there (crop, transpose, label resampling): how a cascade's second stage gets the
    first stage's prediction, in training and in prediction alike."""
    r = plans.resampling
    transpose = plans.transpose_forward
    seg = crop(np.asarray(label)[None], properties.nonzero_bbox)[0].transpose(*transpose)
    spacing = tuple(float(properties.original_geometry.spacing[a]) for a in transpose)
    axis = separate_axis_for(spacing, tuple(properties.spacing), r.anisotropy_threshold)
    return np.ascontiguousarray(resample_label(seg, properties.shape_after_resampling, r.label_order, axis,
                                               r.thick_axis_order))


def one_hot_labels(labels: np.ndarray, foreground: Sequence[int]) -> np.ndarray:
    """(n_foreground, *spatial) float32, 1 where the voxel has that label (-1 and 0 are all zeros): a cascade's
    first-stage labels as its second stage's extra input channels."""
    return np.stack([labels == label for label in foreground]).astype(np.float32)


def sample_class_locations(seg: np.ndarray, ignore_label: int | None = None,
                           regions: Sequence[Region] = ()) -> dict[str, np.ndarray]:
    """Stored voxels per foreground label of a (Z, Y, X) seg as (N, 3) arrays, the same voxels in the same order as
    nnU-Net v2.8.1.

    Labels are visited in ascending order, all drawing from one `RandomState(1234)`; each keeps
    min(10,000, its voxel count) but at least 1% of its voxels. With an ignore label, it is not a
    foreground label, and a last entry `"annotated"` samples every annotated voxel (labels -1, 0, 1, ...
    in that order, as nnU-Net's region `[-1] + all_labels`), where random patches are centred so they
    hold something to learn from. Labels absent from the seg are left out. With `regions`, each region
    takes the place of a label, keyed by the id it is written as, and draws from the voxels of its labels
    (label by label in the region's order, as nnU-Net's regions).
    """
    rng = np.random.RandomState(LOCATIONS_SEED)
    present = [int(v) for v in np.unique(seg)]
    foreground = [v for v in present if v > 0 and v != ignore_label]
    wanted = foreground if ignore_label is None else [v for v in present if v != ignore_label]
    coords_by_label = {v: np.argwhere(seg == v) for v in wanted}
    if regions:
        groups = {str(r.written_as): [v for v in r.labels if v in coords_by_label] for r in regions}
    else:
        groups = {str(v): [v] for v in foreground}

    def draw(coords: np.ndarray) -> np.ndarray:
        count = max(min(LOCATIONS_PER_LABEL, len(coords)), int(np.ceil(len(coords) * LOCATIONS_MIN_FRACTION)))
        return coords[rng.choice(len(coords), count, replace=False)]

    locations = {key: draw(np.concatenate([coords_by_label[v] for v in members]))
                 for key, members in groups.items() if members}
    if ignore_label is not None and wanted:
        locations[ANNOTATED] = draw(np.concatenate([coords_by_label[v] for v in sorted(wanted)]))
    return locations


def _preprocess_job(args: tuple[Case, int, Plans, Sequence[tuple[str, Path]]]) -> str:
    """One case for every configuration listed with its data folder: the files are read once."""
    case, num_channels, plans, targets = args
    image, geometry = read_case_image(case, num_channels)
    label = read_case_label(case) if case.label_file is not None else None
    instances = read_case_instances(case, label) if label is not None and plans.instances is not None else None
    spacing = tuple(float(geometry.spacing[a]) for a in plans.transpose_forward)
    made: dict[tuple, tuple] = {}  # configurations that resample this case alike get the same arrays
    for configuration, folder in targets:
        config = plans.configuration(configuration)
        alike = (target_spacing_for(config.spacing, spacing), config.ndim if plans.instances is not None else None)
        if alike in made:
            data, seg, properties = made[alike]
            properties = replace(properties, preprocessing_key=preprocessing_key(plans, configuration))
        else:
            try:
                data, seg, properties = preprocess_case(image, label, geometry, plans, configuration, instances)
            except (NormalizationError, PreprocessingError) as exc:
                raise PreprocessingError(f"case {case.case_id}: {exc}") from exc
            made[alike] = (data, seg, properties)
        store.save_case(folder, case.case_id, data, seg, replace(properties, case_id=case.case_id),
                        patch_size=config.patch_size)
    return case.case_id


def preprocess_dataset(dataset: Dataset, plans: Plans, workdir: Path, configurations: list[str] | None = None,
                       workers: int = 1, progress: bool = True) -> dict[str, int]:
    """Preprocess every case for each configuration's data (shared between configurations that use the
    same data), reading each case's files once for all of them. Cases already complete are skipped, so
    an interrupted run resumes. Returns the number of cases written per data folder."""
    configs = list(plans.configurations) if configurations is None else configurations
    done_ids: dict[str, str] = {}
    for name in configs:
        done_ids.setdefault(plans.configuration(name).data_identifier, name)
    todo: dict[str, list[tuple[str, Path]]] = {}  # case id -> (configuration, folder) still to write
    written = {}
    for identifier, name in done_ids.items():
        folder = preprocessed_dir(workdir, identifier)
        key = preprocessing_key(plans, name)
        missing = [c.case_id for c in dataset.cases if not is_current(folder, c.case_id, key)]
        skipped = len(dataset.cases) - len(missing)
        if skipped:
            log.info("%s: %d case(s) already preprocessed, %d to do", folder, skipped, len(missing))
        for case_id in missing:
            todo.setdefault(case_id, []).append((name, folder))
        written[identifier] = len(missing)
    jobs = [(c, dataset.num_channels, plans, todo[c.case_id]) for c in dataset.cases if c.case_id in todo]
    if jobs:
        map_cases(_preprocess_job, jobs, workers, f"preprocess {', '.join(done_ids)}", progress, chunksize=2)
    return written
