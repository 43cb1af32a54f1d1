"""Plans carried over from another workspace, for fine-tuning its trained networks on a new dataset.

As nnU-Net's `nnUNetv2_move_plans_between_datasets`: the target dataset is preprocessed exactly as
the source was (spacing, axis order, normalization with the source's CT statistics, patch and
network), so a source checkpoint's weights fit the target's network and see data like their own.
What belongs to the target stays the target's: its name, its channel names and its labels (a
different label set only re-initialises the segmentation heads, see `training/pretrained.py`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from autoseg import workspace
from autoseg.fingerprint import Fingerprint
from autoseg.planning.plans import CONFIGURATIONS_3D, NOT_PLANNED_FOR_2D_DATA, PlanError, Plans


def source_plans_path(source: Path) -> Path:
    """A workspace folder (its plans.json) or a plans.json file."""
    source = Path(source)
    return workspace.plans_json(source) if source.is_dir() else source


def transfer_plans(source: Plans, fingerprint: Fingerprint, source_name: str) -> Plans:
    """`source`'s plans for the dataset of `fingerprint`; PlanError when its images cannot take them."""
    if len(fingerprint.channel_names) != source.num_channels:
        raise PlanError(f"{source_name} plans {source.num_channels} channel(s) ({', '.join(source.channel_names)}), "
                        f"dataset {fingerprint.dataset_name} has {len(fingerprint.channel_names)} "
                        f"({', '.join(fingerprint.channel_names)}); its networks cannot take these images")
    target_is_2d = bool(np.all(fingerprint.cropped_shapes[:, 0] == 1))
    configurations = dict(source.configurations)
    not_planned = dict(source.not_planned)
    if target_is_2d:
        for name in CONFIGURATIONS_3D:
            if configurations.pop(name, None) is not None:
                not_planned[name] = NOT_PLANNED_FOR_2D_DATA
    elif source.trained_on_2d_images:
        raise PlanError(f"{source_name} was planned for 2D images; dataset {fingerprint.dataset_name} holds 3D "
                        "volumes, which need plans of their own (plan it without --plans-from)")
    if not configurations:
        raise PlanError(f"{source_name} plans only 3D configurations; dataset {fingerprint.dataset_name} holds 2D "
                        "images")
    default = source.default_configuration if source.default_configuration in configurations else next(
        iter(configurations))
    renamed = [f"{a} -> {b}" for a, b in zip(source.channel_names, fingerprint.channel_names) if a != b]
    reasons = {**source.reasons, "plans_transferred_from": (
        f"{source_name} (dataset {source.dataset_name}): spacing, axis order, normalization and networks as "
        "planned there, so its checkpoints fit (autoseg train --pretrained)"
        + (f"; channels renamed {', '.join(renamed)}, normalized as the source's" if renamed else ""))}
    # instance segmentation is the target's own choice (plan_workspace decides it from its instance maps)
    return replace(source, instances=None, dataset_name=fingerprint.dataset_name,
                   channel_names=tuple(fingerprint.channel_names),
                   labels={int(k): v for k, v in sorted(fingerprint.labels.items(), key=lambda kv: int(kv[0]))},
                   configurations=configurations, not_planned=not_planned, default_configuration=default,
                   reasons=reasons, regions=tuple(fingerprint.regions))
