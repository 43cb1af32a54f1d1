"""Which precision a CPU gets: bfloat16 only where the hardware computes it."""

import pytest
import torch

from autoseg import device
from autoseg.device import cpu_flags, cpu_has_native_bf16, mixed_precision_dtype

X86_CPUINFO = ("processor\t: 0\nmodel name\t: Some Xeon\nflags\t\t: fpu sse2 avx2 avx512f avx512bw {extra}\n\n"
               "processor\t: 1\n")
ARM_CPUINFO = "processor\t: 0\nFeatures\t: fp asimd {extra}\nCPU implementer\t: 0x41\n"


def test_cpu_flags_reads_x86_flags_and_arm_features(tmp_path):
    (tmp_path / "x86").write_text(X86_CPUINFO.format(extra="avx512_bf16"))
    (tmp_path / "arm").write_text(ARM_CPUINFO.format(extra="bf16"))
    assert {"avx2", "avx512f", "avx512_bf16"} <= cpu_flags(tmp_path / "x86")
    assert cpu_flags(tmp_path / "arm") == {"fp", "asimd", "bf16"}
    assert cpu_flags(tmp_path / "missing") is None


@pytest.mark.parametrize("onednn, flags, expected", [
    (True, {"avx512f", "avx512_bf16"}, True),   # Zen 4, Cooper Lake
    (True, {"avx512f", "amx_bf16"}, True),      # Sapphire Rapids
    (True, {"asimd", "bf16"}, True),            # Arm with BF16
    (True, {"avx2", "avx512f", "avx512bw"}, False),  # Skylake to Ice Lake: oneDNN would emulate bf16, slower
    (False, {"avx2"}, False),
    (True, None, True),                         # no /proc/cpuinfo: oneDNN decides
    (False, None, False),
])
def test_bf16_only_where_the_cpu_computes_it(monkeypatch, onednn, flags, expected):
    monkeypatch.setattr(device, "_onednn_takes_bf16", lambda: onednn)
    monkeypatch.setattr(device, "cpu_flags", lambda: flags)
    assert cpu_has_native_bf16() is expected
    assert mixed_precision_dtype(torch.device("cpu")) == (torch.bfloat16 if expected else None)
    assert mixed_precision_dtype(torch.device("cpu"), enabled=False) is None
