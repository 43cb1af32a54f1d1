"""QC overlays and report.html: what a reviewer sees for 2D and 3D cases, and a report that works offline."""

from __future__ import annotations

from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from matplotlib import colormaps
from PIL import Image

from autoseg.dataset.image_io import PSEUDO_SPACING_2D, Geometry
from autoseg.inference.qc import OVERLAY_ALPHA, overlay_figure, write_html_report, write_overlay
from autoseg.inference.volumes import VolumeTable, structure_rows

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
LABELS = {0: "background", 1: "liver", 2: "tumour"}


def small_3d_case() -> tuple[np.ndarray, np.ndarray, Geometry]:
    """Black image; liver and tumour in one corner of the volume (far from the volume's centre)."""
    image = np.zeros((1, 10, 24, 20), dtype=np.float32)
    image[0, 0, 0, 0] = 1.0  # so the grey window is not degenerate; the rest stays black
    seg = np.zeros((10, 24, 20), dtype=np.uint8)
    seg[1:4, 2:10, 2:9] = 1
    seg[2:4, 4:7, 4:7] = 2
    return image, seg, Geometry((3.0, 0.5, 0.7), (0.0, 0.0, 0.0), IDENTITY, seg.shape)


def png_pixels(path: Path) -> np.ndarray:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as picture:
        return np.asarray(picture.convert("RGB")).astype(int)


def count_colour(pixels: np.ndarray, rgb, tolerance: int = 3) -> int:
    return int(np.all(np.abs(pixels - np.asarray(rgb)) <= tolerance, axis=-1).sum())


def tab10(k: int) -> np.ndarray:
    return np.asarray(colormaps["tab10"](k)[:3]) * 255


def test_3d_overlay_png_shows_each_label_in_its_colour_with_a_legend(tmp_path):
    image, seg, geometry = small_3d_case()
    path = tmp_path / "qc" / "case_001.png"
    write_overlay(image, seg, geometry, LABELS, path)
    pixels = png_pixels(path)
    assert 300 <= pixels.shape[0] <= 2000 and 500 <= pixels.shape[1] <= 2500
    for k in (0, 1):  # labels 1 and 2: drawn over black at OVERLAY_ALPHA, and solid in the legend
        assert count_colour(pixels, tab10(k) * OVERLAY_ALPHA) > 100
        assert count_colour(pixels, tab10(k)) > 20
    assert not [p for p in path.parent.iterdir() if p.name != "case_001.png"]  # no temporary file left

    figure = overlay_figure(image, seg, geometry, LABELS)
    assert [t.get_text() for t in figure.legends[0].get_texts()] == ["1 liver", "2 tumour"]


def test_3d_overlay_slices_cross_the_structures_at_their_physical_aspect():
    image, seg, geometry = small_3d_case()
    axes = overlay_figure(image, seg, geometry, LABELS).axes
    assert len(axes) == 3
    for ax in axes:  # every view cuts through the segmentation, although it lies off the volume's centre
        overlay = np.asarray(ax.get_images()[1].get_array())
        assert overlay[..., 3].max() > 0
    # pixel height / width in mm: axial y/x, coronal z/x, sagittal z/y
    assert [ax.get_aspect() for ax in axes] == pytest.approx([0.5 / 0.7, 3.0 / 0.7, 3.0 / 0.5])


def panel_arrays(image, seg, geometry) -> list[np.ndarray]:
    return [np.asarray(ax.get_images()[k].get_array()) for ax in overlay_figure(image, seg, geometry, LABELS).axes
            for k in (0, 1)]


def test_views_show_the_patient_the_same_way_whatever_the_array_order():
    image, seg, geometry = small_3d_case()
    image = image + np.arange(20, dtype=np.float32)  # something that changes along x
    reference = panel_arrays(image, seg, geometry)
    (z, y, x), (sz, sy, sx) = seg.shape, geometry.spacing
    # the same physical scan stored with x running backwards (origin at the other end) ...
    flipped = Geometry(geometry.spacing, ((x - 1) * sx, 0.0, 0.0), (-1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0), seg.shape)
    for shown, expected in zip(panel_arrays(image[..., ::-1], seg[..., ::-1], flipped), reference):
        np.testing.assert_array_equal(shown, expected)
    # ... and with the array's first axis along world x (a sagittal acquisition)
    transposed = Geometry((sx, sy, sz), (0.0, 0.0, 0.0), (0, 0, 1.0, 0, 1.0, 0, 1.0, 0, 0), (x, y, z))
    for shown, expected in zip(panel_arrays(image.transpose(0, 3, 2, 1), seg.transpose(2, 1, 0), transposed),
                               reference):
        np.testing.assert_array_equal(shown, expected)


def test_empty_segmentation_still_gets_an_overlay(tmp_path):
    image, seg, geometry = small_3d_case()
    write_overlay(image, np.zeros_like(seg), geometry, LABELS, tmp_path / "empty.png")
    assert png_pixels(tmp_path / "empty.png").shape[0] > 100


def test_2d_grey_and_colour_pictures_get_one_panel(tmp_path):
    seg = np.zeros((1, 30, 40), dtype=np.uint8)
    seg[0, 5:20, 10:30] = 1
    geometry = Geometry((PSEUDO_SPACING_2D, 1.0, 1.0), (0.0, 0.0, 0.0), IDENTITY, seg.shape)

    grey = np.zeros((1, 1, 30, 40), dtype=np.float32)
    grey[0, 0, 0, 0] = 1.0
    write_overlay(grey, seg, geometry, {1: "cell"}, tmp_path / "grey.png")
    assert count_colour(png_pixels(tmp_path / "grey.png"), tab10(0) * OVERLAY_ALPHA) > 100
    assert len(overlay_figure(grey, seg, geometry, {1: "cell"}).axes) == 1

    colour = np.zeros((3, 1, 30, 40), dtype=np.uint8)
    colour[1] = 255  # a pure green picture: shown in colour, not as its red channel in grey
    write_overlay(colour, seg, geometry, {1: "cell"}, tmp_path / "colour.png")
    pixels = png_pixels(tmp_path / "colour.png")
    assert count_colour(pixels, (0, 255, 0)) > 100
    assert count_colour(pixels, tab10(0) * OVERLAY_ALPHA + np.array([0, 255, 0]) * (1 - OVERLAY_ALPHA)) > 100


class _Collector(HTMLParser):
    """Rows of the table, image sources and whether every opened element was closed."""

    VOID = frozenset({"meta", "img", "br", "link", "input", "hr"})

    def __init__(self):
        super().__init__()
        self.open: list[str] = []
        self.rows: list[tuple[str, list[str]]] = []
        self.images: list[str] = []
        self.ids: set[str] = set()
        self.links: list[str] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "tr" and self.open[-1:] == ["tbody"]:
            self.rows.append((attrs.get("class") or "", []))
        if tag == "td":
            self._cell = []
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "a":
            self.links.append(attrs["href"])
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        assert self.open and self.open[-1] == tag, f"</{tag}> closes <{self.open[-1:]}>"
        self.open.pop()
        if tag == "td":
            self.rows[-1][1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def test_report_lists_every_case_row_with_its_overlay_and_highlights_flagged_ones(tmp_path):
    image, seg, geometry = small_3d_case()
    out = tmp_path / "predictions"
    table = VolumeTable(out / "volumes.csv", model="workspace 3d_fullres folds 0-1")
    table.add_case("case_001", [Path("in/case_001_0000.nii.gz")], structure_rows(seg, geometry, LABELS),
                   uncertainty={1: 0.05, 2: 0.61}, flagged={2})
    table.add_case("case <2>", [Path("in/case <2>_0000.nii.gz")], structure_rows(seg * 0, geometry, LABELS),
                   uncertainty={1: 0.0, 2: 0.0}, flagged=set())
    write_overlay(image, seg, geometry, LABELS, out / "qc" / "case_001.png")
    (out / "prediction_summary.json").write_text('{"failed": [{"input": "in/broken.nii.gz", "error": "truncated"}]}')

    write_html_report(out, out / "volumes.csv", out / "qc", out / "report.html")
    text = (out / "report.html").read_text(encoding="utf-8")
    page = _Collector()
    page.feed(text)
    page.close()
    assert page.open == []  # well formed

    assert [(cells[0], cells[1], cells[2]) for _, cells in page.rows] == [
        ("case <2>", "1", "liver"), ("case <2>", "2", "tumour"), ("case_001", "1", "liver"),
        ("case_001", "2", "tumour")]
    assert [css for css, _ in page.rows] == ["", "", "", "flagged"]
    assert page.rows[2][1][3:5] == ["150", "0.1575"]  # liver: 3 x 8 x 7 voxels less the tumour's 2 x 3 x 3, in mL
    assert page.images == ["qc/case_001.png"] and (out / page.images[0]).is_file()
    assert all(link[1:] in page.ids for link in page.links if link.startswith("#"))
    assert "in/broken.nii.gz" in text and "truncated" in text
    assert "<script>" in text and "http://" not in text and "https://" not in text  # nothing fetched online
