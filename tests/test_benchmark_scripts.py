"""Every benchmark script starts and explains itself: a moved function or a missing optional
package must show up here, not when someone sits down to take figures."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script", sorted(p.name for p in BENCHMARKS.glob("bench_*.py")))
def test_benchmark_help_runs(script):
    result = subprocess.run([sys.executable, str(BENCHMARKS / script), "--help"], cwd=BENCHMARKS,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout
