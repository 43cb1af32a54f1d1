"""`autoseg predict` from the command line: readable errors and what volumes.csv names as the model."""

import csv
import json

import pytest
from test_predictor import IDENTITY, _volume, _workspace

from autoseg.cli import main
from autoseg.dataset.image_io import Geometry, write_image
from autoseg.model_archive import export_model


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("work")
    _workspace(root, folds=(0,))
    return root


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    shape = (8, 12, 12)
    write_image(folder / "case_a.nii.gz", _volume(shape, ((0, 8), (2, 10), (2, 10))),
                Geometry((3.0, 0.8, 0.8), (0.0, 0.0, 0.0), IDENTITY, shape))
    return folder


def test_a_foreign_volumes_csv_stops_predict_with_a_message_naming_it(work, inputs, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "volumes.csv").write_bytes(b"\x89PNG not a table\xff\n")
    assert main(["predict", str(work), "-i", str(inputs), "-o", str(out), "--no-mirroring", "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert str(out / "volumes.csv") in err and "move it away" in err and "Traceback" not in err
    assert not (out / "case_a.nii.gz").exists()  # refused before any case ran


def test_predict_with_a_model_archive_names_the_archive_in_volumes_csv(work, inputs, tmp_path):
    archive = tmp_path / "liver_model.zip"
    export_model(work, archive, configurations=["3d_fullres"])
    out = tmp_path / "out"
    assert main(["predict", "--model", str(archive), "-i", str(inputs), "-o", str(out), "--no-mirroring",
                 "--workers", "0"]) == 0
    with open(out / "volumes.csv", newline="") as f:
        models = {row["model"] for row in csv.DictReader(f)}
    assert models == {"liver_model.zip:3d_fullres:folds 0"}
    assert json.loads((out / "prediction_summary.json").read_text())["settings"]["model"] == models.pop()
