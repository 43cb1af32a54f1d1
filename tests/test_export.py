import numpy as np
import pytest
from PIL import Image

from autoseg.dataset.image_io import Geometry, read_image
from autoseg.fingerprint import CaseFingerprint, Fingerprint, IntensityStats
from autoseg.inference.export import (export_segmentation, probabilities_to_original, save_probabilities,
                                      segmentation_suffix)
from autoseg.planning.planner import plan_experiment
from autoseg.preprocessing.preprocess import preprocess_case

ROTATED = tuple(np.array([[0.0, 1, 0], [0, 0, -1], [-1, 0, 0]]).ravel())


def _plans(spacing, shape=(8, 12, 14)) -> dict:
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


def test_identity_plan_round_trip_preserves_a_one_hot_exactly():
    spacing = (1.0, 1.0, 2.5)  # thick axis last in the file: the plan transposes it to the front
    plans = _plans(spacing)
    assert plans["transpose_forward"] == [2, 0, 1]
    shape, bbox = (8, 12, 14), ((1, 7), (2, 11), (3, 13))
    geometry = Geometry(spacing, (4.0, -2.0, 7.5), ROTATED, shape)
    data, _, properties = preprocess_case(_image_with_zero_border(shape, bbox), None, geometry, plans, "3d_fullres")
    assert list(data.shape[1:]) == properties["shape_after_resampling"]  # spacing equals target: no resampling

    labels = np.zeros(shape, dtype=np.int64)
    crop = tuple(slice(lo, hi) for lo, hi in bbox)
    labels[crop] = np.random.default_rng(1).integers(0, 3, labels[crop].shape)
    one_hot = np.eye(3, dtype=np.float32)[labels].transpose(3, 0, 1, 2)
    in_network_space = one_hot[(slice(None),) + crop].transpose(0, *(a + 1 for a in plans["transpose_forward"]))

    back = probabilities_to_original(in_network_space, properties, plans)
    assert back.shape == (3, *shape) and back.dtype == np.float32
    np.testing.assert_array_equal(back, one_hot)


def test_resampled_probabilities_come_back_on_the_file_grid_and_sum_to_one():
    plans = _plans((1.0, 1.0, 2.5))
    shape, bbox = (9, 13, 7), ((0, 9), (2, 12), (1, 6))
    geometry = Geometry((0.7, 1.3, 3.0), (0.0, 0.0, 0.0), ROTATED, shape)
    data, _, properties = preprocess_case(_image_with_zero_border(shape, bbox), None, geometry, plans, "3d_fullres")
    probabilities = np.random.default_rng(0).dirichlet(np.ones(3), data.shape[1:]).transpose(3, 0, 1, 2)

    back = probabilities_to_original(probabilities.astype(np.float32), properties, plans)
    assert back.shape == (3, *shape)
    np.testing.assert_allclose(back.sum(axis=0), 1.0, atol=1e-5)
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
        probabilities_to_original(np.zeros((3, 4, 4, 4), np.float32), properties, plans)


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
