"""Smoke test: the storage benchmark runs end to end on tiny synthetic volumes."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_bench_store_prints_both_formats_and_the_machine(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_store.py"), "--synthetic", "2x12x14x10", "--cases", "2",
         "--patches", "6x6x6", "1x8x8", "--reads", "2", "--compare", "--tmp-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "Machine:" in out and ("avx2 yes" in out or "avx2 no" in out)
    assert "npy (memory-mapped, page cache)" in out and "store default" in out and "2D layout" in out
    assert "6x6x6 patches/s" in out and "1x8x8 patches/s" in out
    assert list(tmp_path.iterdir()) == []  # the benchmark cleans up its files
