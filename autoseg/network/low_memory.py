"""The U-Net's full-resolution logits for inference in a fraction of the activation memory.

A plain forward pass of a large window keeps, besides the feature maps themselves, a copy of every
convolution's input (oneDNN reorders it into its own layout), the skip concatenation, and the
out-of-place InstanceNorm output: several copies of each full-resolution map of a large window
(docs/prediction.md has the measurements). `low_memory_forward` computes the same function with:

- every convolution run over chunks of rows of the first spatial axis, so the library's copies are
  one chunk, not one map;
- a stride-1 convolution whose input is used up writing its output over that input (the decoder's
  first convolution over the skip), one chunk late;
- the decoder's upsampling and its concatenation with the skip computed for one chunk at a time,
  never for the whole map;
- InstanceNorm and LeakyReLU applied in place.

A residual encoder (ResEnc presets) runs as in its forward; its decoder takes the path above.

The arithmetic per output voxel is that of `UNet.forward` (same weights, same reduction over
channels and kernel taps), so the logits agree to float32 rounding. Used by the predictor; training
keeps `UNet.forward`, whose intermediate maps autograd needs anyway.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from autoseg.network.layers import float32_under_cpu_bf16
from autoseg.network.unet import UNet

# Bytes of input one convolution call reads on the CPU: small beside a full-resolution map, large enough
# that oneDNN still runs each call at full speed (measured in docs/prediction.md).
CHUNK_BYTES = 8 * 2**20
# Windows whose full-resolution feature map (float32) is smaller run the plain forward: there its
# activations are small anyway (about 7 such maps at the peak), and it was the faster of the two
# (docs/prediction.md).
LARGE_MAP_BYTES = 64 * 2**20


def needs_low_memory(topology, patch_size: Sequence[int]) -> bool:
    """Whether one full-resolution feature map of a window exceeds LARGE_MAP_BYTES (float32)."""
    return topology.features_per_stage[0] * math.prod(patch_size) * 4 >= LARGE_MAP_BYTES


def inference_forward(network: UNet, patch_size: Sequence[int],
                      device: torch.device | str = "cpu") -> Callable[[torch.Tensor], torch.Tensor]:
    """What prediction calls on each batch of windows of `patch_size`: `low_memory_forward` where one
    full-resolution feature map exceeds LARGE_MAP_BYTES, else the network itself. On a GPU each
    convolution runs whole (small calls would leave it idle)."""
    if not needs_low_memory(network.topology, patch_size):
        return network
    chunk_bytes = CHUNK_BYTES if torch.device(device).type == "cpu" else None
    return functools.partial(low_memory_forward, network, chunk_bytes=chunk_bytes)


@torch.no_grad()
def low_memory_forward(network: UNet, x: torch.Tensor, chunk_bytes: int | None = CHUNK_BYTES) -> torch.Tensor:
    """Full-resolution logits of `network` for the batch `x`, as `network(x)` with deep supervision off.

    `chunk_bytes=None` runs each convolution in one call (for GPUs, where small calls leave the device
    idle); the decoder still never holds the concatenation or the upsampled map whole."""
    network.check_input(x)
    if network.topology.residual:
        skips = network.encoder(x)  # the residual encoder runs whole; the decoder below still saves its copies
    else:
        skips = []
        for stage in network.encoder.stages:
            for n, block in enumerate(stage):
                # A stage's input is the previous stage's skip, kept for the decoder; later blocks' inputs are not.
                x = _conv_block(block, [x], chunk_bytes, reuse=x if n else None)
            skips.append(x)
    decoder = network.decoder
    x = skips.pop()
    for i in reversed(range(len(decoder.stages))):
        up = _Upsampled(decoder.upsample[i], x)
        skip = skips.pop()
        blocks = list(decoder.stages[i])
        # conv of cat((up, skip)) with neither held whole, written over the skip, which is used up
        x = _conv_block(blocks[0], [up, skip], chunk_bytes, reuse=skip)
        del up, skip
        for block in blocks[1:]:
            x = _conv_block(block, [x], chunk_bytes, reuse=x)
    return _conv_in_chunks(decoder.heads[0], [x], chunk_bytes)


class _Upsampled:
    """The decoder's upsampling (a transposed conv whose kernel equals its stride) of `x`, computed for the
    rows a convolution chunk reads only: output rows [lo, hi) depend on input rows [lo // s, ceil(hi / s))."""

    def __init__(self, conv: nn.Module, x: torch.Tensor):
        kernel, stride = tuple(conv.weight.shape[2:]), tuple(conv.stride)
        if kernel != stride or any(conv.padding) or any(conv.output_padding) or conv.groups != 1:
            raise ValueError("low_memory_forward expects upsampling by a transposed conv with kernel == stride")
        self.conv, self.x, self.step = conv, x, stride[0]
        self.function = F.conv_transpose3d if x.dim() == 5 else F.conv_transpose2d
        self.shape = (x.shape[0], conv.weight.shape[1], x.shape[2] * stride[0],
                      *(n * s for n, s in zip(x.shape[3:], stride[1:])))

    def row_bytes(self) -> int:
        return math.prod(self.shape[:2]) * math.prod(self.shape[3:]) * self.x.element_size()

    def rows(self, lo: int, hi: int) -> torch.Tensor:
        a, b = lo // self.step, -(-hi // self.step)
        out = self.function(self.x[:, :, a:b], self.conv.weight, self.conv.bias, stride=self.conv.stride)
        return out[:, :, lo - a * self.step:hi - a * self.step]


def _length(t) -> int:
    return t.shape[2]


def _rows(t, lo: int, hi: int) -> torch.Tensor:
    return t.rows(lo, hi) if isinstance(t, _Upsampled) else t[:, :, lo:hi]


def _row_bytes(t) -> int:
    return t.row_bytes() if isinstance(t, _Upsampled) else t[:, :, :1].numel() * t.element_size()


def _conv_block(block: nn.Sequential, inputs: list, chunk_bytes: int | None,
                reuse: torch.Tensor | None = None) -> torch.Tensor:
    """conv -> InstanceNorm -> LeakyReLU of a `ConvBlock`, the last two in place (`reuse`: see `_conv_in_chunks`)."""
    conv, norm, act = block
    y = _conv_in_chunks(conv, inputs, chunk_bytes, reuse)
    _instance_norm_(y, norm)
    return F.leaky_relu_(y, act.negative_slope)


def _rows_per_chunk(inputs: list, chunk_bytes: int | None, rows_per_output_row: int) -> int:
    if chunk_bytes is None:
        return _length(inputs[0])
    row = sum(_row_bytes(t) for t in inputs) * rows_per_output_row
    return max(1, chunk_bytes // max(row, 1))


def _conv_in_chunks(conv: nn.Module, inputs: list, chunk_bytes: int | None,
                    reuse: torch.Tensor | None = None) -> torch.Tensor:
    """`conv(torch.cat(inputs, 1))`, computed over chunks of output rows along the first spatial axis.

    `reuse`: one of `inputs` that the caller no longer needs. When the output has its shape, the output
    is written into it, each chunk's rows one chunk late, once no later chunk reads them (a later chunk
    reads from `padding` rows above its first), so no second map is made."""
    weight, bias = conv.weight, conv.bias
    ndim = weight.dim() - 2
    function = F.conv3d if ndim == 3 else F.conv2d
    kernel, stride, padding = weight.shape[2], conv.stride[0], conv.padding[0]
    if conv.dilation[0] != 1 or conv.groups != 1 or not isinstance(conv.padding, tuple):
        raise ValueError("low_memory_forward supports plain convolutions (no dilation, groups or string padding)")
    length = _length(inputs[0])
    out_length = (length + 2 * padding - kernel) // stride + 1
    rows = _rows_per_chunk(inputs, chunk_bytes, stride)
    if rows >= out_length:  # small enough for one call: the module itself (its CPU bf16 rule included)
        whole = [_rows(t, 0, length) for t in inputs]
        return conv(whole[0] if len(whole) == 1 else torch.cat(whole, dim=1))
    in_plane_padding = (0, *conv.padding[1:])
    out = pending = None
    in_place = False
    for a in range(0, out_length, rows):
        b = min(a + rows, out_length)
        lo, hi = a * stride - padding, (b - 1) * stride - padding + kernel  # input rows this chunk reads
        parts = [_rows(t, max(lo, 0), min(hi, length)) for t in inputs]
        part = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        if lo < 0 or hi > length:  # the zero padding of the first axis, only where this chunk needs it
            part = F.pad(part, [0, 0] * (ndim - 1) + [max(-lo, 0), max(hi - length, 0)])
        if float32_under_cpu_bf16(conv, part):  # an in-plane axis shorter than the kernel (axis 0 is padded)
            with torch.autocast("cpu", enabled=False):
                result = function(part.float(), weight, bias, stride=conv.stride, padding=in_plane_padding)
        else:
            result = function(part, weight, bias, stride=conv.stride, padding=in_plane_padding)
        if out is None:
            shape = (result.shape[0], result.shape[1], out_length, *result.shape[3:])
            in_place = (reuse is not None and stride == 1 and rows >= padding and tuple(reuse.shape) == shape
                        and reuse.dtype == result.dtype)
            out = reuse if in_place else result.new_empty(shape)
        if not in_place:
            out[:, :, a:b] = result
            continue
        if pending is not None:  # the previous chunk's rows: this chunk has read them, later ones start below
            out[:, :, pending[0]:pending[0] + pending[1].shape[2]] = pending[1]
        pending = (a, result)
    if pending is not None:
        out[:, :, pending[0]:pending[0] + pending[1].shape[2]] = pending[1]
    return out


def _instance_norm_(y: torch.Tensor, norm: nn.Module, channels_per_step: int = 8) -> None:
    """InstanceNorm (per sample and channel over the spatial axes, affine) in place; statistics in float32
    even when `y` is float16/bfloat16, a few channels at a time so no float32 copy of `y` is made."""
    if norm.track_running_stats and not norm.training and norm.running_mean is not None:
        raise ValueError("low_memory_forward expects InstanceNorm without running statistics")
    spatial = tuple(range(2, y.dim()))
    view = (1, -1) + (1,) * len(spatial)
    for c in range(0, y.shape[1], channels_per_step):
        part = y[:, c:c + channels_per_step]
        values = part.float()  # `part` itself for float32
        var, mean = torch.var_mean(values, dim=spatial, keepdim=True, correction=0)
        scale = torch.rsqrt(var + norm.eps)
        if norm.affine:
            scale = scale * norm.weight[c:c + channels_per_step].float().view(view)
        values = values.sub_(mean).mul_(scale) if values is part else (values - mean) * scale
        if norm.affine:
            values.add_(norm.bias[c:c + channels_per_step].float().view(view))
        if values is not part:
            part.copy_(values)

