"""Where does a compressed model diverge from its base? Per-layer localization.

:func:`layer_swap` ranks the layers of a same-architecture variant by how much
their compression moves the output (one layer swapped at a time). Names are
re-exported lazily so ``import minidiff.localize`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> submodule of minidiff.localize that defines it
_EXPORTS: dict[str, str] = {
    "layer_swap": "swap",
    "plan": "swap",
    "swap_modules": "swap",
    "block_names": "swap",
    "linear_names": "swap",
    "LayerSwapResult": "swap",
    "SwapEffect": "swap",
    "SwapPlan": "swap",
}

__all__ = ["LayerSwapResult", "SwapEffect", "SwapPlan", "block_names", "layer_swap", "linear_names", "plan",
           "swap_modules"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
