"""Input validation shared by all ops: bad input is a ValueError a user can act
on, raised in Python before any native code sees a pointer."""

from __future__ import annotations

import math
from typing import Any, Iterable

import numpy as np
import torch


def check_has_data(t: torch.Tensor, name: str) -> torch.Tensor:
    """Refuse a tensor with no values to read: a ``meta`` tensor carries a shape and a
    dtype only (models built under ``torch.device("meta")`` or loaded with empty
    weights), so every number computed from it would be made up."""
    if t.device.type == "meta":
        raise ValueError(f"{name} is a 'meta' tensor: it has a shape {tuple(t.shape)} but no values, so nothing "
                         "can be measured from it. Materialize it first (a model made on the meta device: "
                         "model.to_empty(device='cpu') and then load its weights)")
    return t


def as_tensor(x, name: str) -> torch.Tensor:
    """Accept a torch tensor or anything numpy can read; never copy a tensor."""
    if isinstance(x, torch.Tensor):
        return check_has_data(x, name)
    try:
        return torch.as_tensor(np.asarray(x))
    except Exception as exc:
        raise ValueError(f"{name} must be a torch tensor or array-like, got {type(x).__name__}") from exc


def check_ndim(t: torch.Tensor, ndim: int, name: str, shape_hint: str) -> None:
    if t.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D with shape {shape_hint}, got shape {tuple(t.shape)}")


def check_dtype(t: torch.Tensor, allowed: Iterable[torch.dtype], name: str) -> None:
    allowed = tuple(allowed)
    if t.dtype not in allowed:
        names = ", ".join(str(d).replace("torch.", "") for d in allowed)
        raise ValueError(f"{name} has dtype {str(t.dtype).replace('torch.', '')}; expected one of: {names}")


def check_finite(t: torch.Tensor, name: str) -> None:
    if t.is_floating_point():
        bad = (~torch.isfinite(t)).sum().item()
        if bad:
            raise ValueError(f"{name} contains {bad} non-finite value(s) (NaN or Inf); "
                             "check the model outputs or data feeding it")


def native_ready(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Contiguous CPU/CUDA tensor of the requested dtype, safe to hand to native code by pointer."""
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    return t.contiguous()


def num_threads() -> int:
    """Thread count for native CPU kernels: torch's own, so we never oversubscribe."""
    return max(1, torch.get_num_threads())


def real_scalar(value: Any, name: str, *, lo: float | None = None, hi: float | None = None,
                lo_open: bool = True, hi_open: bool = True) -> float:
    """A finite real number as ``float``: Python ``int``/``float``, numpy scalars and
    0-d arrays or tensors are all accepted (never ``bool``, complex or strings);
    ``lo``/``hi`` bound it (open bounds by default). Raises TypeError / ValueError
    naming ``name``."""
    v = value
    if isinstance(v, torch.Tensor):
        if v.numel() != 1 or v.ndim != 0:
            raise TypeError(f"{name} must be a real scalar, got a tensor of shape {tuple(v.shape)}")
        v = v.item()
    elif isinstance(v, np.ndarray):
        if v.ndim != 0:
            raise TypeError(f"{name} must be a real scalar, got an array of shape {v.shape}")
        v = v.item()
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    f = float(v)
    if not math.isfinite(f):
        raise ValueError(f"{name} must be finite, got {f}")
    if lo is not None and (f < lo or (lo_open and f == lo)):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {f}")
    if hi is not None and (f > hi or (hi_open and f == hi)):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {f}")
    return f


def int_scalar(value: Any, name: str, *, lo: int | None = None, hi: int | None = None) -> int:
    """An integer as ``int`` (Python/numpy integers, 0-d integer arrays or tensors;
    never ``bool`` or a float such as 2.5), within ``[lo, hi]``."""
    v = value
    if isinstance(v, (torch.Tensor, np.ndarray)) and v.ndim == 0 and not (v.dtype == torch.bool or v.dtype == np.bool_):
        v = v.item()
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    i = int(v)
    if (lo is not None and i < lo) or (hi is not None and i > hi):
        rng = f"[{lo if lo is not None else '-inf'}, {hi if hi is not None else 'inf'}]"
        raise ValueError(f"{name} must be in {rng}, got {i}")
    return i
