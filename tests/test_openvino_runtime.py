"""`predict --runtime openvino`: the same network computed by OpenVINO gives torch's logits and labels."""

import numpy as np
import pytest
import torch

from autoseg.dataset.image_io import Geometry
from autoseg.errors import AutosegError
from autoseg.inference.openvino_runtime import OpenVINONetwork, OpenVINOUnavailable
from autoseg.inference.predictor import Predictor, PredictorError
from autoseg.inference.settings import ComputeSettings, ModelChoice, PredictionSettingsError
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

