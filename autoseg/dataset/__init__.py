"""Raw datasets: dataset.json layouts, case discovery, image I/O with geometry, integrity checks."""

from __future__ import annotations

from typing import Mapping

IGNORE_LABEL_NAME = "ignore"  # nnU-Net v2's name for voxels nobody annotated (sparse or partial labels)


def ignore_label_id(labels: Mapping[int | str, str]) -> int | None:
    """The id of the label named "ignore" in {id: name}, or None: read by dataset.json checks, plans and scores."""
    return next((int(k) for k, name in labels.items() if name == IGNORE_LABEL_NAME), None)
