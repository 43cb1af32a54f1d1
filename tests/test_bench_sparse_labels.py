"""benchmarks/bench_sparse_labels.py on a tiny dataset: its three arms run end to end, and the sparse
labels it writes keep exactly the slices it says."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))
    import bench_sparse_labels

    yield bench_sparse_labels
    sys.path.remove(str(BENCHMARKS))


def test_sparse_label_keeps_k_slices_spread_over_the_structure(bench):
    label = np.zeros((20, 4, 4), np.uint8)
    label[5:15, 1:3, 1:3] = 1
    assert bench.kept_slices(label, 3) == [5, 9, 14]
    sparse = bench.sparse_label(label, 3, fill=2)
    assert (sparse[[5, 9, 14]] == label[[5, 9, 14]]).all()
    assert set(np.unique(np.delete(sparse, [5, 9, 14], axis=0))) == {2}


def test_three_arms_end_to_end_on_a_tiny_dataset(bench, make_decathlon, tmp_path, capsys):
    dataset = make_decathlon(n_cases=5, shape=(10, 16, 14))
    out = tmp_path / "result.json"
    assert bench.main([str(dataset), "--cases", "3", "--test-cases", "2", "--slices", "2", "--iterations", "2",
                       "--epochs", "1", "--batch-size", "2", "--workers", "0", "--keep", str(tmp_path / "w"),
                       "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert set(results) == set(bench.ARMS)
    assert results["full"]["annotated_fraction"] == 1.0 and results["sparse_ignore"]["annotated_fraction"] < 0.5
    plans = json.loads((tmp_path / "w" / "work_sparse_ignore" / "plans.json").read_text())
    assert plans["labels"]["3"] == "ignore"
    assert "sparse_background" in capsys.readouterr().out
