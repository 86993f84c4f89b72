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

Backends, per call:

* CPU tensor -> ``minidiff._C`` (bit-plane popcount kernel, AVX-512 VPOPCNTDQ
  when the CPU has it; fused O(K)-per-example population statistics).
* CUDA tensor -> the CUDA kernel (``minidiff._cuda``) or the Triton kernel
  (``minidiff.kernels.agreement``), whichever is faster on this device. The
  rule is measured, not guessed: on the first call per device both kernels
  count the same probe (64 models x 2**20 examples, int32, with labels, 3 timed
  runs after a warm-up, CUDA events); the faster median wins and is cached for
  the process. ``MINIDIFF_AGREEMENT_BACKEND=cuda|triton|torch`` overrides the
  choice. When only one is available it is used; with neither, the torch
  reference runs on the device. Under ``TRITON_INTERPRET=1`` Triton runs on
  the host and is not a candidate when the CUDA kernel exists. Population statistics on CUDA use the label
  histogram kernel of the chosen backend, then argmax / an integer Taxicab sum
  in torch, in chunks of examples so the ``M x C`` histogram stays under 2**26
  entries.

Eager calls go straight to the implementation; only traced calls (torch.compile,
export, fake tensors) go through the registered op, whose first eager call would
otherwise import torch._dynamo.

The ``*_reference`` functions are the float64/int64 pure-torch definitions the
tests compare every backend with.
"""

from __future__ import annotations

import functools
import os
from typing import Callable

import torch

from minidiff._native import cpu_core, cuda_core, triton_available
from minidiff.ops._validate import num_threads

INDEX_DTYPES = (torch.int32, torch.int64)
# Examples per native/kernel call: keeps every per-call count below 2**31.
_MAX_CALL_EXAMPLES = 1 << 30
_HIST_ENTRIES = 1 << 26
_BACKENDS = ("auto", "native", "cuda", "triton", "torch", "reference")


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


def _terms(p: torch.Tensor, q: torch.Tensor, kind: str, eps: float) -> torch.Tensor:
    """Per-(example, class) float64 terms of ``D(p || q)``, summed over the last axis by callers.

    Written with ``log1p`` of relative differences so that nearly equal
    distributions (a quantized copy of a model) keep full relative precision
    instead of cancelling: ``log(p'/q') = log1p((p' - q')/q')`` with ``p' = max(p, eps)``,
    and for JS ``log(p/m) = log1p((p - q)/(p + q))``.
    """
    zero = torch.zeros((), dtype=p.dtype, device=p.device)
    if kind == "kl":
        pf, qf = p.clamp_min(eps), q.clamp_min(eps)
        return torch.where(p > 0, p * torch.log1p((pf - qf) / qf), zero)
    if kind == "js":
        s = p + q
        r = torch.where(s > 0, (p - q) / torch.where(s > 0, s, 1), zero)
        return 0.5 * (torch.where(p > 0, p * torch.log1p(r), zero)
                      + torch.where(q > 0, q * torch.log1p(-r), zero))
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
        return torch.where(p > 0, p * torch.log(p.clamp_min(eps) / q.clamp_min(eps)),
                           torch.zeros_like(p)).sum(-1)
    if kind == "js":
        mix = (p + q) / 2
        return (divergence_reference(p, mix, "kl", 0.0) + divergence_reference(q, mix, "kl", 0.0)) / 2
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


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _cuda_available_backends() -> list[str]:
    out = []
    core = cuda_core()
    if core is not None and hasattr(core, "agreement_pair_counts") and core.device_count() > 0:
        out.append("cuda")
    # Under TRITON_INTERPRET=1 Triton runs on the host: never the faster one.
    if triton_available() and not (_interpreting() and out):
        out.append("triton")
    return out


@functools.lru_cache(maxsize=None)
def _measured_cuda_backend(device_index: int) -> str:
    """The faster of the CUDA and Triton kernels on this device (see module doc)."""
    forced = os.environ.get("MINIDIFF_AGREEMENT_BACKEND", "").strip().lower()
    if forced:
        if forced not in _PAIR_IMPLS:
            raise ValueError(f"MINIDIFF_AGREEMENT_BACKEND={forced!r}: use one of {sorted(_PAIR_IMPLS)}")
        return forced
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


def cuda_backend(device: torch.device) -> str:
    """Name of the backend the CUDA dispatch uses on ``device`` ("cuda", "triton" or "torch")."""
    return _measured_cuda_backend(device.index if device.index is not None else torch.cuda.current_device())


def _resolve(backend: str, t: torch.Tensor) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"backend={backend!r}: use one of {_BACKENDS}")
    if backend == "reference":
        return "torch"
    if backend == "auto":
        return cuda_backend(t.device) if t.is_cuda else "native"
    if backend == "native" and t.device.type != "cpu":
        raise ValueError("backend='native' (minidiff._C) needs CPU tensors; use 'auto' for CUDA tensors")
    if backend == "cuda" and not t.is_cuda:
        raise ValueError("backend='cuda' needs CUDA tensors")
    if backend == "triton" and not t.is_cuda and not _interpreting():
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    return backend


# ---- the ops ----------------------------------------------------------------
def _pair_counts_impl(preds: torch.Tensor, labels: torch.Tensor | None, nbits: int,
                      num_classes: int, backend: str = "auto", check: bool = True
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    name = _resolve(backend, preds)
    if nbits == 0 and labels is None:
        raise ValueError("nbits=0 (skip the disagreement counts) needs labels")
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


def _modal_impl(preds: torch.Tensor, num_classes: int, backend: str = "auto") -> torch.Tensor:
    name = _resolve(backend, preds)
    if name == "native":
        return _modal_native(preds, num_classes)
    out = torch.empty(preds.shape[1], dtype=torch.int64, device=preds.device)
    for s, e, h in _histogram_chunks(preds, num_classes, name):
        out[s:e] = h.argmax(dim=1)  # first maximum = smallest label among ties
    return out


def _cie_impl(base: torch.Tensor, comp: torch.Tensor, num_classes: int,
              backend: str = "auto") -> torch.Tensor:
    name = _resolve(backend, base)
    if name == "native":
        return _cie_native(base, comp, num_classes)
    kb, kc = base.shape[0], comp.shape[0]
    out = torch.empty(base.shape[1], dtype=torch.float64, device=base.device)
    for (s, e, hb), (_, _, hc) in zip(_histogram_chunks(base, num_classes, name),
                                      _histogram_chunks(comp, num_classes, name)):
        # sum_c |hc/Kc - hb/Kb| = sum_c |hc Kb - hb Kc| / (Kb Kc): integers, one rounding.
        diff = (hc.to(torch.int64) * kb - hb.to(torch.int64) * kc).abs().sum(dim=1)
        out[s:e] = diff.to(torch.float64) / (kb * kc)
    return out


@torch.library.custom_op("minidiff::agreement_pair_counts", mutates_args=())
def _pair_counts_op(preds: torch.Tensor, labels: torch.Tensor | None, nbits: int, num_classes: int
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    return _pair_counts_impl(preds, labels, nbits, num_classes)


@_pair_counts_op.register_fake
def _(preds, labels, nbits, num_classes):
    n = preds.shape[0]
    return preds.new_empty((n, n), dtype=torch.int64), preds.new_empty((n, n), dtype=torch.int64)


@torch.library.custom_op("minidiff::agreement_modal_labels", mutates_args=())
def _modal_op(preds: torch.Tensor, num_classes: int) -> torch.Tensor:
    return _modal_impl(preds, num_classes)


@_modal_op.register_fake
def _(preds, num_classes):
    return preds.new_empty((preds.shape[1],), dtype=torch.int64)


@torch.library.custom_op("minidiff::agreement_cie_scores", mutates_args=())
def _cie_op(base: torch.Tensor, comp: torch.Tensor, num_classes: int) -> torch.Tensor:
    return _cie_impl(base, comp, num_classes)


@_cie_op.register_fake
def _(base, comp, num_classes):
    return base.new_empty((base.shape[1],), dtype=torch.float64)


# ---- entry points used by minidiff.agreement (inputs already validated) ------
def _traced(t: torch.Tensor) -> bool:
    """Route through the registered custom op only while tracing (torch.compile,
    export, fake/functional tensors): the op's first eager call imports
    torch._dynamo (seconds), which plain eager use should not pay."""
    return torch.compiler.is_compiling() or type(t) is not torch.Tensor


def pair_counts(preds: torch.Tensor, labels: torch.Tensor | None = None, *, nbits: int = -1,
                num_classes: int | None = None, check: bool = True, backend: str = "auto"
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated contiguous int32/int64 ``preds (N, M)`` (values >= 0) and optional
    ``labels (M,)`` of the same dtype -> int64 ``(disagree, both_right)``.

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
    if backend == "auto" and check and _traced(preds):
        return _pair_counts_op(preds, labels, nbits, nc)
    return _pair_counts_impl(preds, labels, nbits, nc, backend, check)


def count_invalid(t: torch.Tensor, num_classes: int | None) -> torch.Tensor:
    """Device-side int64 count of values outside [0, num_classes) (negative, without num_classes)."""
    bad = t < 0 if num_classes is None else (t < 0) | (t >= num_classes)
    return bad.sum(dtype=torch.int64)


def modal_labels(preds: torch.Tensor, num_classes: int, *, backend: str = "auto") -> torch.Tensor:
    if backend == "auto" and _traced(preds):
        return _modal_op(preds, num_classes)
    return _modal_impl(preds, num_classes, backend)


def cie_scores(base: torch.Tensor, comp: torch.Tensor, num_classes: int, *,
               backend: str = "auto") -> torch.Tensor:
    if backend == "auto" and _traced(base):
        return _cie_op(base, comp, num_classes)
    return _cie_impl(base, comp, num_classes, backend)


def label_histogram(preds: torch.Tensor, num_classes: int, *, backend: str = "auto") -> torch.Tensor:
    """``(M, C)`` label counts ``H[x, c] = #{k : preds[k, x] == c}`` of a validated
    population ``preds (K, M)`` (values in ``[0, num_classes)``): int32 from the
    kernels, int64 from "torch". ``backend`` "auto" picks the native core on CPU
    and the measured CUDA/Triton choice on GPU."""
    if backend == "auto":
        backend = cuda_backend(preds.device) if preds.is_cuda else "native"
    if backend not in _HIST_IMPLS:
        raise ValueError(f"backend={backend!r}: use one of {sorted(_HIST_IMPLS)} or 'auto'")
    if backend == "native" and preds.device.type != "cpu":
        raise ValueError("backend='native' needs CPU tensors")
    return _HIST_IMPLS[backend](preds, num_classes)
