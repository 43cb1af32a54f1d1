"""Preprocessing: crop, non-zero mask, normalize, resample, store; and the way back to the original grid.

Plans are built by hand in plans format 2 (see the contract), so these tests do not depend on the planner.
"""

import hashlib
from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage
from skimage.transform import resize

from autoseg.dataset.image_io import Geometry
from autoseg.dataset.layout import load_dataset, read_case_image, read_case_label
from autoseg.planning.plans import ChannelNormalization, PlanError, Plans
from autoseg.preprocessing import preprocess as preprocess_module
from autoseg.preprocessing import store
from autoseg.preprocessing.cropping import crop, nonzero_mask, uncrop
from autoseg.preprocessing.normalization import NormalizationError, normalize
from autoseg.preprocessing.preprocess import PreprocessingError, preprocess_case, preprocess_dataset, preprocessing_key
from autoseg.preprocessing.resampling import (
    new_shape_for,
    resample_image,
    resample_label,
    resample_probabilities,
    separate_axis_for,
)
from autoseg.workspace import preprocessed_dir

ANISO_SPACINGS = [(0.875, 0.875, 4.0), (1.0, 1.0, 5.0), (1.125, 1.125, 6.0)]  # thick axis stored last
IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


def _plans(**kwargs) -> Plans:
    return Plans.from_json(_plans_json(**kwargs))


def _norm(channel, scheme, use_nonzero_mask=False, **kwargs) -> ChannelNormalization:
    return ChannelNormalization(channel, f"ch{channel}", scheme, use_nonzero_mask, **kwargs)


def _plans_json(spacing=(1.0, 1.0, 1.0), schemes=("zscore",), labels=(0, 1, 2), transpose=(0, 1, 2),
                spacing_2d=None, use_nonzero_mask=False) -> dict:
    """plans.json (format 2) for tests: 3d_fullres at `spacing` (network axis order), optionally a 2d
    configuration at in-plane `spacing_2d`; per channel a scheme name or a full scheme dict."""
    normalization = []
    for c, s in enumerate(schemes):
        entry = {"channel": c, "name": f"ch{c}", "scheme": s, "use_nonzero_mask": use_nonzero_mask and s == "zscore",
                 "reason": "test"}
        normalization.append({**entry, **s, "channel": c} if isinstance(s, dict) else entry)

    def config(identifier, sp):
        return {"data_identifier": identifier, "spacing": list(sp), "median_shape": [8] * len(sp),
                "patch_size": [8] * len(sp), "batch_size": 2, "batch_dice": False, "features_per_stage": [4, 8],
                "kernel_sizes": [[3] * len(sp)] * 2, "strides": [[1] * len(sp), [2] * len(sp)],
                "n_conv_per_stage": 2, "estimated_memory_gb": 0.1, "reasons": {}}

    configurations = {"3d_fullres": config("3d_fullres", spacing)}
    if spacing_2d is not None:
        configurations["2d"] = config("2d", spacing_2d)
    return {
        "format_version": 2, "dataset_name": "test", "channel_names": [f"ch{c}" for c in range(len(schemes))],
        "labels": {str(k): f"label{k}" for k in labels}, "default_configuration": "3d_fullres",
        "transpose_forward": list(transpose), "transpose_backward": [int(i) for i in np.argsort(transpose)],
        "memory_budget_gb": 8.0, "normalization": normalization,
        "resampling": {"image_order": 3, "label_order": 1, "thick_axis_order": 0, "anisotropy_threshold": 3.0,
                       "reason": "test"},
        "reasons": {}, "configurations": configurations,
    }


def _geometry(spacing, shape) -> Geometry:
    return Geometry(tuple(map(float, spacing)), (0.0, 0.0, 0.0), IDENTITY, tuple(shape))


def _back_to_original(seg, properties, plans, num_classes):
    """Preprocessed labels -> one-hot (-1 counted as background) -> resample -> inverse transpose -> uncrop."""
    seg = np.where(seg < 0, 0, seg)
    onehot = np.stack([seg[0] == k for k in range(num_classes)]).astype(np.float32)
    forward = plans.transpose_forward
    cropped_shape = [properties.shape_after_crop[a] for a in forward]
    original_spacing = [properties.original_geometry.spacing[a] for a in forward]
    axis = separate_axis_for(properties.spacing, original_spacing, plans.resampling.anisotropy_threshold)
    probabilities = resample_probabilities(onehot, tuple(cropped_shape), separate_axis=axis)
    probabilities = probabilities.transpose(0, *(a + 1 for a in plans.transpose_backward))
    fill = np.eye(num_classes, dtype=np.float32)[0]  # outside the crop box: background
    full = uncrop(probabilities, properties.nonzero_bbox, tuple(properties.original_geometry.shape), fill)
    return full.argmax(0)


def _dice(a, b, label):
    a, b = a == label, b == label
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def _file_states(root):
    return {p: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def _copied_slices(out: np.ndarray, source: np.ndarray) -> list[int]:
    """For each slice along axis 0 of `out`, the index of the `source` slice it is an exact copy of."""
    found = []
    for k in range(out.shape[0]):
        matches = [i for i in range(source.shape[0]) if np.array_equal(out[k], source[i])]
        assert matches, f"output slice {k} is not a copy of any input slice"
        found.append(matches[0])
    return found


# --- cropping and the non-zero mask ---------------------------------------------------------------

def test_crop_keeps_the_nonzero_box_and_uncrop_restores_the_array():
    image = np.zeros((2, 6, 7, 8), np.float32)
    image[1, 1:4, 2:6, 3:5] = 1.5
    bbox = ((1, 4), (2, 6), (3, 5))
    cropped = crop(image, bbox)
    assert cropped.shape == (2, 3, 4, 2) and (cropped[1] == 1.5).all()
    np.testing.assert_array_equal(uncrop(cropped, bbox, (6, 7, 8)), image)
    filled = uncrop(np.zeros((2, 3, 4, 2), np.float32), bbox, (6, 7, 8), fill=np.array([1.0, 0.0], np.float32))
    assert filled[0].sum() == 6 * 7 * 8 - 3 * 4 * 2 and filled[1].sum() == 0


RING_BBOX = ((0, 6), (1, 15), (1, 14))


def _ring_case():
    """A 2-channel image whose data is a disc (channel 1 adds a voxel beside it), with an enclosed zero hole
    and a zero notch open to the outside; labels include foreground in the hole and in the outside zeros.
    Its non-zero box is RING_BBOX."""
    shape = (6, 16, 16)
    image = np.zeros((2, *shape), np.float32)
    _, yy, xx = np.ogrid[:6, :16, :16]
    r2 = (yy - 8) ** 2 + (xx - 8) ** 2
    disc = np.broadcast_to(r2 <= 36, shape)  # y and x in 2..14
    image[0][disc] = np.random.default_rng(0).uniform(100, 200, int(disc.sum()))
    image[0, 2:4][np.broadcast_to(r2 <= 4, (2, 16, 16))] = 0  # hole enclosed in 3D (x 6..10 on row y=8, z 2..3)
    image[0][:, 8, 12:] = 0  # notch cutting the disc's edge (x 12..14): open to the outside
    image[1, :, 1, 1] = 50.0  # the second channel alone makes these voxels data
    label = np.zeros(shape, np.uint8)
    label[:, 8, 7:10] = 1  # lies in the hole
    label[2, 1, 8] = 2  # foreground in the outside zeros keeps its label
    return image, label


def test_seg_is_minus_one_exactly_outside_the_hole_filled_nonzero_mask_of_all_channels():
    image, label = _ring_case()
    plans = _plans(schemes=("noNorm", "noNorm"))
    data, seg, properties = preprocess_case(image, label, _geometry((1, 1, 1), image.shape[1:]), plans, "3d_fullres")
    assert properties.nonzero_bbox == RING_BBOX  # channel 1's voxel widens the box
    box = tuple(slice(lo, hi) for lo, hi in RING_BBOX)
    expected_mask = ndimage.binary_fill_holes(np.any(image != 0, axis=0))[box]
    assert seg.shape == (1, 6, 14, 13) and seg.dtype == np.int8
    np.testing.assert_array_equal(seg[0] == -1, ~expected_mask & (label[box] == 0))
    y, x = 8 - 1, -1  # file row y=8 and column offset in the cropped arrays
    assert (seg[0][2:4, y, x + 6:x + 11] >= 0).all()  # the enclosed hole is inside the mask
    assert (seg[0][:, y, x + 7:x + 10] == 1).all()  # and its label is kept
    assert (seg[0][:, y, x + 12:x + 14] == -1).all()  # the notch open to the outside is not inside
    assert seg[0][2, 0, x + 8] == 2  # foreground is never overwritten by -1
    assert seg[0][0, 0, 0] == 0  # channel 1's data counts too
    assert set(properties.class_locations) == {"1", "2"}  # -1 is no class


def test_zscore_in_the_mask_is_the_same_with_and_without_a_label():
    image, label = _ring_case()
    plans = _plans(schemes=("zscore", "zscore"), use_nonzero_mask=True)
    geometry = _geometry((1, 1, 1), image.shape[1:])
    with_label, _, _ = preprocess_case(image, label, geometry, plans, "3d_fullres")
    for_prediction, seg, _ = preprocess_case(image, None, geometry, plans, "3d_fullres")
    assert seg is None
    np.testing.assert_array_equal(with_label, for_prediction)
    mask = nonzero_mask(crop(image, RING_BBOX))
    inside = with_label[0][mask]
    assert abs(float(inside.mean())) < 1e-5 and float(inside.std()) == pytest.approx(1.0, abs=1e-5)
    assert (with_label[0][~mask] == 0).all()
    assert (with_label[0][2:4, 7, 7] < 0).all()  # the hole's zeros are normalized with the inside, not left at 0


def test_an_all_zero_image_is_all_data():
    image = np.zeros((1, 4, 5, 6), np.float32)
    label = np.zeros((4, 5, 6), np.uint8)
    data, seg, properties = preprocess_case(image, label, _geometry((1, 1, 1), (4, 5, 6)), _plans(), "3d_fullres")
    assert data.shape == (1, 4, 5, 6) and (seg == 0).all() and np.isfinite(data).all()


# --- normalization -------------------------------------------------------------------------------

def test_zscore_inside_the_nonzero_mask_leaves_the_outside_at_zero():
    image = np.zeros((1, 6, 6, 6), np.float32)
    image[0, 1:5, 1:5, 1:5] = np.random.default_rng(1).normal(500, 80, (4, 4, 4))
    mask = image[0] != 0
    normalize(image, mask, [_norm(0, "zscore", use_nonzero_mask=True)])
    assert abs(image[0][mask].mean()) < 1e-5 and image[0][mask].std() == pytest.approx(1.0, abs=1e-5)
    assert (image[0][~mask] == 0).all()


def test_each_normalization_scheme():
    rng = np.random.default_rng(2)
    raw = rng.uniform(10, 250, (5, 4, 5, 6)).astype(np.float32)
    raw[4] = 7.0  # a constant channel
    schemes = [_norm(0, "ct", clip=(50.0, 200.0), mean=100.0, std=25.0), _norm(1, "zscore", use_nonzero_mask=False),
               _norm(2, "noNorm"), _norm(3, "rescale_to_0_1"), _norm(4, "rgb_to_0_1")]
    out = normalize(raw.copy(), np.ones(raw.shape[1:], bool), schemes)
    np.testing.assert_allclose(out[0], (np.clip(raw[0], 50, 200) - 100) / 25, rtol=1e-6)
    assert abs(float(out[1].mean())) < 1e-5 and float(out[1].std()) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_array_equal(out[2], raw[2])
    assert out[3].min() == 0.0 and out[3].max() == pytest.approx(1.0)
    np.testing.assert_allclose(out[3], (raw[3] - raw[3].min()) / (raw[3].max() - raw[3].min()), rtol=1e-5)
    np.testing.assert_allclose(out[4], 7.0 / 255, rtol=1e-6)
    constant = normalize(np.full((1, 2, 2, 2), 3.0, np.float32), np.ones((2, 2, 2), bool),
                         [_norm(0, "rescale_to_0_1")])
    assert (constant == 0).all()  # max == min: no division by zero


def test_normalization_refuses_what_it_cannot_do():
    mask = np.ones((2, 2, 2), bool)
    with pytest.raises(NormalizationError, match=r"\[0, 255\]"):
        normalize(np.full((1, 2, 2, 2), 300.0, np.float32), mask, [_norm(0, "rgb_to_0_1")])
    with pytest.raises(NormalizationError, match="unknown normalization scheme 'minmax'"):
        normalize(np.ones((1, 2, 2, 2), np.float32), mask, [_norm(0, "minmax")])
    with pytest.raises(NormalizationError, match="2 channel"):
        normalize(np.ones((2, 2, 2, 2), np.float32), mask, [_norm(0, "noNorm")])


def test_a_bad_rgb_case_is_named_when_preprocessing_a_dataset(make_decathlon, tmp_path):
    dataset = load_dataset(make_decathlon(n_cases=1, kind="ct"))  # Hounsfield units, far outside 0..255
    with pytest.raises(PreprocessingError, match="case_000.*255"):
        preprocess_dataset(dataset, _plans(schemes=("rgb_to_0_1",)), tmp_path / "ws", progress=False)


def test_ct_channel_is_clipped_to_the_planned_range(make_nnunetv2):
    dataset = load_dataset(make_nnunetv2(channels=("CT",), kind="ct", n_cases=1))
    scheme = {"scheme": "ct", "clip": [0.0, 120.0], "mean": 60.0, "std": 20.0}
    image, geometry = read_case_image(dataset.cases[0], 1)
    assert image.max() > 120 and image.min() < 0  # bone and air lie outside the range
    data, seg, _ = preprocess_case(image, read_case_label(dataset.cases[0]), geometry, _plans(schemes=(scheme,)),
                                   "3d_fullres")
    assert data.min() == pytest.approx(-3.0, abs=1e-5) and data.max() == pytest.approx(3.0, abs=1e-5)
    assert (seg >= 0).all()  # air is -1000, not zero: every voxel holds data


# --- resampling ----------------------------------------------------------------------------------

def test_separate_axis_is_decided_by_the_current_grid_first_then_the_target():
    assert separate_axis_for((5.0, 0.7, 0.7), (1.0, 1.0, 1.0), 3.0) == 0  # thick case to isotropic target
    assert separate_axis_for((0.7, 0.7, 0.7), (5.0, 0.7, 0.7), 3.0) == 0  # thin case to thick target
    assert separate_axis_for((0.7, 0.7, 5.0), (0.7, 5.0, 0.7), 3.0) == 2  # the current grid decides first
    assert separate_axis_for((1.0, 1.0, 1.0), (1.5, 1.0, 1.0), 3.0) is None  # neither is anisotropic
    assert separate_axis_for((0.24, 1.25, 1.25), (5.0, 1.0, 1.0), 3.0) is None  # two coarsest axes: none
    assert separate_axis_for((2.0, 0.7, 0.7), (2.0, 0.7, 0.7), 3.0) is None  # ratio 2.86 <= 3


def _nnunet_resize(volume: np.ndarray, shape: tuple[int, ...], order: int = 3, dtype=np.float32) -> np.ndarray:
    """The reference: scikit-image's resize as nnU-Net v2 calls it (edge mode, no anti-aliasing, clipped
    to the input's range)."""
    return resize(volume.astype(np.float64), shape, order=order, mode="edge", anti_aliasing=False).astype(dtype)


def _reference_label_resize(label: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """nnU-Net v2's label rule written plainly: every label's mask resized linearly, the largest wins;
    an exact tie goes to the nearest-neighbour label if it is among the tied, else to the lowest."""
    values = np.unique(label)
    weights = np.stack([_nnunet_resize(label == v, shape, order=1, dtype=np.float64) for v in values])
    top = weights.max(0)
    nearest = _nnunet_resize(label.astype(np.float32), shape, order=0)
    out = values[weights.argmax(0)].astype(label.dtype)  # argmax takes the first, the lowest, of tied labels
    for i, v in enumerate(values):
        settles = (nearest == v) & (weights[i] == top) & (top > 0)
        out[settles] = v
    return out


def test_cubic_resampling_is_scikit_images_resize_clipped_to_the_input_range():
    """A bright square on a constant background: cubic splines ring below the background, and the
    result is clipped to the input's range as nnU-Net's resize does, so both give the same values."""
    image = np.zeros((1, 6, 10, 10), np.float32)
    image[0, 2:4, 3:7, 3:7] = 5.0
    for shape in [(9, 17, 13), (4, 6, 7)]:
        out = resample_image(image, shape, order=3)
        assert out.min() >= 0.0 and out.max() <= 5.0
        np.testing.assert_allclose(out[0], _nnunet_resize(image[0], shape), rtol=1e-5, atol=1e-5)
    unclipped = ndimage.zoom(image[0], np.divide((9, 17, 13), image.shape[1:]), order=3, mode="nearest", grid_mode=True)
    assert unclipped.min() < -0.1  # the ringing that clipping removes


def test_label_resampling_is_nnunets_rule_ties_included():
    rng = np.random.default_rng(11)
    label = ndimage.median_filter(rng.integers(-1, 4, (8, 12, 12)), size=3).astype(np.int8)  # blobs, -1 included
    for shape in [(13, 19, 7), (5, 9, 20), (16, 24, 24), (4, 6, 6)]:  # x2 and /2 make exact ties at every boundary
        np.testing.assert_array_equal(resample_label(label, shape, 1), _reference_label_resize(label, shape))


def test_label_resampling_matches_batchgenerators_resize_segmentation_that_nnunet_calls():
    import inspect

    from batchgenerators.augmentations import utils as bg_utils
    if "seg_tiebreak" not in inspect.signature(bg_utils.resize_segmentation).parameters:
        pytest.skip("batchgenerators before 0.25.5 thresholds labels at 0.5 (nnU-Net's older rule)")
    rng = np.random.default_rng(12)
    label = ndimage.median_filter(rng.integers(0, 5, (10, 14, 9)), size=3).astype(np.int16)
    for shape in [(20, 28, 18), (7, 11, 13), (10, 7, 27)]:
        np.testing.assert_array_equal(resample_label(label, shape, 1),
                                      bg_utils.resize_segmentation(label, shape, order=1))


def test_mixed_thickness_cases_get_nearest_along_z_only_when_thick():
    """One plan (1.0, 0.7, 0.7) for a 5 mm and a 0.7 mm case: the 5 mm case is copied slice by slice along z,
    the 0.7 mm case gets ordinary 3D cubic resampling."""
    plans = _plans(spacing=(1.0, 0.7, 0.7), schemes=("noNorm",))
    rng = np.random.default_rng(3)
    thick = rng.uniform(1, 2, (1, 4, 6, 6)).astype(np.float32)
    label = rng.integers(0, 3, (4, 6, 6)).astype(np.uint8)
    data, seg, properties = preprocess_case(thick, label, _geometry((5.0, 0.7, 0.7), (4, 6, 6)), plans, "3d_fullres")
    assert data.shape[1:] == seg.shape[1:] == new_shape_for((4, 6, 6), (5.0, 0.7, 0.7), (1.0, 0.7, 0.7)) == (20, 6, 6)
    assert _copied_slices(data[0], thick[0]) == [i // 5 for i in range(20)]  # nearest neighbour, in order
    assert _copied_slices(seg[0], label.astype(np.int8)) == [i // 5 for i in range(20)]

    thin = rng.uniform(1, 2, (1, 14, 6, 6)).astype(np.float32)
    data, _, _ = preprocess_case(thin, None, _geometry((0.7, 0.7, 0.7), (14, 6, 6)), plans, "3d_fullres")
    assert data.shape[1:] == (10, 6, 6)
    cubic = _nnunet_resize(thin[0], (10, 6, 6))
    np.testing.assert_allclose(data[0], cubic, rtol=1e-6, atol=1e-6)


def test_a_thin_case_to_a_thick_target_keeps_whole_input_slices():
    plans = _plans(spacing=(5.0, 0.7, 0.7), schemes=("noNorm",))
    image = np.random.default_rng(4).uniform(1, 2, (1, 50, 5, 5)).astype(np.float32)
    data, _, properties = preprocess_case(image, None, _geometry((0.7, 0.7, 0.7), (50, 5, 5)), plans, "3d_fullres")
    assert data.shape[1:] == (7, 5, 5) and properties.shape_after_resampling == (7, 5, 5)
    picked = _copied_slices(data[0], image[0])
    assert picked == sorted(picked) and len(set(picked)) == 7
    centres = [(i + 0.5) * 0.7 for i in picked]  # each copied slice is the one nearest the output slice's centre
    assert all(abs(c - (k + 0.5) * 5.0) <= 0.35 + 1e-9 for k, c in enumerate(centres))


def test_in_plane_resampling_with_a_separate_axis_is_cubic_slice_by_slice():
    rng = np.random.default_rng(5)
    image = rng.uniform(0, 1, (1, 3, 8, 8)).astype(np.float32)
    out = resample_image(image, (6, 12, 12), order=3, separate_axis=0, thick_axis_order=0)
    per_slice = np.stack([_nnunet_resize(s, (12, 12)) for s in image[0]])
    np.testing.assert_allclose(out[0], per_slice[[0, 0, 1, 1, 2, 2]], rtol=1e-6, atol=1e-6)


def test_resampled_shapes_match_new_shape_for_with_and_without_a_separate_axis():
    rng = np.random.default_rng(6)
    image = rng.uniform(0, 1, (2, 7, 9, 11)).astype(np.float32)
    label = rng.integers(-1, 3, (7, 9, 11)).astype(np.int8)
    for spacing, target in [((3.3, 0.8, 0.8), (1.0, 0.75, 0.75)), ((0.7, 0.7, 0.7), (5.0, 0.9, 0.9)),
                            ((1.0, 1.0, 1.0), (1.3, 0.6, 1.7)), ((0.8, 0.8, 4.5), (1.0, 1.0, 1.0))]:
        shape = new_shape_for(image.shape[1:], spacing, target)
        axis = separate_axis_for(spacing, target, 3.0)
        assert resample_image(image, shape, 3, axis, 0).shape == (2, *shape)
        resampled_label = resample_label(label, shape, 1, axis, 0)
        assert resampled_label.shape == shape and set(np.unique(resampled_label)) <= {-1, 0, 1, 2}
        assert resample_probabilities(image, shape, 1, separate_axis=axis).shape == (2, *shape)
    assert new_shape_for((3, 4, 5), (1.0, 1.0, 1.0), (100.0, 1.0, 1.0)) == (1, 4, 5)  # never 0 voxels


def test_label_resampling_never_creates_new_label_values():
    rng = np.random.default_rng(0)
    label = rng.choice(np.array([-1, 0, 2, 5], np.int16), size=(9, 10, 11), p=[0.2, 0.3, 0.3, 0.2])
    for shape in [(18, 20, 22), (5, 7, 6), (9, 25, 4)]:
        for axis in (None, 0, 2):
            out = resample_label(label, shape, 1, axis, 0)
            assert out.shape == shape and out.dtype == label.dtype
            assert set(np.unique(out)) <= {-1, 0, 2, 5}
    # A linear interpolation of the raw values would have made 1s, 3s and 4s.
    naive = np.rint(resample_image(label[None].astype(np.float32), (18, 20, 22), order=1)[0])
    assert set(np.unique(naive)) - {-1, 0, 2, 5}


def test_minus_one_resamples_like_any_other_label():
    label = np.zeros((4, 8, 8), np.int16)
    label[:, :, :3] = -1
    label[:, 3:5, 4:7] = 1
    out = resample_label(label, (4, 16, 16), 1)
    np.testing.assert_array_equal(out, np.repeat(np.repeat(label, 2, axis=1), 2, axis=2))


def test_probabilities_follow_the_separate_axis_rule_back_to_the_original_grid():
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(3, 9, 6, 6)).astype(np.float32)
    probabilities = np.exp(logits) / np.exp(logits).sum(0)
    network_spacing, original_spacing = (1.0, 0.7, 0.7), (5.0, 0.7, 0.7)  # a 5 mm case preprocessed to 1 mm
    axis = separate_axis_for(network_spacing, original_spacing, 3.0)
    assert axis == 0
    shape = new_shape_for((9, 6, 6), network_spacing, original_spacing)
    back = resample_probabilities(probabilities, shape, order=1, separate_axis=axis)
    assert back.shape == (3, 2, 6, 6)
    for k in range(3):
        _copied_slices(back[k], probabilities[k])  # nearest along z, as nnU-Net's export
    np.testing.assert_allclose(back.sum(0), 1.0, rtol=1e-5)
    plain = resample_probabilities(probabilities, shape, order=1)  # without the rule: 3D linear, as before
    assert not np.array_equal(plain, back)


# --- the 2d configuration and the seg dtype ------------------------------------------------------

def test_2d_keeps_each_case_axis0_spacing_and_resamples_in_plane_only():
    plans = _plans(spacing=(3.0, 0.5, 0.5), spacing_2d=(0.5, 0.5), schemes=("noNorm",))
    rng = np.random.default_rng(8)
    for spacing in [(3.0, 1.0, 1.0), (1.0, 1.0, 1.0), (0.6, 1.0, 1.0)]:
        image = rng.uniform(1, 2, (1, 5, 6, 7)).astype(np.float32)
        label = rng.integers(0, 3, (5, 6, 7)).astype(np.uint8)
        data, seg, properties = preprocess_case(image, label, _geometry(spacing, (5, 6, 7)), plans, "2d")
        assert data.shape == (1, 5, 12, 14) and seg.shape == (1, 5, 12, 14)
        assert properties.spacing == (spacing[0], 0.5, 0.5)
        # nnU-Net's rule: slice by slice where either grid is anisotropic, else one 3D resize whose
        # factor along axis 0 is 1, which samples each slice where it lies: slices never mix either way.
        if separate_axis_for(spacing, properties.spacing, 3.0) == 0:
            reference = np.stack([_nnunet_resize(s, (12, 14)) for s in image[0]])
        else:
            reference = _nnunet_resize(image[0], (5, 12, 14))
        np.testing.assert_allclose(data[0], reference, rtol=1e-5, atol=1e-5)
    assert preprocessing_key(plans, "2d") != preprocessing_key(plans, "3d_fullres")


def test_2d_data_lives_in_its_own_folder(make_decathlon, tmp_path):
    dataset = load_dataset(make_decathlon(n_cases=2))
    plans = _plans(spacing=(1.0, 1.0, 1.0), spacing_2d=(1.0, 1.0))
    assert preprocess_dataset(dataset, plans, tmp_path / "ws", progress=False) == {"3d_fullres": 2, "2d": 2}
    folder = preprocessed_dir(tmp_path / "ws", "2d")
    assert store.list_cases(folder) == ["case_000", "case_001"]
    assert store.load_properties(folder, "case_000").preprocessing_key == preprocessing_key(plans, "2d")


@pytest.mark.parametrize("spacing_2d", [(1.0, 1.0), (0.7, 0.8)])
def test_each_configurations_data_is_what_preprocessing_it_alone_gives(make_decathlon, tmp_path, spacing_2d):
    """One read of a case serves every configuration; configurations that resample it alike share the arrays,
    the others get their own, and each keeps its own preprocessing key."""
    dataset = load_dataset(make_decathlon(n_cases=2))
    plans = _plans(spacing=(1.0, 1.0, 1.0), spacing_2d=spacing_2d)
    preprocess_dataset(dataset, plans, tmp_path / "ws", progress=False)
    case = dataset.cases[1]
    image, geometry = read_case_image(case, 1)
    for name in ("3d_fullres", "2d"):
        data, seg, properties = preprocess_case(image, read_case_label(case), geometry, plans, name)
        stored_image, stored_seg = store.open_case_arrays(preprocessed_dir(tmp_path / "ws", name), case.case_id)
        assert np.array_equal(stored_image[...], data) and np.array_equal(stored_seg[...], seg)
        assert store.load_properties(preprocessed_dir(tmp_path / "ws", name), case.case_id) == replace(
            properties, case_id=case.case_id)


def test_seg_is_int16_when_a_label_id_exceeds_127():
    image = np.ones((1, 4, 4, 4), np.float32)
    label = np.zeros((4, 4, 4), np.uint8)
    label[1:3, 1:3, 1:3] = 200
    geometry = _geometry((1, 1, 1), (4, 4, 4))
    _, seg, properties = preprocess_case(image, label, geometry, _plans(labels=(0, 1, 200)), "3d_fullres")
    assert seg.dtype == np.int16 and seg.max() == 200 and len(properties.class_locations["200"]) == 8
    _, seg, _ = preprocess_case(image, label.clip(0, 1), geometry, _plans(labels=(0, 1, 127)), "3d_fullres")
    assert seg.dtype == np.int8
    with pytest.raises(PreprocessingError, match="do not fit int8"):
        preprocess_case(image, label, geometry, _plans(labels=(0, 1)), "3d_fullres")


def test_plans_without_format_2_resampling_are_refused():
    plans = _plans_json()
    del plans["resampling"]["anisotropy_threshold"]
    with pytest.raises(PlanError, match="anisotropy_threshold.*autoseg plan"):  # refused when plans.json is read
        Plans.from_json(plans)


# --- whole datasets ------------------------------------------------------------------------------

def test_preprocessed_cases_are_cropped_normalized_and_map_back_exactly(make_decathlon, tmp_path):
    dataset = load_dataset(make_decathlon(channels=("T1", "T2"), spacing=(1.0, 1.0, 1.0)))
    plans = _plans(schemes=("zscore", "zscore"), use_nonzero_mask=True)
    workdir = tmp_path / "ws"
    assert preprocess_dataset(dataset, plans, workdir, progress=False) == {"3d_fullres": 3}
    folder = preprocessed_dir(workdir, "3d_fullres")
    assert store.list_cases(folder) == ["case_000", "case_001", "case_002"]
    for case in dataset.cases:
        data = store.load_case_image(folder, case.case_id)
        seg = np.asarray(store.open_case_arrays(folder, case.case_id)[1][:])
        properties = store.load_properties(folder, case.case_id)
        assert data.dtype == np.float32 and seg.dtype == np.int8
        assert data.shape == (2, 8, 12, 10) and seg.shape == (1, 8, 12, 10)  # 2-voxel zero margin cropped away
        assert properties.nonzero_bbox == ((2, 10), (2, 14), (2, 12))
        for c in range(2):
            assert abs(float(data[c].mean())) < 1e-4 and float(data[c].std()) == pytest.approx(1.0, abs=1e-4)
        for label, coords in properties.class_locations.items():
            assert len(coords) and all(seg[0][tuple(xyz)] == int(label) for xyz in coords)
        original = read_case_label(case)
        back = _back_to_original(seg, properties, plans, 3)
        assert back.shape == original.shape
        np.testing.assert_array_equal(back, original)
        _, geometry = read_case_image(case, 2)
        assert properties.original_geometry == geometry


def test_anisotropic_cases_are_resampled_to_the_target_spacing_thick_axis_first(make_decathlon, tmp_path):
    dataset = load_dataset(make_decathlon(shape=(16, 16, 10), spacings=ANISO_SPACINGS, margin=1))
    target = [np.percentile([4.0, 5.0, 6.0], 10), 1.0, 1.0]
    plans = _plans(spacing=target, transpose=(2, 0, 1))
    preprocess_dataset(dataset, plans, tmp_path / "ws", progress=False)
    folder = preprocessed_dir(tmp_path / "ws", "3d_fullres")
    for case, spacing in zip(dataset.cases, ANISO_SPACINGS):
        data = store.load_case_image(folder, case.case_id)
        seg = np.asarray(store.open_case_arrays(folder, case.case_id)[1][:])
        properties = store.load_properties(folder, case.case_id)
        cropped = (14, 14, 8)  # (z, y, x) in the file, 1-voxel margin removed
        expected = new_shape_for([cropped[a] for a in (2, 0, 1)], [spacing[a] for a in (2, 0, 1)], target)
        assert data.shape[1:] == seg.shape[1:] == expected
        assert properties.spacing == pytest.approx(target)
        assert set(np.unique(seg)) <= {0, 1, 2}
        original = read_case_label(case)
        back = _back_to_original(seg, properties, plans, 3)
        assert back.shape == original.shape
        assert properties.original_geometry.spacing == spacing
        assert properties.original_geometry == read_case_image(case, 1)[1]  # the grid to write back to
        for label in (1, 2):
            assert _dice(back, original, label) > 0.9


def test_preprocessing_resumes_redoes_incomplete_cases_and_leaves_no_temp_files(make_decathlon, tmp_path, monkeypatch):
    root = make_decathlon(n_cases=4)
    dataset = load_dataset(root)
    plans = _plans()
    inputs_before = _file_states(root)
    workdir = tmp_path / "ws"
    preprocess_dataset(dataset, plans, workdir, progress=False)
    folder = preprocessed_dir(workdir, "3d_fullres")
    expected_files = {f"case_{i:03d}{s}" for i in range(4) for s in (".b2nd", "_seg.b2nd", ".json")}
    assert {p.name for p in workdir.rglob("*") if p.is_file()} == expected_files  # no temp files left

    (folder / "case_002.json").unlink()  # as if interrupted before the properties were written
    done = []
    real_job = preprocess_module._preprocess_job
    monkeypatch.setattr(preprocess_module, "_preprocess_job", lambda job: done.append(job[0].case_id) or real_job(job))
    assert preprocess_dataset(dataset, plans, workdir, progress=False) == {"3d_fullres": 1}
    assert done == ["case_002"]
    assert store.is_complete(folder, "case_002")
    assert {p.name for p in workdir.rglob("*") if p.is_file()} == expected_files
    assert preprocess_dataset(dataset, plans, workdir, progress=False) == {"3d_fullres": 0}
    assert done == ["case_002"]
    assert _file_states(root) == inputs_before  # the raw dataset is never modified


def test_an_empty_configuration_list_preprocesses_nothing(make_decathlon, tmp_path):
    # `autoseg plan --configs 3d_lowres` where no 3d_lowres was planned must not preprocess 3d_fullres instead.
    dataset = load_dataset(make_decathlon(n_cases=1))
    assert preprocess_dataset(dataset, _plans(), tmp_path / "ws", configurations=[], progress=False) == {}
    assert not (tmp_path / "ws").exists()


def test_failed_write_leaves_neither_temp_file_nor_a_complete_looking_case(make_decathlon, tmp_path, monkeypatch):
    dataset = load_dataset(make_decathlon(n_cases=1))

    def fail(path, data, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(store, "write_json", fail)
    with pytest.raises(OSError):
        preprocess_dataset(dataset, _plans(), tmp_path / "ws", progress=False)
    folder = preprocessed_dir(tmp_path / "ws", "3d_fullres")
    assert not store.is_complete(folder, "case_000")
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_real_hippocampus_preprocessing_round_trip_is_exact(hippocampus_subset, tmp_path):
    dataset = load_dataset(hippocampus_subset)
    plans = _plans(spacing=(1.0, 1.0, 1.0))
    preprocess_dataset(dataset, plans, tmp_path / "ws", progress=False)
    folder = preprocessed_dir(tmp_path / "ws", "3d_fullres")
    for case in dataset.cases:
        seg = np.asarray(store.open_case_arrays(folder, case.case_id)[1][:])
        data = store.load_case_image(folder, case.case_id)
        assert np.isfinite(data).all() and abs(float(data.mean())) < 0.5
        properties = store.load_properties(folder, case.case_id)
        np.testing.assert_array_equal(_back_to_original(seg, properties, plans, 3), read_case_label(case))


def test_foreground_locations_follow_nnunets_count_rule_and_are_reproducible():
    """Up to 10,000 voxels per label but at least 1% of them, from RandomState(1234) over the labels in order."""
    seg = np.zeros((40, 250, 250), np.int8)
    seg[:, :, :200] = 1           # 2,000,000 voxels: 1% = 20,000 kept
    seg[:10, :, 200:] = 2         # 125,000 voxels: 10,000 kept
    seg[-1, -1, -30:] = 3         # 30 voxels: all kept
    seg[20:, :5, 200:] = -1       # outside the non-zero mask: never a location
    locations = preprocess_module.sample_class_locations(seg)
    assert {k: len(v) for k, v in locations.items()} == {"1": 20_000, "2": 10_000, "3": 30}
    for label, coords in locations.items():
        coords = np.asarray(coords)
        assert len(np.unique(coords, axis=0)) == len(coords)  # drawn without replacement
        assert (seg[tuple(coords.T)] == int(label)).all()
    again = preprocess_module.sample_class_locations(seg)
    assert again.keys() == locations.keys() and all(np.array_equal(again[k], locations[k]) for k in locations)

    # the draw written out as nnU-Net's preprocessor makes it (coordinates in C order, one generator)
    rng = np.random.RandomState(1234)
    expected = {}
    for label in (1, 2, 3):
        coords = np.argwhere(seg == label)
        count = max(min(10_000, len(coords)), int(np.ceil(len(coords) * 0.01)))
        expected[str(label)] = coords[rng.choice(len(coords), count, replace=False)].tolist()
    assert {k: v.tolist() for k, v in locations.items()} == expected
