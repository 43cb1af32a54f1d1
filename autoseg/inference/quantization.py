"""int8 networks for faster CPU prediction: `autoseg quantize` and `autoseg predict --runtime openvino-int8`.

A fold's trained network is converted to OpenVINO (as `--runtime openvino` does), then quantized to
int8 after training by NNCF (post-training quantization: the value range of every activation is
measured on calibration windows cut from the fold's own preprocessed training cases, a third of
them centred on foreground). The int8 network is accepted only if it keeps the fold's validation
Dice: its validation cases are predicted in full (sliding window, mirroring, export to the original
grid) by the float32 and the int8 network, both are scored against the reference labels, and no
label's mean Dice may drop by more than the tolerance (default 0.005). A refused network is not
installed; an accepted one is written with a record of the check into the fold's folder:

    models/<config>/fold_<K>/openvino_int8/model.xml, model.bin   the int8 OpenVINO model
    models/<config>/fold_<K>/openvino_int8/quantization.json      the record (see QuantizationRecord)

Prediction refuses an int8 model made from another checkpoint file than the one it would load
(its SHA-256 is recorded), so retraining a fold never leaves a stale int8 model in use.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm import tqdm

from autoseg import workspace
from autoseg.atomic import read_json, write_json
from autoseg.errors import AutosegError
from autoseg.inference.openvino_runtime import OpenVINONetwork, convert_network, import_openvino

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
QUANTIZED_DIR = "openvino_int8"
RECORD = "quantization.json"
DEFAULT_TOLERANCE = 0.005  # largest accepted drop of a label's mean validation Dice
DEFAULT_CALIBRATION_WINDOWS = 128
FOREGROUND_SHARE = 1 / 3  # calibration windows centred on a foreground voxel, as training oversamples them


class QuantizationError(AutosegError):
    """An int8 model that cannot be made, is refused by its Dice check, or does not fit the checkpoint."""


@dataclass(frozen=True)
class QuantizationCheck:
    """Mean validation Dice per scored label of the float32 and the int8 network, and the verdict."""

    dice_float32: dict[str, float | None]
    dice_int8: dict[str, float | None]
    tolerance: float

    @property
    def drops(self) -> dict[str, float]:
        """Dice lost by int8 per label (negative: int8 scored higher); labels absent from both are left out."""
        return {k: float(self.dice_float32[k]) - float(self.dice_int8[k]) for k in self.dice_float32
                if self.dice_float32[k] is not None and self.dice_int8.get(k) is not None}

    @property
    def max_drop(self) -> float:
        return max(self.drops.values(), default=0.0)

    @property
    def accepted(self) -> bool:
        return self.max_drop <= self.tolerance

    def describe(self, names: dict[int, str]) -> str:
        return "; ".join(f"{names.get(int(k), k)} {self.dice_float32[k]:.4f} -> {self.dice_int8[k]:.4f}"
                         for k in self.drops)


def quantized_dir(workdir: Path, configuration: str, fold: str) -> Path:
    return workspace.fold_dir(workdir, configuration, fold) / QUANTIZED_DIR


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def calibration_windows(case_ids: Sequence[str], load: Callable[[str], tuple[np.ndarray, np.ndarray | None]],
                        patch_size: Sequence[int], count: int, seed: int = 0) -> list[np.ndarray]:
    """`count` windows (1, C, *patch) float32 from random cases; `load(case_id)` gives the case's (C, Z, Y, X) image and
    its foreground voxels ((N, 3) z, y, x, or None). A third of the windows are centred on a foreground voxel, the rest
    placed at random; 0 pads where a case is smaller than the patch. A 2D patch is cut from one slice. Each case is
    loaded once, so memory holds one case at a time."""
    rng = np.random.default_rng(seed)
    patch = [int(p) for p in patch_size]
    chosen = rng.integers(len(case_ids), size=count)
    windows = []
    for k in np.unique(chosen):
        image, points = load(case_ids[int(k)])
        for _ in range(int((chosen == k).sum())):
            windows.append(_window(image, points, patch, rng))
    order = rng.permutation(len(windows))
    return [windows[i] for i in order]


def _window(image: np.ndarray, points: np.ndarray | None, patch: list[int], rng: np.random.Generator) -> np.ndarray:
    spatial = image.shape[1:]
    centre = None
    if points is not None and len(points) and rng.random() < FOREGROUND_SHARE:
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


def _import_nncf():
    try:
        import nncf
    except ImportError:
        raise QuantizationError("autoseg quantize needs the nncf package, which is not installed: "
                                "pip install 'autoseg[openvino]'") from None
    return nncf


def quantize_model(model, windows: Sequence[np.ndarray]):
    """NNCF's post-training int8 quantization of an OpenVINO model, calibrated on `windows`."""
    nncf = _import_nncf()
    return nncf.quantize(model, nncf.Dataset(list(windows)), subset_size=len(windows))


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


def check_int8(workdir: Path, plans, configuration: str, float32_net: OpenVINONetwork, int8_net: OpenVINONetwork,
               case_ids: Sequence[str], tolerance: float, progress: bool = True) -> QuantizationCheck:
    """Predict `case_ids` in full with both networks and compare their mean Dice per label."""
    from autoseg.dataset.layout import load_dataset, read_case_label
    from autoseg.evaluation import evaluate_case, mean_per_label, nan_to_none
    from autoseg.inference.predictor import Predictor, PreparedCase
    from autoseg.inference.settings import ComputeSettings

    raw = read_json(workspace.dataset_json(workdir))
    cases = {c.case_id: c for c in load_dataset(raw["root"]).cases}
    structures = plans.scored_structures
    compute = ComputeSettings(device="cpu", runtime="openvino")
    predictors = {name: Predictor.from_networks(plans, configuration, [net], compute=compute, workdir=workdir)
                  for name, net in (("float32", float32_net), ("int8", int8_net))}
    scores: dict[str, dict] = {"float32": {}, "int8": {}}
    for case_id in tqdm(case_ids, desc="int8 check", unit="case", disable=not progress):
        image, properties = _case_inputs(workdir, plans, configuration, case_id)
        prepared = PreparedCase(properties.original_geometry, (configuration,), (image,), (properties,))
        reference = read_case_label(cases[case_id])
        for name, predictor in predictors.items():
            labels = predictor.segment(prepared).labels
            scores[name][case_id] = evaluate_case(labels, reference, properties.original_geometry.spacing,
                                                  structures, plans.ignore_label)
    means = {name: nan_to_none(mean_per_label(per_case, list(structures))) for name, per_case in scores.items()}
    return QuantizationCheck({k: v["dice"] for k, v in means["float32"].items()},
                             {k: v["dice"] for k, v in means["int8"].items()}, tolerance)


def quantize_fold(workdir: Path, configuration: str, fold: str, *, checkpoint: str = "final",
                  calibration: int = DEFAULT_CALIBRATION_WINDOWS, validation_cases: int | None = None,
                  tolerance: float = DEFAULT_TOLERANCE, seed: int = 0, threads: int | None = None,
                  progress: bool = True) -> dict:
    """Quantize one fold's network to int8, check it on the fold's validation cases, and install it if accepted.

    Returns the record written to quantization.json; QuantizationError (with the Dice figures) when refused.
    """
    from autoseg.inference.predictor import PredictorError, check_trained_with_these_plans
    from autoseg.model_files import CheckpointError, load_fold
    from autoseg.network.unet import build_unet
    from autoseg.planning.plans import Plans
    from autoseg.preprocessing import store
    from autoseg.training.splits import SplitError, fold_cases, load_or_create_splits

    if calibration < 1:
        raise QuantizationError(f"calibration windows must be at least 1, got {calibration}")
    if not 0 <= tolerance < 1:
        raise QuantizationError(f"tolerance must be a Dice difference in [0, 1), got {tolerance}")
    ov = import_openvino("autoseg quantize")
    _import_nncf()
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
    try:
        splits = [] if fold == "all" else load_or_create_splits(workspace.splits_json(workdir), case_ids)
        train_ids, val_ids = fold_cases(splits, fold, case_ids)
    except SplitError as exc:
        raise QuantizationError(str(exc)) from None
    held_out = bool(val_ids)
    if not held_out:  # fold "all": no case is held out, so the check runs on training cases
        val_ids = list(train_ids)
    if validation_cases is not None:
        val_ids = sorted(np.random.default_rng(seed).permutation(val_ids)[:validation_cases].tolist())

    network = build_unet(plans.network_topology(configuration), deep_supervision=False)
    network.load_state_dict(state.network_state)
    channels, patch = plans.input_channels(configuration), config.patch_size
    started = time.perf_counter()
    model = convert_network(network, channels, patch)

    def load(case_id: str) -> tuple[np.ndarray, np.ndarray | None]:
        image, properties = _case_inputs(workdir, plans, configuration, case_id)
        points = [np.asarray(v).reshape(-1, 3) for v in properties.class_locations.values() if len(v)]
        return image, (np.concatenate(points) if points else None)

    windows = calibration_windows(train_ids, load, patch, calibration, seed)
    log.info("%s fold %s: calibrating int8 on %d windows from %d training cases", configuration, fold,
             len(windows), len(train_ids))
    quantized = quantize_model(model, windows)
    quantize_seconds = time.perf_counter() - started
    float32_net = OpenVINONetwork(None, channels, patch, threads, model=model)
    int8_net = OpenVINONetwork(None, channels, patch, threads, model=quantized)
    check = check_int8(workdir, plans, configuration, float32_net, int8_net, val_ids, tolerance, progress)
    names = plans.output_labels
    if not check.accepted:
        raise QuantizationError(
            f"{path}: int8 refused, a label's validation Dice drops by {check.max_drop:.4f} > tolerance {tolerance} "
            f"on {len(val_ids)} case(s) ({check.describe(names)}); predict in float32 (`--runtime openvino`), "
            "or accept the loss with a larger --tolerance")
    record = {
        "format_version": FORMAT_VERSION, "configuration": configuration, "fold": str(fold),
        "checkpoint": path.name, "checkpoint_sha256": file_sha256(path),
        "calibration": {"windows": len(windows), "training_cases": len(train_ids),
                        "foreground_share": round(FOREGROUND_SHARE, 4), "seed": seed},
        "check": {"cases": list(val_ids), "held_out": held_out, "mirroring": True, "tolerance": tolerance,
                  "names": {k: names.get(int(k), k) for k in check.dice_float32},
                  "dice_float32": check.dice_float32, "dice_int8": check.dice_int8,
                  "max_drop": round(check.max_drop, 6)},
        "quantize_seconds": round(quantize_seconds, 1),
        "versions": {"openvino": ov.__version__, "nncf": _import_nncf().__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _install(quantized, record, quantized_dir(workdir, configuration, str(fold)))
    return record


def _install(model, record: dict, target: Path) -> None:
    """Write the model and its record into a temporary folder beside `target`, then swap it in."""
    ov = import_openvino()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
        write_json(tmp / RECORD, record)
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def int8_problem(workdir: Path, configuration: str, fold: str, checkpoint: Path) -> str | None:
    """Why the fold's int8 model cannot be used with `checkpoint` (None: it can)."""
    folder = quantized_dir(workdir, configuration, fold)
    command = f"autoseg quantize {workdir} --config {configuration} --folds {fold}"
    if not (folder / RECORD).is_file() or not (folder / "model.xml").is_file():
        return f"{folder}: no int8 model; make it with `{command}` (or predict with --runtime openvino)"
    record = read_json(folder / RECORD)
    if record.get("format_version") != FORMAT_VERSION:
        return (f"{folder / RECORD}: format_version {record.get('format_version')} is not {FORMAT_VERSION}; run "
                f"`{command}` again")
    if record.get("checkpoint_sha256") != file_sha256(checkpoint):
        return (f"{folder}: the int8 model was made from another {record.get('checkpoint')} than {checkpoint} "
                f"(retrained, or another --checkpoint); run `{command}` again")
    return None


def load_int8(workdir: Path, configuration: str, fold: str, checkpoint: Path, in_channels: int,
              patch_size: Sequence[int], threads: int | None = None) -> OpenVINONetwork:
    """The fold's accepted int8 network, refused if it was made from another checkpoint than `checkpoint`."""
    problem = int8_problem(workdir, configuration, fold, checkpoint)
    if problem is not None:
        raise QuantizationError(problem)
    ov = import_openvino("--runtime openvino-int8")
    model = ov.Core().read_model(str(quantized_dir(workdir, configuration, fold) / "model.xml"))
    return OpenVINONetwork(None, in_channels, patch_size, threads, model=model)
