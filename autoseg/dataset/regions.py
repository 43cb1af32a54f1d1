"""Region-based labels, in nnU-Net v2's dataset.json format: structures that overlap, each a set of label ids.

BraTS scores whole tumour, tumour core and enhancing tumour, each the union of some label ids of the
files, so one structure contains the next. dataset.json says so by mapping a name to a list of ids,
and `regions_class_order` names the id written for each region, in the same order:

    "labels": {"background": 0, "whole_tumour": [1, 2, 3], "tumour_core": [2, 3], "enhancing": 3},
    "regions_class_order": [1, 2, 3]

The network then has one sigmoid output per region (training/loss.py: Dice + binary cross-entropy per
region), and a label map is written region by region in that order, each voxel over 0.5 taking the
region's id, so later (inner) regions overwrite earlier ones. Reading a label map back as regions
(`region_mask`) recovers each region when the order puts every region before the regions it contains.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from autoseg.dataset import IGNORE_LABEL_NAME
from autoseg.errors import AutosegError


class RegionError(AutosegError):
    """Region definitions that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class Region:
    """One structure trained as its own sigmoid output: the union of `labels` (ids in the label files), written
    into predicted label maps as `written_as`."""

    name: str
    labels: tuple[int, ...]
    written_as: int

    def to_json(self) -> dict:
        return {"name": self.name, "labels": list(self.labels), "written_as": self.written_as}

    @classmethod
    def from_json(cls, data: Any, source: str) -> "Region":
        try:
            return cls(str(data["name"]), tuple(int(v) for v in data["labels"]), int(data["written_as"]))
        except (KeyError, TypeError, ValueError):
            raise RegionError(f"{source}: a region must be {{\"name\": ..., \"labels\": [ids], \"written_as\": id}}, "
                              f"got {data!r}") from None


def has_regions(raw_labels: Mapping[str, Any]) -> bool:
    """nnU-Net v2's rule: region-based as soon as one label maps to a list of more than one id."""
    return any(isinstance(v, (list, tuple)) and len(v) > 1 for v in raw_labels.values())


def parse_regions(meta_path: Path | str, raw_labels: Mapping[str, Any], class_order: Any
                  ) -> tuple[dict[int, str], tuple[Region, ...]]:
    """dataset.json's nnU-Net v2 `labels` {name: id or [ids]} with `regions_class_order` -> (the ids of the label
    files, each with its own name or "label_<id>", the regions in dataset.json's order). Background (0) and
    `ignore` are no region; a region may contain neither."""
    if class_order is None:
        raise RegionError(f"{meta_path}: labels map names to lists of ids (regions), so dataset.json needs "
                          "'regions_class_order': the id written for each region, in the order of 'labels'")
    regions: list[tuple[str, tuple[int, ...]]] = []
    plain: dict[int, str] = {}
    ids: set[int] = set()
    for name, value in raw_labels.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        if not values or not all(_is_id(v) for v in values):
            raise RegionError(f"{meta_path}: label '{name}' must map to a label id (a whole number >= 0) or a "
                              f"non-empty list of them, got {value!r}")
        members = tuple(int(v) for v in values)
        if len(members) == 1 and not isinstance(value, (list, tuple)):
            plain[members[0]] = str(name)
        if name == IGNORE_LABEL_NAME:
            if isinstance(value, (list, tuple)):
                raise RegionError(f"{meta_path}: the label 'ignore' must be a single id, not a list")
            continue
        ids.update(members)
        if set(members) == {0}:
            continue  # the background
        if 0 in members:
            raise RegionError(f"{meta_path}: region '{name}' {list(members)} contains the background (0); a region "
                              "lists structure ids only")
        regions.append((str(name), members))
    if not isinstance(class_order, list) or any(isinstance(v, bool) or not isinstance(v, int) for v in class_order):
        raise RegionError(f"{meta_path}: 'regions_class_order' must be a list of label ids, got {class_order!r}")
    if len(class_order) != len(regions):
        raise RegionError(f"{meta_path}: 'regions_class_order' has {len(class_order)} entries for {len(regions)} "
                          f"regions ({', '.join(n for n, _ in regions)}); give one id per region, in that order")
    if len(set(class_order)) != len(class_order) or any(v <= 0 for v in class_order):
        raise RegionError(f"{meta_path}: 'regions_class_order' {class_order} must hold distinct ids above 0 (0 is "
                          "the background)")
    unknown = [v for v in class_order if v not in ids]
    if unknown:
        raise RegionError(f"{meta_path}: 'regions_class_order' writes id(s) {unknown} that no label uses; write "
                          f"ids of the label files ({sorted(ids - {0})})")
    if 0 not in plain:
        raise RegionError(f"{meta_path}: 'labels' must declare the background as 0")
    ignore = next((k for k, n in plain.items() if n == IGNORE_LABEL_NAME), None)
    if ignore is not None and (ignore in ids or ignore in class_order):
        raise RegionError(f"{meta_path}: the 'ignore' id {ignore} marks unannotated voxels; no region may contain "
                          "it and regions_class_order may not write it")
    built = tuple(Region(name, members, int(k)) for (name, members), k in zip(regions, class_order))
    # ids of the label files keep their own name where dataset.json gives one, else "label_<id>": a region's
    # name belongs to the region (Plans.output_labels), not to the id it is written as
    names = {k: plain.get(k) or f"label_{k}" for k in sorted(ids)}
    if ignore is not None:
        names[ignore] = IGNORE_LABEL_NAME
    return names, built


def _is_id(value: Any) -> bool:
    """A label id as dataset.json may give it: a whole number >= 0, or its digits as text (nnU-Net takes both)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value >= 0
    return isinstance(value, str) and value.strip().isdigit()


def region_mask(label_map: np.ndarray, region: Region) -> np.ndarray:
    """Where `label_map` (ids of the label files, or a predicted map) lies inside `region`."""
    return ids_mask(label_map, region.labels)


def ids_mask(label_map: np.ndarray, ids: Sequence[int]) -> np.ndarray:
    """Where `label_map` holds one of `ids`: a label (one id) or a region (the ids it unites)."""
    ids = tuple(int(i) for i in ids)
    if len(ids) == 1:
        return np.asarray(label_map) == ids[0]
    return np.isin(label_map, ids)


def label_map_from_regions(probabilities: np.ndarray, regions: Sequence[Region], threshold: float = 0.5,
                           dtype: Any = np.uint8) -> np.ndarray:
    """(R, *spatial) region probabilities -> label map: region by region in order, voxels over `threshold` take the
    region's id (later regions overwrite earlier ones), the rest 0."""
    if len(probabilities) != len(regions):
        raise ValueError(f"{len(probabilities)} probability maps for {len(regions)} regions")
    labels = np.zeros(probabilities.shape[1:], dtype=dtype)
    for p, region in zip(probabilities, regions):
        labels[p > threshold] = region.written_as
    return labels


def order_problems(regions: Sequence[Region]) -> list[str]:
    """Why a label map written from `regions` in their order would not give each region back when read as
    regions (`region_mask`): a region written after one it contains overwrites it, and a region written as
    an id outside its own labels is not found in the map again."""
    problems = [f"'{r.name}' is written as {r.written_as}, which is not one of its labels {list(r.labels)}"
                for r in regions if r.written_as not in r.labels]
    for i, earlier in enumerate(regions):
        for later in regions[i + 1:]:
            if set(later.labels) > set(earlier.labels):
                problems.append(f"'{later.name}' contains '{earlier.name}' but is written after it, so it "
                                "overwrites it")
    return problems
