"""benchmarks/bench_objects.py on tiny datasets: every arm runs end to end and the table holds the object
metrics; the touching-pair count is right on a hand-made case."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCHMARKS))
    import bench_objects

    yield bench_objects
    sys.path.remove(str(BENCHMARKS))


def test_merged_touching_pairs_counts_the_pairs_one_object_swallowed(bench):
    ref = np.zeros((10, 20), np.int64)
    ref[2:6, 2:6], ref[2:6, 6:10], ref[2:6, 12:16], ref[6:9, 12:16] = 1, 2, 3, 4  # pairs (1, 2) and (3, 4)
    pred = np.where(ref > 0, 1, 0)
    pred[2:6, 12:16] = 2
    pred[6:9, 12:16] = 3
    assert bench.merged_touching_pairs(pred, ref) == (2, 1)  # 1 and 2 merged, 3 and 4 kept apart


def test_instance_arms_end_to_end_on_a_tiny_dataset(bench, tmp_path, capsys):
    from test_instances import write_instance_dataset

    dataset = write_instance_dataset(tmp_path / "ds", cases=6, shape=(40, 48))
    out = tmp_path / "r.json"
    assert bench.main([str(dataset), "--test-cases", "c4", "c5", "--arms", "semantic", "instances", "--iterations",
                       "2", "--epochs", "1", "--workers", "0", "--tiny", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    for arm in ("semantic", "instances"):
        objects = results[arm]["objects"]
        assert {"mean_ap", "f1_at_0.5", "aji", "merges", "touching_pairs", "touching_pairs_merged"} <= set(objects)
        assert objects["touching_pairs"] == 2  # one pair per held-out image
    table = capsys.readouterr().out
    assert "touching_pairs_merged" in table and "semantic" in table


def test_membrane_arms_report_the_maximal_errors(bench, tmp_path):
    root = tmp_path / "em"
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(4):
        membrane = np.zeros((40, 40), np.uint8)
        membrane[:, [9 + i, 25]] = 1
        membrane[[12, 30 - i], :] = 1
        image = (rng.normal(150, 10, membrane.shape) - 100 * membrane).clip(0, 255).astype(np.uint8)
        Image.fromarray(image).save(root / "imagesTr" / f"em_{i}_0000.png")
        Image.fromarray(membrane).save(root / "labelsTr" / f"em_{i}.png")
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "EM"}, "file_ending": ".png",
                                                   "labels": {"background": 0, "membrane": 1}}))
    out = tmp_path / "r.json"
    assert bench.main([str(root), "--test-cases", "em_3", "--arms", "plain", "elastic", "--iterations", "1",
                       "--epochs", "1", "--workers", "0", "--tiny", "--json", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    for arm in ("plain", "elastic"):
        objects = results[arm]["objects"]
        assert {"rand_error", "warping_error", "pixel_error", "rand_error_maximal"} <= set(objects)
        assert objects["rand_error_maximal"] <= objects["rand_error"] + 1e-9  # the best threshold is no worse
