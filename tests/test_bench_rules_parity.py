"""benchmarks/bench_rules_parity.py without nnU-Net: its autoseg half runs on its own inputs, and the
comparison reports agreement where there is agreement and names the item where there is not."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def parity():
    sys.path.insert(0, str(BENCHMARKS))
    import bench_rules_parity

    yield bench_rules_parity
    sys.path.remove(str(BENCHMARKS))


def test_autoseg_half_and_comparison(parity):
    inputs = parity.make_inputs(boxes=40, trials=2, seed=3)
    ours = parity.autoseg_results(inputs)
    assert len(ours["boxes"]) == 40 and len(ours["postprocessing"]) == 2 and len(ours["locations"]) == 4
    assert {"range", "forced"} == {key for box in ours["boxes"] for key in box}
    assert all(r["agree"] == r["total"] for r in parity.compare(ours, copy.deepcopy(ours)).values())

    theirs = copy.deepcopy(ours)
    box = next(i for i, b in enumerate(theirs["boxes"]) if "forced" in b)
    theirs["boxes"][box]["forced"][0] += 1
    theirs["locations"][2]["2"] = theirs["locations"][2]["2"][::-1]  # same voxels, another order
    report = parity.compare(ours, theirs)
    assert report["boxes"]["agree"] == 39 and report["boxes"]["first_differences"][0]["index"] == box
    assert report["locations"]["agree"] == 3
    assert "annotated" in ours["locations"][3] and "3" not in ours["locations"][3]  # the ignore label's own voxels
    assert report["postprocessing"]["agree"] == 2


def test_without_nnunet_it_stops_with_a_message(parity, tmp_path, capsys):
    assert parity.main(["--nnunet-venv", str(tmp_path), "--boxes", "2", "--trials", "1"]) == 1
    assert "no nnUNetv2_plan_and_preprocess there" in capsys.readouterr().err
