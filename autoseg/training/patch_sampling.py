"""Where to take training patches: open preprocessed cases lazily and sample patch boxes.

Placement rule, nnU-Net v2's (its data loader's `get_bbox`), per spatial axis with volume size `s`,
read patch `p` and final patch `f` <= `p` that the augmentation centre-crops (`f` defaults to `p`):
the padding allowed is `n = p - f`, raised to `p - s` when the volume is smaller than the final
patch; the patch's lower corner is drawn uniformly from `[-ceil(n / 2), s - p + ceil(n / 2)]`. So a
volume at least as large as the final patch keeps the final patch inside it (only the enlargement
margin may be padding), and a smaller volume is centred in the patch (one position, two when the
difference is odd). Padding is image 0 and label -1 (as outside the non-zero mask; the
augmentation turns -1 into background).

Foreground oversampling: the patch is centred on a stored voxel of the chosen label (lower corner
`voxel - p // 2`), raised to the lowest allowed corner where that lies below it and never lowered,
so a voxel at the upper border stays centred and the padding beyond the volume grows instead.

With an ignore label (sparse annotation), the other patches are centred the same way on a random
annotated voxel (preprocessing stores them under "annotated"), so no patch is all unannotated.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from batchgenerators.dataloading.data_loader import DataLoader

from autoseg.preprocessing import store
from autoseg.preprocessing.preprocess import ANNOTATED
from autoseg.training.cascade import next_stage_file, open_next_stage

ANNOTATED_KEY = -1  # `class_locations` key of the annotated voxels (datasets with an ignore label only)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreprocessedCase:
    """One preprocessed case; `image` and `seg` are opened lazily, so opening it reads no voxels.

    Slicing `image[:, z0:z1, y0:y1, x0:x1]` (or `seg[...]`) returns numpy and reads only that box.
    """

    case_id: str
    image: store.CaseArray  # (C, Z, Y, X) float32
    seg: store.CaseArray  # (1, Z, Y, X) int8 or int16; -1 outside the image's non-zero mask
    class_locations: dict[int, np.ndarray]  # label (or ANNOTATED_KEY) -> (N, 3) int64 voxel coordinates, N may be 0
    previous: store.CaseArray | None = None  # (1, Z, Y, X) a cascade's first-stage labels on this grid


def open_case(folder: Path, case_id: str) -> PreprocessedCase:
    """Open one case written by preprocessing (see `autoseg.preprocessing.store`) without reading voxels."""
    folder = Path(folder)
    properties_path = store.case_paths(folder, case_id)[2]
    if not properties_path.is_file():
        raise store.PreprocessedDataError(f"{properties_path} is missing; run preprocessing for this configuration "
                                          f"first (or remove case '{case_id}' from the split)")
    image, seg = store.open_case_arrays(folder, case_id)
    if len(image.shape) != 4 or len(seg.shape) != 4 or seg.shape[0] != 1 or image.shape[1:] != seg.shape[1:]:
        raise store.PreprocessedDataError(f"case '{case_id}' in {folder} has image shape {image.shape} and seg shape "
                                          f"{seg.shape}; expected (C, Z, Y, X) and (1, Z, Y, X) with equal spatial "
                                          "shape; rerun preprocessing")
    properties = store.load_properties(folder, case_id)
    class_locations = {
        ANNOTATED_KEY if label == ANNOTATED else int(label): np.asarray(coords, dtype=np.int64).reshape(-1, 3)
        for label, coords in properties.class_locations.items()
    }
    return PreprocessedCase(case_id, image, seg, class_locations)


def choose_foreground_label(class_locations: Mapping[int, np.ndarray], rng: np.random.Generator) -> int | None:
    """A label drawn uniformly among the foreground labels with stored voxels; None if the case has none."""
    present = sorted(label for label, coords in class_locations.items() if label > 0 and len(coords) > 0)
    if not present:
        return None
    return present[rng.integers(len(present))]


def lower_corner_range(size: int, patch: int, final: int) -> tuple[int, int]:
    """Lowest and highest lower corner of a read patch on one axis (both inclusive); see the module docstring."""
    pad = max(patch - final, patch - size)
    half_up = (pad + 1) // 2
    return -half_up, size - patch + half_up


def sample_patch_box(
    shape: Sequence[int],
    patch_size: Sequence[int],
    rng: np.random.Generator,
    force_label: int | None,
    class_locations: Mapping[int, np.ndarray],
    *,
    final_patch_size: Sequence[int] | None = None,
) -> tuple[list[int], list[int]]:
    """Lower/upper bounds (upper exclusive, may lie outside the volume) of a patch in a volume of `shape`.

    `shape` is the spatial shape (Z, Y, X). With a 2-entry `patch_size` (2D configuration) the box
    spans a single slice along axis 0. With `force_label`, the box contains a stored voxel of that
    label (falls back to random placement when the case has none); without, it is centred on an
    annotated voxel where `class_locations` has them (ANNOTATED_KEY), else placed at random.
    """
    shape = [int(s) for s in shape]
    patch = [int(p) for p in patch_size]
    final = patch if final_patch_size is None else [int(f) for f in final_patch_size]
    if len(patch) not in (len(shape), len(shape) - 1) or len(final) != len(patch):
        raise ValueError(f"patch_size {patch} (final {final}) does not fit a volume of spatial shape {shape}")
    if any(f > p for f, p in zip(final, patch)):
        raise ValueError(f"final_patch_size {final} must not exceed the read patch_size {patch}")

    voxel = None
    centre_on = force_label if force_label is not None else ANNOTATED_KEY
    coords = class_locations.get(centre_on)
    if coords is not None and len(coords) > 0:
        voxel = [int(v) for v in coords[rng.integers(len(coords))]]
    elif force_label is not None:
        logger.debug("label %s has no stored voxels; sampling a random patch", force_label)

    lower, upper = [], []
    in_plane_shape = shape
    if len(patch) == len(shape) - 1:
        z = voxel[0] if voxel is not None else int(rng.integers(shape[0]))
        lower.append(z)
        upper.append(z + 1)
        in_plane_shape = shape[1:]
        voxel = voxel[1:] if voxel is not None else None
    for axis, (s, p, f) in enumerate(zip(in_plane_shape, patch, final)):
        lo, hi = lower_corner_range(s, p, f)
        corner = max(lo, voxel[axis] - p // 2) if voxel is not None else int(rng.integers(lo, hi + 1))
        lower.append(corner)
        upper.append(corner + p)
    return lower, upper


def read_box(array: store.CaseArray, lower: Sequence[int], upper: Sequence[int],
             pad_value: float = 0) -> np.ndarray:
    """Read `array[:, lower:upper]` (spatial box) touching only the voxels inside; outside is `pad_value`."""
    spatial = [int(s) for s in array.shape[1:]]
    inside = tuple(slice(min(max(lo, 0), s), max(min(up, s), 0)) for lo, up, s in zip(lower, upper, spatial))
    region = np.asarray(array[(slice(None),) + inside])
    pad = [(0, 0)] + [(min(max(-lo, 0), up - lo), min(max(up - s, 0), up - lo)) for lo, up, s in
                      zip(lower, upper, spatial)]
    if any(before or after for before, after in pad):
        region = np.pad(region, pad, mode="constant", constant_values=pad_value)
    return region


class PatchLoader(DataLoader):
    """Batches of patches `{"data": (B, C, *patch) float32, "seg": (B, 1, *patch) int8|int16, "keys": [...]}`.

    The seg keeps the stored integer type (int16 when any case stores int16) and holds -1 outside
    the non-zero mask and in the padding beyond the volume.

    The last samples of each batch (index i >= round(batch_size * (1 - oversample_foreground))) are
    forced to contain foreground. Each worker (thread_id) draws from its own generator seeded with
    (seed, thread_id), so a given seed reproduces each worker's stream. `final_patch_size` is the
    patch after the augmentation's centre crop (see the module docstring); leave None for validation.
    With `infinite=False` the loader goes over `case_ids` once, split across
    `num_threads_in_multithreaded` workers. With `previous_stage` (a cascade's second stage: the folder of
    the first stage's predictions, training/cascade.py), "seg" has a second channel holding them.
    """

    def __init__(
        self,
        folder: Path,
        case_ids: Sequence[str],
        patch_size: Sequence[int],
        batch_size: int,
        oversample_foreground: float = 0.33,
        num_threads_in_multithreaded: int = 1,
        seed: int | None = None,
        infinite: bool = True,
        *,
        final_patch_size: Sequence[int] | None = None,
        previous_stage: Path | None = None,
    ):
        if not case_ids:
            raise ValueError(f"PatchLoader for {folder} got no case ids; check the split file")
        if not 0.0 <= oversample_foreground <= 1.0:
            raise ValueError(f"oversample_foreground must be in [0, 1], got {oversample_foreground}")
        super().__init__(list(case_ids), batch_size, num_threads_in_multithreaded, seed_for_shuffle=seed,
                         return_incomplete=False, shuffle=True, infinite=infinite)
        self.folder = Path(folder)
        self.case_ids = list(case_ids)
        self.patch_size = [int(p) for p in patch_size]
        self.final_patch_size = None if final_patch_size is None else [int(f) for f in final_patch_size]
        self.oversample_foreground = oversample_foreground
        self.previous_stage = None if previous_stage is None else Path(previous_stage)
        self.seed = seed
        self.indices = list(range(len(self.case_ids)))
        self._cases: dict[str, PreprocessedCase] = {}
        self._cases_pid = os.getpid()
        self._rng = self._make_rng(0)

    def _make_rng(self, thread_id: int) -> np.random.Generator:
        return np.random.default_rng(None if self.seed is None else [self.seed, thread_id])

    def set_thread_id(self, thread_id: int) -> None:
        super().set_thread_id(thread_id)
        self._rng = self._make_rng(thread_id)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_cases"] = {}  # opened arrays hold files: each worker reopens them, they are never pickled
        return state

    def _case(self, case_id: str) -> PreprocessedCase:
        if self._cases_pid != os.getpid():  # a forked worker: do not share the parent's open files
            self._cases, self._cases_pid = {}, os.getpid()
        if case_id not in self._cases:
            case = open_case(self.folder, case_id)
            if self.previous_stage is not None:
                case = replace(case, previous=open_next_stage(next_stage_file(self.previous_stage, case_id)))
            self._cases[case_id] = case
        return self._cases[case_id]

    def is_forced(self, sample_index: int) -> bool:
        """Whether sample `sample_index` of a batch must contain foreground."""
        return (self.oversample_foreground > 0
                and sample_index >= round(self.batch_size * (1 - self.oversample_foreground)))

    def generate_train_batch(self) -> dict:
        if self.infinite:
            indices = self._rng.integers(len(self.case_ids), size=self.batch_size)
        else:
            indices = self.get_indices()
        data, seg, keys = [], [], []
        for i, index in enumerate(indices):
            case = self._case(self.case_ids[index])
            label = choose_foreground_label(case.class_locations, self._rng) if self.is_forced(i) else None
            lower, upper = sample_patch_box(case.image.shape[1:], self.patch_size, self._rng, label,
                                            case.class_locations, final_patch_size=self.final_patch_size)
            image, labels = read_box(case.image, lower, upper), read_box(case.seg, lower, upper, pad_value=-1)
            if case.previous is not None:
                previous = read_box(case.previous, lower, upper, pad_value=-1).astype(labels.dtype)
                labels = np.concatenate([labels, previous])
            if len(self.patch_size) == 2:
                image, labels = image[:, 0], labels[:, 0]
            data.append(image)
            seg.append(labels)
            keys.append(case.case_id)
        return {"data": np.stack(data).astype(np.float32, copy=False),
                "seg": np.stack(seg), "keys": keys}
