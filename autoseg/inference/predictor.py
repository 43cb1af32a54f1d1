"""Predict new images with the trained folds of one or more configurations, and write the results.

`Predictor` owns the networks (built once, kept in eval mode on the device) and splits a case into
steps so that `predict_folder` can overlap them: `prepare` (CPU: preprocessing exactly as in
training), `segment` (device, then CPU: sliding window per fold, logits averaged over a
configuration's folds, resampled to the input's grid and softmaxed there, averaged over
configurations, as nnU-Net v2 ensembles; the label map taken label by label and, for one
configuration, slab by slab, so no per-label probabilities of the input's size are held;
docs/prediction.md), and writing. `run_networks` + `to_original` (`predict_case`) give the full
probabilities instead, for `--save-probabilities`.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm import tqdm

from autoseg import __version__, workspace
from autoseg.atomic import write_json
from autoseg.dataset.image_io import Geometry, write_image
from autoseg.device import choose_device, mixed_precision_available
from autoseg.inference.openvino_runtime import RUNTIMES, OpenVINONetwork, OpenVINOUnavailable
from autoseg.inference.export import (LabelMapBuilder, logits_to_original, save_probabilities,
                                      segmentation_suffix, write_segmentation)
from autoseg.inference.inputs import InputCase, InputError, discover_inputs, read_input_case
from autoseg.inference.sliding_window import accumulator_dtype_for, sliding_window_predict, sliding_window_slabs
from autoseg.inference.volumes import VolumeTable, structure_rows
from autoseg.network.low_memory import inference_forward
from autoseg.network.unet import UNetTopology, build_unet
from autoseg.planning.planner import load_plans
from autoseg.postprocessing import apply_postprocessing, load_postprocessing_rules
from autoseg.preprocessing.preprocess import preprocess_case
from autoseg.training.checkpoint import CheckpointError, load_checkpoint

log = logging.getLogger(__name__)

REPORT_FORMAT_VERSION = 1
OUTPUT_FORMATS = ("default", "dicom-seg")
# Flag a label for review when the ensemble's mean entropy over it exceeds this share of log(K). A starting
# point, not calibrated on any dataset: docs/prediction.md says how to choose it for a model.
DEFAULT_UNCERTAINTY_THRESHOLD = 0.1
# Which file each `checkpoint` choice loads, in order of preference: a fold whose training was
# stopped before the end has no checkpoint_final.pt, and then its latest state is used.
CHECKPOINT_FILES = {
    "final": ("checkpoint_final.pt", "checkpoint_latest.pt"),
    "latest": ("checkpoint_latest.pt",),
    "best": ("checkpoint_best.pt",),
}


class PredictorError(Exception):
    """Models that cannot be loaded as asked; the message names the file or folder and the fix."""


@dataclass(frozen=True)
class PreparedCase:
    """A case preprocessed for every configuration, with what is needed to go back to its grid."""

    geometry: Geometry
    configurations: tuple[str, ...]
    data: tuple[np.ndarray, ...]  # (C, *resampled) per configuration
    properties: tuple[dict, ...]


@dataclass(frozen=True)
class CaseSegmentation:
    """A predicted label map on the input's grid (before postprocessing) and how sure the ensemble was."""

    labels: np.ndarray  # (Z, Y, X) uint8 (uint16 beyond 256 classes)
    members: int  # networks averaged: folds x configurations
    # Per label present, mean entropy of the ensemble's probabilities over its voxels / log(K), in [0, 1];
    # None with a single member.
    uncertainty: dict[int, float] | None = None
    entropy: np.ndarray | None = None  # (Z, Y, X) float32 voxel entropy / log(K), when asked for


@dataclass(frozen=True)
class LoadedFold:
    configuration: str
    fold: str
    checkpoint: Path
    epoch: int | None
    network: Callable[[torch.Tensor], torch.Tensor]  # the module (or its low_memory_forward), or an OpenVINONetwork


class Predictor:
    """Holds the fold networks of one or more configurations; predicts cases."""

    def __init__(self, workdir: Path, configurations: Sequence[str] | None = None,
                 folds: Sequence[int | str] | None = None, checkpoint: str = "final",
                 device: str | torch.device | None = None, mirroring: bool = True, step_size: float = 0.5,
                 tiles_per_batch: int | None = None, mixed_precision: bool = True, runtime: str = "torch"):
        """`configurations=None` uses the plans' default_configuration (2d for 2D data, else 3d_fullres).
        `folds=None` uses every `fold_*` folder of each configuration. `checkpoint` is "final"
        (falls back to checkpoint_latest.pt where training did not finish), "latest" or "best".
        `runtime="openvino"` runs the networks in float32 through OpenVINO (CPU only; openvino_runtime.py)."""
        self.workdir = Path(workdir)
        plans_path = workspace.plans_json(self.workdir)
        self.plans = load_plans(plans_path)
        if configurations is None:
            if not self.plans.get("default_configuration"):
                raise PredictorError(f"{plans_path} names no default configuration; pass the configuration(s)")
            configurations = (self.plans["default_configuration"],)
        if not configurations:
            raise PredictorError("no configuration given; pass at least one, e.g. 3d_fullres")
        unknown = [c for c in configurations if c not in self.plans["configurations"]]
        if unknown:
            raise PredictorError(f"{plans_path}: has no configuration {', '.join(unknown)} "
                                 f"(it has {', '.join(self.plans['configurations'])})")
        if checkpoint not in CHECKPOINT_FILES:
            raise PredictorError(f"checkpoint must be one of {', '.join(CHECKPOINT_FILES)}, got {checkpoint!r}")
        label_ids = sorted(int(k) for k in self.plans["labels"])
        if label_ids != list(range(len(label_ids))):
            raise PredictorError(f"{plans_path}: label ids {label_ids} are not consecutive from 0; the network's "
                                 "class index is the label id, so relabel the dataset to 0..K-1 and plan again")
        self.configurations = tuple(dict.fromkeys(configurations))
        self.device = choose_device(device)
        if runtime not in RUNTIMES:
            raise PredictorError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
        if runtime == "openvino" and self.device.type != "cpu":
            raise PredictorError(f"the openvino runtime runs on the CPU; got device {self.device} (use --device cpu)")
        self.runtime = runtime
        self.mirroring = mirroring
        self.step_size = step_size
        self.tiles_per_batch = tiles_per_batch or (4 if self.device.type == "cuda" else 1)
        # float16 on CUDA; bfloat16 on a CPU that computes it natively (about 2x faster, same labels in practice)
        self.mixed_precision = mixed_precision and mixed_precision_available(self.device) and runtime == "torch"
        # The windows' running mean in float16 (nnU-Net's choice, half the largest array), unless --fp32.
        self.accumulator_dtype = accumulator_dtype_for(mixed_precision)
        self.checkpoint = checkpoint
        self.folds: list[LoadedFold] = []
        for name in self.configurations:
            for fold in _fold_names(self.workdir, name, folds):
                self.folds.append(self._load_fold(name, fold))
        log.info("predictor: %s on %s", ", ".join(f"{f.configuration}/fold_{f.fold} ({f.checkpoint.name})"
                                                   for f in self.folds), self.device)

    @property
    def num_channels(self) -> int:
        return len(self.plans["channel_names"])

    @property
    def num_classes(self) -> int:
        return len(self.plans["labels"])

    def _load_fold(self, configuration: str, fold: str) -> LoadedFold:
        folder = workspace.fold_dir(self.workdir, configuration, fold)
        candidates = [folder / name for name in CHECKPOINT_FILES[self.checkpoint]]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            raise PredictorError(f"{folder}: no {' or '.join(p.name for p in candidates)}; train this fold "
                                 "(`autoseg train`) or leave it out with --folds")
        if path != candidates[0]:
            log.warning("%s: no %s (training did not finish); using %s", folder, candidates[0].name, path.name)
        try:
            state = load_checkpoint(path)
        except CheckpointError as exc:
            raise PredictorError(str(exc)) from None
        if state.get("configuration", configuration) != configuration:
            raise PredictorError(f"{path}: trained for configuration {state['configuration']}, not {configuration}; "
                                 "the models folder is mixed up")
        config = self.plans["configurations"][configuration]
        topology = UNetTopology.from_plan(config, self.num_channels, self.num_classes)
        network = build_unet(topology, deep_supervision=False)
        weights = state["network_state"]
        try:
            network.load_state_dict(weights)
        except RuntimeError as exc:
            raise PredictorError(f"{path}: weights do not fit the network plans.json describes for {configuration} "
                                 f"(was the dataset planned again after training?): {str(exc).splitlines()[0][:200]}") from None
        # Default layout: channels_last_3d measured no faster for CPU inference (torch 2.13, U-Net 32..256, 48^3).
        network = network.to(self.device).eval()
        if self.runtime == "openvino":
            try:
                return LoadedFold(configuration, fold, path, state.get("epoch"),
                                  OpenVINONetwork(network, self.num_channels, config["patch_size"]))
            except OpenVINOUnavailable as exc:
                raise PredictorError(str(exc)) from None
        # Large windows: the same logits with a fraction of the activation memory (network/low_memory.py).
        return LoadedFold(configuration, fold, path, state.get("epoch"),
                          inference_forward(network, config["patch_size"], self.device))

    def prepare(self, image: np.ndarray, geometry: Geometry) -> PreparedCase:
        """Preprocess (C, Z, Y, X) for every configuration (CPU only; safe to run in a worker thread)."""
        image = np.asarray(image)
        if image.ndim != 4 or image.shape[0] != self.num_channels:
            raise ValueError(f"image must be (C, Z, Y, X) with C = {self.num_channels}, got shape {list(image.shape)}")
        if tuple(image.shape[1:]) != tuple(geometry.shape):
            raise ValueError(f"image shape {list(image.shape[1:])} differs from its geometry's shape {list(geometry.shape)}")
        data, properties, done = [], [], {}
        for name in self.configurations:
            identifier = self.plans["configurations"][name]["data_identifier"]
            if identifier not in done:  # configurations with the same data_identifier share their data
                done[identifier] = preprocess_case(image, None, geometry, self.plans, name)
            d, _, p = done[identifier]
            data.append(d)
            properties.append(p)
        return PreparedCase(geometry, self.configurations, tuple(data), tuple(properties))

    def run_networks(self, prepared: PreparedCase) -> list[np.ndarray]:
        """Per configuration, the logits in network space averaged over its folds (nnU-Net v2's fold ensemble)."""
        outputs = []
        for name, data in zip(prepared.configurations, prepared.data):
            image = torch.from_numpy(data)
            total, count = None, 0
            for fold in (f for f in self.folds if f.configuration == name):
                logits = self._sliding_window(fold, image)
                total = logits if total is None else total.add_(logits)
                count += 1
            outputs.append(total.div_(count).numpy())
        return outputs

    def segment(self, prepared: PreparedCase, entropy_map: bool = False) -> CaseSegmentation:
        """The label map on the input's grid, the argmax of `predict_case`'s probabilities, in bounded memory.

        One configuration: its folds' sliding windows run side by side and each finished z-slab is
        averaged, resampled and argmaxed at once, when the case's resampling allows it (see
        `LabelMapBuilder`); otherwise, and for several configurations, each configuration's probabilities
        are held in network space, and only one label at a time goes back to the input's grid.
        With >= 2 members, also the per-label uncertainty (and with `entropy_map` the voxel map).
        """
        members = len(self.folds)
        builder = LabelMapBuilder(prepared.properties, self.plans, self.num_classes, uncertainty=members > 1,
                                  entropy_map=entropy_map and members > 1)
        if not builder.streams:
            return self.segment_logits(prepared, self.run_networks(prepared), entropy_map)
        data = torch.from_numpy(prepared.data[0])
        add_slabs(builder, [self._sliding_window(fold, data, streaming=True) for fold in self.folds])
        return _segmentation(builder, members)

    def segment_logits(self, prepared: PreparedCase, logits: Sequence[np.ndarray],
                       entropy_map: bool = False) -> CaseSegmentation:
        """`segment` from `run_networks`'s logits (when the probabilities are needed too)."""
        members = len(self.folds)
        builder = LabelMapBuilder(prepared.properties, self.plans, self.num_classes, uncertainty=members > 1,
                                  entropy_map=entropy_map and members > 1)
        builder.add(0, logits)
        return _segmentation(builder, members)

    def _sliding_window(self, fold: LoadedFold, image: torch.Tensor, streaming: bool = False):
        patch = self.plans["configurations"][fold.configuration]["patch_size"]
        function = sliding_window_slabs if streaming else sliding_window_predict
        return function(fold.network, image, patch, self.num_classes, step_size=self.step_size,
                        mirror_axes=tuple(range(len(patch))) if self.mirroring else None,
                        tiles_per_batch=self.tiles_per_batch, device=self.device, use_amp=self.mixed_precision,
                        accumulator_dtype=self.accumulator_dtype)

    def to_original(self, prepared: PreparedCase, logits: Sequence[np.ndarray]) -> np.ndarray:
        """Average of the configurations' probabilities on the input's grid, (K, Z, Y, X) float32, from
        `run_networks`'s logits."""
        total = None
        for p, properties in zip(logits, prepared.properties):
            original = logits_to_original(p, properties, self.plans)
            total = original if total is None else np.add(total, original, out=total)
        if len(logits) > 1:
            total /= len(logits)
        return total

    def predict_case(self, image: np.ndarray, geometry: Geometry) -> np.ndarray:
        """Probabilities (K, Z, Y, X) on the input's grid: per configuration the softmax of its folds' mean
        logits, resampled as logits; averaged over configurations."""
        prepared = self.prepare(image, geometry)
        return self.to_original(prepared, self.run_networks(prepared))

    def settings(self) -> dict:
        """What a prediction report should record about the models."""
        return {
            "workdir": str(self.workdir), "configurations": list(self.configurations),
            "checkpoint": self.checkpoint, "device": str(self.device), "mirroring": self.mirroring,
            "step_size": self.step_size, "tiles_per_batch": self.tiles_per_batch,
            "mixed_precision": self.mixed_precision, "runtime": self.runtime,
            "accumulator_dtype": str(self.accumulator_dtype).removeprefix("torch."),
            "models": [{"configuration": f.configuration, "fold": f.fold, "checkpoint": str(f.checkpoint),
                        "epoch": f.epoch} for f in self.folds],
        }


def add_slabs(builder: LabelMapBuilder, streams: Sequence[Iterator[tuple[int, torch.Tensor]]]) -> None:
    """Give `builder` (one configuration) each z-slab's logits, averaged over the networks whose
    `sliding_window_slabs` streams advance side by side."""
    for pieces in zip(*streams):
        z0 = pieces[0][0]
        total = None
        for start, logits in pieces:
            if start != z0:
                raise AssertionError("the folds' sliding windows went out of step")
            total = logits if total is None else total.add_(logits)
        builder.add(z0, [total.div_(len(pieces)).numpy()])


def _segmentation(builder: LabelMapBuilder, members: int) -> CaseSegmentation:
    entropy = builder.entropy
    if entropy is not None:
        entropy /= np.log(builder.num_classes)
    return CaseSegmentation(builder.labels, members, builder.uncertainty() if members > 1 else None, entropy)


def _fold_names(workdir: Path, configuration: str, folds: Sequence[int | str] | None) -> list[str]:
    models = workspace.fold_dir(workdir, configuration, 0).parent
    if folds is not None:
        names = [str(f) for f in dict.fromkeys(folds)]
        missing = [n for n in names if not workspace.fold_dir(workdir, configuration, n).is_dir()]
        if missing:
            raise PredictorError(f"{models}: no fold_{', fold_'.join(missing)} folder; train those folds or "
                                 "choose others with --folds")
        return names
    found = sorted((p.name.removeprefix("fold_") for p in models.glob("fold_*") if p.is_dir()),
                   key=lambda n: (0, int(n), "") if n.isdigit() else (1, 0, n))
    if not found:
        raise PredictorError(f"{models}: no trained folds (fold_* folders) for {configuration}; "
                             f"run `autoseg train` for it first")
    return found


# ---------------------------------------------------------------------------------------------
# Predicting a folder


@dataclass(frozen=True)
class PredictionReport:
    written: list[str]  # case ids written in this run
    skipped: list[str]  # case ids whose output already existed (continue_)
    failed: list[tuple[str, str]]  # (case id or input file, what went wrong)
    settings: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"format_version": REPORT_FORMAT_VERSION, "written": self.written, "skipped": self.skipped,
                "failed": [{"input": k, "error": m} for k, m in self.failed], "settings": self.settings}


def predict_folder(workdir: Path, inputs: Sequence[Path], output_dir: Path,
                   configurations: Sequence[str] | None = None, folds: Sequence[int | str] | None = None,
                   mirroring: bool = True, save_probabilities: bool = False, device: str | torch.device | None = None,
                   continue_: bool = False, num_parts: int = 1, part_id: int = 0, postprocessing: bool = True,
                   num_workers: int = 1, progress: bool = True, checkpoint: str = "final",
                   step_size: float = 0.5, mixed_precision: bool = True, save_uncertainty: bool = False,
                   uncertainty_threshold: float = DEFAULT_UNCERTAINTY_THRESHOLD, report: bool = True,
                   output_format: str = "default", model_name: str | None = None,
                   runtime: str = "torch") -> PredictionReport:
    """Segment every case found in `inputs` into `output_dir/<case_id><ending>` in the input's format (a PNG
    for a PNG); see docs/prediction.md. `configurations=None`: the plans' default_configuration.

    While the network runs on one case, `num_workers` background threads read and preprocess the
    next ones and write finished ones (0: everything in this thread). One bad input is reported in
    the result and `prediction_report.json`, the others still run. `report`: also `volumes.csv`,
    `qc/<case>.png` and `report.html`; with >= 2 members ensembled, labels whose uncertainty exceeds
    `uncertainty_threshold` are flagged there, and `save_uncertainty` writes `<case>_uncertainty<ending>`.
    `continue_` skips a case whose outputs exist and, with `report`, whose rows volumes.csv holds.
    `output_format="dicom-seg"` writes a DICOM-SEG `<case>.dcm` for inputs that are DICOM series.
    `model_name`: what volumes.csv calls the model instead of `workdir`'s folder name (e.g. the archive's).
    `runtime="openvino"`: the networks run in float32 through OpenVINO on the CPU (faster without native bf16).
    """
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"output_format must be one of {', '.join(OUTPUT_FORMATS)}, got {output_format!r}")
    if not 0 <= uncertainty_threshold <= 1:
        raise ValueError(f"uncertainty_threshold must be in [0, 1] (entropy / log(K)), got {uncertainty_threshold}")
    if num_parts < 1 or not 0 <= part_id < num_parts:
        raise ValueError(f"part_id must be in 0..num_parts-1, got part_id={part_id}, num_parts={num_parts}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    started = time.perf_counter()
    inputs = [inputs] if isinstance(inputs, (str, Path)) else list(inputs)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    predictor = Predictor(workdir, configurations, folds, checkpoint=checkpoint, device=device,
                          mirroring=mirroring, step_size=step_size, mixed_precision=mixed_precision,
                          runtime=runtime)
    rules_path = workspace.postprocessing_json(workdir)
    rules = load_postprocessing_rules(rules_path) if postprocessing and rules_path.is_file() else None
    configurations = predictor.configurations
    if rules is not None and sorted(rules.get("configuration") or configurations) != sorted(configurations):
        log.warning("%s was decided for %s, not for %s: not applied", rules_path,
                    "+".join(rules["configuration"]), "+".join(configurations))
        rules = None

    labels = {int(k): v for k, v in predictor.plans["labels"].items()}
    model = _model_name(predictor, model_name)
    volumes = VolumeTable(output_dir / "volumes.csv", model) if report else None
    cases, problems = discover_inputs(inputs, predictor.num_channels)
    failed: list[tuple[str, str]] = list(problems)
    input_files = {f.resolve() for c in cases for f in c.files}
    # A case whose label map was written but not its rows (interrupted in between) is predicted again.
    recorded = volumes.cases(labels=[k for k in labels if k > 0]) if continue_ and volumes is not None else None
    todo, skipped, unrecorded = [], [], 0
    for case in cases[part_id::num_parts]:
        out = _output_path(output_dir, case, output_format)
        if out.resolve() in input_files:
            failed.append((case.case_id, f"{out}: the output would overwrite an input file; choose another output folder"))
        elif continue_ and out.is_file() and (not save_probabilities or out.with_name(f"{case.case_id}.npz").is_file()):
            if recorded is None or case.case_id in recorded:
                skipped.append(case.case_id)
            else:
                unrecorded += 1
                todo.append(case)
        else:
            todo.append(case)
    if skipped:
        log.info("%d case(s) already predicted in %s, skipped", len(skipped), output_dir)
    if unrecorded:
        log.info("%d case(s) predicted before but missing from %s: predicted again", unrecorded, volumes.path)

    outputs = _Outputs(output_dir, rules, save_probabilities, save_uncertainty, uncertainty_threshold, labels,
                       output_format, volumes)
    # Torch keeps every core: the background threads mostly wait on files (measured on 2 cores: 0.57 s
    # per case with 1 thread beside 2 torch threads, 1.09 s when torch gave a core up to it).
    written = _run_pipeline(predictor, todo, outputs, num_workers, progress, failed)

    settings = {**predictor.settings(), "model": model, "inputs": [str(p) for p in inputs],
                "output_dir": str(output_dir),
                "postprocessing": str(rules_path) if rules is not None else None,
                "save_probabilities": save_probabilities, "save_uncertainty": save_uncertainty,
                "uncertainty_threshold": uncertainty_threshold, "report": report, "output_format": output_format,
                "continue": continue_, "num_parts": num_parts,
                "part_id": part_id, "num_workers": num_workers, "autoseg_version": __version__,
                "seconds": round(time.perf_counter() - started, 2)}
    result = PredictionReport(sorted(written), skipped, failed, settings)
    write_json(output_dir / report_name(num_parts, part_id), result.to_json())
    if outputs.volumes is not None:
        from autoseg.inference.qc import write_html_report

        write_html_report(output_dir, outputs.volumes.path, output_dir / "qc", output_dir / "report.html")
    log.info("predicted %d case(s), skipped %d, failed %d; report in %s", len(written), len(skipped), len(failed),
             output_dir / report_name(num_parts, part_id))
    for key, message in failed:
        log.warning("failed: %s: %s", key, message)
    return result


def report_name(num_parts: int = 1, part_id: int = 0) -> str:
    """`prediction_report.json`, or one per part so parallel parts do not overwrite each other's."""
    return "prediction_report.json" if num_parts == 1 else f"prediction_report_part{part_id}of{num_parts}.json"


def _output_path(output_dir: Path, case: InputCase, output_format: str = "default") -> Path:
    """`<case_id>` in the input's format (a JPEG input gets a PNG: see `segmentation_suffix`), or `.dcm`
    (DICOM-SEG) for a DICOM series with output_format "dicom-seg"."""
    if output_format == "dicom-seg" and _is_dicom_series(case):
        return output_dir / f"{case.case_id}.dcm"
    return output_dir / f"{case.case_id}{segmentation_suffix(case.ending)}"


def _is_dicom_series(case: InputCase) -> bool:
    return getattr(case, "series_uid", None) is not None or any(f.suffix.lower() == ".dcm" for f in case.files)


def _model_name(predictor: Predictor, name: str | None = None) -> str:
    """What volumes.csv records as the model: workspace (or `name`), configurations and folds."""
    folds = ",".join(dict.fromkeys(f.fold for f in predictor.folds))
    return f"{name or predictor.workdir.name}:{'+'.join(predictor.configurations)}:folds {folds}"


@dataclass(frozen=True)
class _Outputs:
    """What to write per case besides the label map."""

    folder: Path
    rules: dict | None
    probabilities: bool
    uncertainty_map: bool
    uncertainty_threshold: float
    labels: dict[int, str]
    output_format: str
    volumes: VolumeTable | None  # None: no volumes.csv, overlays or report.html


def _read_and_prepare(predictor: Predictor, case: InputCase) -> PreparedCase:
    image, geometry = read_input_case(case, predictor.num_channels)
    return predictor.prepare(image, geometry)


def _predict(predictor: Predictor, prepared: PreparedCase, outputs: _Outputs) -> CaseSegmentation | list[np.ndarray]:
    """The network part, in the main thread: the label map, or (to save probabilities) network-space logits."""
    if outputs.probabilities:
        return predictor.run_networks(prepared)
    return predictor.segment(prepared, entropy_map=outputs.uncertainty_map)


def _write_case(predictor: Predictor, case: InputCase, prepared: PreparedCase,
                predicted: CaseSegmentation | list[np.ndarray], outputs: _Outputs) -> None:
    """Probabilities and uncertainty map (if asked), the label map (postprocessed), then the report row and
    overlay: an existing label map means the files --continue looks for are complete."""
    geometry = prepared.geometry
    if not isinstance(predicted, CaseSegmentation):
        save_probabilities(outputs.folder / f"{case.case_id}.npz", predictor.to_original(prepared, predicted))
        predicted = predictor.segment_logits(prepared, predicted, entropy_map=outputs.uncertainty_map)
    path = _output_path(outputs.folder, case, outputs.output_format)
    if outputs.uncertainty_map and predicted.entropy is not None:
        suffix = segmentation_suffix(case.ending)
        suffix = ".tif" if suffix == ".png" else suffix  # a float map does not fit an 8-bit PNG
        write_image(outputs.folder / f"{case.case_id}_uncertainty{suffix}", predicted.entropy, geometry)
    if path.suffix == ".dcm":
        from autoseg.inference.dicom_seg import (
            write_dicom_seg,  # needs the optional highdicom
        )

        segmentation = predicted.labels if outputs.rules is None else apply_postprocessing(predicted.labels, outputs.rules)
        write_dicom_seg(segmentation, geometry, case.files, outputs.labels, path)
    else:
        segmentation = write_segmentation(predicted.labels, geometry, path, outputs.rules)
    if outputs.volumes is None:
        return
    uncertainty = predicted.uncertainty
    flagged = None if uncertainty is None else {k for k, u in uncertainty.items() if u > outputs.uncertainty_threshold}
    outputs.volumes.add_case(case.case_id, case.files, structure_rows(segmentation, geometry, outputs.labels),
                             uncertainty, flagged)
    from autoseg.inference.qc import (
        write_overlay,  # matplotlib, only when there is an overlay to draw
    )

    overlay = outputs.folder / "qc" / f"{case.case_id}.png"
    try:  # the input is read again: holding it through the prediction would cost memory
        write_overlay(read_input_case(case, predictor.num_channels)[0], segmentation, geometry, outputs.labels, overlay)
    except Exception as exc:  # the label map and its row are written; a missing picture must not fail the case
        log.warning("%s: no overlay written: %s", overlay, _describe(exc))


def _run_pipeline(predictor: Predictor, cases: list[InputCase], outputs: _Outputs, num_workers: int, progress: bool,
                  failed: list[tuple[str, str]]) -> list[str]:
    """Network in this thread; reading/preprocessing ahead and writing behind in worker threads.

    At most `num_workers + 1` cases wait preprocessed and `num_workers + 1` wait to be written, so
    memory stays bounded however many cases there are.
    """
    written: list[str] = []
    ahead = max(1, num_workers) + 1
    readers = ThreadPoolExecutor(num_workers, thread_name_prefix="autoseg-read") if num_workers else _InlineExecutor()
    writers = ThreadPoolExecutor(num_workers, thread_name_prefix="autoseg-write") if num_workers else _InlineExecutor()
    reads: deque[tuple[InputCase, Future]] = deque()
    writes: deque[tuple[InputCase, Future]] = deque()
    pending = iter(cases)
    bar = tqdm(total=len(cases), desc="predict", unit="case", disable=not progress)

    def finish_oldest_write() -> None:
        case, future = writes.popleft()
        try:
            future.result()
            written.append(case.case_id)
        except Exception as exc:
            path = _output_path(outputs.folder, case, outputs.output_format)
            failed.append((case.case_id, f"writing {path} failed: {_describe(exc)}"))
            log.debug("writing %s failed", case.case_id, exc_info=True)
        bar.update()

    try:
        while True:
            while len(reads) < ahead and (case := next(pending, None)) is not None:
                reads.append((case, readers.submit(_read_and_prepare, predictor, case)))
            if not reads:
                break
            case, future = reads.popleft()
            try:
                prepared = future.result()
            except InputError as exc:
                failed.append((str(exc.path), str(exc)))
                bar.update()
                continue
            except Exception as exc:
                failed.append((case.case_id, f"preprocessing failed: {_describe(exc)}"))
                log.debug("preprocessing %s failed", case.case_id, exc_info=True)
                bar.update()
                continue
            try:
                predicted = _predict(predictor, prepared, outputs)
            except Exception as exc:  # e.g. out of memory on a very large case: the others may still fit
                failed.append((case.case_id, f"prediction failed: {_describe(exc)}"))
                log.debug("prediction of %s failed", case.case_id, exc_info=True)
                bar.update()
                continue
            # The network input is not needed any more; drop it so only the outputs wait for writing.
            prepared, future = replace(prepared, data=()), None
            writes.append((case, writers.submit(_write_case, predictor, case, prepared, predicted, outputs)))
            while len(writes) > ahead:
                finish_oldest_write()
        while writes:
            finish_oldest_write()
    finally:
        readers.shutdown(wait=True, cancel_futures=True)
        writers.shutdown(wait=True, cancel_futures=True)
        bar.close()
    return written


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


class _InlineExecutor:
    """`submit` runs the call at once; the same pipeline code then works without threads."""

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as exc:
            future.set_exception(exc)
        return future

    def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
        pass
