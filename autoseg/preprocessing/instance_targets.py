"""Training targets that teach a network to separate touching objects (the plans' "instance_segmentation").

Method "boundary_class": each object's inner rim, the voxels of the object with a face neighbour
outside it (another object or the background), becomes one more label. Two touching objects are then
parted by two rims, which a semantic label map cannot express; prediction takes the connected
interiors as the objects and grows them back over the rims (inference/instance_maps.py). The rim is
drawn on the case's own grid before resampling, in-plane only for the 2d configuration (whose
network sees one slice) and in 3D otherwise.
"""

from __future__ import annotations

import numpy as np


def inner_boundaries(instances: np.ndarray, in_plane: bool = False) -> np.ndarray:
    """Voxels of an object (id > 0) with a face neighbour of another id; `in_plane` looks along the last two
    axes only. Voxels at the array's edge count their outside as the same object (no rim along a crop)."""
    instances = np.asarray(instances)
    rim = np.zeros(instances.shape, dtype=bool)
    axes = range(instances.ndim - 2, instances.ndim) if in_plane else range(instances.ndim)
    for axis in axes:
        if instances.shape[axis] < 2:
            continue
        lower = [slice(None)] * instances.ndim
        upper = [slice(None)] * instances.ndim
        lower[axis], upper[axis] = slice(0, -1), slice(1, None)
        differs = instances[tuple(lower)] != instances[tuple(upper)]
        rim[tuple(lower)] |= differs
        rim[tuple(upper)] |= differs
    return rim & (instances > 0)


def boundary_target(label: np.ndarray, instances: np.ndarray, boundary_label: int, in_plane: bool = False
                    ) -> np.ndarray:
    """The label map with every object's inner rim set to `boundary_label` (same dtype and shape as `label`)."""
    if label.shape != instances.shape:
        raise ValueError(f"label map {list(label.shape)} and instance map {list(instances.shape)} differ in shape")
    target = np.array(label, copy=True)
    target[inner_boundaries(instances, in_plane)] = boundary_label
    return target


def object_count(instances: np.ndarray) -> int:
    """Objects in an instance map (distinct ids above 0)."""
    ids = np.unique(instances)
    return int(np.count_nonzero(ids > 0))


def touching_object_pairs(instances: np.ndarray) -> set[tuple[int, int]]:
    """Pairs (lower id, higher id) of objects sharing a face (what a semantic label map merges into one)."""
    pairs = set()
    for axis in range(instances.ndim):
        a = np.moveaxis(instances, axis, 0)
        first, second = a[:-1], a[1:]
        touch = (first != second) & (first > 0) & (second > 0)
        for i, j in zip(first[touch].ravel(), second[touch].ravel()):
            pairs.add((int(min(i, j)), int(max(i, j))))
    return pairs


def touching_pairs(instances: np.ndarray) -> int:
    """How many pairs of objects share a face."""
    return len(touching_object_pairs(instances))


