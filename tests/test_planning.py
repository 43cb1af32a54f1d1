"""Planning from known fingerprints: the rules of nnU-Net v2's planner, and the reference plans it makes."""

import json
import math

import numpy as np
import pytest

from autoseg.fingerprint import CaseFingerprint, Fingerprint, IntensityStats, channel_kind
from autoseg.planning.planner import (
    MIN_BATCH_SIZE,
    PlanError,
    estimate_memory_gb,
    explain_plans,
    plan_configuration,
    plan_experiment,
)
from autoseg.planning.plans import Plans
from autoseg.planning.presets import DEFAULT, PRESETS
from autoseg.planning.spacing import choose_target_spacing, transpose_thick_axis_first
from autoseg.planning.topology import plan_topology

STATS = IntensityStats(mean=60.0, std=30.0, min=-200.0, max=1500.0, median=55.0,
                       percentile_00_5=-50.0, percentile_99_5=400.0)


def make_fingerprint(shape, spacing, n_cases, channels=("MRI",), spacings=None, shapes=None,
                     cropped_fraction=1.0, labels=3):
    """Cases of one shape (or `shapes`, one per case); `spacings` (one per case) overrides `spacing`;
    cropping keeps `cropped_fraction` of the volume."""
    keep = cropped_fraction ** (1 / 3)
    cases = []
    for i in range(n_cases):
        case_shape = tuple(shapes[i]) if shapes else tuple(shape)
        bbox = tuple((0, max(1, round(n * keep))) for n in case_shape)
        cases.append(CaseFingerprint(f"case_{i:03d}", tuple(spacings[i] if spacings else spacing), case_shape, bbox,
                                     1000, (STATS,) * len(channels)))
    label_names = {0: "background", **{k: f"label{k}" for k in range(1, labels)}}
    return Fingerprint("Test", tuple(channels), tuple(channel_kind(c) for c in channels), label_names, tuple(cases),
                       (STATS,) * len(channels))


def coarsest_feature_map(config):
    return [p // math.prod(s[a] for s in config.strides) for a, p in enumerate(config.patch_size)]


HIPPOCAMPUS = make_fingerprint((36, 50, 35), (1.0, 1.0, 1.0), 208)
ANISOTROPIC = make_fingerprint((20, 256, 256), (5.0, 0.8, 0.8), 40,
                               spacings=[(3.0 + 0.1 * i, 0.8, 0.8) for i in range(40)])
LARGE = make_fingerprint((300, 512, 512), (1.0, 1.0, 1.0), 20)


# --- reference plans: the plans nnU-Net v2 2.8.1 makes for these fingerprints (8 GB) ------------------------


def test_hippocampus_plan_matches_nnunet():
    plans = plan_experiment(HIPPOCAMPUS)
    full = plans.configurations["3d_fullres"]
    assert full.spacing == (1.0, 1.0, 1.0) and full.patch_size == (40, 56, 40)
    assert full.strides == ((1, 1, 1),) + ((2, 2, 2),) * 3
    assert full.kernel_sizes == ((3, 3, 3),) * 4
    assert full.batch_size == 7 and full.batch_dice is False
    assert full.data_identifier == "3d_fullres" and full.n_conv_per_stage == 2
    assert "3d_lowres" not in plans.configurations and "3d_lowres" in plans.not_planned
    assert plans.transpose_forward == (0, 1, 2) and plans.default_configuration == "3d_fullres"
    two_d = plans.configurations["2d"]
    assert two_d.patch_size == (56, 40) and two_d.spacing == (1.0, 1.0) and two_d.batch_dice is True


def test_brats_like_plan_is_128_cubed_at_batch_2():
    brats = make_fingerprint((138, 169, 138), (1.0, 1.0, 1.0), 484, channels=("FLAIR", "T1w", "t1gd", "T2w"),
                             labels=4)
    full = plan_experiment(brats).configurations["3d_fullres"]
    assert full.patch_size == (128, 128, 128) and full.batch_size == 2
    assert len(full.strides) == 6 and coarsest_feature_map(full) == [4, 4, 4]


def test_left_atrium_plan_covers_the_slices_and_keeps_nnunets_2d_batch():
    atrium = make_fingerprint((88, 142, 192), (0.625, 0.625, 0.625), 80, labels=2)
    plans = plan_experiment(atrium)
    assert plans.configurations["3d_fullres"].patch_size == (96, 128, 192)
    assert plans.configurations["2d"].batch_size == 106


# --- topology ------------------------------------------------------------------------------------------------


def test_slab_patch_keeps_pooling_in_plane_after_the_thin_axis_stops():
    topology = plan_topology([24, 256, 256], [1.0, 1.0, 1.0])
    coarsest = [p // t for p, t in zip(topology.patch_size, topology.total_stride)]
    assert coarsest == [6, 4, 4]
    assert topology.num_stages == 7  # no fixed cap on the number of stages


def test_a_single_remaining_axis_pools_only_while_it_has_12_voxels():
    topology = plan_topology([8, 8, 64], [1.0, 1.0, 1.0])
    assert [p // t for p, t in zip(topology.patch_size, topology.total_stride)] == [4, 4, 8]


def test_axis_exactly_2x_coarser_gets_kernel_1_and_waits_one_pooling():
    topology = plan_topology([32, 64, 64], [2.0, 1.0, 1.0])
    assert topology.kernel_sizes[0] == (1, 3, 3) and topology.strides[1] == (1, 2, 2)
    assert topology.kernel_sizes[1] == (3, 3, 3) and topology.strides[2] == (2, 2, 2)
    just_under = plan_topology([32, 64, 64], [1.99, 1.0, 1.0])
    assert just_under.kernel_sizes[0] == (3, 3, 3) and just_under.strides[1] == (2, 2, 2)


def test_bottleneck_kernel_is_3_along_every_axis_even_a_thick_one():
    topology = plan_topology([8, 448, 448], [10.0, 0.5, 0.5])
    assert topology.kernel_sizes[-1] == (3, 3, 3)
    assert topology.kernel_sizes[0] == (1, 3, 3)
    kernels = np.array(topology.kernel_sizes[:-1])
    for axis in range(3):  # once 3, stays 3
        first_3 = int(np.argmax(kernels[:, axis] == 3))
        assert (kernels[first_3:, axis] == 3).all(), topology.kernel_sizes


# --- patch search and memory ---------------------------------------------------------------------------------


def test_thick_slab_dataset_ends_within_the_memory_budget():
    slabs = make_fingerprint((8, 512, 512), (10.0, 0.5, 0.5), 30, labels=2)
    for config in plan_experiment(slabs).configurations.values():
        assert config.estimated_memory_gb <= 8.0


def test_patch_search_shrinks_another_axis_when_the_first_cannot_shrink():
    # axis 0 covers all of its median extent, so it is shrunk first, down to a single voxel; then the others
    config = plan_configuration([1.0, 1.0, 1.0], [4.0, 1000.0, 1000.0], 1e9, 3, budget_gb=0.2,
                                data_identifier="3d_fullres")
    assert config.patch_size[0] == 1 and config.estimated_memory_gb <= 0.2
    assert config.patch_size[1] < 256 and config.patch_size[2] < 256


@pytest.mark.parametrize("fingerprint", [HIPPOCAMPUS, ANISOTROPIC, LARGE], ids=["hippocampus", "anisotropic", "large"])
def test_every_configuration_keeps_the_coarsest_feature_map_at_least_4_and_fits_the_budget(fingerprint):
    plans = plan_experiment(fingerprint, budget_gb=6.0)
    for name, config in plans.configurations.items():
        assert min(coarsest_feature_map(config)) >= 4, (name, config.patch_size, config.strides)
        # batch 2 always fits; a larger batch is the nearest whole number of samples to the budget (nnU-Net rounds)
        batch = config.batch_size
        assert config.estimated_memory_gb * min(batch, 2) / batch <= 6.0, name
        assert config.estimated_memory_gb * (batch - 0.5) / batch <= 6.0 + 0.01, name
        assert len(config.kernel_sizes) == len(config.strides) == len(config.features_per_stage)
        assert all(p % math.prod(s[a] for s in config.strides) == 0 for a, p in enumerate(config.patch_size))


@pytest.mark.parametrize("n_cases", [3, 20, 208, 1000])
def test_batch_never_covers_more_than_5_percent_of_the_dataset(n_cases):
    fingerprint = make_fingerprint((36, 50, 35), (1.0, 1.0, 1.0), n_cases)
    dataset_voxels = n_cases * 36 * 50 * 35
    for name, config in plan_experiment(fingerprint).configurations.items():
        covered = config.batch_size * math.prod(config.patch_size)
        # nnU-Net rounds the 5% batch to the nearest integer, so allow half a patch over
        limit = (PRESETS[DEFAULT].max_dataset_fraction_per_batch * dataset_voxels + 0.5 * math.prod(config.patch_size))
        assert config.batch_size == MIN_BATCH_SIZE or covered <= limit, name


def test_smaller_memory_budget_gives_a_smaller_or_equal_patch():
    fingerprint = make_fingerprint((20, 256, 256), (5.0, 0.8, 0.8), 40)
    previous = None
    for budget in (16.0, 8.0, 4.0, 2.0, 1.0):
        config = plan_experiment(fingerprint, budget_gb=budget,
                                 configurations=["3d_fullres"]).configurations["3d_fullres"]
        assert config.estimated_memory_gb <= budget
        voxels = math.prod(config.patch_size)
        if previous is not None:
            assert voxels <= previous
        previous = voxels


# --- target spacing, axis order --------------------------------------------------------------------------------


def test_anisotropic_data_with_few_slices_uses_the_10th_percentile_and_puts_the_thick_axis_first():
    plans = plan_experiment(ANISOTROPIC)
    full = plans.configurations["3d_fullres"]
    thick_spacings = [3.0 + 0.1 * i for i in range(40)]
    assert full.spacing == pytest.approx([np.percentile(thick_spacings, 10), 0.8, 0.8])
    assert full.kernel_sizes[0] == (1, 3, 3) and full.strides[1] == (1, 2, 2)
    assert plans.resampling.thick_axis_order == 0


def test_thick_ct_with_many_slices_keeps_the_median_spacing():
    spacings = [(s, 0.7, 0.7) for s in (1.5, 2.0, 2.5, 2.5, 2.5, 3.0, 5.0)]
    ct = make_fingerprint((200, 512, 512), None, 7, channels=("CT",), spacings=spacings)
    target, reason = choose_target_spacing(ct.spacings, ct.cropped_shapes)
    assert target == pytest.approx([2.5, 0.7, 0.7]) and "not 3x fewer" in reason
    few_slices = make_fingerprint((40, 512, 512), None, 7, channels=("CT",), spacings=spacings)
    assert choose_target_spacing(few_slices.spacings, few_slices.cropped_shapes)[0][0] == pytest.approx(
        np.percentile([s[0] for s in spacings], 10))


def test_thick_axis_stored_last_is_moved_first():
    plans = plan_experiment(make_fingerprint((256, 256, 20), (0.8, 0.8, 5.0), 30))
    assert plans.transpose_forward == (2, 0, 1) and plans.transpose_backward == (1, 2, 0)
    full = plans.configurations["3d_fullres"]
    assert full.spacing == (5.0, 0.8, 0.8) and full.median_shape == (20, 256, 256)
    assert plans.configurations["2d"].patch_size == (256, 256)
    assert transpose_thick_axis_first([0.7, 3.0, 0.7]) == [1, 0, 2]


# --- configurations ----------------------------------------------------------------------------------------------


def test_large_volume_gets_lowres_with_batch_dice_only_in_fullres():
    plans = plan_experiment(LARGE, budget_gb=8.0)
    full, low = plans.configurations["3d_fullres"], plans.configurations["3d_lowres"]
    assert low.data_identifier == "3d_lowres"
    assert all(lo > f for lo, f in zip(low.spacing, full.spacing))
    assert math.prod(low.patch_size) / math.prod(low.median_shape) >= 0.25 - 1e-3
    assert full.batch_dice is True and low.batch_dice is False
    assert plans.configurations["2d"].batch_dice is True


def test_lowres_coarsens_only_the_finer_axes_of_anisotropic_data():
    thick = make_fingerprint((60, 512, 512), (5.0, 0.8, 0.8), 40)
    plans = plan_experiment(thick)
    low = plans.configurations["3d_lowres"]
    assert low.spacing[0] == pytest.approx(5.0)
    assert low.spacing[1] > 0.8 and low.spacing[1] == pytest.approx(low.spacing[2])


def test_lowres_is_dropped_when_it_would_shrink_the_volume_too_little():
    plans = plan_experiment(make_fingerprint((224, 224, 224), (1.0, 1.0, 1.0), 20))
    full = plans.configurations["3d_fullres"]
    assert math.prod(full.patch_size) / math.prod(full.median_shape) < 0.25  # lowres was tried...
    assert "3d_lowres" not in plans.configurations  # ...and dropped
    assert "3d_lowres" in plans.not_planned and full.batch_dice is False


def test_2d_images_plan_only_2d_and_make_it_the_default():
    microscopy = make_fingerprint((1, 360, 360), (999.0, 1.0, 1.0), 40, channels=("R", "G", "B"), labels=2)
    plans = plan_experiment(microscopy)
    assert list(plans.configurations) == ["2d"] and plans.default_configuration == "2d"
    assert set(plans.not_planned) == {"3d_fullres", "3d_lowres", "3d_cascade_fullres"}
    assert plans.configurations["2d"].spacing == (1.0, 1.0)


def test_single_slice_nifti_with_a_thin_header_spacing_still_plans_2d_only():
    slices = make_fingerprint((1, 512, 512), (0.3, 0.5, 0.5), 30, labels=2)
    plans = plan_experiment(slices)
    assert list(plans.configurations) == ["2d"] and plans.default_configuration == "2d"
    assert plans.configurations["2d"].spacing == (0.5, 0.5)
    assert plans.configurations["2d"].patch_size == (512, 512)


def test_only_the_requested_configurations_are_planned_and_unknown_ones_refused():
    plans = plan_experiment(LARGE, configurations=["2d"])
    assert list(plans.configurations) == ["2d"] and plans.default_configuration == "2d"
    with pytest.raises(PlanError, match="3d_highres"):
        plan_experiment(LARGE, configurations=["3d_highres"])
    with pytest.raises(PlanError, match="no cases"):
        plan_experiment(make_fingerprint((8, 8, 8), (1.0, 1.0, 1.0), 0))


# --- normalization -------------------------------------------------------------------------------------------------


def test_normalization_scheme_comes_from_the_channel_name_as_in_nnunet():
    names = ("CT", "T2", "noNorm", "rescale_to_0_1", "RGB_to_0_1", "CT_venous")
    schemes = plan_experiment(make_fingerprint((64, 64, 64), (1.0, 1.0, 1.0), 10, channels=names)).normalization
    assert [s.scheme for s in schemes] == ["ct", "zscore", "noNorm", "rescale_to_0_1", "rgb_to_0_1", "zscore"]
    ct = schemes[0]
    assert ct.clip == (-50.0, 400.0) and (ct.mean, ct.std) == (60.0, 30.0)


def test_nonzero_mask_only_for_zscore_channels_when_cropping_removes_much():
    cropped = make_fingerprint((64, 64, 64), (1.0, 1.0, 1.0), 10, channels=("T1", "CT", "noNorm"), cropped_fraction=0.4)
    t1, ct, raw = plan_experiment(cropped).normalization
    assert t1.use_nonzero_mask is True and "non-zero" in t1.reason
    assert ct.use_nonzero_mask is False and raw.use_nonzero_mask is False
    whole = make_fingerprint((64, 64, 64), (1.0, 1.0, 1.0), 10, channels=("T1",), cropped_fraction=0.9)
    assert plan_experiment(whole).normalization[0].use_nonzero_mask is False


def test_memory_estimate_grows_with_the_batch():
    config = plan_experiment(HIPPOCAMPUS).configurations["3d_fullres"]
    assert config.estimated_memory_gb <= 8.0
    from autoseg.planning.topology import Topology
    topology = Topology(config.patch_size, config.strides, config.kernel_sizes, config.features_per_stage)
    assert estimate_memory_gb(topology, 4, 3) == pytest.approx(2 * estimate_memory_gb(topology, 2, 3))


def test_plans_json_round_trip_and_explain_table(tmp_path):
    plans = plan_experiment(ANISOTROPIC)
    plans.save(tmp_path / "plans.json")
    assert Plans.load(tmp_path / "plans.json") == plans
    assert json.loads((tmp_path / "plans.json").read_text()) == plans.to_json()
    table = explain_plans(plans)
    for word in ("patch_size", "batch_size", "batch_dice", "spacing", "normalization[MRI]", "3d_fullres", "2d",
                 "default_configuration"):
        assert word in table
    with pytest.raises(PlanError, match="autoseg plan"):
        Plans.load(tmp_path / "missing.json")


def test_tiff_stacks_plan_with_the_spacing_of_their_json_files(tmp_path):
    """nnU-Net v2 keeps a 3D TIFF's spacing in `<file>.json`; an anisotropic EM stack must plan anisotropic
    (thick axis kept coarse, 1x3x3 kernels first), not as the 1x1x1 the TIFF alone would say."""
    import SimpleITK as sitk
    from conftest import synthetic_case

    from autoseg.dataset.layout import load_dataset
    from autoseg.fingerprint import compute_fingerprint
    from autoseg.planning.planner import plan_experiment

    def dataset(root, spacing):
        for i in range(3):
            image, label = synthetic_case((8, 32, 32), 1, "mri", 2, seed=i)
            for path, array in ((root / "imagesTr" / f"em_{i:03d}_0000.tif", image[0].astype(np.uint8)),
                                (root / "labelsTr" / f"em_{i:03d}.tif", label.astype(np.uint8))):
                path.parent.mkdir(parents=True, exist_ok=True)
                sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
                if spacing:  # nnU-Net's naming: imagesTr/em_000.json for em_000_0000.tif, labelsTr/em_000.json
                    (path.parent / f"em_{i:03d}.json").write_text(json.dumps({"spacing": spacing}))
        (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "EM"},
                                                       "labels": {"background": 0, "a": 1, "b": 2},
                                                       "numTraining": 3, "file_ending": ".tif"}))
        fp = compute_fingerprint(load_dataset(root), workers=0, progress=False, total_samples=3000)
        return plan_experiment(fp).configurations["3d_fullres"]

    aniso = dataset(tmp_path / "with_json", [4.0, 1.0, 1.0])
    assert aniso.spacing == (4.0, 1.0, 1.0) and aniso.kernel_sizes[0] == (1, 3, 3)
    plain = dataset(tmp_path / "without_json", None)
    assert plain.spacing == (1.0, 1.0, 1.0) and plain.kernel_sizes[0] == (3, 3, 3)


def test_cascade_is_planned_with_lowres_as_fullres_reading_the_first_stage():
    plans = plan_experiment(LARGE, budget_gb=8.0)
    full, cascade = plans.configurations["3d_fullres"], plans.configurations["3d_cascade_fullres"]
    assert cascade.previous_stage == "3d_lowres" and full.previous_stage is None
    assert cascade.to_json() == {**full.to_json(), "previous_stage": "3d_lowres",
                                 "reasons": cascade.to_json()["reasons"]}
    assert plans.input_channels("3d_cascade_fullres") == plans.num_channels + len(plans.foreground_labels)
    assert plans.network_topology("3d_cascade_fullres").in_channels == plans.input_channels("3d_cascade_fullres")
    assert Plans.from_json(plans.to_json()).configurations["3d_cascade_fullres"] == cascade
    only = plan_experiment(LARGE, budget_gb=8.0, configurations=["3d_cascade_fullres"])
    assert set(only.configurations) == {"3d_lowres", "3d_cascade_fullres"}  # its first stage comes along
    small = plan_experiment(make_fingerprint((224, 224, 224), (1.0, 1.0, 1.0), 20))
    assert "3d_cascade_fullres" not in small.configurations and "3d_cascade_fullres" in small.not_planned


def test_plans_naming_a_missing_previous_stage_are_refused():
    data = plan_experiment(LARGE, budget_gb=8.0).to_json()
    del data["configurations"]["3d_lowres"]
    with pytest.raises(PlanError, match="3d_cascade_fullres.previous_stage names 3d_lowres"):
        Plans.from_json(data)
