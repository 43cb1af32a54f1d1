"""bench_conv_bf16.py runs a few random convolutions end to end, and autoseg's convolutions pass its check."""

import subprocess
import sys
from pathlib import Path

from autoseg.network.layers import kernel_exceeds_map

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from bench_conv_bf16 import draw_cases  # noqa: E402


def test_bench_conv_bf16_reports_both_implementations_and_autoseg_repeats_exactly():
    result = subprocess.run([sys.executable, str(BENCHMARKS / "bench_conv_bf16.py"), "--cases", "12", "--repeats", "3"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "avx512_bf16" in result.stdout  # the machine line names the features the bug depends on
    assert "torch nn.ConvNd:" in result.stdout
    assert "autoseg ConvNd: 0 of 12 wrong (0 crashed the process, 0 hung)" in result.stdout


def test_cases_are_reproducible_and_include_kernels_longer_than_the_map():
    cases = draw_cases(40, seed=3)
    assert cases == draw_cases(40, seed=3) and cases != draw_cases(40, seed=4)
    assert 0 < sum(kernel_exceeds_map(c["size"], c["kernel"]) for c in cases) < len(cases)
    # A one-channel input is read with stride 1, as a U-Net reads the image.
    assert all(c["stride"] == [1] * c["ndim"] for c in cases if c["channels"][0] == 1)

