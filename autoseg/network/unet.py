"""The U-Net whose shape comes entirely from a plan's lists (features, kernel sizes, strides, blocks).

The same code builds a 2D or a 3D network (`layers.layers_for` picks the layer types), with the
plain encoder of nnU-Net's default plans or, when the topology lists `residual_blocks`, the
residual encoder of its ResEnc presets (`residual_encoder.py`); the decoder is the same for both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from autoseg.network.cost import feature_map_elements  # noqa: F401  (re-exported: the network knows its cost)
from autoseg.network.layers import LEAKY_SLOPE, ConvBlock, layers_for
from autoseg.network.residual_encoder import ResidualEncoder, zero_last_norm_of_each_block


@dataclass(frozen=True)
class UNetTopology:
    """Everything that fixes the network's shape; built from a plan configuration by `from_plan`."""

    in_channels: int
    num_classes: int  # network outputs: one per label including background, or one per region
    features_per_stage: tuple[int, ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    strides: tuple[tuple[int, ...], ...]  # first is all ones
    n_conv_per_stage: int = 2  # plain encoder: convs per stage; also the decoder's unless set below
    residual_blocks: tuple[int, ...] = ()  # residual encoder: basic blocks per stage (empty: plain encoder)
    n_conv_per_stage_decoder: int | None = None

    def __post_init__(self) -> None:
        # Accept lists (as read from JSON) but store tuples so the record stays hashable.
        object.__setattr__(self, "residual_blocks", tuple(int(n) for n in self.residual_blocks))
        object.__setattr__(self, "features_per_stage", tuple(int(f) for f in self.features_per_stage))
        object.__setattr__(self, "kernel_sizes", tuple(tuple(int(k) for k in ks) for ks in self.kernel_sizes))
        object.__setattr__(self, "strides", tuple(tuple(int(s) for s in st) for st in self.strides))
        _validate_topology(self)

    @classmethod
    def from_plan(cls, configuration: Any, in_channels: int, num_classes: int) -> "UNetTopology":
        """From a plan's `ConfigurationPlan` (features_per_stage, kernel_sizes, strides, convs and blocks)."""
        return cls(
            in_channels=in_channels,
            num_classes=num_classes,
            features_per_stage=configuration.features_per_stage,
            kernel_sizes=configuration.kernel_sizes,
            strides=configuration.strides,
            n_conv_per_stage=configuration.n_conv_per_stage,
            residual_blocks=configuration.residual_blocks,
            n_conv_per_stage_decoder=configuration.n_conv_per_stage_decoder,
        )

    @property
    def residual(self) -> bool:
        return bool(self.residual_blocks)

    @property
    def decoder_convs(self) -> int:
        return self.n_conv_per_stage if self.n_conv_per_stage_decoder is None else self.n_conv_per_stage_decoder

    @property
    def ndim(self) -> int:
        return len(self.kernel_sizes[0])

    @property
    def total_stride(self) -> tuple[int, ...]:
        """Product of all strides per axis: every input's spatial size must be a multiple of it."""
        return tuple(math.prod(st[d] for st in self.strides) for d in range(self.ndim))


def _validate_topology(t: UNetTopology) -> None:
    prefix = "invalid U-Net topology (fix the plan's configuration): "
    if t.in_channels < 1:
        raise ValueError(prefix + f"in_channels must be >= 1, got {t.in_channels}")
    if t.num_classes < 1:  # labels: background + at least one; regions: one output each, at least one
        raise ValueError(prefix + f"num_classes (network outputs) must be >= 1, got {t.num_classes}")
    if t.n_conv_per_stage < 1 or t.decoder_convs < 1:
        raise ValueError(prefix + f"n_conv_per_stage must be >= 1, got {t.n_conv_per_stage} (decoder "
                         f"{t.decoder_convs})")
    n = len(t.features_per_stage)
    if t.residual_blocks and (len(t.residual_blocks) != n or min(t.residual_blocks) < 1):
        raise ValueError(prefix + f"residual_blocks needs a positive count for each of the {n} stages, got "
                         f"{list(t.residual_blocks)}")
    if n < 2:
        raise ValueError(prefix + f"a U-Net needs at least 2 stages, features_per_stage has {n}")
    if len(t.kernel_sizes) != n or len(t.strides) != n:
        raise ValueError(
            prefix + "features_per_stage, kernel_sizes and strides must have one entry per stage, got lengths "
            f"{n}, {len(t.kernel_sizes)}, {len(t.strides)}"
        )
    if any(f < 1 for f in t.features_per_stage):
        raise ValueError(prefix + f"features_per_stage must be positive, got {list(t.features_per_stage)}")
    ndim = len(t.kernel_sizes[0])
    if ndim not in (2, 3):
        raise ValueError(prefix + f"kernel sizes must have 2 or 3 entries (2D or 3D), got {list(t.kernel_sizes[0])}")
    for i, (ks, st) in enumerate(zip(t.kernel_sizes, t.strides)):
        if len(ks) != ndim or len(st) != ndim:
            raise ValueError(
                prefix + f"stage {i}: kernel size {list(ks)} and stride {list(st)} must both have {ndim} entries"
            )
        if any(k < 1 or k % 2 == 0 for k in ks):
            raise ValueError(prefix + f"stage {i}: kernel sizes must be odd and positive, got {list(ks)}")
        if any(s < 1 for s in st):
            raise ValueError(prefix + f"stage {i}: strides must be positive, got {list(st)}")
    if any(s != 1 for s in t.strides[0]):
        raise ValueError(prefix + f"the first stage's stride must be all ones, got {list(t.strides[0])}")


def _stage(conv: type, norm: type, c_in: int, c_out: int, kernel, stride, n_conv: int) -> nn.Sequential:
    blocks = [ConvBlock(conv, norm, c_in, c_out, kernel, stride)]
    blocks += [ConvBlock(conv, norm, c_out, c_out, kernel, [1] * len(kernel)) for _ in range(n_conv - 1)]
    return nn.Sequential(*blocks)


class Encoder(nn.Module):
    """Stages of conv blocks; every stage after the first starts with a strided conv."""

    def __init__(self, t: UNetTopology, conv: type, norm: type):
        super().__init__()
        channels_in = (t.in_channels,) + t.features_per_stage[:-1]
        self.stages = nn.ModuleList(
            _stage(conv, norm, c_in, c_out, k, s, t.n_conv_per_stage)
            for c_in, c_out, k, s in zip(channels_in, t.features_per_stage, t.kernel_sizes, t.strides)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class Decoder(nn.Module):
    """Upsample by transposed conv, concatenate the skip, conv blocks, and a 1x1 head per resolution."""

    def __init__(self, t: UNetTopology, conv: type, transposed: type, norm: type):
        super().__init__()
        f = t.features_per_stage
        # Index i works at the resolution of encoder stage i (i = n-2 is the coarsest decoder stage).
        self.upsample = nn.ModuleList(
            transposed(f[i + 1], f[i], t.strides[i + 1], stride=t.strides[i + 1], bias=True) for i in range(len(f) - 1)
        )
        self.stages = nn.ModuleList(
            _stage(conv, norm, 2 * f[i], f[i], t.kernel_sizes[i], [1] * t.ndim, t.decoder_convs)
            for i in range(len(f) - 1)
        )
        self.heads = nn.ModuleList(conv(f[i], t.num_classes, 1, bias=True) for i in range(len(f) - 1))

    def forward(self, skips: list[torch.Tensor], all_heads: bool) -> list[torch.Tensor]:
        x = skips[-1]
        outputs = []
        for i in reversed(range(len(self.stages))):
            x = self.upsample[i](x)
            x = self.stages[i](torch.cat((x, skips[i]), dim=1))
            if all_heads or i == 0:
                outputs.append(self.heads[i](x))
        return outputs[::-1]


class UNet(nn.Module):
    """U-Net; `forward` returns a list of logits (full resolution first) while `deep_supervision` is on."""

    def __init__(self, topology: UNetTopology, deep_supervision: bool = True):
        super().__init__()
        self.topology = topology
        self.deep_supervision = deep_supervision
        conv, transposed, norm = layers_for(topology.ndim)
        self.encoder = ResidualEncoder(topology, conv, norm) if topology.residual else Encoder(topology, conv, norm)
        self.decoder = Decoder(topology, conv, transposed, norm)
        self.apply(_init_weights)
        if topology.residual:
            self.apply(zero_last_norm_of_each_block)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor] | torch.Tensor:
        self.check_input(x)
        outputs = self.decoder(self.encoder(x), all_heads=self.deep_supervision)
        return outputs if self.deep_supervision else outputs[0]

    def check_input(self, x: torch.Tensor) -> None:
        """A readable error for a batch this network cannot take (wrong channels, axes or size)."""
        t = self.topology
        if x.dim() != t.ndim + 2 or x.shape[1] != t.in_channels:
            raise ValueError(
                f"expected input of shape (batch, {t.in_channels}, {t.ndim} spatial axes), got {tuple(x.shape)}"
            )
        if any(n % s for n, s in zip(x.shape[2:], t.total_stride)):
            raise ValueError(
                f"input spatial shape {list(x.shape[2:])} must be a multiple of the total stride "
                f"{list(t.total_stride)}; pad the input or choose a patch size divisible by it"
            )


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=LEAKY_SLOPE)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def build_unet(topology: UNetTopology, deep_supervision: bool = True) -> UNet:
    """Build the network for a topology (usually `UNetTopology.from_plan(...)`)."""
    return UNet(topology, deep_supervision=deep_supervision)


def deep_supervision_scales(strides: Sequence[Sequence[int]]) -> list[list[float]]:
    """Scale of each deep-supervision output relative to the patch, full resolution first (one per output)."""
    scales = []
    cumulative = [1] * len(strides[0])
    for stride in strides[:-1]:
        cumulative = [c * s for c, s in zip(cumulative, stride)]
        scales.append([1.0 / c for c in cumulative])
    return scales
