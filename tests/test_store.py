"""The preprocessed-case store: compressed chunked arrays, partial reads, atomic writes."""

import json

import blosc2
import numpy as np
import pytest

from autoseg.dataset.image_io import Geometry
from autoseg.preprocessing import store
from autoseg.preprocessing.properties import CaseProperties

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
PROPERTIES = CaseProperties(original_geometry=Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), IDENTITY, (37, 41, 29)),
                            nonzero_bbox=((0, 37), (0, 41), (0, 29)), shape_after_crop=(37, 41, 29),
                            shape_after_resampling=(37, 41, 29), spacing=(1.0, 1.0, 1.0), preprocessing_key="test")


def _case(shape=(2, 37, 41, 29), seg_dtype=np.int8, max_label=2, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=shape).astype(np.float32)
    seg = rng.integers(-1, max_label + 1, size=(1, *shape[1:])).astype(seg_dtype)
    return image, seg


@pytest.mark.parametrize("seg_dtype, max_label", [(np.int8, 2), (np.int16, 300)])
def test_round_trip_keeps_values_and_dtypes_including_minus_one(tmp_path, seg_dtype, max_label):
    image, seg = _case(seg_dtype=seg_dtype, max_label=max_label)
    store.save_case(tmp_path, "c0", image, seg, PROPERTIES)
    assert store.is_complete(tmp_path, "c0") and store.list_cases(tmp_path) == ["c0"]
    assert {p.name for p in tmp_path.iterdir()} == {"c0.b2nd", "c0_seg.b2nd", "c0.json"}
    loaded = store.load_case_image(tmp_path, "c0")
    assert loaded.dtype == np.float32 and np.array_equal(loaded, image)
    opened_image, opened_seg = store.open_case_arrays(tmp_path, "c0")
    labels = opened_seg[...]
    assert labels.dtype == seg_dtype and np.array_equal(labels, seg) and labels.min() == -1
    assert opened_image.shape == image.shape and opened_image.dtype == np.float32
    properties = store.load_properties(tmp_path, "c0")
    assert properties == PROPERTIES and properties.spacing == (1.0, 1.0, 1.0)
    assert json.loads((tmp_path / "c0.json").read_text())["format_version"] == store.FORMAT_VERSION


@pytest.mark.parametrize("patch_size", [None, (40, 40)])
def test_partial_reads_equal_the_same_slice_of_the_full_array(tmp_path, patch_size):
    image, seg = _case(shape=(2, 70, 90, 75))
    store.save_case(tmp_path, "c0", image, seg, PROPERTIES, patch_size=patch_size)
    opened_image, opened_seg = store.open_case_arrays(tmp_path, "c0")
    rng = np.random.default_rng(1)
    boxes = [((0, 0, 0), (70, 90, 75)), ((31, 63, 60), (33, 65, 75)), ((5, 0, 17), (6, 90, 18))]
    for _ in range(20):  # random boxes, most crossing chunk and block borders
        lower = rng.integers(0, [69, 89, 74])
        boxes.append((tuple(lower), tuple(rng.integers(lower + 1, [71, 91, 76]))))
    for lower, upper in boxes:
        box = (slice(None),) + tuple(slice(lo, up) for lo, up in zip(lower, upper))
        part = opened_image[box]
        assert type(part) is np.ndarray and np.array_equal(part, image[box])
        assert np.array_equal(opened_seg[box], seg[box])


def test_chunk_layout_keeps_all_channels_and_one_slice_for_2d_data():
    chunks, blocks = store.chunk_layout((4, 100, 30, 200))
    assert chunks == (4, 32, 30, 64) and blocks == (4, 8, 16, 16)
    chunks, blocks = store.chunk_layout((1, 100, 300, 200), patch_size=[256, 192])
    assert chunks == (1, 1, 256, 200) and blocks == (1, 1, 64, 64)
    chunks, blocks = store.chunk_layout((1, 3, 5, 7))
    assert chunks == (1, 3, 5, 7) and blocks == (1, 3, 5, 7)


def test_the_array_on_disk_is_compressed_in_the_chosen_layout(tmp_path):
    image = np.zeros((1, 64, 64, 64), np.float32)
    image[:, 20:40, 20:40, 20:40] = np.random.default_rng(0).normal(size=(1, 20, 20, 20))
    store.save_case(tmp_path, "c0", image, np.zeros((1, 64, 64, 64), np.int8), PROPERTIES)
    opened, _ = store.open_case_arrays(tmp_path, "c0")
    assert isinstance(opened, blosc2.NDArray)
    assert opened.chunks == (1, 32, 64, 64) and opened.blocks == (1, 8, 16, 16)
    assert (tmp_path / "c0.b2nd").stat().st_size < image.nbytes / 5


def test_interrupted_write_leaves_no_file_under_the_final_name_and_no_complete_case(tmp_path, monkeypatch):
    image, seg = _case()
    real_asarray = blosc2.asarray

    def write_half_then_fail(array, urlpath=None, **kwargs):
        real_asarray(array[:, : array.shape[1] // 2], urlpath=urlpath, **kwargs)  # a partial file on disk
        raise OSError("disk full")

    monkeypatch.setattr(blosc2, "asarray", write_half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        store.save_case(tmp_path, "c0", image, seg, PROPERTIES)
    assert list(tmp_path.iterdir()) == []  # neither the final name nor the temporary file
    assert not store.is_complete(tmp_path, "c0") and store.list_cases(tmp_path) == []


def test_interrupted_overwrite_makes_the_old_case_incomplete(tmp_path, monkeypatch):
    image, seg = _case()
    store.save_case(tmp_path, "c0", image, seg, PROPERTIES)
    real_asarray, calls = blosc2.asarray, []

    def fail_on_seg(array, urlpath=None, **kwargs):
        calls.append(urlpath)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_asarray(array, urlpath=urlpath, **kwargs)

    monkeypatch.setattr(blosc2, "asarray", fail_on_seg)
    with pytest.raises(KeyboardInterrupt):
        store.save_case(tmp_path, "c0", image + 1, seg, PROPERTIES)
    # The new image is in place beside the old seg: the case must not count as complete.
    assert np.array_equal(store.load_case_image(tmp_path, "c0"), image + 1)
    assert not store.is_complete(tmp_path, "c0") and store.list_cases(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c0.b2nd", "c0_seg.b2nd"]


def test_properties_written_last_mark_completeness(tmp_path, monkeypatch):
    image, seg = _case()

    def fail(*args, **kwargs):
        raise OSError("no space for the json")

    monkeypatch.setattr(store, "write_json", fail)
    with pytest.raises(OSError):
        store.save_case(tmp_path, "c0", image, seg, PROPERTIES)
    assert (tmp_path / "c0.b2nd").is_file() and not store.is_complete(tmp_path, "c0")


def test_missing_arrays_and_newer_formats_are_named(tmp_path):
    image, seg = _case()
    store.save_case(tmp_path, "c0", image, seg, PROPERTIES)
    (tmp_path / "c0_seg.b2nd").unlink()
    assert not store.is_complete(tmp_path, "c0")
    with pytest.raises(store.PreprocessedDataError, match=r"c0_seg\.b2nd.*--steps preprocess"):
        store.open_case_arrays(tmp_path, "c0")
    (tmp_path / "c0.json").write_text(json.dumps({"format_version": store.FORMAT_VERSION + 1}))
    with pytest.raises(store.PreprocessedDataError, match=rf"c0.json.*format_version "
                                                          rf"{store.FORMAT_VERSION + 1}.*upgrade autoseg"):
        store.load_properties(tmp_path, "c0")
    with pytest.raises(TypeError, match="signed integer"):
        store.save_case(tmp_path, "c1", image, seg.astype(np.float32), PROPERTIES)


def test_atomic_writes_get_ordinary_file_permissions(tmp_path):
    """Results are shared between people: an atomically written file must not stay private (0600)."""
    import os
    import stat

    from autoseg.atomic import _UMASK, write_json

    write_json(tmp_path / "a.json", {"x": 1})
    mode = stat.S_IMODE(os.stat(tmp_path / "a.json").st_mode)
    assert mode == 0o666 & ~_UMASK
    if not _UMASK & 0o044:  # the usual umask 022: readable by group and others, unlike mkstemp's 0600
        assert mode & 0o044


def test_atomic_dir_keeps_the_old_folder_on_failure_and_leaves_nothing_when_another_writer_won(tmp_path, monkeypatch):
    """A failed swap keeps the previous folder; losing a race to a parallel writer leaves no stale copy behind."""
    import os
    from pathlib import Path

    from autoseg import atomic

    final = tmp_path / "cache"
    final.mkdir()
    (final / "a").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic.atomic_dir(final) as tmp:
            (tmp / "a").write_text("new")
            raise RuntimeError("failed while writing")
    assert (final / "a").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["cache"]

    real_replace = os.replace

    def parallel_writer_wins(src, dst):
        if Path(dst) == final and Path(src).name.startswith(".cache.") and not Path(src).name.endswith(".old"):
            final.mkdir()  # another process swapped its own folder in after ours was moved aside
            (final / "a").write_text("theirs")
            raise OSError(39, "Directory not empty")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", parallel_writer_wins)
    with pytest.raises(OSError):
        with atomic.atomic_dir(final) as tmp:
            (tmp / "a").write_text("ours")
    assert (final / "a").read_text() == "theirs" and sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_class_locations_come_back_as_written_and_older_list_files_are_read(tmp_path):
    from autoseg.dataset.image_io import Geometry
    from autoseg.preprocessing.properties import CaseProperties

    geometry = Geometry((1.0,) * 3, (0.0,) * 3, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), (4, 5, 6))
    locations = {"1": np.array([[0, 1, 2], [3, 4, 5]]), "2": np.zeros((0, 3), np.int64)}
    properties = CaseProperties(geometry, ((0, 4), (0, 5), (0, 6)), (4, 5, 6), (4, 5, 6), (1.0,) * 3, "k", locations)
    again = CaseProperties.from_json(properties.to_json())
    assert again.class_locations.keys() == locations.keys()
    assert all(np.array_equal(again.class_locations[k], v) for k, v in locations.items())
    older = {**properties.to_json(), "class_locations": {"1": [[0, 1, 2], [3, 4, 5]]}}
    del older["class_locations_encoding"]
    assert CaseProperties.from_json(older).class_locations["1"].tolist() == [[0, 1, 2], [3, 4, 5]]
