"""Bring network probabilities back onto the input file's grid and write them as results.

Preprocessing went crop -> transpose -> resample; export undoes it in reverse order:
resample to the cropped shape (still transposed), transpose back, put the crop back into the
full volume with background probability 1 outside it.

A label map is written in the input's format (`segmentation_suffix`): PNG in, PNG out; TIFF in,
TIFF out; NIfTI in, NIfTI out. It is uint8 when the label ids fit, else uint16.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from autoseg.atomic import atomic_path
from autoseg.dataset.image_io import WRITE_SUFFIXES, Geometry, write_image
from autoseg.postprocessing import apply_postprocessing
from autoseg.preprocessing.cropping import uncrop
from autoseg.preprocessing.resampling import resample_probabilities, separate_axis_for

PROBABILITIES_KEY = "probabilities"
# JPEG is lossy, so a prediction for a JPEG input is written as a (lossless) PNG.
_SEGMENTATION_SUFFIX = {".jpg": ".png", ".jpeg": ".png"}


def segmentation_suffix(input_suffix: str) -> str:
    """File ending of the label map written for an input ending in `input_suffix`."""
    suffix = _SEGMENTATION_SUFFIX.get(input_suffix, input_suffix)
    if suffix not in WRITE_SUFFIXES:
        raise ValueError(f"no label map format for input files ending in {input_suffix!r}")
    return suffix


def probabilities_to_original(probabilities: np.ndarray, properties: dict, plans: dict) -> np.ndarray:
    """(K, *resampled) probabilities in network space -> (K, Z, Y, X) float32 in the original file's
    orientation and shape (`properties` as returned by `preprocess_case`)."""
    probabilities = np.asarray(probabilities, dtype=np.float32)
    expected = tuple(properties["shape_after_resampling"])
    if tuple(probabilities.shape[1:]) != expected:
        raise ValueError(f"probabilities have spatial shape {list(probabilities.shape[1:])}, the preprocessed case "
                         f"had {list(expected)}; pass the network output for this case and configuration")
    forward, backward = plans["transpose_forward"], plans["transpose_backward"]
    cropped_shape = properties["shape_after_crop"]  # in file axis order: cropping comes before the transpose
    original_spacing = [properties["original_geometry"]["spacing"][a] for a in forward]
    separate_axis = separate_axis_for(properties["spacing"], original_spacing,
                                      plans["resampling"]["anisotropy_threshold"])
    resampled = resample_probabilities(probabilities, tuple(cropped_shape[a] for a in forward), order=1,
                                       separate_axis=separate_axis,
                                       thick_axis_order=plans["resampling"]["thick_axis_order"])
    in_file_order = resampled.transpose(0, *(a + 1 for a in backward))
    fill = np.zeros(probabilities.shape[0], dtype=np.float32)
    fill[0] = 1.0  # outside the crop there was no data: background
    bbox = tuple(tuple(b) for b in properties["nonzero_bbox"])
    full_shape = tuple(properties["original_geometry"]["shape"])
    return uncrop(np.ascontiguousarray(in_file_order), bbox, full_shape, fill=fill)


def export_segmentation(probabilities_original: np.ndarray, geometry: Geometry, path: Path | str,
                        rules: dict | None = None) -> np.ndarray:
    """Label map (argmax; uint8, or uint16 beyond 256 classes), postprocessed by `rules` if given, written
    atomically on `geometry`'s exact grid (spacing, origin, direction of the input) in the format
    `path` names (a 2D geometry as a 2D file). Returns the label map that was written.

    Label ids are the class indices of the network output (plans' labels are 0..K-1).
    """
    probabilities_original = np.asarray(probabilities_original)
    if tuple(probabilities_original.shape[1:]) != tuple(geometry.shape):
        raise ValueError(f"{path}: probabilities of spatial shape {list(probabilities_original.shape[1:])} do not "
                         f"match the input grid {list(geometry.shape)}; convert them with probabilities_to_original")
    num_classes = probabilities_original.shape[0]
    if num_classes > 65536:
        raise ValueError(f"{path}: {num_classes} classes do not fit a uint16 label map")
    segmentation = np.argmax(probabilities_original, axis=0).astype(np.uint8 if num_classes <= 256 else np.uint16)
    if rules is not None:
        segmentation = apply_postprocessing(segmentation, rules)
    write_image(path, segmentation, geometry)
    return segmentation


def save_probabilities(path_npz: Path | str, probabilities: np.ndarray) -> None:
    """Write (K, Z, Y, X) probabilities to a compressed .npz under the key "probabilities", atomically.

    Stored as float16 to halve the size: about 3 significant digits, ample for ensembling or
    thresholding; read with `np.load(path)["probabilities"].astype(np.float32)`.
    """
    path_npz = Path(path_npz)
    if path_npz.suffix != ".npz":
        raise ValueError(f"{path_npz}: probabilities are saved as .npz; use a name ending in .npz")
    with atomic_path(path_npz) as tmp:
        with open(tmp, "wb") as f:  # a file object, so numpy does not append a second ".npz"
            np.savez_compressed(f, **{PROBABILITIES_KEY: np.asarray(probabilities, dtype=np.float16)})
