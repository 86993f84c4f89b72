"""Human-readable quantities for messages (one place for the byte-size wording)."""

from __future__ import annotations


def human_bytes(nbytes: float) -> str:
    """``nbytes`` in binary units with one decimal: ``1536 -> '1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if nbytes < 1024 or unit == "PiB":
            return f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError("unreachable")
