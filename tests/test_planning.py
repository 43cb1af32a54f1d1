"""Planning from known fingerprints: target spacing, axis order, patch, topology, batch, normalization."""

import math

import numpy as np
import pytest

from autoseg.fingerprint import CaseFingerprint, Fingerprint, IntensityStats
from autoseg.planning.planner import (MAX_BATCH_FRACTION_OF_DATASET, MIN_BATCH_SIZE, PlanError, explain_plans,
                                      load_plans, plan_experiment, save_plans)
from autoseg.planning.spacing import choose_target_spacing, transpose_thick_axis_first
from autoseg.planning.topology import plan_topology

STATS = IntensityStats(mean=60.0, std=30.0, min=-200.0, max=1500.0, median=55.0,
                       percentile_00_5=-50.0, percentile_99_5=400.0)


def make_fingerprint(shape, spacing, n_cases, channels=("MRI",), kinds=("mri",), spacings=None,
                     cropped_fraction=1.0, labels=3):
    """Cases of one shape; `spacings` (one per case) overrides `spacing`; cropping keeps `cropped_fraction` of the volume."""
    keep = cropped_fraction ** (1 / 3)
    bbox = tuple((0, max(1, round(n * keep))) for n in shape)
    cases = tuple(
        CaseFingerprint(f"case_{i:03d}", tuple(spacings[i] if spacings else spacing), tuple(shape), bbox, 1000,
                        (STATS,) * len(channels))
        for i in range(n_cases))
    label_names = {0: "background", **{k: f"label{k}" for k in range(1, labels)}}
    return Fingerprint("Test", tuple(channels), tuple(kinds), label_names, cases, (STATS,) * len(channels))


def _coarsest_feature_map(config):
    return [p // int(np.prod([s[a] for s in config["strides"]])) for a, p in enumerate(config["patch_size"])]


HIPPOCAMPUS = make_fingerprint((36, 50, 35), (1.0, 1.0, 1.0), 208)
ANISOTROPIC = make_fingerprint((20, 256, 256), (5.0, 0.8, 0.8), 40,
                               spacings=[(3.0 + 0.1 * i, 0.8, 0.8) for i in range(40)])
LARGE = make_fingerprint((300, 512, 512), (1.0, 1.0, 1.0), 20)


def test_hippocampus_like_plan():
    plans = plan_experiment(HIPPOCAMPUS)
    full = plans["configurations"]["3d_fullres"]
    assert full["spacing"] == [1.0, 1.0, 1.0]
    assert full["patch_size"] == [40, 56, 40]
    assert len(full["strides"]) == 4 and full["strides"][0] == [1, 1, 1]
    assert full["kernel_sizes"] == [[3, 3, 3]] * 4
    assert full["batch_size"] == 7
    assert full["data_identifier"] == "fullres" and full["n_conv_per_stage"] == 2
    assert "3d_lowres" not in plans["configurations"]
    assert plans["anisotropic"] is False and plans["transpose_forward"] == [0, 1, 2]
    assert plans["labels"] == {"0": "background", "1": "label1", "2": "label2"}
    assert len(plans["configurations"]["2d"]["patch_size"]) == 2


def test_anisotropic_data_puts_the_thick_axis_first_and_avoids_pooling_it_early():
    plans = plan_experiment(ANISOTROPIC)
    assert plans["transpose_forward"] == [0, 1, 2] and plans["anisotropic"] is True
    full = plans["configurations"]["3d_fullres"]
    thick_spacings = [3.0 + 0.1 * i for i in range(40)]
    assert full["spacing"] == pytest.approx([np.percentile(thick_spacings, 10), 0.8, 0.8])
    assert full["kernel_sizes"][0] == [1, 3, 3]
    assert full["strides"][1] == [1, 2, 2]
    assert plans["resampling"]["thick_axis_order"] == 1
    assert "in-plane" in plans["reasons"]["anisotropic"]


def test_thick_axis_stored_last_is_moved_first():
    fingerprint = make_fingerprint((256, 256, 20), (0.8, 0.8, 5.0), 30)
    plans = plan_experiment(fingerprint)
    assert plans["transpose_forward"] == [2, 0, 1]
    assert plans["transpose_backward"] == [1, 2, 0]
    full = plans["configurations"]["3d_fullres"]
    assert full["spacing"] == [5.0, 0.8, 0.8]  # same spacing everywhere: the 10th percentile is the median
    assert full["median_shape"] == [20, 256, 256]
    assert full["kernel_sizes"][0] == [1, 3, 3] and full["strides"][1][0] == 1
    assert plans["configurations"]["2d"]["patch_size"] == [256, 256]


def test_target_spacing_uses_the_10th_percentile_on_the_thick_axis_only_when_anisotropic():
    spacings = np.array([[s, 0.7, 0.7] for s in (2.5, 3.0, 4.0, 5.0, 5.0, 6.0)])
    target, _ = choose_target_spacing(spacings)
    assert target == pytest.approx([np.percentile(spacings[:, 0], 10), 0.7, 0.7])
    iso = np.array([[1.0, 1.0, 1.0], [1.2, 1.1, 1.1], [1.4, 0.9, 0.9]])
    assert choose_target_spacing(iso)[0] == pytest.approx(list(np.median(iso, axis=0)))
    assert transpose_thick_axis_first([0.7, 3.0, 0.7]) == [1, 0, 2]


def test_kernel_along_an_axis_stays_3_once_it_is_3():
    topology = plan_topology([10, 128, 128], [5.0, 0.8, 0.8], max_stages=6)
    kernels = np.array(topology.kernel_sizes)
    assert kernels[0].tolist() == [1, 3, 3]
    for axis in range(3):
        first_3 = int(np.argmax(kernels[:, axis] == 3))
        assert (kernels[first_3:, axis] == 3).all(), topology.kernel_sizes


def test_large_volume_gets_a_coarser_lowres_configuration_within_the_memory_budget():
    plans = plan_experiment(LARGE, budget_gb=8.0)
    full, low = plans["configurations"]["3d_fullres"], plans["configurations"]["3d_lowres"]
    assert low["data_identifier"] == "lowres"
    assert all(l > f for l, f in zip(low["spacing"], full["spacing"]))
    assert np.prod(low["median_shape"]) < np.prod(full["median_shape"])
    assert np.prod(low["median_shape"]) / np.prod(low["patch_size"]) <= 2.0 + 1e-9
    for config in plans["configurations"].values():
        assert config["estimated_memory_gb"] <= 8.0


@pytest.mark.parametrize("fingerprint", [HIPPOCAMPUS, ANISOTROPIC, LARGE], ids=["hippocampus", "anisotropic", "large"])
def test_every_configuration_keeps_the_coarsest_feature_map_at_least_4_and_fits_the_budget(fingerprint):
    plans = plan_experiment(fingerprint, budget_gb=6.0)
    for name, config in plans["configurations"].items():
        assert min(_coarsest_feature_map(config)) >= 4, (name, config["patch_size"], config["strides"])
        assert config["estimated_memory_gb"] <= 6.0, name
        assert len(config["kernel_sizes"]) == len(config["strides"]) == len(config["features_per_stage"])
        assert all(p % math.prod(s[a] for s in config["strides"]) == 0 for a, p in enumerate(config["patch_size"]))


@pytest.mark.parametrize("n_cases", [3, 20, 208, 1000])
def test_batch_never_covers_more_than_5_percent_of_the_dataset(n_cases):
    fingerprint = make_fingerprint((36, 50, 35), (1.0, 1.0, 1.0), n_cases)
    dataset_voxels = n_cases * 36 * 50 * 35
    for name, config in plan_experiment(fingerprint)["configurations"].items():
        covered = config["batch_size"] * math.prod(config["patch_size"])
        assert config["batch_size"] == MIN_BATCH_SIZE or covered <= MAX_BATCH_FRACTION_OF_DATASET * dataset_voxels, name
    assert plan_experiment(fingerprint)["configurations"]["3d_fullres"]["batch_size"] >= MIN_BATCH_SIZE


def test_smaller_memory_budget_gives_a_smaller_or_equal_patch():
    fingerprint = make_fingerprint((20, 256, 256), (5.0, 0.8, 0.8), 40)
    previous = None
    for budget in (16.0, 8.0, 4.0, 2.0, 1.0):
        config = plan_experiment(fingerprint, budget_gb=budget, configurations=["3d_fullres"])["configurations"]["3d_fullres"]
        assert config["estimated_memory_gb"] <= budget
        voxels = math.prod(config["patch_size"])
        if previous is not None:
            assert voxels <= previous
        previous = voxels


def test_normalization_ct_clips_and_mri_zscores():
    fingerprint = make_fingerprint((64, 64, 64), (1.0, 1.0, 1.0), 10, channels=("CT", "T2"), kinds=("ct", "mri"))
    ct, mri = plan_experiment(fingerprint)["normalization"]
    assert ct["scheme"] == "ct" and ct["clip"] == [-50.0, 400.0]
    assert (ct["mean"], ct["std"]) == (60.0, 30.0) and ct["use_nonzero_mask"] is False
    assert mri["scheme"] == "zscore" and mri["use_nonzero_mask"] is False


def test_nonzero_mask_for_mri_when_cropping_removes_much():
    cropped = make_fingerprint((64, 64, 64), (1.0, 1.0, 1.0), 10, channels=("T1", "CT"), kinds=("mri", "ct"),
                               cropped_fraction=0.4)
    t1, ct = plan_experiment(cropped)["normalization"]
    assert t1["use_nonzero_mask"] is True and "non-zero" in t1["reason"]
    assert ct["use_nonzero_mask"] is False


def test_only_the_requested_configurations_are_planned_and_unknown_ones_refused():
    plans = plan_experiment(LARGE, configurations=["2d"])
    assert list(plans["configurations"]) == ["2d"]
    with pytest.raises(PlanError, match="3d_highres"):
        plan_experiment(LARGE, configurations=["3d_highres"])
    with pytest.raises(PlanError, match="no cases"):
        plan_experiment(make_fingerprint((8, 8, 8), (1.0, 1.0, 1.0), 0))


def test_plans_json_round_trip_and_explain_table(tmp_path):
    plans = plan_experiment(ANISOTROPIC)
    save_plans(plans, tmp_path / "plans.json")
    assert load_plans(tmp_path / "plans.json") == plans
    table = explain_plans(plans)
    for word in ("patch_size", "batch_size", "spacing", "normalization[MRI]", "3d_fullres", "2d"):
        assert word in table
    with pytest.raises(PlanError, match="autoseg plan"):
        load_plans(tmp_path / "missing.json")
