"""Bring network logits back onto the input file's grid and write them as results.

Preprocessing went crop -> transpose -> resample; export undoes it in reverse order, as nnU-Net v2
does: each label's logits are resampled to the cropped shape (still transposed), the softmax is
taken there, transposed back, and the crop is put back into the full volume with background
probability 1 outside it. Several configurations are averaged as those probabilities.

`LabelMapBuilder` does the same for the label map alone without ever holding per-label
probabilities on the input's grid: one label at a time it resamples the network's logits back to
the cropped grid and keeps a running maximum and argmax (and a running log-sum-exp for the
softmax's entropy), and for a single configuration it takes them in z-slabs as the sliding window
finishes them (docs/prediction.md).

With region-based plans (dataset/regions.py) each output is one region's logit: the sigmoid replaces
the softmax (0 outside the crop), and a voxel takes a region's id where its probability exceeds 0.5,
region by region in `regions_class_order`, as nnU-Net v2 writes regions.

A label map is written in the input's format (`segmentation_suffix`): PNG in, PNG out; TIFF in,
TIFF out; NIfTI in, NIfTI out. It is uint8 when the label ids fit, else uint16.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from autoseg.atomic import atomic_path
from autoseg.dataset.image_io import WRITE_SUFFIXES, Geometry, write_image
from autoseg.dataset.regions import label_map_from_regions
from autoseg.planning.plans import Plans
from autoseg.postprocessing import apply_postprocessing
from autoseg.preprocessing.properties import CaseProperties
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


def logits_to_original(logits: np.ndarray, properties: CaseProperties, plans: Plans) -> np.ndarray:
    """(K, *resampled) logits in network space -> (K, Z, Y, X) float32 probabilities in the original file's
    orientation and shape (`properties` as returned by `preprocess_case`): the logits are resampled and
    the softmax is taken on the input's grid, as nnU-Net v2 exports. Holds K volumes of the input's
    size: for the label map alone use `LabelMapBuilder`."""
    logits = np.asarray(logits, dtype=np.float32)
    grid = _BackToCrop(properties, plans)
    grid.check(logits)
    out = np.zeros((logits.shape[0], *grid.full_shape), dtype=np.float32)
    if plans.regions:  # one sigmoid per region; outside the crop no region (0)
        for k in range(logits.shape[0]):
            grid.crop_view(out[k])[...] = _sigmoid(grid.resample(logits[k], 0)[1])
        return out
    out[0] = 1.0  # outside the crop there was no data: background
    for k in range(logits.shape[0]):
        grid.crop_view(out[k])[...] = grid.resample(logits[k], 0)[1]
    crop = out[(slice(None), *grid.bbox)]  # a view: the softmax is taken in place
    largest = crop.max(axis=0)
    np.subtract(crop, largest, out=crop)
    np.exp(crop, out=crop)
    np.sum(crop, axis=0, out=largest)
    np.divide(crop, largest, out=crop)
    return out


def _sigmoid(values: np.ndarray) -> np.ndarray:
    """1 / (1 + exp(-x)) in place, without overflow for large negative logits."""
    np.negative(values, out=values)
    np.clip(values, -88.0, 88.0, out=values)
    np.exp(values, out=values)
    values += 1.0
    return np.reciprocal(values, out=values)


def _binary_entropy(p: np.ndarray) -> np.ndarray:
    """Entropy (nats) of a yes/no probability, 0 at p = 0 or 1."""
    tiny = np.finfo(np.float32).tiny
    q = 1.0 - p
    return -(p * np.log(np.maximum(p, tiny)) + q * np.log(np.maximum(q, tiny)))


class _BackToCrop:
    """How one configuration's network grid maps back onto the cropped input grid (network axis order)."""

    def __init__(self, properties: CaseProperties, plans: Plans):
        forward = plans.transpose_forward
        self.forward = tuple(forward)
        self.network_shape = tuple(properties.shape_after_resampling)
        self.shape = tuple(properties.shape_after_crop[a] for a in forward)  # cropping comes before the transpose
        original_spacing = [properties.original_geometry.spacing[a] for a in forward]
        self.separate_axis = separate_axis_for(properties.spacing, original_spacing,
                                               plans.resampling.anisotropy_threshold)
        self.thick_axis_order = plans.resampling.thick_axis_order
        self.bbox = tuple(slice(lo, hi) for lo, hi in properties.nonzero_bbox)
        self.full_shape = tuple(properties.original_geometry.shape)
        n_in, n_out = self.network_shape[0], self.shape[0]
        # Slabs along the first network axis can be resampled on their own, with the very values of the
        # whole volume, when that axis is not resampled or is resampled apart by copying nearest slices.
        self.streams = self.network_shape == self.shape or (
            self.separate_axis == 0 and (n_in == n_out or self.thick_axis_order == 0))
        self.source_rows = None  # per output row, the network row it copies (nearest along a thick axis 0)
        if self.streams and n_in != n_out:
            rows = np.arange(n_in, dtype=np.float32)[None, :, None, None]
            self.source_rows = resample_probabilities(rows, (n_out, 1, 1), order=1, separate_axis=0,
                                                      thick_axis_order=0).ravel().astype(np.intp)

    def check(self, probabilities: np.ndarray) -> None:
        if tuple(probabilities.shape[1:]) != self.network_shape:
            raise ValueError(f"probabilities have spatial shape {list(probabilities.shape[1:])}, the preprocessed case "
                             f"had {list(self.network_shape)}; pass the network output for this case and configuration")

    def crop_view(self, full: np.ndarray) -> np.ndarray:
        """The cropped region of a full-size (Z, Y, X) array, as a writable view in network axis order."""
        return full[self.bbox].transpose(self.forward)

    def rows_for(self, z0: int, z1: int) -> slice:
        """Output rows (cropped grid, network order) computed from network rows [z0, z1)."""
        if self.source_rows is not None:
            inside = np.flatnonzero((self.source_rows >= z0) & (self.source_rows < z1))
            return slice(int(inside[0]), int(inside[-1]) + 1) if inside.size else slice(0, 0)
        if (z0, z1) == (0, self.network_shape[0]):
            return slice(0, self.shape[0])
        return slice(z0, z1)  # a slab of an axis that is not resampled

    def resample(self, volume: np.ndarray, z0: int) -> tuple[slice, np.ndarray]:
        """Network rows [z0, z0 + len(volume)) of one label -> (output rows, float32 values on them, a new
        array the caller may overwrite)."""
        z1 = z0 + volume.shape[0]
        rows = self.rows_for(z0, z1)
        whole = (z0, z1) == (0, self.network_shape[0])
        if not whole and not self.streams:
            raise ValueError("this case's resampling mixes rows along the first axis; pass the whole volume")
        if self.source_rows is not None:
            volume = np.take(volume, self.source_rows[rows] - z0, axis=0)
            shape, separate_axis = (volume.shape[0], *self.shape[1:]), 0
        elif whole:
            shape, separate_axis = self.shape, self.separate_axis
        else:
            shape, separate_axis = (volume.shape[0], *self.shape[1:]), self.separate_axis
        out = resample_probabilities(volume[None].astype(np.float32, copy=False), shape, order=1,
                                     separate_axis=separate_axis, thick_axis_order=self.thick_axis_order)[0]
        return rows, out.copy() if np.may_share_memory(out, volume) else out


class LabelMapBuilder:
    """Label map on the input's grid from network logits (one array per configuration), without
    per-label probabilities on that grid: at most a few volumes (of a slab) at a time.

    With one configuration whose resampling allows it (`streams`), `add` takes z-slabs of its
    network grid in any order; otherwise one whole network volume per configuration. The labels
    equal the argmax of `logits_to_original` (averaged over configurations), ties to the lower
    label. With `uncertainty=True` it sums, per label, the voxel-wise entropy of those probabilities
    over the voxels given that label, and with `entropy_map=True` it keeps the entropy map (nats).
    One configuration takes one pass over the labels (the argmax of the logits, the entropy from a
    running log-sum-exp); several take two (each one's log-sum-exp, then the averaged probabilities).
    With regions, each region's sigmoid (averaged over configurations) over 0.5 writes its id, region by
    region, and the entropy is the sum of the regions' yes/no entropies.
    """

    def __init__(self, properties: Sequence[CaseProperties], plans: Plans, num_classes: int, uncertainty: bool = False,
                 entropy_map: bool = False):
        if num_classes > 65536:
            raise ValueError(f"{num_classes} classes do not fit a uint16 label map")
        self.grids = [_BackToCrop(p, plans) for p in properties]
        if len({(g.shape, tuple((b.start, b.stop) for b in g.bbox)) for g in self.grids}) != 1:
            raise ValueError("the configurations' cases were cropped differently; they are not one input")
        self.num_classes = num_classes
        self.regions = plans.regions
        if self.regions and len(self.regions) != num_classes:
            raise ValueError(f"{num_classes} network outputs for {len(self.regions)} regions")
        label_count = max(r.written_as for r in self.regions) + 1 if self.regions else num_classes
        self.full_shape = self.grids[0].full_shape
        self.labels = np.zeros(self.full_shape, dtype=np.uint8 if label_count <= 256 else np.uint16)
        self.with_entropy = uncertainty or entropy_map
        self.entropy = np.zeros(self.full_shape, dtype=np.float32) if entropy_map else None
        # Per label: voxels assigned to it and the entropy summed over them (before postprocessing).
        self.label_voxels = np.zeros(label_count, dtype=np.int64)
        self.label_entropy = np.zeros(label_count, dtype=np.float64)

    @property
    def streams(self) -> bool:
        return len(self.grids) == 1 and self.grids[0].streams

    def add(self, z0: int, logits: Sequence[np.ndarray]) -> None:
        """(K, n, Y, X) float32 network logits of rows [z0, z0 + n), one array per configuration."""
        if len(logits) != len(self.grids):
            raise ValueError(f"expected logits of {len(self.grids)} configuration(s), got {len(logits)}")
        for p, grid in zip(logits, self.grids):
            if p.shape[0] != self.num_classes or tuple(p.shape[2:]) != grid.network_shape[1:]:
                raise ValueError(f"logits of shape {list(p.shape)} do not fit the network grid "
                                 f"{list(grid.network_shape)} with {self.num_classes} classes")
        if self.regions:
            rows, labels, entropy = self._regions(z0, logits)
        elif len(logits) == 1:
            rows, labels, entropy = self._one(z0, logits[0])
        else:
            rows, labels, entropy = self._ensemble(z0, logits)
        self.grids[0].crop_view(self.labels)[rows] = labels
        count = len(self.label_voxels)
        self.label_voxels += np.bincount(labels.ravel(), minlength=count)
        if entropy is not None:
            if self.entropy is not None:
                self.grids[0].crop_view(self.entropy)[rows] = entropy
            self.label_entropy += np.bincount(labels.ravel(), weights=entropy.ravel(), minlength=count)

    @property
    def entropy_scale(self) -> float:
        """The largest entropy a voxel can have (nats): log(K) over K labels, R log(2) over R regions."""
        if self.regions:
            return len(self.regions) * float(np.log(2.0))
        return float(np.log(self.num_classes)) if self.num_classes > 1 else 1.0

    def _regions(self, z0: int, logits: Sequence[np.ndarray]) -> tuple[slice, np.ndarray, np.ndarray | None]:
        """Region by region: the sigmoid of the resampled logits (averaged over configurations) over 0.5 writes the
        region's id, exactly as `logits_to_original` then `probabilities_to_labels`."""
        labels = entropy = rows = None
        for k, region in enumerate(self.regions):
            total = None
            for p, grid in zip(logits, self.grids):
                rows, value = grid.resample(p[k], z0)
                value = _sigmoid(value)
                total = value if total is None else np.add(total, value, out=total)
            if len(logits) > 1:
                total /= len(logits)
            inside = total > 0.5
            if self.with_entropy:
                h = _binary_entropy(total)
                entropy = h if entropy is None else np.add(entropy, h, out=entropy)
            if labels is None:
                labels = np.zeros(inside.shape, dtype=self.labels.dtype)
            labels[inside] = region.written_as
        return rows, labels, entropy

    def _one(self, z0: int, logits: np.ndarray) -> tuple[slice, np.ndarray, np.ndarray | None]:
        """One configuration: argmax of the resampled logits, and the entropy of their softmax."""
        grid = self.grids[0]
        rows, best = grid.resample(logits[0], z0)
        labels = np.zeros(best.shape, dtype=self.labels.dtype)
        running = _RunningLogSumExp(best, entropy=True) if self.with_entropy else None
        for k in range(1, self.num_classes):
            value = grid.resample(logits[k], z0)[1]
            labels[value > best] = k
            if running is None:
                np.maximum(best, value, out=best)
            else:
                running.add(value)
                best = running.largest
        return rows, labels, None if running is None else running.entropy()

    def _ensemble(self, z0: int, logits: Sequence[np.ndarray]) -> tuple[slice, np.ndarray, np.ndarray | None]:
        """Several configurations: each one's softmax on the input grid (its log-sum-exp first), averaged."""
        log_sums = []
        for p, grid in zip(logits, self.grids):
            running = _RunningLogSumExp(grid.resample(p[0], z0)[1])
            for k in range(1, self.num_classes):
                running.add(grid.resample(p[k], z0)[1])
            log_sums.append(running.log_sum())
        best = labels = entropy = rows = None
        for k in range(self.num_classes):
            total = None
            for p, grid, log_sum in zip(logits, self.grids, log_sums):
                rows, value = grid.resample(p[k], z0)
                np.exp(value - log_sum, out=value)
                total = value if total is None else np.add(total, value, out=total)
            total /= len(logits)
            if k == 0:
                best, labels = total, np.zeros(total.shape, dtype=self.labels.dtype)
                entropy = np.zeros(total.shape, dtype=np.float32) if self.with_entropy else None
            else:
                labels[total > best] = k
                np.maximum(best, total, out=best)
            if entropy is not None:
                entropy -= total * np.log(np.maximum(total, np.finfo(np.float32).tiny))
        return rows, labels, entropy

    def uncertainty(self) -> dict[int, float]:
        """Per label present: mean entropy of the ensemble's probabilities over its voxels, divided by log(K): 0
        when every member agrees with certainty, 1 at uniform probabilities (every region at 0.5)."""
        scale = self.entropy_scale
        return {k: float(self.label_entropy[k] / self.label_voxels[k] / scale)
                for k in range(1, len(self.label_voxels)) if self.label_voxels[k]}


class _RunningLogSumExp:
    """The log-sum-exp over labels of logits given one label at a time, without holding them: the running
    maximum m, s = sum_k exp(l_k - m) and, with `entropy`, t = sum_k exp(l_k - m) (l_k - m), so the
    softmax's entropy is log(s) - t / s."""

    def __init__(self, first: np.ndarray, entropy: bool = False):
        self.largest = first
        self.total = np.ones_like(first)
        self.weighted = np.zeros_like(first) if entropy else None

    def add(self, value: np.ndarray) -> None:
        """One more label's logits (overwritten)."""
        largest = np.maximum(self.largest, value)
        shift = self.largest - largest  # <= 0: the terms so far shrink by exp(shift)
        scale = np.exp(shift)
        np.subtract(value, largest, out=value)
        term = np.exp(value)
        if self.weighted is not None:
            self.weighted = scale * (self.weighted + self.total * shift) + term * value
        self.total = self.total * scale + term
        self.largest = largest

    def log_sum(self) -> np.ndarray:
        return self.largest + np.log(self.total)

    def entropy(self) -> np.ndarray:
        entropy = np.log(self.total) - self.weighted / self.total
        return np.maximum(entropy, 0, out=entropy)


def write_segmentation(segmentation: np.ndarray, geometry: Geometry, path: Path | str,
                       rules: dict | None = None) -> np.ndarray:
    """Postprocess a label map by `rules` (if given) and write it atomically on `geometry`'s exact grid in the
    format `path` names (a 2D geometry as a 2D file). Returns the label map that was written."""
    if tuple(segmentation.shape) != tuple(geometry.shape):
        raise ValueError(f"{path}: label map of shape {list(segmentation.shape)} does not match the input grid "
                         f"{list(geometry.shape)}")
    if rules is not None:
        segmentation = apply_postprocessing(segmentation, rules)
    write_image(path, segmentation, geometry)
    return segmentation


def export_segmentation(probabilities_original: np.ndarray, geometry: Geometry, path: Path | str,
                        rules: dict | None = None, plans: Plans | None = None) -> np.ndarray:
    """Label map (argmax; uint8, or uint16 beyond 256 classes), postprocessed by `rules` if given, written
    atomically on `geometry`'s exact grid (spacing, origin, direction of the input) in the format
    `path` names (a 2D geometry as a 2D file). Returns the label map that was written.

    Label ids are the class indices of the network output (plans' labels are 0..K-1); with region-based
    `plans`, the probabilities are the regions' and each is written as its id in order (`label_map_from_regions`).
    """
    probabilities_original = np.asarray(probabilities_original)
    if tuple(probabilities_original.shape[1:]) != tuple(geometry.shape):
        raise ValueError(f"{path}: probabilities of spatial shape {list(probabilities_original.shape[1:])} do not "
                         f"match the input grid {list(geometry.shape)}; convert logits with logits_to_original")
    segmentation = probabilities_to_labels(probabilities_original, plans)
    return write_segmentation(segmentation, geometry, path, rules)


def probabilities_to_labels(probabilities: np.ndarray, plans: Plans | None = None) -> np.ndarray:
    """(K, *spatial) probabilities -> label map: the argmax (uint8, or uint16 beyond 256 classes), or with
    region-based `plans` each region over 0.5 written as its id, in order."""
    if plans is not None and plans.regions:
        top = max(r.written_as for r in plans.regions)
        return label_map_from_regions(probabilities, plans.regions, dtype=np.uint8 if top < 256 else np.uint16)
    num_classes = probabilities.shape[0]
    if num_classes > 65536:
        raise ValueError(f"{num_classes} classes do not fit a uint16 label map")
    return np.argmax(probabilities, axis=0).astype(np.uint8 if num_classes <= 256 else np.uint16)


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
