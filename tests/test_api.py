"""The Python API (`autoseg.api.load_model`): one load, many calls, the labels `autoseg predict` writes."""

from __future__ import annotations

import json

import numpy as np
import pytest

import autoseg.api
from autoseg import workspace
from autoseg.cli import main
from autoseg.dataset.image_io import read_image


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny 3D model trained for two iterations on fold 0, and `autoseg predict`'s outputs for its images."""
    from tests.conftest import LABELS, synthetic_case, write_sitk

    root = tmp_path_factory.mktemp("ds")
    training = []
    for i in range(5):
        image, label = synthetic_case((8, 14, 12), 1, "mri", 2, seed=i)
        write_sitk(root / "imagesTr" / f"c{i}.nii.gz", image[0], spacing=(2.0, 1.0, 0.8))
        write_sitk(root / "labelsTr" / f"c{i}.nii.gz", label, spacing=(2.0, 1.0, 0.8))
        training.append({"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"modality": {"0": "MRI"}, "training": training,
                                                   "labels": {str(k): v for k, v in LABELS.items()}}))
    work = tmp_path_factory.mktemp("work")
    assert main(["plan", str(root), "-o", str(work), "--workers", "1", "--configs", "3d_fullres"]) == 0
    plans = json.loads(workspace.plans_json(work).read_text())
    plans["configurations"]["3d_fullres"].update(patch_size=[8, 8, 8], batch_size=2, features_per_stage=[4, 8],
                                                 kernel_sizes=[[3, 3, 3]] * 2, strides=[[1, 1, 1], [2, 2, 2]])
    workspace.plans_json(work).write_text(json.dumps(plans))
    assert main(["train", str(work), "--fold", "0", "--epochs", "1", "--iters-per-epoch", "2", "--val-iters", "1",
                 "--workers", "0", "--no-validation"]) == 0
    out = tmp_path_factory.mktemp("pred")
    assert main(["predict", str(work), "-i", str(root / "imagesTr"), "-o", str(out), "--no-report"]) == 0
    return root, work, out


def test_one_loaded_model_segments_files_exactly_as_autoseg_predict(trained):
    root, work, out = trained
    model = autoseg.api.load_model(work)
    assert model.channel_names == ("MRI",)
    for i in range(5):
        result = model.segment_file(root / "imagesTr" / f"c{i}.nii.gz")
        written, _ = read_image(out / f"c{i}.nii.gz")
        assert np.array_equal(result.labels, written)
        assert result.geometry.spacing == pytest.approx((2.0, 1.0, 0.8))


def test_an_array_with_its_spacing_gives_the_same_labels_as_its_file(trained, tmp_path):
    root, work, _ = trained
    model = autoseg.api.load_model(work)
    image, geometry = read_image(root / "imagesTr" / "c1.nii.gz")
    from_file = model.segment_file(root / "imagesTr" / "c1.nii.gz")
    from_array = model.segment(image, spacing=geometry.spacing)
    assert np.array_equal(from_array.labels, from_file.labels)
    path = model.write(from_array, tmp_path / "c1_seg.nii.gz")
    assert np.array_equal(read_image(path)[0], from_array.labels)
    with pytest.raises(ValueError, match="channel"):
        model.segment(np.zeros((2, 4, 8, 8), np.float32))


def test_a_model_archive_loads_through_the_same_call(trained, tmp_path):
    root, work, out = trained
    archive = tmp_path / "model.zip"
    assert main(["export-model", str(work), str(archive)]) == 0
    model = autoseg.api.load_model(archive, cache_dir=tmp_path / "cache")
    result = model.segment_file(root / "imagesTr" / "c2.nii.gz")
    assert np.array_equal(result.labels, read_image(out / "c2.nii.gz")[0])
    with pytest.raises(autoseg.api.ModelLoadError, match="neither"):
        autoseg.api.load_model(tmp_path / "nothing")


def test_bench_api_runs_and_finds_the_same_labels(trained, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import bench_api
    finally:
        sys.path.pop(0)
    root, work, _ = trained
    assert bench_api.main([str(work), "-i", str(root / "imagesTr" / "c0.nii.gz"), str(root / "imagesTr" / "c1.nii.gz"),
                           "--repeat", "1", "--cli-cases", "1"]) == 0
    out = capsys.readouterr().out
    assert "API: load" in out and "labels equal: yes" in out
