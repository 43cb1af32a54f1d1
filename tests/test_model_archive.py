import dataclasses
import hashlib
import json
import logging
import shutil
import zipfile

import numpy as np
import pytest
import torch

from autoseg import workspace
from autoseg.atomic import write_json
from autoseg.cli import main
from autoseg.dataset.image_io import Geometry, read_image, write_image
from autoseg.fingerprint import CaseFingerprint, Fingerprint, IntensityStats, save_fingerprint
from autoseg.inference.batch import predict_folder
from autoseg.inference.settings import BatchOptions, WindowSettings
from autoseg.model_archive import ModelArchiveError, export_model, import_model, model_workspace, read_manifest
from autoseg.model_files import Checkpoint, save_checkpoint
from autoseg.network.unet import UNetTopology, build_unet
from autoseg.planning.planner import plan_experiment
from autoseg.planning.plans import Plans

SPACING = (3.0, 0.8, 0.8)
SHAPE = (8, 20, 20)


def _workspace(root):
    """A workspace with plans from the real planner (tiny features), random-weight 3d_fullres folds 0 and 1 saved
    as the trainer saves them (optimizer state included), a fingerprint, fold validation and crossval results."""
    stats = IntensityStats(0.0, 1.0, -1.0, 1.0, 0.0, -1.0, 1.0)
    cases = tuple(CaseFingerprint(f"patient{i}", SPACING, SHAPE, tuple((0, n) for n in SHAPE), 100, (stats,))
                  for i in range(3))
    labels = {0: "background", 1: "liver", 2: "tumour"}
    fingerprint = Fingerprint("tiny", ("MRI",), ("zscore",), labels, cases, (stats,))
    save_fingerprint(fingerprint, workspace.fingerprint_json(root))
    plans = plan_experiment(fingerprint, configurations=["3d_fullres"])
    config = plans.configurations["3d_fullres"]
    config = dataclasses.replace(config, features_per_stage=tuple(4 * 2 ** i
                                                                  for i in range(len(config.features_per_stage))))
    plans = dataclasses.replace(plans, configurations={"3d_fullres": config})
    plans.save(workspace.plans_json(root))
    for fold in (0, 1):
        torch.manual_seed(fold)
        network = build_unet(UNetTopology.from_plan(config, 1, 3), deep_supervision=True)
        optimizer = torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.9)
        network(torch.zeros(1, 1, *config.patch_size))[0].sum().backward()
        optimizer.step()
        save_checkpoint(workspace.fold_dir(root, "3d_fullres", fold) / "checkpoint_final.pt",
                        Checkpoint(configuration="3d_fullres", fold=str(fold), epoch=10,
                                   network_state=network.state_dict(), optimizer_state=optimizer.state_dict(),
                                   labels={str(k): v for k, v in plans.labels.items()},
                                   channel_names=list(plans.channel_names)))
        write_json(workspace.fold_dir(root, "3d_fullres", fold) / "validation" / "summary.json",
                   {"format_version": 1, "num_cases": 2, "foreground_mean_dice": 0.8,
                    "mean": {"1": {"dice": 0.9, "name": "liver"}, "2": {"dice": 0.7, "name": "tumour"}}})
    write_json(workspace.crossval_dir(root) / "summary.json",
               {"format_version": 1, "best": ["3d_fullres"], "ensembles": {},
                "configurations": {"3d_fullres": {"num_cases": 4, "missing_folds": [2, 3, 4],
                                                  "mean_dice": {"1": 0.91, "2": 0.72}, "foreground_mean_dice": 0.815}}})
    write_json(workspace.dataset_json(root), {"format_version": 1, "name": "tiny", "root": "/secret/hospital/path",
                                              "layout": "decathlon", "num_cases": 3, "file_ending": ".nii.gz"})
    return plans


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("work")
    _workspace(root)
    return root


@pytest.fixture(scope="module")
def archive(work, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / "model.zip"
    export_model(work, path)
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    for i in range(2):
        image = np.zeros(SHAPE, np.float32)
        image[2:6, 4:16, 3:15] = rng.uniform(1, 3, (4, 12, 12))
        geometry = Geometry(SPACING, (5.0, -3.0, 1.0), tuple(np.eye(3).ravel()), SHAPE)
        write_image(folder / f"case{i}.nii.gz", image, geometry)
    return folder


def _rewrite(source, target, change):
    """Copy a zip member by member, letting `change(name, data)` return new (name, data) pairs."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(target, "w") as dst:
        for info in src.infolist():
            for name, data in change(info.filename, src.read(info)):
                dst.writestr(name, data)
    return target


def test_archive_holds_plans_weights_card_and_checksums_and_no_training_state(archive):
    manifest = read_manifest(archive)
    assert manifest["format_version"] == 1 and manifest["configurations"] == ["3d_fullres"]
    assert manifest["folds"] == {"3d_fullres": ["0", "1"]}
    with zipfile.ZipFile(archive) as z:
        names = set(z.namelist())
        assert names == {"manifest.json", "plans.json", "model_card.json", "model_card.md",
                         "models/3d_fullres/fold_0/checkpoint_final.pt", "models/3d_fullres/fold_1/checkpoint_final.pt"}
        for name, entry in manifest["members"].items():
            assert hashlib.sha256(z.read(name)).hexdigest() == entry["sha256"]
        plans = json.loads(z.read("plans.json"))
        assert plans["normalization"][0]["scheme"] == "zscore"
        card = json.loads(z.read("model_card.json"))
        card_md = z.read("model_card.md").decode()
        with z.open("models/3d_fullres/fold_0/checkpoint_final.pt") as f:
            state = torch.load(f, weights_only=True)
    assert "optimizer_state" not in state and state["epoch"] == 10
    assert card["labels"] == {"0": "background", "1": "liver", "2": "tumour"} and card["channel_names"] == ["MRI"]
    assert card["training_data"]["num_cases"] == 3 and card["training_data"]["median_spacing"] == list(SPACING)
    assert card["cross_validation"]["pooled"]["3d_fullres"]["mean_dice"] == {"1": 0.91, "2": 0.72}
    assert card["cross_validation"]["folds"]["3d_fullres/fold_1"]["mean_dice"] == {"1": 0.9, "2": 0.7}
    assert "liver" in card_md and "0.9100" in card_md
    assert "patient0" not in card_md + json.dumps(card) and "/secret" not in card_md + json.dumps(card)


def test_exported_model_predicts_the_same_labels_as_its_workspace(work, archive, inputs, tmp_path):
    imported = tmp_path / "imported"
    import_model(archive, imported)
    settings = {"window": WindowSettings(mirroring=False), "batch": BatchOptions(workers=0, progress=False)}
    predict_folder(work, [inputs], tmp_path / "from_workspace", **settings)
    predict_folder(imported, [inputs], tmp_path / "from_archive", **settings)
    for i in range(2):
        a, ga = read_image(tmp_path / "from_workspace" / f"case{i}.nii.gz")
        b, gb = read_image(tmp_path / "from_archive" / f"case{i}.nii.gz")
        assert ga.matches(gb) and np.array_equal(a, b)
    assert Plans.load(workspace.plans_json(imported)).labels[2] == "tumour"


def test_a_modified_member_is_refused_and_nothing_is_left_behind(archive, tmp_path):
    def flip(name, data):
        if name.endswith("fold_1/checkpoint_final.pt"):
            data = data[:-100] + bytes(b ^ 1 for b in data[-100:])
        return [(name, data)]

    tampered = _rewrite(archive, tmp_path / "tampered.zip", flip)
    with pytest.raises(ModelArchiveError, match=r"tampered\.zip: member models/3d_fullres/fold_1/checkpoint_final\.pt: "
                                                r"SHA-256"):
        import_model(tampered, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tampered.zip"]


def test_a_missing_member_an_unlisted_member_and_an_unknown_version_are_refused(archive, tmp_path):
    missing = _rewrite(archive, tmp_path / "missing.zip", lambda n, d: [] if n == "plans.json" else [(n, d)])
    with pytest.raises(ModelArchiveError, match=r"missing\.zip: member plans\.json missing"):
        import_model(missing, tmp_path / "a")
    extra = _rewrite(archive, tmp_path / "extra.zip",
                     lambda n, d: [(n, d), ("run_me.sh", b"echo")] if n == "plans.json" else [(n, d)])
    with pytest.raises(ModelArchiveError, match=r"extra\.zip: member run_me\.sh is not listed"):
        import_model(extra, tmp_path / "b")

    def future(name, data):
        if name == "manifest.json":
            data = json.dumps({**json.loads(data), "format_version": 99}).encode()
        return [(name, data)]

    with pytest.raises(ModelArchiveError, match=r"future\.zip: member manifest\.json: format_version 99"):
        import_model(_rewrite(archive, tmp_path / "future.zip", future), tmp_path / "c")
    assert not any((tmp_path / n).exists() for n in "abc")


@pytest.mark.parametrize("evil", ["../evil.txt", "models/../../evil.txt", "/tmp/evil.txt", "C:\\evil.txt"])
def test_a_member_path_outside_the_target_folder_is_refused(archive, tmp_path, evil):
    def add(name, data):
        if name != "manifest.json":
            return [(name, data)]
        manifest = json.loads(data)
        manifest["members"][evil] = {"size": 4, "sha256": hashlib.sha256(b"evil").hexdigest()}
        return [(name, json.dumps(manifest).encode()), (evil, b"evil")]

    slip = _rewrite(archive, tmp_path / "slip.zip", add)
    with pytest.raises(ModelArchiveError, match=r"slip\.zip: member .*evil\.txt.* (absolute|outside)"):
        import_model(slip, tmp_path / "deep" / "out")
    assert not list(tmp_path.rglob("evil.txt")) and not (tmp_path / "deep" / "out").exists()


def test_import_refuses_a_non_empty_target_and_a_file_that_is_no_zip(archive, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(ModelArchiveError, match="already exists"):
        import_model(archive, tmp_path / "busy")
    (tmp_path / "model.zip").write_bytes(b"not a zip")
    with pytest.raises(ModelArchiveError, match="not a readable zip"):
        import_model(tmp_path / "model.zip", tmp_path / "x")


def _tamper_plans(ws):
    plans = json.loads((ws / "plans.json").read_text())
    plans["normalization"][0]["use_nonzero_mask"] ^= True  # still valid plans, silently different intensities
    (ws / "plans.json").write_text(json.dumps(plans))


def _add_fold(ws):  # every fold_* folder is predicted with when --folds is not given
    shutil.copytree(ws / "models/3d_fullres/fold_1", ws / "models/3d_fullres/fold_2")


REUSE_CHANGES = {
    "tampered plans.json": (_tamper_plans, "plans.json"),
    "tampered checkpoint": (lambda ws: shutil.copy(ws / "models/3d_fullres/fold_0/checkpoint_final.pt",
                                                   ws / "models/3d_fullres/fold_1/checkpoint_final.pt"),
                            "fold_1/checkpoint_final.pt"),
    "removed checkpoint": (lambda ws: (ws / "models/3d_fullres/fold_0/checkpoint_final.pt").unlink(),
                           "fold_0/checkpoint_final.pt"),
    "added checkpoint": (lambda ws: shutil.copy(ws / "models/3d_fullres/fold_1/checkpoint_final.pt",
                                                ws / "models/3d_fullres/fold_0/checkpoint_best.pt"),
                         "fold_0/checkpoint_best.pt"),
    "added fold": (_add_fold, "fold_2"),
    "added postprocessing.json": (lambda ws: (ws / "postprocessing.json").write_text("{}"), "postprocessing.json"),
}


def _extracted(folder) -> dict:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in folder.rglob("*") if p.is_file()}


def test_a_reused_extraction_is_kept_when_intact(archive, tmp_path):
    folder, manifest = model_workspace(archive, tmp_path)
    inode = (folder / "plans.json").stat().st_ino
    assert model_workspace(archive, tmp_path) == (folder, manifest)
    assert (folder / "plans.json").stat().st_ino == inode  # not extracted again
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]


@pytest.mark.parametrize("change", REUSE_CHANGES)
def test_a_reused_extraction_that_was_changed_is_extracted_again(archive, tmp_path, caplog, change):
    tamper, named = REUSE_CHANGES[change]
    folder, manifest = model_workspace(archive, tmp_path)
    intact = _extracted(folder)
    assert set(intact) == set(manifest["members"]) | {"manifest.json"}
    tamper(folder)
    assert _extracted(folder) != intact
    with caplog.at_level(logging.WARNING, logger="autoseg.model_archive"):
        assert model_workspace(archive, tmp_path) == (folder, manifest)
    assert _extracted(folder) == intact and not (folder / "models/3d_fullres/fold_2").exists()
    assert named in caplog.text and "extracting the model again" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no scratch or stale folder left


def test_a_failed_re_extraction_leaves_the_old_folder_and_no_half_written_one(archive, tmp_path, monkeypatch):
    folder, _ = model_workspace(archive, tmp_path)
    _tamper_plans(folder)

    def refuse(*args):
        raise ModelArchiveError("refused")

    monkeypatch.setattr("autoseg.model_archive._check_weights", refuse)
    with pytest.raises(ModelArchiveError, match="refused"):
        model_workspace(archive, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]
    with pytest.raises(ModelArchiveError, match="refused"):  # still refused: the changed plans are never used
        model_workspace(archive, tmp_path)


def test_cli_export_import_and_predict_with_model(work, inputs, tmp_path, capsys, caplog):
    path = tmp_path / "m.zip"
    assert main(["export-model", str(work), str(path), "--folds", "1"]) == 0
    assert read_manifest(path)["folds"] == {"3d_fullres": ["1"]}
    assert main(["import-model", str(path), str(tmp_path / "ws")]) == 0
    export_model(tmp_path / "ws", tmp_path / "again.zip")  # an imported model exports again with its card
    with zipfile.ZipFile(tmp_path / "again.zip") as z:
        assert json.loads(z.read("model_card.json"))["training_data"]["num_cases"] == 3
    assert main(["predict", str(tmp_path / "ws"), "-i", str(inputs), "-o", str(tmp_path / "a"), "--no-mirroring",
                 "--workers", "0"]) == 0
    assert main(["predict", "--model", str(path), "-i", str(inputs), "-o", str(tmp_path / "b"), "--no-mirroring",
                 "--workers", "0"]) == 0
    assert main(["predict", str(work), "--folds", "1", "-i", str(inputs), "-o", str(tmp_path / "c"),
                 "--no-mirroring", "--workers", "0"]) == 0
    for i in range(2):
        a = read_image(tmp_path / "a" / f"case{i}.nii.gz")[0]
        assert np.array_equal(a, read_image(tmp_path / "b" / f"case{i}.nii.gz")[0])
        assert np.array_equal(a, read_image(tmp_path / "c" / f"case{i}.nii.gz")[0])
    cache = [p for p in (tmp_path / "b").iterdir() if p.name.startswith(".autoseg_model_")]
    assert len(cache) == 1 and (cache[0] / "plans.json").is_file()
    # a second run reuses the verified extraction; a damaged one is extracted again
    assert main(["predict", "--model", str(path), "-i", str(inputs), "-o", str(tmp_path / "b"), "--no-mirroring",
                 "--workers", "0", "--continue"]) == 0
    (cache[0] / "plans.json").write_text("{}")
    capsys.readouterr()
    assert main(["predict", "--model", str(path), "-i", str(inputs), "-o", str(tmp_path / "b"), "--no-mirroring",
                 "--workers", "0", "--continue"]) == 0
    assert "plans.json: changed" in caplog.text and Plans.load(cache[0] / "plans.json").labels[2] == "tumour"
    assert main(["predict", str(work), "--model", str(path), "-i", str(inputs), "-o", str(tmp_path / "d")]) == 2
    assert "exactly one" in capsys.readouterr().err


def test_predict_with_model_writes_dicom_seg_for_a_dicom_series_and_nifti_for_the_others(archive, inputs, tmp_path):
    hd = pytest.importorskip("highdicom")
    from test_dicom import write_series

    array = np.zeros(SHAPE, np.int16)
    array[2:6, 4:16, 3:15] = np.random.default_rng(0).integers(100, 300, (4, 12, 12))
    write_series(tmp_path / "in" / "dicom", array, "1.2.3.42", spacing=SPACING)
    out = tmp_path / "out"
    assert main(["predict", "--model", str(archive), "-i", str(tmp_path / "in"), str(inputs / "case0.nii.gz"),
                 "-o", str(out), "--no-mirroring", "--workers", "0", "--output-format", "dicom-seg"]) == 0
    assert (out / "case0.nii.gz").is_file()
    seg = hd.seg.segread(out / "1.2.3.42.dcm")
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == "1.2.3.42"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver", "tumour"]
    # the same series predicted to NIfTI gives the labels the DICOM-SEG holds
    assert main(["predict", "--model", str(archive), "-i", str(tmp_path / "in"), "-o", str(tmp_path / "nifti"),
                 "--no-mirroring", "--workers", "0"]) == 0
    labels, _ = read_image(tmp_path / "nifti" / "1.2.3.42.nii.gz")
    slice_of = {f"1.2.3.42.{i + 1}": i for i in range(SHAPE[0])}
    for frame, item in zip(seg.pixel_array, seg.PerFrameFunctionalGroupsSequence, strict=True):
        z = slice_of[item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        number = item.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        assert np.array_equal(frame.astype(bool), labels[z] == number)


def test_openvino_keeps_no_conversion_inside_a_verified_extraction(archive, inputs, tmp_path, caplog):
    """The workspace's fold folders keep OpenVINO's conversion for the next run; an archive's extraction must stay
    exactly as verified, or every run would extract the model again."""
    pytest.importorskip("openvino")
    for _ in range(2):
        with caplog.at_level(logging.INFO):
            assert main(["predict", "--model", str(archive), "-i", str(inputs), "-o", str(tmp_path / "o"),
                         "--no-mirroring", "--workers", "0", "--runtime", "openvino", "--no-report"]) == 0
    assert "extracting the model again" not in caplog.text
    (extraction,) = [p for p in (tmp_path / "o").iterdir() if p.name.startswith(".autoseg_model_")]
    assert not list(extraction.rglob("openvino_float32"))
