"""Dataset fingerprint: spacings, shapes, crop boxes and foreground intensities."""

import json

import numpy as np
import pytest
from conftest import synthetic_case, write_sitk

from autoseg import fingerprint as fp_module
from autoseg.dataset.layout import load_dataset
from autoseg.fingerprint import (
    IntensityStats,
    channel_kind,
    compute_fingerprint,
    fingerprint_case,
    load_fingerprint,
    nonzero_bounding_box,
    save_fingerprint,
)

SHAPES = [(12, 16, 14), (10, 20, 18), (14, 12, 16)]
SPACINGS = [(3.0, 0.75, 0.75), (2.5, 0.5, 0.5), (4.0, 1.0, 1.0)]


@pytest.fixture
def dataset(make_decathlon):
    return load_dataset(make_decathlon(channels=("T1", "T2"), shapes=SHAPES, spacings=SPACINGS, margin=2))


def _numpy_stats(values):
    v = values.astype(np.float64)
    return IntensityStats(v.mean(), v.std(), v.min(), v.max(), np.median(v), np.percentile(v, 0.5),
                          np.percentile(v, 99.5))


def _assert_stats_equal(actual, expected):
    for name in ("mean", "std", "min", "max", "median", "percentile_00_5", "percentile_99_5"):
        assert getattr(actual, name) == pytest.approx(getattr(expected, name), rel=1e-6), name


def test_spacing_shape_and_cropped_shape_of_known_cases(dataset):
    fingerprint = compute_fingerprint(dataset, progress=False)
    assert [c.case_id for c in fingerprint.cases] == ["case_000", "case_001", "case_002"]
    for case, shape, spacing in zip(fingerprint.cases, SHAPES, SPACINGS):
        assert case.spacing == spacing
        assert case.shape == shape
        assert case.nonzero_bbox == tuple((2, n - 2) for n in shape)  # a 2-voxel zero margin on every face
        assert case.cropped_shape == tuple(n - 4 for n in shape)
    np.testing.assert_array_equal(fingerprint.spacings, np.array(SPACINGS))
    assert fingerprint.median_cropped_fraction == pytest.approx(
        np.median([np.prod([n - 4 for n in s]) / np.prod(s) for s in SHAPES]))


def test_foreground_intensity_stats_equal_numpy_on_the_foreground(dataset):
    fingerprint = compute_fingerprint(dataset, progress=False)
    pooled = [[], []]
    for i, (case, shape) in enumerate(zip(fingerprint.cases, SHAPES)):
        image, label = synthetic_case(shape, channels=2, seed=i)
        assert case.foreground_voxels == int((label > 0).sum())
        for c in range(2):
            foreground = image[c][label > 0]
            _assert_stats_equal(case.foreground_intensities[c], _numpy_stats(foreground))
            pooled[c].append(foreground)
    # The pooled sample is drawn from the cases' foreground: its range lies inside theirs.
    for c in range(2):
        everything = np.concatenate(pooled[c])
        stats = fingerprint.foreground_intensities[c]
        assert everything.min() <= stats.min and stats.max <= everything.max()
        assert stats.mean == pytest.approx(np.mean([f.mean() for f in pooled[c]]), rel=0.05)


def test_every_case_contributes_the_same_number_of_samples_whatever_its_foreground(make_decathlon, monkeypatch):
    """A case with a tiny structure counts as much in the dataset statistics as one with a large one
    (nnU-Net's rule)."""
    dataset = load_dataset(make_decathlon(n_cases=2, shapes=[(32, 32, 32), (12, 12, 12)], margin=1))
    big, big_samples = fingerprint_case(dataset.cases[0], 1, seed=0, num_samples=500)
    small, small_samples = fingerprint_case(dataset.cases[1], 1, seed=1, num_samples=500)
    assert small.foreground_voxels < 500 < big.foreground_voxels
    assert big_samples.shape == small_samples.shape == (1, 500) and big_samples.dtype == np.float32
    image, label = synthetic_case((12, 12, 12), margin=1, seed=1)
    assert set(small_samples[0].tolist()) <= set(image[0][label > 0].tolist())  # drawn with replacement
    _assert_stats_equal(small.foreground_intensities[0], _numpy_stats(image[0][label > 0]))  # case stats exact

    pooled_sizes = []
    real_of = IntensityStats.of
    monkeypatch.setattr(IntensityStats, "of", classmethod(lambda cls, v: (pooled_sizes.append(v.size), real_of(v))[1]))
    compute_fingerprint(dataset, progress=False, total_samples=300)
    assert pooled_sizes[-1] == 300  # a fixed total, 150 per case


def test_a_case_without_foreground_adds_no_samples(make_decathlon):
    dataset = load_dataset(make_decathlon(n_cases=1, shape=(12, 12, 12)))
    write_sitk(dataset.cases[0].label_file, np.zeros((12, 12, 12), np.uint8))
    case_fp, samples = fingerprint_case(dataset.cases[0], 1, seed=0, num_samples=100)
    assert case_fp.foreground_voxels == 0 and samples.shape == (1, 0)


def test_channel_kind_is_the_normalization_the_name_declares(make_nnunetv2):
    assert [channel_kind(n) for n in ("CT", "ct", "cT")] == ["ct"] * 3
    assert [channel_kind(n) for n in ("noNorm", "NONORM", "rescale_to_0_1", "rgb_to_0_1", "zscore")] == [
        "noNorm", "noNorm", "rescale_to_0_1", "rgb_to_0_1", "zscore"]
    # nnU-Net reads the whole name: anything else is z-scored, CT variants included
    assert [channel_kind(n) for n in ("MRI", "T1", "FLAIR", "PET", "CT_venous", "R")] == ["zscore"] * 6
    fingerprint = compute_fingerprint(load_dataset(make_nnunetv2(channels=("CT", "PET"), kind="ct")), progress=False)
    assert fingerprint.channel_kinds == ("ct", "zscore")


def test_fingerprint_json_round_trip(dataset, tmp_path):
    fingerprint = compute_fingerprint(dataset, progress=False)
    save_fingerprint(fingerprint, tmp_path / "ws" / "fingerprint.json")
    back = load_fingerprint(tmp_path / "ws" / "fingerprint.json")
    assert back == fingerprint
    assert back.labels == {0: "background", 1: "liver", 2: "tumour"}
    assert [p.name for p in (tmp_path / "ws").iterdir()] == ["fingerprint.json"]


def test_fingerprint_of_another_format_version_is_refused(dataset, tmp_path):
    data = compute_fingerprint(dataset, progress=False).to_json()
    data["format_version"] = 99
    with pytest.raises(fp_module.FingerprintError, match="rerun"):
        fp_module.Fingerprint.from_json(data)
    path = tmp_path / "fingerprint.json"
    path.write_text(json.dumps(data))
    with pytest.raises(fp_module.FingerprintError, match=rf"{path}: fingerprint format_version 99.*rerun"):
        fp_module.load_fingerprint(path)


def test_cli_errors_a_user_can_fix_are_one_line_not_a_traceback(tmp_path, capsys):
    """A damaged JSON artifact and a mistyped --fold print one line naming the file or value, exit status 2."""
    from autoseg.cli import main

    (tmp_path / "plans.json").write_text('{"format_version": 2, "labels": ')
    assert main(["train", str(tmp_path), "--fold", "0"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'plans.json'}: not valid JSON" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as stop:
        main(["train", str(tmp_path), "--fold", "abc"])
    assert stop.value.code == 2 and "'abc' is not a fold number (0-4) or 'all'" in capsys.readouterr().err


def test_nonzero_bounding_box_uses_any_channel_and_keeps_empty_images_whole():
    image = np.zeros((2, 5, 6, 7), np.float32)
    image[0, 1, 2, 3] = 1
    image[1, 3, 4, 5] = -2
    assert nonzero_bounding_box(image) == ((1, 4), (2, 5), (3, 6))
    assert nonzero_bounding_box(np.zeros((1, 3, 4, 5))) == ((0, 3), (0, 4), (0, 5))


def test_real_hippocampus_fingerprint(hippocampus_subset):
    fingerprint = compute_fingerprint(load_dataset(hippocampus_subset), progress=False)
    assert fingerprint.channel_kinds == ("zscore",)
    assert len(fingerprint.cases) == 4
    for case in fingerprint.cases:
        assert np.allclose(case.spacing, 1.0)
        assert 20 <= min(case.shape) and max(case.shape) <= 64
        assert case.foreground_voxels > 0
        stats = case.foreground_intensities[0]
        assert stats.min <= stats.percentile_00_5 <= stats.median <= stats.percentile_99_5 <= stats.max
