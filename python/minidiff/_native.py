"""Loading of the native extensions.

``minidiff._C`` (the CPU core) is always built; ``minidiff._cuda`` only when the
package was built with ``MINIDIFF_CUDA=ON``. Import errors are kept and re-raised
with advice when a caller actually needs the module.
"""

from __future__ import annotations

import functools
from types import ModuleType

# Loaded before _C on purpose: torch's libgomp.so.1 is then the process's OpenMP runtime
# and _C (linked against libgomp.so.1) binds to it, sharing torch's worker threads
# (csrc/parallel.h).
import torch  # noqa: F401


@functools.lru_cache(maxsize=None)
def cpu_core() -> ModuleType:
    """Return ``minidiff._C``; raise ImportError with a fix if it was not built."""
    try:
        from minidiff import _C
    except ImportError as exc:  # pragma: no cover - only on a broken install
        raise ImportError(
            "minidiff's native core minidiff._C is missing. Reinstall with "
            "`pip install -c constraints-cpu.txt .` from the repository root "
            f"(original error: {exc})"
        ) from exc
    return _C


@functools.lru_cache(maxsize=None)
def cuda_core() -> ModuleType | None:
    """Return ``minidiff._cuda`` or None when it was not built (MINIDIFF_CUDA=OFF)."""
    try:
        from minidiff import _cuda
    except ImportError:
        return None
    return _cuda


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when Triton imports (kernels then run on CUDA tensors, or anywhere
    under ``TRITON_INTERPRET=1``)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True
