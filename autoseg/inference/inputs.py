"""Find the cases to predict among folders and files, in the layouts users actually have.

Four ways to name inputs (any mix of them may be passed):
- a folder of nnU-Net-style channel files `<case>_<cccc><ending>` (one file per channel, or for
  pictures only `<case>_0000.png` holding every channel as colours, the rule of
  `layout.one_file_holds_all_channels`);
- a folder of one file per case: 4D multi-channel files (Decathlon), or 3D files when the
  model has a single channel;
- explicit files, each one case (4D multi-channel or an RGB picture, or 3D/2D when the model has
  one channel);
- DICOM series (single-channel models): every image series found in an input folder or any of its
  subfolders (files `.dcm`/`.dicom`/`.ima`, or without an image suffix and starting like DICOM) is one
  case named by its Series Instance UID (`autoseg.dataset.dicom`); a DICOM file given on its own stands
  for its whole series. Their outputs are NIfTI (`InputCase.ending` is `.nii.gz`).

A folder counts as nnU-Net-style when most of its image files are named `<case>_<cccc><ending>`
with `cccc` below the model's channel count (and, for a multi-channel model, they are not 4D
files); otherwise every image file in it is one case.
Problems found here (a missing channel, a duplicate case id, an unsupported file) are returned,
not raised, so one bad input never stops the others.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk

from autoseg.dataset.dicom import find_dicom_series, is_dicom_file, read_dicom_series, series_of_file
from autoseg.dataset.image_io import (
    NATURAL_IMAGE_SUFFIXES,
    SUPPORTED_SUFFIXES,
    Geometry,
    ImageReadError,
    image_suffix,
    read_image,
    strip_suffix,
)
from autoseg.dataset.layout import Case, DatasetError, one_file_holds_all_channels, read_case_image
from autoseg.errors import AutosegError

_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
MAX_CHANNELS_GUESSED = 4  # one lone `<case>_0000..` group this small is channels, a longer one numbered images


class InputError(AutosegError):
    """An input case that cannot be used; `path` is the offending file, the message says why."""

    def __init__(self, path: Path | str, message: str):
        self.path = Path(path)
        super().__init__(message)

    def __reduce__(self):  # rebuilt intact when raised in a worker process
        return type(self), (self.path, str(self))


@dataclass(frozen=True)
class InputCase:
    case_id: str
    files: tuple[Path, ...]  # one file per channel, or a single file holding all channels, or a DICOM series' slices
    series_uid: str | None = None  # set for a DICOM series

    @property
    def ending(self) -> str:
        """File extension of the input (`.nii.gz`, ...), reused for the output; `.nii.gz` for a DICOM series."""
        return ".nii.gz" if self.series_uid else image_suffix(self.files[0]) or ".nii.gz"


def discover_inputs(paths: Sequence[Path | str], num_channels: int, channel_names: Sequence[str] | None = None,
                    ) -> tuple[list[InputCase], list[tuple[str, str]]]:
    """Cases sorted by id, and (path, problem) for every input that cannot be used (`channel_names`, the
    model's, only name the channels in those messages)."""
    if num_channels < 1:
        raise ValueError(f"num_channels must be >= 1, got {num_channels}")
    paths = [paths] if isinstance(paths, (str, Path)) else paths
    cases: list[InputCase] = []
    problems: list[tuple[str, str]] = []
    for path in map(Path, paths):
        if path.is_dir():
            found, bad = _discover_folder(path, num_channels, channel_names)
            cases += found
            problems += bad
            series, bad = find_dicom_series(path)
            cases += [InputCase(s.case_id, s.files, s.series_uid) for s in series]
            problems += bad
        elif path.is_file() and image_suffix(path) is None and is_dicom_file(path):
            series = series_of_file(path)
            if series is None:
                problems.append((str(path), f"{path}: not a readable DICOM image"))
            elif not any(c.series_uid == series.series_uid and c.files == series.files for c in cases):
                cases.append(InputCase(series.case_id, series.files, series.series_uid))
        elif path.is_file():
            if image_suffix(path) is None:
                problems.append((str(path), f"not an image file of a supported type ({', '.join(SUPPORTED_SUFFIXES)})"))
            else:
                cases.append(InputCase(strip_suffix(path), (path,)))
        else:
            problems.append((str(path), "no such file or folder"))
    unique: dict[str, InputCase] = {}
    for case in cases:
        if case.case_id in unique:
            problems.append((str(case.files[0]), f"case id '{case.case_id}' also comes from "
                                                 f"{unique[case.case_id].files[0]}; "
                                                 "rename one of them (outputs are named by case id)"))
        else:
            unique[case.case_id] = case
    return [unique[k] for k in sorted(unique)], problems


def _discover_folder(folder: Path, num_channels: int, channel_names: Sequence[str] | None = None,
                     ) -> tuple[list[InputCase], list[tuple[str, str]]]:
    images = sorted(f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".") and image_suffix(f))
    numbered: dict[str, dict[int, Path]] = {}
    for f in images:
        m = _CHANNEL_FILE.match(strip_suffix(f))
        if m:
            numbered.setdefault(m["case"], {})[int(m["channel"])] = f
    channel_files = _channel_sets(numbered, num_channels)
    grouped = {f for files in channel_files.values() for f in files.values()}
    others = [f for f in images if f not in grouped]
    first = next((f for files in channel_files.values() for f in files.values()), None)
    if len(grouped) <= len(others) or (num_channels > 1 and _is_4d(first)):  # one file per case
        return [InputCase(strip_suffix(f), (f,)) for f in images], []
    one_file = one_file_holds_all_channels(image_suffix(first), num_channels, channel_files)
    cases, problems = [], []
    for f in others:
        problems.append((str(f), f"not named <case>_<cccc>{image_suffix(f)} like the other files in {folder} "
                                 f"(cccc = channel 0000..{num_channels - 1:04d}); rename it or move it out"))
    for case_id, files in sorted(channel_files.items()):
        ending = image_suffix(files[0])
        wanted = 1 if one_file else num_channels
        extra = sorted(c for c in files if c >= wanted)
        missing = [c for c in range(wanted) if c not in files]
        if extra:
            names = ", ".join(files[c].name for c in sorted(files))
            problems.append((str(files[extra[0]]),
                             f"case {case_id}: {len(files)} channel files ({names}), but the model takes "
                             f"{_channels(num_channels, channel_names)}; pass only the channel(s) it was trained on, "
                             f"use a model trained on {len(files)} channels, or, if they are separate images, name "
                             "them without the 4-digit suffix"))
        elif missing:
            names = ", ".join(f"{case_id}_{c:04d}{ending}" for c in missing)
            problems.append((str(folder / f"{case_id}_{missing[0]:04d}{ending}"),
                             f"case {case_id}: channel file(s) {names} missing; the model needs {num_channels} "
                             f"channel(s)"))
        else:
            cases.append(InputCase(case_id, tuple(files[c] for c in range(wanted))))
    return cases, problems


def _channel_sets(numbered: dict[str, dict[int, Path]], num_channels: int) -> dict[str, dict[int, Path]]:
    """The `<case>_<cccc>` groups that are one case's channel files rather than numbered images.

    A channel set starts at 0000 (`img_0001`, `img_0002` are images numbered from 1). It is taken for
    one case's channels when it fits the model, when several cases have that many files, or when it
    is small (at most MAX_CHANNELS_GUESSED): `scan_0000`, `scan_0001` given to a one-channel model is
    most likely one case of two channels. One long run (`frame_0000` ... `frame_0099`) is numbered
    images, each a case.
    """
    sets = {case: files for case, files in numbered.items() if 0 in files}
    sizes = [len(files) for files in sets.values()]
    return {case: files for case, files in sets.items()
            if len(files) <= max(num_channels, MAX_CHANNELS_GUESSED) or sizes.count(len(files)) > 1}


def _channels(num_channels: int, names: Sequence[str] | None = None) -> str:
    return f"{num_channels} channel{'s' if num_channels > 1 else ''}" + (f" ({', '.join(names)})" if names else "")


def _is_4d(path: Path) -> bool:
    """A multi-channel file (Decathlon) even if its name looks like `<case>_<cccc>`; reads the header only."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return False  # unreadable: reported when the case is read
    return reader.GetDimension() == 4


def read_input_case(case: InputCase, num_channels: int) -> tuple[np.ndarray, Geometry]:
    """All channels as (C, Z, Y, X) float32 with the geometry; InputError naming the file otherwise."""
    try:
        if case.series_uid:
            image, geometry = read_dicom_series(case.files)
            if num_channels != 1:
                raise InputError(case.files[0], f"{case.files[0].parent}: DICOM series {case.series_uid} is one "
                                                f"channel, the model needs {num_channels}; convert the series to "
                                                "NIfTI and pass one file per channel (<case>_<cccc>)")
            image = image[None].astype(np.float32, copy=False)
        elif len(case.files) == 1:
            image, geometry = read_image(case.files[0])
            if image.ndim == 3:
                image = image[None]
            if image.shape[0] != num_channels:
                kind = ("picture" if image_suffix(case.files[0]) in NATURAL_IMAGE_SUFFIXES
                        else "4D image" if num_channels > 1 else "image")
                raise InputError(case.files[0], f"{case.files[0]}: has {image.shape[0]} channel(s), the model needs "
                                                f"{num_channels}; pass a {kind} with {num_channels} channel(s)"
                                                f"{' (RGB)' if kind == 'picture' and num_channels == 3 else ''} or "
                                                "one file per channel (<case>_<cccc>)")
            image = image.astype(np.float32, copy=False)
        else:
            image, geometry = read_case_image(Case(case.case_id, case.files, None), num_channels)
    except ImageReadError as exc:
        raise InputError(exc.path, str(exc)) from None
    except DatasetError as exc:  # a channel file holding several channels, or grids that differ between channel files
        raise InputError(_file_named_in(str(exc), case), str(exc)) from None
    if not np.isfinite(image).all():
        raise InputError(case.files[0], f"{case.files[0]}: holds NaN or infinite intensities; fix or remove them")
    return image, geometry


def _file_named_in(message: str, case: InputCase) -> Path:
    return next((f for f in case.files if message.startswith(str(f))), case.files[0])
