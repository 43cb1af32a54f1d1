"""Builders for tiny synthetic datasets (Decathlon and nnU-Net v2 layouts) and copies of real ones.

Images are written with SimpleITK directly, not through autoseg, so the readers are tested against
files made by someone else's writer.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
HIPPOCAMPUS = SHARED_DATASETS / "Task04_Hippocampus"
BRATS = SHARED_DATASETS / "Dataset002_BraTS2013Subset"
LABELS = {0: "background", 1: "liver", 2: "tumour"}


def write_sitk(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0),
               direction=None) -> Path:
    """Write (Z, Y, X) or (C, Z, Y, X) with spacing in array-axis order (z, y, x); origin/direction in sitk's
    (x, y, z)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array), isVector=False)
    dim = image.GetDimension()
    image.SetSpacing(tuple(float(s) for s in reversed(spacing)) + (1.0,) * (dim - len(spacing)))
    image.SetOrigin(tuple(map(float, origin)) + (0.0,) * (dim - len(origin)))
    if direction is not None:
        d = np.eye(dim)
        d[:3, :3] = np.asarray(direction, dtype=float).reshape(3, 3)
        image.SetDirection(tuple(d.ravel()))
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def synthetic_case(shape=(12, 16, 14), channels=1, kind="mri", margin=2, seed=0,
                   labels=(1, 2)) -> tuple[np.ndarray, np.ndarray]:
    """(C, Z, Y, X) float32 image and (Z, Y, X) uint8 label with a blob per label.

    MRI-like: zero outside a box `margin` voxels in from every face (so cropping removes it),
    positive arbitrary-scale intensities inside. CT-like: Hounsfield units, air (-1000) outside
    the body, soft tissue around 40, a few bright bone voxels (outliers for the clip).
    """
    rng = np.random.default_rng(seed)
    z, y, x = shape
    inside = tuple(slice(margin, n - margin) for n in shape)
    label = np.zeros(shape, np.uint8)
    cz, cy, cx = z // 2, y // 2, x // 2
    zz, yy, xx = np.ogrid[:z, :y, :x]
    r = max(2, min(shape) // 2 - margin - 1)
    ball = ((zz - cz) / r) ** 2 + ((yy - cy) / r) ** 2 + ((xx - cx) / r) ** 2 <= 1
    label[ball] = labels[0]
    if len(labels) > 1:
        label[ball & (xx > cx)] = labels[1]
    image = np.zeros((channels, *shape), np.float32)
    for c in range(channels):
        if kind == "ct":
            image[c] = -1000.0
            image[c][inside] = 40 + 10 * rng.standard_normal([n - 2 * margin for n in shape])
            image[c][label > 0] += 60
            bone = rng.random(shape) < 0.01
            image[c][bone & (label == 0)] = 1500
        else:
            scale = 100.0 * (c + 1) * (1 + seed % 3)
            image[c][inside] = scale * (1 + 0.2 * rng.random([n - 2 * margin for n in shape]))
            image[c][label > 0] += scale
    return image, label


def _case_id(i: int) -> str:
    return f"case_{i:03d}"


@pytest.fixture
def make_decathlon(tmp_path):
    """Factory: a Decathlon-layout dataset (multi-channel images as one 4D file); returns its root."""

    def make(root: Path | str | None = None, n_cases=3, shape=(12, 16, 14), spacing=(1.0, 1.0, 1.0),
             channels=("MRI",), kind="mri", labels=LABELS, spacings=None, shapes=None, margin=2) -> Path:
        root = Path(root) if root else tmp_path / "decathlon"
        training = []
        for i in range(n_cases):
            case_shape = shapes[i] if shapes else shape
            case_spacing = spacings[i] if spacings else spacing
            image, label = synthetic_case(case_shape, len(channels), kind, margin, seed=i)
            cid = _case_id(i)
            write_sitk(root / "imagesTr" / f"{cid}.nii.gz", image if len(channels) > 1 else image[0], case_spacing)
            write_sitk(root / "labelsTr" / f"{cid}.nii.gz", label, case_spacing)
            training.append({"image": f"./imagesTr/{cid}.nii.gz", "label": f"./labelsTr/{cid}.nii.gz"})
        meta = {"name": "Synthetic", "modality": {str(i): n for i, n in enumerate(channels)},
                "labels": {str(k): v for k, v in labels.items()}, "numTraining": n_cases, "training": training}
        (root / "dataset.json").write_text(json.dumps(meta, indent=2))
        return root

    return make


@pytest.fixture
def make_nnunetv2(tmp_path):
    """Factory: an nnU-Net v2-layout dataset (one file per channel); returns its root."""

    def make(root: Path | str | None = None, n_cases=3, shape=(12, 16, 14), spacing=(1.0, 1.0, 1.0),
             channels=("T1", "T2"), kind="mri", labels=LABELS, spacings=None, margin=2,
             file_ending=".nii.gz") -> Path:
        root = Path(root) if root else tmp_path / "nnunetv2"
        for i in range(n_cases):
            case_spacing = spacings[i] if spacings else spacing
            image, label = synthetic_case(shape, len(channels), kind, margin, seed=i)
            cid = _case_id(i)
            for c in range(len(channels)):
                write_sitk(root / "imagesTr" / f"{cid}_{c:04d}{file_ending}", image[c], case_spacing)
            write_sitk(root / "labelsTr" / f"{cid}{file_ending}", label, case_spacing)
        meta = {"name": "Synthetic", "channel_names": {str(i): n for i, n in enumerate(channels)},
                "labels": {v: k for k, v in labels.items()}, "numTraining": n_cases, "file_ending": file_ending}
        (root / "dataset.json").write_text(json.dumps(meta, indent=2))
        return root

    return make


@pytest.fixture
def hippocampus_subset(tmp_path) -> Path:
    """The first 4 real Hippocampus cases in their own Decathlon dataset (skips when the data is absent)."""
    if not (HIPPOCAMPUS / "dataset.json").is_file():
        pytest.skip(f"{HIPPOCAMPUS} not available")
    meta = json.loads((HIPPOCAMPUS / "dataset.json").read_text())
    root = tmp_path / "Hippocampus4"
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = meta["training"][:4]
    for entry in training:
        for key in ("image", "label"):
            shutil.copy2(HIPPOCAMPUS / entry[key], root / entry[key])
    meta.update(training=training, numTraining=len(training), test=[])
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    return root


@pytest.fixture
def hide_package(monkeypatch):
    """Call with a package name: from then on, importing it (or its submodules) fails as if not installed."""
    import builtins

    real_import = builtins.__import__
    hidden: list[str] = []

    def guarded_import(name, *args, **kwargs):
        if any(name == h or name.startswith(h + ".") for h in hidden):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", guarded_import)
    return hidden.append
