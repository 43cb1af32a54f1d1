"""benchmarks/bench_predict_parity.py without nnU-Net: its label comparison, and a clear stop when
nnU-Net is missing."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def parity():
    sys.path.insert(0, str(BENCHMARKS))
    import bench_predict_parity

    yield bench_predict_parity
    sys.path.remove(str(BENCHMARKS))


def test_label_comparison_counts_agreement_and_dice_per_label(parity):
    a = np.zeros((2, 4, 4), np.uint8)
    a[0, :2, :2] = 1   # 4 voxels of label 1
    b = a.copy()
    b[0, 0, 0] = 0     # one voxel of label 1 lost
    b[1, 3, 3] = 2     # one voxel of label 2 where a has none
    result = parity.compare_labels(a, b, [1, 2, 3])
    assert result["agreement"] == pytest.approx(30 / 32)
    assert result["dice"]["1"] == pytest.approx(2 * 3 / (4 + 3))
    assert result["dice"]["2"] == 0.0 and result["dice"]["3"] is None  # label 3 in neither: no Dice


def test_without_nnunet_it_says_how_to_get_it(parity, tmp_path, capsys):
    assert parity.main([str(tmp_path), "-i", str(tmp_path), "--nnunet-venv", str(tmp_path / "none")]) == 2
    assert "nnUNetv2_plan_and_preprocess" in capsys.readouterr().err
