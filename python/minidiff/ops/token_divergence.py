"""Dispatch for the fused token-divergence op, with its float64 reference.

Op (registered by ``minidiff.ops.dispatch.define`` with a fake implementation, so it traces under
``torch.compile``)::

    minidiff::token_divergence(base (R, V), variant (R, V), targets (R,)?) -> (stats_f (R, 8) f64, stats_i (R, 4) i64)

Per row (one scored token) with ``p = softmax(base)``, ``q = softmax(variant)``,
``log p = z - logsumexp(z)`` (natural log), the float64 columns are
``F_COLUMNS`` and the int64 columns ``I_COLUMNS``:

* ``kld = sum_v p_v (log p_v - log q_v)``, ``kld_reverse`` with p and q swapped;
  terms with ``p_v = 0`` are 0 (``0 log 0 = 0``); ``p_v > 0 = q_v`` gives ``+inf``.
* ``js = (KL(p || m) + KL(q || m)) / 2``, ``m = (p + q) / 2``, evaluated per
  vocabulary entry as ``-p_v g(-d_v) - q_v g(d_v)`` with ``d_v = log p_v - log q_v``
  and ``g(x) = log((1 + e^x) / 2)``, which is exactly 0 where ``p_v = q_v`` and
  never overflows.
* ``entropy_base = -sum_v p_v log p_v``.
* ``top5_overlap`` / ``top10_overlap``: ``|top_k(p) ∩ top_k(q)| / min(k, V)``,
  top-k sets ordered by (logit descending, index ascending), i.e. ties go to the
  smaller token id.
* ``logp_base`` / ``logp_variant``: log-probability of the target token (0 without targets).
* ``top1_base`` / ``top1_variant``: argmax (first maximum); ``rank_base`` /
  ``rank_variant``: number of tokens with a strictly larger logit than the
  target (0 when the target is top-1; 0 without targets).

No epsilon floors anywhere: identical rows give exactly 0 for both KLDs and JS.
``-inf`` logits (masked vocabulary) are exact probability zeros. NaN or
``+inf`` logits and rows without any finite logit raise ``ValueError``.

Backends: ``"native"`` (``minidiff._C``, CPU, float32/float64; float16/bfloat16
upcast per block of rows), ``"triton"`` (CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``), ``"reference"`` (:func:`token_divergence_reference`,
any device). ``"auto"`` picks native on CPU and Triton on CUDA (reference when
Triton is missing).

Every argument is validated here, at the op's boundary, before any pointer
reaches native code: dtypes, shapes, devices, contiguity, targets in ``[0, V)``.
"""

from __future__ import annotations

from typing import Any

import torch

from minidiff._native import cpu_core, triton_available
from minidiff.ops._validate import num_threads
from minidiff.ops.dispatch import choose, define, interpreting

F_COLUMNS = ("kld", "kld_reverse", "js", "entropy_base", "top5_overlap", "top10_overlap",
             "logp_base", "logp_variant")
I_COLUMNS = ("top1_base", "top1_variant", "rank_base", "rank_variant")
TOPK = (5, 10)
LOGIT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TARGET_DTYPES = (torch.int32, torch.int64)
BACKENDS = ("auto", "native", "triton", "reference")
# Rows per native call for half-precision inputs (upcast block by block, bounded memory).
_UPCAST_ELEMENTS = 1 << 24


# ---- validation ---------------------------------------------------------------
def check_args(base: torch.Tensor, variant: torch.Tensor, targets: torch.Tensor | None) -> None:
    """Raise ValueError unless ``base``/``variant`` are same-shape ``(R, V)`` floating
    tensors on one device and ``targets`` is ``None`` or an int ``(R,)`` tensor there
    with values in ``[0, V)``. Cheap (no pass over the logits)."""
    for name, t in (("base_logits", base), ("variant_logits", variant)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.ndim != 2:
            raise ValueError(f"{name} must be 2-D (rows, vocabulary) here, got shape {tuple(t.shape)}")
        if t.dtype not in LOGIT_DTYPES:
            raise ValueError(f"{name} has dtype {t.dtype}; logits must be float16, bfloat16, "
                             "float32 or float64")
    if base.shape != variant.shape:
        raise ValueError(f"base_logits {tuple(base.shape)} and variant_logits {tuple(variant.shape)} "
                         "must have the same shape: one row per scored token, one column per "
                         "vocabulary entry (models with different vocabularies cannot be compared "
                         "token by token)")
    if base.device != variant.device:
        raise ValueError(f"base_logits is on {base.device} but variant_logits on {variant.device}; "
                         "move both to one device")
    rows, vocab = base.shape
    if vocab < 1:
        raise ValueError("the vocabulary axis is empty (V = 0): a distribution needs at least one entry")
    if targets is None:
        return
    if not isinstance(targets, torch.Tensor):
        raise ValueError(f"targets must be a torch.Tensor or None, got {type(targets).__name__}")
    if targets.dtype not in TARGET_DTYPES:
        raise ValueError(f"targets has dtype {targets.dtype}; token ids must be int32 or int64")
    if targets.ndim != 1 or targets.shape[0] != rows:
        raise ValueError(f"targets must have shape ({rows},), one token id per row of logits, "
                         f"got {tuple(targets.shape)}")
    if targets.device != base.device:
        raise ValueError(f"targets is on {targets.device} but the logits on {base.device}")
    if rows:
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= vocab:
            bad = int(((targets < 0) | (targets >= vocab)).sum())
            first = int(((targets < 0) | (targets >= vocab)).nonzero()[0, 0])
            raise ValueError(f"targets has {bad} token id(s) outside [0, {vocab}) (first: "
                             f"{int(targets[first])} at row {first}); the vocabulary has {vocab} "
                             "entries")


def _bad_row_error(kind: int, row: int, name: str) -> ValueError:
    if kind == 1:
        return ValueError(f"{name} row {row} contains NaN or +inf; logits must be finite or -inf "
                          "(masked vocabulary entries)")
    return ValueError(f"{name} row {row} has no finite logit (every entry is -inf), so it is "
                      "not a distribution")


def check_values(base: torch.Tensor, variant: torch.Tensor) -> None:
    """Raise ValueError on NaN/+inf logits or rows with no finite entry (one pass in torch;
    the native kernel does the same check inside its own pass instead)."""
    for name, t in (("base_logits", base), ("variant_logits", variant)):
        if t.numel() == 0:
            continue
        bad = torch.isnan(t) | torch.isposinf(t)
        if bool(bad.any()):
            raise _bad_row_error(1, int(bad.any(dim=1).nonzero()[0, 0]), name)
        empty = torch.isneginf(t).all(dim=1)
        if bool(empty.any()):
            raise _bad_row_error(2, int(empty.nonzero()[0, 0]), name)


# ---- reference (pure torch, float64) -------------------------------------------
def _g(x: torch.Tensor) -> torch.Tensor:
    """``log((1 + e^x) / 2)`` without overflow; exactly 0 at x = 0."""
    a = x.abs()
    t = torch.log1p(torch.expm1(-a) / 2)
    return torch.where(x > 0, x + t, t)


def _topk_sets(z: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the top-k (logit descending, index ascending) per row."""
    idx = torch.sort(z, dim=-1, descending=True, stable=True).indices
    return idx[:, :min(k, z.shape[-1])]


def token_divergence_reference(base: torch.Tensor, variant: torch.Tensor,
                               targets: torch.Tensor | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's definition in float64 torch, row block by row block; returns
    ``(stats_f (R, 8) float64, stats_i (R, 4) int64)`` with columns
    :data:`F_COLUMNS` / :data:`I_COLUMNS`. Inputs must already be validated."""
    rows, vocab = base.shape
    out_f = torch.zeros((rows, len(F_COLUMNS)), dtype=torch.float64, device=base.device)
    out_i = torch.zeros((rows, len(I_COLUMNS)), dtype=torch.int64, device=base.device)
    step = max(1, (1 << 22) // vocab)
    zero = torch.zeros((), dtype=torch.float64, device=base.device)
    for s in range(0, rows, step):
        e = min(rows, s + step)
        z, w = base[s:e].to(torch.float64), variant[s:e].to(torch.float64)
        lp, lq = torch.log_softmax(z, dim=-1), torch.log_softmax(w, dim=-1)
        p, q = lp.exp(), lq.exp()
        d = lp - lq
        out_f[s:e, 0] = torch.where(p > 0, p * d, zero).sum(-1)
        out_f[s:e, 1] = torch.where(q > 0, -q * d, zero).sum(-1)
        js = torch.where(p > 0, -p * _g(-d), zero) + torch.where(q > 0, -q * _g(d), zero)
        out_f[s:e, 2] = 0.5 * js.sum(-1)
        out_f[s:e, 3] = torch.where(p > 0, -p * lp, zero).sum(-1)
        for col, k in zip((4, 5), TOPK):
            a, b = _topk_sets(z, k), _topk_sets(w, k)
            inter = (a[:, :, None] == b[:, None, :]).any(-1).sum(-1)
            out_f[s:e, col] = inter.to(torch.float64) / min(k, vocab)
        out_i[s:e, 0] = z.argmax(-1)
        out_i[s:e, 1] = w.argmax(-1)
        if targets is not None:
            t = targets[s:e].to(torch.int64)[:, None]
            out_f[s:e, 6] = lp.gather(1, t)[:, 0]
            out_f[s:e, 7] = lq.gather(1, t)[:, 0]
            out_i[s:e, 2] = (z > z.gather(1, t)).sum(-1)
            out_i[s:e, 3] = (w > w.gather(1, t)).sum(-1)
    return out_f, out_i


# ---- native (minidiff._C) ---------------------------------------------------------
def _native(base: torch.Tensor, variant: torch.Tensor, targets: torch.Tensor | None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    rows, vocab = base.shape
    out_f = torch.empty((rows, len(F_COLUMNS)), dtype=torch.float64)
    out_i = torch.empty((rows, len(I_COLUMNS)), dtype=torch.int64)
    if rows == 0:
        return out_f, out_i
    tgt = None if targets is None else targets.to(torch.int64).contiguous()
    if base.dtype in (torch.float32, torch.float64) and variant.dtype == base.dtype:
        blocks = [(0, rows, base.contiguous(), variant.contiguous())]
    else:  # half precision or mixed: upcast to float32 (float64 if either is) block by block
        common = torch.float64 if torch.float64 in (base.dtype, variant.dtype) else torch.float32
        step = max(1, _UPCAST_ELEMENTS // vocab)
        blocks = ((s, min(rows, s + step), base[s:s + step].to(common).contiguous(),
                   variant[s:s + step].to(common).contiguous()) for s in range(0, rows, step))
    core = cpu_core()
    for s, e, z, w in blocks:
        row, kind, which = core.token_divergence(
            z.data_ptr(), w.data_ptr(), z.dtype == torch.float64, e - s, vocab,
            0 if tgt is None else tgt[s:e].data_ptr(), out_f[s:e].data_ptr(), out_i[s:e].data_ptr(),
            num_threads())
        if row >= 0:
            raise _bad_row_error(kind, s + row, "base_logits" if which == 0 else "variant_logits")
    return out_f, out_i


# ---- Triton -----------------------------------------------------------------------
def _interpreting() -> bool:
    return interpreting()


def _triton(base: torch.Tensor, variant: torch.Tensor, targets: torch.Tensor | None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    from minidiff.kernels import token_divergence as kt
    check_values(base, variant)
    if base.is_cuda:
        with torch.cuda.device(base.device):
            return kt.token_divergence(base, variant, targets)
    return kt.token_divergence(base, variant, targets)


def native_available() -> bool:
    """True when the installed minidiff._C has the fused kernel (an older build may not)."""
    return hasattr(cpu_core(), "token_divergence")


def resolve_backend(backend: str, t: torch.Tensor) -> str:
    """Name of the backend a call with ``backend`` runs on tensor ``t``'s device."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}: use one of {BACKENDS}")
    if backend == "auto":  # the environment's preference (MINIDIFF_BACKEND...) where it applies
        if t.device.type == "cpu":
            cands = (["native"] if native_available() else []) + ["reference"]
        else:
            cands = (["triton"] if t.is_cuda and triton_available() else []) + ["reference"]
        pick = choose("token_divergence", ["torch" if c == "reference" else c for c in cands])
        return "reference" if pick == "torch" else pick
    if backend == "native" and not native_available():
        raise ValueError("backend='native': this build of minidiff._C has no token_divergence; "
                         "rebuild with `pip install --no-build-isolation --no-deps -e .`")
    if backend == "native" and t.device.type != "cpu":
        raise ValueError("backend='native' (minidiff._C) needs CPU tensors; use 'auto' for CUDA tensors")
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package (pip install triton)")
        if not t.is_cuda and not _interpreting():
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
    return backend


def _impl(base: torch.Tensor, variant: torch.Tensor, targets: torch.Tensor | None,
          backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    check_args(base, variant, targets)
    name = resolve_backend(backend, base)
    if name == "native":
        return _native(base, variant, targets)
    if name == "triton":
        return _triton(base, variant, targets)
    check_values(base, variant)
    return token_divergence_reference(base, variant, targets)


def _fake(base: torch.Tensor, variant: torch.Tensor, targets: torch.Tensor | None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    check_args(base, variant, targets)
    rows = base.shape[0]
    return (base.new_empty((rows, len(F_COLUMNS)), dtype=torch.float64),
            base.new_empty((rows, len(I_COLUMNS)), dtype=torch.int64))


def _registered(base: torch.Tensor, variant: torch.Tensor, targets: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    return _impl(base, variant, targets)


_OP = define("token_divergence", "(Tensor base, Tensor variant, Tensor? targets) -> (Tensor, Tensor)",
             _registered, _fake)


def token_divergence_rows(base: torch.Tensor, variant: torch.Tensor,
                          targets: torch.Tensor | None = None, *, backend: str = "auto"
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(stats_f, stats_i)`` for ``(R, V)`` logits (see the module docstring);
    validates every argument, then runs ``backend``."""
    if backend == "auto":  # eager and compiled calls alike go through the registered op
        return _OP(base, variant, targets)
    return _impl(base, variant, targets, backend)


def op() -> Any:
    """The registered ``torch.ops.minidiff.token_divergence`` op."""
    return _OP

