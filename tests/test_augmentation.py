import math
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.ndimage import binary_erosion, gaussian_filter

from autoseg.dataset.image_io import Geometry
from autoseg.preprocessing import store
from autoseg.preprocessing.properties import CaseProperties
from autoseg.training.augmentation import (
    DownsampleSegForDeepSupervision,
    MaskImageOutsideNonzero,
    make_loader,
    rotation_for_patch,
    shutdown_loader,
    training_patch_size,
    training_transforms,
    validation_transforms,
)
from autoseg.training.patch_sampling import PatchLoader

SCALES_3D = [[1.0, 1.0, 1.0], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]]


def case_properties(shape, locations) -> CaseProperties:
    """Properties of a case that needed no cropping or resampling, with its sampled class locations."""
    shape = tuple(int(s) for s in shape)
    geometry = Geometry((1.0,) * 3, (0.0,) * 3, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), shape)
    return CaseProperties(geometry, tuple((0, s) for s in shape), shape, shape, (1.0,) * 3, "test", locations)


def write_case(folder: Path, case_id: str, image: np.ndarray, seg: np.ndarray) -> None:
    """A case as preprocessing stores it (compressed arrays; int16 seg when a label exceeds 127)."""
    seg = seg.astype(np.int16 if seg.max() > 127 else np.int8)
    locations = {str(int(v)): np.argwhere(seg[0] == v)[:2000].tolist() for v in np.unique(seg) if v > 0}
    store.save_case(folder, case_id, image.astype(np.float32), seg, case_properties(seg.shape[1:], locations))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Two 36x50x36 cases (Hippocampus-sized) whose image is 10 * label: an off-centre, asymmetric object."""
    for i in range(2):
        seg = np.zeros((1, 36, 50, 36), np.int8)
        seg[0, 6 + i:28, 10:42, 4:24] = 1
        seg[0, 8:18, 12:24, 6:14] = 2
        write_case(tmp_path, f"c{i}", 10.0 * seg, seg)
    return tmp_path


def augmented_batches(folder, final, n, *, mirror_axes=(0, 1, 2), scales=None, seed=0):
    loader = PatchLoader(folder, ["c0", "c1"], training_patch_size(final), batch_size=4, seed=seed,
                         final_patch_size=final)
    transforms = training_transforms(final, mirror_axes=mirror_axes, deep_supervision_scales=scales)
    batches = make_loader(loader, transforms, workers=0, seed=seed)
    return [next(batches) for _ in range(n)]


@pytest.mark.parametrize("final, scales", [
    ([40, 56, 40], SCALES_3D),
    ([12, 48, 40], [[1.0, 1.0, 1.0], [1.0, 0.5, 0.5]]),  # a slab: augmented slice by slice
    ([48, 40], [[1.0, 1.0], [0.5, 0.5]]),
    ([40, 56, 40], None),
])
def test_training_batches_have_patch_and_deep_supervision_shapes_and_only_real_labels(folder, final, scales):
    for batch in augmented_batches(folder, final, 3, mirror_axes=(0, 1), scales=scales):
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


def test_rotation_follows_nnunets_rule_for_the_patch_shape():
    degrees = lambda patch: (math.degrees(rotation_for_patch(patch)[0][1]), rotation_for_patch(patch)[1])  # noqa: E731
    assert degrees([48, 40]) == pytest.approx((180, False))  # 2D, nearly square: any in-plane angle
    assert degrees([32, 96]) == pytest.approx((15, False))  # 2D, elongated (3 > 1.5)
    assert degrees([40, 56, 40]) == pytest.approx((30, False))  # 3D: +-30 degrees about every axis
    assert degrees([16, 48, 48]) == pytest.approx((30, False))  # ratio exactly 3 is not a slab
    assert degrees([12, 48, 40]) == pytest.approx((180, True))  # slab (48 / 12 > 3): about axis 0 only
    assert rotation_for_patch([40, 56, 40])[0][0] == pytest.approx(-math.pi / 6)


# nnU-Net v2.8.1's initial patch size (configure_rotation_dummyDA_mirroring_and_inital_patch_size, run once in its
# venv), and ours: the same, one voxel larger where read minus final patch would be odd. Before, autoseg read
# 106x112x104 for 40x56x40 (3.3 times the voxels of 74x80x64).
@pytest.mark.parametrize("final, nnunet, ours", [
    ([40, 56, 40], [73, 80, 64], [74, 80, 64]),
    ([12, 48, 40], [12, 56, 56], [12, 56, 56]),
    ([48, 40], [56, 56], [56, 56]),
    ([32, 96], [65, 112], [66, 112]),
    ([8, 8, 8], [12, 12, 12], [12, 12, 12]),
    ([7, 9, 11], [12, 15, 15], [13, 15, 15]),
])
def test_read_patch_is_nnunets_initial_patch_size_with_whole_margins(final, nnunet, ours):
    read = training_patch_size(final)
    assert read == ours
    assert all(0 <= r - n <= 1 and (r - f) % 2 == 0 for r, n, f in zip(read, nnunet, final))


@pytest.mark.parametrize("final", [[7, 9, 11], [40, 56, 40], [7, 9], [6, 8]])
def test_unrotated_final_patch_keeps_foreground_forced_at_the_volume_corners(tmp_path, final):
    """The final patch is the box patch_sampling aims at: forced voxels in the far corner stay inside it."""
    shape = (30, 30, 30) if len(final) == 3 else (3, 30, 30)
    seg = np.zeros((1, *shape), np.int8)
    seg[0, -1, -1, -1] = 1
    seg[0, 0, 0, 0] = 2
    image = np.arange(np.prod(shape), dtype=np.float32).reshape(1, *shape)
    write_case(tmp_path, "corner", image, seg)
    spatial = training_transforms(final, mirror_axes=None, deep_supervision_scales=None,
                                  scale_draw="batchgenerators").transforms[0]  # one SpatialTransform to set up
    spatial.p_rot_per_sample = spatial.p_scale_per_sample = 0.0
    read = training_patch_size(final)
    loader = PatchLoader(tmp_path, ["corner"], read, 4, oversample_foreground=1.0, seed=0, final_patch_size=final)
    for _ in range(5):
        raw = next(loader)
        out = spatial(data=raw["data"].copy(), seg=raw["seg"].copy())
        margin = tuple(slice((r - f) // 2, (r - f) // 2 + f) for r, f in zip(read, final))
        assert np.array_equal(out["data"], raw["data"][(slice(None), slice(None)) + margin])  # a plain crop
        for sample in out["seg"][:, 0]:
            assert (sample == 1).sum() + (sample == 2).sum() >= 1  # the forced label's voxel is in the patch


def test_samples_reaching_past_the_read_patch_get_label_minus_one_and_image_zero():
    final = [20, 24, 20]
    spatial = training_transforms(final, mirror_axes=None, deep_supervision_scales=None,
                                  scale_draw="batchgenerators").transforms[0]  # one SpatialTransform to set up
    spatial.p_scale_per_sample, spatial.scale = 1.0, (2.0, 2.0)  # zoom out far beyond the read patch
    read = training_patch_size(final)
    out = spatial(data=np.ones((2, 1, *read), np.float32), seg=np.zeros((2, 1, *read), np.int8))
    assert np.all(out["seg"][:, 0, 0, 0, 0] == -1) and np.all(out["data"][:, 0, 0, 0, 0] == 0)
    assert np.all(out["seg"][:, 0, 10, 12, 10] == 0) and np.all(out["data"][:, 0, 10, 12, 10] == pytest.approx(1))


def test_mask_sets_the_image_to_zero_exactly_where_the_label_is_minus_one_in_masked_channels_only():
    seg = np.zeros((2, 1, 4, 5, 6), np.int16)
    seg[:, :, :2] = -1
    seg[1, :, 3, 3, 3] = 300
    data = np.random.default_rng(0).normal(size=(2, 3, 4, 5, 6)).astype(np.float32) + 10
    out = MaskImageOutsideNonzero([0, 2])(data=data.copy(), seg=seg)["data"]
    outside = seg[:, 0] < 0
    assert np.all(out[:, 0][outside] == 0) and np.array_equal(out[:, 0][~outside], data[:, 0][~outside])
    assert np.all(out[:, 2][outside] == 0) and np.array_equal(out[:, 2][~outside], data[:, 2][~outside])
    assert np.array_equal(out[:, 1], data[:, 1])


@pytest.mark.parametrize("seed", range(4))
def test_augmented_batches_mask_after_the_intensity_transforms_and_keep_no_minus_one(seed):
    """Masked channel 0 is 0 exactly where the label was -1, after noise/brightness/...; channel 1 is untouched."""
    final = [8, 12, 10]
    seg = np.full((4, 1, *final), 300, np.int16)  # a label id above 127
    seg[:, :, :, :, :4] = -1
    seg[1, :, 2:6] = -1
    data = np.full((4, 2, *final), 5.0, np.float32)
    transforms = training_transforms(final, mirror_axes=(0, 1, 2), deep_supervision_scales=SCALES_3D,
                                     nonzero_mask_channels=[0], scale_draw="batchgenerators")
    spatial = transforms.transforms[0]
    spatial.p_rot_per_sample = spatial.p_scale_per_sample = 0.0  # keep every voxel's label known
    np.random.seed(seed)
    batch = transforms(data=data, seg=seg)
    image, target = batch["data"].numpy(), batch["target"][0].numpy()[:, 0]
    assert np.array_equal(image[:, 0] == 0, target == 0)
    assert np.all(image[:, 1] != 0)
    assert [t.dtype for t in batch["target"]] == [torch.int64] * 3
    assert all(set(torch.unique(t).tolist()) == {0, 300} for t in batch["target"])


def test_deep_supervision_downsampling_keeps_label_ids():
    seg = np.zeros((2, 1, 8, 8, 8), np.int16)
    seg[:, :, 2:6, 2:6, 2:6] = 3
    targets = DownsampleSegForDeepSupervision([[1, 1, 1], [0.5, 0.5, 0.5]])(seg=seg)["target"]
    assert targets[0] is seg and targets[1].shape == (2, 1, 4, 4, 4)
    assert set(np.unique(targets[1])) == {0, 3} and (targets[1] == 3).sum() == 2 * 8


def test_validation_transforms_do_not_change_the_patch(folder):
    loader = PatchLoader(folder, ["c0"], [40, 56, 40], batch_size=2, seed=0)
    raw = next(PatchLoader(folder, ["c0"], [40, 56, 40], batch_size=2, seed=0))
    batch = next(make_loader(loader, validation_transforms(SCALES_3D), workers=0, seed=0))
    assert np.array_equal(batch["data"].numpy(), raw["data"])
    # -1 (outside the volume or the non-zero mask) becomes background; every label is kept as it was
    assert np.array_equal(batch["target"][0].numpy(), np.maximum(raw["seg"], 0).astype(np.int64))
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
    transforms = training_transforms(final, mirror_axes=(0, 1, 2), deep_supervision_scales=SCALES_3D)
    batches = make_loader(loader, transforms, workers=2, seed=0)
    try:
        for _ in range(4):
            batch = next(batches)
            assert tuple(batch["data"].shape) == (2, 1, 40, 56, 40) and len(batch["target"]) == 3
            assert batch["target"][0].dtype == torch.int64
        assert len(multiprocessing.active_children()) == 2
    finally:
        shutdown_loader(batches)
    assert multiprocessing.active_children() == []


def _transform(final, kind, **options):
    if kind == "SpatialTransform":  # a single one to set up, not the uniform draw's pair
        options.setdefault("scale_draw", "batchgenerators")
    return next(t for t in training_transforms(final, mirror_axes=None, deep_supervision_scales=None,
                                               **options).transforms
                if type(t).__name__ == kind)


def test_blur_draws_a_sigma_per_axis_as_nnunet():
    """A blurred point spreads differently along the axes (nnU-Net 2.8.1 draws one sigma per axis)."""
    blur = _transform([16, 16, 16], "GaussianBlurTransform")
    blur.p_per_sample, blur.p_per_channel = 1.0, 1.0
    np.random.seed(0)
    spreads = []
    for _ in range(10):
        data = np.zeros((1, 1, 17, 17, 17), np.float32)
        data[0, 0, 8, 8, 8] = 1.0
        out = blur(data=data)["data"][0, 0]
        spreads.append([float(np.sum(out.sum(axis=tuple(a for a in range(3) if a != axis)) *
                                     (np.arange(17) - 8) ** 2)) for axis in range(3)])
    spreads = np.array(spreads)
    assert (spreads.max(axis=1) - spreads.min(axis=1) > 0.05).mean() > 0.5
    assert spreads.min() > 0.2 and spreads.max() < 1.1  # variances of sigmas in [0.5, 1], minus the sampling


def test_simulated_low_resolution_upsamples_linearly_without_overshoot():
    """Linear upsampling (nnU-Net 2.8.1) keeps each voxel within the range of the voxels around it; cubic
    upsampling of a noisy patch rings beyond it."""
    from scipy.ndimage import maximum_filter, minimum_filter

    low_res = _transform([32, 32], "SimulateLowResolutionTransform")
    low_res.p_per_sample, low_res.p_per_channel, low_res.zoom_range = 1.0, 1.0, (0.5, 0.5)
    data = np.random.default_rng(0).normal(size=(4, 1, 32, 32)).astype(np.float32)
    out = low_res(data=data.copy())["data"]
    assert not np.array_equal(out, data)
    window = (1, 1, 7, 7)
    assert (out >= minimum_filter(data, window) - 1e-5).all() and (out <= maximum_filter(data, window) + 1e-5).all()


# --- the U-Net paper's elastic deformation --------------------------------------------------------


def test_elastic_field_is_smooth_with_the_papers_spread_and_varies_per_draw():
    from autoseg.training.augmentation import GridElasticDeformation

    np.random.seed(0)
    deform = GridElasticDeformation(grid_points=3, sigma=10.0)
    fields = np.stack([deform.field((64, 80)) for _ in range(200)])  # (draws, axes, 64, 80)
    assert fields.shape == (200, 2, 64, 80)
    # at the grid nodes the displacement is the drawn vector: standard deviation 10 voxels
    assert fields[:, :, 0, 0].std() == pytest.approx(10.0, rel=0.15)
    assert fields[:, :, 32, 40].std() == pytest.approx(10.0, rel=0.15)  # the centre node (64-1)/2 ~ 31.5
    # smooth: neighbouring voxels move by nearly the same amount (a 3 x 3 grid over 64 voxels)
    assert np.abs(np.diff(fields, axis=-1)).max() < 3.0
    assert not np.allclose(fields[0], fields[1])


def test_elastic_deformation_moves_image_and_labels_together_and_fills_outside_as_the_spatial_transform():
    from autoseg.training.augmentation import GridElasticDeformation

    np.random.seed(3)
    seg = np.zeros((2, 1, 60, 60), np.float32)
    seg[:, :, 20:40, 15:45] = 1
    data = 10.0 * seg
    out = GridElasticDeformation(sigma=6.0)(data=data.copy(), seg=seg.copy())
    inside = out["seg"] >= 0
    assert not np.array_equal(out["seg"], seg)  # deformed
    assert np.all(np.isin(np.unique(out["seg"]), [-1, 0, 1]))  # labels by nearest neighbour, -1 outside
    # where the label says object the image is the object's intensity (cubic: approximately, away from edges)
    from scipy.ndimage import binary_erosion
    core = binary_erosion(out["seg"][0, 0] == 1, iterations=2)
    assert np.mean(out["data"][0, 0][core]) == pytest.approx(10.0, abs=0.2)
    assert np.abs(out["data"][0, 0][core] - 10.0).max() < 1.5  # cubic overshoot near the edge only
    assert np.all(out["data"][~inside] == 0)
    # probability 0 leaves the batch as it was
    untouched = GridElasticDeformation(p_per_sample=0.0)(data=data.copy(), seg=seg.copy())
    assert np.array_equal(untouched["seg"], seg)


def test_elastic_deformation_is_off_unless_asked_and_comes_first_when_asked():
    from autoseg.planning.plans import ElasticDeformation
    from autoseg.training.augmentation import GridElasticDeformation

    plain = training_transforms([48, 40], mirror_axes=None, deep_supervision_scales=None)
    assert not any(isinstance(t, GridElasticDeformation) for t in plain.transforms)
    assert plain.transforms[0].whole_range.do_elastic_deform is False
    asked = training_transforms([48, 40], mirror_axes=None, deep_supervision_scales=None,
                                elastic=ElasticDeformation(grid_points=4, sigma=5.0, probability=0.5))
    first = asked.transforms[0]
    assert isinstance(first, GridElasticDeformation)
    assert (first.grid_points, first.sigma, first.p_per_sample) == (4, 5.0, 0.5)


def test_the_train_flag_overrides_the_plans_elastic_setting():
    from dataclasses import replace

    from test_planning import HIPPOCAMPUS

    from autoseg.planning.planner import plan_experiment
    from autoseg.planning.plans import ElasticDeformation, Plans
    from autoseg.training.trainer import elastic_for

    plans = plan_experiment(HIPPOCAMPUS)
    config = plans.configuration("2d")
    assert elastic_for(config, None) is None and elastic_for(config, True) == ElasticDeformation()
    planned = replace(config, elastic_deformation=ElasticDeformation(sigma=4.0))
    assert elastic_for(planned, None).sigma == 4.0 and elastic_for(planned, True).sigma == 4.0
    assert elastic_for(planned, False) is None
    # the plans' record survives plans.json, and a bad value is named
    data = replace(plans, configurations={**plans.configurations, "2d": planned}).to_json()
    assert Plans.from_json(data).configuration("2d").elastic_deformation == ElasticDeformation(sigma=4.0)
    data["configurations"]["2d"]["elastic_deformation"]["probability"] = 2
    with pytest.raises(Exception, match="elastic_deformation.probability"):
        Plans.from_json(data)


@pytest.mark.parametrize("order, overshoots", [(1, False), (3, True)])
def test_augment_interpolation_linear_stays_within_the_image_range_and_cubic_rings(order, overshoots):
    """`train --augment-interpolation linear` (nnU-Net 2.8.1's) keeps rotated and scaled voxels within the
    image's range; cubic rings past it on a noisy patch."""
    spatial = _transform([32, 32], "SpatialTransform", image_order=order)
    spatial.p_rot_per_sample = spatial.p_scale_per_sample = 1.0
    data = np.random.default_rng(0).uniform(size=(4, 1, 32, 32)).astype(np.float32)
    seg = np.zeros((4, 1, 32, 32), np.float32)
    out = spatial(data=data.copy(), seg=seg)["data"]
    assert out.shape == data.shape
    beyond = (out < -1e-5) | (out > 1 + 1e-5)
    assert beyond.any() == overshoots


def test_training_interpolates_images_linearly_by_default_as_nnunet():
    """Without `--augment-interpolation` training augments as nnU-Net 2.8.1 does: images linear, labels nearest."""
    from autoseg.training.trainer import TrainingSettings

    assert TrainingSettings().augment_interpolation == "linear"
    spatial = _transform([32, 32], "SpatialTransform")
    assert (spatial.order_data, spatial.order_seg) == (1, 0)


@pytest.mark.parametrize("draw, below, mean", [("batchgenerators", 0.5, 1.025), ("uniform", 3 / 7, 1.05)])
def test_scale_draw_batchgenerators_halves_and_uniform_as_nnunet(monkeypatch, draw, below, mean):
    """The factors the spatial transform applies: batchgenerators' half below 1, or uniform in [0.7, 1.4] as
    nnU-Net 2.8.1 (below 1 with p 3/7, mean 1.05); each side uniform, within the range."""
    from batchgenerators.augmentations import spatial_transformations

    factors = []
    real_scale = spatial_transformations.scale_coords
    monkeypatch.setattr(spatial_transformations, "scale_coords",
                        lambda coords, sc: factors.append(float(sc)) or real_scale(coords, sc))
    transforms = training_transforms([8, 8], mirror_axes=None, deep_supervision_scales=None, scale_draw=draw)
    spatial = transforms.transforms[0]
    np.random.seed(1)
    data, seg = np.zeros((1000, 1, 8, 8), np.float32), np.zeros((1000, 1, 8, 8), np.float32)
    for _ in range(8):
        out = spatial(data=data.copy(), seg=seg.copy())
        assert out["data"].shape == data.shape and out["seg"].shape == seg.shape
    factors = np.array(factors)
    assert 0.2 * 8000 * 0.9 < len(factors) < 0.2 * 8000 * 1.1  # scaled with p 0.2 either way
    assert factors.min() >= 0.7 and factors.max() <= 1.4
    assert abs((factors < 1).mean() - below) < 0.04 and abs(factors.mean() - mean) < 0.015
    lower = factors[factors < 1]
    assert abs(np.median(lower) - 0.85) < 0.03  # uniform within [0.7, 1) on both rules


def test_scale_draw_is_checked_and_uniform_by_default_as_nnunet():
    from autoseg.training.trainer import TrainingError, TrainingSettings

    assert TrainingSettings().augment_scale_draw == "uniform"
    spatial = training_transforms([8, 8], mirror_axes=None, deep_supervision_scales=None).transforms[0]
    assert type(spatial).__name__ == "UniformScaleDraw"
    with pytest.raises(TrainingError, match="augment-scale-draw must be one of batchgenerators, uniform"):
        TrainingSettings(augment_scale_draw="gaussian")
    with pytest.raises(ValueError, match="scale_draw must be one of"):
        training_transforms([8, 8], mirror_axes=None, deep_supervision_scales=None, scale_draw="gaussian")


@pytest.mark.parametrize("rule, agrees", [("linear", True), ("nearest", False)])
def test_label_interpolation_linear_keeps_the_label_whose_interpolated_indicator_wins(rule, agrees):
    """`train --augment-label-interpolation linear` (nnU-Net 2.8.1's rule): a zoomed label map is 1 exactly where
    the label's indicator, interpolated linearly through the same transform as an image, exceeds one half; the
    nearest-neighbour rule (the default) departs from that along the boundaries."""
    from autoseg.training.augmentation import LABEL_INTERPOLATIONS

    spatial = _transform([48, 48], "SpatialTransform", label_order=LABEL_INTERPOLATIONS[rule])
    spatial.p_rot_per_sample, spatial.p_scale_per_sample, spatial.scale = 0.0, 1.0, (0.75, 0.9)  # zoom in: all inside
    rng = np.random.default_rng(3)
    blobs = gaussian_filter(rng.normal(size=(4, 1, 48, 48)), (0, 0, 3, 3)) > 0
    seg = blobs.astype(np.float32)
    np.random.seed(0)
    out = spatial(data=seg.copy(), seg=seg.copy())
    indicator, labels = out["data"], out["seg"]
    assert set(np.unique(labels)) <= {0.0, 1.0}
    decided = np.abs(indicator - 0.5) > 1e-6
    mismatched = int(((labels == 1) != (indicator > 0.5))[decided].sum())
    assert (mismatched == 0) == agrees, mismatched
    assert (labels == seg).mean() > 0.6  # zoomed, not scrambled


def test_label_interpolation_is_nearest_by_default_and_checked():
    from autoseg.training.trainer import TrainingError, TrainingSettings

    assert TrainingSettings().augment_label_interpolation == "nearest"
    assert _transform([8, 8], "SpatialTransform").order_seg == 0
    with pytest.raises(TrainingError, match="augment-label-interpolation must be one of nearest, linear"):
        TrainingSettings(augment_label_interpolation="cubic")
    with pytest.raises(ValueError, match="label_order must be one of"):
        training_transforms([8, 8], mirror_axes=None, deep_supervision_scales=None, label_order=3)


def test_label_interpolation_linear_invents_no_label_where_three_meet_and_pads_with_minus_one():
    """Rotated and zoomed out past the read patch, linear label interpolation yields only the labels present (three
    meeting at a point, as nnU-Net's argmax) and -1 beyond the read patch, as the nearest rule."""
    spatial = _transform([32, 32], "SpatialTransform", label_order=1)
    spatial.p_rot_per_sample = spatial.p_scale_per_sample = 1.0
    spatial.scale = (1.3, 1.4)
    yy, xx = np.mgrid[:32, :32]
    seg = np.where(xx < 16, 1, np.where(yy < 16, 2, 3)).astype(np.float32)[None, None].repeat(6, 0)
    np.random.seed(2)
    labels = spatial(data=np.zeros_like(seg), seg=seg.copy())["seg"]
    assert set(np.unique(labels)) <= {-1.0, 1.0, 2.0, 3.0}
    assert (labels == -1).any() and all((labels == v).any() for v in (1.0, 2.0, 3.0))
