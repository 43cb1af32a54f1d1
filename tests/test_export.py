import numpy as np
import pytest
from PIL import Image

from autoseg.dataset.image_io import Geometry, read_image
from autoseg.fingerprint import CaseFingerprint, Fingerprint, IntensityStats
from autoseg.inference.original_grid import (
    export_segmentation,
    logits_to_original,
    save_probabilities,
    segmentation_suffix,
)
from autoseg.planning.planner import plan_experiment
from autoseg.planning.plans import Plans
from autoseg.preprocessing.preprocess import preprocess_case

ROTATED = tuple(np.array([[0.0, 1, 0], [0, 0, -1], [-1, 0, 0]]).ravel())


def _plans(spacing, shape=(8, 12, 14)) -> Plans:
    """Real planner output for a dataset whose cases all have `spacing` (in file axis order)."""
    stats = IntensityStats(0.0, 1.0, -1.0, 1.0, 0.0, -1.0, 1.0)
    cases = tuple(CaseFingerprint(f"c{i}", spacing, shape, tuple((0, n) for n in shape), 100, (stats,))
                  for i in range(3))
    fingerprint = Fingerprint("tiny", ("MRI",), ("zscore",), {0: "background", 1: "a", 2: "b"}, cases, (stats,))
    return plan_experiment(fingerprint, configurations=["3d_fullres"])


def _image_with_zero_border(shape, bbox, seed=0) -> np.ndarray:
    image = np.zeros((1, *shape), dtype=np.float32)
    inside = (slice(None),) + tuple(slice(lo, hi) for lo, hi in bbox)
    image[inside] = np.random.default_rng(seed).uniform(1, 2, image[inside].shape)
    return image


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=0))
    return e / e.sum(axis=0)


def test_identity_plan_round_trip_gives_the_softmax_of_the_logits_on_the_file_grid():
    spacing = (1.0, 1.0, 2.5)  # thick axis last in the file: the plan transposes it to the front
    plans = _plans(spacing)
    assert plans.transpose_forward == (2, 0, 1)
    shape, bbox = (8, 12, 14), ((1, 7), (2, 11), (3, 13))
    geometry = Geometry(spacing, (4.0, -2.0, 7.5), ROTATED, shape)
    data, _, properties = preprocess_case(_image_with_zero_border(shape, bbox), None, geometry, plans, "3d_fullres")
    assert data.shape[1:] == properties.shape_after_resampling  # spacing equals target: no resampling

    logits = np.zeros((3, *shape), dtype=np.float32)
    logits[0] = 50  # background far ahead outside the crop
    crop = tuple(slice(lo, hi) for lo, hi in bbox)
    logits[(slice(None),) + crop] = np.random.default_rng(1).normal(0, 3, (3, *logits[0][crop].shape))
    in_network_space = logits[(slice(None),) + crop].transpose(0, *(a + 1 for a in plans.transpose_forward))

    back = logits_to_original(in_network_space, properties, plans)
    assert back.shape == (3, *shape) and back.dtype == np.float32
    np.testing.assert_allclose(back, _softmax(logits), atol=1e-6)
    np.testing.assert_array_equal(np.argmax(back, axis=0), np.argmax(logits, axis=0))
    outside = np.ones(shape, bool)
    outside[crop] = False
    assert (back[0][outside] == 1).all()


def test_resampled_logits_come_back_as_probabilities_on_the_file_grid_that_sum_to_one():
    plans = _plans((1.0, 1.0, 2.5))
    shape, bbox = (9, 13, 7), ((0, 9), (2, 12), (1, 6))
    geometry = Geometry((0.7, 1.3, 3.0), (0.0, 0.0, 0.0), ROTATED, shape)
    data, _, properties = preprocess_case(_image_with_zero_border(shape, bbox), None, geometry, plans, "3d_fullres")
    logits = np.random.default_rng(0).normal(0, 4, (3, *data.shape[1:])).astype(np.float32)

    back = logits_to_original(logits, properties, plans)
    assert back.shape == (3, *shape)
    np.testing.assert_allclose(back.sum(axis=0), 1.0, atol=1e-5)
    assert back.min() >= 0
    outside = np.ones(shape, bool)
    outside[tuple(slice(lo, hi) for lo, hi in bbox)] = False
    assert (back[0][outside] == 1).all()


def test_probabilities_of_another_shape_are_refused():
    plans = _plans((1.0, 1.0, 1.0))
    shape = (8, 12, 14)
    geometry = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()), shape)
    _, _, properties = preprocess_case(_image_with_zero_border(shape, ((0, 8), (0, 12), (0, 14))), None, geometry,
                                       plans, "3d_fullres")
    with pytest.raises(ValueError, match="shape"):
        logits_to_original(np.zeros((3, 4, 4, 4), np.float32), properties, plans)


def test_export_writes_the_input_grid_atomically_and_applies_postprocessing(tmp_path):
    shape = (5, 6, 7)
    geometry = Geometry((3.0, 0.8, 0.9), (10.0, -5.0, 2.0), ROTATED, shape)
    probabilities = np.zeros((3, *shape), np.float32)
    probabilities[0] = 1
    probabilities[:, 1:3, 1:3, 1:3] = [[[[0]]], [[[0]]], [[[1]]]]  # a large component of label 2
    probabilities[:, 4, 5, 6] = [0, 0, 1]  # and a single stray voxel of label 2
    rules = {"format_version": 1, "foreground_largest_component": False, "largest_component_labels": [2]}

    out = tmp_path / "case.nii.gz"
    returned = export_segmentation(probabilities, geometry, out, rules=rules)
    written, written_geometry = read_image(out)
    assert written_geometry.matches(geometry) and written.dtype == np.uint8
    np.testing.assert_array_equal(written, returned)
    assert written[4, 5, 6] == 0 and (written[1:3, 1:3, 1:3] == 2).all() and written.sum() == 2 * 8
    assert [p.name for p in tmp_path.iterdir()] == ["case.nii.gz"]


def test_saved_probabilities_are_float16_and_close(tmp_path):
    probabilities = np.random.default_rng(0).dirichlet(np.ones(3), (4, 5, 6)).transpose(3, 0, 1, 2)
    save_probabilities(tmp_path / "case.npz", probabilities)
    loaded = np.load(tmp_path / "case.npz")["probabilities"]
    assert loaded.dtype == np.float16 and loaded.shape == probabilities.shape
    np.testing.assert_allclose(loaded, probabilities, atol=1e-3)
    assert [p.name for p in tmp_path.iterdir()] == ["case.npz"]


def test_png_input_gives_a_png_label_map_of_the_same_size_and_values(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (13, 17, 3), dtype=np.uint8)).save(tmp_path / "cells.png")
    _, geometry = read_image(tmp_path / "cells.png")
    probabilities = np.random.default_rng(1).dirichlet(np.ones(3), (1, 13, 17)).transpose(3, 0, 1, 2)
    out = tmp_path / "out" / f"cells{segmentation_suffix('.png')}"

    returned = export_segmentation(probabilities, geometry, out)
    assert out.name == "cells.png"
    assert Image.open(out).size == Image.open(tmp_path / "cells.png").size and Image.open(out).mode == "L"
    written, written_geometry = read_image(out)
    assert written.shape == (1, 13, 17) and written.dtype == np.uint8 and written_geometry == geometry
    np.testing.assert_array_equal(written, returned)
    np.testing.assert_array_equal(written, np.argmax(probabilities, axis=0))
    assert [p.name for p in out.parent.iterdir()] == ["cells.png"]


@pytest.mark.parametrize("suffix", [".png", ".nii.gz"])
def test_more_than_256_classes_are_written_as_uint16_label_ids(tmp_path, suffix):
    shape = (1, 4, 5)
    geometry = Geometry((999.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()), shape)
    expected = np.resize([0, 127, 128, 255, 256, 299], 20).reshape(shape)
    probabilities = np.eye(300, dtype=np.float32)[expected].transpose(3, 0, 1, 2)
    export_segmentation(probabilities, geometry, tmp_path / f"many{suffix}")
    written, _ = read_image(tmp_path / f"many{suffix}")
    assert written.dtype == np.uint16
    np.testing.assert_array_equal(written, expected)


def test_label_maps_keep_the_input_format_except_lossy_jpeg():
    assert [segmentation_suffix(s) for s in (".png", ".tif", ".tiff", ".nii.gz", ".mha", ".jpg", ".jpeg")] == [
        ".png", ".tif", ".tiff", ".nii.gz", ".mha", ".png", ".png"]


def _nnunet_export(logits, properties, plans):
    """nnU-Net v2's export, written out in full for comparison: all labels' logits resampled, softmax,
    transposed, uncropped with background 1 outside."""
    from autoseg.preprocessing.cropping import uncrop
    from autoseg.preprocessing.resampling import resample_probabilities, separate_axis_for

    forward, backward = plans.transpose_forward, plans.transpose_backward
    original_spacing = [properties.original_geometry.spacing[a] for a in forward]
    separate = separate_axis_for(properties.spacing, original_spacing, plans.resampling.anisotropy_threshold)
    resampled = resample_probabilities(logits, tuple(properties.shape_after_crop[a] for a in forward), 1,
                                       separate, plans.resampling.thick_axis_order)
    fill = np.zeros(logits.shape[0], np.float32)
    fill[0] = 1
    return uncrop(np.ascontiguousarray(_softmax(resampled).transpose(0, *(a + 1 for a in backward))),
                  properties.nonzero_bbox, properties.original_geometry.shape,
                  fill=fill)


@pytest.mark.parametrize("plan_spacing, spacing, shape, bbox, streams", [
    ((3.0, 1.0, 1.0), (2.5, 0.7, 0.8), (25, 14, 11), ((1, 24), (2, 13), (0, 11)), True),   # thick axis: fewer slices
    ((3.0, 1.0, 1.0), (4.5, 0.7, 1.2), (9, 14, 11), ((0, 9), (2, 13), (1, 10)), True),     # thick axis: more slices
    ((3.0, 1.0, 1.0), (3.0, 0.7, 1.2), (12, 14, 11), ((2, 11), (0, 14), (1, 10)), True),   # thick axis kept
    ((1.0, 1.0, 1.0), (1.0, 1.0, 1.0), (10, 12, 9), ((1, 9), (2, 12), (0, 9)), True),      # no resampling
    ((1.0, 1.0, 1.0), (1.3, 0.8, 1.1), (10, 12, 9), ((0, 10), (1, 12), (0, 8)), False),    # plain 3D
    ((1.0, 1.0, 2.5), (0.8, 1.1, 3.5), (12, 10, 7), ((1, 12), (0, 10), (1, 7)), True),     # transposed plan
])
def test_label_map_builder_gives_nnunets_argmax_and_entropy_slab_by_slab(plan_spacing, spacing, shape, bbox, streams):
    from autoseg.inference.original_grid import LabelMapBuilder

    plans = _plans(plan_spacing)
    geometry = Geometry(spacing, (0.0, 0.0, 0.0), ROTATED, shape)
    data, _, properties = preprocess_case(_image_with_zero_border(shape, bbox), None, geometry, plans, "3d_fullres")
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 3, (4, *data.shape[1:])).astype(np.float32)
    given = logits.copy()
    expected = _nnunet_export(logits, properties, plans)

    np.testing.assert_allclose(logits_to_original(logits, properties, plans), expected, atol=1e-6)
    builder = LabelMapBuilder([properties], plans, 4, uncertainty=True, entropy_map=True)
    assert builder.streams == streams
    if streams:  # uneven slabs, as the sliding window hands them out
        edges = [0, *sorted(rng.choice(np.arange(1, data.shape[1]), min(3, data.shape[1] - 1), replace=False)),
                 data.shape[1]]
        for z0, z1 in zip(edges, edges[1:]):
            builder.add(int(z0), [logits[:, z0:z1]])
    else:
        with pytest.raises(ValueError, match="whole volume"):
            builder.add(0, [logits[:, :2]])
        builder.add(0, [logits])
    np.testing.assert_array_equal(logits, given)  # the caller's logits are not overwritten
    np.testing.assert_array_equal(builder.labels, np.argmax(expected, axis=0))
    entropy = -(expected * np.log(np.maximum(expected, 1e-30))).sum(axis=0)
    np.testing.assert_allclose(builder.entropy, entropy, atol=1e-5)
    for label, score in builder.uncertainty().items():
        assert score == pytest.approx(entropy[builder.labels == label].mean() / np.log(4), abs=1e-5)


def test_write_segmentation_postprocesses_and_checks_the_grid(tmp_path):
    from autoseg.inference.original_grid import write_segmentation

    shape = (3, 4, 5)
    geometry = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), ROTATED, shape)
    labels = np.zeros(shape, np.uint8)
    labels[0, :2, :2] = 1
    labels[2, 3, 4] = 1
    rules = {"format_version": 1, "foreground_largest_component": False, "largest_component_labels": [1]}
    written = write_segmentation(labels, geometry, tmp_path / "case.nii.gz", rules)
    assert written.sum() == 4 and read_image(tmp_path / "case.nii.gz")[0].sum() == 4
    with pytest.raises(ValueError, match="does not match"):
        write_segmentation(labels[:2], geometry, tmp_path / "bad.nii.gz")
