"""Read and write medical images as numpy arrays together with their exact geometry.

Arrays use SimpleITK's numpy axis order: spatial axes (z, y, x), and a 4D file becomes
(channels, z, y, x). `Geometry.spacing` follows the array axes; `origin` and `direction` keep
SimpleITK's physical (x, y, z) convention so they can be handed back unchanged on writing.

A 2D file (a PNG, a 2D NIfTI...) becomes one slice (1, y, x) whose spacing along the added axis
is `PSEUDO_SPACING_2D`, so no later stage mistakes it for a thin 3D slab; writing such a geometry
gives back a 2D file. Colour pictures (PNG, TIFF, JPEG with RGB pixels) become three channels
(3, 1, y, x); an alpha channel is dropped.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
import shutil
import struct
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from autoseg.atomic import atomic_path, write_json
from autoseg.errors import AutosegError

log = logging.getLogger(__name__)

MEDICAL_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
# Pictures without a medical header ("natural images" in nnU-Net's words): 2D, possibly RGB(A), and a
# multi-page TIFF may be a 3D stack. JPEG is read only: lossy compression would corrupt a label map.
NATURAL_IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
SUPPORTED_SUFFIXES = MEDICAL_SUFFIXES + NATURAL_IMAGE_SUFFIXES
WRITE_SUFFIXES = tuple(s for s in SUPPORTED_SUFFIXES if s not in (".jpg", ".jpeg"))
PSEUDO_SPACING_2D = 999.0  # spacing of the axis a 2D image lacks (nnU-Net uses the same value)


class ImageReadError(AutosegError):
    """A file that cannot be read as an image; the message names the file and the reason."""

    def __init__(self, path: Path | str, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self):  # rebuilt intact when raised in a worker process
        return type(self), (self.path, self.reason)


@dataclass(frozen=True)
class Geometry:
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]
    shape: tuple[int, ...]

    @property
    def is_2d(self) -> bool:
        """Read from a 2D file: one slice whose missing axis carries PSEUDO_SPACING_2D."""
        return len(self.shape) == 3 and self.shape[0] == 1 and self.spacing[0] == PSEUDO_SPACING_2D

    def matches(self, other: "Geometry", tolerance: float = 1e-4) -> bool:
        """Same grid: equal shape, spacing/origin/direction equal within a relative tolerance."""
        return self.shape == other.shape and not self.differences(other, tolerance)

    def differences(self, other: "Geometry", tolerance: float = 1e-4) -> list[str]:
        """Human-readable list of what differs between two grids (empty when they match)."""
        problems = []
        if self.shape != other.shape:
            problems.append(f"shape {self.shape} vs {other.shape}")
        # Spacing and direction are compared relatively; the origin in units of the voxel size, since
        # a relative test would let an origin far from 0 drift by whole voxels. The pseudo-spacing of a
        # 2D file's missing axis is no voxel size: it would let the in-plane values drift by a whole pixel.
        voxel = float(np.abs(self.spacing[1:] if self.is_2d else self.spacing).max(initial=1.0))
        scale = {"spacing": max(1.0, voxel), "origin": voxel, "direction": 1.0}
        for name in ("spacing", "origin", "direction"):
            a, b = np.asarray(getattr(self, name)), np.asarray(getattr(other, name))
            atol = tolerance * scale[name]
            if a.shape != b.shape or not np.allclose(a, b, rtol=0.0 if name == "origin" else tolerance, atol=atol):
                problems.append(f"{name} {tuple(float(x) for x in np.round(a, 5))} vs "
                                f"{tuple(float(x) for x in np.round(b, 5))}")
        return problems

    def to_json(self) -> dict:
        return {"spacing": list(self.spacing), "origin": list(self.origin),
                "direction": list(self.direction), "shape": list(self.shape)}

    @classmethod
    def from_json(cls, d: dict) -> "Geometry":
        return cls(tuple(map(float, d["spacing"])), tuple(map(float, d["origin"])),
                   tuple(map(float, d["direction"])), tuple(map(int, d["shape"])))


def image_suffix(path: Path | str) -> str | None:
    name = Path(path).name.lower()
    for suffix in SUPPORTED_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    return None


def strip_suffix(path: Path | str) -> str:
    """File name without its image extension (`case_001.nii.gz` -> `case_001`)."""
    name = Path(path).name
    suffix = image_suffix(name)
    return name[: -len(suffix)] if suffix else name


def _geometry_of(image: sitk.Image | sitk.ImageFileReader, natural: bool = False) -> Geometry:
    """Spatial geometry of an image, or of a reader after ReadImageInformation (same getters).

    A 2D image gets a leading axis of length 1 and spacing PSEUDO_SPACING_2D; a picture (`natural`:
    PNG, TIFF, JPEG) has 1 unit per pixel whatever resolution its file records."""
    dim = image.GetDimension()
    size = image.GetSize()
    if dim == 4:  # channels on the 4th axis (Decathlon): keep the spatial part of the geometry
        spacing, origin = image.GetSpacing()[:3], image.GetOrigin()[:3]
        d = np.array(image.GetDirection()).reshape(4, 4)[:3, :3]
        direction = tuple(d.ravel())
        shape = tuple(reversed(size[:3]))
    else:
        spacing, origin, direction = image.GetSpacing(), image.GetOrigin(), image.GetDirection()
        shape = tuple(reversed(size))
    spacing = tuple(float(s) for s in reversed(spacing))
    if natural:
        # A picture's DPI says how it was printed, not what a pixel measures; tools disagree on it
        # (a mask saved without one would no longer match its image), so a pixel is 1 unit, as nnU-Net does.
        spacing = (1.0,) * len(spacing)
    if dim == 2:
        return Geometry((PSEUDO_SPACING_2D, *spacing), (*map(float, origin), 0.0),
                        _embed_direction_2d(direction), (1, *map(int, shape)))
    return Geometry(spacing, tuple(map(float, origin)), tuple(map(float, direction)), tuple(int(s) for s in shape))


def _checked_suffix(path: Path) -> str:
    if not path.is_file():
        raise ImageReadError(path, "file not found")
    suffix = image_suffix(path)
    if suffix is None:
        raise ImageReadError(path, f"unsupported file type; use one of {', '.join(SUPPORTED_SUFFIXES)}")
    return suffix


TIFF_SUFFIXES = (".tif", ".tiff")


def spacing_file(path: Path | str) -> Path:
    """Where a 3D TIFF's spacing lives: a JSON file {"spacing": [z, y, x]} beside it (TIFF stacks have no
    slice spacing of their own). nnU-Net v2's convention: `<case>.json` for a channel file
    `<case>_<cccc>.tif` and for a label map `<case>.tif`; `<name>.json` for exactly `<name>.tif` is
    accepted too. Returns the file that exists, else `<name>.json` (what `write_image` writes)."""
    path = Path(path)
    stem = strip_suffix(path)
    exact = _own_spacing_file(path)
    if not exact.is_file() and len(stem) > 5 and stem[-5] == "_" and stem[-4:].isdigit():
        without_channel = path.with_name(stem[:-5] + ".json")
        if without_channel.is_file():
            return without_channel
    return exact


def _own_spacing_file(path: Path) -> Path:
    """`<name>.json` for `<name>.tif`: the one file that belongs to this TIFF alone (what `write_image` writes)."""
    return path.with_name(strip_suffix(path) + ".json")


def _with_tiff_spacing(path: Path, geometry: Geometry) -> Geometry:
    """A 3D TIFF's geometry with the spacing of its spacing file, when there is one (else 1 per voxel)."""
    if image_suffix(path) not in TIFF_SUFFIXES or geometry.is_2d:
        return geometry
    aux = spacing_file(path)
    if not aux.is_file():
        return geometry
    try:
        spacing = json.loads(aux.read_text(encoding="utf-8"))["spacing"]
        spacing = tuple(float(s) for s in spacing)
    except (ValueError, KeyError, TypeError) as exc:
        raise ImageReadError(aux, f"not a spacing file for {path.name}: expected {{\"spacing\": [z, y, x]}} "
                                  f"({type(exc).__name__}: {exc})") from None
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ImageReadError(aux, f"spacing {list(spacing)} for {path.name}: three positive numbers (z, y, x) needed")
    return Geometry(spacing, geometry.origin, geometry.direction, geometry.shape)


def read_header(path: Path | str) -> Geometry:
    """Geometry without reading the voxels (fast integrity checks); the same as read_image's."""
    path = Path(path)
    suffix = _checked_suffix(path)
    if suffix == ".png":
        _check_png_colour_type(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise ImageReadError(path, f"unreadable image header ({_first_line(exc)})") from None
    return _with_tiff_spacing(path, _geometry_of(reader, suffix in NATURAL_IMAGE_SUFFIXES))


def read_image(path: Path | str) -> tuple[np.ndarray, Geometry]:
    """Voxels as a numpy array and the geometry: (z, y, x) for one channel, (c, z, y, x) for a 4D
    file or colour pixels (RGB(A) -> 3 channels, alpha dropped); a 2D file gives z = 1."""
    path = Path(path)
    suffix = _checked_suffix(path)
    natural = suffix in NATURAL_IMAGE_SUFFIXES
    png = _check_png_colour_type(path) if suffix == ".png" else None
    if suffix in (".jpg", ".jpeg"):
        _check_jpeg_complete(path)
    _check_nifti_complete(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise ImageReadError(path, f"unreadable or truncated image ({_first_line(exc)})") from None
    components = image.GetNumberOfComponentsPerPixel()
    if components != 1 and not natural:
        raise ImageReadError(path, "vector/RGB pixels are not supported; store channels as separate files or a 4D "
                                   "image")
    if image.GetDimension() not in (2, 3, 4) or (image.GetDimension() == 4 and components != 1):
        raise ImageReadError(path, f"{image.GetDimension()}D images{' with vector pixels' if components != 1 else ''} "
                                   "are not supported")
    geometry = _with_tiff_spacing(path, _geometry_of(image, natural))
    array = sitk.GetArrayFromImage(image)
    if components != 1:  # colour: components last in the array -> channels first
        array = np.moveaxis(array, -1, 0)
        if components == 4:
            log.debug("%s: RGBA pixels, alpha channel dropped", path)
            array = array[:3]
        array = np.ascontiguousarray(array)
    if image.GetDimension() == 2:
        array = array[:, None] if components != 1 else array[None]
    if png is not None and png[1] == 0 and png[0] < 8:  # libpng stretches 1/2/4-bit grey to 0..255: undo it
        array = array // (255 // (2 ** png[0] - 1))
    return array, geometry


def read_label(path: Path | str) -> tuple[np.ndarray, Geometry]:
    """A label map as (z, y, x) with its geometry; colour or multi-channel files are refused."""
    path = Path(path)
    array, geometry = read_image(path)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 4:
        if image_suffix(path) in NATURAL_IMAGE_SUFFIXES:
            png = _png_header(path)
            palette = " (a palette PNG is read as its colours)" if png is not None and png[1] == 3 else ""
            raise ImageReadError(path, f"label map has {array.shape[0]} colour channels{palette}; save it as a "
                                       "greyscale image whose pixel values are the label ids (0 = background)")
        raise ImageReadError(path, f"label map has {array.shape[0]} channels; a label map is one volume of label ids")
    return array, geometry


def _png_header(path: Path) -> tuple[int, int] | None:
    """(bit depth, colour type) from a PNG's IHDR chunk; None when the file does not start like a PNG."""
    with open(path, "rb") as f:
        head = f.read(26)
    if len(head) < 26 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return head[24], head[25]


def _check_png_colour_type(path: Path) -> tuple[int, int] | None:
    png = _png_header(path)
    if png is not None and png[1] == 4:  # SimpleITK cannot read it ("Unknown PixelType")
        raise ImageReadError(path, "greyscale PNG with an alpha channel is not supported; save it as plain "
                                   "greyscale (or RGB) without transparency")
    return png


def _check_jpeg_complete(path: Path) -> None:
    """libjpeg reads a truncated JPEG with a warning only (the missing rows come back grey), so look
    for the end-of-image marker after the last start-of-scan marker."""
    data = path.read_bytes()
    scan = data.rfind(b"\xff\xda")
    if scan < 0 or data.find(b"\xff\xd9", scan) < 0:
        raise ImageReadError(path, "truncated image: the JPEG data stops before its end-of-image marker")


def _check_nifti_complete(path: Path) -> None:
    """SimpleITK reads a truncated NIfTI without complaint (the missing voxels come back as zeros),
    so compare the bytes present with what the header announces."""
    suffix = image_suffix(path)
    if suffix not in (".nii", ".nii.gz"):
        return
    with open(path, "rb") as f:
        header = f.read(540)
    if suffix == ".nii" or not header.startswith(b"\x1f\x8b"):  # a .nii.gz may hold uncompressed data
        size = path.stat().st_size
    else:
        try:
            with gzip.open(path, "rb") as f:
                header = f.read(540)
                size = len(header)
                while chunk := f.read(1 << 22):
                    size += len(chunk)
        except (EOFError, OSError, zlib.error) as exc:
            raise ImageReadError(path, f"unreadable or truncated image (compressed data: {exc})") from None
    end = _nifti_data_end(header)
    if end is not None and size < end:
        raise ImageReadError(path, f"truncated image: {size} bytes, the header announces {end}")


def _nifti_data_end(header: bytes) -> int | None:
    """Byte offset where the voxel data of a NIfTI-1/2 file ends (None: not a header we can judge)."""
    for endian in "<>":
        sizeof_hdr = struct.unpack(endian + "i", header[:4])[0] if len(header) >= 4 else 0
        if sizeof_hdr == 348 and len(header) >= 348:
            dim = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            offset = int(struct.unpack(endian + "f", header[108:112])[0])
            break
        if sizeof_hdr == 540 and len(header) >= 540:
            dim = struct.unpack(endian + "8q", header[16:80])
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            offset = struct.unpack(endian + "q", header[168:176])[0]
            break
    else:
        return None
    if not 1 <= dim[0] <= 7 or offset < sizeof_hdr or bitpix <= 0:
        return None
    return offset + math.prod(max(1, int(d)) for d in dim[1:dim[0] + 1]) * bitpix // 8


def write_image(path: Path | str, array: np.ndarray, geometry: Geometry) -> None:
    """Write a (z, y, x) array with the given geometry; atomic (temporary file, then rename).

    A geometry read from a 2D file (`Geometry.is_2d`), or any .png, is written as a 2D image;
    PNG holds uint8 or uint16 only. JPEG is not written (lossy)."""
    path = Path(path)
    suffix = image_suffix(path)
    if suffix not in WRITE_SUFFIXES:
        raise ValueError(f"{path}: unsupported output file type; use one of {', '.join(WRITE_SUFFIXES)}"
                         + (" (JPEG is lossy: write .png)" if suffix in (".jpg", ".jpeg") else ""))
    if tuple(array.shape) != tuple(geometry.shape):
        raise ValueError(f"{path}: array shape {array.shape} does not match geometry shape {geometry.shape}")
    array = np.ascontiguousarray(array)
    if suffix == ".png" and array.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"{path}: PNG holds 8- or 16-bit unsigned integers, not {array.dtype}; "
                         "convert the array or write .tif or .nii.gz")
    if suffix == ".png" or geometry.is_2d:
        if array.shape[0] != 1:
            raise ValueError(f"{path}: a 2D {suffix} file holds one slice, the array has {array.shape[0]}; "
                             "write .tif or .nii.gz")
        image = sitk.GetImageFromArray(array[0])
        image.SetSpacing(tuple(reversed(geometry.spacing[1:])))
        if geometry.is_2d:  # a 3D direction's in-plane block need not be a valid 2D direction
            image.SetOrigin(geometry.origin[:2])
            image.SetDirection(tuple(np.reshape(geometry.direction, (3, 3))[:2, :2].ravel()))
    else:
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(tuple(reversed(geometry.spacing)))
        image.SetOrigin(geometry.origin)
        image.SetDirection(geometry.direction)
    if suffix == ".mhd":
        _write_mhd(path, image)
        return
    if suffix in TIFF_SUFFIXES and not geometry.is_2d and array.ndim == 3:
        # A TIFF stack keeps no slice spacing; its spacing file does (written first: a TIFF without one
        # would read back at 1 per voxel).
        write_json(_own_spacing_file(path), {"spacing": [float(s) for s in geometry.spacing]})
    with atomic_path(path) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=True)


def _write_mhd(path: Path, image: sitk.Image) -> None:
    """A .mhd header names its data file, so write both under their final names in a scratch
    folder beside `path`, then move the data file and finally the header into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent))
    try:
        sitk.WriteImage(image, str(scratch / path.name), useCompression=True)
        for f in sorted(scratch.iterdir(), key=lambda f: f.name == path.name):  # header last
            os.replace(f, path.parent / f.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _embed_direction_2d(direction: tuple[float, ...]) -> tuple[float, ...]:
    d = np.eye(3)
    d[:2, :2] = np.array(direction).reshape(2, 2)
    return tuple(map(float, d.ravel()))


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # SimpleITK's messages start with a C++ source location; the useful part is at the end.
    return lines[-1][:200] if lines else type(exc).__name__
