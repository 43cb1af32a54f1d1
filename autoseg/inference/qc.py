"""Quality control of a batch by eye: an overlay PNG per case and one offline `report.html`.

The overlay shows the segmentation over the image on three orthogonal slices through the centre of
the segmented structures, the volume turned to the nearest standard patient orientation (axial,
coronal, sagittal, head up, radiological left-right) with each voxel drawn at its physical size.
The report is one HTML file with no outside resources: a sortable table of `volumes.csv` with the
flagged rows highlighted, failed inputs, and every case's overlay linked from `qc/`.
"""

from __future__ import annotations

import csv
import html
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from autoseg import workspace
from autoseg.atomic import atomic_path
from autoseg.dataset.image_io import Geometry
from autoseg.inference.volumes import read_volume_rows, unescape_cell

log = logging.getLogger(__name__)

OVERLAY_ALPHA = 0.45
MAX_LEGEND_ENTRIES = 24
_INTENSITY_SAMPLE = 2_000_000  # voxels looked at to choose the grey-value window


@dataclass(frozen=True)
class _Panel:
    title: str
    image: np.ndarray  # (rows, cols) grey or (rows, cols, 3) colour in 0..1
    labels: np.ndarray  # (rows, cols)
    aspect: float  # height of a pixel / its width, in mm
    origin: str  # "upper": row 0 on top; "lower": row 0 at the bottom


def write_overlay(image: np.ndarray, segmentation: np.ndarray, geometry: Geometry, labels: dict[int, str],
                  path: Path, instances: np.ndarray | None = None) -> None:
    """Write `path` (PNG): `segmentation` (Z, Y, X) over `image` (C, Z, Y, X) on the same grid, with each object's
    outline where an instance map is given."""
    figure = overlay_figure(image, segmentation, geometry, labels, title=Path(path).name.removesuffix(".png"),
                            instances=instances)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)


def overlay_figure(image: np.ndarray, segmentation: np.ndarray, geometry: Geometry, labels: dict[int, str],
                   title: str = "", instances: np.ndarray | None = None) -> Figure:
    """The overlay as a matplotlib Figure (no pyplot state); its legend names the labels shown.

    Channel 0 is shown in grey (a colour picture in colour); 2D images as one panel. `instances` (an
    instance map on the same grid) adds each object's outline in white, so merged objects show.
    """
    image = np.asarray(image)
    segmentation = np.asarray(segmentation)
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or image.shape[1:] != segmentation.shape or segmentation.ndim != 3:
        raise ValueError(f"image {image.shape} and segmentation {segmentation.shape} are not (C, Z, Y, X) "
                         "and (Z, Y, X) on the same grid")
    present = _labels_present(segmentation)
    colours = _label_colours(labels, present)
    colour_picture = geometry.is_2d and image.shape[0] == 3 and image.dtype.kind in "ui"
    if geometry.is_2d:
        shown = _to_colour(image[:, 0]) if colour_picture else _window(image[0, 0])(image[0, 0])
        panels = [_Panel("", shown, segmentation[0], geometry.spacing[1] / geometry.spacing[2], "upper")]
    else:
        panels = _orthogonal_panels(image[0], segmentation, geometry)
    outlines = None
    if instances is not None:
        instances = np.asarray(instances)
        if instances.shape != segmentation.shape:
            raise ValueError(f"instance map {instances.shape} and segmentation {segmentation.shape} differ in shape")
        # the same slices as the label panels: the instance map's foreground is the segmentation's
        outlines = ([instances[0]] if geometry.is_2d else
                    [p.labels for p in _orthogonal_panels(image[0], instances, geometry)])

    # Panels of equal height, each as wide as its slice is in mm.
    ratios = [float(np.clip(p.labels.shape[1] / (p.labels.shape[0] * p.aspect), 0.2, 5.0)) for p in panels]
    figure = Figure(figsize=(float(np.clip(4.6 * sum(ratios), 6.0, 16.0)), 5.6))
    axes = figure.subplots(1, len(panels), squeeze=False, gridspec_kw={"width_ratios": ratios})[0]
    visible = set()
    for i, (ax, panel) in enumerate(zip(axes, panels)):
        ax.imshow(panel.image, cmap=None if panel.image.ndim == 3 else "gray", vmin=0.0, vmax=1.0,
                  aspect=panel.aspect, origin=panel.origin, interpolation="nearest")
        ax.imshow(_overlay_rgba(panel.labels, colours), aspect=panel.aspect, origin=panel.origin,
                  interpolation="nearest")
        if outlines is not None:
            ax.imshow(_outline_rgba(outlines[i]), aspect=panel.aspect, origin=panel.origin, interpolation="nearest")
        visible |= set(np.unique(panel.labels).tolist()) - {0}
        ax.set_title(panel.title, fontsize="medium")
        ax.set_axis_off()

    entries = [k for k in colours if k in visible][:MAX_LEGEND_ENTRIES]
    handles = [Patch(facecolor=colours[k], edgecolor="black", label=_label_name(k, labels)) for k in entries]
    named = [k for k in labels if int(k) > 0]
    summary = f"{len(present & {int(k) for k in named})} of {len(named)} labels present"
    if len(visible) > len(entries):
        summary += f"; {len(visible) - len(entries)} more on these slices not listed"
    if image.shape[0] > 1 and not colour_picture:
        summary += f"; channel 0 of {image.shape[0]} shown"
    if instances is not None:
        summary += f"; {int(np.count_nonzero(np.unique(instances)))} objects outlined"
    figure.suptitle(f"{title}  ({summary})" if title else summary, fontsize="medium")
    if handles:
        figure.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize="small",
                      frameon=False)
    figure.tight_layout(rect=(0, 0.04 + 0.035 * ((len(handles) + 5) // 6), 1, 0.95))
    return figure


def _orthogonal_panels(volume: np.ndarray, segmentation: np.ndarray, geometry: Geometry) -> list[_Panel]:
    """Axial, coronal and sagittal slices through the foreground's centre of mass (the volume's centre if empty)."""
    order, flips = _nearest_lps(geometry.direction)
    volume = _reorient(volume, order, flips)
    segmentation = _reorient(segmentation, order, flips)
    spacing = [geometry.spacing[a] for a in order]
    centre = _centre(segmentation)
    window = _window(volume)

    def title(view: str, new_axis: int) -> str:
        axis, index = order[new_axis], centre[new_axis]
        original = segmentation.shape[new_axis] - 1 - index if flips[new_axis] else index
        return f"{view}: array {'zyx'[axis]} = {original}"

    z, y, x = centre
    sz, sy, sx = spacing
    return [_Panel(title("axial", 0), window(volume[z]), segmentation[z], sy / sx, "upper"),
            _Panel(title("coronal", 1), window(volume[:, y]), segmentation[:, y], sz / sx, "lower"),
            _Panel(title("sagittal", 2), window(volume[:, :, x]), segmentation[:, :, x], sz / sy, "lower")]


def _nearest_lps(direction: tuple[float, ...]) -> tuple[list[int], list[bool]]:
    """Array axes ordered as world (z, y, x), and whether each runs backwards (towards R, A or I).

    ITK's world frame is LPS; after this, row-major slices show the patient as viewers do. An
    oblique grid goes to its nearest world axes; a grid with no clear nearest axes stays as it is.
    """
    matrix = np.asarray(direction, dtype=float).reshape(3, 3)  # column j: world direction of index axis j (x, y, z)
    world_axis, sign = {}, {}
    for array_axis in range(3):
        column = matrix[:, 2 - array_axis]
        w = int(np.argmax(np.abs(column)))
        world_axis[array_axis], sign[array_axis] = w, column[w] < 0
    if len(set(world_axis.values())) < 3:
        return [0, 1, 2], [False, False, False]
    order = sorted(range(3), key=lambda a: 2 - world_axis[a])  # new axis n holds world axis 2 - n
    return order, [sign[a] for a in order]


def _reorient(array: np.ndarray, order: list[int], flips: list[bool]) -> np.ndarray:
    array = np.transpose(array, order)
    return array[tuple(slice(None, None, -1) if f else slice(None) for f in flips)]


def _centre(segmentation: np.ndarray) -> tuple[int, ...]:
    foreground = segmentation > 0
    total = np.count_nonzero(foreground)
    if total == 0:
        return tuple(n // 2 for n in segmentation.shape)
    centre = []
    for axis, n in enumerate(segmentation.shape):
        others = tuple(a for a in range(segmentation.ndim) if a != axis)
        profile = foreground.sum(axis=others)  # projections: no index grids the size of the volume
        centre.append(int(np.clip(round(float(np.dot(np.arange(n), profile)) / total), 0, n - 1)))
    return tuple(centre)


def _window(volume: np.ndarray):
    """Grey values to 0..1 between the 0.5th and 99.5th percentile of (a sample of) the volume."""
    step = max(1, round((volume.size / _INTENSITY_SAMPLE) ** (1 / volume.ndim)))
    sample = np.asarray(volume[(slice(None, None, step),) * volume.ndim], dtype=np.float64).ravel()
    sample = sample[np.isfinite(sample)]
    low, high = np.percentile(sample, (0.5, 99.5)) if sample.size else (0.0, 1.0)
    if high <= low:
        high = low + 1.0

    def scale(values: np.ndarray) -> np.ndarray:
        return np.clip((np.asarray(values, dtype=np.float32) - low) / (high - low), 0.0, 1.0)

    return scale


def _to_colour(channels: np.ndarray) -> np.ndarray:
    """(3, rows, cols) integer RGB -> (rows, cols, 3) in 0..1."""
    top = np.iinfo(channels.dtype).max if channels.dtype.kind == "u" else max(1, int(channels.max()))
    return np.clip(np.moveaxis(channels, 0, -1).astype(np.float32) / float(top), 0.0, 1.0)


def _labels_present(segmentation: np.ndarray) -> set[int]:
    """Label ids > 0 in the segmentation; counted slab by slab (np.unique would sort the whole volume)."""
    if segmentation.dtype.kind not in "ui" or segmentation.size == 0 or segmentation.min() < 0:
        return set(np.unique(segmentation).tolist()) - {0}
    counts = np.zeros(int(segmentation.max()) + 1, dtype=np.int64)
    step = max(1, 1_000_000 // max(1, segmentation[0].size))
    for start in range(0, segmentation.shape[0], step):
        counts += np.bincount(segmentation[start:start + step].ravel(), minlength=counts.size)
    return set(np.flatnonzero(counts).tolist()) - {0}


def _label_colours(labels: dict[int, str], present: set[int]) -> dict[int, tuple]:
    """A fixed colour per label id (the same structure has the same colour in every case)."""
    ids = sorted({int(k) for k in labels if int(k) > 0} | present)
    n = len(ids)
    cmap = colormaps["tab10" if n <= 10 else "tab20" if n <= 20 else "turbo"]
    return {k: tuple(cmap(i) if n <= 20 else cmap(i / max(n - 1, 1)))[:3] for i, k in enumerate(ids)}


def _label_name(label: int, labels: dict[int, str]) -> str:
    name = labels.get(label, labels.get(str(label)))
    return f"{label} {name}" if name else f"label {label}"


def _outline_rgba(instances: np.ndarray) -> np.ndarray:
    """White, opaque where an object meets another object or the background (its inner rim)."""
    from autoseg.preprocessing.instance_targets import inner_boundaries

    rgba = np.zeros((*instances.shape, 4), dtype=np.float32)
    rgba[inner_boundaries(instances)] = (1.0, 1.0, 1.0, 0.9)
    return rgba


def _overlay_rgba(segmentation: np.ndarray, colours: dict[int, tuple]) -> np.ndarray:
    rgba = np.zeros((*segmentation.shape, 4), dtype=np.float32)
    for label in set(np.unique(segmentation).tolist()) - {0}:
        rgba[segmentation == label] = (*colours[label], OVERLAY_ALPHA)
    return rgba


# Columns of the report's table: (volumes.csv column, heading); a size column appears only when filled.
_REPORT_COLUMNS = (("case", "case"), ("label", "label"), ("name", "structure"), ("voxels", "voxels"),
                   ("volume_ml", "volume (mL)"), ("area_mm2", "area (mm²)"), ("components", "components"),
                   ("bbox_mm", "bounding box (mm)"), ("uncertainty", "uncertainty"), ("flagged", "flagged"))

_SORT_SCRIPT = """
document.querySelectorAll("table.sortable th").forEach(function (th, column) {
  th.addEventListener("click", function () {
    var body = th.closest("table").tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var ascending = th.getAttribute("aria-sort") !== "ascending";
    th.closest("tr").querySelectorAll("th").forEach(function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
    var text = function (row) { return row.cells[column].textContent.trim(); };
    var numeric = rows.every(function (r) { return text(r) === "" || !isNaN(Number(text(r))); });
    rows.sort(function (a, b) {
      var x = text(a), y = text(b);
      if (x === "" || y === "") { return (x === "") - (y === ""); }  // empty cells last either way
      var order = numeric ? Number(x) - Number(y) : x.localeCompare(y, undefined, {numeric: true});
      return ascending ? order : -order;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""

_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
td.text { text-align: left; }
th { background: #eee; cursor: pointer; user-select: none; position: sticky; top: 0; }
th[aria-sort=ascending]::after { content: " \\25B2"; }
th[aria-sort=descending]::after { content: " \\25BC"; }
tr.flagged td { background: #fdd; }
.case { margin-top: 2em; }
.case.flagged h3::after { content: "  flagged for review"; color: #b00; font-size: 0.8em; }
.case img { max-width: 100%; border: 1px solid #ccc; }
.failed { color: #b00; }
"""


def write_html_report(output_dir: Path, volumes_csv: Path, overlays_dir: Path, path: Path) -> None:
    """Write `path`: one HTML file viewable offline, linking the overlays in `overlays_dir` relatively.

    Keep it beside the folder it links (the batch's output folder) when moving the results. The
    failures listed come from `output_dir`'s prediction_summary*.json files.
    """
    output_dir, volumes_csv, overlays_dir, path = map(Path, (output_dir, volumes_csv, overlays_dir, path))
    rows = []
    if volumes_csv.is_file():
        rows = read_volume_rows(volumes_csv)  # text cells unescaped: real case ids and names
        # the file keeps the order cases finished
        rows.sort(key=lambda r: (r["case"], int(r["label"]) if r["label"].isdigit() else 0))
    cases = list(dict.fromkeys(r["case"] for r in rows))
    overlays = {p.name.removesuffix(".png"): p for p in sorted(overlays_dir.glob("*.png"))} \
        if overlays_dir.is_dir() else {}
    cases += sorted(set(overlays) - set(cases))
    flagged_cases = {r["case"] for r in rows if r.get("flagged") == "yes"}
    columns = [(key, heading) for key, heading in _REPORT_COLUMNS
               if key in ("case", "label", "name") or any(r.get(key) for r in rows)]
    models = sorted({r["model"] for r in rows if r.get("model")})
    failed, warned = _summary_entries(output_dir)
    link_base = os.path.relpath(overlays_dir, path.parent)

    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>autoseg report: {_e(output_dir.name)}</title>", f"<style>{_STYLE}</style>", "</head>", "<body>",
           f"<h1>Segmentation report: {_e(str(output_dir))}</h1>",
           (f"<p>{len(cases)} case(s), {len(rows)} structure row(s) from {_e(volumes_csv.name)}; "
            f"model: {_e(', '.join(models) or 'unknown')}.</p>")]
    if flagged_cases:
        links = ", ".join(f'<a href="#{_anchor(c)}">{_e(c)}</a>' for c in sorted(flagged_cases))
        out.append(f'<p class="failed">Flagged for review ({len(flagged_cases)}): {links}</p>')
    if failed:
        out.append(f'<h2 class="failed">Failed inputs ({len(failed)})</h2><ul>')
        out += [f"<li>{_e(key)}: {_e(message)}</li>" for key, message in failed]
        out.append("</ul>")
    if warned:
        out.append(f'<h2 class="failed">Predicted with a warning ({len(warned)})</h2><ul>')
        out += [f'<li><a href="#{_anchor(key)}">{_e(key)}</a>: {_e(message)}</li>' for key, message in warned]
        out.append("</ul>")
    out.append("<h2>Structures</h2>")
    out.append("<p>Click a column heading to sort. Volumes, components and boxes are defined in volumes.csv "
               "(see docs/reports.md).</p>")
    out.append('<table class="sortable"><thead><tr>'
               + "".join(f"<th>{_e(heading)}</th>" for _, heading in columns) + "</tr></thead><tbody>")
    for row in rows:
        cells = []
        for key, _ in columns:
            value = row.get(key, "")
            if key == "case":
                cells.append(f'<td class="text" title="{_e(row.get("input_files", ""))}">'
                             f'<a href="#{_anchor(value)}">{_e(value)}</a></td>')
            else:
                cells.append(f'<td class="text">{_e(value)}</td>' if key in ("name", "bbox_mm", "flagged")
                             else f"<td>{_e(value)}</td>")
        css = ' class="flagged"' if row.get("flagged") == "yes" else ""
        out.append(f"<tr{css}>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    out += _objects_section(output_dir / "objects.csv")
    out.append("<h2>Overlays</h2>")
    for case in cases:
        css = "case flagged" if case in flagged_cases else "case"
        out.append(f'<div class="{css}" id="{_anchor(case)}"><h3>{_e(case)}</h3>')
        if case in overlays:
            src = quote(Path(link_base, overlays[case].name).as_posix())
            out.append(f'<img src="{_e(src)}" alt="overlay of {_e(case)}" loading="lazy">')
        else:
            out.append("<p>no overlay written</p>")
        out.append("</div>")
    out += [f"<script>{_SORT_SCRIPT}</script>", "</body>", "</html>"]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(out) + "\n", encoding="utf-8")


def _objects_section(objects_csv: Path) -> list[str]:
    """Object counts per case and label from the instance segmentation's objects.csv (nothing without one)."""
    if not objects_csv.is_file():
        return []
    with open(objects_csv, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    size_key = "volume_ml" if rows and "volume_ml" in rows[0] else "area_mm2"
    groups: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        groups.setdefault((unescape_cell(row["case"]), unescape_cell(row["label_name"])), []).append(
            float(row[size_key]))
    heading = "volume (mL)" if size_key == "volume_ml" else "area (mm²)"
    out = ["<h2>Objects</h2>",
           f"<p>{len(rows)} object(s) in {len({c for c, _ in groups})} case(s), one row each in "
           f"{_e(objects_csv.name)} (id, size, centroid); outlined in white on the overlays.</p>",
           '<table class="sortable"><thead><tr><th>case</th><th>structure</th><th>objects</th>'
           f"<th>median {heading}</th><th>total {heading}</th></tr></thead><tbody>"]
    for (case, name), sizes in sorted(groups.items()):
        out.append(f'<tr><td class="text"><a href="#{_anchor(case)}">{_e(case)}</a></td><td class="text">{_e(name)}'
                   f"</td><td>{len(sizes)}</td><td>{float(np.median(sizes)):.4g}</td><td>{sum(sizes):.4g}</td></tr>")
    out.append("</tbody></table>")
    return out


def _summary_entries(output_dir: Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(failed inputs, cases with a warning) as (key, message) from every run record in `output_dir`; a batch
    continued across versions also has records of the earlier name (`workspace.prediction_summaries`)."""
    failed, warned = [], []
    for summary in workspace.prediction_summaries(output_dir):
        try:
            content = json.loads(summary.read_text(encoding="utf-8"))
            failed += [(str(e["input"]), str(e["error"])) for e in content.get("failed", [])]
            warned += [(str(e["case"]), str(e["warning"])) for e in content.get("warnings", [])]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("%s: not listed in the report (%s)", summary, exc)
    return failed, warned


def _e(text: str) -> str:
    return html.escape(str(text), quote=True)


def _anchor(case: str) -> str:
    return _e("case-" + quote(case, safe=""))

