"""Characteristic 1, prediction errors: accuracy with confidence intervals, flips,
churn, error overlap, McNemar's test and per-example output divergence.

Pairwise counts (churn, flips, error Jaccard, divergences) come from the
agreement engine (:mod:`minidiff.agreement`); this module adds the statistics
on top of them for one base model and one variant.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

from .. import agreement as _agree
from ._checks import (Result, check_bootstrap, check_preds, check_probs, check_same_length, check_sample, percentiles,
                      require_labels)

__all__ = ["AccuracyCI", "accuracy", "bootstrap_mean_ci", "accuracy_ci", "accuracy_difference_ci", "FlipSummary", "churn", "flips",
           "McNemarResult", "mcnemar", "DivergenceSummary", "per_example_divergence", "divergence_summary"]


@dataclass
class AccuracyCI(Result):
    """An accuracy (or accuracy difference) and its percentile-bootstrap interval
    ``[low, high]`` at ``confidence``; ``n`` examples, ``n_models`` per population."""

    accuracy: float
    low: float
    high: float
    n: int
    n_boot: int
    confidence: float
    seed: int
    n_models: int = 1


def accuracy(preds, labels) -> float:
    """Top-1 accuracy ``mean_i [preds_i == labels_i]``; for a population ``(N, M)`` the mean
    over its models. Needs labels (else MetricSkipped)."""
    p = check_preds(preds, "preds", 2)
    y = require_labels(labels, "accuracy", p.shape[1])
    if p.shape[1] == 0:
        raise ValueError("accuracy of zero examples is undefined")
    return float((p == y[None]).double().mean())


def bootstrap_mean_ci(values, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0
                      ) -> tuple[float, float, float]:
    """Mean of ``values (M,)`` and its percentile bootstrap interval (Efron & Tibshirani 1993).

    A resample of the M examples with replacement is summarized by how often each
    distinct value ``u_j`` is drawn, which is ``Multinomial(M, f_j)`` with ``f_j`` the
    value's share; the resampled mean is ``sum_j count_j u_j / M``. Sampling those
    counts (numpy ``default_rng(seed)``) gives exactly the distribution of the classic
    index-resampling bootstrap at O(n_boot x #distinct) cost. Per-example
    correctness takes 2 values (``P + 1`` for a population of P models), so this is
    cheap for any M. The interval is the ``(1 -+ confidence)/2`` quantiles (linear
    interpolation) of the ``n_boot`` resampled means. ``n_boot`` must be at least
    ``MIN_BOOTSTRAP`` (100; see :data:`minidiff.metrics._checks.MIN_BOOTSTRAP`).
    """
    n_boot, confidence = check_bootstrap(n_boot, confidence)
    v = check_sample(values, "bootstrap values")  # float64 throughout, lists never via float32
    uniq, counts = np.unique(v, return_counts=True)
    m = v.size
    rng = np.random.default_rng(seed)
    block = max(1, (1 << 22) // uniq.size)  # keep each draw block at ~4M counts
    means = np.concatenate([rng.multinomial(m, counts / m, size=min(block, n_boot - s)) @ uniq / m
                            for s in range(0, n_boot, block)])
    lo, hi = np.quantile(means, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(v.mean()), float(lo), float(hi)


def accuracy_ci(preds, labels, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0) -> AccuracyCI:
    """Accuracy with a percentile bootstrap confidence interval over examples.

    ``preds`` is one model ``(M,)`` or a population ``(N, M)``; with ``r_i`` the share
    of the population right on example i, accuracy ``= mean_i r_i`` and the interval
    comes from :func:`bootstrap_mean_ci` on ``r`` (for one model, ``r_i in {0, 1}`` and
    the bootstrap distribution is ``Binomial(M, acc) / M``).
    """
    n_boot, confidence = check_bootstrap(n_boot, confidence)
    p = check_preds(preds, "preds", 2)
    y = require_labels(labels, "accuracy_ci", p.shape[1])
    r = (p == y[None]).double().mean(0)
    acc, lo, hi = bootstrap_mean_ci(r, n_boot, confidence, seed)
    return AccuracyCI(acc, lo, hi, int(p.shape[1]), int(n_boot), confidence, seed, int(p.shape[0]))


def accuracy_difference_ci(base_preds, variant_preds, labels, n_boot: int = 2000, confidence: float = 0.95,
                           seed: int = 0) -> AccuracyCI:
    """Paired bootstrap interval of ``acc(variant) - acc(base)`` on the same examples.

    Per example ``d_i = r^v_i - r^b_i`` (shares of each population right on i; for
    single models ``d_i in {-1, 0, 1}``: variant-only right, both or neither, base-only
    right); the interval is :func:`bootstrap_mean_ci` on ``d``. Resampling examples
    jointly (paired) makes it much narrower than two independent intervals.
    """
    n_boot, confidence = check_bootstrap(n_boot, confidence)
    b = check_preds(base_preds, "base_preds", 2)
    v = check_preds(variant_preds, "variant_preds", 2)
    if b.shape[1] != v.shape[1]:
        raise ValueError(f"base_preds and variant_preds cover different numbers of examples "
                         f"({b.shape[1]} vs {v.shape[1]}); run both models on the same data")
    y = require_labels(labels, "accuracy_difference_ci", b.shape[1])
    d = (v == y[None]).double().mean(0) - (b == y[None]).double().mean(0)
    diff, lo, hi = bootstrap_mean_ci(d, n_boot, confidence, seed)
    return AccuracyCI(diff, lo, hi, int(b.shape[1]), int(n_boot), confidence, seed, int(v.shape[0]))


def _pair(base_preds, variant_preds, labels, metric: str):
    b = check_preds(base_preds, "base_preds")
    v = check_preds(variant_preds, "variant_preds")
    check_same_length("base_preds", b, "variant_preds", v)
    y = require_labels(labels, metric, b.shape[0])
    if b.shape[0] == 0:
        raise ValueError(f"{metric} of zero examples is undefined")
    return b, v, y


@dataclass
class FlipSummary(Result):
    """Base -> variant flips (Dutta et al. 2024) and error-set overlap (Rai et al. 2024).

    ``right_to_wrong``: fraction of examples the base gets right and the variant wrong;
    ``wrong_to_right``: the reverse; ``churn``: fraction predicted differently;
    ``error_jaccard``: ``|E_b ∩ E_v| / |E_b ∪ E_v|`` (1.0 when neither errs).
    """

    right_to_wrong: float
    wrong_to_right: float
    n_right_to_wrong: int
    n_wrong_to_right: int
    churn: float
    error_jaccard: float
    n: int


def churn(base_preds, variant_preds) -> float:
    """Disagreement ``mean_i [base_i != variant_i]`` (needs no labels)."""
    b = check_preds(base_preds, "base_preds")
    v = check_preds(variant_preds, "variant_preds")
    check_same_length("base_preds", b, "variant_preds", v)
    if b.shape[0] == 0:
        raise ValueError("churn of zero examples is undefined")
    return float(_agree.disagreement_matrix(torch.stack([b, v]))[0, 1])


def flips(base_preds, variant_preds, labels) -> FlipSummary:
    """Flips right->wrong and wrong->right, churn and error Jaccard of one variant.

    With ``R_b``/``R_v`` the correct sets over M examples:
    ``right_to_wrong = |R_b \\ R_v| / M``, ``wrong_to_right = |R_v \\ R_b| / M``
    (Dutta et al. 2024, "Accuracy is not all you need"). Counts via
    :func:`minidiff.flip_matrix` and :func:`minidiff.error_jaccard`.
    """
    b, v, y = _pair(base_preds, variant_preds, labels, "flips")
    stacked = torch.stack([b, v])
    fm = _agree.flip_matrix(stacked, y)
    m = y.shape[0]
    r2w, w2r = float(fm[0, 1, 0]), float(fm[0, 1, 1])
    return FlipSummary(right_to_wrong=r2w, wrong_to_right=w2r,
                       n_right_to_wrong=int(round(r2w * m)), n_wrong_to_right=int(round(w2r * m)),
                       churn=float(_agree.disagreement_matrix(stacked)[0, 1]),
                       error_jaccard=float(_agree.error_jaccard(stacked, y)[0, 1]), n=m)


@dataclass
class McNemarResult(Result):
    """McNemar's test of equal error rates on paired predictions.

    ``b``: base right & variant wrong; ``c``: base wrong & variant right.
    ``method`` is ``"exact"`` (two-sided binomial test of b ~ Binomial(b + c, 1/2),
    ``statistic = b``) or ``"chi2-cc"`` (``(|b - c| - 1)^2 / (b + c)``, 1 dof).
    """

    b: int
    c: int
    statistic: float
    p_value: float
    method: str


def mcnemar(base_preds, variant_preds, labels, exact_below: int = 25) -> McNemarResult:
    """McNemar's test (McNemar 1947) for a base model and a variant on the same examples.

    Uses the exact binomial test when the discordant count ``b + c < exact_below``
    (``scipy.stats.binomtest``), else the chi-square statistic with Edwards'
    continuity correction ``(|b - c| - 1)^2 / (b + c)`` and ``scipy.stats.chi2.sf``
    with one degree of freedom. ``b + c = 0`` gives p = 1.
    """
    b_, v_, y = _pair(base_preds, variant_preds, labels, "mcnemar")
    rb, rv = b_ == y, v_ == y
    b, c = int((rb & ~rv).sum()), int((~rb & rv).sum())
    n = b + c
    if n == 0:
        return McNemarResult(b, c, 0.0, 1.0, "exact")
    if n < exact_below:
        return McNemarResult(b, c, float(b), float(stats.binomtest(b, n, 0.5).pvalue), "exact")
    stat = (abs(b - c) - 1.0) ** 2 / n
    return McNemarResult(b, c, stat, float(stats.chi2.sf(stat, 1)), "chi2-cc")


@dataclass
class DivergenceSummary(Result):
    """Summary of per-example divergences ``D(base_i || variant_i)`` over M examples."""

    kind: str
    mean: float
    p50: float
    p90: float
    p99: float
    max: float
    n: int


def per_example_divergence(base_probs, variant_probs, kind: str = "js") -> torch.Tensor:
    """Per-example divergence ``(M,)`` float64 between base and variant output distributions.

    ``kl``: ``KL(p || q) = sum_c p_c log(p_c / q_c)`` (base p, variant q);
    ``js``: ``(KL(p || m) + KL(q || m)) / 2`` with ``m = (p + q) / 2``; ``tv``:
    ``sum_c |p_c - q_c| / 2``. Natural log; ``0 log 0 = 0``; inside the KL logarithm
    probabilities are floored at ``minidiff.agreement.DEFAULT_EPS`` (1e-12). Computed by
    :func:`minidiff.divergence_to_reference` with the base as reference.
    """
    if kind not in ("kl", "js", "tv"):
        raise ValueError(f"kind must be 'kl', 'js' or 'tv', got {kind!r}")
    p = check_probs(base_probs, "base_probs")
    q = check_probs(variant_probs, "variant_probs", p.shape[1])
    if p.shape[0] != q.shape[0]:
        raise ValueError(f"base_probs and variant_probs cover different numbers of examples "
                         f"({p.shape[0]} vs {q.shape[0]})")
    return _agree.divergence_to_reference(torch.stack([p, q.to(p.device)]), ref=0, kind=kind)[1].to(torch.float64).cpu()


def divergence_summary(base_probs, variant_probs, kind: str = "js") -> DivergenceSummary:
    """Mean, percentiles 50/90/99 and max of :func:`per_example_divergence`."""
    d = per_example_divergence(base_probs, variant_probs, kind)
    if d.numel() == 0:
        raise ValueError("divergence of zero examples is undefined")
    pc = percentiles(d)
    return DivergenceSummary(kind, float(d.mean()), pc["p50"], pc["p90"], pc["p99"], float(d.max()), int(d.numel()))

