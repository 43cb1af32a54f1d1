"""Preprocessed cases on disk: compressed, chunked arrays training reads one patch at a time.

Format 2 (this version): `<case>.b2nd` float32 (C, Z, Y, X) and `<case>_seg.b2nd` (1, Z, Y, X) in the
integer type preprocessing chose (int8, or int16 for label ids above 127; -1 marks voxels outside
the image's non-zero mask) are blosc2 NDArrays, ZSTD-compressed in chunks of blocks. Slicing an array
from `open_case_arrays` decompresses only the blocks the slice touches, so reading a patch costs
about the patch, not the case. `<case>.json` holds the properties (original geometry, crop box,
shapes, a sample of voxel coordinates per label) and is written last: a case whose .json and arrays
exist is complete. Every file is written under a temporary name and renamed, so an interrupted write
never leaves a partial file under a final name.

Workspaces of earlier autoseg versions (plain `.npy` files) are not read: their plans.json is of an
older format too, so `autoseg plan` must be run again.

Layout (see benchmarks/bench_store.py for the measurements behind it): every chunk and block holds all
channels. 3D data: blocks of 8x16x16 voxels (8-32 KiB of float32 for 1-4 channels: an L1 cache
worth) in chunks of 32x64x64. Data for a 2D configuration (`patch_size` with two entries): blocks of
1x64x64 in chunks of 1x256x256, so a one-slice patch never decompresses its neighbouring slices.
The layout does not depend on the 3D patch size, so a new plan with another patch size reuses the data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, Union

import blosc2
import numpy as np

from autoseg.atomic import atomic_path, read_json, write_json
from autoseg.errors import AutosegError
from autoseg.preprocessing.properties import CaseProperties

CaseArray = Union[blosc2.NDArray, np.ndarray]  # slicing returns numpy and reads only the box sliced

FORMAT_VERSION = 2

CODEC = blosc2.Codec.ZSTD
CLEVEL = 1  # level 3 wrote 2-2.5x slower for 1-2% fewer bytes, nnU-Net's 8 ~20x slower (benchmarks/README.md)
BLOCKS_3D, CHUNKS_3D = (8, 16, 16), (32, 64, 64)
BLOCKS_2D, CHUNKS_2D = (1, 64, 64), (1, 256, 256)


class PreprocessedDataError(AutosegError):
    """A preprocessed folder that cannot be read as it is; the message names the file and the fix."""


def case_paths(folder: Path, case_id: str) -> tuple[Path, Path, Path]:
    """Image, seg and properties files of a case in the current format."""
    folder = Path(folder)
    return folder / f"{case_id}.b2nd", folder / f"{case_id}_seg.b2nd", folder / f"{case_id}.json"


def is_complete(folder: Path, case_id: str) -> bool:
    return all(p.is_file() for p in case_paths(folder, case_id))


def chunk_layout(shape: Sequence[int], patch_size: Sequence[int] | None = None
                 ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(chunks, blocks) for an array of `shape` (C, Z, Y, X); a 2-entry `patch_size` selects the slice layout."""
    if len(shape) != 4:
        raise ValueError(f"expected a (C, Z, Y, X) array, got shape {tuple(shape)}")
    two_d = patch_size is not None and len(patch_size) == 2
    chunks_spatial, blocks_spatial = (CHUNKS_2D, BLOCKS_2D) if two_d else (CHUNKS_3D, BLOCKS_3D)
    chunks = (int(shape[0]),) + tuple(min(c, int(s)) for c, s in zip(chunks_spatial, shape[1:]))
    blocks = (int(shape[0]),) + tuple(min(b, c) for b, c in zip(blocks_spatial, chunks[1:]))
    return chunks, blocks


def save_array(path: Path, array: np.ndarray, patch_size: Sequence[int] | None = None, *,
               chunks: Sequence[int] | None = None, blocks: Sequence[int] | None = None,
               codec: blosc2.Codec = CODEC, clevel: int = CLEVEL) -> None:
    """Write `array` as a compressed .b2nd at `path`, atomically. `chunks`/`blocks` override the layout rule."""
    default_chunks, default_blocks = chunk_layout(array.shape, patch_size)
    cparams = blosc2.CParams(codec=codec, clevel=clevel, nthreads=1)
    with atomic_path(path) as tmp:
        blosc2.asarray(np.ascontiguousarray(array), urlpath=str(tmp), mode="w", cparams=cparams,
                       chunks=tuple(chunks or default_chunks), blocks=tuple(blocks or default_blocks))


def open_array(path: Path) -> blosc2.NDArray:
    """Open a .b2nd read-only and memory-mapped; slicing it returns numpy and reads only the blocks touched."""
    return blosc2.open(str(path), mode="r", mmap_mode="r", dparams=blosc2.DParams(nthreads=1))


def save_case(folder: Path, case_id: str, data: np.ndarray, seg: np.ndarray | None, properties: CaseProperties,
              patch_size: Sequence[int] | None = None) -> None:
    """Store a preprocessed case: image as float32, seg in its own integer type, properties last.

    Overwriting a case first removes its properties, so the case reads as incomplete until the new
    arrays and properties are all in place. Pass the configuration's `patch_size` so 2D data gets
    the slice layout.
    """
    image_path, seg_path, props_path = case_paths(folder, case_id)
    if seg is not None and not np.issubdtype(seg.dtype, np.signedinteger):
        raise TypeError(f"seg of case '{case_id}' has dtype {seg.dtype}; expected a signed integer type "
                        "(int8, or int16 for label ids above 127)")
    props_path.unlink(missing_ok=True)
    save_array(image_path, data.astype(np.float32, copy=False), patch_size)
    if seg is not None:
        save_array(seg_path, seg, patch_size)
    else:
        seg_path.unlink(missing_ok=True)
    write_json(props_path, {"format_version": FORMAT_VERSION, **properties.to_json()}, compact=True)


def open_case_arrays(folder: Path, case_id: str) -> tuple[CaseArray, CaseArray]:
    """(image, seg) opened lazily: `a[:, z0:z1, y0:y1, x0:x1]` returns numpy and reads only that box.

    The returned objects hold open files: reopen them in each worker process, never pickle them.
    """
    image_path, seg_path, _ = case_paths(folder, case_id)
    for path in (image_path, seg_path):
        if not path.is_file():
            raise PreprocessedDataError(f"{path} is missing; run preprocessing for this configuration first "
                                    f"(`autoseg plan DATASET -o WORKDIR --steps preprocess`) or remove case "
                                    f"'{case_id}' from the split")
    return open_array(image_path), open_array(seg_path)


def load_case_image(folder: Path, case_id: str) -> np.ndarray:
    """The whole preprocessed image (C, Z, Y, X) float32, decompressed into memory."""
    image_path, _, _ = case_paths(folder, case_id)
    if image_path.is_file():
        return open_array(image_path)[...]
    raise PreprocessedDataError(f"{image_path} is missing; run preprocessing for this configuration first "
                            "(`autoseg plan DATASET -o WORKDIR --steps preprocess`)")


def load_properties(folder: Path, case_id: str) -> CaseProperties:
    path = case_paths(folder, case_id)[2]
    rerun = "rerun `autoseg plan DATASET -o WORKDIR --steps preprocess`"
    try:
        properties = read_json(path)
    except ValueError as exc:
        raise PreprocessedDataError(f"{path} is not valid JSON ({exc}); {rerun}") from None
    version = properties.get("format_version", 1) if isinstance(properties, dict) else None
    if version is None or version > FORMAT_VERSION:
        raise PreprocessedDataError(f"{path} has format_version {version}, not one this autoseg reads "
                                    f"({FORMAT_VERSION}); upgrade autoseg or {rerun}")
    try:
        return CaseProperties.from_json(properties)
    except (KeyError, TypeError, ValueError) as exc:
        raise PreprocessedDataError(f"{path}: malformed case properties ({type(exc).__name__}: {exc}); "
                                    f"{rerun}") from None


def list_cases(folder: Path) -> list[str]:
    """Ids of the complete cases in a preprocessed folder."""
    return sorted(p.stem for p in Path(folder).glob("*.json") if is_complete(folder, p.stem))
