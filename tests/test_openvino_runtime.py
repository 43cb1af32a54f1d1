"""`predict --runtime openvino`: the same network computed by OpenVINO gives torch's logits and labels."""

import json
import logging

import numpy as np
import pytest
import torch

from autoseg import workspace
from autoseg.dataset.image_io import Geometry
from autoseg.errors import AutosegError
from autoseg.inference import openvino_runtime
from autoseg.inference.openvino_runtime import OpenVINONetwork, OpenVINOUnavailable
from autoseg.inference.predictor import Predictor, PredictorError
from autoseg.inference.settings import ComputeSettings, ModelChoice, PredictionSettingsError
from autoseg.model_files import file_sha256
from autoseg.network.unet import UNetTopology, build_unet

pytest.importorskip("openvino")

from test_predictor import IDENTITY, _volume, _workspace  # noqa: E402


@pytest.mark.parametrize("patch", [(8, 16, 16), (16, 24)])
def test_openvino_logits_equal_torch_float32_for_a_batch_of_windows(patch):
    ndim = len(patch)
    topology = UNetTopology(in_channels=2, num_classes=3, features_per_stage=(4, 8, 16),
                            kernel_sizes=((3,) * ndim,) * 3, strides=((1,) * ndim, (2,) * ndim, (2,) * ndim))
    torch.manual_seed(0)
    network = build_unet(topology, deep_supervision=False).eval()
    windows = torch.randn(3, 2, *patch)
    with torch.inference_mode():
        expected = network(windows)
    got = OpenVINONetwork(network, 2, patch, threads=1)(windows)
    assert got.shape == expected.shape and got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected.numpy(), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="compiled for windows"):
        OpenVINONetwork(network, 2, patch, threads=1)(torch.randn(1, 2, *(p * 2 for p in patch)))


@pytest.mark.parametrize("configuration", ["3d_fullres", "2d"])
def test_predictor_on_openvino_gives_the_labels_of_torch(tmp_path, configuration):
    _workspace(tmp_path)
    shape = (8, 20, 20)
    image = _volume(shape, ((0, 8), (2, 18), (3, 17)), seed=5, channels=1)
    geometry = Geometry((3.0, 0.8, 0.8), (0.0, 0.0, 0.0), IDENTITY, shape)
    reference = Predictor(tmp_path, ModelChoice((configuration,)),
                          compute=ComputeSettings("cpu", mixed_precision=False))
    openvino = Predictor(tmp_path, ModelChoice((configuration,)),
                         compute=ComputeSettings("cpu", mixed_precision=False, runtime="openvino"))
    assert openvino.settings()["runtime"] == "openvino" and not openvino.mixed_precision
    p_torch, p_openvino = reference.predict_case(image, geometry), openvino.predict_case(image, geometry)
    np.testing.assert_allclose(p_openvino, p_torch, atol=1e-4)
    assert (p_openvino.argmax(0) == p_torch.argmax(0)).all()


def test_openvino_runtime_is_refused_off_the_cpu_and_explains_a_missing_install(tmp_path, monkeypatch, hide_package):
    _workspace(tmp_path, folds=(0,))
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
        with pytest.raises(PredictorError, match="runs on the CPU"):
            Predictor(tmp_path, ModelChoice(("2d",)), compute=ComputeSettings("cuda", runtime="openvino"))
    with pytest.raises(PredictionSettingsError, match="runtime must be one of"):
        Predictor(tmp_path, ModelChoice(("2d",)), compute=ComputeSettings("cpu", runtime="tensorrt"))
    hide_package("openvino")
    with pytest.raises(PredictorError, match=r"pip install 'autoseg\[openvino\]'"):
        Predictor(tmp_path, ModelChoice(("2d",)), compute=ComputeSettings("cpu", runtime="openvino"))
    assert issubclass(OpenVINOUnavailable, AutosegError)



def _openvino_predictor(root):
    return Predictor(root, ModelChoice(("3d_fullres",), folds=("0",)),
                     compute=ComputeSettings("cpu", mixed_precision=False, runtime="openvino"))


def test_a_folds_conversion_is_kept_and_reused_only_for_the_same_checkpoint(tmp_path, monkeypatch):
    """Converting traces the network (seconds); the next run reads the kept model, with the same probabilities,
    unless the checkpoint changed (trained again): then it converts again and the stale conversion goes."""
    _workspace(tmp_path, folds=(0,))
    shape = (8, 20, 20)
    image = _volume(shape, ((0, 8), (2, 18), (3, 17)), seed=5, channels=1)
    geometry = Geometry((3.0, 0.8, 0.8), (0.0, 0.0, 0.0), IDENTITY, shape)
    fold_dir = workspace.fold_dir(tmp_path, "3d_fullres", "0")
    checkpoint = fold_dir / "checkpoint_final.pt"

    def kept():
        folder = fold_dir / openvino_runtime.CONVERTED_DIR
        return [json.loads(p.read_text()) for p in folder.glob("*/conversion.json")]

    first = _openvino_predictor(tmp_path).predict_case(image, geometry)
    (record,) = kept()
    assert record["checkpoint_sha256"] == file_sha256(checkpoint) and record["topology"]["in_channels"] == 1

    calls = []
    real_convert = openvino_runtime.convert_network
    monkeypatch.setattr(openvino_runtime, "convert_network", lambda *a: calls.append(a) or real_convert(*a))
    second = _openvino_predictor(tmp_path).predict_case(image, geometry)
    assert calls == []  # read from disk, not converted
    np.testing.assert_array_equal(second, first)  # float32 weights kept exactly (no fp16 compression)

    state = torch.load(checkpoint, weights_only=True)  # the fold trained again: other weights
    state["network_state"] = {k: v + 0.05 if v.is_floating_point() else v for k, v in state["network_state"].items()}
    torch.save(state, checkpoint)
    third = _openvino_predictor(tmp_path).predict_case(image, geometry)
    assert len(calls) == 1 and not np.allclose(third, first)
    assert [r["checkpoint_sha256"] for r in kept()] == [file_sha256(checkpoint)]  # the stale one removed


def test_a_kept_conversion_is_not_used_for_other_network_code_or_a_read_only_model(tmp_path, monkeypatch):
    _workspace(tmp_path, folds=(0,))
    image = _volume((8, 20, 20), ((0, 8), (2, 18), (3, 17)), seed=5, channels=1)
    geometry = Geometry((3.0, 0.8, 0.8), (0.0, 0.0, 0.0), IDENTITY, (8, 20, 20))
    _openvino_predictor(tmp_path).predict_case(image, geometry)
    calls = []
    real_convert = openvino_runtime.convert_network
    monkeypatch.setattr(openvino_runtime, "convert_network", lambda *a: calls.append(a) or real_convert(*a))
    monkeypatch.setattr(openvino_runtime, "_network_code_sha256", lambda: "0" * 64)  # autoseg's network changed
    _openvino_predictor(tmp_path).predict_case(image, geometry)
    assert len(calls) == 1
    folder = workspace.fold_dir(tmp_path, "3d_fullres", "0") / openvino_runtime.CONVERTED_DIR
    before = sorted(p.name for p in folder.iterdir())
    Predictor(tmp_path, ModelChoice(("3d_fullres",), folds=("0",), read_only=True),
              compute=ComputeSettings("cpu", mixed_precision=False, runtime="openvino"))
    monkeypatch.setattr(openvino_runtime, "_network_code_sha256", lambda: "1" * 64)
    Predictor(tmp_path, ModelChoice(("3d_fullres",), folds=("0",), read_only=True),
              compute=ComputeSettings("cpu", mixed_precision=False, runtime="openvino"))
    assert len(calls) == 3 and sorted(p.name for p in folder.iterdir()) == before  # converted, nothing written


def test_a_conversion_that_cannot_be_kept_still_predicts(tmp_path, monkeypatch, caplog):
    """Read-only models (or any write failure) cost the next run the conversion, never this run its result."""
    _workspace(tmp_path, folds=(0,))
    shape = (8, 20, 20)
    image = _volume(shape, ((0, 8), (2, 18), (3, 17)), seed=5, channels=1)
    geometry = Geometry((3.0, 0.8, 0.8), (0.0, 0.0, 0.0), IDENTITY, shape)
    expected = Predictor(tmp_path, ModelChoice(("3d_fullres",), folds=("0",)),
                         compute=ComputeSettings("cpu", mixed_precision=False)).predict_case(image, geometry)

    def read_only(folder):
        raise PermissionError(13, "Permission denied", str(folder))

    monkeypatch.setattr(openvino_runtime, "atomic_dir", read_only)
    with caplog.at_level(logging.INFO, logger="autoseg.inference.openvino_runtime"):
        got = _openvino_predictor(tmp_path).predict_case(image, geometry)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert "not kept for the next run" in caplog.text
    assert not list((workspace.fold_dir(tmp_path, "3d_fullres", "0")).glob("openvino_float32/*/model.xml"))


def test_auto_takes_openvino_for_float32_on_the_cpu_but_torch_for_low_memory_windows(tmp_path, monkeypatch, caplog):
    """OpenVINO runs a window whole; where torch would use its low-memory forward, auto stays with torch."""
    from autoseg.network import low_memory

    _workspace(tmp_path, folds=(0,))
    auto = ComputeSettings("cpu", mixed_precision=False, runtime="auto")
    assert Predictor(tmp_path, ModelChoice(("3d_fullres",), folds=("0",)), compute=auto).runtime == "openvino"
    monkeypatch.setattr(low_memory, "LARGE_MAP_BYTES", 1)  # every window counts as large
    with caplog.at_level(logging.INFO, logger="autoseg.inference.predictor"):
        predictor = Predictor(tmp_path, ModelChoice(("3d_fullres",), folds=("0",)), compute=auto)
    assert predictor.runtime == "torch" and "low-memory forward" in caplog.text
    assert not isinstance(predictor.folds[0].network, OpenVINONetwork)
