import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from autoseg.inference import sliding_window
from autoseg.inference.sliding_window import (
    SlidingWindow,
    gaussian_importance_map,
    sliding_window_predict,
    window_starts,
)


def _net(conv: type[nn.Module], in_ch: int, classes: int, kernel: int) -> nn.Module:
    torch.manual_seed(0)
    return conv(in_ch, classes, kernel, padding=kernel // 2).eval()


def _forward(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net(x[None])[0]


def test_image_of_patch_size_equals_one_forward_pass():
    net = _net(nn.Conv3d, 2, 3, kernel=3)
    image = torch.randn(2, 8, 12, 10)
    out = sliding_window_predict(net, image, SlidingWindow((8, 12, 10), num_classes=3, accumulator_dtype=torch.float32))
    assert out.dtype == torch.float32 and out.device.type == "cpu"
    torch.testing.assert_close(out, _forward(net, image), rtol=1e-5, atol=1e-5)
    assert not out.is_inference()  # callers may modify the result in place


def test_mirroring_a_flip_equivariant_network_changes_nothing():
    net = _net(nn.Conv3d, 2, 3, kernel=1)
    image = torch.randn(2, 8, 12, 10)
    out = sliding_window_predict(net, image, SlidingWindow((8, 12, 10), num_classes=3, mirror_axes=(0, 1, 2),
                                                          accumulator_dtype=torch.float32))
    torch.testing.assert_close(out, _forward(net, image), rtol=1e-5, atol=1e-5)


def test_mirroring_runs_every_flip_combination_in_full_batches():
    calls = []

    def net(x):
        calls.append(x.shape[0])
        return torch.zeros(x.shape[0], 2, *x.shape[2:])

    sliding_window_predict(net, torch.zeros(1, 8, 24, 8),
                           SlidingWindow((8, 8, 8), 2, mirror_axes=(1, 2), tiles_per_batch=3))
    tiles = 5  # starts 0, 4, 8, 12, 16 along Y
    assert len(calls) == math.ceil(tiles / 3) * 4 and max(calls) == 3


@pytest.mark.parametrize("patch", [(8, 8, 8), (7, 10), (64, 5, 6)])
def test_gaussian_is_positive_with_max_one_at_nnunets_centre(patch):
    g = gaussian_importance_map(patch, sigma_scale=0.02)  # narrow enough to underflow far from the centre
    assert g.shape == patch
    assert (g > 0).all()
    centre = tuple(p // 2 for p in patch)  # nnU-Net v2's: voxel size // 2, half a voxel past an even patch's middle
    assert g.max().item() == 1.0 and g[centre].item() == 1.0
    for axis, size in enumerate(patch):  # symmetric about the centre voxel along every axis
        c = size // 2
        for d in range(1, min(c, size - 1 - c) + 1):
            torch.testing.assert_close(g.select(axis, c - d), g.select(axis, c + d), rtol=0, atol=0)


@pytest.mark.parametrize("patch", [(40, 56, 40), (7, 10), (5, 64, 6)])
def test_gaussian_is_nnunets_filtered_impulse(patch):
    """nnU-Net v2 filters a one-voxel impulse at size // 2 with sigma = size / 8 (scipy, mode constant) and
    scales it to a maximum of 1."""
    ndimage = pytest.importorskip("scipy.ndimage")
    impulse = np.zeros(patch)
    impulse[tuple(p // 2 for p in patch)] = 1
    expected = ndimage.gaussian_filter(impulse, [p / 8 for p in patch], 0, mode="constant", cval=0)
    expected /= expected.max()
    expected[expected == 0] = expected[expected > 0].min()
    np.testing.assert_allclose(gaussian_importance_map(patch).numpy(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("image, patch, step", [
    (100, 32, 0.5), (33, 32, 0.5), (64, 32, 0.5), (50, 15, 0.5), (97, 20, 0.33), (40, 16, 1.0), (17, 3, 0.5),
])
def test_window_starts_cover_the_image(image, patch, step):
    (starts,) = window_starts([image], [patch], step)
    assert starts[0] == 0 and starts[-1] == image - patch
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert all(0 < gap <= math.ceil(step * patch) for gap in gaps)
    covered = set().union(*(range(s, s + patch) for s in starts))
    assert covered == set(range(image))
    if float(step * patch).is_integer():
        assert len(starts) == math.ceil((image - patch) / (patch * step)) + 1


def test_window_starts_are_nnunets_on_every_image_and_patch_pair():
    """nnU-Net v2: n = ceil((image - patch) / (patch * step)) + 1 starts, the i-th at
    round(i * (image - patch) / (n - 1)) with numpy's half-to-even rounding."""
    for patch in range(1, 65):
        for image in range(patch, patch + 70):
            for step in (0.5, 0.33, 1.0):
                span = image - patch
                n = int(np.ceil(span / (patch * step))) + 1
                expected = [0] if n == 1 else [int(np.round(span / (n - 1) * i)) for i in range(n)]
                assert window_starts([image], [patch], step) == [expected], (image, patch, step)


def test_window_starts_single_window_and_errors():
    assert window_starts([16, 20, 8], [16, 20, 8]) == [[0], [0], [0]]
    with pytest.raises(ValueError, match="smaller than patch_size"):
        window_starts([10], [16])


def test_per_voxel_network_is_reproduced_exactly_on_a_large_image():
    net = _net(nn.Conv3d, 2, 4, kernel=1)
    image = torch.randn(2, 13, 29, 22)
    out = sliding_window_predict(net, image, SlidingWindow((8, 12, 10), 4, step_size=0.5, mirror_axes=(0, 2),
                                                          tiles_per_batch=3, accumulator_dtype=torch.float32))
    assert out.shape == (4, 13, 29, 22)
    torch.testing.assert_close(out, _forward(net, image), rtol=1e-5, atol=1e-5)


def test_image_smaller_than_patch_keeps_its_shape():
    net = _net(nn.Conv3d, 1, 2, kernel=1)
    image = torch.randn(1, 5, 20, 9)
    out = sliding_window_predict(net, image, SlidingWindow((8, 16, 16), 2, accumulator_dtype=torch.float32))
    assert out.shape == (2, 5, 20, 9)
    torch.testing.assert_close(out, _forward(net, image), rtol=1e-5, atol=1e-5)


def test_2d_mode_predicts_every_slice():
    net = _net(nn.Conv2d, 1, 3, kernel=1)
    image = torch.randn(1, 5, 20, 24)
    out = sliding_window_predict(net, image, SlidingWindow((16, 16), 3, mirror_axes=(0, 1), tiles_per_batch=7,
                                                          accumulator_dtype=torch.float32))
    assert out.shape == (3, 5, 20, 24)
    expected = torch.stack([_forward(net, image[:, z]) for z in range(5)], dim=1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_float16_accumulation_is_float32_to_float16_rounding_even_where_border_weights_are_tiny():
    # A per-voxel network makes every window predict the same value at a voxel, so the weighted mean is
    # exactly that value whatever the weights; at the image's corners only a window's far border covers,
    # with weights near 1e-11 that would vanish if weight x logit were summed in float16.
    net = _net(nn.Conv3d, 2, 4, kernel=1)
    image = torch.randn(2, 21, 30, 17) * 10
    kwargs = dict(patch_size=(8, 12, 10), num_classes=4, step_size=0.5, tiles_per_batch=2)
    half = sliding_window_predict(net, image, SlidingWindow(**kwargs))
    exact = _forward(net, image)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, exact, rtol=1e-3, atol=1e-3)  # float16: 11 bits of mantissa
    assert (half - exact).abs().max() > 0  # it is rounded: the band really is float16
    torch.testing.assert_close(half[:, 0, 0, 0], exact[:, 0, 0, 0], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(half[:, -1, -1, -1], exact[:, -1, -1, -1], rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="accumulator_dtype"):
        SlidingWindow(accumulator_dtype=torch.bfloat16, **kwargs)


def _naive_weighted_mean(net, image, patch, num_classes, step):
    """Every window's logits times the Gaussian summed over the whole volume, divided by the summed Gaussian."""
    spatial = image.shape[1:]
    starts = window_starts(spatial[-len(patch):], patch, step)
    g = gaussian_importance_map(patch).double()
    total = torch.zeros((num_classes, *spatial), dtype=torch.float64)
    weight = torch.zeros(spatial, dtype=torch.float64)
    z_windows = [[z] for z in range(spatial[0])] if len(patch) == 2 else [None]
    for z in z_windows:
        for corner in itertools.product(*starts):
            box = tuple(slice(c, c + p) for c, p in zip(corner, patch))
            box = ((slice(z[0], z[0] + 1),) if z else ()) + box
            window = image[(slice(None), *box)]
            with torch.no_grad():
                out = net(window.squeeze(1)[None] if z else window[None])[0].double()
            gw = g[None] if z else g
            total[(slice(None), *box)] += (out[:, None] if z else out) * gw
            weight[box] += gw
    return (total / weight).float()


@pytest.mark.parametrize("patch, shape", [((8, 12, 10), (2, 21, 30, 17)), ((12, 10), (2, 3, 30, 17))])
def test_windows_that_disagree_are_averaged_with_gaussian_weights(patch, shape):
    """Each window predicts its own mean intensity (so overlapping windows disagree); the running mean over
    windows with weights from per-axis sums equals the plain weighted sum over the volume."""
    def net(x):
        return x.mean(dim=tuple(range(1, x.dim())), keepdim=True).expand(x.shape[0], 3, *x.shape[2:]) * torch.tensor(
            [1.0, -2.0, 0.5]).view(1, 3, *([1] * (x.dim() - 2)))

    torch.manual_seed(0)
    image = torch.randn(*shape)
    expected = _naive_weighted_mean(net, image, patch, 3, 0.5)
    got = sliding_window_predict(net, image, SlidingWindow(patch, 3, step_size=0.5, tiles_per_batch=3,
                                                          accumulator_dtype=torch.float32))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    half = sliding_window_predict(net, image, SlidingWindow(patch, 3, step_size=0.5, tiles_per_batch=3))
    torch.testing.assert_close(half, expected, rtol=2e-3, atol=1e-3)


def test_host_and_device_accumulation_agree():
    net = _net(nn.Conv3d, 1, 2, kernel=3)
    image = torch.randn(1, 10, 19, 14)
    kwargs = dict(patch_size=(8, 8, 8), num_classes=2, mirror_axes=(1,))
    host = sliding_window_predict(net, image, SlidingWindow(accumulate_on="host", **kwargs))
    on_device = sliding_window_predict(net, image, SlidingWindow(accumulate_on="device", **kwargs))
    torch.testing.assert_close(host, on_device, rtol=0, atol=0)


def test_an_image_that_is_not_channel_first_3d_is_rejected_clearly():
    net = _net(nn.Conv3d, 1, 2, kernel=1)
    window = SlidingWindow((8, 8, 8), 2)
    with pytest.raises(ValueError, match="channel-first 3D"):
        sliding_window_predict(net, torch.zeros(10, 12, 14), window)
    slabs = sliding_window.sliding_window_slabs(net, torch.zeros(10, 12, 14), window)
    with pytest.raises(ValueError, match="channel-first 3D"):  # a generator: on the first slab asked for
        next(slabs)


@pytest.mark.parametrize("patch, kwargs, message", [
    ((8,), {}, "3 entries"),
    ((8, 8, 8, 8), {}, "3 entries"),
    ((8, 8), {"mirror_axes": (2,)}, "mirror_axes"),
    ((8, 8, 8), {"accumulate_on": "gpu"}, "accumulate_on"),
])
def test_wrong_arguments_are_rejected_clearly(patch, kwargs, message):
    with pytest.raises(ValueError, match=message):
        SlidingWindow(patch, 2, **kwargs)


def test_wrong_num_classes_is_reported():
    net = _net(nn.Conv3d, 1, 2, kernel=1)
    with pytest.raises(ValueError, match="num_classes"):
        sliding_window_predict(net, torch.zeros(1, 8, 8, 8), SlidingWindow((8, 8, 8), num_classes=3))


def test_out_of_memory_on_the_device_falls_back_to_host_accumulation(monkeypatch, caplog):
    from autoseg.inference import sliding_window

    net = _net(nn.Conv3d, 1, 3, kernel=3)
    image = torch.randn(1, 20, 11, 9)
    kwargs = {"patch_size": (8, 8, 8), "num_classes": 3, "mirror_axes": (0,), "tiles_per_batch": 2}
    expected = sliding_window_predict(net, image, SlidingWindow(accumulate_on="host", **kwargs))

    # The first attempt to allocate the accumulators on the "device" fails.
    new_band = sliding_window._new_band
    attempts = []

    def failing_first(num_classes, depth, plane, target, dtype):
        attempts.append(target)
        if len(attempts) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return new_band(num_classes, depth, plane, target, dtype)

    device = torch.device("cpu", 0)  # stands in for a GPU: any accumulator device that is not the host
    monkeypatch.setattr(sliding_window, "_accumulator_device", lambda *args: device)
    monkeypatch.setattr(sliding_window, "_new_band", failing_first)
    with caplog.at_level("WARNING"):
        out = sliding_window_predict(net, image, SlidingWindow(accumulate_on="device", **kwargs))
    assert attempts == [device, sliding_window.HOST] and "out of memory" in caplog.text
    torch.testing.assert_close(out, expected, rtol=0, atol=0)

    # Running out later, after slabs were handed out, resumes on the host without repeating them.
    monkeypatch.setattr(sliding_window, "_new_band", new_band)
    calls = []

    def net_failing_once(x):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return net(x)

    slabs = list(sliding_window.sliding_window_slabs(net_failing_once, image,
                                                     SlidingWindow(accumulate_on="device", **kwargs)))
    starts = [z0 for z0, _ in slabs]
    assert starts == sorted(set(starts)) and len(slabs) > 2
    torch.testing.assert_close(torch.cat([s for _, s in slabs], dim=1), expected, rtol=0, atol=0)


def test_slabs_are_final_before_the_last_window_runs():
    calls = []
    net = _net(nn.Conv3d, 1, 2, kernel=1)

    def counting(x):
        calls.append(x.shape[0])
        return net(x)

    image = torch.randn(1, 40, 10, 10)
    seen = []
    window = SlidingWindow((8, 10, 10), 2, tiles_per_batch=1)
    for z0, slab in sliding_window.sliding_window_slabs(counting, image, window):
        seen.append((z0, slab.shape[1], len(calls)))
    assert seen[0][0] == 0 and seen[0][2] < 9  # the first slab came out after a few of the 9 windows
    assert sum(n for _, n, _ in seen) == 40 and [z for z, _, _ in seen] == sorted(z for z, _, _ in seen)
