"""Instance segmentation: object rims as training labels, objects back from a predicted label map, the
instance map and object table that prediction writes."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from PIL import Image

from autoseg import workspace
from autoseg.cli import main
from autoseg.dataset.layout import DatasetError, load_dataset, read_case_instances
from autoseg.inference.instance_maps import instances_from_rims, object_rows, relabel_sequential
from autoseg.planning.plans import PlanError, Plans
from autoseg.preprocessing import store
from autoseg.preprocessing.instance_targets import boundary_target, inner_boundaries, touching_pairs


def two_touching_and_one_apart(shape=(20, 30)) -> np.ndarray:
    inst = np.zeros(shape, dtype=np.int32)
    inst[2:10, 2:12] = 1
    inst[2:10, 12:22] = 2  # touches object 1 along a whole side
    inst[13:18, 3:8] = 3
    return inst


def test_the_rim_parts_two_touching_objects_that_one_label_map_would_merge():
    inst = two_touching_and_one_apart()
    label = (inst > 0).astype(np.int16)
    target = boundary_target(label, inst, 2)
    assert touching_pairs(inst) == 1
    # the two columns where the objects meet are both rim: the interiors no longer touch
    assert (target[3:9, 11] == 2).all() and (target[3:9, 12] == 2).all()
    from scipy import ndimage
    assert ndimage.label(target == 1)[1] == 3
    assert ndimage.label(label == 1)[1] == 2  # the semantic map has only two objects
    # rims stay inside objects: the foreground is unchanged
    assert np.array_equal(target > 0, label > 0)


def test_in_plane_rims_ignore_the_neighbouring_slices():
    inst = np.zeros((5, 8, 8), dtype=np.int32)
    inst[1:4, 2:6, 2:6] = 1
    assert inner_boundaries(inst, in_plane=True)[2].sum() == 12  # only the square's in-plane rim
    assert inner_boundaries(inst, in_plane=False)[2].sum() == 12  # the middle slice's 3D rim is the same
    assert inner_boundaries(inst, in_plane=False)[1].sum() == 16  # but the object's top slice is all rim in 3D
    assert inner_boundaries(inst, in_plane=True)[1].sum() == 12
    # the array's own edge is no rim: a crop through an object does not invent one
    assert inner_boundaries(np.ones((1, 6, 6), dtype=np.int32)).sum() == 0


@pytest.mark.parametrize("shape", [(40, 60), (12, 30, 40)])
def test_objects_come_back_exactly_from_their_rims(shape):
    """Boxes packed side by side (every object touches its neighbours), some cells left empty: the rims drawn
    for training, taken back as a prediction, give the same objects and the same label map."""
    rng = np.random.default_rng(0)
    cuts = [np.unique(np.concatenate([[0], np.cumsum(rng.integers(3, 9, size=20)), [n]]).clip(0, n)) for n in shape]
    cuts = [c[np.concatenate([[True], np.diff(c) >= 3])] for c in cuts]
    inst = np.zeros(shape, dtype=np.int32)
    n = 0
    for box in np.ndindex(*[len(c) - 1 for c in cuts]):
        if rng.random() < 0.2:
            continue  # background here
        n += 1
        inst[tuple(slice(c[i], c[i + 1]) for c, i in zip(cuts, box))] = n
    label = (inst > 0).astype(np.int16)
    target = boundary_target(label, inst, 2)
    recovered, semantic = instances_from_rims(target, 2)
    assert np.array_equal(semantic, label)
    pairs = {(int(a), int(b)) for a, b in zip(inst[inst > 0], recovered[inst > 0])}
    assert len(pairs) == n and len({a for a, _ in pairs}) == n and len({b for _, b in pairs}) == n
    assert touching_pairs(inst) > n // 2  # the case is about touching objects


def test_rim_voxels_take_the_label_of_their_object():
    inst = two_touching_and_one_apart()
    label = np.where(inst == 2, 2, inst > 0).astype(np.int16)  # object 2 is of class 2
    target = boundary_target(label, inst, 3)
    instances, semantic = instances_from_rims(target, 3)
    assert np.array_equal(semantic, label)
    assert len(np.unique(instances)) == 4


def test_a_rim_without_interior_is_still_an_object():
    labels = np.zeros((10, 10), dtype=np.int16)
    labels[2:4, 2:4] = 2  # a 2 x 2 object is all rim
    labels[6:9, 6:9] = 2
    labels[7, 7] = 1
    instances, semantic = instances_from_rims(labels, 2)
    assert len(np.unique(instances)) == 3
    assert set(np.unique(semantic)) == {0, 1}


def test_object_rows_give_size_and_centroid():
    inst = relabel_sequential(two_touching_and_one_apart() * 5)  # ids 5, 10, 15 -> 1, 2, 3
    assert inst.dtype == np.uint16 and inst.max() == 3
    rows = object_rows(inst, (inst > 0).astype(np.int16), (0.5, 0.5))
    assert [r["voxels"] for r in rows] == [80, 80, 25]
    assert rows[2]["size"] == pytest.approx(25 * 0.25)
    assert rows[2]["centroid"] == [15.0, 5.0]


# --- datasets, plans and preprocessing ----------------------------------------------------------


def write_instance_dataset(root, cases=5, with_instances=True, shape=(24, 32)):
    for sub in ("imagesTr", "labelsTr", "instancesTr"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for i in range(cases):
        inst = np.zeros(shape, dtype=np.uint16)
        inst[4:12, 4:14] = 1
        inst[4:12, 14:24] = 2
        inst[15:21, 6:12] = 3
        image = (rng.normal(60, 10, shape) + 120 * (inst > 0)).clip(0, 255).astype(np.uint8)
        image[inst > 0] -= (30 * ((inst[inst > 0] % 2) == 0)).astype(np.uint8)
        Image.fromarray(image).save(root / "imagesTr" / f"c{i}_0000.png")
        Image.fromarray((inst > 0).astype(np.uint8)).save(root / "labelsTr" / f"c{i}.png")
        if with_instances:
            Image.fromarray(inst).save(root / "instancesTr" / f"c{i}.png")
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "microscopy"},
                                                   "labels": {"background": 0, "cell": 1}, "file_ending": ".png"}))
    return root


def test_a_dataset_with_instance_maps_finds_them_and_checks_them(tmp_path):
    root = write_instance_dataset(tmp_path / "ds")
    dataset = load_dataset(root)
    assert dataset.has_instances and dataset.cases[0].instance_file.name == "c0.png"
    label = np.zeros((1, 24, 32), dtype=np.int16)
    with pytest.raises(DatasetError, match="c0.png.*background"):
        read_case_instances(dataset.cases[0], label)  # objects where the label map says background
    with pytest.raises(DatasetError, match="shape"):
        read_case_instances(dataset.cases[0], np.zeros((1, 5, 5), dtype=np.int16))


def test_plan_learns_rims_when_the_dataset_has_instance_maps(tmp_path):
    root = write_instance_dataset(tmp_path / "ds")
    work = tmp_path / "work"
    assert main(["plan", str(root), "-o", str(work), "--workers", "1"]) == 0
    plans = Plans.load(workspace.plans_json(work))
    assert plans.labels == {0: "background", 1: "cell", 2: "object_boundary"}
    assert plans.boundary_label == 2 and plans.output_labels == {0: "background", 1: "cell"}
    assert plans.num_classes == 3
    seg = store.open_array(workspace.preprocessed_dir(work, "2d") / "c0_seg.b2nd")[:]
    assert set(np.unique(seg)) == {0, 1, 2}
    assert (seg[0, 0, 5:11, 13] == 2).all() and (seg[0, 0, 5:11, 14] == 2).all()  # the shared edge is rim twice

    semantic = tmp_path / "semantic"
    assert main(["plan", str(root), "-o", str(semantic), "--workers", "1", "--instances", "off"]) == 0
    plans_off = Plans.load(workspace.plans_json(semantic))
    assert plans_off.instances is None and plans_off.labels == {0: "background", 1: "cell"}
    seg = store.open_array(workspace.preprocessed_dir(semantic, "2d") / "c0_seg.b2nd")[:]
    assert set(np.unique(seg)) == {0, 1}


def test_instances_on_without_maps_is_a_clear_error(tmp_path, capsys):
    root = write_instance_dataset(tmp_path / "ds", with_instances=False)
    assert main(["plan", str(root), "-o", str(tmp_path / "w"), "--workers", "1", "--instances", "on"]) != 0
    err = capsys.readouterr().err
    assert "instancesTr" in err and "0 of 5" in err and "Traceback" not in err


def test_plans_json_checks_the_instance_record(tmp_path):
    root = write_instance_dataset(tmp_path / "ds")
    work = tmp_path / "work"
    assert main(["plan", str(root), "-o", str(work), "--workers", "1", "--steps", "verify", "fingerprint",
                 "plan"]) == 0
    data = json.loads(workspace.plans_json(work).read_text())
    assert Plans.from_json(data).instances.boundary_label == 2
    data["instance_segmentation"]["boundary_label"] = 1
    with pytest.raises(PlanError, match="boundary_label.*highest"):
        Plans.from_json(data)
    data["instance_segmentation"] = {"method": "watershed", "boundary_label": 2}
    with pytest.raises(PlanError, match="method"):
        Plans.from_json(data)


def test_instances_and_an_ignore_label_are_refused_with_a_reason():
    from dataclasses import replace

    from test_planning import HIPPOCAMPUS

    from autoseg.planning.planner import plan_experiment

    plans = replace(plan_experiment(HIPPOCAMPUS), labels={0: "background", 1: "cell", 2: "ignore"})
    with pytest.raises(PlanError, match="ignore label"):
        plans.with_instance_boundaries("test")


# --- end to end -------------------------------------------------------------------------------


def test_train_and_predict_write_an_instance_map_and_object_table(tmp_path):
    root = write_instance_dataset(tmp_path / "ds")
    work = tmp_path / "work"
    assert main(["plan", str(root), "-o", str(work), "--workers", "1"]) == 0
    plans = json.loads(workspace.plans_json(work).read_text())
    plans["configurations"]["2d"].update(patch_size=[16, 16], batch_size=2, features_per_stage=[4, 8],
                                         kernel_sizes=[[3, 3]] * 2, strides=[[1, 1], [2, 2]])
    workspace.plans_json(work).write_text(json.dumps(plans))
    assert main(["train", str(work), "--fold", "0", "--epochs", "1", "--iters-per-epoch", "2", "--val-iters", "1",
                 "--workers", "0", "--elastic"]) == 0
    fold = workspace.fold_dir(work, "2d", 0)
    log = (fold / "training_log.txt").read_text()
    assert "elastic deformation on a 3-node grid per axis, sigma 10 voxels" in log
    validation = json.loads((fold / "validation" / "summary.json").read_text())
    assert set(validation["mean"]) == {"1"}  # the rim label is never scored
    validated = sorted(p.name for p in (fold / "validation").glob("*_instances.png"))
    assert validated and len(validated) == validation["num_cases"]

    out = tmp_path / "pred"
    assert main(["predict", str(work), "-i", str(root / "imagesTr"), "-o", str(out), "--folds", "0"]) == 0
    labels = np.array(Image.open(out / "c0.png"))
    instances = Image.open(out / "c0_instances.png")
    assert instances.mode.startswith("I")  # 16-bit
    instances = np.array(instances)
    assert set(np.unique(labels)) <= {0, 1}  # the rim label is given back to the objects
    assert np.array_equal(instances > 0, labels > 0)
    with open(out / "objects.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    ours = [r for r in rows if r["case"] == "c0"]
    assert len(ours) == len(np.unique(instances)) - 1
    assert sum(int(r["pixels"]) for r in ours) == int((instances > 0).sum())
    assert {r["case"] for r in rows} == {f"c{i}" for i in range(5)}


def test_the_report_counts_objects_and_the_overlay_outlines_them(tmp_path):
    from autoseg.dataset.image_io import PSEUDO_SPACING_2D, Geometry
    from autoseg.inference.instance_maps import gather_object_tables, write_instances
    from autoseg.inference.qc import overlay_figure, write_html_report

    inst = two_touching_and_one_apart()
    seg = (inst > 0).astype(np.uint8)[None]
    identity = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    geometry = Geometry((PSEUDO_SPACING_2D, 1.0, 1.0), (0.0, 0.0, 0.0), identity, (1, 20, 30))
    assert geometry.is_2d
    write_instances(inst[None], seg, geometry, "a", tmp_path / "a.png", {0: "background", 1: "cell"})
    assert (tmp_path / "a_instances.png").is_file()
    gather_object_tables(tmp_path)
    write_html_report(tmp_path, tmp_path / "volumes.csv", tmp_path / "qc", tmp_path / "report.html")
    html = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "<h2>Objects</h2>" in html and "3 object(s) in 1 case(s)" in html
    figure = overlay_figure(np.zeros((1, 1, 20, 30), np.float32), seg, geometry, {0: "background", 1: "cell"},
                            instances=inst[None])
    assert "3 objects outlined" in figure.texts[0].get_text()


def test_verify_names_a_bad_instance_map_and_warns_about_missing_ones(tmp_path):
    from autoseg.dataset.verify import verify_dataset

    root = write_instance_dataset(tmp_path / "ds")
    inst = np.array(Image.open(root / "instancesTr" / "c1.png"))
    inst[0, 0] = 7  # an object where the label map is background
    Image.fromarray(inst).save(root / "instancesTr" / "c1.png")
    (root / "instancesTr" / "c2.png").unlink()
    report = verify_dataset(load_dataset(root), progress=False)
    errors = [str(p) for p in report.errors]
    warnings = [str(p) for p in report.warnings]
    assert any("c1.png" in e and "background" in e for e in errors)
    assert any("4 of 5 cases" in w and "c2" in w for w in warnings)


def test_crossval_ensembles_give_rim_voxels_back_to_their_objects(tmp_path):
    from autoseg.crossval import _ensemble_prediction

    inst = two_touching_and_one_apart()
    target = boundary_target((inst > 0).astype(np.int16), inst, 2)[None]  # (1, Y, X)
    probabilities = np.stack([target == k for k in range(3)]).astype(np.float16)  # one-hot, 3 classes
    for config in ("2d", "3d_fullres"):
        folder = workspace.fold_dir(tmp_path, config, 0) / "validation"
        folder.mkdir(parents=True)
        np.savez(folder / "c.npz", probabilities=probabilities)
    from types import SimpleNamespace

    with_rims, without = SimpleNamespace(regions=(), boundary_label=2), SimpleNamespace(regions=(), boundary_label=None)
    merged = _ensemble_prediction(tmp_path, ["2d", "3d_fullres"], "c", {"2d": 0, "3d_fullres": 0}, with_rims)
    assert np.array_equal(merged, (inst > 0)[None])
    assert 2 in _ensemble_prediction(tmp_path, ["2d", "3d_fullres"], "c", {"2d": 0, "3d_fullres": 0}, without)
