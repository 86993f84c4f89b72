"""Summaries of a sample of per-example values: quantiles and histograms.

One implementation for every place that reports a distribution (divergence
percentiles, confidence quantiles, kNN-overlap histograms), so a number in a
report always means the same thing.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def _sample(values, name: str) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        v = values.detach().to(device="cpu", dtype=torch.float64).numpy().reshape(-1)
    else:  # lists straight to float64 (torch.as_tensor would make float32 first)
        v = np.asarray(values, dtype=np.float64).reshape(-1)
    if v.size == 0:
        raise ValueError(f"{name}: a summary of zero values is undefined")
    if np.isnan(v).any():
        raise ValueError(f"{name}: the sample holds {int(np.isnan(v).sum())} NaN value(s); "
                         "a quantile of NaN is undefined")
    return v


def quantiles(values, q: Sequence[float] | float, *, name: str = "values") -> np.ndarray:
    """Sample quantiles with linear interpolation (Hyndman & Fan 1996, definition 7).

    For sorted values ``x_(1) <= ... <= x_(n)`` and ``h = (n - 1) q``, the quantile is
    ``x_(floor h + 1) + (h - floor h)(x_(floor h + 2) - x_(floor h + 1))``; this is
    numpy's and torch's default, computed in float64.

    Parameters
    ----------
    values : array-like, any shape (flattened)
    q : float or sequence of floats in [0, 1]

    Returns
    -------
    numpy.ndarray of float64, the shape of ``q``.
    """
    qs = np.asarray(q, dtype=np.float64)
    if qs.size and (not np.isfinite(qs).all() or (qs < 0).any() or (qs > 1).any()):
        raise ValueError(f"{name}: quantile levels must lie in [0, 1], got {qs.tolist()}")
    return np.quantile(_sample(values, name), qs)


def histogram(values, lo: float, hi: float, bins: int = 30, *, name: str = "values") -> dict[str, list]:
    """Counts of ``values`` in ``bins`` equal-width bins over ``[lo, hi]`` (numpy's
    convention: the last bin is closed), as ``{"edges": [...], "counts": [...]}``.
    Values outside the range are not counted."""
    if int(bins) < 1:
        raise ValueError(f"{name}: bins must be >= 1, got {bins}")
    if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
        raise ValueError(f"{name}: histogram range must be finite with hi > lo, got [{lo}, {hi}]")
    counts, edges = np.histogram(_sample(values, name), bins=int(bins), range=(float(lo), float(hi)))
    return {"edges": edges.tolist(), "counts": counts.tolist()}
