"""The 3d cascade's second stage: the first stage's prediction as extra input channels, as nnU-Net v2 does it.

`3d_cascade_fullres` is 3d_fullres's plan whose network also reads 3d_lowres's segmentation, one
channel per foreground label (one-hot). It trains on 3d_lowres's cross-validation predictions: each
3d_lowres fold's validation writes its held-out cases' label maps, taken onto the 3d_fullres grid
as training labels are (`preprocessing.preprocess.label_to_network_grid`), to
`models/3d_lowres/predicted_next_stage/3d_cascade_fullres/<case>.b2nd`; so every training case of the
cascade sees a prediction of a model that never trained on it. Prediction runs 3d_lowres first and
feeds its label map in the same way (`inference/predictor.py`).

During training the one-hot channels are perturbed as nnU-Net 2.8.1 perturbs them, so the second
stage learns to correct a first stage's mistakes instead of copying its input: with probability 0.4
a random binary dilation, erosion, opening or closing (ball of radius 1-8) of each label channel with
p 0.5; with probability 0.2 the removal of one random connected component smaller than 15% of the
patch from each label channel with p 0.5.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from batchgenerators.transforms.abstract_transforms import AbstractTransform
from scipy import ndimage
from scipy.signal import fftconvolve
from skimage.morphology import ball, disk

from autoseg.preprocessing import store
from autoseg.preprocessing.preprocess import one_hot_labels

NEXT_STAGE_FOLDER = "predicted_next_stage"


def next_stage_dir(workdir: Path, previous: str, configuration: str) -> Path:
    """Where `previous`'s cross-validation predictions for `configuration`'s training are kept."""
    return Path(workdir) / "models" / previous / NEXT_STAGE_FOLDER / configuration


def next_stage_file(folder: Path, case_id: str) -> Path:
    """One case's first-stage prediction in a `next_stage_dir` folder."""
    return Path(folder) / f"{case_id}.b2nd"


def next_stage_path(workdir: Path, previous: str, configuration: str, case_id: str) -> Path:
    return next_stage_file(next_stage_dir(workdir, previous, configuration), case_id)


def save_next_stage(path: Path, labels: np.ndarray) -> None:
    """A first-stage label map on the second stage's grid, (Z, Y, X), stored as (1, Z, Y, X) like a seg."""
    path.parent.mkdir(parents=True, exist_ok=True)
    store.save_array(path, np.ascontiguousarray(labels)[None])


def open_next_stage(path: Path) -> store.CaseArray:
    """The stored (1, Z, Y, X) first-stage prediction, opened lazily; an error naming the fix when it is missing."""
    if not path.is_file():
        raise store.PreprocessedDataError(f"{path} is missing: the cascade's second stage trains on the first "
                                          "stage's cross-validation predictions; train and validate every fold of "
                                          "it first (`autoseg train WORKDIR --config 3d_lowres --fold K`, K = 0..4)")
    return store.open_array(path)


def load_next_stage(path: Path) -> np.ndarray:
    """The stored first-stage prediction as a (Z, Y, X) array."""
    return np.asarray(open_next_stage(path)[...])[0]


class MoveSegAsOneHotToData(AbstractTransform):
    """Move seg channel 1 (the first stage's labels) to the end of `data` as one channel per foreground label."""

    def __init__(self, foreground: Sequence[int]):
        self.foreground = [int(v) for v in foreground]

    def __call__(self, **data_dict):
        seg = data_dict["seg"]
        previous = np.stack([one_hot_labels(sample, self.foreground) for sample in np.asarray(seg)[:, 1]])
        data_dict["data"] = np.concatenate([data_dict["data"], previous.astype(data_dict["data"].dtype)], axis=1)
        data_dict["seg"] = seg[:, :1]
        return data_dict


def _dilate(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    # FFT convolution: cheap for the large balls drawn here, where ndimage's dilation grows with the ball's volume
    return fftconvolve(mask.astype(np.float32), structure.astype(np.float32), mode="same") > 0.5


def _erode(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    return ~_dilate(~mask, structure)


_OPERATORS = (
    _dilate,
    _erode,
    lambda m, s: _erode(_dilate(m, s), s),  # closing
    lambda m, s: _dilate(_erode(m, s), s),  # opening
)


class RandomBinaryOperator(AbstractTransform):
    """Per sample with `p_per_sample`: in random order, each of the last `n_channels` data channels with
    `p_per_label` gets a random dilation, erosion, closing or opening; voxels it adds leave the other channels."""

    def __init__(self, n_channels: int, radius: tuple[float, float] = (1, 8), p_per_label: float = 0.5,
                 p_per_sample: float = 0.4):
        self.n_channels, self.radius = n_channels, radius
        self.p_per_label, self.p_per_sample = p_per_label, p_per_sample

    def __call__(self, **data_dict):
        for sample, c, channels in _chosen_label_channels(data_dict["data"], self.n_channels, self.p_per_sample,
                                                          self.p_per_label):
            radius = int(round(np.random.uniform(*self.radius)))
            structure = ball(radius) if sample.ndim == 4 else disk(radius)
            before = sample[c] > 0
            after = _OPERATORS[np.random.randint(len(_OPERATORS))](before, structure)
            added = after & ~before
            for other in channels:
                if other != c:
                    sample[other][added] = 0
            sample[c] = after
        return data_dict


class RemoveRandomComponent(AbstractTransform):
    """Per sample with `p_per_sample`: each of the last `n_channels` data channels with `p_per_label` loses one
    random connected component among those under `max_fraction` of the patch."""

    def __init__(self, n_channels: int, max_fraction: float = 0.15, p_per_label: float = 0.5,
                 p_per_sample: float = 0.2):
        self.n_channels, self.max_fraction = n_channels, max_fraction
        self.p_per_label, self.p_per_sample = p_per_label, p_per_sample

    def __call__(self, **data_dict):
        for sample, c, _ in _chosen_label_channels(data_dict["data"], self.n_channels, self.p_per_sample,
                                                   self.p_per_label):
            mask = sample[c] > 0
            if not mask.any():
                continue
            components, _ = ndimage.label(mask, ndimage.generate_binary_structure(mask.ndim, mask.ndim))
            sizes = np.bincount(components.ravel())[1:]
            small = np.flatnonzero(sizes < mask.size * self.max_fraction) + 1
            if len(small):
                sample[c][components == np.random.choice(small)] = 0
        return data_dict


def _chosen_label_channels(data: np.ndarray, n_channels: int, p_per_sample: float, p_per_label: float):
    """(sample, channel, all label channels) for each sample chosen with `p_per_sample` and each of its last
    `n_channels` channels, in random order, chosen with `p_per_label`, as nnU-Net draws them."""
    channels = list(range(data.shape[1] - n_channels, data.shape[1]))
    for sample in data:
        if np.random.uniform() >= p_per_sample:
            continue
        np.random.shuffle(channels)
        for c in list(channels):
            if np.random.uniform() < p_per_label:
                yield sample, c, channels
