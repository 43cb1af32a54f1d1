"""Preprocessed cases on disk: arrays training reads one patch at a time, and their properties.

`<case>.npy` float32 (C, Z, Y, X) and `<case>_seg.npy` int8 (1, Z, Y, X) are plain, uncompressed
.npy files, so `np.load(mmap_mode="r")` reads just the voxels of one patch. `<case>.json` holds
the properties (original geometry, crop box, shapes, a sample of voxel coordinates per label) and
is written last: a case whose .json exists is complete.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from autoseg.atomic import read_json, save_npy, write_json

FORMAT_VERSION = 1


def case_paths(folder: Path, case_id: str) -> tuple[Path, Path, Path]:
    return folder / f"{case_id}.npy", folder / f"{case_id}_seg.npy", folder / f"{case_id}.json"


def is_complete(folder: Path, case_id: str) -> bool:
    return all(p.is_file() for p in case_paths(folder, case_id))


def save_case(folder: Path, case_id: str, data: np.ndarray, seg: np.ndarray | None, properties: dict) -> None:
    image_path, seg_path, props_path = case_paths(folder, case_id)
    save_npy(image_path, data.astype(np.float32, copy=False))
    if seg is not None:
        save_npy(seg_path, seg.astype(np.int8, copy=False))
    write_json(props_path, {"format_version": FORMAT_VERSION, **properties})


def load_properties(folder: Path, case_id: str) -> dict:
    return read_json(case_paths(folder, case_id)[2])


def list_cases(folder: Path) -> list[str]:
    """Ids of the complete cases in a preprocessed folder."""
    return sorted(p.stem for p in folder.glob("*.json") if is_complete(folder, p.stem))
