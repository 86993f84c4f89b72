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


_FORK_CHILD = r"""
import os, sys, time
import torch
from minidiff.nn import SparseLinear

torch.set_num_threads(2)
g = torch.Generator().manual_seed(0)
lin = torch.nn.Linear(384, 1536)
with torch.no_grad():
    lin.weight[lin.weight.abs() < 0.04] = 0
layer = SparseLinear.from_linear(lin, format="csr")
x = torch.randn(512, 384, generator=g)
want = layer(x).numpy()          # a 2-thread parallel region in the parent first
pid = os.fork()
if pid == 0:                     # torch's own threaded ops would hang here; ours must not
    got = layer(x).numpy()
    os._exit(0 if (got == want).all() else 3)
deadline = time.time() + 60
while time.time() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        sys.exit(os.waitstatus_to_exitcode(status))
    time.sleep(0.05)
os.kill(pid, 9)
sys.exit(4)
"""


def test_one_openmp_runtime_shared_with_torch():
    """_C's parallel regions run on torch's OpenMP runtime: one libgomp in the process."""
    code = ("import torch, minidiff; from minidiff._native import cpu_core; C = cpu_core(); "
            "print(C.parallel_backend()); "
            "print(len({l.split()[-1] for l in open('/proc/self/maps') if 'libgomp' in l}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    backend, runtimes = out.stdout.split()
    assert backend in {"openmp", "threadpool"}
    if backend == "openmp":
        assert runtimes == "1"


def test_kernels_run_in_a_forked_child():
    """After fork() the kernels fall back to one thread instead of waiting for pool
    threads that the child does not have (exit 4 = hung, 3 = wrong result)."""
    out = subprocess.run([sys.executable, "-c", _FORK_CHILD], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
