"""One internal view of a dataset, whichever `dataset.json` layout it came in.

Two layouts are read:
- Medical Segmentation Decathlon: `modality` {index: name}, `labels` {id: name}, `training` a list
  of {image, label} paths; a multi-channel image is one 4D file.
- nnU-Net v2: `channel_names` {index: name}, `labels` {name: id}, `file_ending`; images are
  `imagesTr/<case>_<cccc><ending>`, one file per channel, labels `labelsTr/<case><ending>`.
  Pictures (`.png`, `.tif`, ...) may instead hold every channel in `<case>_0000` (an RGB image for
  channel_names R, G, B): see `one_file_holds_all_channels`. A `dataset` object
  {case: {"images": [...], "label": ...}} instead names the files wherever they are.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from autoseg.dataset import ignore_label_id
from autoseg.dataset.image_io import NATURAL_IMAGE_SUFFIXES, SUPPORTED_SUFFIXES, image_suffix, strip_suffix
from autoseg.dataset.regions import Region, RegionError, has_regions, parse_regions
from autoseg.errors import AutosegError

if TYPE_CHECKING:  # numpy and image reading are imported where a case is read, not when a dataset is listed
    import numpy as np

    from autoseg.dataset.image_io import Geometry

GEOMETRY_TOLERANCE = 1e-3  # relative; grids closer than this count as the same (verification uses it too)
MAX_LABEL_ID = 32767  # label maps are held as int16


class DatasetError(AutosegError):
    """A dataset that cannot be used as it is; the message names the file and the fix."""


@dataclass(frozen=True)
class Case:
    case_id: str
    image_files: tuple[Path, ...]  # one file per channel, or a single file holding all channels (4D or RGB)
    label_file: Path | None
    # One id per object (0 background) beside the label map, for instance segmentation: instancesTr/<case><ending>
    instance_file: Path | None = None

    @property
    def channels_in_one_file(self) -> bool:
        return len(self.image_files) == 1


@dataclass(frozen=True)
class Dataset:
    root: Path
    name: str
    layout: str  # "decathlon" or "nnunetv2"
    channel_names: tuple[str, ...]
    labels: dict[int, str]  # label id -> name, 0 is background
    file_ending: str
    cases: tuple[Case, ...]
    licence: str | None = None
    # Region-based labels (dataset/regions.py): overlapping structures, each a set of the ids in `labels`
    regions: tuple[Region, ...] = ()

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def foreground_labels(self) -> list[int]:
        return sorted(k for k in self.labels if k != 0)

    @property
    def has_instances(self) -> bool:
        """Every case has an instance map (instancesTr/), so touching objects can be taught apart."""
        return bool(self.cases) and all(c.instance_file is not None for c in self.cases)

    def to_json(self) -> dict:
        """Summary stored in the workspace so later stages know the dataset without re-reading it."""
        return {
            "name": self.name, "root": str(self.root), "layout": self.layout,
            "channel_names": list(self.channel_names),
            "labels": {str(k): v for k, v in sorted(self.labels.items())},
            "file_ending": self.file_ending, "num_cases": len(self.cases),
            **({"instance_maps": INSTANCES_DIR} if self.has_instances else {}),
            **({"regions": [r.to_json() for r in self.regions]} if self.regions else {}),
        }


INSTANCES_DIR = "instancesTr"  # beside labelsTr: <label file name>, one id per object (not listed in dataset.json)


def _with_instance_files(dataset: Dataset) -> Dataset:
    """Attach `instancesTr/<label file name>` to each case whose file exists (no folder: the dataset as it was)."""
    folder = dataset.root / INSTANCES_DIR
    if not folder.is_dir():
        return dataset
    cases = tuple(replace(c, instance_file=folder / c.label_file.name)
                  if c.label_file is not None and (folder / c.label_file.name).is_file() else c for c in dataset.cases)
    return replace(dataset, cases=cases)


def load_dataset(root: Path | str) -> Dataset:
    """Read `root/dataset.json` in either layout and list the training cases."""
    root = Path(root).resolve()
    meta_path = root / "dataset.json"
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found")
    if not meta_path.is_file():
        raise DatasetError(f"{meta_path}: missing; a dataset folder needs a dataset.json "
                           "(Decathlon or nnU-Net v2 layout, see docs/datasets.md)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{meta_path}: not valid JSON (line {exc.lineno}: {exc.msg})") from None
    if not isinstance(meta, dict):
        raise DatasetError(f"{meta_path}: expected a JSON object at the top level")
    if "channel_names" in meta:
        return _with_instance_files(_load_nnunetv2(root, meta_path, meta))
    if "modality" in meta:
        return _with_instance_files(_load_decathlon(root, meta_path, meta))
    raise DatasetError(f"{meta_path}: has neither 'modality' (Decathlon) nor 'channel_names' (nnU-Net v2); "
                       "add one that lists the image channels")


def _channel_names(meta_path: Path, mapping: object, key: str) -> tuple[str, ...]:
    if not isinstance(mapping, dict) or not mapping:
        raise DatasetError(f"{meta_path}: '{key}' must be a non-empty object {{index: name}}")
    try:
        indexed = sorted((int(k), str(v)) for k, v in mapping.items())
    except ValueError:
        raise DatasetError(f"{meta_path}: '{key}' keys must be channel indices 0, 1, ...") from None
    if [i for i, _ in indexed] != list(range(len(indexed))):
        raise DatasetError(f"{meta_path}: '{key}' indices must be 0..{len(indexed) - 1} without gaps")
    return tuple(name for _, name in indexed)


def _check_labels(meta_path: Path, labels: dict[int, str]) -> dict[int, str]:
    if 0 not in labels:
        raise DatasetError(f"{meta_path}: 'labels' must declare the background as label 0")
    if any(k < 0 or k > MAX_LABEL_ID for k in labels):
        raise DatasetError(f"{meta_path}: label ids must lie in 0..{MAX_LABEL_ID}")
    if sorted(labels) != list(range(len(labels))):
        # The network's output channel k predicts label k, so the ids must be 0..K-1.
        raise DatasetError(f"{meta_path}: label ids must be consecutive 0..{len(labels) - 1}, found {sorted(labels)}; "
                           "renumber the labels in dataset.json and the label files")
    ignore = ignore_label_id(labels)
    if ignore is not None and (ignore != max(labels) or len(labels) < 3):
        # As nnU-Net v2: the network predicts labels 0..K-2, so the unannotated mark must come last.
        raise DatasetError(f"{meta_path}: the label named 'ignore' (unannotated voxels) must have the highest id and "
                           f"follow background and at least one structure; it has {ignore}, the labels are "
                           f"{sorted(labels)}")
    return dict(sorted(labels.items()))


def _load_decathlon(root: Path, meta_path: Path, meta: dict) -> Dataset:
    channels = _channel_names(meta_path, meta["modality"], "modality")
    raw_labels = meta.get("labels")
    if not isinstance(raw_labels, dict):
        raise DatasetError(f"{meta_path}: 'labels' must be an object {{id: name}}")
    try:
        labels = {int(k): str(v) for k, v in raw_labels.items()}
    except ValueError:
        raise DatasetError(f"{meta_path}: Decathlon 'labels' keys must be integer ids, e.g. "
                           f"{{\"0\": \"background\"}}") from None
    training = meta.get("training")
    if not isinstance(training, list) or not training:
        raise DatasetError(f"{meta_path}: 'training' must be a non-empty list of {{image, label}} entries")
    cases = []
    for i, entry in enumerate(training):
        if not isinstance(entry, dict) or "image" not in entry:
            raise DatasetError(f"{meta_path}: training entry {i} needs an 'image' path")
        image = (root / entry["image"]).resolve()
        label = (root / entry["label"]).resolve() if entry.get("label") else None
        cases.append(Case(strip_suffix(image), (image,), label))
    ending = image_suffix(cases[0].image_files[0]) or ".nii.gz"
    return Dataset(root, str(meta.get("name", root.name)), "decathlon", channels,
                   _check_labels(meta_path, labels), ending, tuple(cases), meta.get("licence") or meta.get("license"))


def _load_nnunetv2(root: Path, meta_path: Path, meta: dict) -> Dataset:
    channels = _channel_names(meta_path, meta["channel_names"], "channel_names")
    raw_labels = meta.get("labels")
    if not isinstance(raw_labels, dict):
        raise DatasetError(f"{meta_path}: 'labels' must be an object {{name: id}}")
    regions: tuple[Region, ...] = ()
    if has_regions(raw_labels):
        try:
            labels, regions = parse_regions(meta_path, raw_labels, meta.get("regions_class_order"))
        except RegionError as exc:
            raise DatasetError(str(exc)) from None
    else:
        labels = {}
        for name, value in raw_labels.items():
            if isinstance(value, list):  # a one-id list: a plain label, as nnU-Net v2 reads it
                value = value[0] if len(value) == 1 else value
            try:
                labels[int(value)] = str(name)
            except (TypeError, ValueError):
                raise DatasetError(f"{meta_path}: label '{name}' must map to an integer id") from None
    ending = meta.get("file_ending", ".nii.gz")
    if ending not in SUPPORTED_SUFFIXES:
        raise DatasetError(f"{meta_path}: file_ending '{ending}' is not supported; use one of "
                           f"{', '.join(SUPPORTED_SUFFIXES)}")
    if "dataset" in meta:
        cases = _listed_cases(root, meta_path, meta["dataset"], len(channels), ending)
        return Dataset(root, str(meta.get("name", root.name)), "nnunetv2", channels,
                       _check_labels(meta_path, labels), ending, cases, meta.get("licence") or meta.get("license"),
                       regions)
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir():
        raise DatasetError(f"{images_dir}: folder missing (nnU-Net v2 layout keeps training images in imagesTr/)")
    pattern = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})" + re.escape(ending) + "$")
    channel_files: dict[str, dict[int, Path]] = {}
    for f in sorted(images_dir.iterdir()):
        m = pattern.match(f.name)
        if m:
            channel_files.setdefault(m["case"], {})[int(m["channel"])] = f
    label_files = {f.name[: -len(ending)]: f for f in labels_dir.glob(f"*{ending}")} if labels_dir.is_dir() else {}
    case_ids = sorted(set(channel_files) | set(label_files))
    if not case_ids:
        raise DatasetError(f"{images_dir}: no files named <case>_<cccc>{ending}")
    one_file = one_file_holds_all_channels(ending, len(channels), channel_files)
    cases = []
    for case_id in case_ids:
        files = channel_files.get(case_id, {})
        # Missing channels are kept as the expected path so verification reports them by name.
        expected = range(1 if one_file else len(channels))
        image_files = tuple(files.get(c, images_dir / f"{case_id}_{c:04d}{ending}") for c in expected)
        cases.append(Case(case_id, image_files, label_files.get(case_id, labels_dir / f"{case_id}{ending}")))
    return Dataset(root, str(meta.get("name", root.name)), "nnunetv2", channels,
                   _check_labels(meta_path, labels), ending, tuple(cases), meta.get("licence") or meta.get("license"),
                   regions)


def _listed_cases(root: Path, meta_path: Path, listing: object, num_channels: int, ending: str) -> tuple[Case, ...]:
    """Cases named in dataset.json's `dataset` object (nnU-Net v2's way to point at files kept elsewhere):
    {case: {"images": [one path per channel], "label": path}}, paths absolute or relative to the dataset."""
    if not isinstance(listing, dict) or not listing:
        raise DatasetError(f"{meta_path}: 'dataset' must be a non-empty object "
                           f"{{case: {{\"images\": [...], \"label\": ...}}}}")
    cases = []
    for case_id, entry in sorted(listing.items()):
        images = entry.get("images") if isinstance(entry, dict) else None
        if not isinstance(images, list) or not images or not all(isinstance(i, str) for i in images):
            raise DatasetError(f"{meta_path}: dataset entry '{case_id}' needs \"images\": a list of file paths")
        if len(images) != num_channels and not (len(images) == 1 and ending in NATURAL_IMAGE_SUFFIXES):
            raise DatasetError(f"{meta_path}: dataset entry '{case_id}' lists {len(images)} image(s), channel_names "
                               f"declares {num_channels}")
        label = entry.get("label")
        if not isinstance(label, str) or not label:
            raise DatasetError(f"{meta_path}: dataset entry '{case_id}' needs \"label\": the path of its label map")
        cases.append(Case(str(case_id), tuple((root / i).resolve() for i in images), (root / label).resolve()))
    return tuple(cases)


def one_file_holds_all_channels(ending: str, num_channels: int, channel_files: dict[str, dict[int, Path]]) -> bool:
    """Whether `<case>_0000` files hold every channel, given the channel numbers found per case.

    nnU-Net v2's natural-image layout: channel_names lists R, G, B but each case has only an RGB
    `<case>_0000.png`. The rule: a picture format, several channels declared, and no `_0001` or
    higher anywhere in imagesTr. Whether each file really holds that many channels is checked when
    it is read (verification reports the files that do not)."""
    return (ending in NATURAL_IMAGE_SUFFIXES and num_channels > 1
            and all(set(files) == {0} for files in channel_files.values()))


_ONE_FILE_HINT = ("; a picture holding every channel must have that many colour components (RGB for 3), "
                  "otherwise give each channel its own file <case>_<cccc>")


def read_case_image(case: Case, num_channels: int) -> tuple["np.ndarray", "Geometry"]:
    """All channels of a case as (C, Z, Y, X) float32 with the geometry of the first channel.

    Raises DatasetError naming the file when the channel count or grids disagree.
    """
    from autoseg.dataset.image_io import read_image

    return case_image_from_arrays(case, num_channels, [read_image(path) for path in case.image_files])


def case_image_from_arrays(case: Case, num_channels: int,
                           arrays: "list[tuple[np.ndarray, Geometry]]") -> tuple["np.ndarray", "Geometry"]:
    """`read_case_image` from the (array, geometry) already read from each of the case's image files."""
    import numpy as np

    if case.channels_in_one_file:
        array, geometry = arrays[0]
        if array.ndim == 3:
            array = array[None]
        if array.shape[0] != num_channels:
            hint = _ONE_FILE_HINT if image_suffix(case.image_files[0]) in NATURAL_IMAGE_SUFFIXES else ""
            raise DatasetError(f"{case.image_files[0]}: has {array.shape[0]} channel(s), dataset.json declares "
                               f"{num_channels}{hint}")
        return array.astype(np.float32, copy=False), geometry
    channels, geometry = [], None
    for path, (array, g) in zip(case.image_files, arrays):
        if array.ndim != 3:
            raise DatasetError(f"{path}: expected one channel per file, found {array.shape[0]} channels "
                               f"({'colour pixels' if image_suffix(path) in NATURAL_IMAGE_SUFFIXES else 'a 4D image'})")
        if geometry is not None and not g.matches(geometry, GEOMETRY_TOLERANCE):
            raise DatasetError(f"{path}: grid differs from {case.image_files[0].name} "
                               f"({'; '.join(g.differences(geometry, GEOMETRY_TOLERANCE))})")
        geometry = geometry or g
        channels.append(array.astype(np.float32, copy=False))
    return np.stack(channels), geometry


def read_case_instances(case: Case, label: "np.ndarray") -> "np.ndarray":
    """A case's instance map as int32 (Z, Y, X), checked against its label map (same grid, objects only
    where the label is foreground)."""
    import numpy as np

    from autoseg.dataset.image_io import read_label

    if case.instance_file is None:
        raise DatasetError(f"case {case.case_id}: no instance map in {INSTANCES_DIR}/")
    array, _ = read_label(case.instance_file)
    if array.shape != label.shape:
        raise DatasetError(f"{case.instance_file}: shape {list(array.shape)} differs from its label map's "
                           f"{list(label.shape)} ({case.label_file})")
    if array.size and (array.min() < 0 or not np.array_equal(np.rint(array), array)):
        raise DatasetError(f"{case.instance_file}: an instance map holds whole numbers >= 0 (one id per object)")
    instances = array.astype(np.int32)
    stray = int(np.count_nonzero((instances > 0) & (label == 0)))
    if stray:
        raise DatasetError(f"{case.instance_file}: {stray} pixel(s) belong to an object but are background in "
                           f"{case.label_file}; the instance map and the label map must agree on the foreground")
    return instances


def read_case_label(case: Case) -> "np.ndarray":
    """Label map of a case as an int16 (Z, Y, X) array (a 2D label file gives Z = 1)."""
    from autoseg.dataset.image_io import read_label

    if case.label_file is None:
        raise DatasetError(f"case {case.case_id}: no label file")
    return case_label_from_array(case, read_label(case.label_file)[0])


def case_label_from_array(case: Case, array: "np.ndarray") -> "np.ndarray":
    """`read_case_label` from the array already read from the case's label file."""
    import numpy as np

    rounded = np.rint(array)
    if not np.array_equal(rounded, array):
        raise DatasetError(f"{case.label_file}: label map holds non-integer values")
    if rounded.size and (rounded.min() < 0 or rounded.max() > MAX_LABEL_ID):
        raise DatasetError(f"{case.label_file}: label values {int(rounded.min())}..{int(rounded.max())} lie outside "
                           f"0..{MAX_LABEL_ID}")
    return rounded.astype(np.int16)
