"""Characteristic 3, output distribution shift between base and variant on the same
examples: confidence (max probability) and entropy distributions compared with the
two-sample Kolmogorov-Smirnov test, and the predicted-class distribution compared
by total variation and a chi-square test.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

from ..accumulate import Accumulator
from ._checks import Result, check_preds, check_probs, check_sample

__all__ = ["confidence", "entropy", "KSResult", "ks_shift", "OutputShift", "output_shift", "ClassShift",
           "predicted_class_shift", "ClassHistogramAccumulator"]


def confidence(probs) -> torch.Tensor:
    """Maximum class probability ``max_c p_ic`` per example, ``(M,)`` float64."""
    return check_probs(probs).max(dim=1).values


def entropy(probs) -> torch.Tensor:
    """Predictive entropy ``H_i = -sum_c p_ic log p_ic`` (natural log, ``0 log 0 = 0``), ``(M,)`` float64."""
    p = check_probs(probs).clamp_min(0)
    return -torch.where(p > 0, p * p.log(), torch.zeros_like(p)).sum(1)


@dataclass
class KSResult(Result):
    """Two-sample Kolmogorov-Smirnov test ``D = sup_x |F_b(x) - F_v(x)|`` with the means
    and medians of both samples."""

    statistic: float
    p_value: float
    mean_base: float
    mean_variant: float
    median_base: float
    median_variant: float


def ks_shift(base_values, variant_values, name: str = "values") -> KSResult:
    """Two-sample KS test (``scipy.stats.ks_2samp``, two-sided, exact for small samples)
    between two 1-D samples, e.g. per-example confidences of base and variant."""
    a = check_sample(base_values, f"base {name}")  # float64; Python lists never pass through float32
    b = check_sample(variant_values, f"variant {name}")
    res = stats.ks_2samp(a, b)
    return KSResult(float(res.statistic), float(res.pvalue), float(a.mean()), float(b.mean()),
                    float(np.median(a)), float(np.median(b)))


@dataclass
class OutputShift(Result):
    """KS tests of the confidence and the entropy distributions (variant vs base)."""

    confidence: KSResult
    entropy: KSResult


def output_shift(base_probs, variant_probs) -> OutputShift:
    """Shift of the confidence and entropy distributions from base to variant (needs no labels)."""
    p = check_probs(base_probs, "base_probs")
    q = check_probs(variant_probs, "variant_probs", p.shape[1])
    return OutputShift(confidence=ks_shift(confidence(p), confidence(q), "confidence"),
                       entropy=ks_shift(entropy(p), entropy(q), "entropy"))


@dataclass
class ClassShift(Result):
    """Predicted-class distribution shift.

    ``total_variation = sum_c |h^b_c - h^v_c| / 2`` of the normalized histograms;
    ``chi2``/``p_value``/``dof``: chi-square test of homogeneity on the 2 x C table of
    counts (classes neither model predicts are dropped). The two rows come from the
    same examples, so the test is approximate (it treats them as independent
    samples); read it as a screening signal, with the TV as the effect size.
    """

    hist_base: torch.Tensor
    hist_variant: torch.Tensor
    total_variation: float
    chi2: float
    p_value: float
    dof: int


def predicted_class_shift(base_preds, variant_preds, num_classes: int) -> ClassShift:
    """Total variation between predicted-class histograms and a chi-square test
    (``scipy.stats.chi2_contingency``, no continuity correction)."""
    b = check_preds(base_preds, "base_preds", 1, num_classes)
    v = check_preds(variant_preds, "variant_preds", 1, num_classes)
    if b.numel() == 0 or v.numel() == 0:
        raise ValueError("predicted-class shift needs at least one prediction per model")
    return _class_shift(torch.bincount(b, minlength=num_classes), torch.bincount(v, minlength=num_classes))


def _class_shift(hb: torch.Tensor, hv: torch.Tensor) -> ClassShift:
    hb, hv = hb.long().cpu(), hv.long().cpu()
    tv = float((hb.double() / hb.sum() - hv.double() / hv.sum()).abs().sum() / 2)
    table = torch.stack([hb, hv]).numpy()
    table = table[:, table.sum(0) > 0]
    if table.shape[1] < 2:
        chi2, p, dof = 0.0, 1.0, 0  # both models predict one and the same class
    else:
        res = stats.chi2_contingency(table, correction=False)
        chi2, p, dof = float(res.statistic), float(res.pvalue), int(res.dof)
    return ClassShift(hist_base=hb, hist_variant=hv, total_variation=tv, chi2=chi2, p_value=p, dof=dof)


class ClassHistogramAccumulator(Accumulator):
    """Streaming predicted-class histogram (int64 ``"sum"`` state ``(C,)``)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.add_state("hist", torch.zeros(self.num_classes, dtype=torch.int64), "sum")

    def config(self) -> dict:
        return {"num_classes": self.num_classes}

    def update(self, preds) -> None:  # type: ignore[override]
        p = check_preds(preds, "preds", 1, self.num_classes)
        self.hist += torch.bincount(p, minlength=self.num_classes).to(self.hist.device)

    def compute(self) -> torch.Tensor:
        return self.hist.clone()

    def shift_to(self, other: "ClassHistogramAccumulator") -> ClassShift:
        """:class:`ClassShift` from this (base) histogram to ``other`` (variant)."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"models predict different numbers of classes ({self.num_classes} vs {other.num_classes})")
        if int(self.hist.sum()) == 0 or int(other.hist.sum()) == 0:
            raise ValueError("predicted-class shift needs at least one prediction per model")
        return _class_shift(self.hist, other.hist)
