"""Dataset fingerprint: spacings, shapes, crop boxes and foreground intensities."""

import numpy as np
import pytest

from autoseg import fingerprint as fp_module
from autoseg.dataset.layout import load_dataset
from autoseg.fingerprint import (IntensityStats, channel_kind, compute_fingerprint, fingerprint_case,
                                 load_fingerprint, nonzero_bounding_box, save_fingerprint)

from conftest import synthetic_case

SHAPES = [(12, 16, 14), (10, 20, 18), (14, 12, 16)]
SPACINGS = [(3.0, 0.75, 0.75), (2.5, 0.5, 0.5), (4.0, 1.0, 1.0)]


@pytest.fixture
def dataset(make_decathlon):
    return load_dataset(make_decathlon(channels=("T1", "T2"), shapes=SHAPES, spacings=SPACINGS, margin=2))


def _numpy_stats(values):
    v = values.astype(np.float64)
    return IntensityStats(v.mean(), v.std(), v.min(), v.max(), np.median(v), np.percentile(v, 0.5), np.percentile(v, 99.5))


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
    # Every case has fewer foreground voxels than the sample cap, so the pooled stats are exact too.
    for c in range(2):
        _assert_stats_equal(fingerprint.foreground_intensities[c], _numpy_stats(np.concatenate(pooled[c])))


def test_intensity_sample_is_capped_per_case_while_case_stats_stay_exact(make_decathlon, monkeypatch):
    dataset = load_dataset(make_decathlon(n_cases=2, shape=(32, 32, 32), margin=1))
    case_fp, samples = fingerprint_case(dataset.cases[0], 1, seed=0)
    assert case_fp.foreground_voxels > fp_module.SAMPLES_PER_CASE
    assert samples.shape == (1, fp_module.SAMPLES_PER_CASE) and samples.dtype == np.float32
    image, label = synthetic_case((32, 32, 32), margin=1, seed=0)
    _assert_stats_equal(case_fp.foreground_intensities[0], _numpy_stats(image[0][label > 0]))
    assert set(samples[0].tolist()) <= set(image[0][label > 0].tolist())

    monkeypatch.setattr(fp_module, "SAMPLES_PER_CASE", 50)
    pooled_sizes = []
    real_of = IntensityStats.of
    monkeypatch.setattr(IntensityStats, "of", classmethod(lambda cls, v: (pooled_sizes.append(v.size), real_of(v))[1]))
    compute_fingerprint(dataset, progress=False)
    assert pooled_sizes[-1] == 2 * 50  # the dataset-wide stats see at most the cap per case


def test_ct_channel_kind_comes_from_the_channel_name(make_nnunetv2):
    assert [channel_kind(n) for n in ("CT", "ct", "CT_venous", "noncontrast CT")] == ["ct"] * 4
    assert [channel_kind(n) for n in ("MRI", "T1", "FLAIR", "spectral", "PET")] == ["mri"] * 5
    fingerprint = compute_fingerprint(load_dataset(make_nnunetv2(channels=("CT", "PET"), kind="ct")), progress=False)
    assert fingerprint.channel_kinds == ("ct", "mri")


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
    with pytest.raises(ValueError, match="rerun"):
        fp_module.Fingerprint.from_json(data)


def test_nonzero_bounding_box_uses_any_channel_and_keeps_empty_images_whole():
    image = np.zeros((2, 5, 6, 7), np.float32)
    image[0, 1, 2, 3] = 1
    image[1, 3, 4, 5] = -2
    assert nonzero_bounding_box(image) == ((1, 4), (2, 5), (3, 6))
    assert nonzero_bounding_box(np.zeros((1, 3, 4, 5))) == ((0, 3), (0, 4), (0, 5))


def test_real_hippocampus_fingerprint(hippocampus_subset):
    fingerprint = compute_fingerprint(load_dataset(hippocampus_subset), progress=False)
    assert fingerprint.channel_kinds == ("mri",)
    assert len(fingerprint.cases) == 4
    for case in fingerprint.cases:
        assert np.allclose(case.spacing, 1.0)
        assert 20 <= min(case.shape) and max(case.shape) <= 64
        assert case.foreground_voxels > 0
        stats = case.foreground_intensities[0]
        assert stats.min <= stats.percentile_00_5 <= stats.median <= stats.percentile_99_5 <= stats.max
