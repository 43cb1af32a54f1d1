"""bench_predict.py's large-volume mode runs end to end on a tiny volume and prints its figures."""

import re
import subprocess
import sys
from pathlib import Path

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
