"""Characteristic 3, out-of-distribution detection with deep nearest neighbours
(Sun et al. 2022, "Out-of-distribution detection with deep nearest neighbors"),
and how much a base model and a variant agree on what they flag.

Score of a test example ``x`` with normalized embedding ``z = f(x) / ||f(x)||``:
``s(x) = ||z - z_(k)||``, the distance to its k-th nearest neighbour among the
normalized in-distribution *training* embeddings (larger = more OOD). The threshold
is the ``tpr`` quantile (default 0.95) of the scores of held-out in-distribution
examples, so that 95% of in-distribution examples are accepted; an example is
flagged OOD when ``s(x) > threshold``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ._checks import Result, check_embeddings, check_sample, int_scalar, real_scalar
from .neighbors import DEFAULT_CHUNK, normalize_rows

__all__ = ["knn_ood_scores", "ood_threshold", "OODResult", "ood_detect", "OODAgreement", "ood_agreement"]

DEFAULT_K = 50  # Sun et al. 2022 use k = 50 on CIFAR-10; k = 1000 on ImageNet (with 1% of its training set)


def knn_ood_scores(train_embeddings, embeddings, k: int = DEFAULT_K, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Deep-kNN OOD scores ``(M,)`` float64: distance of each normalized embedding to its
    k-th nearest normalized training embedding (Sun et al. 2022, Eq. 2).

    Neighbours are ranked by cosine (one GEMM per block of ``chunk_size`` queries,
    memory O(chunk_size x M_train)), but the distance is not taken from the cosine:
    ``sqrt(2 - 2 cos)`` cancels for near duplicates (float32 cosine rounding alone is
    an error of ~5e-4 at true distance 0). Instead the ``k + 16`` best candidates'
    distances ``||z - z'||`` are computed from the differences in float64 and the
    k-th smallest is taken. A query whose candidate list may miss a true neighbour
    (cosines of ranks k and k + 16 closer than the GEMM's rounding bound ``2 d eps``)
    is measured against every training embedding. Pass held-out examples: a
    training example scored against its own training set finds itself at distance 0.
    """
    tr = check_embeddings(train_embeddings, "train_embeddings")
    x = check_embeddings(embeddings, "embeddings")
    if tr.shape[1] != x.shape[1]:
        raise ValueError(f"train_embeddings ({tr.shape[1]} features) and embeddings ({x.shape[1]} features) "
                         "must come from the same model and layer")
    k = int_scalar(k, "k", lo=1, hi=tr.shape[0])
    chunk_size = int_scalar(chunk_size, "chunk_size", lo=1)
    work = torch.promote_types(torch.promote_types(tr.dtype, x.dtype), torch.float32)
    zt = normalize_rows(tr.to(work), "train_embeddings")
    zx = normalize_rows(x.to(work).to(zt.device), "embeddings")
    n_train, d = zt.shape
    kc = min(n_train, k + _CANDIDATE_MARGIN)
    tol = 2 * d * torch.finfo(work).eps  # |fl(z.z') - z.z'| <= ~d eps for unit vectors
    out = torch.empty(zx.shape[0], dtype=torch.float64)
    for s in range(0, zx.shape[0], chunk_size):
        q = zx[s:s + chunk_size]
        top = (q @ zt.T).topk(kc, dim=1)
        dist = _distances(q, zt, top.indices)
        kth = dist.sort(dim=1).values[:, k - 1]
        if kc < n_train:  # a true neighbour may lie beyond the candidates: measure those rows fully
            unsure = (top.values[:, k - 1] - top.values[:, -1] <= tol).nonzero().flatten()
            for i in unsure.tolist():
                full = (zt.double() - q[i].double()).norm(dim=1)
                kth[i] = full.kthvalue(k).values
        out[s:s + q.shape[0]] = kth.cpu()
    return out


_CANDIDATE_MARGIN = 16


def _distances(q: torch.Tensor, zt: torch.Tensor, idx: torch.Tensor, block: int = 128) -> torch.Tensor:
    """float64 ``||q_i - zt[idx[i, j]]||`` from the differences (no cancellation), in
    blocks of ``block`` queries to bound the gathered ``(block, k, d)`` copy."""
    out = torch.empty(idx.shape, dtype=torch.float64, device=q.device)
    for s in range(0, q.shape[0], block):
        cand = zt[idx[s:s + block]].double()
        out[s:s + block] = (cand - q[s:s + block, None, :].double()).norm(dim=2)
    return out


def ood_threshold(id_scores, tpr: float = 0.95) -> float:
    """Score threshold accepting a fraction ``tpr`` of in-distribution examples: the
    ``tpr`` quantile (linear interpolation) of their scores (Sun et al. 2022, Sec. 3).
    ``id_scores`` is read as float64 (lists never pass through float32); ``tpr`` may be
    any real scalar (Python, numpy or 0-d tensor) in (0, 1)."""
    tpr = real_scalar(tpr, "tpr", lo=0.0, hi=1.0)
    s = check_sample(id_scores, "id_scores")
    return float(np.quantile(s, tpr))


@dataclass
class OODResult(Result):
    """One model's deep-kNN OOD detection: threshold, scores and flags on the OOD set.

    ``detection_rate`` = share of OOD examples flagged (TNR at ``tpr`` TPR);
    ``id_acceptance`` = share of held-out ID examples accepted (about ``tpr``).
    """

    k: int
    tpr: float
    threshold: float
    id_scores: torch.Tensor
    ood_scores: torch.Tensor
    flags: torch.Tensor
    detection_rate: float
    id_acceptance: float


def ood_detect(train_embeddings, id_embeddings, ood_embeddings, k: int = DEFAULT_K, tpr: float = 0.95,
               chunk_size: int = DEFAULT_CHUNK) -> OODResult:
    """Score held-out ID and OOD examples against the ID training embeddings of one model,
    set the threshold on the ID scores, flag the OOD examples."""
    tpr = real_scalar(tpr, "tpr", lo=0.0, hi=1.0)
    id_s = knn_ood_scores(train_embeddings, id_embeddings, k, chunk_size)
    ood_s = knn_ood_scores(train_embeddings, ood_embeddings, k, chunk_size)
    thr = ood_threshold(id_s, tpr)
    flags = ood_s > thr
    return OODResult(k=int(k), tpr=tpr, threshold=thr, id_scores=id_s, ood_scores=ood_s, flags=flags,
                     detection_rate=float(flags.double().mean()) if flags.numel() else float("nan"),
                     id_acceptance=float((id_s <= thr).double().mean()))


@dataclass
class OODAgreement(Result):
    """Agreement of two models' OOD flags on the same OOD set.

    ``jaccard = |F_b ∩ F_v| / |F_b ∪ F_v|`` (1.0 when neither flags anything).
    """

    jaccard: float
    detection_rate_base: float
    detection_rate_variant: float
    n_both: int
    n_either: int
    n: int


def ood_agreement(base_flags, variant_flags) -> OODAgreement:
    """Jaccard of the flagged sets and each model's detection rate (Rai et al. 2024, Sec. 4.3)."""
    fb, fv = torch.as_tensor(base_flags), torch.as_tensor(variant_flags)
    for name, f in (("base_flags", fb), ("variant_flags", fv)):
        if f.dtype != torch.bool or f.ndim != 1:
            raise ValueError(f"{name} must be a 1-D bool tensor, got {f.dtype} {tuple(f.shape)}")
    if fb.shape != fv.shape:
        raise ValueError(f"base_flags and variant_flags cover different numbers of examples "
                         f"({fb.numel()} vs {fv.numel()})")
    if fb.numel() == 0:
        raise ValueError("OOD agreement of zero examples is undefined")
    both, either = int((fb & fv).sum()), int((fb | fv).sum())
    return OODAgreement(jaccard=both / either if either else 1.0,
                        detection_rate_base=float(fb.double().mean()),
                        detection_rate_variant=float(fv.double().mean()),
                        n_both=both, n_either=either, n=int(fb.numel()))
