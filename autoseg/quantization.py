"""`autoseg quantize`: int8 networks for faster CPU prediction, kept only when they keep the validation Dice.

A fold's trained network is converted to OpenVINO (as `--runtime openvino` does), then quantized to
int8 after training by NNCF (post-training quantization: the value range of every activation is
measured on calibration windows cut from the fold's own preprocessed training cases, a third of
them centred on a voxel of one label), once with each of NNCF's mixed and performance presets. An
int8 network is accepted only if it keeps the fold's validation Dice: its validation cases are
predicted in full (sliding window, mirroring, export to the original grid) by the float32 and the
int8 networks, all are scored against the reference labels, and no label's mean Dice may drop by
more than the tolerance (default 0.005); of two accepted, the one that loses less is kept. A refused
network is not installed (an earlier accepted one stays); an accepted one is written with the
record of its check into the fold's folder (inference/int8_models.py, which prediction reads).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from autoseg import workspace
from autoseg.atomic import read_json
from autoseg.inference.int8_models import (
    FORMAT_VERSION,
    QuantizationError,
    install_int8,
    quantized_dir,
)
from autoseg.inference.openvino_runtime import OpenVINONetwork, convert_network, import_openvino
from autoseg.inference.predictor import Predictor, PredictorError, PreparedCase, check_trained_with_these_plans
from autoseg.inference.settings import ComputeSettings
from autoseg.model_files import file_sha256

log = logging.getLogger(__name__)

DEFAULT_TOLERANCE = 0.005  # largest accepted drop of a label's mean validation Dice
DEFAULT_CALIBRATION_WINDOWS = 128
FOREGROUND_SHARE = 1 / 3  # calibration windows centred on a foreground voxel, as training oversamples them
WINDOW_MEMORY = 1 << 30  # calibration windows are held in memory: at most this many bytes of them
# NNCF's presets, each tried (quantize_model): "mixed" (asymmetric activations) kept a Hippocampus 3d model that
# "performance" (symmetric, NNCF's default) lost 0.009 Dice on; on a DSB 2d model it went the other way
QUANTIZATION_PRESETS = ("mixed", "performance")


@dataclass(frozen=True)
class QuantizationCheck:
    """Mean validation Dice per scored label of the float32 and the int8 network, and the verdict.

    None is a label in no reference and no prediction of the checked cases (nothing to get wrong: scored 1
    here), so int8 inventing a label that float32 and the references lack counts as a drop of 1."""

    dice_float32: dict[str, float | None]
    dice_int8: dict[str, float | None]
    tolerance: float

    @property
    def drops(self) -> dict[str, float]:
        """Dice lost by int8 per label (negative: int8 scored higher); labels absent from every case left out."""
        return {k: _score(self.dice_float32[k]) - _score(self.dice_int8.get(k)) for k in self.dice_float32
                if self.dice_float32[k] is not None or self.dice_int8.get(k) is not None}

    @property
    def max_drop(self) -> float:
        return max(self.drops.values(), default=0.0)

    @property
    def accepted(self) -> bool:
        """At least one label scored, and none dropped by more than the tolerance."""
        return bool(self.drops) and self.max_drop <= self.tolerance

    def describe(self, names: dict[int, str]) -> str:
        return "; ".join(f"{names.get(int(k), k)} {_text(self.dice_float32[k])} -> {_text(self.dice_int8.get(k))}"
                         for k in self.dice_float32) or "no label to score"


def _score(dice: float | None) -> float:
    return 1.0 if dice is None else float(dice)


def _text(dice: float | None) -> str:
    return "absent" if dice is None else f"{dice:.4f}"


def calibration_windows(case_ids: Sequence[str], load: Callable[[str], tuple[np.ndarray, list[np.ndarray]]],
                        patch_size: Sequence[int], count: int, seed: int = 0) -> list[np.ndarray]:
    """`count` windows (1, C, *patch) float32 from random cases; `load(case_id)` gives the case's (C, Z, Y, X) image and
    its voxels of each foreground label ((N, 3) z, y, x arrays). A third of the windows are centred on a voxel of one
    label (label drawn first, as training's foreground oversampling does), the rest placed at random; 0 pads where a
    case is smaller than the patch. A 2D patch is cut from one slice. Each case is read once; the windows are held in
    memory (`quantize_fold` caps their number by WINDOW_MEMORY)."""
    rng = np.random.default_rng(seed)
    patch = [int(p) for p in patch_size]
    chosen = rng.integers(len(case_ids), size=count)
    windows = []
    for k in np.unique(chosen):
        image, labels = load(case_ids[int(k)])
        for _ in range(int((chosen == k).sum())):
            windows.append(_window(image, labels, patch, rng))
    order = rng.permutation(len(windows))
    return [windows[i] for i in order]


def _window(image: np.ndarray, labels: list[np.ndarray], patch: list[int], rng: np.random.Generator) -> np.ndarray:
    spatial = image.shape[1:]
    centre = None
    labels = [points for points in labels if len(points)]
    if labels and rng.random() < FOREGROUND_SHARE:
        points = labels[rng.integers(len(labels))]
        centre = [int(c) for c in points[rng.integers(len(points))]]
    if len(patch) < len(spatial):  # a 2D network on a stack: one slice
        z = centre[0] if centre is not None else int(rng.integers(spatial[0]))
        image, spatial = image[:, z], spatial[1:]
        centre = centre[1:] if centre is not None else None
    if centre is not None:
        starts = [c - p // 2 for c, p in zip(centre, patch)]
    else:
        starts = [int(rng.integers(min(0, s - p), max(0, s - p) + 1)) for s, p in zip(spatial, patch)]
    window = np.zeros((1, image.shape[0], *patch), np.float32)
    source = tuple(slice(max(a, 0), min(a + p, s)) for a, p, s in zip(starts, patch, spatial))
    target = tuple(slice(sl.start - a, sl.stop - a) for sl, a in zip(source, starts))
    window[(0, slice(None)) + target] = image[(slice(None),) + source]
    return window


def import_nncf():
    """The nncf module, or QuantizationError saying how to install it."""
    try:
        import nncf
    except ImportError:
        raise QuantizationError("autoseg quantize needs the nncf package, which is not installed: "
                                "pip install 'autoseg[openvino]'") from None
    return nncf


def quantize_model(model, windows: Sequence[np.ndarray], preset: str = "mixed"):
    """NNCF's post-training int8 quantization of an OpenVINO model, calibrated on `windows`, with one of
    QUANTIZATION_PRESETS: weights symmetric in both; activations asymmetric (a zero point per tensor) in "mixed",
    symmetric in "performance". Which keeps the Dice depends on the model (docs/prediction.md), so quantize_fold
    checks both."""
    nncf = import_nncf()
    return nncf.quantize(model, nncf.Dataset(list(windows)), subset_size=len(windows),
                         preset=getattr(nncf.QuantizationPreset, preset.upper()))


def _case_inputs(workdir: Path, plans, configuration: str, case_id: str) -> tuple[np.ndarray, object]:
    """A preprocessed case's network input (with a cascade's previous-stage channels) and its properties."""
    from autoseg.preprocessing import store
    from autoseg.preprocessing.preprocess import one_hot_labels
    from autoseg.training.cascade import load_next_stage, next_stage_path

    config = plans.configuration(configuration)
    data_dir = workspace.preprocessed_dir(workdir, config.data_identifier)
    image = store.load_case_image(data_dir, case_id)
    if config.previous_stage is not None:
        previous = load_next_stage(next_stage_path(workdir, config.previous_stage, configuration, case_id))
        image = np.concatenate([image, one_hot_labels(previous, plans.foreground_labels)])
    return image, store.load_properties(data_dir, case_id)


def _reference_cases(workdir: Path, case_ids: Sequence[str]) -> dict:
    """The raw dataset's cases to score against, checked before any work is done."""
    from autoseg.dataset.layout import load_dataset

    dataset_json = workspace.dataset_json(workdir)
    if not dataset_json.is_file():
        raise QuantizationError(f"{dataset_json}: missing; the check needs the training labels: run `autoseg "
                                "quantize` in the workspace that trained the model")
    root = read_json(dataset_json)["root"]
    try:
        cases = {c.case_id: c for c in load_dataset(root).cases}
    except Exception as exc:  # the raw dataset moved or changed since planning
        raise QuantizationError(f"{root}: the training dataset cannot be read ({str(exc)[:200]}); the check needs "
                                "its labels") from None
    missing = [c for c in case_ids
               if c not in cases or cases[c].label_file is None or not cases[c].label_file.is_file()]
    if missing:
        raise QuantizationError(f"{root}: no label file for {len(missing)} case(s) to check (e.g. {missing[0]}); the "
                                "check needs the labels the fold was trained from")
    return cases


def check_int8(workdir: Path, plans, configuration: str, float32_net: OpenVINONetwork,
               int8_nets: dict[str, OpenVINONetwork], case_ids: Sequence[str], tolerance: float, cases: dict,
               progress: bool = True) -> dict[str, QuantizationCheck]:
    """Predict `case_ids` in full with the float32 network and each int8 one, and compare their mean Dice per label
    (one check per int8 network; the float32 predictions are made once)."""
    from autoseg.dataset.layout import read_case_label
    from autoseg.evaluation import evaluate_case, mean_per_label, nan_to_none

    structures = plans.scored_structures
    compute = ComputeSettings(device="cpu", runtime="openvino")
    networks = {"float32": float32_net, **{f"int8 {name}": net for name, net in int8_nets.items()}}
    predictors = {name: Predictor.from_networks(plans, configuration, [net], compute=compute, workdir=workdir)
                  for name, net in networks.items()}
    scores: dict[str, dict] = {name: {} for name in networks}
    for case_id in tqdm(case_ids, desc="int8 check", unit="case", disable=not progress):
        image, properties = _case_inputs(workdir, plans, configuration, case_id)
        prepared = PreparedCase(properties.original_geometry, (configuration,), (image,), (properties,))
        reference = read_case_label(cases[case_id])
        for name, predictor in predictors.items():
            labels = predictor.segment(prepared).labels
            scores[name][case_id] = evaluate_case(labels, reference, properties.original_geometry.spacing,
                                                  structures, plans.ignore_label)
    means = {name: nan_to_none(mean_per_label(per_case, list(structures))) for name, per_case in scores.items()}
    dice = {name: {k: v["dice"] for k, v in mean.items()} for name, mean in means.items()}
    return {name: QuantizationCheck(dice["float32"], dice[f"int8 {name}"], tolerance) for name in int8_nets}


def check_arguments(calibration: int, validation_cases: int | None, tolerance: float) -> None:
    """QuantizationError for settings no fold could use, and when openvino or nncf is missing."""
    if calibration < 1:
        raise QuantizationError(f"--calibration-windows must be at least 1, got {calibration}")
    if validation_cases is not None and validation_cases < 1:
        raise QuantizationError(f"--validation-cases must be at least 1, got {validation_cases}")
    if not 0 <= tolerance < 1:
        raise QuantizationError(f"--tolerance must be a Dice difference in [0, 1), got {tolerance}")
    import_openvino("autoseg quantize")
    import_nncf()


def quantize_fold(workdir: Path, configuration: str, fold: str, *, checkpoint: str = "final",
                  calibration: int = DEFAULT_CALIBRATION_WINDOWS, validation_cases: int | None = None,
                  tolerance: float = DEFAULT_TOLERANCE, seed: int = 0, threads: int | None = None,
                  progress: bool = True) -> dict:
    """Quantize one fold's network to int8, check it on the fold's validation cases, and install it if accepted.

    Returns the record written to quantization.json; QuantizationError (with the Dice figures) when refused.
    Reads the workspace only (splits.json included: the fold's validation cases are the ones it was trained
    without); writes nothing but the fold's openvino_int8/ folder.
    """
    from autoseg.model_files import CheckpointError, load_fold
    from autoseg.network.unet import build_unet
    from autoseg.planning.plans import Plans
    from autoseg.preprocessing import store
    from autoseg.preprocessing.preprocess import ANNOTATED
    from autoseg.training.splits import SplitError, fold_cases

    check_arguments(calibration, validation_cases, tolerance)
    ov, nncf = import_openvino("autoseg quantize"), import_nncf()
    workdir = Path(workdir)
    plans = Plans.load(workspace.plans_json(workdir))
    if configuration not in plans.configurations:
        raise QuantizationError(f"configuration '{configuration}' is not in {workspace.plans_json(workdir)} "
                                f"(planned: {', '.join(plans.configurations)})")
    try:
        path, state = load_fold(workdir, configuration, fold, checkpoint)
        check_trained_with_these_plans(path, state, plans, configuration)
    except (CheckpointError, PredictorError) as exc:
        raise QuantizationError(str(exc)) from None
    config = plans.configuration(configuration)
    data_dir = workspace.preprocessed_dir(workdir, config.data_identifier)
    case_ids = store.list_cases(data_dir)
    if not case_ids:
        raise QuantizationError(f"{data_dir}: no preprocessed cases to calibrate on; an imported model archive has "
                                "none: quantize in the workspace that trained it")
    splits_path = workspace.splits_json(workdir)
    if str(fold) != "all" and not splits_path.is_file():
        raise QuantizationError(f"{splits_path}: missing, so fold {fold}'s validation cases are unknown; it is "
                                "written when a fold is trained")
    try:
        splits = [] if str(fold) == "all" else read_json(splits_path)["folds"]
        train_ids, val_ids = fold_cases(splits, fold, case_ids)
    except (SplitError, KeyError, TypeError) as exc:
        raise QuantizationError(f"{splits_path}: {exc}") from None
    held_out = bool(val_ids)
    if not held_out:  # fold "all": no case is held out, so the check runs on training cases
        val_ids = list(train_ids)
    if validation_cases is not None:
        val_ids = sorted(np.random.default_rng(seed).permutation(val_ids)[:validation_cases].tolist())
    cases = _reference_cases(workdir, val_ids)

    network = build_unet(plans.network_topology(configuration), deep_supervision=False)
    network.load_state_dict(state.network_state)
    channels, patch = plans.input_channels(configuration), config.patch_size
    window_bytes = 4 * channels * int(np.prod(patch))
    count = min(calibration, max(8, WINDOW_MEMORY // window_bytes))
    if count < calibration:
        log.info("%s fold %s: %d calibration windows instead of %d (at most %.1f GiB of %s windows in memory)",
                 configuration, fold, count, calibration, WINDOW_MEMORY / 2**30, "x".join(map(str, patch)))
    started = time.perf_counter()
    model = convert_network(network, channels, patch)

    def load(case_id: str) -> tuple[np.ndarray, list[np.ndarray]]:
        image, properties = _case_inputs(workdir, plans, configuration, case_id)
        labels = [np.asarray(v).reshape(-1, 3) for k, v in properties.class_locations.items() if k != ANNOTATED]
        return image, labels

    windows = calibration_windows(train_ids, load, patch, count, seed)
    log.info("%s fold %s: calibrating int8 on %d windows from %d training cases", configuration, fold,
             len(windows), len(train_ids))
    quantized = {preset: quantize_model(model, windows, preset) for preset in QUANTIZATION_PRESETS}
    del windows
    quantize_seconds = time.perf_counter() - started
    float32_net = OpenVINONetwork(None, channels, patch, threads, model=model)
    int8_nets = {preset: OpenVINONetwork(None, channels, patch, threads, model=q) for preset, q in quantized.items()}
    checks = check_int8(workdir, plans, configuration, float32_net, int8_nets, val_ids, tolerance, cases, progress)
    names = plans.output_labels
    # The accepted preset that loses least (the first of QUANTIZATION_PRESETS on a tie), else the refusal's figures
    # of the one that came closest.
    preset = min(QUANTIZATION_PRESETS, key=lambda p: (not checks[p].accepted, checks[p].max_drop))
    check = checks[preset]
    if not check.accepted:
        reason = (f"a label's validation Dice drops by {check.max_drop:.4f} > tolerance {tolerance}" if check.drops
                  else "no label could be scored")
        tried = ", ".join(f"{p} {checks[p].max_drop:.4f}" for p in QUANTIZATION_PRESETS)
        raise QuantizationError(
            f"{path}: int8 refused, {reason} on {len(val_ids)} case(s) with NNCF's {preset} preset, the closer of "
            f"the two ({check.describe(names)}; largest drop per preset: {tried}); predict in float32 (`--runtime "
            "openvino`), or accept the loss with a larger --tolerance")
    record = {
        "format_version": FORMAT_VERSION, "configuration": configuration, "fold": str(fold),
        "checkpoint": path.name, "checkpoint_sha256": file_sha256(path),
        "calibration": {"windows": count, "training_cases": len(train_ids),
                        "foreground_share": round(FOREGROUND_SHARE, 4), "seed": seed, "preset": preset,
                        "max_drop_per_preset": {p: round(checks[p].max_drop, 6) for p in QUANTIZATION_PRESETS}},
        "check": {"cases": list(val_ids), "held_out": held_out, "mirroring": True, "tolerance": tolerance,
                  "names": {k: names.get(int(k), k) for k in check.dice_float32},
                  "dice_float32": check.dice_float32, "dice_int8": check.dice_int8,
                  "max_drop": round(check.max_drop, 6)},
        "quantize_seconds": round(quantize_seconds, 1),
        "versions": {"openvino": ov.__version__, "nncf": nncf.__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    install_int8(quantized[preset], record, quantized_dir(workdir, configuration, str(fold)))
    return record
