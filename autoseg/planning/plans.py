"""`plans.json` as typed records: read and checked in one place, so every later stage gets fields, not keys.

The file stays plain JSON a person can read and edit (docs/workspace.md). `Plans.load` checks every
key a later stage reads, with its type and the consistency between keys, and a problem is a
`PlanError` naming the file, the key and the fix, before any work starts. The planner builds the
records; preprocessing, training, prediction, cross-validation and model archives only read them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from autoseg.atomic import read_json, write_json
from autoseg.dataset import ignore_label_id
from autoseg.dataset.regions import Region, RegionError
from autoseg.errors import AutosegError

if TYPE_CHECKING:
    from autoseg.network.unet import UNetTopology

FORMAT_VERSION = 2
CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")
CASCADE = "3d_cascade_fullres"  # 3d_fullres fed with 3d_lowres's prediction as extra input channels
CONFIGURATIONS_3D = ("3d_fullres", "3d_lowres", CASCADE)  # never planned for 2D images
NORMALIZATION_SCHEMES = ("ct", "zscore", "noNorm", "rescale_to_0_1", "rgb_to_0_1")
# The planner's reason for planning no 3D configuration: the dataset is made of 2D images.
NOT_PLANNED_FOR_2D_DATA = "2D data: the median case has a single slice"


class PlanError(AutosegError):
    """Plans that cannot be made or read; the message says why and what to do."""


@dataclass(frozen=True)
class ChannelNormalization:
    """How one input channel's intensities are normalized (preprocessing/normalization.py applies it)."""

    channel: int
    name: str
    scheme: str
    use_nonzero_mask: bool
    reason: str = ""
    clip: tuple[float, float] | None = None  # "ct" only: the foreground 0.5 / 99.5 percentiles
    mean: float | None = None  # "ct" only
    std: float | None = None  # "ct" only

    def to_json(self) -> dict:
        data: dict[str, Any] = {"channel": self.channel, "name": self.name, "scheme": self.scheme,
                                "use_nonzero_mask": self.use_nonzero_mask}
        if self.clip is not None:
            data["clip"] = list(self.clip)
        if self.mean is not None:
            data["mean"] = self.mean
        if self.std is not None:
            data["std"] = self.std
        data["reason"] = self.reason
        return data


@dataclass(frozen=True)
class ResamplingPlan:
    """Interpolation orders for images and labels, and when an axis is thick enough to resample apart."""

    image_order: int
    label_order: int
    thick_axis_order: int
    anisotropy_threshold: float
    reason: str = ""

    def to_json(self) -> dict:
        return {"image_order": self.image_order, "label_order": self.label_order,
                "thick_axis_order": self.thick_axis_order, "anisotropy_threshold": self.anisotropy_threshold,
                "reason": self.reason}


@dataclass(frozen=True)
class ElasticDeformation:
    """The U-Net paper's elastic deformation (training/augmentation.py): displacements drawn on a coarse
    grid of `grid_points` nodes per axis with standard deviation `sigma` voxels, applied to a training
    patch with `probability`."""

    grid_points: int = 3
    sigma: float = 10.0
    probability: float = 1.0

    def to_json(self) -> dict:
        return {"grid_points": self.grid_points, "sigma": self.sigma, "probability": self.probability}

    def describe(self) -> str:
        return (f"elastic deformation on a {self.grid_points}-node grid per axis, sigma {self.sigma:g} voxels, "
                f"p {self.probability:g}")


INSTANCE_METHODS = ("boundary_class",)
BOUNDARY_LABEL_NAME = "object_boundary"


@dataclass(frozen=True)
class InstanceSegmentation:
    """How objects are taught apart (docs/instances.md): "boundary_class" trains one more class, each object's
    one-voxel inner rim (`boundary_label`), so touching objects are separated by two rims; prediction grows
    the connected interiors back over the rims (inference/instance_maps.py)."""

    boundary_label: int
    method: str = "boundary_class"
    reason: str = ""

    def to_json(self) -> dict:
        return {"method": self.method, "boundary_label": self.boundary_label, "reason": self.reason}


@dataclass(frozen=True)
class ConfigurationPlan:
    """One configuration (2d, 3d_fullres, 3d_lowres): its spacing, patch, U-Net topology and batch."""

    name: str
    data_identifier: str
    spacing: tuple[float, ...]  # 2d: in-plane only; each case keeps its own spacing across slices
    median_shape: tuple[int, ...]
    patch_size: tuple[int, ...]
    batch_size: int
    batch_dice: bool
    features_per_stage: tuple[int, ...]
    kernel_sizes: tuple[tuple[int, ...], ...]
    strides: tuple[tuple[int, ...], ...]
    n_conv_per_stage: int = 2
    estimated_memory_gb: float | None = None
    reasons: dict[str, str] = field(default_factory=dict, compare=False)
    # ResEnc presets: basic blocks per encoder stage (empty: the plain U-Net) and the decoder's convs per stage
    residual_blocks: tuple[int, ...] = ()
    n_conv_per_stage_decoder: int | None = None
    # The cascade: the configuration whose prediction (one channel per foreground label) joins the input
    previous_stage: str | None = None
    # Training only: the U-Net paper's elastic deformation (None: off, nnU-Net's default)
    elastic_deformation: ElasticDeformation | None = None

    @property
    def ndim(self) -> int:
        return len(self.patch_size)

    @property
    def network(self) -> str:
        """"residual_encoder_unet" (a ResEnc preset) or "unet" (nnU-Net's default plain U-Net)."""
        return "residual_encoder_unet" if self.residual_blocks else "unet"

    @property
    def mirror_axes(self) -> tuple[int, ...]:
        """Every spatial axis of the network input (mirroring augmentation and test-time mirroring)."""
        return tuple(range(self.ndim))

    def to_json(self) -> dict:
        return {"data_identifier": self.data_identifier, "spacing": list(self.spacing),
                "median_shape": list(self.median_shape), "patch_size": list(self.patch_size),
                "batch_size": self.batch_size, "batch_dice": self.batch_dice,
                "features_per_stage": list(self.features_per_stage),
                "kernel_sizes": [list(k) for k in self.kernel_sizes], "strides": [list(s) for s in self.strides],
                "n_conv_per_stage": self.n_conv_per_stage,
                # only in ResEnc plans, so default plans.json (and the hashes of its settings) stay as they were
                **({"network": self.network, "residual_blocks": list(self.residual_blocks),
                    "n_conv_per_stage_decoder": self.n_conv_per_stage_decoder} if self.residual_blocks else {}),
                **({"previous_stage": self.previous_stage} if self.previous_stage else {}),
                **({"elastic_deformation": self.elastic_deformation.to_json()} if self.elastic_deformation else {}),
                "estimated_memory_gb": self.estimated_memory_gb, "reasons": dict(self.reasons)}


@dataclass(frozen=True)
class Plans:
    """Everything the planner decided for a dataset; the single source of truth for every later stage."""

    dataset_name: str
    channel_names: tuple[str, ...]
    labels: dict[int, str]  # label id -> name, 0 the background; on disk the ids are strings
    default_configuration: str | None
    transpose_forward: tuple[int, ...]
    transpose_backward: tuple[int, ...]
    memory_budget_gb: float
    normalization: tuple[ChannelNormalization, ...]
    resampling: ResamplingPlan
    configurations: dict[str, ConfigurationPlan]
    reasons: dict[str, str] = field(default_factory=dict, compare=False)
    not_planned: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    preset: str = "default"  # the planning preset (autoseg/planning/presets.py): default, resenc-m, -l, -xl
    # Instance maps in the dataset: the network learns object boundaries as an extra label (None: semantic only)
    instances: InstanceSegmentation | None = None
    # Region-based labels (dataset/regions.py): one sigmoid output per region; empty: one softmax class per label
    regions: tuple[Region, ...] = ()

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    @property
    def ignore_label(self) -> int | None:
        """The id of the label named "ignore" (unannotated voxels, nnU-Net v2's rule): the highest id, never
        predicted, left out of the loss and of every score."""
        return ignore_label_id(self.labels)

    @property
    def num_classes(self) -> int:
        """Network outputs: one per label, background included, the ignore label not; with regions, one per region."""
        if self.regions:
            return len(self.regions)
        return len(self.labels) - (self.ignore_label is not None)

    @property
    def trained_on_2d_images(self) -> bool:
        """Planned from 2D images (PNG, TIFF, ...), so a 3D volume is something it can only take slice by slice."""
        return self.not_planned.get("3d_fullres") == NOT_PLANNED_FOR_2D_DATA

    @property
    def foreground_labels(self) -> list[int]:
        """The labels the network predicts, background and the ignore label left out."""
        return sorted(k for k in self.labels if k > 0 and k != self.ignore_label)

    @property
    def boundary_label(self) -> int | None:
        """The extra label of object boundaries that instance segmentation trains (never written out)."""
        return None if self.instances is None else self.instances.boundary_label

    @property
    def output_labels(self) -> dict[int, str]:
        """The dataset's labels as prediction writes them: the ignore label and object boundaries left out; with
        regions, each region under the id it is written as."""
        if self.regions:
            return {0: self.labels[0], **{r.written_as: r.name for r in self.regions}}
        return {k: v for k, v in self.labels.items() if k not in (self.ignore_label, self.boundary_label)}

    @property
    def scored_structures(self) -> dict[int, tuple[int, ...]]:
        """What validation and cross-validation score, by output id: each foreground label as itself, or with
        regions each region (its written id -> the label ids it unites); object rims never."""
        if self.regions:
            return {r.written_as: r.labels for r in self.regions}
        return {k: (k,) for k in self.output_labels if k > 0}

    def with_instance_boundaries(self, reason: str) -> "Plans":
        """These plans learning object boundaries as one more label (the dataset has instance maps)."""
        if self.instances is not None:
            return self
        if self.ignore_label is not None:
            raise PlanError("instance segmentation with an ignore label is not supported: the object boundaries "
                            "would have to come after the ignore label; plan with --instances off")
        if self.regions:
            raise PlanError("instance segmentation with region-based labels is not supported; plan with "
                            "--instances off")
        boundary = max(self.labels) + 1
        return replace(self, labels={**self.labels, boundary: BOUNDARY_LABEL_NAME},
                       instances=InstanceSegmentation(boundary_label=boundary, reason=reason))

    def input_channels(self, configuration: str) -> int:
        """The network's input channels: the image's, plus one per foreground label in a cascade's second stage."""
        previous = self.configuration(configuration).previous_stage
        return self.num_channels + (len(self.foreground_labels) if previous else 0)

    def previous_stages(self, names: Sequence[str]) -> list[str]:
        """The first stages the cascades among `names` need that `names` leave out (what must be preprocessed,
        or exported, with them)."""
        stages = dict.fromkeys(self.configuration(n).previous_stage for n in names)
        return [s for s in stages if s is not None and s not in names]

    def network_topology(self, configuration: str) -> "UNetTopology":
        """The U-Net of one configuration, for this dataset's channels and labels."""
        from autoseg.network.unet import UNetTopology  # torch: only where a network is built

        return UNetTopology.from_plan(self.configuration(configuration), self.input_channels(configuration),
                                      self.num_classes)

    def configuration(self, name: str) -> ConfigurationPlan:
        if name not in self.configurations:
            raise PlanError(f"plans.json has no configuration {name} (it has "
                            f"{', '.join(self.configurations) or 'none'})")
        return self.configurations[name]

    def resolve_configurations(self, names: Sequence[str] | None) -> tuple[str, ...]:
        """`names` checked against the plans, or the default configuration when None: the one place where
        "no --config given" is decided."""
        if names is None:
            if not self.default_configuration:
                raise PlanError("plans.json names no default configuration; pass the configuration(s), "
                                f"one of {', '.join(self.configurations) or 'none planned'}")
            return (self.default_configuration,)
        names = tuple(dict.fromkeys(names))
        if not names:
            raise PlanError("no configuration given; pass at least one, e.g. 3d_fullres")
        unknown = [c for c in names if c not in self.configurations]
        if unknown:
            raise PlanError(f"plans.json has no configuration {', '.join(unknown)} "
                            f"(it has {', '.join(self.configurations) or 'none'})")
        return names

    def with_configurations(self, names: Sequence[str]) -> "Plans":
        """These plans keeping only `names` (e.g. for a model archive); the default moves to the first kept
        one when it was dropped."""
        kept = {n: self.configuration(n) for n in names}
        if self.default_configuration in kept:
            return replace(self, configurations=kept)
        reasons = {**self.reasons, "default_configuration":
                   f"the first exported configuration (the planned default, {self.default_configuration}, "
                   "was not exported)"}
        return replace(self, configurations=kept, default_configuration=next(iter(kept), None), reasons=reasons)

    def to_json(self) -> dict:
        return {
            "format_version": self.format_version,
            "dataset_name": self.dataset_name,
            "channel_names": list(self.channel_names),
            "labels": {str(k): v for k, v in self.labels.items()},
            "default_configuration": self.default_configuration,
            "transpose_forward": list(self.transpose_forward),
            "transpose_backward": list(self.transpose_backward),
            "memory_budget_gb": self.memory_budget_gb,
            **({"preset": self.preset} if self.preset != "default" else {}),  # default plans.json as before
            **({"instance_segmentation": self.instances.to_json()} if self.instances else {}),
            **({"regions": [r.to_json() for r in self.regions]} if self.regions else {}),
            "normalization": [n.to_json() for n in self.normalization],
            "resampling": self.resampling.to_json(),
            "reasons": dict(self.reasons),
            "not_planned": dict(self.not_planned),
            "configurations": {name: c.to_json() for name, c in self.configurations.items()},
        }

    @classmethod
    def from_json(cls, data: Any, source: str | Path = "plans.json") -> "Plans":
        """Checked construction from the file's contents; `source` names the file in errors."""
        return _read_plans(_Keys(data, str(source), ""))

    @classmethod
    def load(cls, path: Path | str) -> "Plans":
        path = Path(path)
        if not path.is_file():
            raise PlanError(f"{path}: not found; run `autoseg plan` first")
        try:
            data = read_json(path)
        except (OSError, ValueError) as exc:
            raise PlanError(f"{path}: not readable as JSON ({exc}); run `autoseg plan` again") from None
        return cls.from_json(data, path)

    def save(self, path: Path | str) -> None:
        write_json(path, self.to_json())


class _Keys:
    """Typed reads from one JSON object, each failure a PlanError naming the file and the key's path."""

    def __init__(self, data: Any, source: str, where: str):
        if not isinstance(data, dict):
            raise PlanError(f"{source}: {where or 'the file'} must be a JSON object; run `autoseg plan` again")
        self.data, self.source, self.where = data, source, where

    def error(self, key: str, problem: str) -> PlanError:
        return PlanError(f"{self.source}: {self.where}{key} {problem}; fix it or run `autoseg plan` again")

    def raw(self, key: str, default: Any = ...) -> Any:
        if key not in self.data:
            if default is ...:
                raise self.error(key, "is missing")
            return default
        return self.data[key]

    def sub(self, key: str) -> "_Keys":
        return _Keys(self.raw(key), self.source, f"{self.where}{key}.")

    def text(self, key: str, default: Any = ..., optional: bool = False) -> Any:
        value = self.raw(key, default)
        if (value is None and optional) or (default is not ... and value is default):
            return value
        if not isinstance(value, str):
            raise self.error(key, f"must be text, got {value!r}")
        return value

    def integer(self, key: str, default: Any = ..., minimum: int | None = None) -> int:
        value = self.raw(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(key, f"must be a whole number, got {value!r}")
        if minimum is not None and value < minimum:
            raise self.error(key, f"must be at least {minimum}, got {value}")
        return value

    def number(self, key: str, default: Any = ..., positive: bool = False) -> Any:
        value = self.raw(key, default)
        if value is None and default is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(key, f"must be a number, got {value!r}")
        if positive and not value > 0:
            raise self.error(key, f"must be positive, got {value}")
        return float(value) if isinstance(value, float) else value

    def flag(self, key: str) -> bool:
        value = self.raw(key)
        if not isinstance(value, bool):
            raise self.error(key, f"must be true or false, got {value!r}")
        return value

    def numbers(self, key: str, kind: type, length: int | None = None, positive: bool = False) -> tuple:
        value = self.raw(key)
        if not isinstance(value, list) or not all(_is(v, kind) for v in value) or not value:
            raise self.error(key, f"must be a non-empty list of {_kind_name(kind)}, got {value!r}")
        if length is not None and len(value) != length:
            raise self.error(key, f"must have {length} entries, got {len(value)}")
        if positive and not all(v > 0 for v in value):
            raise self.error(key, f"must hold positive values, got {value}")
        return tuple(int(v) if kind is int else v for v in value)  # numbers as written: the plans' hash sees them

    def number_rows(self, key: str, width: int, rows: int) -> tuple[tuple[int, ...], ...]:
        value = self.raw(key)
        ok = isinstance(value, list) and len(value) == rows and all(
            isinstance(r, list) and len(r) == width and all(_is(v, int) and v >= 1 for v in r) for r in value)
        if not ok:
            raise self.error(key, f"must be {rows} lists of {width} positive whole numbers, got {value!r}")
        return tuple(tuple(int(v) for v in r) for r in value)

    def texts(self, key: str) -> dict[str, str]:
        value = self.raw(key, {})
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            raise self.error(key, "must be an object of text values")
        return dict(value)


def _is(value: Any, kind: type) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if kind is int else isinstance(value, (int, float))


def _kind_name(kind: type) -> str:
    return "whole numbers" if kind is int else "numbers"


def _read_plans(keys: _Keys) -> Plans:
    version = keys.raw("format_version", None)
    if version != FORMAT_VERSION:
        raise PlanError(f"{keys.source}: format_version {version} is not {FORMAT_VERSION}; rerun `autoseg plan`")
    channel_names = keys.raw("channel_names")
    if not isinstance(channel_names, list) or not channel_names or not all(isinstance(c, str) for c in channel_names):
        raise keys.error("channel_names", f"must be a non-empty list of names, got {channel_names!r}")
    labels = _read_labels(keys)
    transpose = keys.numbers("transpose_forward", int)
    if sorted(transpose) != list(range(len(transpose))):
        raise keys.error("transpose_forward", f"must be a permutation of 0..{len(transpose) - 1}, got "
                                              f"{list(transpose)}")
    backward = keys.numbers("transpose_backward", int, length=len(transpose))
    if [transpose[b] for b in backward] != list(range(len(transpose))):
        raise keys.error("transpose_backward", f"{list(backward)} does not undo transpose_forward {list(transpose)}")
    normalization = _read_normalization(keys, len(channel_names))
    resampling = _read_resampling(keys.sub("resampling"))
    configs = keys.sub("configurations")
    configurations = {name: _read_configuration(configs.sub(name), name) for name in configs.data}
    for name, config in configurations.items():
        if config.previous_stage is not None and config.previous_stage not in configurations:
            raise configs.error(f"{name}.previous_stage", f"names {config.previous_stage}, which is not among the "
                                                          f"configurations ({', '.join(configurations)})")
    default = keys.text("default_configuration", optional=True)
    if default is not None and default not in configurations:
        raise keys.error("default_configuration", f"names {default}, which is not among the configurations "
                                                  f"({', '.join(configurations) or 'none'})")
    return Plans(dataset_name=keys.text("dataset_name", ""), channel_names=tuple(channel_names), labels=labels,
                 default_configuration=default, transpose_forward=transpose, transpose_backward=backward,
                 memory_budget_gb=keys.number("memory_budget_gb", positive=True), normalization=normalization,
                 resampling=resampling, configurations=configurations, reasons=keys.texts("reasons"),
                 not_planned=keys.texts("not_planned"), format_version=version,
                 preset=keys.text("preset", "default"), instances=_read_instances(keys, labels),
                 regions=_read_regions(keys, labels))


def _read_regions(keys: _Keys, labels: dict[int, str]) -> tuple[Region, ...]:
    raw = keys.raw("regions", None)
    if raw is None:
        return ()
    if not isinstance(raw, list) or not raw:
        raise keys.error("regions", "must be a non-empty list of {name, labels, written_as}")
    try:
        regions = tuple(Region.from_json(r, f"{keys.source}: regions") for r in raw)
    except RegionError as exc:
        raise PlanError(str(exc)) from None
    ignore = ignore_label_id(labels)
    for r in regions:
        unknown = [v for v in (*r.labels, r.written_as) if v not in labels or v == 0 or v == ignore]
        if unknown:
            raise keys.error("regions", f"region '{r.name}' uses id(s) {unknown} that are no foreground label "
                                        f"({sorted(k for k in labels if k not in (0, ignore))})")
    return regions


def _read_instances(keys: _Keys, labels: dict[int, str]) -> InstanceSegmentation | None:
    if keys.raw("instance_segmentation", None) is None:
        return None
    i = keys.sub("instance_segmentation")
    method = i.text("method")
    if method not in INSTANCE_METHODS:
        raise i.error("method", f"is {method!r}; choose one of {', '.join(INSTANCE_METHODS)}")
    boundary = i.integer("boundary_label", minimum=1)
    if boundary != max(labels):
        raise i.error("boundary_label", f"is {boundary}; it must be the highest id in labels ({max(labels)})")
    return InstanceSegmentation(boundary_label=boundary, method=method, reason=i.text("reason", ""))


def _read_labels(keys: _Keys) -> dict[int, str]:
    raw = keys.raw("labels")
    if not isinstance(raw, dict) or not raw:
        raise keys.error("labels", "must be a non-empty object of label id -> name")
    labels = {}
    for k, v in raw.items():
        try:
            label = int(k)
        except ValueError:
            raise keys.error("labels", f"has the id {k!r}, which is not a whole number") from None
        if label < 0 or not isinstance(v, str):
            raise keys.error("labels", f"entry {k!r}: {v!r} must map a label id >= 0 to a name")
        labels[label] = v
    if 0 not in labels:
        raise keys.error("labels", "lacks the background label 0")
    return dict(sorted(labels.items()))


def _read_normalization(keys: _Keys, num_channels: int) -> tuple[ChannelNormalization, ...]:
    raw = keys.raw("normalization")
    if not isinstance(raw, list):
        raise keys.error("normalization", "must be a list with one entry per channel")
    schemes = []
    for i, entry in enumerate(raw):
        n = _Keys(entry, keys.source, f"{keys.where}normalization[{i}].")
        scheme = n.text("scheme")
        if scheme not in NORMALIZATION_SCHEMES:
            raise n.error("scheme", f"is {scheme!r}; choose one of {', '.join(NORMALIZATION_SCHEMES)}")
        clip = mean = std = None
        if scheme == "ct":
            clip = n.numbers("clip", float, length=2)
            mean, std = n.number("mean"), n.number("std")
        schemes.append(ChannelNormalization(channel=n.integer("channel", minimum=0), name=n.text("name", ""),
                                            scheme=scheme, use_nonzero_mask=n.flag("use_nonzero_mask"),
                                            reason=n.text("reason", ""), clip=clip, mean=mean, std=std))
    channels = sorted(s.channel for s in schemes)
    if channels != list(range(num_channels)):
        raise keys.error("normalization", f"covers channels {channels}, but channel_names has {num_channels} "
                                          f"(0..{num_channels - 1})")
    return tuple(schemes)


def _read_resampling(r: _Keys) -> ResamplingPlan:
    return ResamplingPlan(image_order=r.integer("image_order", minimum=0),
                          label_order=r.integer("label_order", minimum=0),
                          thick_axis_order=r.integer("thick_axis_order", minimum=0),
                          anisotropy_threshold=r.number("anisotropy_threshold", positive=True),
                          reason=r.text("reason", ""))


NETWORKS = ("unet", "residual_encoder_unet")


def _read_network(c: _Keys, stages: int) -> dict:
    """The residual encoder's keys of a ResEnc plan; a plan without "network" is the plain U-Net."""
    network = c.text("network", "unet")
    if network not in NETWORKS:
        raise c.error("network", f"must be one of {', '.join(NETWORKS)}, got {network!r}")
    if network == "unet":
        return {}
    return {"residual_blocks": c.numbers("residual_blocks", int, length=stages, positive=True),
            "n_conv_per_stage_decoder": c.integer("n_conv_per_stage_decoder", minimum=1)}


def _read_elastic(c: _Keys) -> ElasticDeformation | None:
    if c.raw("elastic_deformation", None) is None:
        return None
    e = c.sub("elastic_deformation")
    defaults = ElasticDeformation()
    probability = e.number("probability", defaults.probability)
    if not 0 <= probability <= 1:
        raise e.error("probability", f"must lie in [0, 1], got {probability}")
    return ElasticDeformation(grid_points=e.integer("grid_points", defaults.grid_points, minimum=2),
                              sigma=float(e.number("sigma", defaults.sigma, positive=True)),
                              probability=float(probability))


def _read_configuration(c: _Keys, name: str) -> ConfigurationPlan:
    patch = c.numbers("patch_size", int, positive=True)
    ndim = len(patch)
    if ndim not in (2, 3):
        raise c.error("patch_size", f"must have 2 or 3 entries, got {list(patch)}")
    features = c.numbers("features_per_stage", int, positive=True)
    spacing = c.numbers("spacing", float, positive=True)
    if len(spacing) != ndim:
        raise c.error("spacing", f"has {len(spacing)} entries, patch_size {ndim}")
    config = ConfigurationPlan(
        name=name, data_identifier=c.text("data_identifier"), spacing=spacing,
        median_shape=c.numbers("median_shape", int, length=ndim) if "median_shape" in c.data else (),
        patch_size=patch, batch_size=c.integer("batch_size", minimum=1), batch_dice=c.flag("batch_dice"),
        features_per_stage=features, kernel_sizes=c.number_rows("kernel_sizes", ndim, len(features)),
        strides=c.number_rows("strides", ndim, len(features)),
        n_conv_per_stage=c.integer("n_conv_per_stage", 2, minimum=1),
        estimated_memory_gb=c.number("estimated_memory_gb", None), reasons=c.texts("reasons"),
        previous_stage=c.text("previous_stage", None), elastic_deformation=_read_elastic(c),
        **_read_network(c, len(features)))
    total = [1] * ndim
    for stride in config.strides:
        total = [t * s for t, s in zip(total, stride)]
    if any(p % t for p, t in zip(patch, total)):
        raise c.error("patch_size", f"{list(patch)} is not a multiple of the strides' product {total}")
    return config

