"""Token-level divergence between two language models' next-token distributions.

For one scored token with base logits ``z`` and variant logits ``w`` over a
vocabulary of ``V`` entries, ``p = softmax(z)``, ``q = softmax(w)``, natural log,
``log p = z - logsumexp(z)`` (never a floored probability):

* ``kld = KL(p || q) = sum_v p_v (log p_v - log q_v)``; ``kld_reverse = KL(q || p)``.
* ``js = (KL(p || m) + KL(q || m)) / 2`` with ``m = (p + q) / 2`` (Lin 1991).
* ``entropy_base = -sum_v p_v log p_v`` (the base model's predictive entropy).
* ``top1_base``, ``top1_variant``: argmax of each (ties: smallest token id).
* ``top5_overlap``, ``top10_overlap``: ``|top_k(p) ∩ top_k(q)| / min(k, V)``.
* with ``targets`` (the correct next token ``y``): ``p_base = p_y``,
  ``p_variant = q_y``, ``logp_base = log p_y``, ``logp_variant = log q_y`` (use
  these for NLL: they stay finite where ``p_y`` underflows), ``rank_base`` /
  ``rank_variant`` = number of tokens with a strictly larger logit than ``y``
  (0 when ``y`` is the top-1).

Conventions: ``0 log 0 = 0``, so ``-inf`` logits (masked vocabulary) are exact
zeros; a token the base allows but the variant masks gives ``kld = +inf``,
reported as such. Identical logits give exactly 0 for both KLDs and JS.
These are the per-token quantities llama.cpp's ``llama-perplexity
--kl-divergence`` aggregates (see :class:`minidiff.lm.TokenDivergenceAccumulator`).
"""

from __future__ import annotations

from typing import Any

import torch

from minidiff.ops import token_divergence as _ops
from minidiff.ops._validate import as_tensor

__all__ = ["token_divergence", "token_divergence_reference"]


def _flatten(base_logits: Any, variant_logits: Any, targets: Any
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, tuple[int, ...]]:
    z = as_tensor(base_logits, "base_logits")
    w = as_tensor(variant_logits, "variant_logits")
    if z.ndim not in (2, 3):
        raise ValueError(f"base_logits must be (tokens, V) or (batch, seq, V), got shape {tuple(z.shape)}")
    if z.shape != w.shape:
        raise ValueError(f"base_logits {tuple(z.shape)} and variant_logits {tuple(w.shape)} must have "
                         "the same shape (same tokens, same vocabulary)")
    if z.shape[-1] < 1:
        raise ValueError("the vocabulary axis is empty (V = 0): a distribution needs at least one entry")
    lead = tuple(z.shape[:-1])
    t = None
    if targets is not None:
        t = as_tensor(targets, "targets")
        if tuple(t.shape) != lead:
            raise ValueError(f"targets must have shape {lead} (one token id per row of logits), "
                             f"got {tuple(t.shape)}")
        t = t.reshape(-1)
    return z.reshape(-1, z.shape[-1]), w.reshape(-1, w.shape[-1]), t, lead


def _to_dict(stats_f: torch.Tensor, stats_i: torch.Tensor, lead: tuple[int, ...],
             with_targets: bool) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for j, name in enumerate(_ops.F_COLUMNS):
        if name.startswith("logp_") and not with_targets:
            continue
        out[name] = stats_f[:, j].reshape(lead)
    for j, name in enumerate(_ops.I_COLUMNS):
        if name.startswith("rank_") and not with_targets:
            continue
        out[name] = stats_i[:, j].reshape(lead)
    if with_targets:
        out["p_base"] = out["logp_base"].exp()
        out["p_variant"] = out["logp_variant"].exp()
    return out


def token_divergence(base_logits: Any, variant_logits: Any, targets: Any = None, *,
                     backend: str = "auto") -> dict[str, torch.Tensor]:
    """Per-token divergence between the base and variant next-token distributions.

    Parameters
    ----------
    base_logits, variant_logits : tensor ``(tokens, V)`` or ``(batch, seq, V)``
        Logits of the two models on the same tokens (float16/bfloat16/float32/
        float64; finite or ``-inf``).
    targets : int tensor ``(tokens,)`` / ``(batch, seq)``, optional
        The correct next token of each row, in ``[0, V)``.
    backend : {"auto", "native", "triton", "reference"}
        "auto": the fused C++ kernel on CPU, the Triton kernel on CUDA.

    Returns
    -------
    dict of per-token tensors shaped like the logits without the last axis:
    float64 ``kld``, ``kld_reverse``, ``js``, ``entropy_base``, ``top5_overlap``,
    ``top10_overlap`` and, with targets, ``p_base``, ``p_variant``, ``logp_base``,
    ``logp_variant``; int64 ``top1_base``, ``top1_variant`` and, with targets,
    ``rank_base``, ``rank_variant``. Formulas in the module docstring.

    Raises
    ------
    ValueError
        Mismatched shapes or devices, non-float logits, NaN/``+inf`` logits, a row
        with no finite logit, targets of the wrong shape/dtype or outside ``[0, V)``.
    """
    z, w, t, lead = _flatten(base_logits, variant_logits, targets)
    stats_f, stats_i = _ops.token_divergence_rows(z, w, t, backend=backend)
    return _to_dict(stats_f, stats_i, lead, t is not None)


def token_divergence_reference(base_logits: Any, variant_logits: Any,
                               targets: Any = None) -> dict[str, torch.Tensor]:
    """:func:`token_divergence` computed literally in float64 torch (log_softmax,
    sums over the vocabulary, a stable sort for the top-k sets): the definition the
    fast kernels are tested against."""
    return token_divergence(base_logits, variant_logits, targets, backend="reference")
