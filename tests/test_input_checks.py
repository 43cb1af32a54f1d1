"""Inputs a model cannot take, built from a few real cases: each refused by name before any work, or
predicted with a warning in prediction_summary.json, and never a half-written output."""

import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from autoseg import workspace
from autoseg.cli import main
from autoseg.dataset.image_io import read_image
from autoseg.fingerprint import CaseFingerprint, Fingerprint, IntensityStats
from autoseg.inference.batch import predict_folder
from autoseg.inference.input_checks import check_input
from autoseg.inference.settings import BatchOptions, OutputOptions, WindowSettings
from autoseg.model_files import Checkpoint, save_checkpoint
from autoseg.network.unet import build_unet
from autoseg.planning.planner import plan_experiment
from autoseg.planning.plans import ChannelNormalization

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
HIPPOCAMPUS = SHARED / "Task04_Hippocampus"
DSB = SHARED / "Dataset010_DSB2018Nuclei"
pytestmark = pytest.mark.skipif(not (HIPPOCAMPUS.is_dir() and DSB.is_dir()), reason="../shared/datasets not available")
FAST = dict(window=WindowSettings(mirroring=False, step_size=1.0),
            outputs=OutputOptions(report_files=False), batch=BatchOptions(workers=0, progress=False))


def _model(root: Path, channel: str = "MRI", spacing=(1.0, 1.0, 1.0), shape=(36, 50, 35),
           configurations=("3d_fullres",),
           ct_clip=None, two_d=False) -> None:
    """A workspace planned like a Hippocampus model (or a 2D picture model), with tiny random-weight folds."""
    stats = IntensityStats(0.0, 1.0, -1.0, 1.0, 0.0, -1.0, 1.0)
    if two_d:
        spacing, shape = (999.0, 1.0, 1.0), (1, 256, 256)
    cases = tuple(CaseFingerprint(f"c{i}", spacing, shape, tuple((0, n) for n in shape), 100, (stats,))
                  for i in range(4))
    kind = "ct" if ct_clip else "zscore"
    fingerprint = Fingerprint("corpus", (channel,), (kind,), {0: "background", 1: "anterior", 2: "posterior"},
                              cases, (stats,))
    plans = plan_experiment(fingerprint, configurations=list(configurations))
    if ct_clip:
        plans = dataclasses.replace(plans, normalization=(ChannelNormalization(
            0, channel, "ct", False, "test", clip=ct_clip, mean=sum(ct_clip) / 2, std=100.0),))
    plans = dataclasses.replace(plans, configurations={
        name: dataclasses.replace(c, features_per_stage=tuple(2 * 2 ** i for i in range(len(c.features_per_stage))))
        for name, c in plans.configurations.items()})
    plans.save(workspace.plans_json(root))
    for name in plans.configurations:
        torch.manual_seed(0)
        network = build_unet(plans.network_topology(name), deep_supervision=True)
        save_checkpoint(workspace.fold_dir(root, name, 0) / "checkpoint_final.pt",
                        Checkpoint(network.state_dict(), configuration=name, epoch=1,
                                   plans_configuration=plans.configuration(name).to_json()))


@pytest.fixture(scope="module")
def hippocampus_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("hippocampus_model")
    _model(root, configurations=("3d_fullres",))
    return root


def _hippocampus_case(name: str = "hippocampus_003") -> Path:
    return HIPPOCAMPUS / "imagesTr" / f"{name}.nii.gz"


def _input_folder(tmp_path: Path, files: dict[str, Path]) -> Path:
    """tmp_path/in holding a copy of each source under its new name."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name, source in files.items():
        shutil.copy(source, folder / name)
    return folder


def _outputs(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix in (".gz", ".png", ".tif")) if folder.is_dir() else []


def test_a_2d_picture_given_to_a_3d_model_is_refused_at_once(hippocampus_model, tmp_path, capsys):
    picture = tmp_path / "in" / "pic_0000.png"
    picture.parent.mkdir()
    shutil.copy(DSB / "imagesTr" / "dsb_000_0000.png", picture)
    grey = np.asarray(sitk.GetArrayFromImage(sitk.ReadImage(str(picture))))[..., 0]
    sitk.WriteImage(sitk.GetImageFromArray(grey), str(picture))  # one channel, as the MRI model takes
    started = time.perf_counter()
    code = main(["predict", str(hippocampus_model), "-i", str(picture.parent), "-o", str(tmp_path / "out"),
                 "--no-mirroring", "--workers", "0"])
    seconds = time.perf_counter() - started
    err = capsys.readouterr().err
    assert code == 1 and seconds < 30
    assert "pic_0000.png: a 2D image" in err and "segments 3D volumes (3d_fullres)" in err
    assert _outputs(tmp_path / "out") == []


def test_two_channel_files_for_a_one_channel_model_are_one_refused_case(hippocampus_model, tmp_path):
    inputs = _input_folder(tmp_path, {f"caseA_{channel:04d}.nii.gz": _hippocampus_case() for channel in (0, 1)})
    summary = predict_folder(hippocampus_model, [inputs], tmp_path / "out", **FAST)
    assert summary.written == []
    assert len(summary.failed) == 1 and "case caseA: 2 channel files" in summary.failed[0][1]
    assert "the model takes 1 channel (MRI)" in summary.failed[0][1]
    assert _outputs(tmp_path / "out") == []


def test_numbered_single_channel_cases_are_still_cases(hippocampus_model, tmp_path):
    """`img_0001`, `img_0002` are cases numbered from 1, not channels of one case `img`."""
    inputs = _input_folder(tmp_path, {f"img_{i:04d}.nii.gz": _hippocampus_case() for i in (1, 2)})
    summary = predict_folder(hippocampus_model, [inputs], tmp_path / "out", **FAST)
    assert summary.written == ["img_0001", "img_0002"] and summary.failed == []


def test_a_3d_volume_given_to_a_2d_picture_model_is_segmented_slice_by_slice(tmp_path, caplog):
    model = tmp_path / "model"
    _model(model, channel="nuclei", configurations=("2d",), two_d=True)
    inputs = _input_folder(tmp_path, {"volume.nii.gz": _hippocampus_case(),
                                      "other.nii.gz": _hippocampus_case("hippocampus_004")})
    with caplog.at_level("INFO"):
        summary = predict_folder(model, [inputs], tmp_path / "out", **FAST)
    assert summary.written == ["other", "volume"] and summary.failed == []
    assert sum("slice by slice" in r.getMessage() for r in caplog.records) == 1  # said once per run
    labels, _ = read_image(tmp_path / "out" / "volume.nii.gz")
    assert labels.shape == read_image(_hippocampus_case())[0].shape


def test_spacing_far_from_the_training_spacing_is_a_warning_in_the_summary(hippocampus_model, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    image = sitk.ReadImage(str(_hippocampus_case()))
    image.SetSpacing((12.0, 1.0, 1.0))
    sitk.WriteImage(image, str(inputs / "thick.nii.gz"))
    summary = predict_folder(hippocampus_model, [inputs], tmp_path / "out", **FAST)
    assert summary.written == ["thick"]
    assert [case for case, _ in summary.warnings] == ["thick"]
    assert "12x coarser than the 3d_fullres model's" in summary.warnings[0][1]
    written = json.loads((tmp_path / "out" / "prediction_summary.json").read_text())
    assert written["warnings"] == [{"case": "thick", "warning": summary.warnings[0][1]}]


def test_a_label_map_given_as_the_image_is_a_warning(hippocampus_model, tmp_path):
    inputs = _input_folder(tmp_path, {"mask.nii.gz": HIPPOCAMPUS / "labelsTr" / "hippocampus_003.nii.gz"})
    summary = predict_folder(hippocampus_model, [inputs], tmp_path / "out", **FAST)
    assert summary.written == ["mask"] and "like a label map" in summary.warnings[0][1]


def test_an_mri_given_to_a_lung_ct_model_is_a_warning(tmp_path):
    model = tmp_path / "model"
    _model(model, channel="CT", ct_clip=(-950.0, -400.0))
    summary = predict_folder(model, [_hippocampus_case()], tmp_path / "out", **FAST)
    assert summary.written == ["hippocampus_003"]
    assert "0.0% of its voxels in the CT range the model saw" in summary.warnings[0][1]


def test_a_case_too_large_for_the_machine_is_refused_and_one_too_large_for_now_is_a_warning(hippocampus_model):
    from autoseg.inference.inputs import InputError
    from autoseg.planning.plans import Plans

    plans = Plans.load(workspace.plans_json(hippocampus_model))
    image, geometry = read_image(_hippocampus_case())
    image = image[None].astype(np.float32)
    args = (image, geometry, plans, ("3d_fullres",), _hippocampus_case())
    with pytest.raises(InputError, match=r"hippocampus_003.nii.gz: predicting it would need about 0\.0 GiB.*"
                                         r"this machine has 0\.0 GiB"):
        check_input(*args, memory_bytes=(100_000, 100_000))
    busy = check_input(*args, memory_bytes=(2**34, 1000))
    assert len(busy.warnings) == 1 and "GiB are free now" in busy.warnings[0]
    assert check_input(*args, memory_bytes=(2**34, 2**33)).warnings == ()


def test_plans_changed_after_training_are_refused_naming_the_checkpoint(tmp_path, capsys):
    model = tmp_path / "model"
    _model(model)
    plans = json.loads(workspace.plans_json(model).read_text())
    trained = plans["configurations"]["3d_fullres"]["patch_size"]
    plans["configurations"]["3d_fullres"]["patch_size"] = [trained[0] - 8, *trained[1:]]
    workspace.plans_json(model).write_text(json.dumps(plans))
    code = main(["predict", str(model), "-i", str(_hippocampus_case()), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "fold_0/checkpoint_final.pt: trained with other plans" in err
    assert f"patch_size was {trained}" in err and "Traceback" not in err
    assert _outputs(tmp_path / "out") == []


def test_a_run_of_numbered_frames_from_0000_are_separate_cases(hippocampus_model, tmp_path):
    """`frame_0000` ... `frame_0004` exported from a stack are five images, not one case of five channels."""
    inputs = _input_folder(tmp_path, {f"frame_{i:04d}.nii.gz": _hippocampus_case() for i in range(5)})
    summary = predict_folder(hippocampus_model, [inputs], tmp_path / "out", **FAST)
    assert summary.written == [f"frame_{i:04d}" for i in range(5)] and summary.failed == []
