"""From a predicted label map with object rims (the plans' "instance_segmentation") to objects.

The network predicts each object's interior and its one-voxel rim (preprocessing/instance_targets.py).
Objects are the connected interiors (face connectivity, so a rim between two touching objects parts
them); each is then grown back over the rim voxels around it (a watershed on a flat image from
the interiors as markers, within the predicted foreground, so a rim voxel goes to the interior it
is nearest to). Foreground left unreached (a rim with no interior: a very small object) becomes
objects of its own. Rim voxels then take the label of the object they joined, so the written label
map holds only the dataset's labels.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from autoseg.atomic import atomic_path
from autoseg.dataset.image_io import Geometry, write_image
from autoseg.inference.volumes import escape_cell


def instances_from_rims(labels: np.ndarray, boundary_label: int) -> tuple[np.ndarray, np.ndarray]:
    """(instance map int32, label map without the rim label) from a predicted label map (Z, Y, X) or (Y, X)."""
    from skimage.segmentation import watershed  # scikit-image: only where instances are made

    labels = np.asarray(labels)
    foreground = labels > 0
    interior = foreground & (labels != boundary_label)
    structure = ndimage.generate_binary_structure(labels.ndim, 1)
    markers, count = ndimage.label(interior, structure=structure)
    if count:
        grown = watershed(np.zeros(labels.shape, dtype=np.uint8), markers=markers, mask=foreground,
                          connectivity=structure)
    else:
        grown = np.zeros(labels.shape, dtype=np.int32)
    leftover, extra = ndimage.label(foreground & (grown == 0), structure=structure)
    instances = grown.astype(np.int32)
    if extra:
        instances[leftover > 0] = leftover[leftover > 0] + count
    semantic = labels.copy()
    rims = labels == boundary_label
    if rims.any():
        semantic[rims] = _object_labels(instances, labels, boundary_label)[instances[rims]]
    return instances, semantic


def without_rims(labels: np.ndarray, boundary_label: int | None) -> np.ndarray:
    """A predicted label map as written out: object rims given to the objects they part (unchanged when the plans
    train no rims)."""
    return labels if boundary_label is None else instances_from_rims(labels, boundary_label)[1]


def _object_labels(instances: np.ndarray, labels: np.ndarray, boundary_label: int) -> np.ndarray:
    """Per object id, the most frequent non-rim label of its voxels (the first foreground label, 1, for an
    object that is all rim); index 0 (background) maps to 0."""
    n = int(instances.max()) + 1
    inside = (instances > 0) & (labels > 0) & (labels != boundary_label)
    result = np.ones(n, dtype=labels.dtype)
    result[0] = 0
    if inside.any():
        classes = labels[inside].astype(np.int64)
        votes = np.zeros((n, int(classes.max()) + 1), dtype=np.int64)
        np.add.at(votes, (instances[inside].astype(np.int64), classes), 1)
        has = votes.sum(axis=1) > 0
        result[has] = votes[has].argmax(axis=1)
        result[0] = 0
    return result


def relabel_sequential(instances: np.ndarray) -> np.ndarray:
    """Ids 1..N in order of first appearance in memory order (0 stays 0), as a compact dtype for writing:
    uint16 when N < 65536, else uint32."""
    ids, inverse = np.unique(instances, return_inverse=True)
    if ids[0] != 0:
        ids = np.concatenate([[0], ids])
        inverse = inverse + 1
    dtype = np.uint16 if len(ids) <= 65536 else np.uint32
    return inverse.reshape(instances.shape).astype(dtype)


def object_rows(instances: np.ndarray, labels: np.ndarray, spacing: tuple[float, ...]) -> list[dict]:
    """One row per object: id, label, voxels, size (mm^3 for 3D, mm^2 or pixels for 2D) and centroid (voxel
    coordinates, axis order of the array)."""
    ids = np.unique(instances)
    ids = ids[ids > 0]
    if not len(ids):
        return []
    index = ids.tolist()
    voxels = ndimage.sum_labels(np.ones(instances.shape), instances, index)
    centroids = ndimage.center_of_mass(np.ones(instances.shape), instances, index)
    majority = _object_labels(instances, labels, -1)
    cell = float(np.prod([float(s) for s in spacing[-instances.ndim:]]))
    return [{"object": int(i), "label": int(majority[i]), "voxels": int(v), "size": round(float(v) * cell, 4),
             "centroid": [round(float(c), 2) for c in centre]}
            for i, v, centre in zip(index, voxels, centroids)]


OBJECTS_CSV = "objects.csv"
OBJECT_COLUMNS_3D = ("case", "object", "label", "label_name", "voxels", "volume_ml", "centroid_z", "centroid_y",
                     "centroid_x")
OBJECT_COLUMNS_2D = ("case", "object", "label", "label_name", "pixels", "area_mm2", "centroid_y", "centroid_x")


def _stem_and_ending(label_map_path: Path) -> tuple[str, str]:
    name = label_map_path.name
    ending = ".nii.gz" if name.endswith(".nii.gz") else label_map_path.suffix
    return name[: len(name) - len(ending)], ending


def instances_path(label_map_path: Path) -> Path:
    """`<case>_instances<ending>` beside the label map `<case><ending>`."""
    stem, ending = _stem_and_ending(Path(label_map_path))
    return Path(label_map_path).with_name(f"{stem}_instances{ending}")


def objects_table_path(label_map_path: Path) -> Path:
    """The per-case object table `<case>_objects.csv` beside the label map."""
    stem, _ = _stem_and_ending(Path(label_map_path))
    return Path(label_map_path).with_name(f"{stem}_objects.csv")


def write_instances(instances: np.ndarray, segmentation: np.ndarray, geometry: Geometry, case_id: str,
                    label_map_path: Path, label_names: dict[int, str]) -> np.ndarray:
    """Write the instance map (objects kept only where the written label map is foreground, so postprocessing
    applies to both; ids 1..N; 16-bit in a PNG) and its object table `<case>_objects.csv`; returns the map
    written."""
    kept = np.where(np.asarray(segmentation) > 0, instances, 0)
    compact = relabel_sequential(kept)
    path = instances_path(Path(label_map_path))
    if path.suffix.lower() == ".png" and compact.dtype != np.uint16:
        raise ValueError(f"{path}: {int(compact.max())} objects do not fit a 16-bit PNG; predict into NIfTI instead")
    write_image(path, compact, geometry)
    spacing = tuple(float(s) for s in geometry.spacing)
    rows = object_rows(compact, np.asarray(segmentation), (1.0, *spacing[1:]) if geometry.is_2d else spacing)
    columns = OBJECT_COLUMNS_2D if geometry.is_2d else OBJECT_COLUMNS_3D
    lines = [",".join(columns)]
    for row in rows:
        centre = row["centroid"][-2:] if geometry.is_2d else row["centroid"]
        size = row["size"] if geometry.is_2d else round(row["size"] / 1000.0, 6)
        name = escape_cell(str(label_names.get(row["label"], row["label"])))
        cells = [escape_cell(case_id), row["object"], row["label"], _quoted(name), row["voxels"], size, *centre]
        lines.append(",".join(str(c) for c in cells))
    with atomic_path(objects_table_path(Path(label_map_path))) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return compact


def _quoted(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text


def gather_object_tables(folder: Path) -> Path | None:
    """`objects.csv`: every `<case>_objects.csv` of the folder in one table (written again after each run, so
    runs in parts or continued runs end with every case once)."""
    folder = Path(folder)
    tables = sorted(folder.glob("*_objects.csv"))
    if not tables:
        return None
    header, body = None, []
    for table in tables:
        lines = table.read_text(encoding="utf-8").splitlines()
        if not lines:
            continue
        if header is None:
            header = lines[0]
        if lines[0] == header:
            body += lines[1:]
    path = folder / OBJECTS_CSV
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join([header or "", *body]) + "\n", encoding="utf-8")
    return path
