"""Characteristic 2, data representation: k-nearest-neighbour overlap between two
models' embedding spaces (Rai et al. 2024, "Compressed models are NOT miniature
versions of large models") and the layer-to-layer correspondence read off a CKA
matrix.

Neighbour searches are chunked: a block of ``chunk_size`` queries against all M
references at a time, so memory is O(chunk_size x M), never O(M^2).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ._checks import Result, check_embeddings, check_has_data

__all__ = ["normalize_rows", "knn_indices", "KNNOverlap", "knn_overlap", "LayerCorrespondence",
           "layer_correspondence"]

DEFAULT_CHUNK = 1024


def normalize_rows(x: torch.Tensor, name: str = "embeddings") -> torch.Tensor:
    """Rows scaled to unit L2 norm; a zero row is a ValueError (its direction is undefined).

    A row whose sum of squares would overflow or underflow in its dtype (float32
    entries beyond ~1e19 or below ~1e-19) is first divided by its largest magnitude,
    so it keeps its direction instead of becoming NaN or "all zero"; other rows are
    divided by their norm directly.
    """
    if x.shape[1] == 0:
        raise ValueError(f"{name} has no features (shape {tuple(x.shape)}); pass (examples, features) with features >= 1")
    amax = x.abs().amax(dim=1, keepdim=True)
    zero = int((amax == 0).sum())
    if zero:
        raise ValueError(f"{name} has {zero} all-zero row(s); cosine similarity is undefined for them")
    norms = x.norm(dim=1, keepdim=True)
    fi = torch.finfo(x.dtype)
    risky = ~torch.isfinite(norms) | (norms < fi.tiny ** 0.5 * 1e3) | (amax > fi.max ** 0.5 / 1e3)
    if bool(risky.any()):
        scaled = x / amax
        x = torch.where(risky, scaled, x)
        norms = torch.where(risky, scaled.norm(dim=1, keepdim=True), norms)
    return x / norms


def _check_k(k: int, m: int, exclude_self: bool) -> int:
    avail = m - 1 if exclude_self else m
    if int(k) < 1 or int(k) > avail:
        raise ValueError(f"k must be in [1, {avail}] for {m} examples"
                         f"{' (each example excludes itself)' if exclude_self else ''}, got {k}")
    return int(k)


def knn_indices(embeddings, k: int, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Indices ``(M, k)`` of each example's k most cosine-similar other examples
    (itself excluded), most similar first.

    Similarities are matrix products of L2-normalized rows, in the embeddings' dtype
    (float16/bfloat16 upcast to float32), in blocks of ``chunk_size`` queries. Ties
    at the k-th place are broken by ``torch.topk``; with float32 inputs a neighbour
    set equals the float64 one whenever the k-th and (k+1)-th similarities differ by
    more than float32 rounding.
    """
    x = check_embeddings(embeddings, "embeddings")
    m = x.shape[0]
    k = _check_k(k, m, True)
    if int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    z = normalize_rows(x.float() if x.dtype in (torch.float16, torch.bfloat16) else x)
    out = torch.empty(m, k, dtype=torch.int64, device=x.device)
    for s in range(0, m, chunk_size):
        e = min(s + chunk_size, m)
        sim = z[s:e] @ z.T
        sim[torch.arange(e - s, device=x.device), torch.arange(s, e, device=x.device)] = float("-inf")
        out[s:e] = sim.topk(k, dim=1).indices
    return out


@dataclass
class KNNOverlap(Result):
    """Per-example Jaccard of the k-NN sets under base and variant embeddings.

    ``per_example[i] = |N_b(i) ∩ N_v(i)| / |N_b(i) ∪ N_v(i)| = s / (2k - s)`` with
    ``s`` the number of shared neighbours; ``mean`` over examples (1 = same neighbours).
    """

    k: int
    mean: float
    per_example: torch.Tensor
    p10: float
    p50: float
    p90: float


def knn_overlap(base_embeddings, variant_embeddings, k: int = 10, chunk_size: int = DEFAULT_CHUNK) -> KNNOverlap:
    """k-nearest-neighbour overlap between two embeddings of the same M examples.

    Cosine similarity; each example's own row is excluded from its neighbours.
    The two embeddings may have different widths (different models). Rai et al.
    2024 (Sec. 4.2) use this to ask whether a compressed model keeps the local
    neighbourhood structure of the original.
    """
    b = check_embeddings(base_embeddings, "base_embeddings")
    v = check_embeddings(variant_embeddings, "variant_embeddings")
    if b.shape[0] != v.shape[0]:
        raise ValueError(f"base_embeddings and variant_embeddings cover different numbers of examples "
                         f"({b.shape[0]} vs {v.shape[0]})")
    nb = knn_indices(b, k, chunk_size)
    nv = knn_indices(v, k, chunk_size).to(nb.device)
    k = nb.shape[1]
    shared = torch.empty(nb.shape[0], dtype=torch.float64)
    for s in range(0, nb.shape[0], chunk_size):
        e = min(s + chunk_size, nb.shape[0])
        shared[s:e] = (nb[s:e, :, None] == nv[s:e, None, :]).any(-1).sum(-1).double().cpu()
    jac = shared / (2 * k - shared)
    q = torch.quantile(jac, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64))
    return KNNOverlap(k=k, mean=float(jac.mean()), per_example=jac, p10=float(q[0]), p50=float(q[1]), p90=float(q[2]))


@dataclass
class LayerCorrespondence(Result):
    """Best-matching layer of the other model for each layer, from a CKA matrix.

    ``best_for_a[i] = argmax_j cka[i, j]`` (a layer of model B for each layer of A) with
    score ``score_a[i]``; ``best_for_b[j] = argmax_i cka[i, j]``. A row/column that is
    all NaN (zero-variance layer) gets index -1 and score NaN.
    """

    layers_a: list[str]
    layers_b: list[str]
    best_for_a: torch.Tensor
    score_a: torch.Tensor
    best_for_b: torch.Tensor
    score_b: torch.Tensor

    def pairs(self) -> list[tuple[str, str | None, float]]:
        """``(layer of A, best layer of B or None, CKA)`` for each layer of A."""
        return [(a, self.layers_b[j] if j >= 0 else None, float(s))
                for a, j, s in zip(self.layers_a, self.best_for_a.tolist(), self.score_a.tolist())]


def _nanargmax(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    allnan = torch.isnan(x).all(dim)
    filled = torch.nan_to_num(x, nan=float("-inf"))
    score, idx = filled.max(dim)  # first maximum on ties
    idx = torch.where(allnan, torch.full_like(idx, -1), idx)
    score = torch.where(allnan, torch.full_like(score, float("nan")), score)
    return idx, score


def layer_correspondence(cka, layers_a: list[str] | None = None, layers_b: list[str] | None = None
                         ) -> LayerCorrespondence:
    """Layer-to-layer correspondence of two models (possibly of different depth)
    from their ``(L_a, L_b)`` CKA matrix: argmax per row and per column, NaN ignored
    (Kornblith et al. 2019, Sec. 6 "CKA reveals correspondence between layers")."""
    c = check_has_data(cka, "cka") if isinstance(cka, torch.Tensor) else torch.from_numpy(np.asarray(cka, dtype=np.float64))
    if not c.is_floating_point() or c.ndim != 2 or 0 in c.shape:
        raise ValueError(f"cka must be a non-empty 2-D float matrix (layers of A x layers of B), "
                         f"got {c.dtype} {tuple(c.shape)}")
    c = c.detach().double().cpu()
    if bool(torch.isinf(c).any()):
        raise ValueError("cka contains Inf values")
    la = list(layers_a) if layers_a is not None else [str(i) for i in range(c.shape[0])]
    lb = list(layers_b) if layers_b is not None else [str(j) for j in range(c.shape[1])]
    if len(la) != c.shape[0] or len(lb) != c.shape[1]:
        raise ValueError(f"layer names ({len(la)}, {len(lb)}) do not match the CKA matrix shape {tuple(c.shape)}")
    ia, sa = _nanargmax(c, 1)
    ib, sb = _nanargmax(c, 0)
    return LayerCorrespondence(la, lb, ia, sa, ib, sb)
