"""Predict cases with the trained folds of one or more configurations: `Predictor`.

`Predictor` owns the networks (built once, kept in eval mode on the device) and splits a case into
steps that `predict_folder` (batch.py) overlaps: `prepare` (CPU: preprocessing exactly as in
training), `segment` (device, then CPU: sliding window per fold, logits averaged over a
configuration's folds, resampled to the input's grid and softmaxed there, averaged over
configurations, as nnU-Net v2 ensembles; the label map taken label by label and, for one
configuration, slab by slab, so no per-label probabilities of the input's size are held;
docs/prediction.md). `run_networks` + `to_original` (`predict_case`) give the full probabilities
instead, for `--save-probabilities`. Training's validation predicts through `Predictor.from_networks`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from autoseg import workspace
from autoseg.dataset.image_io import Geometry
from autoseg.device import choose_device, mixed_precision_available
from autoseg.errors import AutosegError
from autoseg.inference.input_checks import InputCheck, check_input
from autoseg.inference.instance_maps import instances_from_rims
from autoseg.inference.int8_models import RECORD, QuantizationError, int8_problem, load_int8, quantized_dir
from autoseg.inference.openvino_runtime import (
    OpenVINONetwork,
    OpenVINOUnavailable,
    choose_runtime,
    converted_model,
)
from autoseg.inference.original_grid import LabelMapBuilder, logits_to_original
from autoseg.inference.settings import ComputeSettings, ModelChoice, WindowSettings
from autoseg.inference.sliding_window import (
    SlidingWindow,
    accumulator_dtype_for,
    sliding_window_predict,
    sliding_window_slabs,
)
from autoseg.model_files import Checkpoint, CheckpointError, checkpoint_path, file_sha256, fold_names, load_fold
from autoseg.network.low_memory import inference_forward, needs_low_memory
from autoseg.network.unet import UNet, build_unet
from autoseg.planning.plans import Plans
from autoseg.preprocessing.preprocess import label_to_network_grid, one_hot_labels, preprocess_case
from autoseg.preprocessing.properties import CaseProperties

log = logging.getLogger(__name__)


class PredictorError(AutosegError):
    """Models that cannot be loaded or used as asked; the message names the file or folder and the fix."""


@dataclass(frozen=True)
class PreparedCase:
    """A case preprocessed for every configuration, with what is needed to go back to its grid."""

    geometry: Geometry
    configurations: tuple[str, ...]
    data: tuple[np.ndarray, ...]  # (C, *resampled) per configuration
    properties: tuple[CaseProperties, ...]
    check: InputCheck = InputCheck()  # what input_checks found (warnings, slice by slice)
    # per configuration: a cascade's first stage prepared for its own predictor (None elsewhere, and once the
    # first stage's labels have joined `data`)
    previous: tuple["PreparedCase | None", ...] = ()


@dataclass(frozen=True)
class CaseSegmentation:
    """A predicted label map on the input's grid (before postprocessing) and how sure the ensemble was."""

    labels: np.ndarray  # (Z, Y, X) uint8 (uint16 beyond 256 classes)
    members: int  # networks averaged: folds x configurations
    # Per label present, mean entropy of the ensemble's probabilities over its voxels / log(K), in [0, 1];
    # None with a single member.
    uncertainty: dict[int, float] | None = None
    entropy: np.ndarray | None = None  # (Z, Y, X) float32 voxel entropy / log(K), when asked for
    # With the plans' instance segmentation: one id per object (int32, 0 background); `labels` then holds the
    # dataset's labels only, the object rims given to the objects they part (inference/instance_maps.py)
    instances: np.ndarray | None = None


@dataclass(frozen=True)
class LoadedFold:
    configuration: str
    fold: str
    checkpoint: Path | None  # None: a network handed over by the caller (validation)
    epoch: int | None
    network: Callable[[torch.Tensor], torch.Tensor]  # the module (or its low_memory_forward), or an OpenVINONetwork


class Predictor:
    """Holds the fold networks of one or more configurations; predicts cases."""

    def __init__(self, workdir: Path, model: ModelChoice = ModelChoice(), window: WindowSettings = WindowSettings(),
                 compute: ComputeSettings = ComputeSettings()):
        """The folds `model` names from `workdir`'s models (see ModelChoice for the defaults)."""
        self.workdir = Path(workdir)
        plans = Plans.load(workspace.plans_json(self.workdir))
        self._setup(plans, plans.resolve_configurations(model.configurations), window, compute)
        self.checkpoint = model.checkpoint
        self.read_only = model.read_only
        try:
            chosen = [(name, fold) for name in self.configurations
                      for fold in fold_names(self.workdir, name, model.folds, model.checkpoint)]
        except CheckpointError as exc:
            raise PredictorError(str(exc)) from None
        if compute.runtime == "auto" and self.runtime == "openvino":
            large = [name for name in self.configurations
                     if needs_low_memory(plans.network_topology(name), plans.configuration(name).patch_size)]
            if large:
                # OpenVINO runs a window whole; torch's low-memory forward holds a fraction of it (measured in
                # benchmarks/README.md), and OpenVINO's memory on such windows was not measured.
                self.runtime = "torch"
                log.info("runtime torch, not openvino: the windows of %s run in torch's low-memory forward",
                         ", ".join(large))
            elif self._int8_ready(chosen):
                self.runtime = "openvino-int8"
                log.info("runtime openvino-int8: every fold has an int8 model checked by `autoseg quantize`")
        for name, fold in chosen:
            self.folds.append(self._load_fold(name, fold))
        log.info("predictor: %s on %s", ", ".join(f"{f.configuration}/fold_{f.fold} ({f.checkpoint.name})"
                                                   for f in self.folds), self.device)
        for name in self.configurations:  # a cascade's second stage predicts from its first stage's labels
            previous = self.plans.configuration(name).previous_stage
            if previous is not None:
                self.previous_stages[name] = Predictor(self.workdir, ModelChoice((previous,), model.folds,
                                                                                 model.checkpoint), window, compute)

    @classmethod
    def from_networks(cls, plans: Plans, configuration: str, networks: Sequence[torch.nn.Module],
                      window: WindowSettings = WindowSettings(), compute: ComputeSettings = ComputeSettings(),
                      workdir: Path | None = None) -> "Predictor":
        """A predictor over networks already in memory (on `compute.device`), e.g. a fold at the end of training."""
        self = cls.__new__(cls)
        self.workdir = None if workdir is None else Path(workdir)
        self._setup(plans, (configuration,), window, compute)
        self.checkpoint = None
        patch = plans.configuration(configuration).patch_size
        for i, network in enumerate(networks):
            forward = inference_forward(network.eval(), patch, self.device) if isinstance(network, UNet) else network
            self.folds.append(LoadedFold(configuration, str(i), None, None, forward))
        return self

    def _setup(self, plans: Plans, configurations: Sequence[str], window: WindowSettings,
               compute: ComputeSettings) -> None:
        if not plans.regions and sorted(k for k in plans.labels if k != plans.ignore_label) != list(
                range(plans.num_classes)):
            raise PredictorError(f"plans.json: label ids {sorted(plans.labels)} are not consecutive from 0; the "
                                 "network's class index is the label id, so relabel the dataset to 0..K-1 and plan "
                                 "again")
        self.plans = plans
        self.configurations = tuple(configurations)
        self.device = choose_device(compute.device)
        if compute.runtime.startswith("openvino") and self.device.type != "cpu":
            raise PredictorError(f"the {compute.runtime} runtime runs on the CPU; got device {self.device} "
                                 "(use --device cpu)")
        self.runtime, why = choose_runtime(compute.runtime, self.device, compute.mixed_precision)
        if compute.runtime == "auto":
            log.info("runtime %s: %s", self.runtime, why)
        self.window = window
        self.tiles_per_batch = window.tiles_per_batch or (4 if self.device.type == "cuda" else 1)
        # float16 on CUDA; bfloat16 on a CPU that computes it natively (same labels in practice)
        self.mixed_precision = (compute.mixed_precision and mixed_precision_available(self.device)
                                and self.runtime == "torch")
        # The windows' running mean in float16 (nnU-Net's choice, half the largest array), unless --fp32.
        self.accumulator_dtype = accumulator_dtype_for(compute.mixed_precision)
        self.folds: list[LoadedFold] = []
        self.previous_stages: dict[str, Predictor] = {}

    @property
    def num_channels(self) -> int:
        return self.plans.num_channels

    @property
    def num_classes(self) -> int:
        return self.plans.num_classes

    def sliding_window(self, configuration: str) -> SlidingWindow:
        """The window settings of one configuration's networks."""
        patch = self.plans.configuration(configuration).patch_size
        return SlidingWindow(patch, self.num_classes, step_size=self.window.step_size,
                             mirror_axes=tuple(range(len(patch))) if self.window.mirroring else (),
                             tiles_per_batch=self.tiles_per_batch, device=self.device,
                             mixed_precision=self.mixed_precision, accumulator_dtype=self.accumulator_dtype)

    def _int8_ready(self, chosen: Sequence[tuple[str, str]]) -> bool:
        """Whether every chosen fold has an accepted int8 model made from the checkpoint it would load."""
        if not all((quantized_dir(self.workdir, name, fold) / RECORD).is_file() for name, fold in chosen):
            return False
        for name, fold in chosen:
            path = checkpoint_path(self.workdir, name, fold, self.checkpoint)
            problem = int8_problem(self.workdir, name, fold, path, self.checkpoint)
            if problem is not None:
                log.info("runtime openvino (float32), not int8: %s", problem)
                return False
        return True

    def _load_fold(self, configuration: str, fold: str) -> LoadedFold:
        expected, digest = None, None
        if self.runtime == "openvino" and not self.read_only:
            # Hashed before loading: should training replace the file meanwhile, the kept conversion is filed under
            # the old file's hash and never matches again, rather than the new hash over the old weights.
            try:
                expected = checkpoint_path(self.workdir, configuration, fold, self.checkpoint)
                digest = file_sha256(expected)
            except (CheckpointError, OSError):
                pass
        try:
            path, state = load_fold(self.workdir, configuration, fold, self.checkpoint)
        except CheckpointError as exc:
            raise PredictorError(str(exc)) from None
        check_trained_with_these_plans(path, state, self.plans, configuration)
        network = build_unet(self.plans.network_topology(configuration), deep_supervision=False)
        try:
            network.load_state_dict(state.network_state)
        except RuntimeError as exc:
            raise PredictorError(f"{path}: weights do not fit the network plans.json describes for {configuration} "
                                 "(was the dataset planned again after training?): "
                                 f"{str(exc).splitlines()[0][:200]}") from None
        # Default layout: channels_last_3d measured no faster for CPU inference (docs/prediction.md).
        network = network.to(self.device).eval()
        patch = self.plans.configuration(configuration).patch_size
        if self.runtime == "openvino-int8":
            try:
                return LoadedFold(configuration, fold, path, state.epoch,
                                  load_int8(self.workdir, configuration, fold, path,
                                            self.plans.input_channels(configuration), patch, self.checkpoint))
            except (OpenVINOUnavailable, QuantizationError) as exc:
                raise PredictorError(str(exc)) from None
        if self.runtime == "openvino":
            channels = self.plans.input_channels(configuration)
            # The conversion is kept beside the checkpoint for the next run, except in a model archive's extraction,
            # which must stay exactly as verified (model_archive.py).
            try:
                model = converted_model(network, channels, patch, path, digest if path == expected else None,
                                        self.plans.network_topology(configuration))
                return LoadedFold(configuration, fold, path, state.epoch,
                                  OpenVINONetwork(None, channels, patch, model=model))
            except OpenVINOUnavailable as exc:
                raise PredictorError(str(exc)) from None
        # Large windows: the same logits with a fraction of the activation memory (network/low_memory.py).
        return LoadedFold(configuration, fold, path, state.epoch, inference_forward(network, patch, self.device))

    def prepare(self, image: np.ndarray, geometry: Geometry, source: Path | str = "<image>",
                keep_probabilities: bool = False) -> PreparedCase:
        """Check that the model can take (C, Z, Y, X) read from `source` (input_checks.py: InputError naming it
        if not), then preprocess it for every configuration (CPU only; safe to run in a worker thread)."""
        image = np.asarray(image)
        if image.ndim != 4 or image.shape[0] != self.num_channels:
            raise PredictorError(f"image must be (C, Z, Y, X) with C = {self.num_channels}, "
                                 f"got shape {list(image.shape)}")
        if tuple(image.shape[1:]) != tuple(geometry.shape):
            raise PredictorError(f"image shape {list(image.shape[1:])} differs from its geometry's shape "
                                 f"{list(geometry.shape)}")
        check = check_input(image, geometry, self.plans, self.configurations, source, keep_probabilities)
        data, properties, done = [], [], {}
        for name in self.configurations:
            identifier = self.plans.configuration(name).data_identifier
            if identifier not in done:  # configurations with the same data_identifier share their data
                done[identifier] = preprocess_case(image, None, geometry, self.plans, name)
            d, _, p = done[identifier]
            data.append(d)
            properties.append(p)
        previous = tuple(self.previous_stages[name].prepare(image, geometry, source)
                         if name in self.previous_stages else None for name in self.configurations)
        return PreparedCase(geometry, self.configurations, tuple(data), tuple(properties), check, previous)

    def with_previous_stages(self, prepared: PreparedCase) -> PreparedCase:
        """`prepared` with each cascade configuration's input completed: its first stage segments the case, and
        that label map, taken onto this configuration's grid as training labels are, joins the image as one
        channel per foreground label (nnU-Net's cascade). A no-op for the other configurations."""
        if not any(prepared.previous):
            return prepared
        data = list(prepared.data)
        for i, (name, first) in enumerate(zip(prepared.configurations, prepared.previous)):
            if first is None:
                continue
            labels = self.previous_stages[name].segment(first).labels
            grid = label_to_network_grid(labels, prepared.properties[i], self.plans)
            data[i] = np.concatenate([data[i], one_hot_labels(grid, self.plans.foreground_labels)])
        return replace(prepared, data=tuple(data), previous=(None,) * len(data))

    def run_networks(self, prepared: PreparedCase) -> list[np.ndarray]:
        """Per configuration, the logits in network space averaged over its folds (nnU-Net v2's fold ensemble)."""
        prepared = self.with_previous_stages(prepared)
        outputs = []
        for name, data in zip(prepared.configurations, prepared.data):
            image = torch.from_numpy(data)
            total, count = None, 0
            for fold in (f for f in self.folds if f.configuration == name):
                logits = sliding_window_predict(fold.network, image, self.sliding_window(name))
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
        prepared = self.with_previous_stages(prepared)
        members = len(self.folds)
        builder = LabelMapBuilder(prepared.properties, self.plans, self.num_classes, uncertainty=members > 1,
                                  entropy_map=entropy_map and members > 1)
        if not builder.streams:
            return self.segment_logits(prepared, self.run_networks(prepared), entropy_map)
        data = torch.from_numpy(prepared.data[0])
        window = self.sliding_window(prepared.configurations[0])
        add_slabs(builder, [sliding_window_slabs(fold.network, data, window) for fold in self.folds])
        return _segmentation(builder, members, self.plans)

    def segment_logits(self, prepared: PreparedCase, logits: Sequence[np.ndarray],
                       entropy_map: bool = False) -> CaseSegmentation:
        """`segment` from `run_networks`'s logits (when the probabilities are needed too)."""
        members = len(self.folds)
        builder = LabelMapBuilder(prepared.properties, self.plans, self.num_classes, uncertainty=members > 1,
                                  entropy_map=entropy_map and members > 1)
        builder.add(0, logits)
        return _segmentation(builder, members, self.plans)

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
        """What a prediction summary should record about the models."""
        return {
            "workdir": None if self.workdir is None else str(self.workdir),
            "configurations": list(self.configurations), "checkpoint": self.checkpoint, "device": str(self.device),
            "mirroring": self.window.mirroring, "step_size": self.window.step_size,
            "tiles_per_batch": self.tiles_per_batch, "mixed_precision": self.mixed_precision, "runtime": self.runtime,
            "accumulator_dtype": str(self.accumulator_dtype).removeprefix("torch."),
            "models": [{"configuration": f.configuration, "fold": f.fold,
                        "checkpoint": None if f.checkpoint is None else str(f.checkpoint), "epoch": f.epoch}
                       for predictor in (self, *self.previous_stages.values()) for f in predictor.folds],
        }


# What must be as it was at training for a fold's weights to mean what they meant (preprocessing and network).
_TRAINED_WITH = ("data_identifier", "spacing", "patch_size", "features_per_stage", "kernel_sizes", "strides",
                 "n_conv_per_stage", "network", "residual_blocks", "n_conv_per_stage_decoder")
_PLAIN_NETWORK = {"network": "unet", "residual_blocks": [], "n_conv_per_stage_decoder": None}  # keys default plans omit


def check_trained_with_these_plans(path: Path, state: Checkpoint, plans: Plans, configuration: str) -> None:
    """Refuse a fold whose checkpoint records other plans than plans.json now holds (planned again after
    training, or a checkpoint copied from another workspace)."""
    now = {**_PLAIN_NETWORK, **plans.configuration(configuration).to_json()}
    then = {**_PLAIN_NETWORK, **state.plans_configuration} if state.plans_configuration else {}
    changed = [f"{key} was {then[key]}, now "
               f"{now[key]}" for key in _TRAINED_WITH if key in then and then[key] != now[key]]
    if state.labels is not None and {int(k): v for k, v in state.labels.items()} != plans.labels:
        changed.append(f"labels were {state.labels}, now {plans.to_json()['labels']}")
    regions_now = [r.to_json() for r in plans.regions] or None
    if (state.regions or None) != regions_now:
        changed.append(f"regions were {state.regions or 'none'}, now {regions_now or 'none'}")
    if state.channel_names is not None and tuple(state.channel_names) != plans.channel_names:
        changed.append(f"channels were {list(state.channel_names)}, now {list(plans.channel_names)}")
    if changed:
        raise PredictorError(f"{path}: trained with other plans than plans.json holds ({'; '.join(changed)}); "
                             "train the fold again, or restore the plans.json it was trained with")


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


def _segmentation(builder: LabelMapBuilder, members: int, plans: Plans) -> CaseSegmentation:
    entropy = builder.entropy
    if entropy is not None:
        entropy /= builder.entropy_scale
    uncertainty = builder.uncertainty() if members > 1 else None
    if plans.instances is None:
        return CaseSegmentation(builder.labels, members, uncertainty, entropy)
    instances, labels = instances_from_rims(builder.labels, plans.instances.boundary_label)
    if uncertainty is not None:
        uncertainty.pop(plans.instances.boundary_label, None)
    return CaseSegmentation(labels, members, uncertainty, entropy, instances)
