"""benchmarks/bench_plans.py, autoseg's side only: the fingerprints it builds and the plans it prints."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from autoseg.planning.planner import plan_experiment

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_plans.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_plans", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_plans"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("bench_plans", None)


def spec_named(bench, name):
    return next(s for s in bench.DATASETS if s.name == name)


def test_fingerprints_have_the_published_medians_and_are_reproducible(bench):
    liver = spec_named(bench, "Task03_Liver")
    fp = bench.make_fingerprint(liver)
    assert len(fp.cases) == liver.num_cases
    assert np.median(fp.spacings[:, 0]) == pytest.approx(1.0)          # z 0.7..5 mm, median 1 mm
    assert fp.spacings[:, 0].min() == pytest.approx(0.7) and fp.spacings[:, 0].max() == pytest.approx(5.0)
    assert np.median(fp.spacings[:, 1]) == pytest.approx(0.77, abs=0.01)
    assert np.median(fp.cropped_shapes, axis=0).tolist() == pytest.approx([432, 512, 512], abs=1)
    assert len({c.spacing for c in fp.cases}) > 10                      # a spread, not identical copies
    assert bench.make_fingerprint(liver).cases == fp.cases              # seeded
    assert bench.make_fingerprint(liver, seed=1).cases != fp.cases


def test_nnunet_gets_the_same_cases_and_intensities(bench):
    brats = bench.make_fingerprint(spec_named(bench, "Task01_BrainTumour"))
    theirs = bench.nnunet_fingerprint(brats)
    assert theirs["spacings"] == [list(c.spacing) for c in brats.cases]
    assert theirs["shapes_after_crop"] == [list(c.cropped_shape) for c in brats.cases]
    assert theirs["median_relative_size_after_cropping"] == pytest.approx(brats.median_cropped_fraction)
    assert theirs["median_relative_size_after_cropping"] < 0.75       # skull-stripped: both mask the normalization
    ct = bench.nnunet_fingerprint(bench.make_fingerprint(spec_named(bench, "Task09_Spleen")))
    stats = ct["foreground_intensity_properties_per_channel"]["0"]
    assert stats["percentile_00_5"] < stats["mean"] < stats["percentile_99_5"]
    assert -200 < stats["mean"] < 300                                  # Hounsfield units of soft tissue


def test_differences_name_the_field_that_differs(bench):
    fp = bench.make_fingerprint(spec_named(bench, "Task04_Hippocampus"))
    ours = bench.summarize_autoseg(plan_experiment(fp, budget_gb=8.0).to_json())
    assert bench.differences(ours, ours) == []
    other = {**ours, "configurations": {k: dict(v) for k, v in ours["configurations"].items()}}
    other["configurations"]["3d_fullres"]["batch_size"] += 1
    assert [d.split(":")[0] for d in bench.differences(ours, other)] == ["3d_fullres batch_size"]


def test_script_prints_a_row_per_dataset_and_2d_sets_plan_only_2d(bench, capsys):
    names = ["Task04_Hippocampus", "Microscopy_RGB_2D", "EM_2D"]
    assert bench.main(["--no-nnunet", "--datasets", ",".join(names)]) == 0
    out = capsys.readouterr().out
    assert "machine:" in out and "nnU-Net side skipped: --no-nnunet" in out
    summary = out.split("summary", 1)[1].splitlines()
    for name in names:
        assert sum(line.startswith(name) for line in summary) == 1
    assert "3d_fullres 40x56x40" in next(line for line in summary if line.startswith("Task04_Hippocampus"))
    for name in ("Microscopy_RGB_2D", "EM_2D"):
        plans = plan_experiment(bench.make_fingerprint(spec_named(bench, name)), budget_gb=8.0)
        assert set(plans.configurations) == {"2d"}
        assert plans.default_configuration == "2d"
        assert len(plans.configurations["2d"].patch_size) == 2


# nnunetv2 2.8.1's nnUNetPlannerResEncM / L / XL on these fingerprints (bench_plans.py --preset ..., 2026-12-03):
# (patch, batch) per configuration. Hippocampus shows the batch without the 5% cap, Liver the lowres stage
# (and the cascade, nnU-Net's 3d_fullres plan with 3d_lowres as its previous stage).
NNUNET_RESENC = {
    "resenc-m": {"Task03_Liver": {"2d": ([512, 512], 12), "3d_lowres": ([128, 128, 128], 2),
                                  "3d_fullres": ([128, 128, 128], 2), "3d_cascade_fullres": ([128, 128, 128], 2)},
                 "Task04_Hippocampus": {"2d": ([56, 40], 1618), "3d_fullres": ([40, 56, 40], 58)}},
    "resenc-l": {"Task03_Liver": {"2d": ([512, 512], 35), "3d_lowres": ([192, 192, 192], 2),
                                  "3d_fullres": ([192, 192, 192], 2), "3d_cascade_fullres": ([192, 192, 192], 2)},
                 "EM_2D": {"2d": ([512, 512], 30)}},
    "resenc-xl": {"Task03_Liver": {"2d": ([512, 512], 52), "3d_lowres": ([224, 256, 224], 2),
                                   "3d_fullres": ([224, 256, 224], 2), "3d_cascade_fullres": ([224, 256, 224], 2)},
                  "Task04_Hippocampus": {"2d": ([56, 40], 6711), "3d_fullres": ([40, 56, 40], 183)}},
}


@pytest.mark.parametrize("preset", sorted(NNUNET_RESENC))
def test_resenc_presets_plan_what_nnunets_resenc_planners_planned(bench, preset):
    for name, expected in NNUNET_RESENC[preset].items():
        plans = plan_experiment(bench.make_fingerprint(spec_named(bench, name)), preset=preset)
        got = {c: (list(p.patch_size), p.batch_size) for c, p in plans.configurations.items()}
        assert got == expected, name
