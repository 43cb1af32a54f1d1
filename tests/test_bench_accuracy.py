"""bench_accuracy.py runs end to end on a tiny dataset (autoseg side only), so a refactor of the
training, prediction or evaluation API cannot silently break the accuracy benchmark."""

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_autoseg_side_trains_predicts_and_scores_held_out_cases(make_decathlon, tmp_path):
    root = make_decathlon(tmp_path / "Task99_Tiny", n_cases=9, shape=(12, 16, 14))
    figures = tmp_path / "figures.json"
    result = subprocess.run([sys.executable, str(BENCHMARKS / "bench_accuracy.py"), str(root), "--hold-out", "2",
                             "--iterations", "2", "--val-iters", "1", "--workers", "0", "--no-nnunet",
                             "--json", str(figures)], cwd=BENCHMARKS, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Dice on 2 test cases" in result.stdout
    record = json.loads(figures.read_text())
    assert record["iterations"] == 2 and "nnunetv2" not in record
    dice = record["autoseg"]["dice"]
    assert set(dice) == {"1", "2"} and all(d is None or 0.0 <= d <= 1.0 for d in dice.values())


def test_configuration_batch_size_and_interpolation_are_the_ones_trained(make_decathlon, tmp_path):
    root = make_decathlon(tmp_path / "Task99_Tiny", n_cases=9, shape=(12, 16, 14))
    figures, kept = tmp_path / "figures.json", tmp_path / "kept"
    result = subprocess.run([sys.executable, str(BENCHMARKS / "bench_accuracy.py"), str(root), "--hold-out", "2",
                             "--iterations", "2", "--val-iters", "1", "--workers", "0", "--no-nnunet",
                             "--configuration", "2d", "--batch-size", "3", "--augment-interpolation", "linear",
                             "--augment-label-interpolation", "linear", "--keep", str(kept), "--json", str(figures)],
                            cwd=BENCHMARKS, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "configuration 2d: batch 3 (plan: " in result.stdout
    record = json.loads(figures.read_text())
    assert record["configuration"] == "2d" and record["batch_size"] == 3 and len(record["patch_size"]) == 2
    assert record["augment_interpolation"] == "linear" and record["augment_label_interpolation"] == "linear"
    log = (kept / "autoseg_ws" / "models" / "2d" / "fold_0" / "training_log.txt").read_text()
    assert "linear image and linear label interpolation" in log


def test_hold_out_of_an_nnunetv2_dataset_trains_on_the_other_cases(make_nnunetv2, tmp_path):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from bench_accuracy import hold_out
    finally:
        sys.path.remove(str(BENCHMARKS))
    root = make_nnunetv2(tmp_path / "Dataset099_Tiny", n_cases=9)
    train, images, labels = hold_out(root, 2, 0, tmp_path / "split")
    held = sorted(p.name for p in labels.iterdir())
    assert len(held) == 2 and len(list(images.iterdir())) == 2 * 2  # two channels per case
    assert len(list((train / "labelsTr").iterdir())) == 7 and not set(held) & {
        p.name for p in (train / "labelsTr").iterdir()}
    assert json.loads((train / "dataset.json").read_text())["numTraining"] == 7


def test_seeds_repeat_the_runs_and_print_their_range(make_decathlon, tmp_path):
    root = make_decathlon(tmp_path / "Task99_Tiny", n_cases=9, shape=(12, 16, 14))
    figures = tmp_path / "figures.json"
    result = subprocess.run([sys.executable, str(BENCHMARKS / "bench_accuracy.py"), str(root), "--hold-out", "2",
                             "--iterations", "2", "--val-iters", "1", "--workers", "0", "--no-nnunet",
                             "--configuration", "2d", "--seeds", "2", "--json", str(figures)],
                            cwd=BENCHMARKS, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "mean [min, max] of 2 runs" in result.stdout and "run 2/2: autoseg done (seed 1)" in result.stdout
    runs = json.loads(figures.read_text())["runs"]
    assert len(runs) == 2 and all(set(r["autoseg"]["dice"]) == {"1", "2"} for r in runs)


def test_iterations_that_do_not_split_into_the_epochs_are_refused(tmp_path):
    result = subprocess.run([sys.executable, str(BENCHMARKS / "bench_accuracy.py"), str(tmp_path), "--hold-out", "2",
                             "--iterations", "5", "--epochs", "2", "--no-nnunet"], cwd=BENCHMARKS,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "equal epochs" in result.stderr


def test_a_region_based_dataset_is_trained_and_scored_by_region(make_nnunetv2, tmp_path):
    root = make_nnunetv2(tmp_path / "Dataset098_Regions", n_cases=9, labels={0: "background", 1: "a", 2: "b"})
    meta = json.loads((root / "dataset.json").read_text())
    meta.update(labels={"background": 0, "whole": [1, 2], "core": 2}, regions_class_order=[1, 2])
    (root / "dataset.json").write_text(json.dumps(meta))
    figures = tmp_path / "figures.json"
    result = subprocess.run([sys.executable, str(BENCHMARKS / "bench_accuracy.py"), str(root), "--hold-out", "2",
                             "--iterations", "2", "--val-iters", "1", "--workers", "0", "--no-nnunet",
                             "--json", str(figures)], cwd=BENCHMARKS, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "1 whole" in result.stdout and "2 core" in result.stdout
    assert set(json.loads(figures.read_text())["autoseg"]["dice"]) == {"1", "2"}


def test_no_autoseg_without_nnunet_is_refused_before_any_work(make_decathlon, tmp_path):
    root = make_decathlon(tmp_path / "Task99_Tiny", n_cases=9, shape=(12, 16, 14))
    result = subprocess.run([sys.executable, str(BENCHMARKS / "bench_accuracy.py"), str(root), "--hold-out", "2",
                             "--iterations", "2", "--no-nnunet", "--no-autoseg", "--keep", str(tmp_path / "kept")],
                            cwd=BENCHMARKS, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "--no-autoseg leaves nothing to run" in result.stderr
    assert not (tmp_path / "kept").exists()


def test_nnunet_gets_autoseg_folds_even_before_autoseg_trained(make_decathlon, tmp_path):
    """With --no-autoseg nothing has written splits.json yet: the folds nnU-Net gets are still autoseg's."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from bench_accuracy import cross_validation_folds, plan_autoseg
    finally:
        sys.path.remove(str(BENCHMARKS))
    root = make_decathlon(tmp_path / "Task99_Tiny", n_cases=9, shape=(12, 16, 14))
    workdir = tmp_path / "ws"
    plan_autoseg(root, workdir, 1, "2d")
    assert not (workdir / "splits.json").exists()
    folds = cross_validation_folds(workdir, "2d")
    assert len(folds) == 5 and (workdir / "splits.json").is_file()
    assert sorted(c for f in folds for c in f["val"]) == sorted(folds[0]["train"] + folds[0]["val"])
    assert cross_validation_folds(workdir, "2d") == folds  # read back, not drawn again
