import csv
import dataclasses
import functools
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from PIL import Image

from autoseg import workspace
from autoseg.dataset.image_io import Geometry, read_image, write_image
from autoseg.fingerprint import CaseFingerprint, Fingerprint, IntensityStats
from autoseg.inference.batch import predict_folder
from autoseg.inference.inputs import InputError, discover_inputs, read_input_case
from autoseg.inference.predictor import Predictor, PredictorError
from autoseg.inference.settings import (
    BatchOptions,
    ComputeSettings,
    ModelChoice,
    OutputOptions,
    PredictionSettingsError,
    WindowSettings,
)
from autoseg.model_files import Checkpoint, save_checkpoint
from autoseg.network.unet import UNetTopology, build_unet
from autoseg.planning.planner import plan_experiment

IDENTITY = tuple(np.eye(3).ravel())
ROTATED = tuple(np.array([[0.0, 1, 0], [0, 0, -1], [-1, 0, 0]]).ravel())
CONFIGS = ("3d_fullres", "2d")


def _workspace(root, spacing=(3.0, 0.8, 0.8), shape=(8, 20, 20), num_channels=1, folds=(0, 1)):
    """plans.json from the real planner (features shrunk to keep the nets tiny) and random-weight
    checkpoints for every fold of 3d_fullres and 2d, saved as the trainer saves them."""
    stats = IntensityStats(0.0, 1.0, -1.0, 1.0, 0.0, -1.0, 1.0)
    cases = tuple(CaseFingerprint(f"c{i}", spacing, shape, tuple((0, n) for n in shape), 100, (stats,) * num_channels)
                  for i in range(3))
    fingerprint = Fingerprint("tiny", tuple(f"MRI{c}" for c in range(num_channels)), ("zscore",) * num_channels,
                              {0: "background", 1: "a", 2: "b"}, cases, (stats,) * num_channels)
    plans = plan_experiment(fingerprint, configurations=list(CONFIGS))
    plans = dataclasses.replace(plans, configurations={
        name: dataclasses.replace(config, features_per_stage=tuple(4 * 2 ** i
                                                                   for i in range(len(config.features_per_stage))))
        for name, config in plans.configurations.items()})
    plans.save(workspace.plans_json(root))
    for name, config in plans.configurations.items():
        for fold in folds:
            torch.manual_seed(100 * fold + len(name))
            network = build_unet(UNetTopology.from_plan(config, num_channels, 3), deep_supervision=True)
            save_checkpoint(workspace.fold_dir(root, name, fold) / "checkpoint_final.pt",
                            Checkpoint(configuration=name, network_state=network.state_dict(), epoch=10))
    return plans


def _volume(shape, bbox, seed=0, channels=None):
    lead = () if channels is None else (channels,)
    image = np.zeros(lead + shape, np.float32)
    inside = (slice(None),) * len(lead) + tuple(slice(lo, hi) for lo, hi in bbox)
    image[inside] = np.random.default_rng(seed).uniform(1, 3, image[inside].shape)
    return image


def _write_4d(path, array, spacing=(1.0, 1.0, 1.0)):
    image = sitk.GetImageFromArray(array, isVector=False)  # (C, Z, Y, X) -> a 4D image, channels on the 4th axis
    image.SetSpacing((*reversed(spacing), 1.0))
    sitk.WriteImage(image, str(path))


def _write_cases(folder, n, bbox, shape=(8, 12, 12)) -> list[str]:
    """n NIfTI cases case_0.. of `shape` at 3 x 0.8 x 0.8 mm, non-zero inside `bbox`; their ids."""
    geometry = Geometry((3.0, 0.8, 0.8), (0.0, 0.0, 0.0), IDENTITY, shape)
    names = [f"case_{i}" for i in range(n)]
    for i, name in enumerate(names):
        write_image(folder / f"{name}.nii.gz", _volume(shape, bbox, seed=i), geometry)
    return names


def _no_temporary_files(folder):
    return not [p.name for p in folder.iterdir() if ".tmp" in p.name]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("work")
    _workspace(root)
    return root


def test_label_map_has_the_input_grid_for_an_anisotropic_cropped_rotated_input(work, tmp_path):
    # File axis order has the thick axis last (the plan moves it first), spacing differs from the
    # plan's target (resampling), the data sits inside a zero border (cropping), direction is rotated.
    shape, bbox = (11, 17, 6), ((2, 10), (1, 15), (1, 5))
    geometry = Geometry((0.7, 0.9, 2.5), (12.0, -30.5, 4.0), ROTATED, shape)
    plans = json.loads(workspace.plans_json(work).read_text())
    assert plans["configurations"]["3d_fullres"]["spacing"] == [3.0, 0.8, 0.8]  # so every axis is resampled
    inputs = tmp_path / "in"
    write_image(inputs / "patient.nii.gz", _volume(shape, bbox), geometry)

    report = predict_folder(work, [inputs], tmp_path / "out", ModelChoice(CONFIGS), WindowSettings(mirroring=False),
                            outputs=OutputOptions(save_probabilities=True), batch=BatchOptions(progress=False))

    assert report.written == ["patient"] and not report.failed
    labels, written_geometry = read_image(tmp_path / "out" / "patient.nii.gz")
    assert labels.shape == shape and written_geometry.matches(geometry), written_geometry.differences(geometry)
    outside = np.ones(shape, bool)
    outside[tuple(slice(lo, hi) for lo, hi in bbox)] = False
    assert set(np.unique(labels)) <= {0, 1, 2} and (labels[outside] == 0).all()
    probabilities = np.load(tmp_path / "out" / "patient.npz")["probabilities"]
    assert probabilities.shape == (3, *shape)
    # The .npz holds float16 (about 3 digits): its argmax may differ only where two classes nearly tie.
    top_two = np.sort(probabilities.astype(np.float32), axis=0)[-2:]
    clear = top_two[1] - top_two[0] > 2e-3
    np.testing.assert_array_equal(labels[clear], np.argmax(probabilities.astype(np.float32), axis=0)[clear])
    assert clear.mean() > 0.95
    assert _no_temporary_files(tmp_path / "out")


def test_a_transposed_plan_predicts_a_channel_first_file(tmp_path):
    # Plans made for thick-axis-last data: transpose_forward is not the identity.
    work = tmp_path / "work"
    plans = _workspace(work, spacing=(0.8, 0.8, 3.0), shape=(20, 20, 8), folds=(0,))
    assert plans.transpose_forward == (2, 0, 1)
    shape = (19, 21, 9)
    geometry = Geometry((0.8, 0.8, 3.0), (0.0, 0.0, 0.0), IDENTITY, shape)
    predictor = Predictor(work, ModelChoice(("3d_fullres",)), WindowSettings(mirroring=False))
    probabilities = predictor.predict_case(_volume(shape, ((1, 18), (0, 21), (2, 9)), channels=1), geometry)
    assert probabilities.shape == (3, *shape)
    np.testing.assert_allclose(probabilities.sum(axis=0), 1.0, atol=1e-5)


def test_fold_ensemble_averages_logits_and_resamples_them_before_the_softmax(work):
    shape = (7, 15, 18)
    image = _volume(shape, ((0, 7), (2, 14), (1, 17)), seed=3, channels=1)
    geometry = Geometry((2.0, 1.0, 1.1), (0.0, 0.0, 0.0), IDENTITY, shape)
    predictor = Predictor(work, ModelChoice(("3d_fullres",), folds=None), WindowSettings(mirroring=False),
                          ComputeSettings("cpu", mixed_precision=False))
    both = predictor.predict_case(image, geometry)
    single = [Predictor(work, ModelChoice(("3d_fullres",), folds=[f]), WindowSettings(mirroring=False),
                        ComputeSettings("cpu", mixed_precision=False)).predict_case(image, geometry) for f in (0, 1)]
    assert both.shape == (3, *shape)
    assert not np.allclose(single[0], single[1], atol=1e-3)  # the folds really differ
    np.testing.assert_allclose(both, _nnunet_rules(predictor, image, geometry)[1], atol=1e-5)
    assert np.abs(both - (single[0] + single[1]) / 2).max() > 1e-3  # not the mean of the folds' probabilities


@pytest.mark.parametrize("configuration", CONFIGS)
def test_the_low_memory_forward_of_large_windows_gives_the_same_probabilities(work, monkeypatch, configuration):
    import autoseg.network.low_memory as low_memory

    shape = (7, 15, 18)
    image = _volume(shape, ((0, 7), (2, 14), (1, 17)), seed=3, channels=1)
    geometry = Geometry((2.0, 1.0, 1.1), (0.0, 0.0, 0.0), IDENTITY, shape)
    plain = Predictor(work, ModelChoice((configuration,)), compute=ComputeSettings("cpu", mixed_precision=False))
    assert not isinstance(plain.folds[0].network, functools.partial)  # tiny windows: the plain forward
    monkeypatch.setattr(low_memory, "LARGE_MAP_BYTES", 0)  # every window counts as large
    monkeypatch.setattr(low_memory, "CHUNK_BYTES", 64)  # and is computed a row or two at a time
    lean = Predictor(work, ModelChoice((configuration,)), compute=ComputeSettings("cpu", mixed_precision=False))
    assert lean.folds[0].network.func is low_memory.low_memory_forward
    np.testing.assert_allclose(lean.predict_case(image, geometry), plain.predict_case(image, geometry), atol=1e-5)


def test_bad_inputs_are_reported_by_file_and_the_others_still_run(work, tmp_path):
    shape, bbox = (8, 12, 12), ((0, 8), (1, 11), (1, 11))
    geometry = Geometry((3.0, 0.8, 0.8), (0.0, 0.0, 0.0), IDENTITY, shape)
    inputs = tmp_path / "in"
    for name in ("good_a", "good_b", "truncated"):
        write_image(inputs / f"{name}.nii.gz", _volume(shape, bbox), geometry)
    truncated = inputs / "truncated.nii.gz"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    _write_4d(inputs / "two_channels.nii.gz", _volume(shape, bbox, channels=2), geometry.spacing)
    out = tmp_path / "out"

    for workers in (2, 0):  # threaded pipeline and the inline one behave the same
        report = predict_folder(work, [inputs], out, window=WindowSettings(mirroring=False),
                                batch=BatchOptions(workers=workers, progress=False))
        assert report.written == ["good_a", "good_b"]
        failed = dict(report.failed)
        assert set(failed) == {str(truncated), str(inputs / "two_channels.nii.gz")}
        assert "truncated" in failed[str(truncated)] or "unreadable" in failed[str(truncated)]
        assert "2 channel(s)" in failed[str(inputs / "two_channels.nii.gz")]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "good_a.nii.gz", "good_b.nii.gz", "prediction_summary.json", "qc", "report.html", "volumes.csv"]
    assert sorted(p.name for p in (out / "qc").iterdir()) == ["good_a.png", "good_b.png"]
    saved = json.loads((out / "prediction_summary.json").read_text())
    assert saved["written"] == ["good_a", "good_b"] and len(saved["failed"]) == 2
    assert saved["settings"]["models"][0]["checkpoint"].endswith("checkpoint_final.pt")


def test_continue_skips_outputs_and_parts_split_the_cases(work, tmp_path):
    inputs = tmp_path / "in"
    names = _write_cases(inputs, 5, ((0, 8), (0, 12), (0, 12)))
    out = tmp_path / "out"

    parts = [predict_folder(work, [inputs], out, window=WindowSettings(mirroring=False),
                            batch=BatchOptions(num_parts=2, part_id=p, progress=False)).written
             for p in (0, 1)]
    assert not set(parts[0]) & set(parts[1]) and sorted(parts[0] + parts[1]) == names
    assert (out / "prediction_summary_part1of2.json").is_file()
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")}

    (out / "case_3.nii.gz").unlink()
    report = predict_folder(work, [inputs], out, window=WindowSettings(mirroring=False),
                            batch=BatchOptions(skip_existing=True, progress=False))
    assert report.written == ["case_3"] and sorted(report.skipped) == [n for n in names if n != "case_3"]
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")}
    assert all(after[n] == before[n] for n in before if n != "case_3.nii.gz")
    assert _no_temporary_files(out)


def test_a_continued_batch_predicts_again_the_cases_missing_from_volumes_csv(work, tmp_path):
    inputs = tmp_path / "in"
    names = _write_cases(inputs, 4, ((0, 8), (2, 10), (2, 10)))
    out = tmp_path / "out"
    assert predict_folder(work, [inputs], out, window=WindowSettings(mirroring=False),
                          batch=BatchOptions(workers=0, progress=False)).written == names
    table = out / "volumes.csv"
    with open(table, newline="") as f:
        complete = list(csv.DictReader(f))
    # Interrupted after case_1's label map, before its rows; and in the middle of case_3's last row.
    lines = table.read_text().splitlines(keepends=True)
    kept = [line for line in lines if not line.startswith("case_1,")]
    assert kept[-1].startswith("case_3,2,")
    table.write_text("".join(kept[:-1]) + kept[-1][:12])
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.nii.gz")}

    report = predict_folder(work, [inputs], out, window=WindowSettings(mirroring=False),
                            batch=BatchOptions(workers=0, progress=False, skip_existing=True))

    assert report.written == ["case_1", "case_3"] and report.skipped == ["case_0", "case_2"]
    assert all(p.stat().st_mtime_ns == before[p.name] for p in out.glob("*.nii.gz") if p.name in
               ("case_0.nii.gz", "case_2.nii.gz"))
    with open(table, newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted((r["case"], r["label"]) for r in rows) == [(n, label) for n in names for label in ("1", "2")]
    by_key = {(r["case"], r["label"]): r for r in rows}
    assert all(by_key[r["case"], r["label"]] == r for r in complete)  # the same model gives the same rows
    assert _no_temporary_files(out)


def test_checkpoint_final_falls_back_to_latest_and_missing_folds_are_named(tmp_path):
    work = tmp_path / "work"
    _workspace(work, folds=(0,))
    fold = workspace.fold_dir(work, "3d_fullres", 0)
    (fold / "checkpoint_final.pt").rename(fold / "checkpoint_latest.pt")
    predictor = Predictor(work, ModelChoice(("3d_fullres",)), compute=ComputeSettings("cpu"))
    assert predictor.folds[0].checkpoint.name == "checkpoint_latest.pt"
    with pytest.raises(PredictorError, match="checkpoint_best.pt"):
        Predictor(work, ModelChoice(("3d_fullres",), checkpoint="best"))
    with pytest.raises(PredictorError, match="fold_3"):
        Predictor(work, ModelChoice(("3d_fullres",), folds=[3]))


def test_nnunet_style_folder_is_grouped_by_case_and_a_missing_channel_reported(tmp_path):
    shape = (4, 5, 6)
    geometry = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), IDENTITY, shape)
    for case, channels in (("liver_001", (0, 1)), ("liver_002", (0, 1)), ("liver_003", (0,))):
        for c in channels:
            write_image(tmp_path / f"{case}_{c:04d}.nii.gz", np.full(shape, c + 1, np.float32), geometry)

    cases, problems = discover_inputs([tmp_path], num_channels=2)
    assert [c.case_id for c in cases] == ["liver_001", "liver_002"]
    assert [f.name for f in cases[0].files] == ["liver_001_0000.nii.gz", "liver_001_0001.nii.gz"]
    assert len(problems) == 1 and "liver_003_0001.nii.gz" in problems[0][1]
    image, read_geometry = read_input_case(cases[1], num_channels=2)
    assert image.shape == (2, *shape) and image.dtype == np.float32 and read_geometry.matches(geometry)
    np.testing.assert_array_equal(image[:, 0, 0, 0], [1, 2])


def test_decathlon_style_4d_folder_and_explicit_files_are_one_case_each(tmp_path):
    shape = (4, 5, 6)
    folder = tmp_path / "imagesTs"
    folder.mkdir()
    for case in ("prostate_0000", "prostate_0001"):  # named like channel files, but 4D: one case each
        _write_4d(folder / f"{case}.nii.gz", np.stack([np.full(shape, 1.0), np.full(shape, 2.0)]).astype(np.float32))
    (folder / "notes.txt").write_text("not an image")

    cases, problems = discover_inputs([folder], num_channels=2)
    assert [c.case_id for c in cases] == ["prostate_0000", "prostate_0001"] and not problems
    image, geometry = read_input_case(cases[0], num_channels=2)
    assert image.shape == (2, *shape) and geometry.shape == shape

    single = tmp_path / "ct_0001.nii.gz"
    write_image(single, np.ones(shape, np.float32), Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), IDENTITY, shape))
    cases, problems = discover_inputs([single, folder / "prostate_0000.nii.gz", tmp_path / "absent.nii.gz"], 1)
    assert [c.case_id for c in cases] == ["ct_0001", "prostate_0000"]
    assert problems == [(str(tmp_path / "absent.nii.gz"), "no such file or folder")]
    with pytest.raises(InputError, match="has 2 channel"):
        read_input_case(cases[1], num_channels=1)


def test_rgb_pictures_are_predicted_into_label_maps_of_the_same_format_and_size(tmp_path):
    work = tmp_path / "work"
    plans = _workspace(work, spacing=(999.0, 1.0, 1.0), shape=(1, 24, 28), num_channels=3, folds=(0,))
    assert plans.default_configuration == "2d"
    inputs = tmp_path / "imagesTs"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    sizes = {"cells_a": (24, 30), "cells_b": (31, 27), "photo": (20, 22)}  # (height, width)
    for name, size in sizes.items():
        ending = ".jpg" if name == "photo" else ".png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(inputs / f"{name}_0000{ending}")

    report = predict_folder(work, [inputs], tmp_path / "out", window=WindowSettings(mirroring=False),
                            batch=BatchOptions(progress=False))  # default: 2d

    assert report.written == sorted(sizes) and not report.failed
    assert report.settings["configurations"] == ["2d"]
    for name, (height, width) in sizes.items():
        out = tmp_path / "out" / f"{name}.png"  # the JPEG input gets a lossless PNG
        assert Image.open(out).size == (width, height)
        labels, geometry = read_image(out)
        assert labels.shape == (1, height, width) and geometry.is_2d and set(np.unique(labels)) <= {0, 1, 2}
    assert _no_temporary_files(tmp_path / "out")


def test_a_folder_of_rgb_pictures_is_one_case_per_picture_and_a_greyscale_one_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)).save(tmp_path / "dsb_001_0000.png")
    Image.fromarray(rng.integers(0, 256, (5, 6), dtype=np.uint8)).save(tmp_path / "dsb_002_0000.png")

    cases, problems = discover_inputs([tmp_path], num_channels=3)
    assert [c.case_id for c in cases] == ["dsb_001", "dsb_002"] and not problems  # no "_0001 missing"
    image, geometry = read_input_case(cases[0], num_channels=3)
    assert image.shape == (3, 1, 5, 6) and geometry.spacing == (999.0, 1.0, 1.0)
    with pytest.raises(InputError, match=r"has 1 channel\(s\), the model needs 3; pass a picture with 3 .*RGB"):
        read_input_case(cases[1], num_channels=3)


def _nnunet_rules(predictor, image, geometry):
    """nnU-Net v2's ensemble written out in full: per configuration the folds' logits averaged, every label
    resampled to the input's grid, softmax, uncropped; configurations averaged. (labels, probabilities)."""
    from autoseg.inference.sliding_window import SlidingWindow, sliding_window_predict
    from autoseg.preprocessing.cropping import uncrop
    from autoseg.preprocessing.resampling import resample_probabilities, separate_axis_for

    prepared = predictor.prepare(image, geometry)
    plans, total = predictor.plans, None
    for name, data, properties in zip(prepared.configurations, prepared.data, prepared.properties):
        folds = [f for f in predictor.folds if f.configuration == name]
        patch = plans.configurations[name].patch_size
        window = SlidingWindow(patch, 3, accumulator_dtype=torch.float32)
        logits = sum(sliding_window_predict(f.network, torch.from_numpy(data), window) for f in folds) / len(folds)
        forward, backward = plans.transpose_forward, plans.transpose_backward
        original_spacing = [properties.original_geometry.spacing[a] for a in forward]
        separate = separate_axis_for(properties.spacing, original_spacing, plans.resampling.anisotropy_threshold)
        cropped = tuple(properties.shape_after_crop[a] for a in forward)
        logits = resample_probabilities(logits.numpy(), cropped, 1, separate, plans.resampling.thick_axis_order)
        p = torch.softmax(torch.from_numpy(logits), 0).numpy()
        fill = np.array([1.0, 0.0, 0.0], np.float32)
        p = uncrop(np.ascontiguousarray(p.transpose(0, *(a + 1 for a in backward))),
                   tuple(tuple(b) for b in properties.nonzero_bbox), tuple(geometry.shape), fill=fill)
        total = p if total is None else total + p
    return np.argmax(total / len(prepared.configurations), axis=0), total / len(prepared.configurations)


@pytest.mark.parametrize("configs, spacing, shape, bbox, streams", [
    # thick axis resampled apart (nearest slices), fewer slices than the plan's grid, cropped: streamed in slabs
    (("3d_fullres",), (2.0, 0.7, 0.9), (26, 17, 15), ((2, 25), (1, 16), (0, 14)), True),
    # the thick axis keeps its slices, in-plane resampled: streamed
    (("3d_fullres",), (3.0, 0.7, 0.9), (18, 17, 15), ((0, 17), (3, 17), (2, 13)), True),
    # no thick axis on either grid: plain 3D resampling of the whole volume
    (("3d_fullres",), (1.1, 0.9, 1.0), (10, 13, 12), ((1, 10), (0, 13), (2, 12)), False),
    # two configurations averaged on the input's grid
    (("3d_fullres", "2d"), (2.5, 0.7, 0.9), (9, 17, 15), ((1, 8), (1, 16), (0, 15)), False),
])
def test_label_by_label_export_follows_nnunets_ensemble_rules(work, configs, spacing, shape, bbox, streams,
                                                              monkeypatch):
    from autoseg.inference.original_grid import LabelMapBuilder

    geometry = Geometry(spacing, (1.0, 2.0, 3.0), IDENTITY, shape)
    image = _volume(shape, bbox, seed=7, channels=1)
    predictor = Predictor(work, ModelChoice(configs), WindowSettings(mirroring=False),
                          ComputeSettings("cpu", mixed_precision=False))
    slabs = []
    add = LabelMapBuilder.add
    monkeypatch.setattr(LabelMapBuilder, "add", lambda self, z0, p: slabs.append(p[0].shape) or add(self, z0, p))

    result = predictor.segment(predictor.prepare(image, geometry))

    expected, probabilities = _nnunet_rules(predictor, image, geometry)
    assert result.labels.shape == shape and result.labels.dtype == np.uint8 and result.members == 2 * len(configs)
    np.testing.assert_array_equal(result.labels, expected)
    assert len(set(np.unique(expected))) > 1  # not a trivial all-background case
    network_depth = predictor.prepare(image, geometry).data[0].shape[1]
    assert (len(slabs) > 1 and all(s[1] < network_depth for s in slabs)) == streams
    # Uncertainty: mean normalised entropy of the averaged probabilities over each label's voxels.
    entropy = -(probabilities * np.log(np.maximum(probabilities, 1e-30))).sum(axis=0) / np.log(3)
    for label, score in result.uncertainty.items():
        assert 0 <= score <= 1
        assert score == pytest.approx(entropy[expected == label].mean(), abs=1e-5)
    assert set(result.uncertainty) == set(np.unique(expected)) - {0}


def test_2d_pictures_stream_slice_by_slice_with_nnunets_labels(tmp_path):
    work = tmp_path / "work"
    _workspace(work, spacing=(999.0, 1.0, 1.0), shape=(1, 24, 28), folds=(0, 1))
    shape = (1, 23, 30)
    geometry = Geometry((999.0, 0.8, 1.3), (0.0, 0.0, 0.0), IDENTITY, shape)
    image = _volume(shape, ((0, 1), (2, 21), (1, 29)), seed=2, channels=1)
    predictor = Predictor(work, ModelChoice(("2d",)), WindowSettings(mirroring=False),
                          ComputeSettings("cpu", mixed_precision=False))
    result = predictor.segment(predictor.prepare(image, geometry), entropy_map=True)
    expected, _ = _nnunet_rules(predictor, image, geometry)
    np.testing.assert_array_equal(result.labels, expected)
    assert result.entropy.shape == shape and result.entropy.dtype == np.float32
    assert 0 <= result.entropy.min() and result.entropy.max() <= 1 and (result.entropy[0, 0] == 0).all()


def test_ensembles_flag_uncertain_labels_and_write_the_uncertainty_map(work, tmp_path):
    shape, bbox = (8, 14, 13), ((0, 8), (1, 13), (1, 12))
    geometry = Geometry((3.0, 0.8, 0.8), (5.0, 0.0, -2.0), ROTATED, shape)
    inputs = tmp_path / "in"
    write_image(inputs / "case_a.nii.gz", _volume(shape, bbox, seed=4), geometry)
    out = tmp_path / "out"

    report = predict_folder(work, [inputs], out, ModelChoice(["3d_fullres"]), WindowSettings(mirroring=False),
                            outputs=OutputOptions(save_uncertainty=True, uncertainty_threshold=0.0),
                            batch=BatchOptions(progress=False))

    assert report.written == ["case_a"]
    entropy, written_geometry = read_image(out / "case_a_uncertainty.nii.gz")
    assert entropy.dtype == np.float32 and written_geometry.matches(geometry)
    assert 0 <= entropy.min() <= entropy.max() <= 1
    with open(out / "volumes.csv", newline="") as f:
        present = [r for r in csv.DictReader(f) if int(r["voxels"]) > 0]
    assert present and all(r["flagged"] == "yes" and 0 < float(r["uncertainty"]) <= 1 for r in present), present
    assert (out / "report.html").is_file() and (out / "qc" / "case_a.png").is_file()

    # One fold: nothing to disagree about, so no score and no map; --no-report writes no table.
    single = predict_folder(work, [inputs], tmp_path / "single", ModelChoice(["3d_fullres"], folds=[0]),
                            WindowSettings(mirroring=False),
                            outputs=OutputOptions(save_uncertainty=True, report_files=False),
                            batch=BatchOptions(progress=False))
    assert single.written == ["case_a"]
    assert sorted(p.name for p in (tmp_path / "single").iterdir()) == ["case_a.nii.gz", "prediction_summary.json"]


def test_dicom_series_go_to_write_dicom_seg_when_asked(work, tmp_path, monkeypatch):
    import sys
    import types

    from autoseg.inference import batch as batch_module
    from autoseg.inference import predictor as predictor_module
    from autoseg.inference.inputs import InputCase
    from autoseg.inference.volumes import VolumeTable

    calls = []
    fake = types.ModuleType("autoseg.inference.dicom_seg")
    fake.write_dicom_seg = lambda segmentation, geometry, source_files, labels, path, regions=None: calls.append(
        (segmentation.copy(), geometry, tuple(source_files), labels, path))
    monkeypatch.setitem(sys.modules, "autoseg.inference.dicom_seg", fake)
    shape = (4, 6, 5)
    geometry = Geometry((3.0, 0.8, 0.8), (0.0, 0.0, 0.0), IDENTITY, shape)
    labels = np.zeros(shape, np.uint8)
    labels[1:3, 2:4, 1:3] = 2
    labels[3, 5, 4] = 2  # a stray voxel the rules remove
    series = InputCase("1.2.840.99", (tmp_path / "IM0001.dcm", tmp_path / "IM0002.dcm"))
    rules = {"format_version": 1, "foreground_largest_component": False, "largest_component_labels": [2]}
    options = OutputOptions(save_probabilities=False, save_uncertainty=False, uncertainty_threshold=0.1,
                            output_format="dicom-seg")
    outputs = batch_module._Writing(tmp_path / "out", rules, options, {0: "background", 1: "a", 2: "b"},
                                    VolumeTable(tmp_path / "out" / "volumes.csv", "test"))
    prepared = predictor_module.PreparedCase(geometry, ("3d_fullres",), (), ({},))
    predictor = Predictor(work, ModelChoice(("3d_fullres",)), compute=ComputeSettings("cpu"))

    batch_module._write_case(predictor, series, prepared, predictor_module.CaseSegmentation(labels, 2, {2: 0.3}),
                             outputs)

    assert len(calls) == 1
    segmentation, written_geometry, files, names, path = calls[0]
    assert path == tmp_path / "out" / "1.2.840.99.dcm" and files == series.files and names[2] == "b"
    assert written_geometry == geometry and segmentation.sum() == 2 * 8 and segmentation[3, 5, 4] == 0
    assert "1.2.840.99,2,b,8" in (tmp_path / "out" / "volumes.csv").read_text()
    assert batch_module._output_path(tmp_path, series, "default").name == "1.2.840.99.nii.gz"


# --- validation and `autoseg predict` agree; prediction settings are checked -----------------------


@pytest.mark.parametrize("configuration", CONFIGS)
def test_validation_after_training_and_autoseg_predict_give_the_same_label_map(work, tmp_path, configuration):
    """A fold's validation (the network still in memory, the case from the preprocessed folder) and
    `autoseg predict` (the fold's checkpoint, the case from its file) must give the same labels."""
    from autoseg.cli import main
    from autoseg.inference.original_grid import write_segmentation
    from autoseg.inference.predictor import PreparedCase
    from autoseg.model_files import load_checkpoint
    from autoseg.planning.plans import Plans
    from autoseg.preprocessing import store
    from autoseg.preprocessing.preprocess import preprocess_case

    shape, bbox = (11, 17, 14), ((2, 10), (1, 15), (1, 13))
    inputs = tmp_path / "in"
    write_image(inputs / "case_v.nii.gz", _volume(shape, bbox, seed=11),
                Geometry((2.6, 0.7, 0.9), (12.0, -30.5, 4.0), ROTATED, shape))  # cropped, resampled, rotated
    # Both sides see the file as read (spacings as float32 in the header), as training's preprocessing reads it.
    image, geometry = read_image(inputs / "case_v.nii.gz")
    label = np.zeros(shape, np.int16)
    label[3:8, 4:12, 3:10] = 1
    label[5:7, 6:9, 5:8] = 2
    window, compute = WindowSettings(mirroring=False), ComputeSettings("cpu", mixed_precision=False)
    plans = Plans.load(workspace.plans_json(work))

    # Validation: the preprocessed case as `autoseg plan` stores it, the network as training leaves it.
    data_dir = tmp_path / "preprocessed"
    data, seg, properties = preprocess_case(image[None], label, geometry, plans, configuration)
    store.save_case(data_dir, "case_v", data, seg, dataclasses.replace(properties, case_id="case_v"),
                    patch_size=plans.configuration(configuration).patch_size)
    network = build_unet(plans.network_topology(configuration), deep_supervision=True)
    checkpoint = workspace.fold_dir(work, configuration, 0) / "checkpoint_final.pt"
    network.load_state_dict(load_checkpoint(checkpoint).network_state)
    network.deep_supervision = False  # as the trainer hands it to validation
    validation = Predictor.from_networks(plans, configuration, [network], window, compute)
    stored = store.load_properties(data_dir, "case_v")
    prepared = PreparedCase(stored.original_geometry, (configuration,), (store.load_case_image(data_dir, "case_v"),),
                            (stored,))
    validated = validation.segment(prepared).labels
    write_segmentation(validated, stored.original_geometry, tmp_path / "validation" / "case_v.nii.gz")

    # Prediction: a Predictor loading the same fold from the workspace, and `autoseg predict` on the file.
    loaded = Predictor(work, ModelChoice((configuration,), folds=[0]), window, compute)
    assert loaded.folds[0].checkpoint == checkpoint
    predicted = loaded.segment(loaded.prepare(image[None], geometry)).labels
    assert main(["predict", str(work), "-i", str(inputs), "-o", str(tmp_path / "out"), "--config", configuration,
                 "--folds", "0", "--no-mirroring", "--fp32", "--device", "cpu", "--workers", "0",
                 "--runtime", "torch"]) == 0  # the network validation ran, not OpenVINO's conversion of it

    assert validated.shape == shape and len(np.unique(validated)) > 1  # not a trivial all-background map
    np.testing.assert_array_equal(predicted, validated)
    from_validation, _ = read_image(tmp_path / "validation" / "case_v.nii.gz")
    from_predict, predict_geometry = read_image(tmp_path / "out" / "case_v.nii.gz")
    assert predict_geometry.matches(geometry)
    np.testing.assert_array_equal(from_predict, from_validation)
    np.testing.assert_array_equal(from_predict, validated)


@pytest.mark.parametrize("make, option", [
    (lambda: WindowSettings(step_size=0), "step size"),
    (lambda: WindowSettings(step_size=1.5), "step size"),
    (lambda: WindowSettings(tiles_per_batch=0), "tiles per batch"),
    (lambda: OutputOptions(uncertainty_threshold=2), "uncertainty threshold"),
    (lambda: OutputOptions(output_format="png"), "output format"),
    (lambda: BatchOptions(num_parts=2, part_id=2), "part id"),
    (lambda: BatchOptions(num_parts=2, part_id=-1), "part id"),
    (lambda: BatchOptions(workers=-1), "workers"),
    (lambda: ComputeSettings("cpu", runtime="tensorrt"), "runtime"),
    (lambda: ModelChoice(checkpoint="newest"), "checkpoint"),
])
def test_prediction_settings_out_of_range_are_refused_naming_the_option(make, option):
    from autoseg.errors import AutosegError

    with pytest.raises(PredictionSettingsError, match=option) as raised:
        make()
    assert isinstance(raised.value, AutosegError)  # the CLI prints it as a one-line error


def test_predict_cli_refuses_a_step_size_of_zero_in_one_line(work, tmp_path, capsys):
    from autoseg.cli import main

    inputs = tmp_path / "in"
    _write_cases(inputs, 1, ((0, 8), (2, 10), (2, 10)))
    out = tmp_path / "out"
    assert main(["predict", str(work), "-i", str(inputs), "-o", str(out), "--step-size", "0", "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "step size" in err and "Traceback" not in err
    assert not (out / "case_0.nii.gz").exists()


def test_runtime_auto_picks_openvino_only_where_torch_would_run_float32_on_the_cpu(monkeypatch):
    import importlib.util

    import torch

    from autoseg.inference import openvino_runtime
    from autoseg.inference.openvino_runtime import choose_runtime

    cpu = torch.device("cpu")
    installed = importlib.util.find_spec("openvino") is not None
    monkeypatch.setattr(openvino_runtime, "cpu_has_native_bf16", lambda: False)
    assert choose_runtime("auto", cpu, True)[0] == ("openvino" if installed else "torch")
    assert choose_runtime("auto", cpu, False)[0] == ("openvino" if installed else "torch")
    assert choose_runtime("torch", cpu, True) == ("torch", "asked for")
    assert choose_runtime("auto", torch.device("cuda"), True)[0] == "torch"
    monkeypatch.setattr(openvino_runtime, "cpu_has_native_bf16", lambda: True)
    assert choose_runtime("auto", cpu, True)[0] == "torch"  # bf16 measured faster there
    assert choose_runtime("auto", cpu, False)[0] == ("openvino" if installed else "torch")  # --fp32: float32 anyway
    monkeypatch.setattr(openvino_runtime.importlib.util, "find_spec", lambda name: None)
    runtime, why = choose_runtime("auto", cpu, False)
    assert runtime == "torch" and "pip install 'autoseg[openvino]'" in why
