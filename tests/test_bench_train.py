"""bench_train.py runs end to end on a tiny planned workspace (autoseg side), so a moved function or a
changed training API shows up here, not when someone sits down to take figures."""

import subprocess
import sys
from pathlib import Path

from autoseg.cli import main

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from bench_train import augmentation_rate, workers_to_keep_up  # noqa: E402


def _tiny_workspace(make_decathlon, tmp_path) -> Path:
    root = make_decathlon(n_cases=5, shape=(12, 16, 14))
    work = tmp_path / "work"
    assert main(["plan", str(root), "-o", str(work), "--workers", "1", "--configs", "3d_fullres"]) == 0
    return work


def test_bench_train_prints_step_time_and_augmentation_rate(make_decathlon, tmp_path):
    work = _tiny_workspace(make_decathlon, tmp_path)
    result = subprocess.run([sys.executable, str(BENCHMARKS / "bench_train.py"), str(work), "--iters", "1",
                             "--warmup", "0", "--workers", "0", "--augmentation-batches", "2"],
                            cwd=BENCHMARKS, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "batches/s per worker" in result.stdout
    assert "autoseg (float32)" in result.stdout or "autoseg (bfloat16 autocast)" in result.stdout


def test_augmentation_rate_counts_batches_of_the_plan(make_decathlon, tmp_path):
    rate = augmentation_rate(_tiny_workspace(make_decathlon, tmp_path), "3d_fullres", batches=2, warmup=0)
    assert rate["batches"] == 2 and rate["per_s_wall"] > 0 and rate["per_s_cpu"] > 0


def test_workers_to_keep_up_rounds_up_and_needs_at_least_one():
    assert workers_to_keep_up(batches_per_s=2.0, step_s=0.1) == 5
    assert workers_to_keep_up(batches_per_s=2.0, step_s=0.3) == 2
    assert workers_to_keep_up(batches_per_s=2.0, step_s=10.0) == 1
