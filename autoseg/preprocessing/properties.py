"""What preprocessing did to one case, so export can undo it: `<case>.json` beside its arrays.

Prediction keeps these in memory; training reads them from the preprocessed folder (store.py) for
the validation export and for foreground oversampling (`class_locations`).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from autoseg.dataset.image_io import Geometry

# How `class_locations` are written: each label's (N, 3) voxel coordinates as little-endian int32 rows, base64 (a
# JSON list of lists took ~40% of the time it took to write a small case's arrays; older files hold such lists)
LOCATIONS_ENCODING = "int32-le-zyx-base64"


@dataclass(frozen=True)
class CaseProperties:
    """Crop box, shapes and spacings of one preprocessed case, and the plans it was made with."""

    original_geometry: Geometry  # the input file's grid: where the label map is written back
    nonzero_bbox: tuple[tuple[int, int], ...]  # [lo, hi) per file axis of the region kept by cropping
    shape_after_crop: tuple[int, ...]  # file axis order
    shape_after_resampling: tuple[int, ...]  # network axis order (after transpose_forward)
    spacing: tuple[float, ...]  # network axis order, after resampling
    preprocessing_key: str  # preprocess.preprocessing_key of the plans it was made with
    # label id (as text) -> sampled voxel coordinates (N, 3) in network space; only for cases with a label
    class_locations: dict[str, Any] = field(default_factory=dict, compare=False)
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
            data["class_locations_encoding"] = LOCATIONS_ENCODING
            data["class_locations"] = {
                k: base64.b64encode(np.ascontiguousarray(v, dtype="<i4").reshape(-1, 3).tobytes()).decode("ascii")
                for k, v in self.class_locations.items()}
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
                   class_locations=_read_locations(data), case_id=data.get("case_id"))


def _read_locations(data: dict[str, Any]) -> dict[str, np.ndarray]:
    raw = data.get("class_locations", {})
    encoding = data.get("class_locations_encoding")
    if encoding is None:  # lists of [z, y, x], as written before
        return {str(k): np.asarray(v, dtype=np.int64).reshape(-1, 3) for k, v in raw.items()}
    if encoding != LOCATIONS_ENCODING:
        raise ValueError(f"class_locations_encoding {encoding!r} is not {LOCATIONS_ENCODING!r}")
    return {str(k): np.frombuffer(base64.b64decode(v), dtype="<i4").reshape(-1, 3).astype(np.int64)
            for k, v in raw.items()}
