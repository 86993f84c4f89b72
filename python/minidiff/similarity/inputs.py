"""Input validation shared by the similarity functions and accumulators.

Features are ``(n, d)`` floating-point tensors (or numpy arrays; trailing
dimensions are flattened per sample), rows aligned across every layer of both
models. Every check raises ``ValueError`` naming the layer and saying how to fix it.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from minidiff.ops._validate import check_has_data

KERNELS = ("linear", "rbf")
ESTIMATORS = ("biased", "unbiased")
ACC_ESTIMATORS = ("biased", "unbiased", "minibatch")
_EPS = float(torch.finfo(torch.float64).eps)


def _as_features(x, what: str, check_finite: bool = True) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = check_has_data(x, what).detach()
    else:
        try:
            t = torch.as_tensor(np.asarray(x))
        except Exception as exc:
            raise ValueError(f"{what} must be a torch tensor or a numpy array, got {type(x).__name__}") from exc
    if t.is_complex() or not t.is_floating_point():
        raise ValueError(f"{what} has dtype {str(t.dtype).replace('torch.', '')}; CKA needs floating-point "
                         "features (float16, bfloat16, float32 or float64): cast with .float()")
    if t.ndim < 2:
        raise ValueError(f"{what} must have shape (n_samples, features...), got shape {tuple(t.shape)}")
    if t.ndim > 2:
        t = t.reshape(t.shape[0], -1)
    if check_finite:
        _check_finite(t, what)
    return t


def _check_finite(t: torch.Tensor, what: str) -> None:
    # The sum is non-finite whenever any element is (one cheap pass); only then
    # count them (a finite input whose sum overflows passes after the count).
    if not math.isfinite(float(t.sum())):
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise ValueError(f"{what} contains {bad} non-finite value(s) (NaN or Inf) out of {t.numel()}; "
                             "check the model outputs feeding this layer")


def _layer_list(feats, side: str) -> list:
    if isinstance(feats, (torch.Tensor, np.ndarray)):
        raise ValueError(f"feats_{side} must be a list of per-layer (n, d_l) features, got a single array; "
                         "wrap it in a list")
    feats = list(feats)
    if not feats:
        raise ValueError(f"feats_{side} is empty: pass at least one layer")
    return feats


def _names(names, count: int, side: str) -> list[str]:
    if names is None:
        return [f"{side}[{i}]" for i in range(count)]
    names = [str(s) for s in names]
    if len(names) != count:
        raise ValueError(f"names_{side} has {len(names)} entries for {count} layers")
    return names


def _check_rows(layers: Sequence[torch.Tensor], names: Sequence[str], n: int | None) -> int:
    for t, name in zip(layers, names):
        if n is None:
            n = t.shape[0]
        elif t.shape[0] != n:
            raise ValueError(f"layer {name} has {t.shape[0]} samples but the others have {n}: every layer "
                             "of both models must see the same examples in the same order")
    return n


def _compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    return torch.float64 if torch.float64 in dtypes else torch.float32


def _offsets(dims: Sequence[int]) -> list[int]:
    return [0] + np.cumsum(dims).tolist()

