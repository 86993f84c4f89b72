"""Prediction agreement between models: churn, flips, error overlap, output
divergences and population statistics (PIE / CIE).

Notation: ``preds (N, M)`` integer class predictions of N models on M examples,
``labels (M,)`` the true classes, ``probs (N, M, C)`` output distributions.
Inputs may be torch tensors (CPU or CUDA) or numpy arrays; results are torch
tensors on the input's device. Counting runs in the native core on CPU and in a
CUDA or Triton kernel on GPU (:mod:`minidiff.ops.agreement`); all counts are
exact integers, divided once at the end.

References
----------
Hooker, Courville, Clark, Dauphin, Frome (2019). What do compressed deep neural
networks forget? arXiv:1911.05248 (Pruning Identified Exemplars).
Hooker, Moorosi, Clark, Bengio, Denton (2020). Characterising bias in compressed
models. arXiv:2010.03058 (Compression Identified Exemplars, Taxicab score).
Dutta, Krishnan, Kwatra, Ramjee (2024). Accuracy is not all you need.
arXiv:2407.09141 (flips).
Rai, Saxena, Mangal, Rathore (2024). Compressed models are NOT miniature versions
of large models. arXiv:2407.09590.
"""

from __future__ import annotations

from typing import Any

import torch

from minidiff.accumulate import Accumulator
from minidiff.ops import agreement as _ops
from minidiff.ops._validate import as_tensor, check_finite, check_ndim, real_scalar

DEFAULT_EPS = 1e-12
_KINDS = ("kl", "js", "tv")
_INT32_MAX = 2**31 - 1

__all__ = [
    "disagreement_matrix", "flip_matrix", "error_jaccard", "divergence_matrix",
    "divergence_to_reference", "modal_labels", "pie_mask", "cie_scores", "AgreementAccumulator",
]


# ---- validation ---------------------------------------------------------------
def _check_num_classes(num_classes: Any) -> int | None:
    if num_classes is None:
        return None
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    return num_classes


def _index_tensor(x: Any, name: str, ndim: int, shape_hint: str) -> torch.Tensor:
    """Integer class indices as a contiguous int32/int64 tensor (never a float cast)."""
    t = as_tensor(x, name)
    check_ndim(t, ndim, name, shape_hint)
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        dtype = str(t.dtype).replace("torch.", "")
        raise ValueError(f"{name} has dtype {dtype}; expected integer class indices (int32 or int64). "
                         "For scores or probabilities take .argmax(-1) over the class axis first.")
    if t.dtype not in _ops.INDEX_DTYPES:
        t = t.to(torch.int64)
    if any(s == 0 for s in t.shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}: need at least one model and one example")
    return t.contiguous()


_check_range = _ops.check_range


def _prepare(preds: Any, labels: Any = None, num_classes: Any = None, *, check_labels: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor | None, int | None]:
    """(preds, labels in preds' dtype, num_classes), shapes, dtypes and labels
    validated. The range of ``preds`` is checked by :func:`minidiff.ops.agreement.pair_counts`
    (on CPU inside the counting pass, so the predictions are read from memory once).
    ``check_labels=False`` skips the data-dependent label check (no host sync);
    the caller then checks lazily (see :class:`AgreementAccumulator`)."""
    num_classes = _check_num_classes(num_classes)
    p = _index_tensor(preds, "preds", 2, "(num_models, num_examples)")
    y = None
    if labels is not None:
        y = _index_tensor(labels, "labels", 1, "(num_examples,)")
        if y.shape[0] != p.shape[1]:
            raise ValueError(f"labels has {y.shape[0]} examples but preds has {p.shape[1]} "
                             f"(preds is (num_models, num_examples) = {tuple(p.shape)})")
        if y.device != p.device:
            raise ValueError(f"labels are on {y.device} but preds on {p.device}; move both to one device")
        if not check_labels:
            if y.dtype != p.dtype:  # no data-dependent choice: widen both
                p, y = p.to(torch.int64), y.to(torch.int64)
            return p, y.contiguous(), num_classes
        y_hi = _check_range(y, "labels", num_classes)
        if y.dtype != p.dtype:
            if p.dtype == torch.int32 and y_hi > _INT32_MAX:
                p = p.to(torch.int64)
            y = y.to(p.dtype).contiguous()
    return p, y, num_classes


def _probs_tensor(x: Any, atol: float | None) -> torch.Tensor:
    t = as_tensor(x, "probs")
    check_ndim(t, 3, "probs", "(num_models, num_examples, num_classes)")
    if not t.is_floating_point():
        raise ValueError(f"probs has dtype {str(t.dtype).replace('torch.', '')}; expected floating "
                         "point probabilities (softmax of the logits)")
    if any(s == 0 for s in t.shape):
        raise ValueError(f"probs has shape {tuple(t.shape)}: need at least one model, example and class")
    check_finite(t, "probs")
    negative = int((t < 0).sum())
    if negative:
        raise ValueError(f"probs has {negative} negative entrie(s) (min {float(t.min()):.4g}); pass "
                         "probabilities (softmax of logits), not logits or log-probabilities")
    if atol is None:
        atol = 1e-2 if t.dtype in (torch.float16, torch.bfloat16) else 1e-3
    sums = t.sum(-1, dtype=torch.float64)
    off = (sums - 1).abs() > atol
    if bool(off.any()):
        first = tuple(int(v) for v in torch.nonzero(off)[0])
        raise ValueError(
            f"probs: {int(off.sum())} of {sums.numel()} (model, example) rows do not sum to 1 within "
            f"{atol:g} (probs[{first[0]}, {first[1]}] sums to {float(sums[first]):.6g}); pass "
            "probabilities (softmax of logits), or renormalize with probs / probs.sum(-1, keepdim=True)")
    return t


def _check_kind(kind: str) -> str:
    if kind not in _KINDS:
        raise ValueError(f"kind={kind!r}: use one of {_KINDS} (Kullback-Leibler, Jensen-Shannon, "
                         "total variation)")
    return kind


def _check_eps(eps: float) -> float:
    """Any real scalar (Python, numpy, 0-d tensor) in (0, 1)."""
    try:
        return real_scalar(eps, "eps", lo=0.0, hi=1.0)
    except TypeError as exc:
        raise ValueError(str(exc)) from None


# ---- counts -> matrices ---------------------------------------------------------
def _flips(both_right: torch.Tensor, m: int) -> torch.Tensor:
    right = both_right.diagonal()
    right_wrong = right[:, None] - both_right
    return torch.stack([right_wrong, right_wrong.T], dim=-1).to(torch.float64) / m


def _jaccard(inter: torch.Tensor, union: torch.Tensor) -> torch.Tensor:
    ratio = inter.to(torch.float64) / union.clamp_min(1).to(torch.float64)
    return torch.where(union == 0, torch.ones_like(ratio), ratio)


def _error_sets(both_right: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    right = both_right.diagonal()
    inter = m - right[:, None] - right[None, :] + both_right
    union = m - both_right
    return inter, union


# ---- public API -------------------------------------------------------------------
def disagreement_matrix(preds: Any, *, num_classes: int | None = None) -> torch.Tensor:
    """Fraction of examples on which two models predict differently (churn).

    ``D[i, j] = (1/M) sum_x [p_i(x) != p_j(x)]``; symmetric with a zero diagonal.

    Parameters
    ----------
    preds : (N, M) integer array or tensor
        Predicted class of each of N models on M examples.
    num_classes : int, optional
        When given, every prediction must lie in ``[0, num_classes)``.

    Returns
    -------
    torch.Tensor
        float64 ``(N, N)`` on the device of ``preds``.
    """
    p, _, num_classes = _prepare(preds, None, num_classes)
    disagree, _ = _ops.pair_counts(p, None, num_classes=num_classes)
    return disagree.to(torch.float64) / p.shape[1]


def flip_matrix(preds: Any, labels: Any, *, num_classes: int | None = None) -> torch.Tensor:
    """Flips between every ordered pair of models (Dutta et al. 2024).

    ``F[i, j, 0] = (1/M) #{x : p_i(x) = y(x), p_j(x) != y(x)}`` (i right, j wrong) and
    ``F[i, j, 1] = (1/M) #{x : p_i(x) != y(x), p_j(x) = y(x)}`` (i wrong, j right), so
    ``F[i, j, 1] = F[j, i, 0]`` and ``acc_j - acc_i = F[i, j, 1] - F[i, j, 0]``.

    Returns
    -------
    torch.Tensor
        float64 ``(N, N, 2)``.
    """
    if labels is None:
        raise ValueError("flip_matrix needs labels (M,): flips are defined against the true classes")
    p, y, num_classes = _prepare(preds, labels, num_classes)
    _, both_right = _ops.pair_counts(p, y, nbits=0, num_classes=num_classes)  # no disagreement needed
    return _flips(both_right, p.shape[1])


def error_jaccard(preds: Any, labels: Any, *, num_classes: int | None = None) -> torch.Tensor:
    """Jaccard similarity of two models' error sets (Rai et al. 2024).

    ``J[i, j] = |E_i ∩ E_j| / |E_i ∪ E_j|`` with ``E_i = {x : p_i(x) != y(x)}``; 1.0
    when both error sets are empty.

    Returns
    -------
    torch.Tensor
        float64 ``(N, N)``.
    """
    if labels is None:
        raise ValueError("error_jaccard needs labels (M,): error sets are defined against the true classes")
    p, y, num_classes = _prepare(preds, labels, num_classes)
    _, both_right = _ops.pair_counts(p, y, nbits=0, num_classes=num_classes)  # no disagreement needed
    return _jaccard(*_error_sets(both_right, p.shape[1]))


def divergence_matrix(probs: Any, kind: str = "js", *, eps: float = DEFAULT_EPS,
                      atol: float | None = None) -> torch.Tensor:
    """Mean per-example divergence between every pair of models' output distributions.

    ``D[i, j] = (1/M) sum_x d(p_i(x), p_j(x))`` with, per example (natural log):

    * ``"kl"``: ``KL(p || q) = sum_c [p'_c log(p'_c / q'_c) - p'_c + q'_c]`` with
      ``p' = max(p, eps)``, ``q' = max(q, eps)``: the floor makes a class the other
      model gives probability 0 cost about ``log(p/eps)`` instead of infinity. For
      two distributions the added ``- p' + q'`` terms sum to 0 (up to ``C eps``
      from the floor), so this is ``sum_c p log(p/q)``; written this way every class
      term is >= 0 (Gibbs' inequality term by term), so the divergence is >= 0 by
      construction and rows that sum to 1 only within float32 rounding do not go
      negative. Not symmetric: row i is the reference distribution.
    * ``"js"``: ``(KL(p || m) + KL(q || m)) / 2`` with ``m = (p + q)/2`` (no flooring
      needed; at most log 2), per class ``(p + q)/4 (a log a + b log b)`` with
      ``a = 2p/(p + q)``, ``b = 2q/(p + q)``, so a confident model (``p_c = 1e-18``)
      stays finite.
    * ``"tv"``: ``sum_c |p_c - q_c| / 2`` (in [0, 1]).

    Computed in float64, term by term, with a power series in the relative
    difference where it is below 0.1, so nearly identical models (e.g. a quantized
    copy) keep their small divergences instead of losing them to cancellation.

    Parameters
    ----------
    probs : (N, M, C) float array or tensor
        Probabilities; each ``probs[i, x]`` must be non-negative and sum to 1
        within ``atol`` (default 1e-3; 1e-2 for float16/bfloat16).
    kind : {"kl", "js", "tv"}
    eps : float
        Floor for probabilities inside the KL logarithm (default 1e-12).
    """
    _check_kind(kind)
    eps = _check_eps(eps)
    t = _probs_tensor(probs, atol)
    return _ops.divergence_pairs(t, kind, eps)


def divergence_to_reference(probs: Any, ref: int = 0, kind: str = "js", *,
                            eps: float = DEFAULT_EPS, atol: float | None = None) -> torch.Tensor:
    """Per-example divergence of every model from one reference model.

    ``out[i, x] = d(p_ref(x), p_i(x))`` with ``d`` as in :func:`divergence_matrix`
    (for KL, ``KL(p_ref || p_i)``: the reference is the base model), so that
    ``out[i].mean() == divergence_matrix(probs, kind)[ref, i]``. Row ``ref`` is 0.
    Percentiles over examples are left to the caller.

    Returns
    -------
    torch.Tensor
        float64 ``(N, M)``.
    """
    _check_kind(kind)
    eps = _check_eps(eps)
    t = _probs_tensor(probs, atol)
    n = t.shape[0]
    if isinstance(ref, bool) or not isinstance(ref, int) or not -n <= ref < n:
        raise ValueError(f"ref must be a model index in [0, {n}), got {ref!r}")
    return _ops.divergence_rows(t, ref % n, kind, eps)


def _population(x: Any, name: str, num_classes: int | None) -> tuple[torch.Tensor, int]:
    t = as_tensor(x, name)
    if t.ndim == 1:
        t = t[None, :]
    t = _index_tensor(t, name, 2, "(num_models_in_population, num_examples) or (num_examples,)")
    return t, _check_range(t, name, num_classes)


def _histogram_classes(num_classes: int, largest: int, name: str) -> int:
    """``num_classes`` for the population statistics, which keep a histogram of
    ``num_classes`` counts per example: a clear error instead of a huge allocation."""
    if num_classes > _ops.MAX_CLASSES:
        raise ValueError(
            f"{name} needs a histogram of {num_classes} classes (largest class index {largest}); population "
            f"statistics support up to {_ops.MAX_CLASSES}. Class indices must be 0..C-1: remap sparse ids "
            "first, e.g. np.unique(labels, return_inverse=True)")
    return num_classes


def _two_populations(base: Any, comp: Any, num_classes: int | None):
    b, b_hi = _population(base, "base_population", num_classes)
    c, c_hi = _population(comp, "compressed_population", num_classes)
    if b.shape[1] != c.shape[1]:
        raise ValueError(f"base_population has {b.shape[1]} examples but compressed_population has "
                         f"{c.shape[1]}; both must predict the same examples in the same order")
    if b.device != c.device:
        raise ValueError(f"base_population is on {b.device} but compressed_population on {c.device}")
    hi = max(b_hi, c_hi)
    return b, c, _histogram_classes(hi + 1 if num_classes is None else num_classes, hi, "the populations")


def modal_labels(preds: Any, *, num_classes: int | None = None) -> torch.Tensor:
    """Most frequent predicted label per example across a population of models.

    ``modal(x) = argmax_c #{k : p_k(x) = c}``; ties go to the smallest label
    (Hooker et al. 2019).

    Parameters
    ----------
    preds : (K, M) or (M,) integer array or tensor
        Predictions of K independently trained models (a population).

    Returns
    -------
    torch.Tensor
        int64 ``(M,)``.
    """
    num_classes = _check_num_classes(num_classes)
    p, hi = _population(preds, "preds", num_classes)
    return _ops.modal_labels(p, _histogram_classes(hi + 1 if num_classes is None else num_classes, hi, "preds"))


def pie_mask(base_population: Any, compressed_population: Any) -> torch.Tensor:
    """Pruning Identified Exemplars (Hooker et al. 2019).

    ``PIE(x) = modal_base(x) != modal_compressed(x)``, the modal labels taken over
    each population (ties: smallest label).

    Returns
    -------
    torch.Tensor
        bool ``(M,)``.
    """
    b, c, num_classes = _two_populations(base_population, compressed_population, None)
    return _ops.modal_labels(b, num_classes) != _ops.modal_labels(c, num_classes)


def cie_scores(base_population: Any, compressed_population: Any, num_classes: int) -> torch.Tensor:
    """Taxicab CIE score per example (Hooker et al. 2020).

    ``score(x) = sum_c |h_c(x) - h_b(x)|`` where ``h_b(x)`` and ``h_c(x)`` are the
    normalized label histograms (fractions of the population predicting class c)
    of the base and compressed populations; in [0, 2]. Computed exactly as
    ``sum_c |H_c K_b - H_b K_c| / (K_b K_c)`` over integer counts ``H``.

    Returns
    -------
    torch.Tensor
        float64 ``(M,)``.
    """
    num_classes = _check_num_classes(num_classes)
    if num_classes is None:
        raise ValueError("cie_scores needs num_classes (the size of the label space)")
    b, c, _ = _two_populations(base_population, compressed_population, num_classes)
    return _ops.cie_scores(b, c, num_classes)


# ---- streaming -------------------------------------------------------------------
class AgreementAccumulator(Accumulator):
    """Streaming pairwise agreement counts for N models.

    Feed batches of predictions (and labels) with :meth:`update`; :meth:`compute`
    returns exactly what :func:`disagreement_matrix`, :func:`flip_matrix` and
    :func:`error_jaccard` give on the concatenated data (all states are integer
    counts with ``reduce="sum"``, so shards merge and all-reduce exactly).

    States: ``disagree[i, j] = #{p_i != p_j}``, ``right_wrong[i, j] = #{i right,
    j wrong}``, ``err_inter[i, j] = |E_i ∩ E_j|``, ``err_union[i, j] = |E_i ∪ E_j|``,
    ``n`` (examples seen), ``n_labelled`` (examples seen with labels) and
    ``n_invalid`` (class indices outside ``[0, num_classes)`` seen by deferred
    checks). Either every batch has labels or none does.

    On CUDA tensors the range of the class indices is not checked per batch
    (that would cost a host round-trip each time): out-of-range values are
    counted on the device and :meth:`compute` raises ``ValueError`` if there were
    any. The counting kernels never index memory by a class value, so deferred
    checking is safe. ``defer_checks`` forces either behaviour.
    """

    def __init__(self, num_models: int, num_classes: int | None = None, *,
                 defer_checks: bool | None = None) -> None:
        super().__init__()
        if isinstance(num_models, bool) or not isinstance(num_models, int) or num_models < 1:
            raise ValueError(f"num_models must be a positive int, got {num_models!r}")
        self.num_models = num_models
        self.num_classes = _check_num_classes(num_classes)
        self.defer_checks = defer_checks
        self.backend = "auto"  # minidiff.ops.agreement backend name (tests pin one)
        zeros = torch.zeros((num_models, num_models), dtype=torch.int64)
        for name in ("disagree", "right_wrong", "err_inter", "err_union"):
            self.add_state(name, zeros, reduce="sum")
        for name in ("n", "n_labelled", "n_invalid"):
            self.add_state(name, torch.zeros((), dtype=torch.int64), reduce="sum")

    def config(self) -> dict[str, Any]:
        return {"num_models": self.num_models, "num_classes": self.num_classes}

    def update(self, preds: Any, labels: Any = None) -> None:
        """Add a batch: ``preds (N, b)`` and optionally ``labels (b,)``."""
        probe = as_tensor(preds, "preds")
        defer = probe.is_cuda if self.defer_checks is None else self.defer_checks
        p, y, _ = _prepare(probe, labels, self.num_classes, check_labels=not defer)
        if p.shape[0] != self.num_models:
            raise ValueError(f"preds has {p.shape[0]} models (rows) but this accumulator was "
                             f"built for num_models={self.num_models}")
        if not self.n.is_cuda:
            # read from the states themselves (merges, syncs and loads keep them true); on CUDA
            # this would cost a host round-trip per batch, and compute() checks it instead
            seen, labelled = int(self.n), int(self.n_labelled)
            if (y is None and labelled > 0) or (y is not None and labelled < seen):
                raise ValueError("pass labels with every batch or with none: flips and error sets "
                                 "need the true class of every example")
        b = p.shape[1]
        disagree, both_right = _ops.pair_counts(p, y, num_classes=self.num_classes,
                                                check=not defer, backend=self.backend)
        self.to(disagree.device)
        if defer:
            invalid = _ops.count_invalid(p, self.num_classes)
            if y is not None:
                invalid = invalid + _ops.count_invalid(y, self.num_classes)
            self.n_invalid += invalid.to(self.n_invalid.device)
        self.disagree += disagree
        self.n += b
        if y is not None:
            right = both_right.diagonal()
            self.right_wrong += right[:, None] - both_right
            inter, union = _error_sets(both_right, b)
            self.err_inter += inter
            self.err_union += union
            self.n_labelled += b

    def compute(self) -> dict[str, Any]:
        """``{"disagreement": (N, N), "flips": (N, N, 2) or None, "error_jaccard":
        (N, N) or None, "n": int}`` (float64 tensors; flips and Jaccard need labels)."""
        n, n_lab, bad = int(self.n), int(self.n_labelled), int(self.n_invalid)
        if bad:
            upper = "inf" if self.num_classes is None else self.num_classes
            raise ValueError(f"{bad} class index/indices passed to update() were outside [0, {upper}) "
                             "(checked at compute() to avoid a host round-trip per batch); the "
                             "counts are not meaningful. Check the label mapping or num_classes.")
        if n == 0:
            raise ValueError("AgreementAccumulator has seen no examples; call update() first")
        if n_lab not in (0, n):
            raise ValueError(f"{n_lab} of {n} examples came with labels (merged accumulators "
                             "disagree); flips and error sets need labels for every example")
        out: dict[str, Any] = {"disagreement": self.disagree.to(torch.float64) / n, "n": n,
                               "flips": None, "error_jaccard": None}
        if n_lab:
            rw = self.right_wrong.to(torch.float64) / n
            out["flips"] = torch.stack([rw, rw.T], dim=-1)
            out["error_jaccard"] = _jaccard(self.err_inter, self.err_union)
        return out
