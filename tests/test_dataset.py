"""Dataset layouts, case discovery and image I/O with geometry."""

import dataclasses
import json

import numpy as np
import pytest
from conftest import BRATS, LABELS, SHARED_DATASETS, synthetic_case, write_sitk
from PIL import Image

from autoseg.dataset.image_io import Geometry, ImageReadError, read_header, read_image, write_image
from autoseg.dataset.layout import DatasetError, load_dataset, read_case_image, read_case_label
from autoseg.dataset.verify import verify_dataset


def test_both_layouts_load_into_the_same_dataset_and_the_same_arrays(make_decathlon, make_nnunetv2):
    channels = ("T1", "T2")
    dec = load_dataset(make_decathlon(channels=channels, spacing=(2.0, 0.5, 0.75)))
    v2 = load_dataset(make_nnunetv2(channels=channels, spacing=(2.0, 0.5, 0.75)))
    assert (dec.layout, v2.layout) == ("decathlon", "nnunetv2")
    assert dec.channel_names == v2.channel_names == channels
    assert dec.labels == v2.labels == LABELS  # Decathlon id->name and nnU-Net name->id read alike
    assert [c.case_id for c in dec.cases] == [c.case_id for c in v2.cases] == ["case_000", "case_001", "case_002"]
    assert dec.cases[0].channels_in_one_file and len(v2.cases[0].image_files) == 2
    for a, b in zip(dec.cases, v2.cases):
        image_a, geo_a = read_case_image(a, 2)
        image_b, geo_b = read_case_image(b, 2)
        assert image_a.shape == image_b.shape == (2, 12, 16, 14)
        assert image_a.dtype == image_b.dtype == np.float32
        np.testing.assert_array_equal(image_a, image_b)
        assert geo_a == geo_b and geo_a.spacing == (2.0, 0.5, 0.75)
        np.testing.assert_array_equal(read_case_label(a), read_case_label(b))
    expected_image, expected_label = synthetic_case(channels=2, seed=1)
    np.testing.assert_array_equal(read_case_image(v2.cases[1], 2)[0], expected_image)
    np.testing.assert_array_equal(read_case_label(dec.cases[1]), expected_label)


def test_summary_json_names_layout_channels_and_labels(make_nnunetv2):
    summary = load_dataset(make_nnunetv2()).to_json()
    assert summary["layout"] == "nnunetv2" and summary["num_cases"] == 3
    assert summary["labels"] == {"0": "background", "1": "liver", "2": "tumour"}
    assert summary["channel_names"] == ["T1", "T2"]


def test_read_case_image_rejects_a_wrong_channel_count_naming_the_file(make_decathlon):
    dataset = load_dataset(make_decathlon(channels=("T1", "T2")))
    with pytest.raises(DatasetError, match="case_000.nii.gz.*2 channel"):
        read_case_image(dataset.cases[0], 3)


@pytest.mark.parametrize("meta, fragment", [
    ({"labels": {"0": "background"}, "training": [{"image": "a.nii.gz"}]}, "modality"),
    ({"modality": {"0": "CT"}, "labels": {"1": "liver"}, "training": [{"image": "a.nii.gz"}]}, "background"),
    ({"modality": {"1": "CT"}, "labels": {"0": "background"}, "training": [{"image": "a.nii.gz"}]}, "indices"),
    ({"modality": {"0": "CT"}, "labels": {"0": "background"}, "training": []}, "training"),
    ({"channel_names": {"0": "CT"}, "labels": {"background": 0, "tumour": [1, 2]}}, "region"),
    ({"modality": {"0": "CT"}, "labels": {"0": "background", "1": "ignore", "2": "liver"},
      "training": [{"image": "a.nii.gz"}]}, "ignore.*highest id"),
    ({"modality": {"0": "CT"}, "labels": {"0": "background", "1": "ignore"}, "training": [{"image": "a.nii.gz"}]},
     "ignore.*at least one structure"),
    ({"channel_names": {"0": "CT"}, "labels": {"background": 0}, "file_ending": ".bmp"}, "file_ending"),
    ({"modality": {"0": "CT"}, "labels": {"0": "background", "1": "a", "40000": "b"},
      "training": [{"image": "a.nii.gz"}]},
     "0..32767"),
])
def test_malformed_dataset_json_names_the_file_and_the_problem(tmp_path, meta, fragment):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match=fragment) as info:
        load_dataset(tmp_path)
    assert "dataset.json" in str(info.value)


def test_missing_dataset_json_says_what_is_needed(tmp_path):
    with pytest.raises(DatasetError, match="dataset.json"):
        load_dataset(tmp_path)


PERMUTED_FLIP = (0.0, 0.0, 1.0, 0.0, -1.0, 0.0, 1.0, 0.0, 0.0)


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha", ".mhd"])
def test_write_then_read_keeps_voxels_and_geometry_exactly(tmp_path, suffix):
    array = np.random.default_rng(0).random((4, 5, 6)).astype(np.float32)
    geometry = Geometry((2.5, 0.75, 0.5), (-10.5, 20.25, 3.0), PERMUTED_FLIP, array.shape)
    path = tmp_path / f"image{suffix}"
    write_image(path, array, geometry)
    back, back_geometry = read_image(path)
    np.testing.assert_array_equal(back, array)
    assert back_geometry == geometry
    assert read_header(path) == geometry
    # Nothing but the image itself (and the data file a .mhd header names) is left in the folder.
    expected = {path.name} | ({"image.zraw"} if suffix == ".mhd" else set())
    assert {p.name for p in tmp_path.iterdir()} == expected


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_oblique_direction_survives_a_round_trip(tmp_path, suffix):
    t = np.deg2rad(30)
    rotation = (np.cos(t), -np.sin(t), 0.0, np.sin(t), np.cos(t), 0.0, 0.0, 0.0, 1.0)
    geometry = Geometry((3.0, 0.75, 0.625), (1.0, 2.0, 3.0), tuple(map(float, rotation)), (3, 4, 5))
    write_image(tmp_path / f"x{suffix}", np.zeros((3, 4, 5), np.int16), geometry)
    _, back = read_image(tmp_path / f"x{suffix}")
    assert back.spacing == geometry.spacing and back.origin == geometry.origin
    np.testing.assert_allclose(back.direction, geometry.direction, atol=1e-7)  # NIfTI stores a float32 quaternion
    assert back.matches(geometry)


def test_write_image_refuses_an_array_that_does_not_fit_the_geometry(tmp_path):
    geometry = Geometry((1.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()), (2, 3, 4))
    with pytest.raises(ValueError, match="does not match"):
        write_image(tmp_path / "x.nii.gz", np.zeros((2, 3, 5)), geometry)
    assert not list(tmp_path.iterdir())


def test_4d_file_geometry_keeps_the_spatial_part(tmp_path):
    path = write_sitk(tmp_path / "four.nii.gz", np.zeros((2, 3, 4, 5), np.float32), spacing=(3.0, 1.5, 0.5),
                      origin=(7.0, 8.0, 9.0), direction=PERMUTED_FLIP)
    array, geometry = read_image(path)
    assert array.shape == (2, 3, 4, 5)
    assert geometry.shape == (3, 4, 5) and geometry.spacing == (3.0, 1.5, 0.5)
    assert geometry.origin == (7.0, 8.0, 9.0) and geometry.direction == PERMUTED_FLIP
    assert read_header(path) == geometry


def test_real_hippocampus_cases_load_with_names_and_1mm_grid(hippocampus_subset):
    dataset = load_dataset(hippocampus_subset)
    assert dataset.layout == "decathlon" and dataset.channel_names == ("MRI",)
    assert dataset.labels == {0: "background", 1: "Anterior", 2: "Posterior"}
    assert [c.case_id for c in dataset.cases] == ["hippocampus_001", "hippocampus_003", "hippocampus_004",
                                                  "hippocampus_006"]
    for case in dataset.cases:
        image, geometry = read_case_image(case, 1)
        label = read_case_label(case)
        assert image.shape == (1, *label.shape) and image.dtype == np.float32
        assert np.allclose(geometry.spacing, 1.0)
        assert set(np.unique(label)) <= {0, 1, 2}
    assert verify_dataset(dataset, progress=False).problems == []


def test_real_brats_subset_layout_headers_and_one_verified_case():
    if not (BRATS / "dataset.json").is_file():
        pytest.skip(f"{BRATS} not available")
    dataset = load_dataset(BRATS)
    assert dataset.layout == "nnunetv2" and dataset.channel_names == ("FLAIR", "T1c")
    assert dataset.labels == {0: "background", 1: "necrosis", 2: "edema", 3: "non_enhancing", 4: "enhancing"}
    assert len(dataset.cases) == 6
    for case in dataset.cases:
        assert [p.name for p in case.image_files] == [f"{case.case_id}_0000.nii.gz", f"{case.case_id}_0001.nii.gz"]
        headers = [read_header(p) for p in (*case.image_files, case.label_file)]
        assert all(h.shape == (155, 240, 240) and h.matches(headers[0]) for h in headers)
    report = verify_dataset(dataclasses.replace(dataset, cases=dataset.cases[:1]), progress=False)
    assert report.ok and report.problems == []


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha"])
def test_truncated_file_is_refused_not_read_as_zeros(tmp_path, suffix):
    path = write_sitk(tmp_path / f"x{suffix}", synthetic_case()[0][0])
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.8)])
    with pytest.raises(ImageReadError, match="truncated") as info:
        read_image(path)
    assert info.value.path == path


def test_uncompressed_data_named_nii_gz_is_still_read(tmp_path):
    image = synthetic_case()[0][0]
    plain = write_sitk(tmp_path / "x.nii", image)
    misnamed = tmp_path / "y.nii.gz"
    misnamed.write_bytes(plain.read_bytes())
    np.testing.assert_array_equal(read_image(misnamed)[0], image)


def test_an_origin_far_from_zero_may_not_drift_by_a_fraction_of_a_voxel():
    from autoseg.dataset.image_io import Geometry

    a = Geometry((1.0, 1.0, 1.0), (500.0, 500.0, 500.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), (4, 4, 4))
    shifted = Geometry((1.0, 1.0, 1.0), (500.3, 500.0, 500.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), (4, 4, 4))
    nearly = Geometry((1.0, 1.0, 1.0), (500.0 + 1e-5, 500.0, 500.0), (1, 0, 0, 0, 1, 0, 0, 0, 1), (4, 4, 4))
    assert not a.matches(shifted, tolerance=1e-3)
    assert a.matches(nearly, tolerance=1e-3)


DSB = SHARED_DATASETS / "Dataset010_DSB2018Nuclei"


def _picture_dataset(root, n_cases=2, shape=(6, 9), channels=("R", "G", "B"), labels=("background", "cell"),
                     label_values=(0, 1), label_dtype=np.uint8):
    """An nnU-Net v2 natural-image dataset: one RGB `<case>_0000.png` per case (greyscale for one channel)."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    for i in range(n_cases):
        pixels = rng.integers(0, 256, (*shape, 3) if len(channels) == 3 else shape, dtype=np.uint8)
        Image.fromarray(pixels).save(root / "imagesTr" / f"img_{i}_0000.png")
        label = np.resize(np.asarray(label_values, label_dtype), shape)
        Image.fromarray(label).save(root / "labelsTr" / f"img_{i}.png")
    meta = {"channel_names": {str(c): n for c, n in enumerate(channels)},
            "labels": {name: k for k, name in enumerate(labels)}, "numTraining": n_cases, "file_ending": ".png"}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_rgb_png_dataset_holds_its_three_channels_in_one_file_per_case(tmp_path):
    dataset = load_dataset(_picture_dataset(tmp_path / "pics"))
    assert dataset.file_ending == ".png" and dataset.num_channels == 3
    assert [[p.name for p in c.image_files] for c in dataset.cases] == [["img_0_0000.png"], ["img_1_0000.png"]]
    assert all(c.channels_in_one_file for c in dataset.cases)
    image, geometry = read_case_image(dataset.cases[0], 3)
    assert image.shape == (3, 1, 6, 9) and image.dtype == np.float32 and geometry.spacing == (999.0, 1.0, 1.0)
    label = read_case_label(dataset.cases[0])
    assert label.shape == (1, 6, 9) and set(np.unique(label)) == {0, 1}
    assert verify_dataset(dataset, progress=False).problems == []  # no "missing _0001/_0002" reported


def test_png_channels_in_separate_files_are_still_one_file_per_channel(tmp_path):
    root = _picture_dataset(tmp_path / "pics", channels=("DAPI",))
    meta = json.loads((root / "dataset.json").read_text())
    meta["channel_names"] = {"0": "DAPI", "1": "GFP"}
    (root / "dataset.json").write_text(json.dumps(meta))
    Image.fromarray(np.full((6, 9), 7, np.uint8)).save(root / "imagesTr" / "img_0_0001.png")
    dataset = load_dataset(root)
    assert [len(c.image_files) for c in dataset.cases] == [2, 2]  # one case has _0001: the layout is per channel
    image, _ = read_case_image(dataset.cases[0], 2)
    assert image.shape == (2, 1, 6, 9) and (image[1] == 7).all()
    problems = verify_dataset(dataset, progress=False).problems
    assert [(p.file.split("/")[-1], "not found" in p.message) for p in problems] == [("img_1_0001.png", True)]


def test_label_ids_above_127_survive_reading(tmp_path):
    names = ["background"] + [f"class_{k}" for k in range(1, 301)]
    root = _picture_dataset(tmp_path / "many", labels=names, label_values=(0, 128, 255, 300), label_dtype=np.uint16)
    dataset = load_dataset(root)
    assert max(dataset.labels) == 300
    label = read_case_label(dataset.cases[0])
    assert label.dtype == np.int16 and set(np.unique(label)) == {0, 128, 255, 300}
    assert verify_dataset(dataset, progress=False).problems == []


def test_real_dsb_nuclei_rgb_pngs_load_as_three_channel_slices_and_verify_clean():
    if not (DSB / "dataset.json").is_file():
        pytest.skip(f"{DSB} not available")
    dataset = load_dataset(DSB)
    assert dataset.layout == "nnunetv2" and dataset.channel_names == ("R", "G", "B") and dataset.file_ending == ".png"
    assert dataset.labels == {0: "background", 1: "nucleus"} and len(dataset.cases) == 80
    assert all([p.name for p in c.image_files] == [f"{c.case_id}_0000.png"] for c in dataset.cases)
    subset = dataclasses.replace(dataset, cases=dataset.cases[:6])
    for case in subset.cases:
        image, geometry = read_case_image(case, 3)
        label = read_case_label(case)
        assert image.shape == (3, *label.shape) and label.shape[0] == 1
        assert geometry.spacing == (999.0, 1.0, 1.0) and geometry.shape == label.shape
        assert set(np.unique(label)) == {0, 1}
    assert verify_dataset(subset, progress=False).problems == []


def test_nnunetv2_dataset_object_names_files_kept_elsewhere(make_nnunetv2, tmp_path):
    """nnU-Net v2's `dataset` entry: cases listed with their files, relative or absolute, not in imagesTr."""
    source = make_nnunetv2(tmp_path / "source", n_cases=2)
    root = tmp_path / "listed"
    root.mkdir()
    meta = json.loads((source / "dataset.json").read_text())
    meta["dataset"] = {
        "first": {"images": [str(source / "imagesTr" / f"case_000_{c:04d}.nii.gz") for c in range(2)],
                  "label": str(source / "labelsTr" / "case_000.nii.gz")},
        "second": {"images": [f"../source/imagesTr/case_001_{c:04d}.nii.gz" for c in range(2)],
                   "label": "../source/labelsTr/case_001.nii.gz"}}
    (root / "dataset.json").write_text(json.dumps(meta))
    dataset = load_dataset(root)
    assert [c.case_id for c in dataset.cases] == ["first", "second"]
    assert dataset.cases[1].image_files[1] == (source / "imagesTr" / "case_001_0001.nii.gz").resolve()
    assert read_case_image(dataset.cases[1], 2)[0].shape[0] == 2
    meta["dataset"]["second"]["images"] = meta["dataset"]["second"]["images"][:1]
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="'second' lists 1 image.*declares 2"):
        load_dataset(root)
    del meta["dataset"]["second"]["label"]
    meta["dataset"]["second"]["images"] = ["a.nii.gz", "b.nii.gz"]
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="'second' needs \"label\""):
        load_dataset(root)
