"""benchmarks/bench_augmentation.py on a tiny patch: it runs and prints CPU seconds and the cores needed."""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_augmentation_benchmark_prints_cpu_seconds_and_cores(capsys):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_augmentation
    finally:
        sys.path.remove(str(BENCHMARKS))
    assert bench_augmentation.main(["--patch", "16", "16", "16", "--batches", "1", "--no-nnunet"]) == 0
    out = capsys.readouterr().out
    assert "autoseg" in out and "CPU s per batch" in out and "cores for a 0.1 s step" in out
    result = bench_augmentation.autoseg_seconds([16, 16, 16], 2, 3, 2, 1)
    assert result["cpu_s_per_batch"] > 0 and all(r > 16 for r in result["read_patch"])


def test_augmentation_interpolation_reaches_the_spatial_transform(monkeypatch, capsys):
    from autoseg.training import augmentation

    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_augmentation
    finally:
        sys.path.remove(str(BENCHMARKS))
    orders, original = [], augmentation.training_transforms

    def recording(*args, **kwargs):
        orders.append((kwargs.get("image_order"), kwargs.get("label_order")))
        return original(*args, **kwargs)

    monkeypatch.setattr(augmentation, "training_transforms", recording)
    assert bench_augmentation.main(["--patch", "16", "16", "16", "--batches", "1", "--no-nnunet",
                                    "--augment-interpolation", "linear",
                                    "--augment-label-interpolation", "linear"]) == 0
    assert orders == [(augmentation.AUGMENT_INTERPOLATIONS["linear"], augmentation.LABEL_INTERPOLATIONS["linear"])]
    assert "autoseg's image interpolation linear, label interpolation linear" in capsys.readouterr().out
