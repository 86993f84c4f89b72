"""Vulnerability metrics from per-example outcomes.

Notation, for models ``i, j`` and examples ``n``: ``c_i(n)`` = clean prediction right,
``f_ij(n)`` = model ``j`` is wrong on the adversarial example crafted on model ``i``
(``f_ii`` is the attack's own outcome), ``s_i(n) = c_i(n) and f_ii(n)``.

- accuracy under attack ``= mean_n [c_i(n) and not f_ii(n)]`` (an example the model already
  gets wrong counts as wrong);
- attack success rate ``= sum s_i / sum c_i`` (on originally correct examples only);
- transfer ``T_ij = sum_n c_i c_j f_ij / sum_n c_i c_j``: among examples both models get
  right, the fraction whose adversarial example crafted on ``i`` fools ``j``; ``T_ii`` is the
  success rate of model ``i`` (Papernot et al. 2016, "Transferability in machine learning");
- Jaccard overlap of successfully attacked sets ``|S_i & S_j| / |S_i | S_j|`` (1 when both
  are empty);
- base -> variant changes with paired percentile-bootstrap intervals over examples
  (Efron & Tibshirani 1993; ``scipy.stats.bootstrap``, ``paired=True``).
"""

from __future__ import annotations

import warnings
from typing import Optional

import numpy as np


def _ratio(num: float, den: float) -> Optional[float]:
    return float(num) / float(den) if den else None


def model_summary(correct: np.ndarray, success: np.ndarray) -> dict:
    """Clean accuracy, accuracy under attack and success rate of one model."""
    correct = np.asarray(correct, bool)
    success = np.asarray(success, bool)
    if np.any(success & ~correct):
        raise ValueError("an attack can only succeed on an example the model got right")
    n = correct.size
    return {
        "n_examples": int(n),
        "n_correct": int(correct.sum()),
        "n_success": int(success.sum()),
        "clean_accuracy": _ratio(correct.sum(), n),
        "adversarial_accuracy": _ratio((correct & ~success).sum(), n),
        "success_rate": _ratio(success.sum(), correct.sum()),
    }


def transfer_matrix(correct: np.ndarray, fooled: np.ndarray) -> list[list[Optional[float]]]:
    """``T[i][j]`` from ``correct (M, N)`` and ``fooled (M, M, N)`` (``fooled[i, j, n]``:
    model j wrong on the example crafted on model i). ``None`` where no example is right
    for both models."""
    correct = np.asarray(correct, bool)
    fooled = np.asarray(fooled, bool)
    m = correct.shape[0]
    out: list[list[Optional[float]]] = []
    for i in range(m):
        row = []
        for j in range(m):
            both = correct[i] & correct[j]
            row.append(_ratio((both & fooled[i, j]).sum(), both.sum()))
        out.append(row)
    return out


def jaccard_matrix(success: np.ndarray) -> list[list[float]]:
    """Jaccard overlap of the successfully attacked example sets, ``success (M, N)``."""
    s = np.asarray(success, bool)
    inter = (s[:, None, :] & s[None, :, :]).sum(-1)
    union = (s[:, None, :] | s[None, :, :]).sum(-1)
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1)).tolist()


def _stat_clean(cb, sb, cv, sv, axis=-1):
    return cv.mean(axis) - cb.mean(axis)


def _stat_adv(cb, sb, cv, sv, axis=-1):
    return (cv * (1 - sv)).mean(axis) - (cb * (1 - sb)).mean(axis)


def _stat_success(cb, sb, cv, sv, axis=-1):
    with np.errstate(invalid="ignore", divide="ignore"):
        return sv.sum(axis) / cv.sum(axis) - sb.sum(axis) / cb.sum(axis)


_STATS = {"clean_accuracy": _stat_clean, "adversarial_accuracy": _stat_adv,
          "success_rate": _stat_success}


def change_with_ci(base_correct, base_success, var_correct, var_success, *, resamples: int,
                   confidence: float, seed: int) -> dict:
    """Variant minus base for clean accuracy, accuracy under attack and success rate, with
    paired percentile-bootstrap intervals (examples resampled jointly for both models).

    Returns ``{metric: {"delta", "ci_low", "ci_high"}}``; the interval is ``None`` when
    ``resamples == 0`` or the statistic is undefined (e.g. no correct example).
    """
    from scipy import stats

    data = tuple(np.asarray(a, float) for a in (base_correct, base_success, var_correct, var_success))
    out = {}
    for k, (name, fn) in enumerate(_STATS.items()):
        delta = float(fn(*data))
        lo = hi = None
        if resamples > 0 and np.isfinite(delta) and data[0].size > 1:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # degenerate (all-equal) resamples warn
                res = stats.bootstrap(data, fn, paired=True, vectorized=True,
                                      n_resamples=resamples, confidence_level=confidence,
                                      method="percentile",
                                      rng=np.random.default_rng([seed, k]))
            lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
            if not (np.isfinite(lo) and np.isfinite(hi)):
                lo = hi = None
        out[name] = {"delta": delta if np.isfinite(delta) else None, "ci_low": lo, "ci_high": hi}
    return out
