"""What preprocessing did to one case, so export can undo it: `<case>.json` beside its arrays.

Prediction keeps these in memory; training reads them from the preprocessed folder (store.py) for
the validation export and for foreground oversampling (`class_locations`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from autoseg.dataset.image_io import Geometry


@dataclass(frozen=True)
class CaseProperties:
    """Crop box, shapes and spacings of one preprocessed case, and the plans it was made with."""

    original_geometry: Geometry  # the input file's grid: where the label map is written back
    nonzero_bbox: tuple[tuple[int, int], ...]  # [lo, hi) per file axis of the region kept by cropping
    shape_after_crop: tuple[int, ...]  # file axis order
    shape_after_resampling: tuple[int, ...]  # network axis order (after transpose_forward)
    spacing: tuple[float, ...]  # network axis order, after resampling
    preprocessing_key: str  # preprocess.preprocessing_key of the plans it was made with
    # label id (as text) -> sampled voxel coordinates in network space; only for cases with a label
    class_locations: dict[str, list[list[int]]] = field(default_factory=dict, compare=False)
    case_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {} if self.case_id is None else {"case_id": self.case_id}
        data.update({
            "original_geometry": self.original_geometry.to_json(),
            "nonzero_bbox": [list(b) for b in self.nonzero_bbox],
            "shape_after_crop": list(self.shape_after_crop),
            "shape_after_resampling": list(self.shape_after_resampling),
            "spacing": list(self.spacing),
            "preprocessing_key": self.preprocessing_key,
        })
        if self.class_locations:
            data["class_locations"] = self.class_locations
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "CaseProperties":
        """From `to_json`'s form; raises KeyError/TypeError/ValueError on a malformed file (store.py names it)."""
        return cls(original_geometry=Geometry.from_json(data["original_geometry"]),
                   nonzero_bbox=tuple((int(lo), int(hi)) for lo, hi in data["nonzero_bbox"]),
                   shape_after_crop=tuple(int(s) for s in data["shape_after_crop"]),
                   shape_after_resampling=tuple(int(s) for s in data["shape_after_resampling"]),
                   spacing=tuple(float(s) for s in data["spacing"]),
                   preprocessing_key=str(data.get("preprocessing_key", "")),
                   class_locations=dict(data.get("class_locations", {})), case_id=data.get("case_id"))
