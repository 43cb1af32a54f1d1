"""DICOM series in (SimpleITK writes them, autoseg finds and reads them) and DICOM-SEG out (highdicom reads it back)."""

import locale
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from autoseg.dataset.dicom import find_dicom_series, read_dicom_series
from autoseg.dataset.image_io import ImageReadError, read_image
from autoseg.inference.inputs import InputError, discover_inputs, read_input_case

SPACING = (2.5, 0.7, 0.9)  # z, y, x
ORIGIN = (10.0, -20.0, 30.0)
IDENTITY = tuple(np.eye(3).ravel())
ROTATED = (0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0)  # sagittal-like: slices stacked along physical y
STUDY = "1.2.826.0.1.3680043.8.498.1"


def write_series(folder, array, series_uid, spacing=SPACING, origin=ORIGIN, direction=IDENTITY,
                 description="T1 axial", prefix="IM", suffix=".dcm", modality="MR"):
    """One file per slice, named in an order that is not the slice order, with the tags a scanner writes.

    GDCM's writer sets the process locale to "C" and leaves it so (Python's default text encoding turns
    ASCII, and later tests decoding UTF-8 output fail); the locale is put back. autoseg itself only
    reads DICOM through GDCM, which leaves the locale alone."""
    saved = locale.setlocale(locale.LC_ALL, None)
    try:
        return _write_series(folder, array, series_uid, spacing, origin, direction, description, prefix, suffix,
                             modality)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_series(folder, array, series_uid, spacing, origin, direction, description, prefix, suffix, modality):
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array).astype(np.int16))
    image.SetSpacing(tuple(reversed(spacing)))
    image.SetOrigin(origin)
    image.SetDirection(direction)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetImageIO("GDCMImageIO")
    d = direction
    depth = image.GetDepth()
    files = []
    for i in range(depth):
        slice_ = image[:, :, i]
        tags = {"0008|0060": modality, "0008|0016": "1.2.840.10008.5.1.4.1.1.4", "0008|0018": f"{series_uid}.{i + 1}",
                "0020|000d": STUDY, "0020|000e": series_uid, "0020|0052": STUDY + ".9", "0020|0011": "3",
                "0008|103e": description, "0008|1030": "Head", "0010|0010": "Test^Patient", "0010|0020": "P001",
                "0020|0013": str(i + 1), "0018|0050": str(spacing[0]),
                "0020|0032": "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, i))),
                "0020|0037": "\\".join(str(float(v)) for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
                "0028|0030": f"{spacing[1]}\\{spacing[2]}"}
        for key, value in tags.items():
            slice_.SetMetaData(key, value)
        path = folder / f"{prefix}{(i * 3 + 1) % depth:04d}{suffix}"
        writer.SetFileName(str(path))
        writer.Execute(slice_)
        files.append(path)
    return files


def volume(shape=(5, 6, 7), seed=0):
    return np.random.default_rng(seed).integers(-100, 1000, shape).astype(np.int16)


def test_a_series_is_read_back_as_one_case_with_its_geometry_and_slice_order(tmp_path):
    array = volume()
    write_series(tmp_path / "dicom" / "study" / "series3", array, "1.2.3.4.5", direction=ROTATED, suffix="")
    cases, problems = discover_inputs([tmp_path / "dicom"], num_channels=1)
    assert problems == [] and [c.case_id for c in cases] == ["1.2.3.4.5"]
    case = cases[0]
    assert case.ending == ".nii.gz" and len(case.files) == 5 and case.series_uid == "1.2.3.4.5"
    image, geometry = read_input_case(case, num_channels=1)
    assert image.shape == (1, 5, 6, 7) and image.dtype == np.float32
    assert np.array_equal(image[0], array)  # slice order restored although file names are shuffled
    assert np.allclose(geometry.spacing, SPACING) and np.allclose(geometry.origin, ORIGIN)
    assert np.allclose(geometry.direction, ROTATED) and geometry.shape == (5, 6, 7)


def test_two_series_in_one_folder_are_two_cases_and_a_nifti_beside_them_a_third(tmp_path):
    write_series(tmp_path, volume(seed=1), "1.2.3.100", description="T1")
    write_series(tmp_path, volume((4, 6, 7), seed=2), "1.2.3.200", description="T2", prefix="B")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((3, 4, 5), np.float32)), str(tmp_path / "other.nii.gz"))
    cases, problems = discover_inputs([tmp_path], num_channels=1)
    assert problems == []
    assert [c.case_id for c in cases] == ["1.2.3.100", "1.2.3.200", "other"]
    assert [read_input_case(c, 1)[0].shape[1] for c in cases] == [5, 4, 3]
    # a file of a series given on its own stands for its whole series
    cases, problems = discover_inputs([sorted(tmp_path.glob("B*.dcm"))[0]], num_channels=1)
    assert problems == [] and [(c.case_id, len(c.files)) for c in cases] == [("1.2.3.200", 4)]


def test_a_broken_series_is_reported_and_the_other_is_read(tmp_path):
    good = volume(seed=3)
    write_series(tmp_path / "a", good, "1.2.3.1")
    broken = write_series(tmp_path / "b", volume(seed=4), "1.2.3.2")
    middle = sorted(broken, key=lambda f: int(f.stem[2:]))[2]
    middle.write_bytes(middle.read_bytes()[:-40])  # a truncated slice: GDCM leaves it out of the series
    cases, problems = discover_inputs([tmp_path], num_channels=1)
    assert [c.case_id for c in cases] == ["1.2.3.1", "1.2.3.2"]
    assert any(path == str(middle) and "not a readable DICOM image" in why for path, why in problems)
    assert np.array_equal(read_input_case(cases[0], 1)[0][0], good)
    with pytest.raises(InputError, match="not evenly spaced"):
        read_input_case(cases[1], 1)


def test_uneven_slices_and_repeated_positions_are_refused(tmp_path):
    files = write_series(tmp_path / "a", volume(), "1.2.3.1")
    with pytest.raises(ImageReadError, match="not evenly spaced"):
        read_dicom_series([f for f in files if f != files[2]])
    write_series(tmp_path / "b", volume(seed=1), "1.2.3.2")
    write_series(tmp_path / "b", volume(seed=2), "1.2.3.2", prefix="E2_")  # a second echo under the same UID
    (series,), _ = find_dicom_series(tmp_path / "b")
    with pytest.raises(ImageReadError, match="same slice position"):
        read_dicom_series(series.files)


def test_non_image_series_are_skipped_and_multichannel_models_refuse_a_series(tmp_path):
    write_series(tmp_path, volume(), "1.2.3.1")
    write_series(tmp_path, volume(), "1.2.3.9", modality="SEG", prefix="S")
    # a DICOM object without pixels (a report): Modality SR, no Pixel Data
    (tmp_path / "report.dcm").write_bytes(bytes(128) + b"DICM" + b"\x08\x00\x60\x00CS\x02\x00SR")
    cases, problems = discover_inputs([tmp_path], num_channels=1)
    assert [c.case_id for c in cases] == ["1.2.3.1"] and problems == []
    (tmp_path / "notes.dcm").write_text("not dicom")
    notes = tmp_path / "notes.dcm"
    assert discover_inputs([tmp_path], num_channels=1)[1] == [
        (str(notes), f"{notes}: not a DICOM file (no DICM preamble); move it out of the input folder")]
    cases, _ = discover_inputs([tmp_path], num_channels=2)
    with pytest.raises(InputError, match="needs 2"):
        read_input_case(cases[0], 2)


def test_dicom_seg_references_the_series_and_holds_one_segment_per_label(tmp_path):
    hd = pytest.importorskip("highdicom")
    from autoseg.inference.dicom_seg import DicomSegError, write_dicom_seg

    files = write_series(tmp_path / "ct", volume(), "1.2.3.77", direction=ROTATED)
    (case,), _ = discover_inputs([tmp_path / "ct"], num_channels=1)
    _, geometry = read_input_case(case, 1)
    segmentation = np.zeros(geometry.shape, np.uint8)
    segmentation[1:3, 2:4, 1:5] = 1
    segmentation[3, 0:2, 0:2] = 2
    labels = {0: "background", 1: "liver", 2: "tumour", 3: "cyst"}
    write_dicom_seg(segmentation, geometry, list(reversed(files)), labels, tmp_path / "out" / "seg.dcm")
    seg = hd.seg.segread(tmp_path / "out" / "seg.dcm")
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY"
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["liver", "tumour", "cyst"]
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == "1.2.3.77"
    assert int(seg.NumberOfFrames) == 3  # liver on slices 1 and 2, tumour on slice 3: empty frames are left out
    # frame by frame, each segment is on the slice of the source image it references
    source_uids = {f"1.2.3.77.{i + 1}": i for i in range(5)}  # slice i was written with instance UID .i+1
    for frame, item in zip(seg.pixel_array, seg.PerFrameFunctionalGroupsSequence, strict=True):
        ref = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        number = item.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        assert np.array_equal(frame.astype(bool), segmentation[source_uids[ref]] == number)
    with pytest.raises(DicomSegError, match="do not cover"):
        write_dicom_seg(segmentation, geometry, files[:4], labels, tmp_path / "out" / "bad.dcm")
    assert not (tmp_path / "out" / "bad.dcm").exists()


def test_dicom_seg_without_highdicom_says_how_to_install_it(tmp_path, hide_package):
    from autoseg.inference.dicom_seg import DicomSegError, write_dicom_seg

    hide_package("highdicom")
    files = write_series(tmp_path, volume(), "1.2.3.1")
    image, geometry = read_dicom_series(files)
    with pytest.raises(DicomSegError, match=r"pip install autoseg\[dicom\]"):
        write_dicom_seg(np.zeros(geometry.shape, np.uint8), geometry, files, {0: "bg", 1: "a"}, tmp_path / "s.dcm")


def test_a_series_reads_like_the_same_volume_written_as_nifti(tmp_path):
    array = volume()
    files = write_series(tmp_path / "d", array, "1.2.3.1", direction=ROTATED)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(reversed(SPACING)))
    image.SetOrigin(ORIGIN)
    image.SetDirection(ROTATED)
    sitk.WriteImage(image, str(tmp_path / "v.nii.gz"))
    a, ga = read_dicom_series(files)
    b, gb = read_image(tmp_path / "v.nii.gz")
    assert np.array_equal(a, b) and ga.matches(gb)


def test_dicom_seg_of_a_region_model_holds_each_whole_region_as_one_segment(tmp_path):
    hd = pytest.importorskip("highdicom")
    from autoseg.inference.dicom_seg import write_dicom_seg

    files = write_series(tmp_path / "mr", volume(), "1.2.3.78")
    (case,), _ = discover_inputs([tmp_path / "mr"], num_channels=1)
    _, geometry = read_input_case(case, 1)
    segmentation = np.zeros(geometry.shape, np.uint8)
    segmentation[1:4, 1:5, 1:5] = 2  # written as 2: whole tumour only
    segmentation[2, 2:4, 2:4] = 1  # written as 1: the core, inside the whole tumour
    labels = {0: "background", 2: "whole_tumour", 1: "tumour_core"}
    write_dicom_seg(segmentation, geometry, files, labels, tmp_path / "seg.dcm", regions={2: (1, 2), 1: (1,)})
    seg = hd.seg.segread(tmp_path / "seg.dcm")
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["whole_tumour", "tumour_core"]
    source_uids = {f"1.2.3.78.{i + 1}": i for i in range(5)}
    voxels = {1: 0, 2: 0}
    for frame, item in zip(seg.pixel_array, seg.PerFrameFunctionalGroupsSequence, strict=True):
        z = source_uids[item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        number = item.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        expected = segmentation[z] > 0 if number == 1 else segmentation[z] == 1
        assert np.array_equal(frame.astype(bool), expected)
        voxels[number] += int(frame.astype(bool).sum())
    assert voxels == {1: int((segmentation > 0).sum()), 2: int((segmentation == 1).sum())}  # they overlap


def test_reading_a_series_leaves_the_process_text_encoding_alone(tmp_path):
    """A service that reads DICOM through autoseg still decodes UTF-8 text (GDCM may reset the C locale)."""
    write_series(tmp_path, volume(), "1.2.3.77")
    before = locale.setlocale(locale.LC_ALL, None), locale.getpreferredencoding(False)
    cases, _ = discover_inputs([tmp_path], num_channels=1)
    read_input_case(cases[0], num_channels=1)
    assert (locale.setlocale(locale.LC_ALL, None), locale.getpreferredencoding(False)) == before
