"""The Python API: load a trained model once, then segment many images in the same process.

A service or a notebook pays start-up, weight loading and archive verification once, in
`load_model`, instead of once per `autoseg predict` call. Each call runs what `autoseg predict`
runs for one case (the same preprocessing, sliding window, ensemble, resampling and
postprocessing rules), so the labels are those `autoseg predict` writes (tests/test_api.py).

    from autoseg.api import load_model

    model = load_model("work")                      # a workspace, or a model archive (.zip)
    result = model.segment_file("case.nii.gz")      # or model.segment(array, spacing=(3.0, 0.8, 0.8))
    result.labels                                   # (Z, Y, X) label ids on the input's grid
    model.write(result, "case_seg.nii.gz")          # with the input's geometry (and instance map)
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from autoseg import workspace
from autoseg.dataset.image_io import PSEUDO_SPACING_2D, Geometry, write_image
from autoseg.dataset.regions import ids_mask
from autoseg.errors import AutosegError
from autoseg.inference.inputs import InputCase, read_input_case
from autoseg.inference.predictor import Predictor
from autoseg.inference.settings import ComputeSettings, ModelChoice, WindowSettings
from autoseg.postprocessing import apply_postprocessing, load_postprocessing_rules

log = logging.getLogger(__name__)


class ModelLoadError(AutosegError):
    """A model path that is neither a workspace with trained folds nor a model archive."""


@dataclass(frozen=True)
class Segmentation:
    """One image segmented: labels on the input's grid, postprocessed as `autoseg predict` does."""

    labels: np.ndarray  # (Z, Y, X) uint8 (uint16 beyond 256 labels); a 2D image has Z = 1
    geometry: Geometry  # the input's grid
    label_names: dict[int, str]
    instances: np.ndarray | None = None  # one id per object, with instance segmentation (docs/instances.md)
    uncertainty: dict[int, float] | None = None  # per label, with an ensemble of >= 2 networks (docs/prediction.md)
    # Region-based models: label id -> the ids its region unites (docs/datasets.md); None: each label is itself
    regions: dict[int, tuple[int, ...]] | None = None

    def volume_ml(self, label: int) -> float:
        """The label's volume in millilitres (a 2D image: its area in mm^2 / 1000, as if 1 mm thick); for a
        region-based model, the volume of the region written as `label` (the whole tumour, not its outer shell)."""
        spacing = self.geometry.spacing[1:] if self.geometry.is_2d else self.geometry.spacing
        ids = (self.regions or {}).get(label, (label,))
        return float(np.count_nonzero(ids_mask(self.labels, ids)) * np.prod(spacing) / 1000.0)


class SegmentationModel:
    """Trained folds held in memory; `segment` and `segment_file` may be called any number of times."""

    def __init__(self, predictor: Predictor, rules: dict | None):
        self.predictor = predictor
        self.rules = rules

    @property
    def channel_names(self) -> tuple[str, ...]:
        return self.predictor.plans.channel_names

    @property
    def label_names(self) -> dict[int, str]:
        return dict(self.predictor.plans.output_labels)

    def segment(self, image: np.ndarray, spacing: Sequence[float] | None = None,
                geometry: Geometry | None = None) -> Segmentation:
        """Segment an array: (C, Z, Y, X), or (Z, Y, X) for a one-channel model, or (Y, X) / (C, Y, X) for a 2D
        image. `spacing` (mm, along the array's axes) or a full `geometry` place it; a 2D image needs neither."""
        image = np.asarray(image, dtype=np.float32)
        channels = len(self.channel_names)
        if image.ndim == 2 or (image.ndim == 3 and channels > 1 and image.shape[0] == channels and geometry is None
                               and (spacing is None or len(spacing) == 2)):
            image = image[None] if image.ndim == 2 else image
            image = image[:, None]  # (C, 1, Y, X): a picture
            in_plane = tuple(float(s) for s in (spacing or (1.0, 1.0)))
            spacing = (PSEUDO_SPACING_2D, *in_plane)
        elif image.ndim == 3:
            image = image[None]
        if image.ndim != 4 or image.shape[0] != channels:
            raise ValueError(f"image of shape {list(image.shape)}: the model takes {channels} channel(s) "
                             f"({', '.join(self.channel_names)}) as (C, Z, Y, X)")
        if geometry is None:
            spacing = tuple(float(s) for s in (spacing or (1.0, 1.0, 1.0)))
            if len(spacing) != 3:
                raise ValueError(f"spacing {list(spacing)}: give one value per axis (Z, Y, X)")
            geometry = Geometry(spacing, (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
                                tuple(int(s) for s in image.shape[1:]))
        prepared = self.predictor.prepare(image, geometry)
        predicted = self.predictor.segment(prepared)
        labels = predicted.labels if self.rules is None else apply_postprocessing(predicted.labels, self.rules)
        instances = None
        if predicted.instances is not None:
            instances = np.where(labels > 0, predicted.instances, 0)
        plans = self.predictor.plans
        return Segmentation(labels, geometry, self.label_names, instances, predicted.uncertainty,
                            plans.scored_structures if plans.regions else None)

    def segment_file(self, *files: Path | str) -> Segmentation:
        """Segment an image file: one file holding every channel, or one file per channel in channel order."""
        paths = tuple(Path(f) for f in files)
        if not paths:
            raise ValueError("segment_file needs at least one image file")
        image, geometry = read_input_case(InputCase(paths[0].name, paths), len(self.channel_names))
        return self.segment(image, geometry=geometry)

    def write(self, segmentation: Segmentation, path: Path | str) -> Path:
        """Write the label map on its input's grid in the format `path` names (and `<name>_instances` beside it
        when there are objects)."""
        from autoseg.inference.instance_maps import instances_path, relabel_sequential

        path = Path(path)
        write_image(path, segmentation.labels, segmentation.geometry)
        if segmentation.instances is not None:
            write_image(instances_path(path), relabel_sequential(segmentation.instances), segmentation.geometry)
        return path


def load_model(model: Path | str, configurations: Sequence[str] | None = None, folds: Sequence[str] | None = None,
               checkpoint: str = "final", device: str | None = None, mixed_precision: bool = True,
               runtime: str = "auto", mirroring: bool = True, step_size: float = 0.5,
               cache_dir: Path | str | None = None) -> SegmentationModel:
    """Load a workspace's trained folds, or a model archive (verified and extracted once under `cache_dir`, default
    the system's temporary folder), with `autoseg predict`'s defaults: the plans' default configuration, every
    trained fold, checkpoint_final, mirroring, step 0.5, mixed precision where the device computes it natively,
    runtime auto (ComputeSettings.runtime says what it picks)."""
    model = Path(model)
    if model.is_file():
        from autoseg.model_archive import model_workspace

        folder, manifest = model_workspace(model, Path(cache_dir) if cache_dir is not None
                                           else Path(tempfile.gettempdir()))
        configurations = configurations or manifest["configurations"]  # the archive's, as `autoseg predict --model`
    elif workspace.plans_json(model).is_file():
        folder = model
    else:
        raise ModelLoadError(f"{model}: neither a model archive nor a workspace with plans.json")
    choice = ModelChoice(None if configurations is None else tuple(configurations),
                         None if folds is None else tuple(str(f) for f in folds), checkpoint,
                         read_only=model.is_file())  # an archive's extraction stays as verified
    predictor = Predictor(folder, choice, WindowSettings(step_size=step_size, mirroring=mirroring),
                          ComputeSettings(device=device, mixed_precision=mixed_precision, runtime=runtime))
    rules_path = workspace.postprocessing_json(folder)
    rules = load_postprocessing_rules(rules_path) if rules_path.is_file() else None
    if rules is not None and sorted(rules.get("configuration") or predictor.configurations) != sorted(
            predictor.configurations):
        rules = None  # decided for another configuration list, as `autoseg predict` leaves it
    return SegmentationModel(predictor, rules)
