import json
import math
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_erosion

from autoseg.training.augmentation import (DownsampleSegForDeepSupervision, make_loader, shutdown_loader,
                                           training_patch_size, training_transforms, validation_transforms)
from autoseg.training.patch_sampling import PatchLoader

SCALES_3D = [[1.0, 1.0, 1.0], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]]


def write_case(folder: Path, case_id: str, image: np.ndarray, seg: np.ndarray) -> None:
    seg = seg.astype(np.int8)
    np.save(folder / f"{case_id}.npy", image.astype(np.float32))
    np.save(folder / f"{case_id}_seg.npy", seg.astype(np.int8))
    locations = {str(int(v)): np.argwhere(seg[0] == v)[:2000].tolist() for v in np.unique(seg) if v > 0}
    (folder / f"{case_id}.json").write_text(json.dumps({"class_locations": locations}))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Two 36x50x36 cases (Hippocampus-sized) whose image is 10 * label: an off-centre, asymmetric object."""
    for i in range(2):
        seg = np.zeros((1, 36, 50, 36), np.int8)
        seg[0, 6 + i:28, 10:42, 4:24] = 1
        seg[0, 8:18, 12:24, 6:14] = 2
        write_case(tmp_path, f"c{i}", 10.0 * seg, seg)
    return tmp_path


def augmented_batches(folder, final, n, *, anisotropic=False, mirror_axes=(0, 1, 2), scales=None, seed=0):
    loader = PatchLoader(folder, ["c0", "c1"], training_patch_size(final, anisotropic=anisotropic), batch_size=4,
                         seed=seed, final_patch_size=final)
    transforms = training_transforms(final, anisotropic=anisotropic, mirror_axes=mirror_axes,
                                     deep_supervision_scales=scales)
    batches = make_loader(loader, transforms, num_workers=0, seed=seed)
    return [next(batches) for _ in range(n)]


@pytest.mark.parametrize("final, anisotropic, scales", [
    ([40, 56, 40], False, SCALES_3D),
    ([12, 48, 40], True, [[1.0, 1.0, 1.0], [1.0, 0.5, 0.5]]),
    ([48, 40], False, [[1.0, 1.0], [0.5, 0.5]]),
    ([40, 56, 40], False, None),
])
def test_training_batches_have_patch_and_deep_supervision_shapes_and_only_real_labels(folder, final, anisotropic,
                                                                                      scales):
    for batch in augmented_batches(folder, final, 3, anisotropic=anisotropic, mirror_axes=(0, 1), scales=scales):
        assert batch["data"].dtype == torch.float32 and tuple(batch["data"].shape) == (4, 1, *final)
        expected = [[math.ceil(p * f) for p, f in zip(final, s)] for s in (scales or [[1.0] * len(final)])]
        assert [list(t.shape[2:]) for t in batch["target"]] == expected
        for target in batch["target"]:
            assert target.dtype == torch.int64 and target.shape[:2] == (4, 1)
            assert set(torch.unique(target).tolist()) <= {0, 1, 2}


def labels_agree_with_image(data: np.ndarray, target: np.ndarray) -> bool:
    """Away from label borders (where blur/interpolation mix values) foreground is brighter than background."""
    for image, labels in zip(data[:, 0], target[:, 0]):
        inner_fg = binary_erosion(labels > 0, iterations=6)
        inner_bg = binary_erosion(labels == 0, iterations=6)
        if inner_fg.any() and inner_bg.any() and image[inner_fg].min() <= image[inner_bg].max():
            return False
    return True


def test_spatial_transforms_and_mirroring_move_image_and_labels_together(folder):
    batches = augmented_batches(folder, [40, 56, 40], 6, seed=3)
    assert all(labels_agree_with_image(b["data"].numpy(), b["target"][0].numpy()) for b in batches)
    # the check has teeth: labels mirrored without the image are caught
    assert not all(labels_agree_with_image(b["data"].numpy(), b["target"][0].numpy()[:, :, ::-1])
                   for b in batches)


def test_enlarged_patch_leaves_no_empty_border_after_rotation_and_scaling(tmp_path):
    final = [20, 24, 20]
    centre_only = np.zeros((1, 90, 90, 90))
    centre_only[0, 45, 45, 45] = 1  # forced patches are centred here, far from the volume border
    write_case(tmp_path, "big", np.ones((1, 90, 90, 90)), centre_only)
    spatial = training_transforms(final, anisotropic=False, mirror_axes=None,
                                  deep_supervision_scales=None).transforms[0]
    spatial.p_rot_per_sample = spatial.p_scale_per_sample = 1.0
    np.random.seed(0)
    enlarged = PatchLoader(tmp_path, ["big"], training_patch_size(final), 4, oversample_foreground=1.0, seed=0,
                           final_patch_size=final)
    plain = PatchLoader(tmp_path, ["big"], final, 4, oversample_foreground=1.0, seed=0)
    assert min(spatial(**next(enlarged))["data"].min() for _ in range(5)) > 0.99
    assert min(spatial(**next(plain))["data"].min() for _ in range(5)) < 0.5  # without enlargement: empty corners


def test_training_patch_size_enlarges_only_what_rotation_and_scaling_need():
    assert training_patch_size([40, 56, 40], (0.0, 0.0), (1.0, 1.0)) == [40, 56, 40]
    iso = training_patch_size([40, 56, 40])
    assert all(e > p and (e - p) % 2 == 0 for e, p in zip(iso, [40, 56, 40]))
    aniso = training_patch_size([12, 48, 40], anisotropic=True)
    assert aniso[0] == 12 and aniso[1] > 48 and aniso[2] > 40
    assert training_patch_size([32, 32], (-math.pi, math.pi), (1.0, 1.0)) == [46, 46]  # the diagonal


def test_deep_supervision_downsampling_keeps_label_ids():
    seg = np.zeros((2, 1, 8, 8, 8), np.int16)
    seg[:, :, 2:6, 2:6, 2:6] = 3
    targets = DownsampleSegForDeepSupervision([[1, 1, 1], [0.5, 0.5, 0.5]])(seg=seg)["target"]
    assert targets[0] is seg and targets[1].shape == (2, 1, 4, 4, 4)
    assert set(np.unique(targets[1])) == {0, 3} and (targets[1] == 3).sum() == 2 * 8


def test_validation_transforms_do_not_change_the_patch(folder):
    loader = PatchLoader(folder, ["c0"], [40, 56, 40], batch_size=2, seed=0)
    raw = next(PatchLoader(folder, ["c0"], [40, 56, 40], batch_size=2, seed=0))
    batch = next(make_loader(loader, validation_transforms(SCALES_3D), num_workers=0, seed=0))
    assert np.array_equal(batch["data"].numpy(), raw["data"])
    assert np.array_equal(batch["target"][0].numpy(), raw["seg"].astype(np.int64))
    assert [tuple(t.shape[2:]) for t in batch["target"]] == [(40, 56, 40), (20, 28, 20), (10, 14, 10)]


def test_same_seed_gives_the_same_augmented_batches(folder):
    first = augmented_batches(folder, [40, 56, 40], 3, seed=7)
    again = augmented_batches(folder, [40, 56, 40], 3, seed=7)
    assert all(torch.equal(a["data"], b["data"]) and torch.equal(a["target"][0], b["target"][0])
               for a, b in zip(first, again))


def test_background_workers_yield_batches_and_shut_down(folder):
    final = [40, 56, 40]
    loader = PatchLoader(folder, ["c0", "c1"], training_patch_size(final), batch_size=2, seed=0,
                         final_patch_size=final)
    transforms = training_transforms(final, anisotropic=False, mirror_axes=(0, 1, 2),
                                     deep_supervision_scales=SCALES_3D)
    batches = make_loader(loader, transforms, num_workers=2, seed=0)
    try:
        for _ in range(4):
            batch = next(batches)
            assert tuple(batch["data"].shape) == (2, 1, 40, 56, 40) and len(batch["target"]) == 3
            assert batch["target"][0].dtype == torch.int64
        assert len(multiprocessing.active_children()) == 2
    finally:
        shutdown_loader(batches)
    assert multiprocessing.active_children() == []
