"""A fold's int8 network on disk: where `autoseg quantize` puts it, whether it may be used, loading it.

    models/<config>/fold_<K>/openvino_int8/model.xml, model.bin   the int8 OpenVINO model
    models/<config>/fold_<K>/openvino_int8/quantization.json      the record of its check (format_version,
        configuration, fold, checkpoint, checkpoint_sha256, calibration, check, versions, created)

Prediction uses it only when the record's checkpoint SHA-256 equals that of the checkpoint file it
would load, so training a fold again never leaves a stale int8 model in use. Making and checking
the networks is autoseg/quantization.py; this module is what prediction needs of them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from autoseg import workspace
from autoseg.atomic import ArtifactError, atomic_dir, read_json, write_json
from autoseg.errors import AutosegError
from autoseg.inference.openvino_runtime import OpenVINONetwork, import_openvino
from autoseg.model_files import file_sha256

FORMAT_VERSION = 1
QUANTIZED_DIR = "openvino_int8"
RECORD = "quantization.json"
FILES = ("model.xml", "model.bin", RECORD)


class QuantizationError(AutosegError):
    """An int8 model that cannot be made, is refused by its Dice check, or does not fit the checkpoint."""


def quantized_dir(workdir: Path, configuration: str, fold: str) -> Path:
    return workspace.fold_dir(workdir, configuration, fold) / QUANTIZED_DIR


def quantize_command(workdir: Path, configuration: str, fold: str, checkpoint_choice: str = "final") -> str:
    choice = "" if checkpoint_choice == "final" else f" --checkpoint {checkpoint_choice}"
    return f"autoseg quantize {workdir} --config {configuration} --folds {fold}{choice}"


def int8_problem(workdir: Path, configuration: str, fold: str, checkpoint: Path,
                 checkpoint_choice: str = "final") -> str | None:
    """Why the fold's int8 model cannot be used with the `checkpoint` file (None: it can)."""
    workdir = Path(workdir)
    folder = quantized_dir(workdir, configuration, fold)
    if (workdir / "manifest.json").is_file():  # a model archive's workspace: no training data to calibrate on
        if not (folder / RECORD).is_file():
            return (f"{workdir}: a model archive carries no int8 networks; predict with --runtime openvino, or "
                    "run `autoseg quantize` in the workspace that trained the model")
    command = quantize_command(workdir, configuration, fold, checkpoint_choice)
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        return (f"{folder}: no int8 model ({', '.join(missing)} missing); make it with `{command}` (or predict with "
                "--runtime openvino)")
    try:
        record = read_json(folder / RECORD)
    except ArtifactError as exc:
        return f"{exc}; run `{command}` again"
    if not isinstance(record, dict) or record.get("format_version") != FORMAT_VERSION:
        version = record.get("format_version") if isinstance(record, dict) else None
        return f"{folder / RECORD}: format_version {version} is not {FORMAT_VERSION}; run `{command}` again"
    if record.get("checkpoint_sha256") != file_sha256(checkpoint):
        return (f"{folder}: the int8 model was made from another {record.get('checkpoint')} than {checkpoint} "
                f"(the fold was trained again, or another --checkpoint is used); run `{command}` again")
    return None


def load_int8(workdir: Path, configuration: str, fold: str, checkpoint: Path, in_channels: int,
              patch_size: Sequence[int], checkpoint_choice: str = "final",
              threads: int | None = None) -> OpenVINONetwork:
    """The fold's accepted int8 network; QuantizationError naming the fix when it is missing, stale or unreadable."""
    problem = int8_problem(workdir, configuration, fold, checkpoint, checkpoint_choice)
    if problem is not None:
        raise QuantizationError(problem)
    ov = import_openvino("--runtime openvino-int8")
    folder = quantized_dir(workdir, configuration, fold)
    try:
        model = ov.Core().read_model(str(folder / "model.xml"))
        return OpenVINONetwork(None, in_channels, patch_size, threads, model=model)
    except RuntimeError as exc:  # a damaged file, or a model from an incompatible openvino
        first = (str(exc).strip().splitlines() or ["no detail"])[0][:200]
        raise QuantizationError(f"{folder}: openvino cannot load the int8 model ({first}); run "
                                f"`{quantize_command(workdir, configuration, fold, checkpoint_choice)}` "
                                "again") from None


def install_int8(model, record: dict, target: Path) -> None:
    """Write the model and its record into a temporary folder beside `target`, then swap it in (the previous int8
    model, if any, stays in place on any failure)."""
    ov = import_openvino()
    with atomic_dir(target) as tmp:
        ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
        write_json(tmp / RECORD, record)
