"""Check every case of a dataset and report every problem at once, each naming its file."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from autoseg.dataset.image_io import (
    NATURAL_IMAGE_SUFFIXES,
    Geometry,
    ImageReadError,
    image_suffix,
    read_image,
    read_label,
)
from autoseg.dataset.layout import GEOMETRY_TOLERANCE, INSTANCES_DIR, Case, Dataset, DatasetError, read_case_instances
from autoseg.parallel import map_cases

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Problem:
    severity: str  # "error" or "warning"
    file: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity.upper():7s} {self.file}: {self.message}"


@dataclass
class VerifyReport:
    num_cases: int
    problems: list[Problem] = field(default_factory=list)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list[Problem]:
        return [p for p in self.problems if p.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_json(self) -> dict:
        return {"format_version": 1, "num_cases": self.num_cases, "ok": self.ok,
                "problems": [p.__dict__ for p in self.problems]}

    def summary(self) -> str:
        lines = [str(p) for p in self.problems]
        lines.append(f"{self.num_cases} cases checked: {len(self.errors)} error(s), {len(self.warnings)} warning(s)")
        return "\n".join(lines)


def check_case(case: Case, num_channels: int, declared_labels: frozenset[int],
               keep: dict | None = None) -> list[Problem]:
    """All problems of one case; reads every file completely so truncation is caught. With `keep`, the arrays
    read are left there ("images": [(array, geometry)] per image file read, "label": the label map), so a
    later step of the same pass need not read the files again."""
    problems: list[Problem] = []

    def error(path: Path | str, msg: str) -> None:
        problems.append(Problem("error", str(path), msg))

    grids: list[tuple[Path, Geometry]] = []
    for path in case.image_files:
        try:
            array, geometry = read_image(path)
        except ImageReadError as exc:
            error(path, exc.reason)
            continue
        picture = image_suffix(path) in NATURAL_IMAGE_SUFFIXES
        if case.channels_in_one_file:
            channels = array.shape[0] if array.ndim == 4 else 1
            if channels != num_channels:
                hint = " (a picture holding every channel needs that many colour components)" if picture else ""
                error(path, f"has {channels} channel(s), dataset.json declares {num_channels}{hint}")
        elif array.ndim != 3:
            error(path, f"expected one channel per file, found {array.shape[0]} "
                        f"({'colour pixels' if picture else 'a 4D image'})")
        nan, inf = _non_finite_counts(Path(path), array)
        if nan or inf:
            error(path, f"{nan} NaN and {inf} infinite intensities")
        grids.append((path, geometry))
        if keep is not None:
            keep.setdefault("images", []).append((array, geometry))

    if len(grids) > 1:
        first_path, first = grids[0]
        for path, g in grids[1:]:
            diff = g.differences(first, GEOMETRY_TOLERANCE)
            if diff:
                error(path, f"grid differs from channel file {first_path.name}: {'; '.join(diff)}")

    if case.label_file is None:
        error(case.image_files[0], "no label file given for this training case")
        return problems
    try:
        label, label_geometry = read_label(case.label_file)
    except ImageReadError as exc:
        error(case.label_file, exc.reason)
        return problems
    if keep is not None:
        keep["label"] = label
    if image_suffix(case.label_file) in (".jpg", ".jpeg"):
        problems.append(Problem("warning", str(case.label_file), "JPEG is lossy: compression alters label values "
                                                                 "along edges; store label maps as PNG"))
    if grids:
        diff = label_geometry.differences(grids[0][1], GEOMETRY_TOLERANCE)
        if diff:
            error(case.label_file, f"label grid differs from image {grids[0][0].name}: {'; '.join(diff)}")
    if np.issubdtype(label.dtype, np.floating):
        if not np.isfinite(label).all():
            error(case.label_file, "label map holds NaN or infinite values")
            return problems
        if not np.array_equal(np.rint(label), label):
            error(case.label_file, "label map holds non-integer values")
            return problems
    values = set(int(v) for v in np.unique(label))
    undeclared = sorted(values - declared_labels)
    if undeclared:
        error(case.label_file, f"label values {undeclared} are not declared in dataset.json 'labels'")
    if values <= {0}:
        problems.append(Problem("warning", str(case.label_file), "label map is empty (background only)"))
    if case.instance_file is not None:
        try:
            read_case_instances(case, np.rint(label))
        except (DatasetError, ImageReadError) as exc:
            text = exc.reason if isinstance(exc, ImageReadError) else str(exc)
            error(case.instance_file, text.removeprefix(f"{case.instance_file}: "))
    return problems


def _non_finite_counts(path: Path, array: np.ndarray) -> tuple[int, int]:
    """NaN and infinity counts. SimpleITK's NIfTI reader turns them into 0, so NIfTI files whose voxels it
    returns as floats are checked on their raw voxels with nibabel (integer voxels hold neither)."""
    if not np.issubdtype(array.dtype, np.floating):
        return 0, 0
    if path.name.lower().endswith((".nii", ".nii.gz")):
        import nibabel

        image = nibabel.load(str(path))
        if not np.issubdtype(image.get_data_dtype(), np.floating):
            return 0, 0
        array = np.asarray(image.dataobj)
    return int(np.isnan(array).sum()), int(np.isinf(array).sum())


def _check_case_args(args: tuple[Case, int, frozenset[int]]) -> list[Problem]:
    return check_case(*args)


def verify_dataset(dataset: Dataset, workers: int = 1, progress: bool = True) -> VerifyReport:
    """Check every case (in parallel over `workers` processes) and collect all problems."""
    report = dataset_problems(dataset)
    jobs = [(c, dataset.num_channels, frozenset(dataset.labels)) for c in dataset.cases]
    for problems in map_cases(_check_case_args, jobs, workers, "verify", progress):
        report.problems.extend(problems)
    return report


def dataset_problems(dataset: Dataset) -> VerifyReport:
    """A report holding the problems of the dataset as a whole (repeated case ids, partial instance maps); the
    cases' own problems are added by `check_case`."""
    report = VerifyReport(len(dataset.cases))
    for case_id, count in Counter(c.case_id for c in dataset.cases).items():
        if count > 1:
            files = [str(c.image_files[0]) for c in dataset.cases if c.case_id == case_id]
            report.problems.append(Problem("error", files[0], f"case id '{case_id}' appears {count} times "
                                                              f"({', '.join(files[1:])})"))
    with_maps = [c for c in dataset.cases if c.instance_file is not None]
    if (dataset.root / INSTANCES_DIR).is_dir() and not dataset.has_instances:
        lacking = [c.case_id for c in dataset.cases if c.instance_file is None]
        report.problems.append(Problem("warning", str(dataset.root / INSTANCES_DIR),
                                       f"holds instance maps for {len(with_maps)} of {len(dataset.cases)} cases "
                                       f"(none for {', '.join(lacking[:3])}{' ...' if len(lacking) > 3 else ''}); "
                                       "instance segmentation needs one per case, so the plan will be semantic only"))
    return report
