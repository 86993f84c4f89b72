"""Characteristic 1, calibration: expected calibration error, Brier score,
reliability-diagram bins, and their change from base to variant.

Bins are equal-width on the confidence ``conf_i = max_c p_ic``: bin ``b`` (of
``B``, default 15 as in Guo et al. 2017) holds ``conf in ((b)/B, (b+1)/B]``, with
``conf = 0`` placed in bin 0. Every quantity is a per-bin sum, so
:class:`CalibrationAccumulator` streams it and merges across shards exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..accumulate import Accumulator
from ._checks import Result, check_probs, int_scalar, require_labels

__all__ = ["DEFAULT_BINS", "ReliabilityBins", "Calibration", "CalibrationChange", "bin_index", "reliability_bins",
           "ece", "brier", "calibration", "calibration_change", "CalibrationAccumulator"]

DEFAULT_BINS = 15


@dataclass
class ReliabilityBins(Result):
    """Reliability diagram: per equal-width confidence bin, the example count, the mean
    confidence and the accuracy (NaN for empty bins). ``edges`` has ``B + 1`` entries."""

    edges: torch.Tensor
    count: torch.Tensor
    mean_confidence: torch.Tensor
    accuracy: torch.Tensor


@dataclass
class Calibration(Result):
    """ECE (equal-width bins), multi-class Brier score and the reliability bins."""

    ece: float
    brier: float
    n_bins: int
    n: int
    bins: ReliabilityBins


@dataclass
class CalibrationChange(Result):
    """Calibration of base and variant and the change ``variant - base``."""

    base: Calibration
    variant: Calibration
    delta_ece: float
    delta_brier: float


def _check_bins(n_bins: int) -> int:
    return int_scalar(n_bins, "n_bins", lo=1)  # an integer (2.5 is a TypeError, not 2 bins)


def bin_index(confidence: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Equal-width bin of each confidence: ``ceil(conf * B) - 1`` clipped to ``[0, B - 1]``,
    i.e. bin ``b`` covers ``(b/B, (b+1)/B]``."""
    return (torch.ceil(confidence * n_bins).long() - 1).clamp_(0, n_bins - 1)


def _bin_sums(p: torch.Tensor, y: torch.Tensor, n_bins: int):
    conf, pred = p.max(dim=1)
    idx = bin_index(conf, n_bins)
    count = torch.zeros(n_bins, dtype=torch.float64, device=p.device).index_add_(0, idx, torch.ones_like(conf))
    conf_sum = torch.zeros_like(count).index_add_(0, idx, conf)
    correct_sum = torch.zeros_like(count).index_add_(0, idx, (pred == y).double())
    onehot = torch.zeros_like(p).scatter_(1, y[:, None], 1.0)
    brier_sum = ((p - onehot) ** 2).sum()
    return count, conf_sum, correct_sum, brier_sum


def _finish(count, conf_sum, correct_sum, brier_sum, n_bins: int) -> Calibration:
    n = float(count.sum())
    if n == 0:
        raise ValueError("calibration of zero examples is undefined")
    with torch.no_grad():
        nz = count > 0
        mean_conf = torch.where(nz, conf_sum / count.clamp_min(1), torch.full_like(count, float("nan")))
        acc = torch.where(nz, correct_sum / count.clamp_min(1), torch.full_like(count, float("nan")))
        ece_val = float(((correct_sum - conf_sum).abs()).sum() / n)  # sum_b n_b/M |acc_b - conf_b|
    bins = ReliabilityBins(edges=torch.linspace(0, 1, n_bins + 1, dtype=torch.float64),
                           count=count.round().long().cpu(), mean_confidence=mean_conf.cpu(), accuracy=acc.cpu())
    return Calibration(ece=ece_val, brier=float(brier_sum) / n, n_bins=n_bins, n=int(round(n)), bins=bins)


def _inputs(probs, labels, metric: str):
    p = check_probs(probs)
    y = require_labels(labels, metric, p.shape[0], p.shape[1])
    return p, y.to(p.device)


def calibration(probs, labels, n_bins: int = DEFAULT_BINS) -> Calibration:
    """ECE, Brier score and reliability bins of one model.

    ``ECE = sum_b (n_b / M) |acc_b - conf_b|`` over ``B`` equal-width confidence bins
    (Naeini et al. 2015; Guo et al. 2017, "On calibration of modern neural networks");
    ``Brier = (1/M) sum_i sum_c (p_ic - [y_i = c])^2`` (Brier 1950, multi-class form,
    range [0, 2]).
    """
    n_bins = _check_bins(n_bins)
    p, y = _inputs(probs, labels, "calibration")
    return _finish(*_bin_sums(p, y, n_bins), n_bins)


def ece(probs, labels, n_bins: int = DEFAULT_BINS) -> float:
    """Expected calibration error with ``n_bins`` equal-width bins (see :func:`calibration`)."""
    return calibration(probs, labels, n_bins).ece


def brier(probs, labels) -> float:
    """Multi-class Brier score ``(1/M) sum_i ||p_i - onehot(y_i)||^2`` (Brier 1950)."""
    p, y = _inputs(probs, labels, "brier")
    if p.shape[0] == 0:
        raise ValueError("Brier score of zero examples is undefined")
    return float(_bin_sums(p, y, 1)[3]) / p.shape[0]


def reliability_bins(probs, labels, n_bins: int = DEFAULT_BINS) -> ReliabilityBins:
    """Reliability-diagram bins (see :class:`ReliabilityBins`)."""
    return calibration(probs, labels, n_bins).bins


def calibration_change(base_probs, variant_probs, labels, n_bins: int = DEFAULT_BINS) -> CalibrationChange:
    """Calibration of base and variant on the same examples, and ``variant - base``."""
    b = calibration(base_probs, labels, n_bins)
    v = calibration(variant_probs, labels, n_bins)
    if b.n != v.n:
        raise ValueError(f"base_probs and variant_probs cover different numbers of examples ({b.n} vs {v.n})")
    return CalibrationChange(base=b, variant=v, delta_ece=v.ece - b.ece, delta_brier=v.brier - b.brier)


class CalibrationAccumulator(Accumulator):
    """Streaming calibration: per-bin count, confidence sum and correct sum, plus the
    Brier sum, all float64 ``"sum"`` states. ``compute()`` equals :func:`calibration`
    on the concatenated stream."""

    def __init__(self, n_bins: int = DEFAULT_BINS) -> None:
        super().__init__()
        self.n_bins = _check_bins(n_bins)
        for name in ("count", "conf_sum", "correct_sum"):
            self.add_state(name, torch.zeros(self.n_bins, dtype=torch.float64), "sum")
        self.add_state("brier_sum", torch.zeros((), dtype=torch.float64), "sum")

    def config(self) -> dict:
        return {"n_bins": self.n_bins}

    def update(self, probs, labels) -> None:  # type: ignore[override]
        p, y = _inputs(probs, labels, "calibration")
        if self.count.device != p.device:
            for name in self.reductions:
                setattr(self, name, getattr(self, name).to(p.device))
        count, conf_sum, correct_sum, brier_sum = _bin_sums(p, y, self.n_bins)
        self.count += count
        self.conf_sum += conf_sum
        self.correct_sum += correct_sum
        self.brier_sum += brier_sum

    def compute(self) -> Calibration:
        return _finish(self.count, self.conf_sum, self.correct_sum, self.brier_sum, self.n_bins)
