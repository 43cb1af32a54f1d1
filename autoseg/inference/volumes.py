"""`volumes.csv`: per case and label, how much was segmented, in how many pieces, and where.

`structure_rows` measures one segmentation; `VolumeTable` keeps the batch's table on disk, appending
each case's rows as it finishes, so an interrupted batch leaves a valid table of the cases it finished
and a continued one completes it. The columns and units are described in docs/reports.md.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from scipy import ndimage

from autoseg.atomic import atomic_path
from autoseg.dataset.image_io import Geometry
from autoseg.dataset.regions import ids_mask
from autoseg.errors import AutosegError

try:  # parallel parts of one batch (--num-parts) write the same table from several processes
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: threads are still serialized, processes are not
    fcntl = None

log = logging.getLogger(__name__)

VOLUMES_FORMAT_VERSION = 1
COLUMNS = ("case", "label", "name", "voxels", "volume_ml", "area_mm2", "components", "bbox_mm", "bbox_world_mm",
           "input_files", "model", "uncertainty", "flagged", "format_version")
INPUT_FILE_SEPARATOR = "; "
# Free-text columns (case ids and file names come from users): escaped so a spreadsheet shows them, never runs them.
TEXT_COLUMNS = ("case", "name", "input_files", "model")
# A cell starting with one of these is a formula to a spreadsheet (OWASP, CSV injection); "'" marks an escaped cell.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")


class VolumeTableError(AutosegError):
    """An existing volumes.csv that this version cannot continue; the message names the file and the fix."""


def escape_cell(text: str) -> str:
    """`text` behind a `'` when a spreadsheet would run it as a formula (or it starts with `'`, to stay reversible)."""
    return "'" + text if text.startswith(_FORMULA_STARTS) else text


def unescape_cell(text: str) -> str:
    """The text `escape_cell` was given: what a text column of volumes.csv holds, e.g. the real case id."""
    return text[1:] if text.startswith("'") else text


def read_volume_rows(path: Path) -> list[dict[str, str]]:
    """volumes.csv's rows with their text columns unescaped; for readers other than `VolumeTable` (the HTML report)."""
    with open(path, newline="", encoding="utf-8") as f:
        return [_unescaped(row) for row in csv.DictReader(f)]


def _unescaped(row: dict[str, str]) -> dict[str, str]:
    return {**row, **{k: unescape_cell(row[k]) for k in TEXT_COLUMNS if isinstance(row.get(k), str)}}


def structure_rows(segmentation: np.ndarray, geometry: Geometry, labels: dict[int, str],
                   members: Mapping[int, Sequence[int]] | None = None) -> list[dict]:
    """One row per label id > 0 of `labels` (absent labels included, with 0 voxels), in label order.

    `members` maps a label id to the ids its structure unites (region-based plans, `Plans.scored_structures`:
    the whole tumour is every voxel written as one of its labels); a label without an entry is itself.

    A 3D image gets `volume_ml`; a 2D image (`geometry.is_2d`) gets `area_mm2` instead, since its
    pseudo-spacing is no slice thickness. Components are 26-connected in 3D (8-connected in 2D).
    `bbox_mm` runs along the array axes from the outer corner of the first voxel, voxel edges
    included: (z0, y0, x0, z1, y1, x1), or (y0, x0, y1, x1) for a 2D image. `bbox_world_mm` holds the
    smallest box along the world axes (ITK/LPS, like `geometry.origin`) around the centres of the
    corner voxels of that box: (x0, y0, z0, x1, y1, z1), or (x0, y0, x1, y1) in 2D.
    """
    segmentation = np.asarray(segmentation)
    if segmentation.ndim != 3 or tuple(segmentation.shape) != tuple(geometry.shape):
        raise ValueError(f"segmentation of shape {segmentation.shape} does not match the geometry's {geometry.shape}")
    wanted = sorted(int(k) for k in labels if int(k) > 0)
    spacing = np.asarray(geometry.spacing, dtype=float)
    plane = geometry.is_2d
    # One pass for every label's box; counting and component labelling then only touch each box.
    boxes = ndimage.find_objects(segmentation, max_label=max(wanted)) if wanted and segmentation.size else []
    structure = ndimage.generate_binary_structure(3, 3)
    rows = []
    for label in wanted:
        ids = tuple(int(i) for i in (members or {}).get(label, (label,)))
        box = _union_box([boxes[i - 1] for i in ids if 0 < i <= len(boxes) and boxes[i - 1] is not None])
        voxels, components, first, last = 0, 0, None, None
        if box is not None:
            mask = ids_mask(segmentation[box], ids)
            voxels = int(np.count_nonzero(mask))
            components = int(ndimage.label(mask, structure=structure)[1])
            first = np.array([s.start for s in box])
            last = np.array([s.stop - 1 for s in box])
        if plane:
            size = {"volume_ml": None, "area_mm2": voxels * float(np.prod(spacing[1:]))}
        else:
            size = {"volume_ml": voxels * float(np.prod(spacing)) / 1000.0, "area_mm2": None}
        rows.append({"label": label, "name": str(labels.get(label, labels.get(str(label), ""))), "voxels": voxels,
                     **size, "components": components,
                     "bbox_mm": _array_box(first, last, spacing, plane),
                     "bbox_world_mm": _world_box(first, last, geometry, plane)})
    return rows


def _union_box(boxes: Sequence[tuple[slice, ...]]) -> tuple[slice, ...] | None:
    """The smallest box around all of `boxes` (find_objects' slices); None when there are none."""
    if not boxes:
        return None
    return tuple(slice(min(b[a].start for b in boxes), max(b[a].stop for b in boxes)) for a in range(len(boxes[0])))


def _array_box(first: np.ndarray | None, last: np.ndarray | None, spacing: np.ndarray, plane: bool) -> tuple:
    if first is None:
        return ()
    low, high = first * spacing, (last + 1) * spacing
    if plane:
        low, high = low[1:], high[1:]
    return tuple(_round(v) for v in (*low, *high))


def _world_box(first: np.ndarray | None, last: np.ndarray | None, geometry: Geometry, plane: bool) -> tuple:
    """World (x, y, z) box around the centres of the 8 corner voxels of the index box."""
    if first is None:
        return ()
    direction = np.asarray(geometry.direction, dtype=float).reshape(3, 3)
    spacing_xyz = np.asarray(geometry.spacing[::-1], dtype=float)
    corners = np.array([[(last if (k >> axis) & 1 else first)[axis] for axis in range(3)] for k in range(8)])
    corners_xyz = corners[:, ::-1] * spacing_xyz
    if plane:
        corners_xyz[:, 2] = 0.0  # the pseudo-axis of a 2D image has no extent
    world = np.asarray(geometry.origin, dtype=float) + corners_xyz @ direction.T
    low, high = world.min(axis=0), world.max(axis=0)
    if plane:
        low, high = low[:2], high[:2]
    return tuple(_round(v) for v in (*low, *high))


def _round(value: float) -> float:
    return round(float(value), 4)


class VolumeTable:
    """`volumes.csv` of one batch; `add_case` may be called from several threads and processes.

    `add_case` appends the case's rows (after the header, when the file is new) in one write, so a
    batch writes each row once however many cases it has. Only a case the table already holds (one
    predicted again) makes it rewrite the table (temporary file + rename) without that case's old
    rows, so a batch continued later (a new VolumeTable on the same path) or run in parallel parts
    ends with one row per case and label. Rows stay in the order their cases were written. Processes
    are serialized with an advisory lock on a hidden `.volumes.csv.lock` beside the table (POSIX only).
    """

    def __init__(self, path: Path, model: str):
        self.path = Path(path)
        self.model = str(model)
        self._lock = threading.Lock()
        self._labels: dict[str, set[str]] = {}  # case -> label ids it has rows for, as the file was at `_seen`
        self._seen: tuple[int, ...] | None = None  # the file's (device, inode, size, mtime) when last read or written
        self._torn = False  # the file ends in an incomplete line (a write cut short, e.g. by a full disk)
        if self.path.is_file():
            with self._lock, self._process_lock():
                self._refresh()  # refuse an incompatible table now, not after the first case has been predicted

    def add_case(self, case_id: str, input_files: Sequence[Path], rows: list[dict],
                 uncertainty: dict[int, float] | None = None, flagged: set[int] | None = None) -> None:
        """Record (or replace) the rows of `case_id`; `uncertainty` and `flagged` are keyed by label id."""
        case_id = str(case_id)
        uncertainty = {int(k): v for k, v in (uncertainty or {}).items()}
        flagged_labels = None if flagged is None else {int(k) for k in flagged}
        new = [self._format_row(case_id, input_files, row, uncertainty, flagged_labels) for row in rows]
        with self._lock, self._process_lock():
            self._refresh()
            if case_id in self._labels or self._torn:
                kept = [row for row in self._read() if row["case"] != case_id]
                with atomic_path(self.path) as tmp:
                    tmp.write_text(_csv_text(kept + new, header=True), encoding="utf-8")
                self._torn = False
            else:
                _append(self.path, _csv_text(new, header=self._seen is None or self._seen[2] == 0))
            self._labels[case_id] = {str(row["label"]) for row in new}
            self._seen = _identity(self.path)

    def cases(self, labels: Iterable[int] | None = None) -> set[str]:
        """Case ids in the table; with `labels`, only those that have a row for every one of these label ids
        (a continued batch predicts the others again)."""
        with self._lock, self._process_lock():
            self._refresh()
            if labels is None:
                return set(self._labels)
            wanted = {str(int(label)) for label in labels}
            return {case for case, present in self._labels.items() if wanted <= present}

    def _refresh(self) -> None:
        """Bring `_labels` up to date; the file is read again only when something else changed it since."""
        seen = _identity(self.path)
        if seen is None:
            self._labels, self._seen, self._torn = {}, None, False
        elif seen != self._seen:  # first look, or another process wrote (parallel parts)
            self._labels = {}
            for row in self._read():
                self._labels.setdefault(row["case"], set()).add(row["label"])
            self._seen = seen

    def _format_row(self, case_id: str, input_files: Sequence[Path], row: dict, uncertainty: dict[int, float],
                    flagged: set[int] | None) -> dict:
        label = int(row["label"])
        score = uncertainty.get(label)
        return {"case": str(case_id), "label": label, "name": row.get("name", ""), "voxels": int(row["voxels"]),
                "volume_ml": _cell(row.get("volume_ml")), "area_mm2": _cell(row.get("area_mm2")),
                "components": int(row["components"]),
                "bbox_mm": " ".join(f"{v:.10g}" for v in row.get("bbox_mm") or ()),
                "bbox_world_mm": " ".join(f"{v:.10g}" for v in row.get("bbox_world_mm") or ()),
                "input_files": INPUT_FILE_SEPARATOR.join(str(f) for f in input_files), "model": self.model,
                "uncertainty": "" if score is None or not np.isfinite(score) else f"{float(score):.6g}",
                "flagged": "" if flagged is None else "yes" if label in flagged else "no",
                "format_version": VOLUMES_FORMAT_VERSION}

    def _read(self) -> list[dict]:
        """The table's rows; an incomplete last line is left out (and `_torn` set, so the next case rewrites)."""
        try:
            text = self.path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise VolumeTableError(f"{self.path}: cannot be read ({exc}); move it away to start a new table") from None
        complete = text.rfind("\n") + 1
        self._torn = complete < len(text)
        if self._torn:
            log.warning("%s: its last line is incomplete (a write was cut short); it is dropped", self.path)
        if not complete:
            return []
        try:
            reader = csv.DictReader(io.StringIO(text[:complete], newline=""))
            header = tuple(reader.fieldnames or ())
            rows = [_unescaped(row) for row in reader]
        except csv.Error as exc:
            raise VolumeTableError(f"{self.path}: cannot be read ({exc}); move it away to start a new table") from None
        versions = {r.get("format_version") for r in rows}
        if header != COLUMNS or versions - {str(VOLUMES_FORMAT_VERSION)}:
            raise VolumeTableError(
                f"{self.path}: not a volumes table of format {VOLUMES_FORMAT_VERSION} (columns {', '.join(header)}); "
                "move it away or choose another output folder to start a new table")
        return rows

    @contextmanager
    def _process_lock(self) -> Iterator[None]:
        if fcntl is None:
            yield
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(f".{self.path.name}.lock"), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def _csv_text(rows: list[dict], header: bool) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=COLUMNS, lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows({**row, **{k: escape_cell(str(row[k])) for k in TEXT_COLUMNS}} for row in rows)
    return text.getvalue()


def _append(path: Path, text: str) -> None:
    """Append in one write call, so a batch killed meanwhile leaves no half row (a full disk still may)."""
    data = memoryview(text.encode("utf-8"))
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        while data:
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)


def _identity(path: Path) -> tuple[int, ...] | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


def _cell(value: float | None) -> str:
    return "" if value is None else f"{float(value):.7g}"
