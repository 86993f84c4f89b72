"""The native core loads, reports its SIMD level, and the SIMD cap works."""

import subprocess
import sys

from minidiff._native import cpu_core


def test_core_loads_and_reports_simd_level():
    C = cpu_core()
    assert C.simd_level() in {"avx512_vnni", "avx512", "avx2", "scalar"}
    feats = C.cpu_features()
    assert set(feats) >= {"avx2", "avx512f", "avx512vnni"}


def test_simd_cap_from_environment():
    code = "from minidiff import _C; print(_C.simd_level())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"MINIDIFF_SIMD": "scalar", "PATH": ""}, check=True)
    assert out.stdout.strip() == "scalar"
