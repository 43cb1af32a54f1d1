"""What the data is: spacings, shapes, non-zero regions and foreground intensities of every case.

Written as `fingerprint.json` in the workspace; the planner reads only this file.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from autoseg.atomic import read_json, write_json
from autoseg.dataset.layout import (
    Case,
    Dataset,
    DatasetError,
    case_image_from_arrays,
    case_label_from_array,
    read_case_image,
    read_case_label,
)
from autoseg.dataset.regions import Region
from autoseg.dataset.verify import VerifyReport, check_case, dataset_problems
from autoseg.errors import AutosegError
from autoseg.parallel import map_cases

log = logging.getLogger(__name__)


class FingerprintError(AutosegError):
    """A fingerprint.json this version cannot read; the message names the file and the step to rerun."""

FORMAT_VERSION = 2
# Foreground intensities sampled per channel over the whole dataset, spread evenly over the cases and
# drawn with replacement, so a case with little foreground weighs as much as one with much (nnU-Net's
# rule). nnU-Net draws 10^8; 10^7 gives the same statistics (docs/planning.md) in a tenth of the memory.
FOREGROUND_SAMPLES_TOTAL = 10_000_000


@dataclass(frozen=True)
class IntensityStats:
    mean: float
    std: float
    min: float
    max: float
    median: float
    percentile_00_5: float
    percentile_99_5: float

    @classmethod
    def of(cls, values: np.ndarray) -> "IntensityStats":
        if values.size == 0:
            return cls(*(float("nan"),) * 7)
        v = values.astype(np.float64)
        lo, med, hi = np.percentile(v, [0.5, 50.0, 99.5])
        return cls(float(v.mean()), float(v.std()), float(v.min()), float(v.max()), float(med), float(lo), float(hi))


@dataclass(frozen=True)
class CaseFingerprint:
    case_id: str
    spacing: tuple[float, ...]       # per array axis (z, y, x)
    shape: tuple[int, ...]
    nonzero_bbox: tuple[tuple[int, int], ...]  # [lo, hi) per axis of the region kept by cropping
    foreground_voxels: int
    foreground_intensities: tuple[IntensityStats, ...]  # one per channel

    @property
    def cropped_shape(self) -> tuple[int, ...]:
        return tuple(hi - lo for lo, hi in self.nonzero_bbox)


@dataclass(frozen=True)
class Fingerprint:
    dataset_name: str
    channel_names: tuple[str, ...]
    channel_kinds: tuple[str, ...]    # intensity kind implied by the channel name (see channel_kind)
    labels: dict[int, str]
    cases: tuple[CaseFingerprint, ...]
    foreground_intensities: tuple[IntensityStats, ...]  # pooled over all cases, per channel
    regions: tuple[Region, ...] = ()  # region-based labels (dataset/regions.py); empty: one class per label

    @property
    def spacings(self) -> np.ndarray:
        return np.array([c.spacing for c in self.cases], dtype=float)

    @property
    def cropped_shapes(self) -> np.ndarray:
        return np.array([c.cropped_shape for c in self.cases], dtype=float)

    @property
    def median_cropped_fraction(self) -> float:
        """How much of the volume cropping keeps, median over cases (small: much background removed)."""
        return float(np.median([np.prod(c.cropped_shape) / np.prod(c.shape) for c in self.cases]))

    def to_json(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "dataset_name": self.dataset_name,
            "channel_names": list(self.channel_names),
            "channel_kinds": list(self.channel_kinds),
            "labels": {str(k): v for k, v in self.labels.items()},
            **({"regions": [r.to_json() for r in self.regions]} if self.regions else {}),
            "foreground_intensities": [asdict(s) for s in self.foreground_intensities],
            "cases": [
                {"case_id": c.case_id, "spacing": list(c.spacing), "shape": list(c.shape),
                 "cropped_shape": list(c.cropped_shape), "nonzero_bbox": [list(b) for b in c.nonzero_bbox],
                 "foreground_voxels": c.foreground_voxels,
                 "foreground_intensities": [asdict(s) for s in c.foreground_intensities]}
                for c in self.cases
            ],
        }

    @classmethod
    def from_json(cls, d: dict) -> "Fingerprint":
        if d.get("format_version") != FORMAT_VERSION:
            raise FingerprintError(f"fingerprint format_version {d.get('format_version')} is not {FORMAT_VERSION}; "
                                   "rerun `autoseg plan --steps fingerprint plan`")
        cases = tuple(
            CaseFingerprint(c["case_id"], tuple(c["spacing"]), tuple(c["shape"]),
                            tuple(tuple(b) for b in c["nonzero_bbox"]), c["foreground_voxels"],
                            tuple(IntensityStats(**s) for s in c["foreground_intensities"]))
            for c in d["cases"])
        return cls(d["dataset_name"], tuple(d["channel_names"]), tuple(d["channel_kinds"]),
                   {int(k): v for k, v in d["labels"].items()}, cases,
                   tuple(IntensityStats(**s) for s in d["foreground_intensities"]),
                   tuple(Region.from_json(r, "fingerprint.json") for r in d.get("regions", ())))


def save_fingerprint(fingerprint: Fingerprint, path: Path) -> None:
    write_json(path, fingerprint.to_json())


def load_fingerprint(path: Path) -> Fingerprint:
    try:
        return Fingerprint.from_json(read_json(path))
    except FingerprintError as exc:
        raise FingerprintError(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise FingerprintError(f"{path}: malformed fingerprint ({type(exc).__name__}: {exc}); rerun "
                               "`autoseg plan --steps fingerprint plan`") from None


NORMALIZATION_BY_CHANNEL_NAME = {"ct": "ct", "nonorm": "noNorm", "zscore": "zscore",
                                 "rescale_to_0_1": "rescale_to_0_1", "rgb_to_0_1": "rgb_to_0_1"}


def channel_kind(name: str) -> str:
    """The intensity kind a channel name declares, as nnU-Net v2 reads it: the whole name, case-insensitive.

    `CT` means Hounsfield units (CT normalization); `noNorm`, `zscore`, `rescale_to_0_1` and
    `rgb_to_0_1` name a normalization outright; any other name (`MRI`, `T1`, `R`, `CT_venous`) is
    z-scored per case.
    """
    return NORMALIZATION_BY_CHANNEL_NAME.get(name.casefold(), "zscore")


def nonzero_bounding_box(image: np.ndarray) -> tuple[tuple[int, int], ...]:
    """[lo, hi) per spatial axis of the voxels that are non-zero in any channel of (C, Z, Y, X)."""
    mask = np.any(image != 0, axis=0)
    bbox = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        idx = np.flatnonzero(mask.any(axis=other))
        bbox.append((int(idx[0]), int(idx[-1]) + 1) if idx.size else (0, mask.shape[axis]))
    return tuple(bbox)


def fingerprint_case(case: Case, num_channels: int, seed: int,
                     num_samples: int = FOREGROUND_SAMPLES_TOTAL) -> tuple[CaseFingerprint, np.ndarray]:
    """Per-case fingerprint and `num_samples` foreground intensities per channel, drawn with replacement
    ((C, num_samples) float32; (C, 0) when the case has no foreground)."""
    image, geometry = read_case_image(case, num_channels)
    return fingerprint_arrays(case, image, geometry, read_case_label(case), seed, num_samples)


def fingerprint_arrays(case: Case, image: np.ndarray, geometry, label: np.ndarray, seed: int,
                       num_samples: int = FOREGROUND_SAMPLES_TOTAL) -> tuple[CaseFingerprint, np.ndarray]:
    """`fingerprint_case` of a case already read: (C, Z, Y, X) float32 image, its geometry, int label map."""
    if label.shape != image.shape[1:]:
        raise DatasetError(f"{case.label_file}: label shape {list(label.shape)} differs from the image's "
                           f"{list(image.shape[1:])}")
    foreground = label > 0
    values = image[:, foreground]
    stats = tuple(IntensityStats.of(values[c]) for c in range(image.shape[0]))
    rng = np.random.default_rng(seed)
    if values.shape[1]:
        values = values[:, rng.integers(values.shape[1], size=num_samples)]
    fp = CaseFingerprint(case.case_id, geometry.spacing, geometry.shape, nonzero_bounding_box(image),
                         int(foreground.sum()), stats)
    return fp, values.astype(np.float32)


def _fingerprint_job(args: tuple[Case, int, int, int]) -> tuple[CaseFingerprint, np.ndarray]:
    return fingerprint_case(*args)


def compute_fingerprint(dataset: Dataset, workers: int = 1, progress: bool = True,
                        total_samples: int = FOREGROUND_SAMPLES_TOTAL) -> Fingerprint:
    """Fingerprint every case in parallel over `workers` processes."""
    per_case = _samples_per_case(dataset, total_samples)
    jobs = [(case, dataset.num_channels, i, per_case) for i, case in enumerate(dataset.cases)]
    return _pooled(dataset, map_cases(_fingerprint_job, jobs, workers, "fingerprint", progress))


def verify_and_fingerprint(dataset: Dataset, workers: int = 1, progress: bool = True,
                           total_samples: int = FOREGROUND_SAMPLES_TOTAL) -> tuple[VerifyReport, Fingerprint | None]:
    """`verify_dataset` and `compute_fingerprint` in one pass, each file read once (planning's first two steps);
    the fingerprint is None when verification found an error."""
    report = dataset_problems(dataset)
    per_case = _samples_per_case(dataset, total_samples)
    declared = frozenset(dataset.labels)
    jobs = [(case, dataset.num_channels, declared, i, per_case) for i, case in enumerate(dataset.cases)]
    results = map_cases(_verify_and_fingerprint_job, jobs, workers, "verify and fingerprint", progress)
    for problems, _ in results:
        report.problems.extend(problems)
    if not report.ok:
        return report, None
    return report, _pooled(dataset, [fingerprinted for _, fingerprinted in results])


def _verify_and_fingerprint_job(args: tuple[Case, int, frozenset[int], int, int]
                                ) -> tuple[list, tuple[CaseFingerprint, np.ndarray] | None]:
    case, num_channels, declared, seed, per_case = args
    kept: dict = {}
    problems = check_case(case, num_channels, declared, keep=kept)
    if any(p.severity == "error" for p in problems):
        return problems, None
    image, geometry = case_image_from_arrays(case, num_channels, kept["images"])
    return problems, fingerprint_arrays(case, image, geometry, case_label_from_array(case, kept["label"]), seed,
                                        per_case)


def _samples_per_case(dataset: Dataset, total_samples: int) -> int:
    return max(1, total_samples // max(1, len(dataset.cases)))


def _pooled(dataset: Dataset, results: list[tuple[CaseFingerprint, np.ndarray]]) -> Fingerprint:
    """The dataset's fingerprint from its cases' (fingerprint, foreground samples)."""
    pooled = np.concatenate([samples for _, samples in results], axis=1)
    return Fingerprint(
        dataset.name, dataset.channel_names, tuple(channel_kind(n) for n in dataset.channel_names),
        dict(dataset.labels), tuple(fp for fp, _ in results),
        tuple(IntensityStats.of(pooled[c]) for c in range(dataset.num_channels)), dataset.regions)
