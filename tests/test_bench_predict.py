"""bench_predict.py's large-volume mode runs end to end on a tiny volume and prints its figures."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_large_volume_mode_predicts_a_synthetic_volume_and_prints_memory_and_seconds():
    result = subprocess.run([sys.executable, str(BENCHMARKS / "bench_predict.py"), "--large", "16x40x32",
                             "--labels", "4", "--spacing", "1.5x0.8x0.8", "--mirroring", "off", "--step-size", "1.0",
                             "--workers", "0"],
                            cwd=BENCHMARKS, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "plan (autoseg's planner, 3d_fullres): patch [16, 40, 32]" in result.stdout
    figures = re.search(r"autoseg \(torch\): 16x40x32, 4 labels, mirroring off, step 1.0: ([\d.]+) s, peak RSS "
                        r"([\d.]+) GiB",
                        result.stdout)
    assert figures, result.stdout
    assert 0 < float(figures.group(1)) and 0.05 < float(figures.group(2)) < 8


def test_colour_pictures_in_one_file_are_linked_as_nnunet_reads_them(tmp_path):
    """An RGB PNG holds its three channels in one file, which nnU-Net's natural-image reader takes as
    `<case>_0000.png`; a 4D NIfTI holding two channels is refused with the fix."""
    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(BENCHMARKS))
    try:
        from bench_predict import BenchError, link_inputs
    finally:
        sys.path.remove(str(BENCHMARKS))

    pictures = tmp_path / "pictures"
    pictures.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 20, 3), dtype=np.uint8)).save(pictures / "a.png")
    assert link_inputs([pictures], 3, tmp_path / "linked", None) == ["a"]
    assert [p.name for p in (tmp_path / "linked").iterdir()] == ["a_0000.png"]

    import SimpleITK as sitk

    volumes = tmp_path / "volumes"
    volumes.mkdir()
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((2, 4, 5, 6), np.float32)), str(volumes / "b.nii.gz"))
    with pytest.raises(BenchError, match="one file per channel"):
        link_inputs([volumes], 2, tmp_path / "linked2", None)
