"""A label map written as a DICOM Segmentation object that references the series it was predicted from.

Needs highdicom (an optional extra: `pip install autoseg[dicom]`). One segment per label id above 0, named
by the label name from the plan; segments are stored as binary frames (DICOM-SEG "BINARY"), one per
slice of the source series and segment that holds any voxel of it. The segmentation must lie on the
source series' grid (what prediction exports to); each source slice is matched to the label map's slice
by its Image Position (Patient), whatever order the files are passed in.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from autoseg import __version__
from autoseg.atomic import atomic_path
from autoseg.dataset.image_io import Geometry
from autoseg.dataset.regions import ids_mask
from autoseg.errors import AutosegError

log = logging.getLogger(__name__)

SERIES_NUMBER_OFFSET = 1000  # the SEG's series number: the source's plus this
INSTALL_HINT = "pip install autoseg[dicom] (or: pip install highdicom)"


class DicomSegError(AutosegError):
    """A DICOM-SEG that cannot be written; the message names the file and the fix."""


def write_dicom_seg(segmentation: np.ndarray, geometry: Geometry, source_files: Sequence[Path],
                    labels: dict[int, str], path: Path, regions: Mapping[int, Sequence[int]] | None = None) -> None:
    """Write `segmentation` (Z, Y, X label ids on the source series' grid) to `path` (atomic): one segment per
    label id 1..max, or with `regions` (region-based plans: written id -> the ids the region unites) one
    segment per region holding all of it, so segments overlap as the regions do."""
    try:
        import highdicom as hd
        import pydicom
        from pydicom.sr.codedict import codes
    except ImportError:
        raise DicomSegError(f"{path}: writing DICOM-SEG needs highdicom, which is not installed; "
                            f"{INSTALL_HINT}") from None
    path = Path(path)
    segmentation = np.asarray(segmentation)
    if tuple(segmentation.shape) != tuple(geometry.shape):
        raise DicomSegError(f"{path}: segmentation shape {segmentation.shape} differs from its geometry's "
                            f"{geometry.shape}")
    labels = {int(k): str(v) for k, v in labels.items()}
    present = {int(v) for v in np.unique(segmentation)} - {0}
    unnamed = sorted(present - set(labels))
    if unnamed or (segmentation < 0).any():
        raise DicomSegError(f"{path}: label ids {unnamed or 'below 0'} have no name in the plan's labels")
    segment_ids = list(regions) if regions else list(range(1, max([k for k in labels if k > 0], default=0) + 1))
    num_segments = len(segment_ids)
    if num_segments == 0:
        raise DicomSegError(f"{path}: no label above 0 to store as a segment")

    sources = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in source_files]
    if len(sources) == 1 and int(getattr(sources[0], "NumberOfFrames", 1) or 1) > 1:
        raise DicomSegError(f"{source_files[0]}: multi-frame (enhanced) DICOM sources are not supported for "
                            "DICOM-SEG output; predict to NIfTI (the default output format)")
    frames = _slice_indices(sources, source_files, geometry, path)
    order = np.argsort(frames)
    sources = [sources[i] for i in order]
    in_order = segmentation[np.asarray(frames)[order]]
    if regions:  # (frames, rows, columns, segments): one binary mask per region, overlapping
        pixel_array = np.stack([ids_mask(in_order, regions[k]) for k in segment_ids], axis=-1).astype(np.uint8)
    else:
        pixel_array = in_order.astype(np.uint8 if num_segments < 256 else np.uint16)

    algorithm = hd.AlgorithmIdentificationSequence(name="autoseg", version=__version__,
                                                   family=codes.cid7162.ArtificialIntelligence)
    descriptions = [hd.seg.SegmentDescription(
        segment_number=number, segment_label=labels.get(k, f"label {k}")[:64],
        segmented_property_category=codes.SCT.Tissue, segmented_property_type=codes.SCT.Tissue,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm)
        for number, k in enumerate(segment_ids, start=1)]
    source = sources[0]
    try:
        seg = hd.seg.Segmentation(
            source_images=sources, pixel_array=pixel_array, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions, series_instance_uid=hd.UID(),
            series_number=int(getattr(source, "SeriesNumber", 0) or 0) + SERIES_NUMBER_OFFSET,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="autoseg", manufacturer_model_name="autoseg",
            software_versions=__version__, device_serial_number="0",
            series_description=f"autoseg {getattr(source, 'SeriesDescription', '')}".strip()[:64],
            content_label="AUTOSEG", content_description="automatic segmentation by autoseg",
            omit_empty_frames=bool(segmentation.any()))
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise DicomSegError(f"{path}: highdicom refused the segmentation of {source_files[0].parent} "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]})") from None
    with atomic_path(path) as tmp:
        seg.save_as(str(tmp))


def _slice_indices(sources: list, files: Sequence[Path], geometry: Geometry, path: Path) -> list[int]:
    """The label map's slice index of each source image, from its Image Position (Patient)."""
    if len(sources) == 1:
        return [0] if geometry.shape[0] == 1 else _mismatch(path, files[0], f"one source image for {geometry.shape[0]} "
                                                                            f"slices")
    direction = np.reshape(geometry.direction, (3, 3))
    origin = np.asarray(geometry.origin)
    spacing = geometry.spacing[0]
    indices = []
    for ds, f in zip(sources, files, strict=True):
        if (int(ds.Rows), int(ds.Columns)) != tuple(geometry.shape[1:]):
            _mismatch(path, f, f"{ds.Rows} x {ds.Columns} pixels, the segmentation {geometry.shape[1]} x "
                               f"{geometry.shape[2]}")
        position = np.array([float(v) for v in ds.ImagePositionPatient])
        offset = np.linalg.solve(direction, position - origin)  # in mm along the grid's x, y, z axes
        k = int(round(offset[2] / spacing))
        if not 0 <= k < geometry.shape[0] or np.abs(offset - [0.0, 0.0, k * spacing]).max() > max(0.01 * spacing, 1e-3):
            _mismatch(path, f, f"its position {position.round(3).tolist()} is not a slice of the segmentation's grid")
        indices.append(k)
    if sorted(indices) != list(range(geometry.shape[0])):
        _mismatch(path, files[0], f"the {len(files)} source images do not cover the {geometry.shape[0]} slices once "
                                  f"each")
    return indices


def _mismatch(path: Path, source: Path, why: str):
    raise DicomSegError(f"{path}: source image {source} does not match the segmentation ({why}); pass the files of "
                        "the series the segmentation was predicted from")
