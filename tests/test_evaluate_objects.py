"""`autoseg evaluate` adds the object metrics that apply: membrane errors for a label named membrane,
instance metrics where reference instance maps exist."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from autoseg.cli import main
from autoseg.evaluation import EvaluationError, evaluate_folders


def _png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def membrane_pair():
    """A 40 x 40 slice cut into four cells by a cross of membrane; the prediction opens a gap in one arm."""
    ref = np.zeros((40, 40), np.uint8)
    ref[19:21, :] = 1
    ref[:, 19:21] = 1
    leaky = ref.copy()
    leaky[19:21, 5:8] = 0  # cells above and below the left arm now meet
    return ref, leaky


def test_a_label_named_membrane_gets_the_isbi_errors_and_a_leak_shows_in_rand_and_warping(tmp_path):
    ref, leaky = membrane_pair()
    _png(tmp_path / "ref" / "em_0.png", ref)
    _png(tmp_path / "good" / "em_0.png", ref)
    _png(tmp_path / "leak" / "em_0.png", leaky)
    names = {1: "membrane"}
    good = evaluate_folders(tmp_path / "good", tmp_path / "ref", label_names=names)
    leak = evaluate_folders(tmp_path / "leak", tmp_path / "ref", label_names=names)
    assert good["object_metrics"]["mean"] == {"rand_error": 0.0, "warping_error": 0.0, "pixel_error": 0.0}
    assert "label 1 'membrane'" in good["object_metrics"]["reasons"][0]
    assert leak["object_metrics"]["mean"]["rand_error"] > 0.1
    # the gap is 2 x 3 pixels; warping closes one row of it for free, the row that still merges the cells stays
    assert leak["object_metrics"]["mean"]["warping_error"] == pytest.approx(3 / 1600)
    assert leak["mean"]["1"]["dice"] > 0.9  # the per-pixel score barely notices
    saved = json.loads((tmp_path / "leak" / "summary.json").read_text())
    assert set(saved["object_metrics"]["cases"]["em_0"]) == {"rand_error", "warping_error", "pixel_error"}


def test_no_label_named_membrane_means_no_membrane_metrics_unless_asked(tmp_path, capsys):
    ref, _ = membrane_pair()
    _png(tmp_path / "ref" / "em_0.png", ref)
    _png(tmp_path / "pred" / "em_0.png", ref)
    assert "object_metrics" not in evaluate_folders(tmp_path / "pred", tmp_path / "ref")
    code = main(["evaluate", str(tmp_path / "pred"), str(tmp_path / "ref"), "--object-metrics", "membrane",
                 "--workers", "1"])
    err = capsys.readouterr().err
    assert code != 0 and "named membrane" in err and "Traceback" not in err


def nuclei():
    inst = np.zeros((30, 40), np.uint16)
    inst[5:15, 5:15] = 1
    inst[5:15, 15:25] = 2  # touches 1
    inst[20:27, 30:37] = 3
    return inst


def test_instance_maps_beside_the_references_score_objects_and_count_the_merge_of_touching_nuclei(tmp_path, capsys):
    inst = nuclei()
    _png(tmp_path / "ds" / "labelsTr" / "n_0.png", (inst > 0).astype(np.uint8))
    _png(tmp_path / "ds" / "instancesTr" / "n_0.png", inst)
    _png(tmp_path / "semantic" / "n_0.png", (inst > 0).astype(np.uint8))  # perfect pixels, merged objects
    semantic = evaluate_folders(tmp_path / "semantic", tmp_path / "ds" / "labelsTr")
    objects = semantic["object_metrics"]
    assert "connected components" in objects["reasons"][0]
    assert objects["mean"]["merges"] == 1 and objects["mean"]["n_pred"] == 2 and objects["mean"]["n_ref"] == 3
    assert objects["mean"]["f1_at_0.5"] == pytest.approx(2 * 1 / (2 + 3))
    assert semantic["mean"]["1"]["dice"] == 1.0

    # autoseg's instance map beside the label map is used, and is not taken for a case of its own
    _png(tmp_path / "instances" / "n_0.png", (inst > 0).astype(np.uint8))
    _png(tmp_path / "instances" / "n_0_instances.png", inst)
    code = main(["evaluate", str(tmp_path / "instances"), str(tmp_path / "ds" / "labelsTr"), "--workers", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "mAP@0.5:0.95 1.0000" in out and "0 merge(s)" in out and "<case>_instances" in out
    saved = json.loads((tmp_path / "instances" / "summary.json").read_text())
    assert saved["num_cases"] == 1
    assert {"mean_ap", "f1_at_0.5", "aji"} <= set(saved["object_metrics"]["mean"])


def test_asking_for_instance_metrics_without_reference_maps_is_a_clear_error(tmp_path):
    inst = nuclei()
    _png(tmp_path / "ref" / "n_0.png", (inst > 0).astype(np.uint8))
    _png(tmp_path / "pred" / "n_0.png", (inst > 0).astype(np.uint8))
    with pytest.raises(EvaluationError, match="--instances DIR"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref", object_metrics="instances")
    with pytest.raises(EvaluationError, match="not found"):
        evaluate_folders(tmp_path / "pred", tmp_path / "ref", instances_dir=tmp_path / "nowhere")
    assert "object_metrics" not in evaluate_folders(tmp_path / "pred", tmp_path / "ref", object_metrics="none")


def test_saved_probabilities_add_the_challenges_maximal_errors(tmp_path):
    ref, leaky = membrane_pair()
    _png(tmp_path / "ref" / "em_0.png", ref)
    _png(tmp_path / "pred" / "em_0.png", leaky)
    membrane = np.where(ref == 1, 0.9, 0.05)
    membrane[leaky != ref] = 0.3  # the gap: below 0.5, so the label map leaks, but a lower threshold closes it
    probabilities = np.stack([1 - membrane, membrane])[:, None].astype(np.float16)  # (K, Z=1, Y, X)
    np.savez(tmp_path / "pred" / "em_0.npz", probabilities=probabilities)
    summary = evaluate_folders(tmp_path / "pred", tmp_path / "ref", label_names={1: "membrane"})
    mean = summary["object_metrics"]["mean"]
    assert mean["rand_error"] > 0.1 and mean["rand_error_maximal"] == 0.0 and mean["pixel_error_maximal"] == 0.0
