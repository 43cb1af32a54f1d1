"""bench_cpu_paths.py runs both of its modes on a tiny plan, so the figures docs quote can be taken again."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def tiny_plans(tmp_path) -> Path:
    config = {"patch_size": [8, 16, 16], "batch_size": 2, "batch_dice": False, "features_per_stage": [4, 8],
              "kernel_sizes": [[3, 3, 3]] * 2, "strides": [[1, 1, 1], [2, 2, 2]], "n_conv_per_stage": 2}
    (tmp_path / "plans.json").write_text(json.dumps({"channel_names": ["MRI"], "labels": {"0": "bg", "1": "a"},
                                                     "configurations": {"3d_fullres": config}}))
    return tmp_path


@pytest.mark.parametrize("step", ["train", "inference"])
def test_bench_cpu_paths_times_every_path_of_a_tiny_plan(tiny_plans, step):
    result = subprocess.run([sys.executable, str(BENCHMARKS / "bench_cpu_paths.py"), str(tiny_plans), "--step", step,
                             "--iters", "1", "--warmup", "0"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "avx2" in result.stdout  # the machine line names the SIMD features
    lines = [line for line in result.stdout.splitlines() if "x the fastest" in line]
    assert any("contiguous" in line for line in lines) and any("channels_last" in line for line in lines)
    if step == "inference" and importlib.util.find_spec("openvino"):
        assert any("openvino" in line for line in lines)
