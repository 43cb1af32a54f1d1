"""Pictures (PNG, TIFF, JPEG) and other 2D files: channels, pseudo-spacing, round trips, clear errors.

Pictures are made with Pillow, not with autoseg or SimpleITK, as users' tools would make them.
"""

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import write_sitk
from PIL import Image

from autoseg.dataset.image_io import (
    PSEUDO_SPACING_2D,
    Geometry,
    ImageReadError,
    read_header,
    read_image,
    read_label,
    write_image,
)


def _rgb(shape=(6, 9), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*shape, 3), dtype=np.uint8)


def test_rgb_png_is_three_channels_of_one_slice_with_pseudo_spacing(tmp_path):
    pixels = _rgb()
    Image.fromarray(pixels).save(tmp_path / "cells_0000.png")
    array, geometry = read_image(tmp_path / "cells_0000.png")
    assert array.shape == (3, 1, 6, 9)
    np.testing.assert_array_equal(array[:, 0], pixels.transpose(2, 0, 1))  # R, G, B in channel order
    assert geometry.shape == (1, 6, 9) and geometry.spacing == (PSEUDO_SPACING_2D, 1.0, 1.0) == (999.0, 1.0, 1.0)
    assert geometry.is_2d
    assert read_header(tmp_path / "cells_0000.png") == geometry  # header-only reads agree with full reads


def test_rgba_png_drops_the_alpha_channel(tmp_path):
    pixels = np.dstack([_rgb(), np.full((6, 9), 128, np.uint8)])
    Image.fromarray(pixels, mode="RGBA").save(tmp_path / "a.png")
    array, _ = read_image(tmp_path / "a.png")
    assert array.shape == (3, 1, 6, 9)
    np.testing.assert_array_equal(array[:, 0], pixels[..., :3].transpose(2, 0, 1))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_greyscale_png_is_one_slice_with_its_values(tmp_path, dtype):
    pixels = (np.arange(35).reshape(5, 7) * (1 if dtype == np.uint8 else 1000)).astype(dtype)
    Image.fromarray(pixels).save(tmp_path / "g.png")
    array, geometry = read_image(tmp_path / "g.png")
    assert array.shape == (1, 5, 7) and array.dtype == dtype
    np.testing.assert_array_equal(array[0], pixels)
    assert geometry.spacing[0] == 999.0


def test_a_1_bit_mask_reads_as_0_and_1_not_0_and_255(tmp_path):
    mask = np.zeros((5, 7), bool)
    mask[1:3, 2:5] = True
    Image.fromarray(mask).save(tmp_path / "mask.png")
    label, _ = read_label(tmp_path / "mask.png")
    np.testing.assert_array_equal(label[0], mask.astype(np.uint8))


def test_a_pictures_dpi_is_ignored_so_a_mask_saved_without_one_still_matches(tmp_path):
    pixels = np.arange(20, dtype=np.uint16).reshape(4, 5)
    Image.fromarray(pixels).save(tmp_path / "scan.tif", dpi=(254, 254))  # 254 dpi would be 0.1 mm per pixel
    Image.fromarray((pixels > 9).astype(np.uint8)).save(tmp_path / "mask.tif")  # no resolution recorded
    Image.fromarray(_rgb((4, 5))).save(tmp_path / "photo.jpg", dpi=(72, 72))
    array, geometry = read_image(tmp_path / "scan.tif")
    np.testing.assert_array_equal(array[0], pixels)
    assert geometry.spacing == (999.0, 1.0, 1.0) and geometry.shape == (1, 4, 5)
    assert read_image(tmp_path / "mask.tif")[1].matches(geometry)
    assert read_image(tmp_path / "photo.jpg")[1].spacing == (999.0, 1.0, 1.0)


def test_a_multi_page_tiff_is_a_3d_volume(tmp_path):
    volume = np.random.default_rng(0).random((4, 5, 6)).astype(np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(volume), str(tmp_path / "stack.tiff"))
    array, geometry = read_image(tmp_path / "stack.tiff")
    np.testing.assert_array_equal(array, volume)
    assert geometry.shape == (4, 5, 6) and not geometry.is_2d


def test_a_tiff_stack_takes_its_spacing_from_the_json_beside_it_as_in_nnunet(tmp_path):
    volume = np.random.default_rng(1).integers(0, 255, (4, 5, 6)).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(volume), str(tmp_path / "em_0000.tif"))
    assert read_image(tmp_path / "em_0000.tif")[1].spacing == (1.0, 1.0, 1.0)  # no spacing file: 1 per voxel
    (tmp_path / "em_0000.json").write_text('{"spacing": [40.0, 4.0, 4.0]}')  # z, y, x: an EM stack
    array, geometry = read_image(tmp_path / "em_0000.tif")
    np.testing.assert_array_equal(array, volume)
    assert geometry.spacing == (40.0, 4.0, 4.0) and read_header(tmp_path / "em_0000.tif") == geometry
    (tmp_path / "em_0000.json").write_text('{"spacing": [40.0, 4.0]}')
    with pytest.raises(ImageReadError, match=r"em_0000\.json.*three positive numbers"):
        read_image(tmp_path / "em_0000.tif")
    (tmp_path / "em_0000.json").write_text('{"voxel": 1}')
    with pytest.raises(ImageReadError, match=r"em_0000\.json.*spacing"):
        read_header(tmp_path / "em_0000.tif")
    (tmp_path / "em_0000.json").unlink()
    # nnU-Net's own naming: channel files <case>_<cccc>.tif share <case>.json with the label map <case>.tif
    (tmp_path / "em.json").write_text('{"spacing": [30.0, 5.0, 5.0]}')
    assert read_header(tmp_path / "em_0000.tif").spacing == (30.0, 5.0, 5.0)


def test_writing_a_tiff_stack_writes_its_spacing_file_so_it_reads_back_on_its_grid(tmp_path):
    geometry = Geometry((40.0, 4.0, 4.0), (0.0, 0.0, 0.0), (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0), (3, 5, 6))
    labels = np.random.default_rng(2).integers(0, 3, (3, 5, 6)).astype(np.uint8)
    write_image(tmp_path / "em.tif", labels, geometry)
    assert (tmp_path / "em.json").is_file()
    array, back = read_label(tmp_path / "em.tif")
    np.testing.assert_array_equal(array, labels)
    assert back.spacing == geometry.spacing and back.shape == geometry.shape


def test_jpeg_reads_and_a_truncated_one_is_refused(tmp_path):
    Image.fromarray(_rgb((40, 50))).save(tmp_path / "photo.jpg", quality=95)
    array, geometry = read_image(tmp_path / "photo.jpg")
    assert array.shape == (3, 1, 40, 50) and geometry.is_2d
    data = (tmp_path / "photo.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])  # libjpeg would fill the rest with grey
    with pytest.raises(ImageReadError, match="truncated") as info:
        read_image(tmp_path / "cut.jpg")
    assert info.value.path == tmp_path / "cut.jpg"


@pytest.mark.parametrize("make, fragment", [
    (lambda p: p.write_bytes(b"not a picture"), "unreadable"),
    (lambda p: p.write_bytes(p.with_suffix(".ok").read_bytes()[:200]), "truncated"),
    (lambda p: Image.fromarray(np.zeros((4, 4, 2), np.uint8), mode="LA").save(p), "alpha"),
])
def test_a_bad_png_is_an_image_read_error_naming_the_file(tmp_path, make, fragment):
    Image.fromarray(_rgb((60, 60))).save(tmp_path / "x.ok", format="PNG")
    path = tmp_path / "x.png"
    make(path)
    with pytest.raises(ImageReadError, match=fragment) as info:
        read_image(path)
    assert str(path) in str(info.value)


def test_an_rgb_label_file_is_refused_with_what_to_do(tmp_path):
    Image.fromarray(_rgb()).save(tmp_path / "label.png")
    with pytest.raises(ImageReadError, match="3 colour channels.*greyscale.*label ids") as info:
        read_label(tmp_path / "label.png")
    assert info.value.path == tmp_path / "label.png"
    palette = Image.fromarray(np.eye(6, 9, dtype=np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0])
    palette.save(tmp_path / "palette.png")
    with pytest.raises(ImageReadError, match="palette PNG"):
        read_label(tmp_path / "palette.png")


@pytest.mark.parametrize("suffix, dtype", [(".png", np.uint8), (".png", np.uint16), (".tif", np.uint8),
                                           (".nii.gz", np.uint8)])
def test_a_2d_file_read_and_written_back_keeps_its_shape_values_and_dimension(tmp_path, suffix, dtype):
    pixels = (np.arange(35).reshape(5, 7) * (1 if dtype == np.uint8 else 1500)).astype(dtype)
    Image.fromarray(pixels).save(tmp_path / "in.png")
    array, geometry = read_image(tmp_path / "in.png")
    out = tmp_path / f"out{suffix}"
    write_image(out, array, geometry)
    back, back_geometry = read_image(out)
    np.testing.assert_array_equal(back, array)
    assert back.dtype == dtype and back_geometry == geometry
    assert sitk.ReadImage(str(out)).GetDimension() == 2  # still a 2D file, not a slab of thickness 999
    if suffix == ".png":
        assert Image.open(out).size == (7, 5)  # width, height as the input's
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"in.png", out.name})


def test_png_output_refuses_what_png_cannot_hold(tmp_path):
    geometry = Geometry((999.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()), (1, 4, 5))
    with pytest.raises(ValueError, match="8- or 16-bit unsigned"):
        write_image(tmp_path / "x.png", np.zeros((1, 4, 5), np.float32), geometry)
    volume = Geometry((2.0, 1.0, 1.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()), (3, 4, 5))
    with pytest.raises(ValueError, match="one slice"):
        write_image(tmp_path / "x.png", np.zeros((3, 4, 5), np.uint8), volume)
    with pytest.raises(ValueError, match="lossy"):
        write_image(tmp_path / "x.jpg", np.zeros((1, 4, 5), np.uint8), geometry)
    assert not list(tmp_path.iterdir())


def test_a_single_slice_nifti_stays_3d_with_its_header_spacing(tmp_path):
    slab = np.arange(72, dtype=np.int16).reshape(1, 8, 9)
    path = write_sitk(tmp_path / "slice.nii.gz", slab, spacing=(5.0, 0.75, 0.75))
    array, geometry = read_image(path)
    assert array.shape == (1, 8, 9) and geometry.spacing == (5.0, 0.75, 0.75) and not geometry.is_2d
    write_image(tmp_path / "back.nii.gz", array, geometry)
    assert sitk.ReadImage(str(tmp_path / "back.nii.gz")).GetDimension() == 3
    assert read_image(tmp_path / "back.nii.gz")[1] == geometry
