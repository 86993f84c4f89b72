"""Dispatch for the prediction agreement ops, with pure-torch references.

Ops (registered with ``torch.library.custom_op`` and fake implementations, so
they trace under ``torch.compile``):

``minidiff::agreement_pair_counts(preds, labels, nbits, num_classes) -> (disagree, both_right)``
    int64 ``(N, N)`` counts over ``preds (N, M)``: ``disagree[i, j] =
    #{x : p_i(x) != p_j(x)}`` and ``both_right[i, j] = #{x : p_i(x) = p_j(x) = y(x)}``
    (zeros without labels). ``both_right[i, i]`` is model i's number of correct
    predictions, so flips and error-set intersections/unions follow from these
    two matrices alone (see :func:`minidiff.agreement.flip_matrix`).
``minidiff::agreement_modal_labels(preds, num_classes) -> (M,) int64``
``minidiff::agreement_cie_scores(base, comp, num_classes) -> (M,) float64``

Backends, per call (chosen by :mod:`minidiff.ops.dispatch`, family ``agreement``):

* CPU tensor -> ``minidiff._C`` (bit-plane popcount kernel, AVX-512 VPOPCNTDQ
  when the CPU has it; fused O(K)-per-example population statistics).
* CUDA tensor -> the CUDA kernel (``minidiff._cuda``) or the Triton kernel
  (``minidiff.kernels.agreement``), whichever is faster on this device. The
  rule is measured, not guessed: on the first call per device both kernels
  count the same probe (64 models x 2**20 examples, int32, with labels, 3 timed
  runs after a warm-up, CUDA events); the faster median wins and is cached for
  the process. ``MINIDIFF_BACKEND_AGREEMENT=cuda|triton|torch`` (or
  ``MINIDIFF_BACKEND``) overrides the choice. When only one is available it is
  used; with neither, the torch reference runs on the device. Under
  ``TRITON_INTERPRET=1`` Triton runs on the host and is not a candidate when the
  CUDA kernel exists. Population statistics on CUDA use the label histogram
  kernel of the chosen backend, then argmax / an integer Taxicab sum in torch, in
  chunks of examples so the ``M x C`` histogram stays under 2**26 entries.

Eager and compiled calls go through the same registered op, whose implementation
validates shapes, dtypes, devices and class-index ranges before any kernel runs
(the native kernels check the range inside their own pass over the data, so the
predictions are read once); a bad argument is a ``ValueError``.

The ``*_reference`` functions are the float64/int64 pure-torch definitions the
tests compare every backend with.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch

from minidiff._native import cpu_core, cuda_core, triton_available
from minidiff.ops._validate import num_threads
from minidiff.ops.dispatch import check_backend, choose, define, interpreting

INDEX_DTYPES = (torch.int32, torch.int64)
# Examples per native/kernel call: keeps every per-call count below 2**31.
_MAX_CALL_EXAMPLES = 1 << 30
_HIST_ENTRIES = 1 << 26


# ---- references (pure torch, exact integers / float64) ---------------------
def pair_counts_reference(preds: torch.Tensor, labels: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """int64 ``disagree`` and ``both_right`` by direct broadcast comparison, in chunks of examples."""
    p = preds.to(torch.int64)
    n, m = p.shape
    disagree = torch.zeros((n, n), dtype=torch.int64, device=p.device)
    both_right = torch.zeros((n, n), dtype=torch.int64, device=p.device)
    right = None if labels is None else p == labels.to(torch.int64)[None, :]
    step = max(1, (1 << 24) // (n * n))
    for s in range(0, m, step):
        c = p[:, s:s + step]
        disagree += (c[:, None, :] != c[None, :, :]).sum(-1)
        if right is not None:
            r = right[:, s:s + step]
            both_right += (r[:, None, :] & r[None, :, :]).sum(-1)
    return disagree, both_right


def label_histogram_reference(preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """int64 ``(M, C)``: ``H[x, c] = #{k : preds[k, x] == c}``."""
    p = preds.to(torch.int64)
    h = torch.zeros((p.shape[1], num_classes), dtype=torch.int64, device=p.device)
    return h.scatter_add_(1, p.T, torch.ones_like(p.T))


def modal_labels_reference(preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Most frequent label per example; ``argmax`` returns the first maximum,
    i.e. the smallest label among ties."""
    return label_histogram_reference(preds, num_classes).argmax(dim=1)


def cie_scores_reference(base: torch.Tensor, comp: torch.Tensor, num_classes: int) -> torch.Tensor:
    """float64 ``sum_c |h_c(x) - h_b(x)|`` of the normalized label histograms."""
    hb = label_histogram_reference(base, num_classes).to(torch.float64) / base.shape[0]
    hc = label_histogram_reference(comp, num_classes).to(torch.float64) / comp.shape[0]
    return (hc - hb).abs().sum(dim=1)


# ---- divergences (torch on any device; float64) ----------------------------
def _chunks(m: int, per_example: int, budget: int = 1 << 22):
    step = max(1, budget // max(per_example, 1))
    for s in range(0, m, step):
        yield s, min(m, s + step)


_SERIES_MAX = 0.1
"""Below this relative difference the divergence terms use their power series (see
:func:`_kl_term`, :func:`_js_term`); above it the closed forms lose at most a few
``eps / 0.1`` (~1e-14) relative to cancellation."""


def _series_terms(z: torch.Tensor, lo: int) -> int:
    """Terms of a power series in ``z`` (``|z| < 0.1``, coefficients <= 1) that bring the
    truncation below 1e-16 relative to the leading term: ``max|z|^n <= 1e-16``, so nearly
    equal distributions (``|z| ~ 1e-4``) need 4 instead of 16."""
    zmax = float(z.abs().max()) if z.numel() else 0.0
    if zmax <= 1e-16:
        return lo
    return max(lo, min(16, math.ceil(16 / -math.log10(zmax))))


def _kl_term(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``phi(x, y) = x log(x / y) - x + y`` for ``x, y > 0``, accurate and >= 0 by construction.

    ``phi(x, y) = y h(d)`` with ``d = (x - y) / y`` and ``h(d) = (1 + d) log1p(d) - d``.
    For ``|d| < 0.1`` the closed form cancels (``h(d) ~ d^2 / 2``), so ``h`` is the
    alternating series ``d^2 sum_{k>=2} (-d)^{k-2} / (k (k - 1))``, 14 terms (truncation
    below 1e-16 relative); its partial sums stay above ``d^2 (1/2 - |d| / 6) > 0``.
    Elsewhere the closed form is a sum of a positive and a dominant term, no cancellation.
    """
    diff = x - y
    d = diff / y
    out = x * torch.log1p(d) - diff  # x, y >= eps: d >= -1 + eps, log1p stays finite
    small = d.abs() < _SERIES_MAX
    if bool(small.any()):
        ds = d[small]
        acc = torch.zeros_like(ds)
        for k in range(_series_terms(ds, 1) + 1, 1, -1):  # Horner, highest power first
            acc = 1.0 / (k * (k - 1)) - ds * acc
        out[small] = y[small] * ds * ds * acc
    return out


def _js_term(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per-class Jensen-Shannon term ``(p log(p/m) + q log(q/m)) / 2``, ``m = (p + q)/2``,
    accurate and >= 0 by construction.

    With ``s = p + q``, ``a = 2p/s = 1 + r``, ``b = 2q/s = 1 - r`` it equals
    ``s/4 (a log a + b log b)``: written from ``a`` and ``b`` directly (``xlogy``, so
    ``0 log 0 = 0``), a confident model (``p = 1e-18`` against ``q = 0.5``) gives the
    tiny finite ``a log a`` instead of ``log1p(-1) = -inf``. For ``|r| < 0.1``,
    ``a log a + b log b = r^2 sum_{j>=0} r^{2j} / ((j + 1)(2j + 1))`` (9 terms; all positive).
    """
    s = p + q
    safe = torch.where(s > 0, s, torch.ones_like(s))
    a, b = 2 * p / safe, 2 * q / safe
    g = torch.xlogy(a, a) + torch.xlogy(b, b)
    r = (p - q) / safe
    small = r.abs() < _SERIES_MAX
    if bool(small.any()):
        r2 = r[small] ** 2
        acc = torch.zeros_like(r2)
        for j in range(_series_terms(r2, 1) - 1, -1, -1):
            acc = 1.0 / ((j + 1) * (2 * j + 1)) + r2 * acc
        g[small] = r2 * acc
    return s / 4 * g  # 0 where p = q = 0 (then a = b = 0)


def _terms(p: torch.Tensor, q: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    """Per-(example, class) float64 terms of ``D(p || q)``, summed over the last axis by
    callers; every term is >= 0 by construction, so every divergence is.

    KL: ``phi(max(p, eps), max(q, eps))`` (:func:`_kl_term`), the per-class terms
    of ``sum_c p log(p/q)`` rewritten as ``p log(p/q) - p + q``: the added terms sum
    to ``sum q - sum p = 0`` for two distributions, but the form ``p log(p/q)``
    leaves that first-order difference to rounding (float32 probabilities sum to
    1 only within ~1e-7, and the ``eps`` floor adds mass), which made nearly equal
    rows slightly negative. JS: :func:`_js_term`. TV: ``|p - q| / 2``.
    """
    if kind == "kl":
        return _kl_term(p.clamp_min(eps), q.clamp_min(eps))
    if kind == "js":
        return _js_term(p, q)
    return (p - q).abs() / 2


def divergence_pairs(probs: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    """float64 ``(N, N)`` mean per-example divergence ``D(p_i || p_j)``, computed
    term by term (:func:`_terms`) for every pair in chunks of examples; JS and TV
    are symmetric and computed once per unordered pair."""
    n, m, c = probs.shape
    out = torch.zeros((n, n), dtype=torch.float64, device=probs.device)
    symmetric = kind != "kl"
    for s, e in _chunks(m, n * c):
        p = probs[:, s:e].to(torch.float64)
        for i in range(n):
            lo = i + 1 if symmetric else 0
            if lo >= n:
                continue
            out[i, lo:] += _terms(p[i][None], p[lo:], kind, eps).sum(dim=(1, 2))
    if symmetric:
        out = out + out.T
    out.fill_diagonal_(0.0)  # D(p || p) = 0 exactly (every term is 0 already for KL)
    return out / m


def divergence_rows(probs: torch.Tensor, ref: int, kind: str, eps: float) -> torch.Tensor:
    """float64 ``(N, M)``: ``D(p_ref(x) || p_i(x))`` for every model i and example x."""
    n, m, c = probs.shape
    out = torch.empty((n, m), dtype=torch.float64, device=probs.device)
    for s, e in _chunks(m, n * c):
        p = probs[:, s:e].to(torch.float64)
        out[:, s:e] = _terms(p[ref][None], p, kind, eps).sum(-1)
    return out


def divergence_reference(p: torch.Tensor, q: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    """Per-example float64 ``D(p || q)`` for ``(M, C)`` rows, written out literally."""
    p = p.to(torch.float64)
    q = q.to(torch.float64)
    if kind == "kl":
        pf, qf = p.clamp_min(eps), q.clamp_min(eps)
        return (pf * torch.log(pf / qf) - pf + qf).sum(-1)
    if kind == "js":
        mix = (p + q) / 2
        return (torch.xlogy(p, p / mix).nan_to_num(0.0) + torch.xlogy(q, q / mix).nan_to_num(0.0)).sum(-1) / 2
    return (p - q).abs().sum(-1) / 2


# ---- CPU backend ------------------------------------------------------------
def minmax(t: torch.Tensor) -> tuple[int, int]:
    """(min, max) of a non-empty contiguous int32/int64 tensor: one native pass on
    CPU (torch.aminmax is several times slower there), torch.aminmax on GPU."""
    if t.device.type == "cpu" and t.dtype in INDEX_DTYPES and t.is_contiguous():
        return tuple(cpu_core().agreement_minmax(t.data_ptr(), t.dtype == torch.int64, t.numel(),
                                                 num_threads()))
    lo, hi = torch.aminmax(t)
    return int(lo), int(hi)



def range_error(t: torch.Tensor, name: str, num_classes: int | None) -> ValueError:
    """The ValueError for class indices outside [0, num_classes) (or negative):
    how many, the first bad value and where it is."""
    bad = t < 0 if num_classes is None else (t < 0) | (t >= num_classes)
    count = int(bad.sum())
    first = tuple(int(v) for v in torch.nonzero(bad)[0])
    where = f"{name}[{', '.join(map(str, first))}]"
    upper = "inf" if num_classes is None else str(num_classes)
    return ValueError(
        f"{name} has {count} value(s) outside [0, {upper}) (first: {int(t[first])} at {where}); "
        f"class indices must be in [0, num_classes). Check the label mapping, or pass the right "
        f"num_classes.")


def check_range(t: torch.Tensor, name: str, num_classes: int | None) -> int:
    """Raise :func:`range_error` unless every value is in [0, num_classes); return the max."""
    lo, hi = minmax(t)
    if lo < 0 or (num_classes is not None and hi >= num_classes):
        raise range_error(t, name, num_classes)
    return hi


def _pair_counts_native(preds, labels, nbits, num_classes):
    # The native call range-checks each block of predictions as it first reads it
    # (one pass over memory instead of two); nothing is returned when one is bad.
    n, m = preds.shape
    max_value = num_classes - 1 if num_classes else torch.iinfo(preds.dtype).max
    disagree = torch.empty((n, n), dtype=torch.int64)
    both_right = torch.zeros((n, n), dtype=torch.int64)
    lo, hi = cpu_core().agreement_pair_counts(
        preds.data_ptr(), labels.data_ptr() if labels is not None else 0,
        preds.dtype == torch.int64, n, m, nbits, max_value, disagree.data_ptr(),
        both_right.data_ptr(), num_threads())
    if lo < 0 or hi > max_value:
        raise range_error(preds, "preds", num_classes or None)
    return disagree, both_right


def _modal_native(preds, num_classes):
    k, m = preds.shape
    out = torch.empty(m, dtype=torch.int64)
    cpu_core().agreement_modal_labels(preds.data_ptr(), preds.dtype == torch.int64, k, m,
                                      num_classes, out.data_ptr(), num_threads())
    return out


def _cie_native(base, comp, num_classes):
    m = base.shape[1]
    out = torch.empty(m, dtype=torch.float64)
    cpu_core().agreement_cie_scores(base.data_ptr(), base.dtype == torch.int64, base.shape[0],
                                    comp.data_ptr(), comp.dtype == torch.int64, comp.shape[0],
                                    m, num_classes, out.data_ptr(), num_threads())
    return out


# ---- CUDA backends ----------------------------------------------------------
def _stream_handle(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _pair_counts_cuda(preds, labels, nbits, num_classes=0):
    n, m = preds.shape
    disagree = torch.zeros((n, n), dtype=torch.int64, device=preds.device)
    both_right = torch.zeros((n, n), dtype=torch.int64, device=preds.device)
    with torch.cuda.device(preds.device):  # the kernel launches on the current device
        cuda_core().agreement_pair_counts(
            preds.data_ptr(), labels.data_ptr() if labels is not None else 0,
            preds.dtype == torch.int64, n, m, disagree.data_ptr(), both_right.data_ptr(),
            _stream_handle(preds.device))
    return disagree, both_right


def _pair_counts_triton(preds, labels, nbits, num_classes=0):
    from minidiff.kernels import agreement as ka
    if preds.is_cuda:
        with torch.cuda.device(preds.device):
            return ka.pair_counts(preds, labels)
    return ka.pair_counts(preds, labels)  # CPU tensors: only under TRITON_INTERPRET=1


def _histogram_cuda(preds, num_classes):
    k, m = preds.shape
    h = torch.zeros((m, num_classes), dtype=torch.int32, device=preds.device)
    with torch.cuda.device(preds.device):
        cuda_core().agreement_label_histogram(preds.data_ptr(), preds.dtype == torch.int64, k, m,
                                              num_classes, h.data_ptr(), _stream_handle(preds.device))
    return h


def _histogram_triton(preds, num_classes):
    from minidiff.kernels import agreement as ka
    if preds.is_cuda:
        with torch.cuda.device(preds.device):
            return ka.label_histogram(preds, num_classes)
    return ka.label_histogram(preds, num_classes)


def _histogram_torch(preds, num_classes):
    return label_histogram_reference(preds, num_classes)


def _histogram_native(preds, num_classes):
    k, m = preds.shape
    h = torch.zeros((m, num_classes), dtype=torch.int32)
    cpu_core().agreement_label_histogram(preds.data_ptr(), preds.dtype == torch.int64, k, m,
                                         num_classes, h.data_ptr(), num_threads())
    return h


_PAIR_IMPLS: dict[str, Callable] = {
    "cuda": _pair_counts_cuda, "triton": _pair_counts_triton,
    "torch": lambda p, l, nb, nc=0: pair_counts_reference(p, l),
}
_HIST_IMPLS: dict[str, Callable] = {
    "cuda": _histogram_cuda, "triton": _histogram_triton, "torch": _histogram_torch,
    "native": _histogram_native,
}


def _cuda_kernel_available() -> bool:
    core = cuda_core()
    return core is not None and hasattr(core, "agreement_pair_counts") and core.device_count() > 0


def _cuda_available_backends() -> list[str]:
    out = ["cuda"] if _cuda_kernel_available() else []
    # Under TRITON_INTERPRET=1 Triton runs on the host: never the faster one.
    if triton_available() and not (interpreting() and out):
        out.append("triton")
    return out


@functools.lru_cache(maxsize=None)
def _measured_cuda_backend(device_index: int) -> str:
    """The faster of the CUDA and Triton kernels on this device (see module doc)."""
    candidates = _cuda_available_backends()
    if not candidates:
        return "torch"
    if len(candidates) == 1:
        return candidates[0]
    device = torch.device("cuda", device_index)
    g = torch.Generator(device=device).manual_seed(0)
    probe = torch.randint(0, 10, (64, 1 << 20), dtype=torch.int32, device=device, generator=g)
    probe_labels = torch.randint(0, 10, (1 << 20,), dtype=torch.int32, device=device, generator=g)
    medians = {}
    for name in candidates:
        fn = _PAIR_IMPLS[name]
        fn(probe, probe_labels, 4)  # warm-up (Triton compiles here)
        times = []
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(probe, probe_labels, 4)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        medians[name] = sorted(times)[1]
    return min(medians, key=medians.get)


def _candidates(t: torch.Tensor) -> list[str]:
    """Backends that can run the agreement ops on ``t``'s device, default first."""
    if t.is_cuda:
        index = t.device.index if t.device.index is not None else torch.cuda.current_device()
        first = _measured_cuda_backend(index)
        rest = [b for b in _cuda_available_backends() if b != first]
        return [first] + rest + (["torch"] if first != "torch" else [])
    if t.device.type == "cpu":
        return ["native", "torch"] + (["triton"] if interpreting() and triton_available() else [])
    return ["torch"]


def cuda_backend(device: torch.device) -> str:
    """Name of the backend the dispatch uses for CUDA tensors on ``device`` ("cuda",
    "triton" or "torch"): the measured faster kernel unless ``MINIDIFF_BACKEND[_AGREEMENT]``
    prefers another that applies."""
    return choose("agreement", _candidates(torch.empty(0, device=device)))


def _resolve(backend: str, t: torch.Tensor) -> str:
    return check_backend(backend, "agreement", _candidates(t))


# ---- validation at the op boundary -------------------------------------------
MAX_CLASSES = 1 << 24
"""Largest ``num_classes`` of the population ops: they keep a histogram of
``num_classes`` counts per example block and thread (64 MiB of int32 per thread at this
limit)."""


def _check_index_matrix(t: torch.Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch tensor, got {type(t).__name__}")
    if t.ndim != 2 or t.dtype not in INDEX_DTYPES:
        raise ValueError(f"{name} must be a 2-D int32 or int64 tensor (num_models, num_examples), "
                         f"got {str(t.dtype).replace('torch.', '')} of shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{name} has shape {tuple(t.shape)}: need at least one model and one example")


def _check_int_arg(value, name: str, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {value!r}")
    return value


def _check_pair_args(preds, labels, nbits, num_classes) -> None:
    _check_index_matrix(preds, "preds")
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.ndim != 1:
            raise ValueError(f"labels must be a 1-D tensor (num_examples,), got "
                             f"{tuple(getattr(labels, 'shape', ()))}")
        if labels.dtype != preds.dtype:
            raise ValueError(f"labels are {str(labels.dtype).replace('torch.', '')} but preds "
                             f"{str(preds.dtype).replace('torch.', '')}; cast both to one integer dtype")
        if labels.shape[0] != preds.shape[1]:
            raise ValueError(f"labels has {labels.shape[0]} examples but preds has {preds.shape[1]}")
        if labels.device != preds.device:
            raise ValueError(f"labels are on {labels.device} but preds on {preds.device}")
    _check_int_arg(nbits, "nbits", -1, 63)
    _check_int_arg(num_classes, "num_classes", 0, torch.iinfo(torch.int64).max)
    if nbits == 0 and labels is None:
        raise ValueError("nbits=0 (skip the disagreement counts) needs labels")


def _check_population_args(num_classes, *pops: tuple[torch.Tensor, str]) -> None:
    for t, name in pops:
        _check_index_matrix(t, name)
    _check_int_arg(num_classes, "num_classes", 1, MAX_CLASSES)
    (first, fname), *rest = pops
    for t, name in rest:
        if t.shape[1] != first.shape[1]:
            raise ValueError(f"{fname} has {first.shape[1]} examples but {name} has {t.shape[1]}; both "
                             "must predict the same examples in the same order")
        if t.device != first.device:
            raise ValueError(f"{fname} is on {first.device} but {name} on {t.device}")


# ---- the ops ----------------------------------------------------------------
def _pair_counts_impl(preds: torch.Tensor, labels: torch.Tensor | None, nbits: int,
                      num_classes: int, backend: str = "auto", check: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    _check_pair_args(preds, labels, nbits, num_classes)
    name = _resolve(backend, preds)
    preds = preds.contiguous()
    labels = None if labels is None else labels.contiguous()
    if check and name != "native":  # the native kernel checks the range in its own pass
        check_range(preds, "preds", num_classes or None)
    fn = _pair_counts_native if name == "native" else _PAIR_IMPLS[name]
    if nbits == 0 and name != "native":  # same contract on every backend: disagree left 0
        inner = fn

        def fn(p, l, nb, nc):
            _, r = inner(p, l, nb, nc)
            return torch.zeros_like(r), r
    m = preds.shape[1]
    if m <= _MAX_CALL_EXAMPLES:
        return fn(preds, labels, nbits, num_classes)
    total_d = total_r = None
    for s in range(0, m, _MAX_CALL_EXAMPLES):
        e = min(m, s + _MAX_CALL_EXAMPLES)
        d, r = fn(preds[:, s:e].contiguous(), None if labels is None else labels[s:e].contiguous(),
                  nbits, num_classes)
        total_d = d if total_d is None else total_d + d
        total_r = r if total_r is None else total_r + r
    return total_d, total_r


def _histogram_chunks(preds: torch.Tensor, num_classes: int, name: str):
    m = preds.shape[1]
    step = max(1, _HIST_ENTRIES // num_classes)
    for s in range(0, m, step):
        e = min(m, s + step)
        yield s, e, _HIST_IMPLS[name](preds[:, s:e].contiguous(), num_classes)


def _native_or_range_error(call, num_classes: int, *pops: tuple[torch.Tensor, str]):
    """Run a native population call, which checks every class index in its own pass
    and raises ValueError on the first out-of-range one; then name where it is."""
    try:
        return call()
    except ValueError:
        for t, name in pops:
            check_range(t, name, num_classes)
        raise


def _modal_impl(preds: torch.Tensor, num_classes: int, backend: str = "auto") -> torch.Tensor:
    _check_population_args(num_classes, (preds, "preds"))
    name = _resolve(backend, preds)
    preds = preds.contiguous()
    if name == "native":
        return _native_or_range_error(lambda: _modal_native(preds, num_classes), num_classes, (preds, "preds"))
    check_range(preds, "preds", num_classes)
    out = torch.empty(preds.shape[1], dtype=torch.int64, device=preds.device)
    for s, e, h in _histogram_chunks(preds, num_classes, name):
        out[s:e] = h.argmax(dim=1)  # first maximum = smallest label among ties
    return out


def _cie_impl(base: torch.Tensor, comp: torch.Tensor, num_classes: int,
              backend: str = "auto") -> torch.Tensor:
    pops = ((base, "base"), (comp, "comp"))
    _check_population_args(num_classes, *pops)
    name = _resolve(backend, base)
    base, comp = base.contiguous(), comp.contiguous()
    pops = ((base, "base"), (comp, "comp"))
    if name == "native":
        return _native_or_range_error(lambda: _cie_native(base, comp, num_classes), num_classes, *pops)
    for t, tname in pops:
        check_range(t, tname, num_classes)
    kb, kc = base.shape[0], comp.shape[0]
    out = torch.empty(base.shape[1], dtype=torch.float64, device=base.device)
    for (s, e, hb), (_, _, hc) in zip(_histogram_chunks(base, num_classes, name),
                                      _histogram_chunks(comp, num_classes, name)):
        # sum_c |hc/Kc - hb/Kb| = sum_c |hc Kb - hb Kc| / (Kb Kc): integers, one rounding.
        diff = (hc.to(torch.int64) * kb - hb.to(torch.int64) * kc).abs().sum(dim=1)
        out[s:e] = diff.to(torch.float64) / (kb * kc)
    return out


def _pair_fake(preds, labels, nbits, num_classes, backend="auto", check=True):
    _check_pair_args(preds, labels, nbits, num_classes)
    n = preds.shape[0]
    return preds.new_empty((n, n), dtype=torch.int64), preds.new_empty((n, n), dtype=torch.int64)


def _modal_fake(preds, num_classes, backend="auto"):
    _check_population_args(num_classes, (preds, "preds"))
    return preds.new_empty((preds.shape[1],), dtype=torch.int64)


def _cie_fake(base, comp, num_classes, backend="auto"):
    _check_population_args(num_classes, (base, "base"), (comp, "comp"))
    return base.new_empty((base.shape[1],), dtype=torch.float64)


_pair_counts_op = define(
    "agreement_pair_counts",
    '(Tensor preds, Tensor? labels, int nbits, int num_classes, str backend="auto", bool check=True) '
    "-> (Tensor, Tensor)", _pair_counts_impl, _pair_fake)
_modal_op = define("agreement_modal_labels", '(Tensor preds, int num_classes, str backend="auto") -> Tensor',
                   _modal_impl, _modal_fake)
_cie_op = define("agreement_cie_scores",
                 '(Tensor base, Tensor comp, int num_classes, str backend="auto") -> Tensor',
                 _cie_impl, _cie_fake)


# ---- entry points used by minidiff.agreement ----------------------------------
def pair_counts(preds: torch.Tensor, labels: torch.Tensor | None = None, *, nbits: int = -1,
                num_classes: int | None = None, check: bool = True, backend: str = "auto"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """int32/int64 ``preds (N, M)`` (values >= 0) and optional ``labels (M,)`` of the
    same dtype -> int64 ``(disagree, both_right)``, through
    ``torch.ops.minidiff.agreement_pair_counts``.

    Predictions outside ``[0, num_classes)`` (or negative, without
    ``num_classes``) raise :func:`range_error`; labels are checked by the caller.
    ``check=False`` skips that check on the GPU/Triton/torch backends (no host
    sync; the caller counts invalid values with :func:`count_invalid` instead;
    these kernels never index memory by a class value). The native kernel always
    checks, in its counting pass.
    ``nbits`` (native kernel only): bit-planes per class index, -1 = from the
    data; ``nbits=0`` with labels skips the disagreement counts (zeros) on every backend.
    """
    nc = 0 if num_classes is None else num_classes
    return _pair_counts_op(preds, labels, nbits, nc, backend, check)


def count_invalid(t: torch.Tensor, num_classes: int | None) -> torch.Tensor:
    """Device-side int64 count of values outside [0, num_classes) (negative, without num_classes)."""
    bad = t < 0 if num_classes is None else (t < 0) | (t >= num_classes)
    return bad.sum(dtype=torch.int64)


def modal_labels(preds: torch.Tensor, num_classes: int, *, backend: str = "auto") -> torch.Tensor:
    """Most frequent label per example of ``preds (K, M)`` (ties: smallest), int64
    ``(M,)``, through ``torch.ops.minidiff.agreement_modal_labels``."""
    return _modal_op(preds, num_classes, backend)


def cie_scores(base: torch.Tensor, comp: torch.Tensor, num_classes: int, *,
               backend: str = "auto") -> torch.Tensor:
    """float64 ``(M,)`` Taxicab distance between the populations' normalized label
    histograms, through ``torch.ops.minidiff.agreement_cie_scores``."""
    return _cie_op(base, comp, num_classes, backend)


def label_histogram(preds: torch.Tensor, num_classes: int, *, backend: str = "auto") -> torch.Tensor:
    """``(M, C)`` label counts ``H[x, c] = #{k : preds[k, x] == c}`` of a population
    ``preds (K, M)`` (values in ``[0, num_classes)``, checked): int32 from the
    kernels, int64 from "torch". ``backend`` "auto" picks the native core on CPU
    and the measured CUDA/Triton choice on GPU."""
    _check_population_args(num_classes, (preds, "preds"))
    name = _resolve(backend, preds)
    preds = preds.contiguous()
    if name == "native":
        return _native_or_range_error(lambda: _histogram_native(preds, num_classes), num_classes,
                                      (preds, "preds"))
    check_range(preds, "preds", num_classes)
    return _HIST_IMPLS[name](preds, num_classes)
