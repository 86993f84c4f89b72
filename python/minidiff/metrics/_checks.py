"""Validation shared by all metrics, and the result/skip conventions.

Every metric validates before computing: wrong shapes, labels outside
``[0, C)``, NaN/Inf, and probabilities that are not distributions raise
ValueError naming the argument and what to do. A metric that needs labels and
gets ``None`` raises :class:`MetricSkipped`, which the study turns into a stated
reason in the report instead of a crash.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch

from ..ops._validate import as_tensor, check_has_data, int_scalar, real_scalar  # noqa: F401  (re-exported)

# tolerance on sum_c p_c = 1, as in minidiff.agreement: float32 softmax outputs summed over
# up to ~1e5 classes stay well inside 1e-3; float16/bfloat16 outputs need 1e-2
PROB_SUM_ATOL = 1e-3
PROB_SUM_ATOL_HALF = 1e-2


class MetricSkipped(Exception):
    """A metric could not be measured on this input (not an error in the input).

    Attributes
    ----------
    metric : str
        Name of the metric (``"accuracy"``, ``"mcnemar"``, ...).
    reason : str
        One sentence for the report, e.g. ``"needs labels; the dataset has none"``.
    """

    def __init__(self, metric: str, reason: str) -> None:
        super().__init__(f"{metric} skipped: {reason}")
        self.metric = metric
        self.reason = reason


def _jsonable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        v = check_has_data(v, "a value to write").detach().cpu().numpy()
    if isinstance(v, np.ndarray):
        return [_jsonable(x) for x in v.tolist()] if v.ndim else _jsonable(v.item())
    if isinstance(v, (np.floating, float)):
        v = float(v)
        return None if math.isnan(v) or math.isinf(v) else v
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.bool_,)):
        return bool(v)
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return v.to_dict() if hasattr(v, "to_dict") else {f.name: _jsonable(getattr(v, f.name))
                                                          for f in dataclasses.fields(v)}
    return v


def to_jsonable(value: Any) -> Any:
    """Plain JSON types from tensors, arrays, numpy scalars, results and containers;
    NaN and Inf become None (JSON has neither)."""
    return _jsonable(value)


class Result:
    """Mixin for metric result dataclasses: ``to_dict()`` gives JSON-ready values
    (tensors -> lists, NaN/Inf -> None, nested results -> dicts)."""

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}  # type: ignore[arg-type]


def check_probs(probs: Any, name: str = "probs", num_classes: int | None = None) -> torch.Tensor:
    """Validate ``(M, C)`` class probabilities; return them as float64 on their device."""
    p = as_tensor(probs, name)
    if not p.is_floating_point():
        raise ValueError(f"{name} must be floating point probabilities, got dtype {p.dtype}")
    if p.ndim != 2:
        raise ValueError(f"{name} must be 2-D (examples, classes), got shape {tuple(p.shape)}")
    if num_classes is not None and p.shape[1] != num_classes:
        raise ValueError(f"{name} has {p.shape[1]} classes, expected {num_classes}")
    atol = PROB_SUM_ATOL_HALF if p.dtype in (torch.float16, torch.bfloat16) else PROB_SUM_ATOL
    p = p.detach().to(torch.float64)
    bad = int((~torch.isfinite(p)).sum())
    if bad:
        raise ValueError(f"{name} contains {bad} NaN/Inf value(s); check the model outputs")
    if p.numel():
        if float(p.min()) < -1e-6 or float(p.max()) > 1 + 1e-6:
            raise ValueError(f"{name} has values outside [0, 1] (min {float(p.min()):.4g}, max {float(p.max()):.4g}); "
                             "pass softmax probabilities, not logits")
        err = float((p.sum(dim=1) - 1).abs().max())
        if err > atol:
            raise ValueError(f"{name} rows must sum to 1 (worst row is off by {err:.3g}); "
                             "pass softmax probabilities, not logits")
    return p


def check_preds(preds: Any, name: str = "preds", ndim: int = 1, num_classes: int | None = None) -> torch.Tensor:
    """Validate integer predicted labels, ``(M,)`` (ndim=1) or ``(N, M)`` (ndim=2); return int64 on
    the CPU (labels and predictions are small; the metrics on them are counting)."""
    t = as_tensor(preds, name)
    if t.is_floating_point() or t.dtype == torch.bool or t.is_complex():
        raise ValueError(f"{name} must hold integer class labels, got dtype {t.dtype}")
    if ndim == 2 and t.ndim == 1:
        t = t.unsqueeze(0)
    if t.ndim != ndim:
        want = "(M,)" if ndim == 1 else "(N, M) (models x examples)"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    t = t.detach().to(device="cpu", dtype=torch.int64)
    if t.numel():
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or (num_classes is not None and hi >= num_classes):
            rng = f"[0, {num_classes})" if num_classes is not None else ">= 0"
            raise ValueError(f"{name} values must lie in {rng}; got range [{lo}, {hi}]")
    return t


def require_labels(labels: Any, metric: str, m: int, num_classes: int | None = None) -> torch.Tensor:
    """Labels ``(m,)`` validated, or :class:`MetricSkipped` when ``labels`` is None."""
    if labels is None:
        raise MetricSkipped(metric, "needs labels; the dataset has none")
    y = check_preds(labels, "labels", 1, num_classes)
    if y.shape[0] != m:
        raise ValueError(f"labels has {y.shape[0]} entries but the predictions cover {m} examples")
    return y


def check_same_length(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape[-1] != b.shape[-1]:  # examples are the last dimension of predictions
        raise ValueError(f"{name_a} and {name_b} cover different numbers of examples "
                         f"({tuple(a.shape)} vs {tuple(b.shape)}); run both models on the same data")


def check_embeddings(x: Any, name: str) -> torch.Tensor:
    """Validate ``(M, d)`` embeddings (finite, floating point)."""
    t = as_tensor(x, name)
    if not t.is_floating_point():
        raise ValueError(f"{name} must be floating point, got dtype {t.dtype}")
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D (examples, features), got shape {tuple(t.shape)}; "
                         "flatten or pool token/spatial dimensions first")
    bad = int((~torch.isfinite(t)).sum())
    if bad:
        raise ValueError(f"{name} contains {bad} NaN/Inf value(s)")
    return t.detach()


MIN_BOOTSTRAP = 100
"""Fewest bootstrap resamples a metric accepts. A percentile interval's endpoints are
the ``(1 -+ confidence)/2`` quantiles of the resampled statistics: with one resample
(or a handful) they collapse onto single draws and the "interval" is noise that can
flip a verdict. 100 keeps the Monte Carlo error of a 95% endpoint to a fraction of the
interval's width; Efron & Tibshirani (1993, ch. 19) advise 1000 or more for percentile
intervals, and the metrics default to 2000."""


def check_bootstrap(n_boot: Any, confidence: Any) -> tuple[int, float]:
    """``(n_boot, confidence)`` validated: ``n_boot >= MIN_BOOTSTRAP`` (see there for
    why), ``0 < confidence < 1``."""
    n = int_scalar(n_boot, "n_boot")
    if n < MIN_BOOTSTRAP:
        raise ValueError(f"n_boot={n}: a bootstrap interval needs at least {MIN_BOOTSTRAP} resamples (with "
                         "fewer, its endpoints are single draws and the interval is noise); use the default "
                         "2000, or 1000 or more for a percentile interval")
    return n, real_scalar(confidence, "confidence", lo=0.0, hi=1.0)


def check_sample(values: Any, name: str) -> np.ndarray:
    """A non-empty finite 1-D sample as float64 numpy, read without passing through
    float32 (``torch.as_tensor`` of a Python list of floats would make float32)."""
    if isinstance(values, torch.Tensor):
        check_has_data(values, name)
        if values.is_complex() or values.dtype == torch.bool:
            raise TypeError(f"{name} must hold real numbers, got dtype {values.dtype}")
        a = values.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        try:
            a = np.asarray(values)
        except Exception as exc:
            raise TypeError(f"{name} must be a 1-D array-like of numbers, got {type(values).__name__}") from exc
        if a.dtype == object or a.dtype.kind not in "iuf":
            raise TypeError(f"{name} must hold real numbers, got {a.dtype}")
        a = a.astype(np.float64)
    if a.ndim != 1 or a.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sample, got shape {a.shape}")
    bad = int((~np.isfinite(a)).sum())
    if bad:
        raise ValueError(f"{name} contains {bad} NaN/Inf value(s)")
    return a


def percentiles(values: torch.Tensor, qs: tuple[float, ...] = (50, 90, 99)) -> dict[str, float]:
    """Linear-interpolated percentiles (numpy's default) as ``{"p50": ..., ...}``."""
    v = values.detach().cpu().to(torch.float64).numpy()
    if v.size == 0:
        return {f"p{int(q)}": float("nan") for q in qs}
    return {f"p{int(q)}": float(x) for q, x in zip(qs, np.percentile(v, qs))}
