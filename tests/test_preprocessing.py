"""Preprocessing: crop, normalize, resample, store; and the way back to the original grid."""

import hashlib

import numpy as np
import pytest

from autoseg.dataset.layout import load_dataset, read_case_image, read_case_label
from autoseg.fingerprint import compute_fingerprint
from autoseg.planning.planner import plan_experiment
from autoseg.preprocessing import preprocess as preprocess_module
from autoseg.preprocessing import store
from autoseg.preprocessing.cropping import crop, uncrop
from autoseg.preprocessing.normalization import normalize
from autoseg.preprocessing.preprocess import preprocess_case, preprocess_dataset
from autoseg.preprocessing.resampling import resample_image, resample_label, resample_probabilities
from autoseg.workspace import preprocessed_dir

ANISO_SPACINGS = [(0.875, 0.875, 4.0), (1.0, 1.0, 5.0), (1.125, 1.125, 6.0)]  # thick axis stored last


def _plans(dataset):
    return plan_experiment(compute_fingerprint(dataset, progress=False), configurations=["3d_fullres"])


def _back_to_original(seg, properties, plans, num_classes):
    """Preprocessed labels -> one-hot -> resample -> inverse transpose -> uncrop -> label map in the file's grid."""
    onehot = np.stack([seg[0] == k for k in range(num_classes)]).astype(np.float32)
    cropped_shape = [properties["shape_after_crop"][a] for a in plans["transpose_forward"]]
    probabilities = resample_probabilities(onehot, tuple(cropped_shape))
    probabilities = probabilities.transpose(0, *(a + 1 for a in plans["transpose_backward"]))
    fill = np.eye(num_classes, dtype=np.float32)[0]  # outside the crop box: background
    full = uncrop(probabilities, properties["nonzero_bbox"], tuple(properties["original_geometry"]["shape"]), fill)
    return full.argmax(0)


def _dice(a, b, label):
    a, b = a == label, b == label
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def _file_states(root):
    return {p: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_crop_keeps_the_nonzero_box_and_uncrop_restores_the_array():
    image = np.zeros((2, 6, 7, 8), np.float32)
    image[1, 1:4, 2:6, 3:5] = 1.5
    bbox = ((1, 4), (2, 6), (3, 5))
    cropped = crop(image, bbox)
    assert cropped.shape == (2, 3, 4, 2) and (cropped[1] == 1.5).all()
    np.testing.assert_array_equal(uncrop(cropped, bbox, (6, 7, 8)), image)
    filled = uncrop(np.zeros((2, 3, 4, 2), np.float32), bbox, (6, 7, 8), fill=np.array([1.0, 0.0], np.float32))
    assert filled[0].sum() == 6 * 7 * 8 - 3 * 4 * 2 and filled[1].sum() == 0


def test_label_resampling_never_creates_new_label_values():
    rng = np.random.default_rng(0)
    label = rng.choice(np.array([0, 2, 5], np.int16), size=(9, 10, 11), p=[0.5, 0.3, 0.2])
    for shape in [(18, 20, 22), (5, 7, 6), (9, 25, 4)]:
        out = resample_label(label, shape, order=1)
        assert out.shape == shape and out.dtype == label.dtype
        assert set(np.unique(out)) <= {0, 2, 5}
    # A linear interpolation of the raw values would have made 1s, 3s and 4s.
    naive = np.rint(resample_image(label[None].astype(np.float32), (18, 20, 22), order=1)[0])
    assert set(np.unique(naive)) - {0, 2, 5}


def test_zscore_inside_the_nonzero_mask_leaves_the_outside_at_zero():
    image = np.zeros((1, 6, 6, 6), np.float32)
    image[0, 1:5, 1:5, 1:5] = np.random.default_rng(1).normal(500, 80, (4, 4, 4))
    mask = image[0] != 0
    normalize(image, mask, [{"channel": 0, "scheme": "zscore", "use_nonzero_mask": True}])
    assert abs(image[0][mask].mean()) < 1e-5 and image[0][mask].std() == pytest.approx(1.0, abs=1e-5)
    assert (image[0][~mask] == 0).all()


def test_preprocessed_cases_are_cropped_normalized_and_map_back_exactly(make_decathlon, tmp_path):
    dataset = load_dataset(make_decathlon(channels=("T1", "T2"), spacing=(1.0, 1.0, 1.0)))
    plans = _plans(dataset)
    workdir = tmp_path / "ws"
    assert preprocess_dataset(dataset, plans, workdir, progress=False) == {"fullres": 3}
    folder = preprocessed_dir(workdir, "fullres")
    assert store.list_cases(folder) == ["case_000", "case_001", "case_002"]
    for case in dataset.cases:
        data = np.load(folder / f"{case.case_id}.npy", mmap_mode="r")
        seg = np.load(folder / f"{case.case_id}_seg.npy")
        properties = store.load_properties(folder, case.case_id)
        assert data.dtype == np.float32 and seg.dtype == np.int8
        assert data.shape == (2, 8, 12, 10) and seg.shape == (1, 8, 12, 10)  # 2-voxel zero margin cropped away
        assert properties["nonzero_bbox"] == [[2, 10], [2, 14], [2, 12]]
        for c in range(2):
            assert abs(float(data[c].mean())) < 1e-4 and float(data[c].std()) == pytest.approx(1.0, abs=1e-4)
        for label, coords in properties["class_locations"].items():
            assert coords and all(seg[0][tuple(xyz)] == int(label) for xyz in coords)
        original = read_case_label(case)
        back = _back_to_original(seg, properties, plans, 3)
        assert back.shape == original.shape
        np.testing.assert_array_equal(back, original)
        _, geometry = read_case_image(case, 2)
        assert properties["original_geometry"] == geometry.to_json()


def test_ct_channel_is_clipped_to_the_planned_percentiles(make_nnunetv2):
    dataset = load_dataset(make_nnunetv2(channels=("CT",), kind="ct", n_cases=2))
    plans = _plans(dataset)
    scheme = plans["normalization"][0]
    assert scheme["scheme"] == "ct"
    lo, hi = scheme["clip"]
    image, geometry = read_case_image(dataset.cases[0], 1)
    assert image.max() > hi and image.min() < lo  # bone and air lie outside the foreground percentiles
    data, _, _ = preprocess_case(image, read_case_label(dataset.cases[0]), geometry, plans, "3d_fullres")
    low, high = (lo - scheme["mean"]) / scheme["std"], (hi - scheme["mean"]) / scheme["std"]
    assert data.min() == pytest.approx(low, abs=1e-5) and data.max() == pytest.approx(high, abs=1e-5)


def test_anisotropic_cases_are_resampled_to_the_target_spacing_thick_axis_first(make_decathlon, tmp_path):
    dataset = load_dataset(make_decathlon(shape=(16, 16, 10), spacings=ANISO_SPACINGS, margin=1))
    plans = _plans(dataset)
    assert plans["transpose_forward"] == [2, 0, 1] and plans["anisotropic"]
    target = plans["configurations"]["3d_fullres"]["spacing"]
    assert target == pytest.approx([np.percentile([4.0, 5.0, 6.0], 10), 1.0, 1.0])
    preprocess_dataset(dataset, plans, tmp_path / "ws", progress=False)
    folder = preprocessed_dir(tmp_path / "ws", "fullres")
    for case, spacing in zip(dataset.cases, ANISO_SPACINGS):
        data = np.load(folder / f"{case.case_id}.npy")
        seg = np.load(folder / f"{case.case_id}_seg.npy")
        properties = store.load_properties(folder, case.case_id)
        cropped = (14, 14, 8)  # (z, y, x) in the file, 1-voxel margin removed
        expected = tuple(round(cropped[a] * spacing[a] / t) for a, t in zip([2, 0, 1], target))
        assert data.shape[1:] == seg.shape[1:] == expected
        assert properties["spacing"] == pytest.approx(target)
        assert set(np.unique(seg)) <= {0, 1, 2}
        original = read_case_label(case)
        back = _back_to_original(seg, properties, plans, 3)
        assert back.shape == original.shape
        assert properties["original_geometry"]["spacing"] == list(spacing)
        assert properties["original_geometry"] == read_case_image(case, 1)[1].to_json()  # the grid to write back to
        for label in (1, 2):
            assert _dice(back, original, label) > 0.9


def test_preprocessing_resumes_redoes_incomplete_cases_and_leaves_no_temp_files(make_decathlon, tmp_path, monkeypatch):
    root = make_decathlon(n_cases=4)
    dataset = load_dataset(root)
    plans = _plans(dataset)
    inputs_before = _file_states(root)
    workdir = tmp_path / "ws"
    preprocess_dataset(dataset, plans, workdir, progress=False)
    folder = preprocessed_dir(workdir, "fullres")
    expected_files = {f"case_{i:03d}{s}" for i in range(4) for s in (".npy", "_seg.npy", ".json")}
    assert {p.name for p in workdir.rglob("*") if p.is_file()} == expected_files  # no temp files left

    (folder / "case_002.json").unlink()  # as if interrupted before the properties were written
    done = []
    real_job = preprocess_module._preprocess_job
    monkeypatch.setattr(preprocess_module, "_preprocess_job", lambda job: done.append(job[0].case_id) or real_job(job))
    assert preprocess_dataset(dataset, plans, workdir, progress=False) == {"fullres": 1}
    assert done == ["case_002"]
    assert store.is_complete(folder, "case_002")
    assert {p.name for p in workdir.rglob("*") if p.is_file()} == expected_files
    assert preprocess_dataset(dataset, plans, workdir, progress=False) == {"fullres": 0}
    assert done == ["case_002"]
    assert _file_states(root) == inputs_before  # the raw dataset is never modified


def test_an_empty_configuration_list_preprocesses_nothing(make_decathlon, tmp_path):
    # `autoseg plan --configs 3d_lowres` where no 3d_lowres was planned must not preprocess 3d_fullres instead.
    dataset = load_dataset(make_decathlon(n_cases=1))
    assert preprocess_dataset(dataset, _plans(dataset), tmp_path / "ws", configurations=[], progress=False) == {}
    assert not (tmp_path / "ws").exists()


def test_failed_write_leaves_neither_temp_file_nor_a_complete_looking_case(make_decathlon, tmp_path, monkeypatch):
    dataset = load_dataset(make_decathlon(n_cases=1))
    plans = _plans(dataset)

    def fail(path, data):
        raise OSError("disk full")

    monkeypatch.setattr(store, "write_json", fail)
    with pytest.raises(OSError):
        preprocess_dataset(dataset, plans, tmp_path / "ws", progress=False)
    folder = preprocessed_dir(tmp_path / "ws", "fullres")
    assert not store.is_complete(folder, "case_000")
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_real_hippocampus_preprocessing_round_trip_is_exact(hippocampus_subset, tmp_path):
    dataset = load_dataset(hippocampus_subset)
    plans = _plans(dataset)
    preprocess_dataset(dataset, plans, tmp_path / "ws", progress=False)
    folder = preprocessed_dir(tmp_path / "ws", "fullres")
    for case in dataset.cases:
        seg = np.load(folder / f"{case.case_id}_seg.npy")
        data = np.load(folder / f"{case.case_id}.npy")
        assert np.isfinite(data).all() and abs(float(data.mean())) < 0.5
        properties = store.load_properties(folder, case.case_id)
        np.testing.assert_array_equal(_back_to_original(seg, properties, plans, 3), read_case_label(case))
