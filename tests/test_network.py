"""The U-Net built from plan lists: shapes in 2D/3D, deep supervision, memory estimate, validation."""

import pytest
import torch
from torch import nn

from autoseg.network import UNetTopology, build_unet, deep_supervision_scales, feature_map_elements
from autoseg.planning.plans import ConfigurationPlan, PlanError, Plans


def _config(features_per_stage, kernel_sizes, strides, patch_size) -> ConfigurationPlan:
    return ConfigurationPlan(name="test", data_identifier="test", spacing=(1.0,) * len(patch_size),
                             median_shape=patch_size, patch_size=patch_size, batch_size=2, batch_dice=False,
                             features_per_stage=features_per_stage, kernel_sizes=kernel_sizes, strides=strides,
                             n_conv_per_stage=2)


PLAN_2D = _config((4, 8, 16), ((3, 3),) * 3, ((1, 1), (2, 2), (2, 2)), (16, 24))
PLAN_3D = _config((4, 8, 16), ((3, 3, 3),) * 3, ((1, 1, 1), (2, 2, 2), (2, 2, 2)), (8, 16, 12))
PLAN_3D_ANISO = _config((4, 8, 16, 16), ((1, 3, 3), (1, 3, 3), (3, 3, 3), (3, 3, 3)),
                        ((1, 1, 1), (1, 2, 2), (2, 2, 2), (1, 2, 2)), (4, 16, 24))


@pytest.mark.parametrize("plan", [PLAN_2D, PLAN_3D, PLAN_3D_ANISO], ids=["2d", "3d", "3d-anisotropic"])
def test_output_shapes_follow_deep_supervision_scales(plan):
    topology = UNetTopology.from_plan(plan, in_channels=2, num_classes=3)
    net = build_unet(topology, deep_supervision=True)
    patch = list(plan.patch_size)
    x = torch.randn(2, 2, *patch)
    with torch.no_grad():
        outputs = net(x)
    scales = deep_supervision_scales(plan.strides)
    assert len(outputs) == len(scales) == len(plan.strides) - 1
    for out, scale in zip(outputs, scales):
        assert list(out.shape) == [2, 3] + [round(p * s) for p, s in zip(patch, scale)]

    net.deep_supervision = False
    with torch.no_grad():
        full = net(x)
    assert isinstance(full, torch.Tensor) and list(full.shape) == [2, 3] + patch
    torch.testing.assert_close(full, outputs[0])


def test_scales_for_isotropic_plan():
    assert deep_supervision_scales([[1, 1, 1], [2, 2, 2], [2, 2, 2]]) == [[1, 1, 1], [0.5, 0.5, 0.5]]


def test_input_not_divisible_by_total_stride_is_refused():
    net = build_unet(UNetTopology.from_plan(PLAN_3D, in_channels=1, num_classes=2))
    with pytest.raises(ValueError, match="multiple of the total stride"):
        net(torch.randn(1, 1, 8, 15, 12))


def test_channels_last_and_bf16_autocast_match_float32():
    net = build_unet(UNetTopology.from_plan(PLAN_3D, in_channels=1, num_classes=2), deep_supervision=False).eval()
    x = torch.randn(1, 1, *PLAN_3D.patch_size)
    with torch.no_grad():
        reference = net(x)
        net_cl = net.to(memory_format=torch.channels_last_3d)
        out_cl = net_cl(x.to(memory_format=torch.channels_last_3d))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out_bf16 = net_cl(x.to(memory_format=torch.channels_last_3d))
    torch.testing.assert_close(out_cl, reference, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(out_bf16).all()
    assert (out_bf16.float() - reference).abs().max() < 0.1 * reference.abs().max()


def _conv_dtypes(net: nn.Module) -> dict[str, torch.dtype]:
    """The output dtype of every convolution in `net`'s next forward pass, by module name."""
    seen = {}
    for name, module in net.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Conv3d)):
            module.register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o.dtype))
    return seen


def test_under_cpu_bf16_a_kernel_longer_than_its_map_computes_in_float32():
    # PLAN_3D on a patch of depth 8: stage 2's second convolution reads a map of depth 2 (its first
    # reads depth 4 and writes 2).
    net = build_unet(UNetTopology.from_plan(PLAN_3D, in_channels=1, num_classes=2), deep_supervision=False)
    dtypes = _conv_dtypes(net)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(torch.randn(1, 1, *PLAN_3D.patch_size))
    assert {n for n, dtype in dtypes.items() if dtype == torch.float32} == {"encoder.stages.2.1.0"}
    assert len(dtypes) > 1 and all(dtypes[n] == torch.bfloat16 for n in dtypes if n != "encoder.stages.2.1.0")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        net(torch.randn(1, 1, 16, 16, 12))  # depth 4 there: every convolution stays in bfloat16
    assert set(dtypes.values()) == {torch.bfloat16}
    net(torch.randn(1, 1, *PLAN_3D.patch_size))  # without autocast nothing changes
    assert set(dtypes.values()) == {torch.float32}


@pytest.fixture
def one_thread():
    """One torch thread, as in each process of `train --gpus N --device cpu` (oneDNN picks other kernels)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_bf16_training_gradients_of_a_depth_2_bottleneck_repeat_exactly(one_thread):
    # On one thread, oneDNN's bf16 weight gradient for a 3x3x3 kernel over depth 2 read memory it had
    # not written (a different, sometimes NaN, gradient on every call) on AVX-512 CPUs; on CPUs
    # where bf16 works it passes either way.
    torch.manual_seed(0)
    net = build_unet(UNetTopology.from_plan(PLAN_3D, in_channels=1, num_classes=3)).to(
        memory_format=torch.channels_last_3d)
    x = torch.randn(1, 1, *PLAN_3D.patch_size).contiguous(memory_format=torch.channels_last_3d)
    gradients = []
    for _ in range(6):
        net.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = sum(out.float().square().mean() for out in net(x))
        loss.backward()
        gradients.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
        _ = [torch.full((n,), float("nan")) for n in (37, 1000, 4099)]  # fill freed memory with NaN
    assert torch.isfinite(gradients[0]).all()
    assert all(torch.equal(g, gradients[0]) for g in gradients[1:])


def test_feature_map_elements_is_linear_in_patch_voxels():
    args = dict(features_per_stage=[8, 16, 32], strides=[[1, 1, 1], [2, 2, 2], [2, 2, 2]], num_classes=3)
    small = feature_map_elements([8, 8, 8], **args)
    assert feature_map_elements([16, 8, 8], **args) == 2 * small
    assert feature_map_elements([16, 16, 16], **args) == 8 * small


@pytest.mark.parametrize("deep_supervision", [False, True])
def test_feature_map_elements_matches_network_activations(deep_supervision):
    """The planner's memory measure is exactly what the network's convolutions write for one sample."""
    topology = UNetTopology.from_plan(PLAN_3D_ANISO, in_channels=1, num_classes=3)
    net = build_unet(topology, deep_supervision=deep_supervision)
    counted = []

    def count(_module, _inputs, output):
        counted.append(output.numel())

    for name, m in net.named_modules():
        is_unused_head = not deep_supervision and name.startswith("decoder.heads.") and name != "decoder.heads.0"
        if isinstance(m, (nn.Conv3d, nn.ConvTranspose3d)) and not is_unused_head:
            m.register_forward_hook(count)
    with torch.no_grad():
        net(torch.randn(1, 1, *PLAN_3D_ANISO.patch_size))
    estimate = feature_map_elements(PLAN_3D_ANISO.patch_size, topology.features_per_stage, topology.strides,
                                    num_classes=3, deep_supervision=deep_supervision)
    assert sum(counted) == estimate


def test_feature_map_elements_refuses_indivisible_patch():
    with pytest.raises(ValueError, match="not divisible"):
        feature_map_elements([8, 9, 8], [4, 8], [[1, 1, 1], [2, 2, 2]], num_classes=2)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(kernel_sizes=[[3, 3, 3]] * 2), "one entry per stage"),
        (dict(strides=[[2, 2, 2], [2, 2, 2], [2, 2, 2]]), "first stage's stride must be all ones"),
        (dict(kernel_sizes=[[3, 3, 3], [4, 3, 3], [3, 3, 3]]), "odd"),
        (dict(kernel_sizes=[[3, 3, 3], [3, 3], [3, 3, 3]]), "must both have 3 entries"),
        (dict(strides=[[1, 1, 1], [0, 2, 2], [2, 2, 2]]), "strides must be positive"),
        (dict(num_classes=0), "num_classes"),  # one output is a one-region model
        (dict(features_per_stage=[4]), "at least 2 stages"),
    ],
)
def test_invalid_topology_names_the_problem(change, message):
    fields = dict(in_channels=1, num_classes=3, features_per_stage=PLAN_3D.features_per_stage,
                  kernel_sizes=PLAN_3D.kernel_sizes, strides=PLAN_3D.strides)
    fields.update(change)
    with pytest.raises(ValueError, match=message):
        UNetTopology(**fields)


def test_plans_json_missing_a_topology_key_is_refused_when_read():
    from test_planning import HIPPOCAMPUS

    from autoseg.planning.planner import plan_experiment

    data = plan_experiment(HIPPOCAMPUS).to_json()
    del data["configurations"]["3d_fullres"]["kernel_sizes"]
    with pytest.raises(PlanError, match="kernel_sizes"):
        Plans.from_json(data)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("chunk_bytes", [1, 2000, "default", None])
def test_low_memory_forward_gives_the_networks_logits(ndim, chunk_bytes):
    """Row chunks of every size (one row per call, a few rows, the whole map, no chunks) reproduce `network(x)`,
    through anisotropic kernels and strides, stride-2 convolutions and the decoder's skips."""
    from autoseg.network.low_memory import CHUNK_BYTES, low_memory_forward

    if ndim == 3:
        kernels, strides, shape = ((1, 3, 3), (3, 3, 3), (3, 3, 3)), ((1, 1, 1), (1, 2, 2), (2, 2, 2)), (6, 16, 12)
    else:
        kernels, strides, shape = ((3, 3), (3, 3), (3, 1)), ((1, 1), (2, 2), (2, 1)), (20, 12)
    topology = UNetTopology(in_channels=2, num_classes=3, features_per_stage=(4, 8, 16), kernel_sizes=kernels,
                            strides=strides)
    torch.manual_seed(0)
    network = build_unet(topology, deep_supervision=True).eval()
    x = torch.randn(2, 2, *shape)
    with torch.no_grad():
        expected = network(x)[0]
    got = low_memory_forward(network, x, CHUNK_BYTES if chunk_bytes == "default" else chunk_bytes)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="multiple of the total stride"):
        low_memory_forward(network, torch.randn(1, 2, *(n + 1 for n in shape)))


def test_low_memory_forward_keeps_norm_statistics_in_float32_under_bfloat16():
    from autoseg.network.low_memory import low_memory_forward

    topology = UNetTopology(in_channels=1, num_classes=2, features_per_stage=(4, 8), kernel_sizes=((3, 3, 3),) * 2,
                            strides=((1, 1, 1), (2, 2, 2)))
    torch.manual_seed(0)
    network = build_unet(topology, deep_supervision=False).eval()
    x = torch.randn(1, 1, 8, 8, 8) * 100 + 1000  # a large offset: bfloat16 statistics would lose it
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = network(x).float()
        got = low_memory_forward(network, x, chunk_bytes=1).float()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=0.05, atol=0.1)


def test_low_memory_forward_takes_the_float32_rule_for_kernels_longer_than_the_map():
    from autoseg.network.low_memory import low_memory_forward

    net = build_unet(UNetTopology.from_plan(PLAN_3D, in_channels=1, num_classes=2), deep_supervision=False).eval()
    dtypes = _conv_dtypes(net)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low_memory_forward(net, torch.randn(1, 1, *PLAN_3D.patch_size), chunk_bytes=None)
    assert dtypes["encoder.stages.2.1.0"] == torch.float32  # depth 2 under a 3x3x3 kernel


def test_low_memory_chunks_take_the_float32_rule_for_in_plane_axes_shorter_than_the_kernel(monkeypatch):
    import autoseg.network.low_memory as low_memory

    net = build_unet(UNetTopology.from_plan(PLAN_3D, in_channels=1, num_classes=2), deep_supervision=False).eval()
    seen, conv3d = [], low_memory.F.conv3d

    def recording_conv3d(x, weight, *args, **kwargs):
        seen.append((x.shape[-1], x.dtype, torch.is_autocast_enabled("cpu")))
        return conv3d(x, weight, *args, **kwargs)

    monkeypatch.setattr(low_memory.F, "conv3d", recording_conv3d)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low_memory.low_memory_forward(net, torch.randn(1, 1, 16, 16, 8), chunk_bytes=1)  # x: 8, 4, then 2
    narrow = [(dtype, autocast) for width, dtype, autocast in seen if width == 2]
    assert narrow and all(n == (torch.float32, False) for n in narrow)
    assert any(autocast for width, _, autocast in seen if width > 2)


def test_prediction_takes_the_low_memory_forward_for_large_windows_only():
    import functools

    from autoseg.network.low_memory import CHUNK_BYTES, LARGE_MAP_BYTES, inference_forward, low_memory_forward

    topology = UNetTopology(in_channels=1, num_classes=2, features_per_stage=(32, 64),
                            kernel_sizes=((3, 3, 3),) * 2, strides=((1, 1, 1), (2, 2, 2)))
    network = build_unet(topology, deep_supervision=False)
    assert inference_forward(network, (40, 56, 40)) is network  # Hippocampus: 11 MiB maps, the plain forward
    large = inference_forward(network, (112, 160, 128))  # a CT window: 280 MiB maps
    assert isinstance(large, functools.partial) and large.func is low_memory_forward
    assert large.keywords["chunk_bytes"] == CHUNK_BYTES
    assert inference_forward(network, (112, 160, 128), "cuda").keywords["chunk_bytes"] is None
    assert 32 * 112 * 160 * 128 * 4 > LARGE_MAP_BYTES > 32 * 40 * 56 * 40 * 4


# ---------------------------------------------------------------------------------------------
# The residual encoder U-Net of the ResEnc presets against dynamic-network-architectures' own


def _resenc_topology(ndim: int) -> UNetTopology:
    if ndim == 3:
        return UNetTopology(in_channels=2, num_classes=3, features_per_stage=(8, 16, 32, 32),
                            kernel_sizes=((1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3)),
                            strides=((1, 1, 1), (1, 2, 2), (2, 2, 2), (2, 2, 2)),
                            residual_blocks=(1, 3, 4, 2), n_conv_per_stage_decoder=1)
    return UNetTopology(in_channels=1, num_classes=2, features_per_stage=(8, 16, 32, 64, 64),
                        kernel_sizes=((3, 3),) * 5, strides=((1, 1),) + ((2, 2),) * 4,
                        residual_blocks=(1, 3, 4, 6, 6), n_conv_per_stage_decoder=1)


def _reference_resenc(t: UNetTopology):
    """dynamic-network-architectures' ResidualEncoderUNet with the arguments nnunetv2's ResEnc planners write."""
    dna_unet = pytest.importorskip("dynamic_network_architectures.architectures.unet")
    conv, norm = (nn.Conv3d, nn.InstanceNorm3d) if t.ndim == 3 else (nn.Conv2d, nn.InstanceNorm2d)
    n = len(t.features_per_stage)
    network = dna_unet.ResidualEncoderUNet(
        t.in_channels, n, list(t.features_per_stage), conv, [list(k) for k in t.kernel_sizes],
        [list(s) for s in t.strides], list(t.residual_blocks), t.num_classes, [t.decoder_convs] * (n - 1),
        conv_bias=True, norm_op=norm, norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True}, deep_supervision=True)
    network.apply(network.initialize)
    return network


def _their_weights_as_ours(state: dict, stages: int, pooled_first_blocks: set[int]) -> dict:
    """Rename the reference's weights to autoseg's; drop its conv biases, which InstanceNorm cancels."""
    import re

    ours = {}
    for key, value in state.items():
        if "all_modules" in key or key.startswith("decoder.encoder."):  # the same tensors again, other names
            continue
        new = key.replace("convs.0.conv.", "0.").replace("convs.0.norm.", "1.")
        new = re.sub(r"^encoder\.stem\.", "encoder.stem.", new)
        new = re.sub(r"\.blocks\.(\d+)\.", r".\1.", new)
        new = re.sub(r"\.(conv1|conv2)\.conv\.", r".\1.0.", new)
        new = re.sub(r"\.(conv1|conv2)\.norm\.", r".\1.1.", new)
        match = re.match(r"encoder\.stages\.(\d+)\.0\.skip\.(\d)\.(conv|norm)\.(.*)", new)
        if match:
            stage, _, part, name = match.groups()
            offset = 1 if int(stage) in pooled_first_blocks else 0
            new = f"encoder.stages.{stage}.0.skip.{offset + (part == 'norm')}.{name}"
        match = re.match(r"decoder\.(transpconvs|seg_layers)\.(\d+)\.(.*)", new)
        if match:
            kind, index, name = match.groups()
            new = f"decoder.{'upsample' if kind == 'transpconvs' else 'heads'}.{stages - 2 - int(index)}.{name}"
        match = re.match(r"decoder\.stages\.(\d+)\.convs\.(\d+)\.(conv|norm)\.(.*)", key)
        if match:
            index, conv, part, name = match.groups()
            new = f"decoder.stages.{stages - 2 - int(index)}.{conv}.{0 if part == 'conv' else 1}.{name}"
        is_conv_bias = new.endswith(".bias") and re.search(r"(stem\.0|conv[12]\.0|stages\.\d+\.\d+\.0)\.bias$", new)
        if is_conv_bias and not new.startswith("decoder.upsample") and not new.startswith("decoder.heads"):
            continue
        ours[new] = value
    return ours


@pytest.mark.parametrize("ndim", [2, 3])
def test_residual_encoder_unet_computes_what_dynamic_network_architectures_computes(ndim):
    torch.manual_seed(0)
    t = _resenc_topology(ndim)
    reference = _reference_resenc(t)
    with torch.no_grad():  # every weight random, the norms before each sum too (0 at initialization)
        for name, p in reference.named_parameters():
            p.copy_(torch.randn_like(p) * (0.1 if name.endswith("bias") else 1.0))
    ours = build_unet(t, deep_supervision=True)
    pooled = {s for s, stride in enumerate(t.strides) if any(v != 1 for v in stride)}
    missing, unexpected = ours.load_state_dict(
        _their_weights_as_ours(reference.state_dict(), len(t.features_per_stage), pooled), strict=False)
    assert not missing and not unexpected
    x = torch.randn(2, t.in_channels, *([8, 32, 32] if ndim == 3 else [48, 32]))
    reference.eval(), ours.eval()
    with torch.no_grad():
        theirs_out, ours_out = reference(x), ours(x)
    assert len(theirs_out) == len(ours_out) == len(t.features_per_stage) - 1
    for a, b in zip(theirs_out, ours_out):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4 * float(a.abs().max()))


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("deep_supervision", [False, True])
def test_residual_feature_map_elements_is_nnunets_compute_conv_feature_map_size(ndim, deep_supervision):
    t = _resenc_topology(ndim)
    reference = _reference_resenc(t)
    reference.decoder.deep_supervision = deep_supervision
    patch = [16, 64, 48] if ndim == 3 else [96, 64]
    ours = feature_map_elements(patch, t.features_per_stage, t.strides, t.num_classes,
                                deep_supervision=deep_supervision, residual_blocks=t.residual_blocks,
                                n_conv_per_stage_decoder=1)
    assert ours == int(reference.compute_conv_feature_map_size(patch))


def test_residual_blocks_start_as_their_skip_path():
    """nnU-Net's initialization: the norm before each block's sum starts at 0, so a block adds nothing at first."""
    network = build_unet(_resenc_topology(3))
    blocks = [m for m in network.modules() if type(m).__name__ == "BasicBlock"]
    assert len(blocks) == 1 + 3 + 4 + 2
    assert all(b.conv2[1].weight.abs().sum() == 0 and b.conv2[1].bias.abs().sum() == 0 for b in blocks)


@pytest.mark.parametrize("chunk_bytes", [2000, None])
def test_low_memory_forward_of_a_residual_encoder_unet_gives_its_logits(chunk_bytes):
    from autoseg.network.low_memory import low_memory_forward

    torch.manual_seed(0)
    network = build_unet(_resenc_topology(3), deep_supervision=False).eval()
    for p in network.parameters():  # the norms before each sum random too, so the blocks do something
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(1, 2, 8, 32, 32)
    with torch.no_grad():
        expected = network(x)
    torch.testing.assert_close(low_memory_forward(network, x, chunk_bytes), expected, rtol=1e-4, atol=1e-4)
