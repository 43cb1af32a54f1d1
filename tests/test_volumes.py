"""volumes.csv: volumes in mL, components and boxes in mm on hand-counted masks; one table per batch."""

from __future__ import annotations

import csv
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from autoseg.dataset.image_io import PSEUDO_SPACING_2D, Geometry
from autoseg.inference.volumes import COLUMNS, VolumeTable, VolumeTableError, read_volume_rows, structure_rows

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
LABELS = {0: "background", 1: "liver", 2: "tumour", 3: "spleen"}


def anisotropic_case() -> tuple[np.ndarray, Geometry]:
    """Liver: a 2 x 3 x 4 block; tumour: two single voxels touching only at a corner (one 26-connected
    piece) plus one far away; spleen: absent. Spacing (z, y, x) = (3.0, 0.5, 0.7) mm."""
    seg = np.zeros((5, 6, 7), dtype=np.uint8)
    seg[1:3, 2:5, 1:5] = 1
    seg[0, 0, 0] = 2
    seg[1, 1, 1] = 0  # keep the corner neighbour free of liver
    seg[4, 5, 6] = 2
    seg[3, 4, 5] = 2  # diagonal neighbour of (4, 5, 6)
    return seg, Geometry((3.0, 0.5, 0.7), (-10.0, 20.0, 5.0), IDENTITY, seg.shape)


def read_table(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_volumes_components_and_boxes_match_hand_counts_with_anisotropic_spacing():
    seg, geometry = anisotropic_case()
    rows = {r["label"]: r for r in structure_rows(seg, geometry, LABELS)}
    assert sorted(rows) == [1, 2, 3]  # background is not a structure
    voxel_ml = 3.0 * 0.5 * 0.7 / 1000.0
    liver, tumour, spleen = rows[1], rows[2], rows[3]
    assert (liver["name"], liver["voxels"], liver["components"]) == ("liver", 24, 1)
    assert liver["volume_ml"] == pytest.approx(24 * voxel_ml)
    assert liver["area_mm2"] is None
    # z 1..2, y 2..4, x 1..4 -> voxel edges z 3..9 mm, y 1..2.5 mm, x 0.7..3.5 mm
    assert liver["bbox_mm"] == pytest.approx((3.0, 1.0, 0.7, 9.0, 2.5, 3.5))
    # world (x, y, z) of the corner voxel centres: origin (x, y, z) + index * spacing
    assert liver["bbox_world_mm"] == pytest.approx((-10.0 + 0.7, 20.0 + 1.0, 5.0 + 3.0,
                                                    -10.0 + 2.8, 20.0 + 2.0, 5.0 + 6.0))
    assert (tumour["voxels"], tumour["components"]) == (3, 2)  # the diagonal pair is one piece (26-neighbourhood)
    assert tumour["volume_ml"] == pytest.approx(3 * voxel_ml)
    assert tumour["bbox_mm"] == pytest.approx((0.0, 0.0, 0.0, 15.0, 3.0, 4.9))
    assert (spleen["voxels"], spleen["volume_ml"], spleen["components"], spleen["bbox_mm"]) == (0, 0.0, 0, ())


def test_world_box_follows_a_flipped_direction():
    seg, _ = anisotropic_case()
    flipped = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)  # x and y run backwards (a RAS-stored NIfTI)
    geometry = Geometry((3.0, 0.5, 0.7), (100.0, 50.0, 0.0), flipped, seg.shape)
    liver = structure_rows(seg, geometry, LABELS)[0]
    assert liver["bbox_world_mm"] == pytest.approx((100.0 - 2.8, 50.0 - 2.0, 3.0, 100.0 - 0.7, 50.0 - 1.0, 6.0))


def test_2d_image_reports_area_not_a_volume_from_the_pseudo_spacing():
    seg = np.zeros((1, 8, 9), dtype=np.uint8)
    seg[0, 2:4, 3:8] = 1  # 10 pixels
    seg[0, 6, 0] = 1
    seg[0, 7, 1] = 1  # touches (6, 0) at a corner: same piece (8-neighbourhood)
    geometry = Geometry((PSEUDO_SPACING_2D, 0.5, 0.25), (0.0, 0.0, 0.0), IDENTITY, seg.shape)
    row = structure_rows(seg, geometry, {1: "cell"})[0]
    assert row["voxels"] == 12 and row["components"] == 2
    assert row["volume_ml"] is None
    assert row["area_mm2"] == pytest.approx(12 * 0.5 * 0.25)
    assert row["bbox_mm"] == pytest.approx((1.0, 0.0, 4.0, 2.0))  # (y0, x0, y1, x1): no pseudo-axis
    assert row["bbox_world_mm"] == pytest.approx((0.0, 1.0, 1.75, 3.5))  # (x0, y0, x1, y1) of pixel centres


def case_rows(label_voxels: int) -> list[dict]:
    seg = np.zeros((3, 3, 3), dtype=np.uint8)
    seg.reshape(-1)[:label_voxels] = 1
    return structure_rows(seg, Geometry((1.0, 1.0, 1.0), (0.0,) * 3, IDENTITY, seg.shape), {1: "liver", 2: "tumour"})


def test_continued_batch_gives_one_complete_table_without_duplicates(tmp_path):
    path = tmp_path / "out" / "volumes.csv"
    first_run = VolumeTable(path, model="ws:3d_fullres:0-4")
    first_run.add_case("case_b", [Path("in/case_b_0000.nii.gz")], case_rows(2))
    first_run.add_case("case_a", [Path("in/case_a_0000.nii.gz"), Path("in/case_a_0001.nii.gz")], case_rows(1),
                       uncertainty={1: 0.25}, flagged={1})
    # interrupted here; a new run on the same folder writes case_a again and one new case
    second_run = VolumeTable(path, model="ws:3d_fullres:0-4")
    second_run.add_case("case_a", [Path("in/case_a_0000.nii.gz"), Path("in/case_a_0001.nii.gz")], case_rows(5),
                        uncertainty={1: 0.5, 2: float("nan")}, flagged=set())
    second_run.add_case("case_c", [Path("in/case_c_0000.nii.gz")], case_rows(3))

    assert VolumeTable(path, model="m").cases() == {"case_a", "case_b", "case_c"}
    rows = read_table(path)
    # one row per case and label, in the order the cases were last written
    assert [(r["case"], r["label"]) for r in rows] == [(c, lab) for c in ("case_b", "case_a", "case_c")
                                                       for lab in ("1", "2")]
    a_liver = rows[2]
    assert (a_liver["voxels"], a_liver["volume_ml"], a_liver["uncertainty"], a_liver["flagged"]) == ("5", "0.005",
                                                                                                   "0.5", "no")
    assert rows[3]["uncertainty"] == ""  # NaN (no voxels to score) is left empty
    assert a_liver["input_files"] == "in/case_a_0000.nii.gz; in/case_a_0001.nii.gz"
    assert rows[0]["flagged"] == "" and rows[0]["uncertainty"] == ""  # no ensemble: nothing scored
    assert {r["model"] for r in rows} == {"ws:3d_fullres:0-4"}
    assert {r["format_version"] for r in rows} == {"1"}
    assert list(rows[0]) == list(COLUMNS)
    assert not list(path.parent.glob(".volumes*.tmp*"))  # no temporary files left behind


def test_a_new_case_is_appended_without_rewriting_the_rows_before_it(tmp_path):
    path = tmp_path / "volumes.csv"
    table = VolumeTable(path, model="m")
    table.add_case("case_a", [Path("case_a.nii.gz")], case_rows(1))
    before, inode = path.read_bytes(), path.stat().st_ino
    table.add_case("case_b", [Path("case_b.nii.gz")], case_rows(2))
    VolumeTable(path, model="m").add_case("case_c", [Path("case_c.nii.gz")], case_rows(3))  # a continued batch
    assert path.read_bytes().startswith(before) and path.stat().st_ino == inode
    assert path.read_text().count("case,label,") == 1  # one header
    assert [r["case"] for r in read_table(path)] == ["case_a"] * 2 + ["case_b"] * 2 + ["case_c"] * 2


def test_an_incomplete_last_line_is_dropped_and_its_case_counts_as_missing(tmp_path):
    path = tmp_path / "volumes.csv"
    table = VolumeTable(path, model="m")
    table.add_case("case_a", [Path("case_a.nii.gz")], case_rows(1))
    table.add_case("case_b", [Path("case_b.nii.gz")], case_rows(2))
    text = path.read_text()
    last_line = text.rstrip("\n").rindex("\n") + 1
    assert text[last_line:].startswith("case_b,2,")
    path.write_text(text[:last_line] + "case_b,2,tum")  # a write cut short in case_b's second row

    continued = VolumeTable(path, model="m")  # opens the table instead of refusing it
    assert continued.cases() == {"case_a", "case_b"}
    assert continued.cases(labels=[1, 2]) == {"case_a"}  # case_b lacks a row: predict it again
    continued.add_case("case_b", [Path("case_b.nii.gz")], case_rows(2))
    rows = read_table(path)
    assert [(r["case"], r["label"]) for r in rows] == [(c, lab) for c in ("case_a", "case_b") for lab in ("1", "2")]
    assert path.read_text().endswith("\n")


def test_concurrent_cases_from_threads_all_land_in_the_table(tmp_path):
    table = VolumeTable(tmp_path / "volumes.csv", model="m")
    with ThreadPoolExecutor(4) as pool:  # as predict_folder's writer threads do
        futures = [pool.submit(table.add_case, f"case_{k:02d}", [Path(f"case_{k:02d}.nii.gz")], case_rows(k % 27))
                   for k in range(16)]
    for future in futures:
        future.result()  # re-raises a failure in a thread
    rows = read_table(tmp_path / "volumes.csv")
    assert len(rows) == 32
    assert sorted({r["case"] for r in rows}) == [f"case_{k:02d}" for k in range(16)]
    assert all(int(r["voxels"]) == int(r["case"][-2:]) % 27 for r in rows if r["label"] == "1")


def test_a_foreign_csv_is_refused_before_any_case_runs(tmp_path):
    path = tmp_path / "volumes.csv"
    path.write_text("case,volume\nx,1\n")
    with pytest.raises(VolumeTableError, match="volumes.csv.*move it away"):
        VolumeTable(path, model="m")


FORMULA_CASES = ("=HYPERLINK(1)", "-1case", "+sum", "@cmd", "\tx", "'quoted")


def test_text_cells_that_a_spreadsheet_would_run_as_formulas_are_written_with_a_quote(tmp_path):
    path = tmp_path / "volumes.csv"
    table = VolumeTable(path, model="=model.zip:3d_fullres:folds 0")
    for case in FORMULA_CASES:
        table.add_case(case, [Path(f"{case}.nii.gz")], case_rows(1))
    raw = read_table(path)
    assert [r["case"] for r in raw[::2]] == ["'" + c for c in FORMULA_CASES]
    assert raw[0]["input_files"] == "'=HYPERLINK(1).nii.gz" and raw[0]["model"] == "'=model.zip:3d_fullres:folds 0"
    assert not any(r[k].startswith(("=", "+", "-", "@", "\t", "\r")) for r in raw for k in ("case", "name",
                                                                                           "input_files", "model"))
    # the HTML report's reader (and the table itself) see the real ids
    assert [r["case"] for r in read_volume_rows(path)[::2]] == list(FORMULA_CASES)
    assert read_volume_rows(path)[0]["input_files"] == "=HYPERLINK(1).nii.gz"


def test_a_case_named_like_a_formula_counts_as_recorded_when_continuing(tmp_path):
    path = tmp_path / "volumes.csv"
    VolumeTable(path, model="m").add_case("=HYPERLINK(1)", [Path("=HYPERLINK(1).nii.gz")], case_rows(1))
    continued = VolumeTable(path, model="m")
    continued.add_case("-1case", [Path("-1case.nii.gz")], case_rows(2))
    assert continued.cases(labels=[1, 2]) == {"=HYPERLINK(1)", "-1case"}
    continued.add_case("=HYPERLINK(1)", [Path("=HYPERLINK(1).nii.gz")], case_rows(3))  # predicted again: replaced
    rows = read_table(path)
    assert [(r["case"], r["label"], r["voxels"]) for r in rows] == [
        ("'-1case", "1", "2"), ("'-1case", "2", "0"), ("'=HYPERLINK(1)", "1", "3"), ("'=HYPERLINK(1)", "2", "0")]


def test_negative_world_coordinates_stay_numbers_not_escaped_text(tmp_path):
    seg, geometry = anisotropic_case()  # origin x = -10 mm: the liver's world box starts at x = -9.3
    path = tmp_path / "volumes.csv"
    VolumeTable(path, model="m").add_case("case_a", [Path("case_a.nii.gz")], structure_rows(seg, geometry, LABELS))
    liver = read_table(path)[0]
    assert liver["bbox_world_mm"].startswith("-9.3 ")
    assert [float(v) for v in liver["bbox_world_mm"].split()] == pytest.approx([-9.3, 21.0, 8.0, -7.2, 22.0, 11.0])
    assert float(liver["volume_ml"]) == pytest.approx(24 * 3.0 * 0.5 * 0.7 / 1000.0) and liver["voxels"] == "24"


def _add_part(path: Path, part: int) -> None:
    table = VolumeTable(path, model="m")
    for k in range(part, 12, 2):
        table.add_case(f"case_{k:02d}", [Path(f"case_{k:02d}.nii.gz")], case_rows(k))


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="parallel parts are serialized with a POSIX lock")
def test_parallel_parts_in_two_processes_share_one_table(tmp_path):
    import multiprocessing

    context = multiprocessing.get_context("fork")
    parts = [context.Process(target=_add_part, args=(tmp_path / "volumes.csv", part)) for part in (0, 1)]
    for p in parts:
        p.start()
    for p in parts:
        p.join(60)
    assert [p.exitcode for p in parts] == [0, 0]
    rows = read_table(tmp_path / "volumes.csv")
    assert sorted({r["case"] for r in rows}) == [f"case_{k:02d}" for k in range(12)]
    assert len(rows) == 24
