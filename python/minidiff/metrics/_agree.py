"""Compatibility name for the divergence probability floor; use
:data:`minidiff.agreement.DEFAULT_EPS` (the metrics call :mod:`minidiff.agreement` directly)."""

from ..agreement import DEFAULT_EPS as EPS

__all__ = ["EPS"]
