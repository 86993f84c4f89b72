"""Environment switches read in one place (a leaf module: it imports nothing of minidiff)."""

from __future__ import annotations

import os


def triton_interpreting() -> bool:
    """True when Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``): they
    then accept CPU tensors, do not benchmark, and are never the fast choice."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
