"""Dataset verification: every problem is found, named by its file, and reported in one run."""

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import synthetic_case, write_sitk
from PIL import Image

from autoseg.cli import main
from autoseg.dataset.layout import load_dataset, read_case_image
from autoseg.dataset.verify import verify_dataset

CASE = "case_001"


def _image(root):
    return root / "imagesTr" / f"{CASE}.nii.gz"


def _label(root):
    return root / "labelsTr" / f"{CASE}.nii.gz"


def _rewrite_label(root, label=None, **geometry):
    write_sitk(_label(root), synthetic_case()[1] if label is None else label, **geometry)


def _rewrite_image(root, image):
    write_sitk(_image(root), image)


def _label_with(value):
    label = synthetic_case()[1]
    label[0, 0, 0] = value
    return label


def _image_with(value):
    image = synthetic_case()[0][0]
    image[5, 5, 5] = value
    return image


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _duplicate_case(root):
    (root / "imagesTr" / "again").mkdir()
    shutil.copy(_image(root), root / "imagesTr" / "again" / f"{CASE}.nii.gz")
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"].append({"image": f"./imagesTr/again/{CASE}.nii.gz", "label": f"./labelsTr/{CASE}.nii.gz"})
    (root / "dataset.json").write_text(json.dumps(meta))


DEFECTS = {
    "missing image": (lambda r: _image(r).unlink(), "error", _image, "not found"),
    "missing label": (lambda r: _label(r).unlink(), "error", _label, "not found"),
    "wrong channel count": (lambda r: _rewrite_image(r, synthetic_case(channels=2)[0]), "error", _image,
                            "2 channel"),
    "shape mismatch": (lambda r: _rewrite_label(r, synthetic_case((12, 16, 13))[1]), "error", _label, "shape"),
    "spacing mismatch": (lambda r: _rewrite_label(r, spacing=(1.0, 1.0, 1.01)), "error", _label, "spacing"),
    "origin mismatch": (lambda r: _rewrite_label(r, origin=(0.0, 0.5, 0.0)), "error", _label, "origin"),
    "undeclared label": (lambda r: _rewrite_label(r, _label_with(7)), "error", _label, "[7]"),
    "truncated image": (lambda r: _truncate(_image(r)), "error", _image, "truncated"),
    "truncated label": (lambda r: _truncate(_label(r)), "error", _label, "truncated"),
    "duplicate case id": (_duplicate_case, "error", _image, "appears 2 times"),
    "empty label": (lambda r: _rewrite_label(r, np.zeros((12, 16, 14), np.uint8)), "warning", _label, "empty"),
}


def test_clean_dataset_has_no_problems(make_decathlon):
    report = verify_dataset(load_dataset(make_decathlon()), progress=False)
    assert report.ok and report.problems == [] and report.num_cases == 3


@pytest.mark.parametrize("defect", list(DEFECTS))
def test_each_problem_is_detected_and_names_its_file(make_decathlon, defect):
    root = make_decathlon()
    apply, severity, file_of, fragment = DEFECTS[defect]
    apply(root)
    report = verify_dataset(load_dataset(root), progress=False)
    assert len(report.problems) == 1, report.summary()
    problem = report.problems[0]
    assert problem.severity == severity
    assert problem.file == str(file_of(root).resolve())
    assert fragment in problem.message and "np.float" not in problem.message
    assert report.ok == (severity == "warning")
    assert file_of(root).name in report.summary()


@pytest.mark.parametrize("ending", [".mha", ".nii.gz"])
@pytest.mark.parametrize("value, fragment", [(np.nan, "1 NaN and 0 infinite"), (-np.inf, "0 NaN and 1 infinite")])
def test_non_finite_intensities_are_reported(make_nnunetv2, value, fragment, ending):
    # SimpleITK's NIfTI reader turns NaN/inf into 0, so NIfTI is checked on the raw voxels.
    root = make_nnunetv2(file_ending=ending)
    bad = root / "imagesTr" / f"case_001_0001{ending}"
    write_sitk(bad, _image_with(value))
    report = verify_dataset(load_dataset(root), progress=False)
    assert [(p.severity, p.file) for p in report.problems] == [("error", str(bad.resolve()))]
    assert fragment in report.problems[0].message


def test_grid_differences_within_tolerance_are_not_reported(make_decathlon):
    root = make_decathlon()
    _rewrite_label(root, spacing=(1.0, 1.0, 1.0 + 1e-5), origin=(1e-5, 0.0, -1e-5))
    assert verify_dataset(load_dataset(root), progress=False).problems == []


def test_all_problems_of_a_dataset_are_reported_in_one_run(make_decathlon):
    root = make_decathlon(n_cases=5)
    (root / "imagesTr" / "case_000.nii.gz").unlink()
    write_sitk(root / "labelsTr" / "case_001.nii.gz", _label_with(9))
    _truncate(root / "labelsTr" / "case_002.nii.gz")
    write_sitk(root / "labelsTr" / "case_003.nii.gz", synthetic_case(seed=3)[1], spacing=(1.5, 1.0, 1.0))
    report = verify_dataset(load_dataset(root), workers=2, progress=False)
    assert sorted(p.file.split("/")[-2:][0] + "/" + p.file.split("/")[-1] for p in report.errors) == [
        "imagesTr/case_000.nii.gz", "labelsTr/case_001.nii.gz", "labelsTr/case_002.nii.gz", "labelsTr/case_003.nii.gz"]
    assert report.to_json()["ok"] is False and len(report.to_json()["problems"]) == 4


def test_nnunetv2_missing_channel_and_channel_grid_mismatch_name_the_channel_file(make_nnunetv2):
    root = make_nnunetv2()
    (root / "imagesTr" / "case_000_0001.nii.gz").unlink()
    write_sitk(root / "imagesTr" / "case_002_0001.nii.gz", synthetic_case(seed=2)[0][0], spacing=(1.0, 1.2, 1.0))
    report = verify_dataset(load_dataset(root), progress=False)
    by_file = {p.file.split("/")[-1]: p.message for p in report.problems}
    assert set(by_file) == {"case_000_0001.nii.gz", "case_002_0001.nii.gz"}
    assert "not found" in by_file["case_000_0001.nii.gz"]
    assert "spacing" in by_file["case_002_0001.nii.gz"] and "case_002_0000.nii.gz" in by_file["case_002_0001.nii.gz"]


def test_cli_verify_exits_1_listing_every_bad_file_without_traceback(make_decathlon, capsys):
    root = make_decathlon()
    (root / "labelsTr" / "case_000.nii.gz").unlink()
    _truncate(root / "imagesTr" / "case_002.nii.gz")
    assert main(["verify", str(root), "--workers", "1"]) == 1
    out, err = capsys.readouterr()
    assert "labelsTr/case_000.nii.gz" in out and "imagesTr/case_002.nii.gz" in out
    assert "2 error(s)" in out
    assert "Traceback" not in out + err


def test_cli_verify_exits_0_on_a_clean_dataset(make_nnunetv2, capsys):
    assert main(["verify", str(make_nnunetv2()), "--workers", "1"]) == 0
    assert "3 cases checked: 0 error(s), 0 warning(s)" in capsys.readouterr().out


def test_cli_verify_without_dataset_json_is_a_readable_error(tmp_path, capsys):
    assert main(["verify", str(tmp_path), "--workers", "1"]) == 2
    out, err = capsys.readouterr()
    assert "dataset.json" in err and "Traceback" not in out + err


def test_channel_grids_that_pass_verification_are_also_accepted_when_reading(make_nnunetv2):
    root = make_nnunetv2(n_cases=1)
    image = synthetic_case(channels=2)[0][1]
    write_sitk(root / "imagesTr" / "case_000_0001.nii.gz", image, spacing=(1.0, 1.0005, 1.0), origin=(0.0005, 0.0, 0.0))
    dataset = load_dataset(root)
    assert verify_dataset(dataset, progress=False).problems == []
    array, geometry = read_case_image(dataset.cases[0], 2)  # fingerprinting and preprocessing read it like this
    assert array.shape == (2, 12, 16, 14) and geometry.spacing == (1.0, 1.0, 1.0)


def _rgb_png_dataset(root, n_cases=2):
    """nnU-Net v2 natural-image layout: channel_names R, G, B held in one `<case>_0000.png`."""
    rng = np.random.default_rng(0)
    for i in range(n_cases):
        (root / "imagesTr").mkdir(parents=True, exist_ok=True)
        (root / "labelsTr").mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)).save(root / "imagesTr" / f"img_{i}_0000.png")
        Image.fromarray(np.eye(6, 9, dtype=np.uint8)).save(root / "labelsTr" / f"img_{i}.png")
    meta = {"channel_names": {"0": "R", "1": "G", "2": "B"}, "labels": {"background": 0, "cell": 1},
            "numTraining": n_cases, "file_ending": ".png"}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_an_rgb_label_png_is_reported_by_name_as_colour_not_labels(tmp_path):
    root = _rgb_png_dataset(tmp_path / "pics")
    bad = root / "labelsTr" / "img_1.png"
    Image.fromarray(np.dstack([np.eye(6, 9, dtype=np.uint8) * 255] * 3)).save(bad)  # a mask saved in colour
    report = verify_dataset(load_dataset(root), progress=False)
    assert [(p.severity, p.file) for p in report.problems] == [("error", str(bad.resolve()))]
    assert "3 colour channels" in report.problems[0].message and "greyscale" in report.problems[0].message


def test_a_greyscale_picture_in_an_rgb_dataset_is_reported_as_a_channel_count(tmp_path):
    root = _rgb_png_dataset(tmp_path / "pics")
    grey = root / "imagesTr" / "img_0_0000.png"
    Image.fromarray(np.zeros((6, 9), np.uint8)).save(grey)
    report = verify_dataset(load_dataset(root), progress=False)
    assert [p.file for p in report.problems] == [str(grey.resolve())]
    assert "has 1 channel(s), dataset.json declares 3" in report.problems[0].message


def test_a_2d_grid_mismatch_is_reported_despite_the_pseudo_spacing():
    """The 999 of a 2D image's missing axis must not widen the tolerance for its in-plane spacing."""
    from autoseg.dataset.image_io import Geometry

    image = Geometry((999.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()), (1, 6, 9))
    label = Geometry((999.0, 0.5, 0.5), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()), (1, 6, 9))
    assert any("spacing" in d for d in image.differences(label, 1e-3))


def test_a_picture_label_saved_with_another_dpi_still_matches_its_image(tmp_path):
    root = _rgb_png_dataset(tmp_path / "pics")
    label = sitk.GetImageFromArray(np.eye(6, 9, dtype=np.uint8))
    label.SetSpacing((0.5, 0.5))  # a resolution recorded by another tool: not a pixel size
    sitk.WriteImage(label, str(root / "labelsTr" / "img_0.png"))
    assert verify_dataset(load_dataset(root), progress=False).ok
