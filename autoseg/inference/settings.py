"""What a prediction run was asked for, as small records: which models, how windows run, on what, what to write.

`autoseg predict`'s options map onto these one to one (docs/cli.md); `predict_folder` takes them, and
`Predictor` takes the first three, so validation and prediction run windows with the same settings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from autoseg.errors import AutosegError
from autoseg.model_files import CHECKPOINT_FILES

RUNTIMES = ("torch", "openvino", "openvino-int8", "auto")
OUTPUT_FORMATS = ("default", "dicom-seg")
# Flag a label for review when the ensemble's mean entropy over it exceeds this share of log(K). A starting
# point, not calibrated on any dataset: docs/prediction.md says how to choose it for a model.
DEFAULT_UNCERTAINTY_THRESHOLD = 0.1


class PredictionSettingsError(AutosegError):
    """A prediction setting out of its range; the message names the option."""


@dataclass(frozen=True)
class ModelChoice:
    """Which trained networks to ensemble."""

    configurations: tuple[str, ...] | None = None  # None: the plans' default_configuration
    folds: tuple[str, ...] | None = None  # None: every fold_* folder of each configuration
    checkpoint: str = "final"  # "final" (falling back to checkpoint_latest.pt), "latest" or "best"
    # True for a model archive's verified extraction (`predict --model`): nothing may be written beside its
    # checkpoints, so OpenVINO's conversion is not kept there (openvino_runtime.converted_model)
    read_only: bool = False

    def __post_init__(self) -> None:
        if self.configurations is not None:
            object.__setattr__(self, "configurations", tuple(self.configurations))
        if self.folds is not None:
            object.__setattr__(self, "folds", tuple(str(f) for f in self.folds))
        if self.checkpoint not in CHECKPOINT_FILES:
            raise PredictionSettingsError(f"checkpoint must be one of {', '.join(CHECKPOINT_FILES)}, "
                                          f"got {self.checkpoint!r}")


@dataclass(frozen=True)
class WindowSettings:
    """How each network is slid over a case, whatever its configuration."""

    step_size: float = 0.5  # window step as a fraction of the patch
    mirroring: bool = True  # test-time mirroring along every spatial axis of the patch
    tiles_per_batch: int | None = None  # None: 4 on CUDA, 1 elsewhere

    def __post_init__(self) -> None:
        if not 0 < self.step_size <= 1:
            raise PredictionSettingsError(f"step size must be in (0, 1], got {self.step_size}")
        if self.tiles_per_batch is not None and self.tiles_per_batch < 1:
            raise PredictionSettingsError(f"tiles per batch must be at least 1, got {self.tiles_per_batch}")


@dataclass(frozen=True)
class ComputeSettings:
    """Where and in what precision the networks run."""

    device: str | torch.device | None = None  # None: CUDA if available, else the CPU
    mixed_precision: bool = True  # float16 on CUDA, bfloat16 on a CPU with native bf16; False: --fp32
    # "torch"; "openvino": float32 through OpenVINO, CPU only; "openvino-int8": the folds' int8 networks that
    # `autoseg quantize` made and checked (autoseg/quantization.py); "auto" (what `autoseg predict` and the Python
    # API default to): where torch would run float32 on the CPU and openvino is installed, openvino-int8 when every
    # fold predicted together has a current int8 network, else openvino, unless a configuration's windows take
    # torch's low-memory forward; torch everywhere else (openvino_runtime.choose_runtime, Predictor). The
    # record's own default stays torch, for the callers inside autoseg that hold networks in memory.
    runtime: str = "torch"

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise PredictionSettingsError(f"runtime must be one of {', '.join(RUNTIMES)}, got {self.runtime!r}")


@dataclass(frozen=True)
class OutputOptions:
    """What is written per case besides the label map, and the batch's report files."""

    save_probabilities: bool = False  # <case>.npz: per-label probabilities on the input's grid
    save_uncertainty: bool = False  # <case>_uncertainty<ending>: the ensemble's voxel entropy / log(K)
    uncertainty_threshold: float = DEFAULT_UNCERTAINTY_THRESHOLD
    report_files: bool = True  # volumes.csv, qc/<case>.png overlays and report.html
    postprocessing: bool = True  # apply WORKDIR/postprocessing.json when it was decided for these configurations
    output_format: str = "default"  # or "dicom-seg" for DICOM series inputs
    model_name: str | None = None  # what volumes.csv calls the model; None: the workspace folder's name

    def __post_init__(self) -> None:
        if self.output_format not in OUTPUT_FORMATS:
            raise PredictionSettingsError(f"output format must be one of {', '.join(OUTPUT_FORMATS)}, "
                                          f"got {self.output_format!r}")
        if not 0 <= self.uncertainty_threshold <= 1:
            raise PredictionSettingsError(f"uncertainty threshold must be in [0, 1] (entropy / log(K)), "
                                          f"got {self.uncertainty_threshold}")


@dataclass(frozen=True)
class BatchOptions:
    """How a folder of cases is worked through."""

    skip_existing: bool = False  # --continue: skip cases whose outputs (and volumes.csv rows) exist
    num_parts: int = 1  # split the cases into this many parts ...
    part_id: int = 0  # ... and predict only this one
    workers: int = 1  # threads reading/preprocessing ahead and writing behind; 0: all in turn
    progress: bool = True

    def __post_init__(self) -> None:
        if self.num_parts < 1 or not 0 <= self.part_id < self.num_parts:
            raise PredictionSettingsError(f"part id must be in 0..num_parts-1, got part id {self.part_id}, "
                                          f"num_parts {self.num_parts}")
        if self.workers < 0:
            raise PredictionSettingsError(f"workers must be 0 or more, got {self.workers}")

