"""torch.compile for training: nnU-Net's default per device, the same outputs compiled and not (on the CPU,
through the function CUDA uses), and a clean fallback when compiling fails."""

from __future__ import annotations

import platform

import pytest
import torch

from autoseg.network.unet import UNetTopology, build_unet
from autoseg.training.compilation import CompiledWithFallback, compile_by_default, training_forward


def tiny_unet() -> torch.nn.Module:
    torch.manual_seed(0)
    topology = UNetTopology(in_channels=1, num_classes=3, features_per_stage=(4, 8),
                            kernel_sizes=((3, 3), (3, 3)), strides=((1, 1), (2, 2)))
    return build_unet(topology, deep_supervision=True)


def test_compiled_by_default_on_cuda_only_as_nnunet():
    assert compile_by_default(torch.device("cpu")) is False
    assert compile_by_default(torch.device("cuda")) is (platform.system() != "Windows")
    forward, note = training_forward(tiny_unet(), torch.device("cpu"), None)
    assert isinstance(forward, torch.nn.Module) and note == "torch.compile: off (the default on cpu, as nnU-Net)"
    _, note = training_forward(tiny_unet(), torch.device("cpu"), True)
    assert note.startswith("torch.compile: on (--compile")


def test_the_compiled_network_gives_the_same_outputs_and_gradients_on_the_cpu():
    eager = tiny_unet()
    compiled_net = tiny_unet()  # same seed: same weights
    forward, _ = training_forward(compiled_net, torch.device("cpu"), True)
    x = torch.randn(2, 1, 16, 16)
    out_eager, out_compiled = eager(x), forward(x)
    assert forward.failed is None, forward.failed
    for a, b in zip(out_eager, out_compiled):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    out_eager[0].sum().backward()
    out_compiled[0].sum().backward()
    for (name, p), q in zip(eager.named_parameters(), compiled_net.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-4, msg=name)
    # the checkpoint is the network's own state dict (no "_orig_mod." prefix)
    assert set(compiled_net.state_dict()) == set(eager.state_dict())


def test_a_failing_compile_falls_back_to_the_eager_network_and_says_so_once(monkeypatch):
    def broken(*_, **__):
        raise RuntimeError("no C++ compiler found\nmore detail")

    monkeypatch.setattr(torch, "compile", lambda module: broken)
    said = []
    network = tiny_unet()
    forward = CompiledWithFallback(network, said.append)
    x = torch.randn(1, 1, 16, 16)
    expected = network(x)
    for _ in range(2):
        torch.testing.assert_close(forward(x)[0], expected[0])
    assert said == ["torch.compile failed (RuntimeError: no C++ compiler found); training continues with the "
                    "uncompiled network"]


@pytest.mark.parametrize("flag, expected", [("--compile", "torch.compile: on"), ("--no-compile", "torch.compile: off")])
def test_train_takes_the_compile_flag_and_logs_it(flag, expected, tmp_path):
    from test_instances import write_instance_dataset

    from autoseg import workspace
    from autoseg.cli import main

    root = write_instance_dataset(tmp_path / "ds")
    work = tmp_path / "work"
    assert main(["plan", str(root), "-o", str(work), "--workers", "1", "--instances", "off"]) == 0
    import json
    plans = json.loads(workspace.plans_json(work).read_text())
    plans["configurations"]["2d"].update(patch_size=[16, 16], batch_size=2, features_per_stage=[4, 8],
                                         kernel_sizes=[[3, 3]] * 2, strides=[[1, 1], [2, 2]])
    workspace.plans_json(work).write_text(json.dumps(plans))
    assert main(["train", str(work), "--fold", "all", "--epochs", "1", "--iters-per-epoch", "2", "--workers", "0",
                 "--fp32", flag]) == 0
    log = (workspace.fold_dir(work, "2d", "all") / "training_log.txt").read_text()
    assert expected in log and "compile failed" not in log
