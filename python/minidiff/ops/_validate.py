"""Input validation shared by all ops: bad input is a ValueError a user can act
on, raised in Python before any native code sees a pointer."""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch


def as_tensor(x, name: str) -> torch.Tensor:
    """Accept a torch tensor or anything numpy can read; never copy a tensor."""
    if isinstance(x, torch.Tensor):
        return x
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
