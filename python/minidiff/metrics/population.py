"""Characteristic 1 across populations (Hooker et al. 2019, "What do compressed deep
neural networks forget?"; Hooker et al. 2020, "Characterising bias in compressed
models"): per-class recall change normalized by the overall accuracy change with
Welch's t-test, Pruning/Compression Identified Exemplars (PIE, CIE) and the
accuracy of every model on PIE vs non-PIE examples.

A population is the predictions ``(N, M)`` of N models of one kind (e.g. the same
recipe from N seeds); a single model is a population of one.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

from .. import agreement as _agree
from ._checks import Result, check_preds, require_labels

__all__ = ["per_class_recall", "ClassImpact", "class_impact", "PIESummary", "pie_summary", "top_k",
           "PIEAccuracy", "accuracy_on_pie"]


def per_class_recall(preds, labels, num_classes: int) -> torch.Tensor:
    """Recall of each class for each model, ``(N, C)`` float64 (``(C,)`` for 1-D preds).

    ``recall_c = |{i : y_i = c, pred_i = c}| / |{i : y_i = c}|``; NaN for a class
    with no examples.
    """
    one = torch.as_tensor(preds).ndim == 1
    p = check_preds(preds, "preds", 2, num_classes)
    y = require_labels(labels, "per_class_recall", p.shape[1], num_classes)
    support = torch.bincount(y, minlength=num_classes).double()
    correct = torch.zeros(p.shape[0], num_classes, dtype=torch.float64)
    hit = (p == y[None]).double()
    correct.index_add_(1, y, hit)
    rec = torch.where(support > 0, correct / support.clamp_min(1), torch.full_like(correct, float("nan")))
    return rec[0] if one else rec


@dataclass
class ClassImpact(Result):
    """Per-class effect of compression, normalized for the overall accuracy change.

    For each model ``m`` the normalized recall is ``r~_c(m) = recall_c(m) / acc(m)``.
    ``normalized_change[c] = mean_v r~_c / mean_b r~_c - 1``: zero when class ``c``
    gains or loses recall exactly in proportion to overall accuracy, negative when
    it is hurt more (Hooker et al. 2019, 2020); NaN for a class with no examples or
    with base recall 0. ``t_statistic``/``p_value``: Welch's
    t-test of the two populations' ``r~_c`` samples (NaN with ``test_note`` when a
    population has fewer than two models or both have zero variance).
    ``significant`` = ``p_value < alpha`` (no multiple-comparison correction).
    """

    class_names: list[str]
    support: torch.Tensor
    recall_base: torch.Tensor
    recall_variant: torch.Tensor
    recall_change: torch.Tensor
    normalized_change: torch.Tensor
    t_statistic: torch.Tensor
    p_value: torch.Tensor
    significant: torch.Tensor
    accuracy_base: float
    accuracy_variant: float
    n_base: int
    n_variant: int
    alpha: float
    test_note: str


def class_impact(base_preds, variant_preds, labels, num_classes: int, class_names: list[str] | None = None,
                 alpha: float = 0.05) -> ClassImpact:
    """Per-class recall change of a compressed population vs the base population.

    Parameters
    ----------
    base_preds, variant_preds : int tensors ``(N_b, M)`` and ``(N_v, M)`` (or ``(M,)``)
    labels : int tensor ``(M,)``; None raises MetricSkipped.
    num_classes : C.

    Uses ``scipy.stats.ttest_ind(equal_var=False)`` per class (Welch 1947).
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    b = check_preds(base_preds, "base_preds", 2, num_classes)
    v = check_preds(variant_preds, "variant_preds", 2, num_classes)
    if b.shape[1] != v.shape[1]:
        raise ValueError(f"base_preds and variant_preds cover different numbers of examples "
                         f"({b.shape[1]} vs {v.shape[1]})")
    y = require_labels(labels, "class_impact", b.shape[1], num_classes)
    if b.shape[1] == 0:
        raise ValueError("class_impact of zero examples is undefined")
    names = list(class_names) if class_names is not None else [str(c) for c in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"class_names has {len(names)} entries for {num_classes} classes")
    rb, rv = per_class_recall(b, y, num_classes), per_class_recall(v, y, num_classes)
    acc_b = (b == y[None]).double().mean(1)
    acc_v = (v == y[None]).double().mean(1)
    if bool((acc_b == 0).any()) or bool((acc_v == 0).any()):
        raise ValueError("a model has accuracy 0; recall normalized by accuracy is undefined")
    nb, nv = rb / acc_b[:, None], rv / acc_v[:, None]
    base_mean = nb.mean(0)
    # undefined (NaN) for a class without examples or one the base population never gets right
    normalized = torch.where(base_mean > 0, nv.mean(0) / base_mean.where(base_mean > 0, torch.ones_like(base_mean)) - 1,
                             torch.full_like(base_mean, float("nan")))
    t = torch.full((num_classes,), float("nan"), dtype=torch.float64)
    pv = torch.full((num_classes,), float("nan"), dtype=torch.float64)
    note = ""
    if b.shape[0] < 2 or v.shape[0] < 2:
        note = (f"Welch's t-test needs >= 2 models in each population (base {b.shape[0]}, "
                f"variant {v.shape[0]}); not tested")
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # zero-variance classes give NaN, reported below
            res = stats.ttest_ind(nv.numpy(), nb.numpy(), axis=0, equal_var=False)
        t = torch.from_numpy(np.asarray(res.statistic, dtype=np.float64))
        pv = torch.from_numpy(np.asarray(res.pvalue, dtype=np.float64))
        untested = int(torch.isnan(pv).sum())
        if untested:
            note = f"{untested} class(es) untested: no examples or no variance in either population"
    return ClassImpact(class_names=names, support=torch.bincount(y, minlength=num_classes),
                       recall_base=rb.mean(0), recall_variant=rv.mean(0), recall_change=rv.mean(0) - rb.mean(0),
                       normalized_change=normalized, t_statistic=t, p_value=pv,
                       significant=torch.nan_to_num(pv, nan=1.0) < alpha,
                       accuracy_base=float(acc_b.mean()), accuracy_variant=float(acc_v.mean()),
                       n_base=int(b.shape[0]), n_variant=int(v.shape[0]), alpha=alpha, test_note=note)


@dataclass
class PIESummary(Result):
    """PIEs and CIE scores of a compressed population against the base population.

    ``pie``: bool ``(M,)``, modal label of the compressed population differs from the
    base population's (Hooker et al. 2019). ``cie``: ``(M,)`` Taxicab distance
    ``sum_c |h^v_c - h^b_c|`` of the populations' normalized label histograms, in
    [0, 2] (Hooker et al. 2020). ``top``: indices of the ``k`` highest CIE scores
    (PIEs first, then by score, ties by index).
    """

    pie: torch.Tensor
    n_pie: int
    pie_fraction: float
    cie: torch.Tensor
    modal_base: torch.Tensor
    modal_variant: torch.Tensor
    top: torch.Tensor


def top_k(pie: torch.Tensor, cie: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` examples to list: PIEs before non-PIEs, higher CIE first,
    lower index first among ties (deterministic)."""
    m = cie.shape[0]
    order = np.lexsort((np.arange(m), -cie.double().cpu().numpy(), ~pie.cpu().numpy()))
    return torch.from_numpy(order[: max(0, min(int(k), m))].astype(np.int64))


def pie_summary(base_population, variant_population, num_classes: int, top: int = 20) -> PIESummary:
    """PIE mask, CIE scores, modal labels and the top examples (needs no labels).

    Via :func:`minidiff.modal_labels`, :func:`minidiff.pie_mask` and
    :func:`minidiff.cie_scores` (modal ties broken by the smallest label).
    """
    b = check_preds(base_population, "base_population", 2, num_classes)
    v = check_preds(variant_population, "variant_population", 2, num_classes)
    if b.shape[1] != v.shape[1]:
        raise ValueError(f"base_population and variant_population cover different numbers of examples "
                         f"({b.shape[1]} vs {v.shape[1]})")
    if b.shape[0] == 0 or v.shape[0] == 0:
        raise ValueError("each population needs at least one model")
    pie = _agree.pie_mask(b, v).bool().cpu()
    cie = _agree.cie_scores(b, v, num_classes).double().cpu()
    m = b.shape[1]
    return PIESummary(pie=pie, n_pie=int(pie.sum()), pie_fraction=float(pie.double().mean()) if m else float("nan"),
                      cie=cie, modal_base=_agree.modal_labels(b, num_classes=num_classes).cpu(),
                      modal_variant=_agree.modal_labels(v, num_classes=num_classes).cpu(), top=top_k(pie, cie, top))


@dataclass
class PIEAccuracy(Result):
    """Accuracy of each model on PIE and non-PIE examples (NaN where a set is empty)."""

    model_names: list[str]
    pie_accuracy: torch.Tensor
    non_pie_accuracy: torch.Tensor
    n_pie: int
    n_non_pie: int


def accuracy_on_pie(preds, labels, pie, model_names: list[str] | None = None) -> PIEAccuracy:
    """``acc_PIE(m) = mean_{i in PIE} [pred_mi = y_i]`` and the same on the complement,
    for each of the N models in ``preds (N, M)`` (Hooker et al. 2019, Table 2)."""
    p = check_preds(preds, "preds", 2)
    y = require_labels(labels, "accuracy_on_pie", p.shape[1])
    mask = torch.as_tensor(pie)
    if mask.dtype != torch.bool or mask.shape != (p.shape[1],):
        raise ValueError(f"pie must be a bool mask of shape ({p.shape[1]},), got {mask.dtype} {tuple(mask.shape)}")
    names = list(model_names) if model_names is not None else [f"model{i}" for i in range(p.shape[0])]
    if len(names) != p.shape[0]:
        raise ValueError(f"model_names has {len(names)} entries for {p.shape[0]} models")
    right = (p == y[None]).double()

    def acc_on(sel: torch.Tensor) -> torch.Tensor:
        if int(sel.sum()) == 0:
            return torch.full((p.shape[0],), float("nan"), dtype=torch.float64)
        return right[:, sel].mean(1)

    return PIEAccuracy(model_names=names, pie_accuracy=acc_on(mask), non_pie_accuracy=acc_on(~mask),
                       n_pie=int(mask.sum()), n_non_pie=int((~mask).sum()))
