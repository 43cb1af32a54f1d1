import pickle
from pathlib import Path

import numpy as np
import pytest

from autoseg.dataset.image_io import Geometry
from autoseg.preprocessing import store
from autoseg.preprocessing.properties import CaseProperties
from autoseg.training.patch_sampling import PatchLoader, open_case, read_box, sample_patch_box


def case_properties(shape, locations) -> CaseProperties:
    """Properties of a case that needed no cropping or resampling, with its sampled class locations."""
    shape = tuple(int(s) for s in shape)
    geometry = Geometry((1.0,) * 3, (0.0,) * 3, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), shape)
    return CaseProperties(geometry, tuple((0, s) for s in shape), shape, shape, (1.0,) * 3, "test", locations)


def write_case(folder: Path, case_id: str, image: np.ndarray, seg: np.ndarray, seg_dtype=np.int8) -> None:
    """A case in the preprocessed format: image, seg and class_locations in the properties."""
    labels = [int(v) for v in np.unique(seg) if v > 0]
    locations = {str(v): np.argwhere(seg[0] == v)[:2000].tolist() for v in labels}
    store.save_case(folder, case_id, image.astype(np.float32), seg.astype(seg_dtype),
                    case_properties(seg.shape[1:], locations))


@pytest.fixture
def cases(tmp_path: Path) -> list[str]:
    """Three cases of 20x24x22 with a small foreground blob off-centre (easy to miss at random)."""
    rng = np.random.default_rng(0)
    ids = []
    for i in range(3):
        seg = np.zeros((1, 20, 24, 22), np.int8)
        seg[0, 2 + i:5 + i, 18:21, 1:4] = 1
        seg[0, 3 + i, 19, 2] = 2
        write_case(tmp_path, f"c{i}", rng.normal(size=(2, 20, 24, 22)), seg)
        ids.append(f"c{i}")
    return ids


def test_3d_and_2d_batches_have_the_patch_shape(tmp_path, cases):
    batch = next(PatchLoader(tmp_path, cases, [8, 10, 12], batch_size=3, seed=0))
    assert batch["data"].shape == (3, 2, 8, 10, 12) and batch["data"].dtype == np.float32
    assert batch["seg"].shape == (3, 1, 8, 10, 12)
    assert set(batch["keys"]) <= set(cases) and len(batch["keys"]) == 3

    batch2d = next(PatchLoader(tmp_path, cases, [16, 18], batch_size=4, seed=0))
    assert batch2d["data"].shape == (4, 2, 16, 18)
    assert batch2d["seg"].shape == (4, 1, 16, 18)


@pytest.mark.parametrize("patch", [[6, 6, 6], [8, 8]])
def test_forced_samples_always_contain_foreground(tmp_path, cases, patch):
    loader = PatchLoader(tmp_path, cases, patch, batch_size=4, oversample_foreground=0.5, seed=1)
    assert [loader.is_forced(i) for i in range(4)] == [False, False, True, True]
    for _ in range(20):
        seg = next(loader)["seg"]
        assert all(seg[i].max() > 0 for i in (2, 3))


def test_forced_voxel_stays_inside_the_centre_crop_of_an_enlarged_patch():
    rng = np.random.default_rng(0)
    shape, final, read = [30, 40, 20], [10, 12, 16], [24, 30, 36]
    for _ in range(200):
        voxel = rng.integers(0, shape)
        lower, upper = sample_patch_box(shape, read, rng, 1, {1: voxel[None]}, final_patch_size=final)
        assert [u - lo for lo, u in zip(lower, upper)] == read
        crop_lower = [lo + (r - f) // 2 for lo, r, f in zip(lower, read, final)]
        assert all(c <= v < c + f for c, v, f in zip(crop_lower, voxel, final))


def test_case_smaller_than_the_patch_is_centred_as_nnunet_does():
    """A 30 x 50 x 35 Hippocampus-like case in a 40 x 56 x 40 patch: one position per even axis, two per odd."""
    rng = np.random.default_rng(0)
    corners = {tuple(sample_patch_box([30, 50, 35], [40, 56, 40], rng, None, {})[0]) for _ in range(300)}
    assert corners == {(-5, -3, -3), (-5, -3, -2)}
    # with an enlarged read patch, the padding is split the same way around the case
    corners = {tuple(sample_patch_box([30, 50, 35], [52, 64, 50], rng, None, {}, final_patch_size=[40, 56, 40])[0])
               for _ in range(300)}
    assert corners == {(-11, -7, -8), (-11, -7, -7)}


def test_random_corner_range_follows_nnunet_get_bbox():
    """Volume at least the final patch: lower corner uniform in [-ceil(n/2), s - p + ceil(n/2)], n = p - f."""
    rng = np.random.default_rng(1)
    shape, read, final = [30, 25, 40], [24, 27, 40], [20, 20, 40]
    corners = np.array([sample_patch_box(shape, read, rng, None, {}, final_patch_size=final)[0] for _ in range(3000)])
    assert corners.min(axis=0).tolist() == [-2, -4, 0] and corners.max(axis=0).tolist() == [8, 2, 0]


def test_forced_patch_is_centred_on_the_voxel_even_at_the_upper_border():
    rng = np.random.default_rng(2)
    shape, read = [30, 30, 30], [12, 16, 10]
    lower, upper = sample_patch_box(shape, read, rng, 1, {1: np.array([[29, 28, 15]])})
    assert lower == [23, 20, 10] and upper == [35, 36, 20]  # beyond the volume: padding, not a shifted patch
    lower, _ = sample_patch_box(shape, read, rng, 1, {1: np.array([[0, 3, 1]])})
    assert lower == [0, 0, 0]  # below the lowest allowed corner it is raised to that corner
    lower, _ = sample_patch_box(shape, read, rng, 1, {1: np.array([[0, 3, 1]])}, final_patch_size=[8, 10, 10])
    assert lower == [-2, -3, 0]


def test_case_without_foreground_falls_back_to_random_patches(tmp_path):
    write_case(tmp_path, "empty", np.ones((1, 10, 10, 10)), np.zeros((1, 10, 10, 10)))
    batch = next(PatchLoader(tmp_path, ["empty"], [4, 4, 4], batch_size=2, oversample_foreground=1.0, seed=0))
    assert batch["seg"].max() == 0 and batch["data"].shape == (2, 1, 4, 4, 4)


def test_volume_smaller_than_patch_is_padded_and_fully_inside(tmp_path):
    seg = np.ones((1, 5, 6, 4), np.int8)
    write_case(tmp_path, "small", np.full((1, 5, 6, 4), 7.0), seg)
    loaders = (PatchLoader(tmp_path, ["small"], [8, 9, 10], batch_size=3, oversample_foreground=0.0, seed=s)
               for s in range(5))
    for batch in (next(loader) for loader in loaders):
        data, labels = batch["data"], batch["seg"]
        assert set(np.unique(data)) == {0.0, 7.0} and set(np.unique(labels)) == {-1, 1}
        assert np.all((data == 7) == (labels == 1))  # padding is image 0 and label -1 at the same voxels
        assert all((data[i] == 7).sum() == 5 * 6 * 4 for i in range(3))  # whole volume inside the patch


def test_read_box_pads_with_the_given_value_and_reads_the_inside_exactly(tmp_path):
    image = np.arange(3 * 4 * 5, dtype=np.float32).reshape(1, 3, 4, 5) + 1
    write_case(tmp_path, "c", image, np.full((1, 3, 4, 5), 2))
    case = open_case(tmp_path, "c")
    box = read_box(case.image, [-1, 2, 3], [2, 6, 9])
    assert box.shape == (1, 3, 4, 6)
    np.testing.assert_array_equal(box[:, 1:, :2, :2], image[:, :2, 2:, 3:])
    assert (box[:, 0] == 0).all() and (box[:, :, 2:] == 0).all() and (box[:, :, :, 2:] == 0).all()
    labels = read_box(case.seg, [-1, 2, 3], [2, 6, 9], pad_value=-1)
    assert labels.dtype == np.int8 and ((labels == 2) == (box > 0)).all() and set(np.unique(labels)) == {-1, 2}
    assert (read_box(case.seg, [5, 5, 5], [7, 6, 8], pad_value=-1) == -1).all()  # wholly outside


def test_int16_labels_and_minus_one_survive_the_loader(tmp_path):
    seg = np.zeros((1, 12, 12, 12), np.int16)
    seg[0, 4:8, 4:8, 4:8] = 300
    seg[0, :2] = -1
    write_case(tmp_path, "big_ids", np.random.default_rng(0).normal(size=(1, 12, 12, 12)), seg, seg_dtype=np.int16)
    batch = next(PatchLoader(tmp_path, ["big_ids"], [12, 12, 12], batch_size=2, oversample_foreground=0.0, seed=0))
    assert batch["seg"].dtype == np.int16
    np.testing.assert_array_equal(batch["seg"][0], seg)  # the patch covers the volume exactly


def test_loader_that_has_read_batches_pickles_and_reopens_its_cases(tmp_path, cases):
    loader = PatchLoader(tmp_path, cases, [6, 7, 8], batch_size=3, seed=5)
    next(loader)
    assert loader._cases  # the cases are open in this process
    copy = pickle.loads(pickle.dumps(loader))  # as a spawned batchgenerators worker receives it
    assert copy._cases == {}
    batch = next(copy)
    assert batch["data"].shape == (3, 2, 6, 7, 8) and batch["seg"].dtype == np.int8


def test_same_seed_same_batches_and_each_worker_its_own_stream(tmp_path, cases):
    def batches(seed, thread_id=0):
        loader = PatchLoader(tmp_path, cases, [6, 7, 8], batch_size=3, seed=seed)
        loader.set_thread_id(thread_id)
        return [next(loader) for _ in range(4)]

    first, again, other, worker1 = batches(5), batches(5), batches(6), batches(5, thread_id=1)
    assert all(np.array_equal(a["data"], b["data"]) and a["keys"] == b["keys"] for a, b in zip(first, again))
    assert not all(np.array_equal(a["data"], b["data"]) for a, b in zip(first, other))
    assert not all(np.array_equal(a["data"], b["data"]) for a, b in zip(first, worker1))


def test_open_case_is_lazy_and_names_the_missing_file(tmp_path, cases):
    case = open_case(tmp_path, cases[0])
    assert not isinstance(case.image, np.ndarray) and case.image.shape == (2, 20, 24, 22)
    assert case.class_locations[1].shape[1] == 3
    with pytest.raises(store.PreprocessedDataError, match="nope.json"):
        open_case(tmp_path, "nope")
    (tmp_path / f"{cases[1]}_seg.b2nd").unlink()
    with pytest.raises(store.PreprocessedDataError, match=f"{cases[1]}_seg.b2nd"):
        open_case(tmp_path, cases[1])


def test_finite_loader_visits_each_case_once(tmp_path, cases):
    loader = PatchLoader(tmp_path, cases, [4, 4, 4], batch_size=1, seed=0, infinite=False)
    assert sorted(k for batch in loader for k in batch["keys"]) == sorted(cases)
