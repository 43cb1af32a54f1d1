"""Read and write medical images as numpy arrays together with their exact geometry.

Arrays use SimpleITK's numpy axis order: spatial axes (z, y, x), and a 4D file becomes
(channels, z, y, x). `Geometry.spacing` follows the array axes; `origin` and `direction` keep
SimpleITK's physical (x, y, z) convention so they can be handed back unchanged on writing.
"""

from __future__ import annotations

import gzip
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

from autoseg.atomic import atomic_path

SUPPORTED_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


class ImageReadError(Exception):
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

    def matches(self, other: "Geometry", tolerance: float = 1e-4) -> bool:
        """Same grid: equal shape, spacing/origin/direction equal within a relative tolerance."""
        return self.shape == other.shape and not self.differences(other, tolerance)

    def differences(self, other: "Geometry", tolerance: float = 1e-4) -> list[str]:
        """Human-readable list of what differs between two grids (empty when they match)."""
        problems = []
        if self.shape != other.shape:
            problems.append(f"shape {self.shape} vs {other.shape}")
        # Spacing and direction are compared relatively; the origin in units of the voxel size, since
        # a relative test would let an origin far from 0 drift by whole voxels.
        voxel = float(np.abs(self.spacing).max(initial=1.0))
        for name in ("spacing", "origin", "direction"):
            a, b = np.asarray(getattr(self, name)), np.asarray(getattr(other, name))
            atol = tolerance * voxel if name == "origin" else tolerance * max(1.0, float(np.abs(a).max(initial=0)))
            if a.shape != b.shape or not np.allclose(a, b, rtol=0.0 if name == "origin" else tolerance, atol=atol):
                problems.append(f"{name} {tuple(float(x) for x in np.round(a, 5))} vs {tuple(float(x) for x in np.round(b, 5))}")
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


def _geometry_of(image: sitk.Image | sitk.ImageFileReader) -> Geometry:
    """Spatial geometry of an image, or of a reader after ReadImageInformation (same getters)."""
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
    return Geometry(tuple(float(s) for s in reversed(spacing)), tuple(map(float, origin)),
                    tuple(map(float, direction)), tuple(int(s) for s in shape))


def read_header(path: Path | str) -> Geometry:
    """Geometry without reading the voxels (fast integrity checks)."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(path, "file not found")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise ImageReadError(path, f"unreadable image header ({_first_line(exc)})") from None
    return _geometry_of(reader)


def read_image(path: Path | str) -> tuple[np.ndarray, Geometry]:
    """Voxels as a numpy array ((z, y, x), or (c, z, y, x) for a 4D file) and the geometry."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(path, "file not found")
    if image_suffix(path) is None:
        raise ImageReadError(path, f"unsupported file type; use one of {', '.join(SUPPORTED_SUFFIXES)}")
    _check_nifti_complete(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise ImageReadError(path, f"unreadable or truncated image ({_first_line(exc)})") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ImageReadError(path, "vector/RGB pixels are not supported; store channels as separate files or a 4D image")
    if image.GetDimension() not in (2, 3, 4):
        raise ImageReadError(path, f"{image.GetDimension()}D images are not supported")
    geometry = _geometry_of(image)
    array = sitk.GetArrayFromImage(image)
    if image.GetDimension() == 2:  # a single slice: treat as a 3D volume of thickness 1
        array = array[None]
        geometry = Geometry((1.0, *geometry.spacing), (*geometry.origin, 0.0),
                            _embed_direction_2d(geometry.direction), (1, *geometry.shape))
    return array, geometry


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
    """Write a (z, y, x) array with the given geometry; atomic (temporary file, then rename)."""
    path = Path(path)
    if image_suffix(path) is None:
        raise ValueError(f"{path}: unsupported output file type; use one of {', '.join(SUPPORTED_SUFFIXES)}")
    if tuple(array.shape) != tuple(geometry.shape):
        raise ValueError(f"{path}: array shape {array.shape} does not match geometry shape {geometry.shape}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing(tuple(reversed(geometry.spacing)))
    image.SetOrigin(geometry.origin)
    image.SetDirection(geometry.direction)
    if image_suffix(path) == ".mhd":
        _write_mhd(path, image)
        return
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
    return tuple(d.ravel())


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # SimpleITK's messages start with a C++ source location; the useful part is at the end.
    return lines[-1][:200] if lines else type(exc).__name__
