"""Trained models on disk (autoseg/model_files.py): which folds are found, which checkpoints are refused."""

import re
import shutil

import pytest
import torch
from test_predictor import IDENTITY, _volume, _workspace

from autoseg import workspace
from autoseg.dataset.image_io import Geometry, write_image
from autoseg.inference.batch import predict_folder
from autoseg.inference.predictor import Predictor, PredictorError
from autoseg.inference.settings import BatchOptions, ComputeSettings, ModelChoice, OutputOptions, WindowSettings
from autoseg.model_files import (
    FORMAT_VERSION,
    Checkpoint,
    CheckpointError,
    fold_names,
    load_checkpoint,
    load_fold,
    save_checkpoint,
)

CPU = ComputeSettings("cpu", mixed_precision=False)


@pytest.fixture
def work(tmp_path):
    root = tmp_path / "work"
    _workspace(root, folds=(0, 1))
    return root


def test_a_fold_folder_without_a_checkpoint_is_left_out_with_a_warning_and_the_others_predict(work, tmp_path, caplog):
    unfinished = workspace.fold_dir(work, "3d_fullres", 2)  # e.g. training started, no checkpoint written yet
    unfinished.mkdir(parents=True)
    (unfinished / "training_log.txt").write_text("epoch 1/1000\n")
    shape = (8, 12, 12)
    inputs = tmp_path / "in"
    write_image(inputs / "case_a.nii.gz", _volume(shape, ((0, 8), (2, 10), (2, 10))),
                Geometry((3.0, 0.8, 0.8), (0.0, 0.0, 0.0), IDENTITY, shape))

    with caplog.at_level("WARNING", logger="autoseg.model_files"):
        assert fold_names(work, "3d_fullres") == ["0", "1"]
    assert str(unfinished) in caplog.text and "left out" in caplog.text

    caplog.clear()
    with caplog.at_level("WARNING", logger="autoseg.model_files"):
        summary = predict_folder(work, [inputs], tmp_path / "out", ModelChoice(["3d_fullres"]),
                                 WindowSettings(mirroring=False), CPU, OutputOptions(report_files=False),
                                 BatchOptions(workers=0, progress=False))
    assert summary.written == ["case_a"] and not summary.failed
    assert [m["fold"] for m in summary.settings["models"]] == ["0", "1"]
    assert str(unfinished) in caplog.text
    assert (tmp_path / "out" / "case_a.nii.gz").is_file()


def test_asking_for_a_fold_without_a_checkpoint_names_its_folder(work):
    unfinished = workspace.fold_dir(work, "3d_fullres", 2)
    unfinished.mkdir(parents=True)

    with pytest.raises(CheckpointError, match=re.escape(str(unfinished))):
        fold_names(work, "3d_fullres", folds=[0, 2])
    with pytest.raises(PredictorError, match=re.escape(str(unfinished))):
        Predictor(work, ModelChoice(["3d_fullres"], folds=[0, 2]), compute=CPU)
    # A fold that was never trained at all is named too.
    with pytest.raises(PredictorError, match="fold_7"):
        Predictor(work, ModelChoice(["3d_fullres"], folds=[7]), compute=CPU)


def test_a_checkpoint_of_another_configuration_in_a_fold_folder_is_refused_naming_the_file(work):
    misplaced = workspace.fold_dir(work, "3d_fullres", 1) / "checkpoint_final.pt"
    shutil.copyfile(workspace.fold_dir(work, "2d", 1) / "checkpoint_final.pt", misplaced)

    with pytest.raises(CheckpointError, match=re.escape(str(misplaced)) + ".*configuration 2d"):
        load_fold(work, "3d_fullres", "1")
    with pytest.raises(PredictorError, match=re.escape(str(misplaced)) + ".*configuration 2d"):
        Predictor(work, ModelChoice(["3d_fullres"]), compute=CPU)
    assert len(Predictor(work, ModelChoice(["3d_fullres"], folds=[0]), compute=CPU).folds) == 1  # the others still load


def test_a_checkpoint_without_network_weights_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "fold_0" / "checkpoint_final.pt"
    path.parent.mkdir()
    torch.save({"format_version": FORMAT_VERSION, "configuration": "3d_fullres", "fold": 0, "epoch": 3}, path)

    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*network_state"):
        load_checkpoint(path)

    save_checkpoint(path, Checkpoint(network_state={"w": torch.ones(2)}, configuration="3d_fullres", fold="0", epoch=3))
    loaded = load_checkpoint(path)  # with the weights it loads
    assert loaded.epoch == 3 and loaded.fold == "0" and torch.equal(loaded.network_state["w"], torch.ones(2))
