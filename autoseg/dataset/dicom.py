"""DICOM series as images: found in a folder tree by series instance UID, read in slice order with exact geometry.

A DICOM series becomes one (z, y, x) array with the same `Geometry` as `image_io.read_image` gives for
other formats: SimpleITK's series reader sorts the slices along the slice normal and applies the
rescale slope/intercept (CT in Hounsfield units). Because that reader averages the slice distance and
only warns when slices are missing or unevenly spaced, the slice positions are checked here and such a
series is refused with a message instead of being read onto a wrong grid.

Case ids: a series is named by its Series Instance UID (digits and dots), so names are unique, stable
across runs and carry no patient data; any character other than letters, digits, `.`, `-` and `_` is
replaced by `_`. The patient, study and series descriptions are only used in messages.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from autoseg.dataset.image_io import Geometry, ImageReadError, _geometry_of, image_suffix

log = logging.getLogger(__name__)

DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
# Series that hold no image to segment: segmentations, structure sets, reports, presentation states...
NON_IMAGE_MODALITIES = frozenset({"SEG", "RTSTRUCT", "RTPLAN", "RTRECORD", "SR", "PR", "KO", "REG", "DOC", "RWV",
                                  "FID", "PLAN", "AU", "ECG"})
SLICE_TOLERANCE = 0.01  # relative to the slice distance: how uneven slice positions may be
# (7FE0,0010) Pixel Data, (7FE0,0008) Float and (7FE0,0009) Double Float Pixel Data, little and big endian
_PIXEL_DATA_TAGS = tuple(bytes.fromhex(h) for h in ("e07f1000", "e07f0800", "e07f0900", "7fe00010", "7fe00008",
                                                    "7fe00009"))
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_TAGS = {"modality": "0008|0060", "series_uid": "0020|000e", "series_description": "0008|103e",
         "series_number": "0020|0011", "study_description": "0008|1030", "patient_id": "0010|0020"}


@dataclass(frozen=True)
class DicomSeries:
    series_uid: str
    files: tuple[Path, ...]  # in slice order
    description: str  # patient, study and series, for messages

    @property
    def case_id(self) -> str:
        return _UNSAFE.sub("_", self.series_uid)


def is_dicom_file(path: Path) -> bool:
    """A .dcm/.dicom/.ima file, or a file without an image suffix that starts like DICOM (`DICM` at byte 128)."""
    name = path.name.lower()
    if name.startswith(".") or name == "dicomdir":
        return False
    if name.endswith(DICOM_SUFFIXES):
        return True
    if image_suffix(path) is not None:
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def find_dicom_series(root: Path, recursive: bool = True) -> tuple[list[DicomSeries], list[tuple[str, str]]]:
    """Every image series under `root` (each folder read on its own), and (path, problem) for DICOM files that
    belong to no readable series or series split over folders. Non-image series (SEG, RTSTRUCT, SR...) are skipped."""
    series: dict[str, DicomSeries] = {}
    problems: list[tuple[str, str]] = []
    for folder in _folders(Path(root), recursive):
        candidates = sorted(f for f in folder.iterdir() if f.is_file() and is_dicom_file(f))
        if not candidates:
            continue
        found, bad = series_in_folder(folder, candidates)
        problems += bad
        for s in found:
            if s.series_uid in series:
                problems.append((str(folder), f"series {s.series_uid} ({s.description}) has files in "
                                              f"{series[s.series_uid].files[0].parent} and in {folder}; put all of "
                                              "its files in one folder"))
            else:
                series[s.series_uid] = s
    return list(series.values()), problems


def _folders(root: Path, recursive: bool) -> list[Path]:
    if not recursive:
        return [root]
    folders = []
    for current, dirs, _ in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        folders.append(Path(current))
    return folders


def series_in_folder(folder: Path, candidates: Sequence[Path] | None = None
                     ) -> tuple[list[DicomSeries], list[tuple[str, str]]]:
    """The image series GDCM finds in one folder (not its subfolders), each with its files in slice order."""
    if candidates is None:
        candidates = (f for f in folder.iterdir() if f.is_file() and is_dicom_file(f))
    candidates = sorted(candidates)
    found, problems, used = [], [], set()
    for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)):
        files = tuple(Path(f) for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
        used.update(f.name for f in files)
        if not files:
            continue
        tags = _header_tags(files[0])
        if tags is None:
            problems.append((str(files[0]), f"{files[0]}: unreadable DICOM header; series {uid} is left out"))
            continue
        if tags["modality"].upper() in NON_IMAGE_MODALITIES:
            log.info("%s: series %s is a %s object, not an image; skipped", folder, uid, tags["modality"])
            continue
        found.append(DicomSeries(tags["series_uid"] or uid, files, _describe(tags)))
    for f in candidates:
        problem = None if f.name in used else _orphan_problem(f)
        if problem:
            problems.append((str(f), f"{f}: {problem}"))
    return found, problems


def _orphan_problem(path: Path) -> str | None:
    """Why a DICOM-looking file in no series matters, or None for an object without pixels (a report,
    presentation state, structure set...), which is skipped."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if data[128:132] != b"DICM":
        return "not a DICOM file (no DICM preamble); move it out of the input folder"
    if not any(tag in data for tag in _PIXEL_DATA_TAGS):
        log.debug("%s: a DICOM object without pixels, skipped", path)
        return None
    return ("not a readable DICOM image (no series could use it); if it is a slice, its series will be missing it: "
            "export the series again")


def _header_tags(path: Path) -> dict[str, str] | None:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.SetImageIO("GDCMImageIO")
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    return {k: reader.GetMetaData(t).strip() if reader.HasMetaDataKey(t) else "" for k, t in _TAGS.items()}


def _describe(tags: dict[str, str]) -> str:
    parts = [f"patient {tags['patient_id']}" if tags["patient_id"] else "",
             f"study '{tags['study_description']}'" if tags["study_description"] else "",
             f"series {tags['series_number']}"
             + (f" '{tags['series_description']}'" if tags["series_description"] else "")]
    return ", ".join(p for p in parts if p)


def series_of_file(path: Path) -> DicomSeries | None:
    """The series in the file's folder that holds this file (for a DICOM file given on its own)."""
    found, _ = series_in_folder(path.parent)
    return next((s for s in found if any(f.resolve() == path.resolve() for f in s.files)), None)


def read_dicom_series(files: Sequence[Path]) -> tuple[np.ndarray, Geometry]:
    """The series' voxels as (z, y, x) with its geometry (one file: z = 1); ImageReadError naming the folder
    when it cannot be read onto a regular grid (missing or unevenly spaced slices, tilted gantry, mixed
    orientations, several images at one position, colour pixels)."""
    files = [Path(f) for f in files]
    where = files[0].parent if len(files) > 1 else files[0]
    reader = sitk.ImageSeriesReader()
    reader.SetImageIO("GDCMImageIO")
    reader.SetFileNames([str(f) for f in files])
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise ImageReadError(where, f"unreadable DICOM series ({lines[-1][:200] if lines else 'no detail'})") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ImageReadError(where, "colour (RGB) DICOM images are not supported; segment greyscale series")
    if image.GetDimension() == 3 and len(files) > 1:
        _check_slices(reader, files, image, where)
    array = sitk.GetArrayFromImage(image)
    geometry = _geometry_of(image)
    if image.GetDimension() == 2:
        array = array[None]
    return array, geometry


def _check_slices(reader: sitk.ImageSeriesReader, files: list[Path], image: sitk.Image, where: Path) -> None:
    """The slice positions must lie on one line along the slice normal, evenly spaced, as the grid assumes."""
    def values(i: int, tag: str) -> np.ndarray | None:
        try:
            return np.array([float(v) for v in reader.GetMetaData(i, tag).split("\\")])
        except (RuntimeError, ValueError):
            return None

    positions = [values(i, "0020|0032") for i in range(len(files))]
    orientations = [values(i, "0020|0037") for i in range(len(files))]
    if any(p is None or p.shape != (3,) for p in positions):
        raise ImageReadError(where, "a slice has no Image Position (Patient); the slice order cannot be trusted")
    if any(o is None or o.shape != (6,) or not np.allclose(o, orientations[0], atol=1e-4) for o in orientations):
        raise ImageReadError(where, "the slices have different orientations (a localizer mixed into the series?); "
                                    "export the axial, coronal or sagittal series on its own")
    row, column = orientations[0][:3], orientations[0][3:]
    normal = np.cross(row, column)
    offsets = np.array([p - positions[0] for p in positions])
    along = offsets @ normal
    ordered = np.sort(along)
    spacing = float(np.median(np.diff(ordered)))
    if spacing < 1e-6 or np.any(np.diff(ordered) < SLICE_TOLERANCE * spacing):
        raise ImageReadError(where, "several images lie at the same slice position (echoes, phases or time points "
                                    "in one series?); export each volume as its own series")
    steps = np.diff(ordered)
    if np.abs(steps - spacing).max() > max(SLICE_TOLERANCE * spacing, 1e-3):
        gaps = ", ".join(f"{s:g}" for s in sorted({round(float(s), 3) for s in steps}))
        raise ImageReadError(where, f"slices are not evenly spaced (distances {gaps} mm): a slice is missing or the "
                                    "series mixes acquisitions; export the complete series")
    sideways = np.linalg.norm(offsets - np.outer(along, normal), axis=1).max()
    if sideways > max(SLICE_TOLERANCE * spacing, 1e-3):
        raise ImageReadError(where, f"slice positions drift {sideways:.2f} mm sideways from the slice normal (gantry "
                                    "tilt); resample the series to an untilted grid first")
    grid = np.array([image.TransformIndexToPhysicalPoint((0, 0, i)) for i in range(len(files))])
    error = np.linalg.norm(grid - np.array(positions), axis=1).max()
    if error > max(SLICE_TOLERANCE * spacing, 1e-3):
        raise ImageReadError(where, f"the grid read from the series misses the slices' recorded positions by up to "
                                    f"{error:.3f} mm; the slice order cannot be trusted")
