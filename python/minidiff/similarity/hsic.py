"""HSIC algebra: the CKA estimators from streamed sums, and from one batch in memory.

Notation (see :mod:`minidiff.similarity`): a model's layers stacked side by side,
``Z_a = [X_1 .. X_La]``; per sample ``a_i = ||x_i||^2``, ``b_i = ||y_i||^2``; sums
``s_x = sum x_i``, ``s_y = sum y_i``, ``C = sum x_i y_i^T``. With zero-diagonal
Grams ``K~``, ``L~`` (Song et al. 2012)::

    tr(K~L~)     = ||C||_F^2 - sum a_i b_i
    1^T K~ 1     = ||s_x||^2 - sum a_i
    1^T K~ L~ 1  = s_x^T C s_y - s_y . sum a_i y_i - s_x . sum b_i x_i + sum a_i b_i
    HSIC_1       = [tr(K~L~) + 1^T K~ 1 1^T L~ 1 / ((n-1)(n-2)) - 2/(n-2) 1^T K~ L~ 1] / (n(n-3))
    HSIC_0       = ||C - s_x s_y^T / n||_F^2 / (n - 1)^2

Every layer pair ``(l, m)`` is a block of these stacked quantities; the block
sums are taken as skinny GEMMs against indicator matrices (no block loop).
The second half holds the in-memory forms for one batch: the feature form
(cost ~ n d1 d2) and the Gram form (~ n^2 (d1 + d2)).
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch

from minidiff.ops.cka import batch_terms, layer_index
from minidiff.similarity.inputs import _EPS

_GRAM_MEMORY_LIMIT = 2 << 30  # bytes of float64 Grams before the feature form is forced

def _indicator(idx: torch.Tensor, count: int, like: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``(count, D)`` matrix with ``E[idx[j], j] = 1`` (or ``scale[j]``): block sums as GEMMs."""
    E = like.new_zeros(count, idx.numel())
    E[idx, torch.arange(idx.numel(), device=idx.device)] = 1.0 if scale is None else scale.to(like.dtype)
    return E


def _seg_cols(M: torch.Tensor, ib: torch.Tensor, lb: int, v: torch.Tensor | None = None) -> torch.Tensor:
    """Column-block sums of ``M_ij v_j`` -> ``(rows, lb)``; one pass over M, no M-sized temporary."""
    return M @ _indicator(ib, lb, M, v).T


def _seg2(M: torch.Tensor, ia: torch.Tensor, la: int, ib: torch.Tensor, lb: int,
          u: torch.Tensor | None = None, v: torch.Tensor | None = None) -> torch.Tensor:
    """Block sums of ``u_i M_ij v_j`` (rows grouped by ia, columns by ib) -> (la, lb)."""
    return _indicator(ia, la, M, u) @ _seg_cols(M, ib, lb, v)


def _seg2_squares(M: torch.Tensor, ia: torch.Tensor, la: int, ib: torch.Tensor, lb: int,
                  rows: int = 1024) -> torch.Tensor:
    """Block sums of ``M_ij^2`` -> (la, lb), squaring ``rows`` rows at a time (M may be
    hundreds of MB; a full ``M * M`` temporary cost more than the arithmetic)."""
    Eb = _indicator(ib, lb, M).T
    out = M.new_zeros(la, lb)
    for r in range(0, M.shape[0], rows):
        chunk = M[r:r + rows]
        out.index_add_(0, ia[r:r + rows], (chunk * chunk) @ Eb)
    return out


def _finish(num: torch.Tensor, sk: torch.Tensor, sl: torch.Tensor, kl1: torch.Tensor, n: float,
            estimator: str) -> torch.Tensor:
    if estimator == "unbiased":
        return (num + sk * sl / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * kl1) / (n * (n - 3))
    raise AssertionError(estimator)


def _hsic_cross(st: dict, n: float, ia, la, ib, lb, estimator: str) -> torch.Tensor:
    """HSIC for every (l, m) block from the cross sums (see the module docstring)."""
    C, sx, sy = st["C"], st["sx"], st["sy"]
    normc2 = _seg2_squares(C, ia, la, ib, lb)
    scs = _seg2(C, ia, la, ib, lb, sx, sy)
    sx2 = torch.zeros(la, dtype=C.dtype, device=C.device).index_add_(0, ia, sx * sx)
    sy2 = torch.zeros(lb, dtype=C.dtype, device=C.device).index_add_(0, ib, sy * sy)
    if estimator == "biased":
        return (normc2 - 2.0 * scs / n + sx2[:, None] * sy2[None, :] / n ** 2) / (n - 1) ** 2
    ab = st["ab"]
    say = _seg_cols(st["ay"], ib, lb, sy)        # s_y . sum a_il y_i over block m
    sbx = _seg_cols(st["bx"], ia, la, sx).T      # s_x . sum b_im x_i over block l
    kl1 = scs - say - sbx + ab
    return _finish(normc2 - ab, (sx2 - st["na"])[:, None], (sy2 - st["nb"])[None, :], kl1, n, estimator)


def _hsic_self(grams: list[torch.Tensor], s: torch.Tensor, na: torch.Tensor, axd: torch.Tensor,
               aa: torch.Tensor, offs: list[int], n: float, estimator: str) -> torch.Tensor:
    """HSIC(K_l, K_l) per layer from the diagonal blocks G_l = X_l^T X_l and the sums."""
    out = []
    for l, G in enumerate(grams):
        sl = s[offs[l]:offs[l + 1]]
        g2, sgs, s2 = (G * G).sum(), sl @ G @ sl, sl @ sl
        if estimator == "biased":
            out.append((g2 - 2.0 * sgs / n + s2 * s2 / n ** 2) / (n - 1) ** 2)
        else:
            kk1 = sgs - 2.0 * (sl * axd[offs[l]:offs[l + 1]]).sum() + aa[l]
            out.append(_finish(g2 - aa[l], s2 - na[l], s2 - na[l], kk1, n, estimator))
    return torch.stack(out)


def _zero_variance(s: torch.Tensor, na: torch.Tensor, idx: torch.Tensor, layers: int, n: float) -> torch.Tensor:
    """Layers whose variance, n * tr Cov = sum_i a_i - ||s||^2 / n, is zero to float64 rounding."""
    s2 = torch.zeros(layers, dtype=torch.float64, device=s.device).index_add_(0, idx, s * s)
    var = na - s2 / n
    return var <= 64 * _EPS * na


def _ratio(hab: torch.Tensor, haa: torch.Tensor, hbb: torch.Tensor, zero_a: torch.Tensor, zero_b: torch.Tensor,
           names_a: Sequence[str], names_b: Sequence[str]) -> torch.Tensor:
    cka = hab / torch.sqrt(haa[:, None] * hbb[None, :])
    bad = [names_a[i] for i in torch.nonzero(zero_a).flatten().tolist()]
    bad += [names_b[i] for i in torch.nonzero(zero_b).flatten().tolist() if names_b[i] not in bad]
    if bad:
        warnings.warn(f"layer(s) {', '.join(bad)} have zero variance (constant features); their CKA "
                      "rows/columns are NaN", RuntimeWarning, stacklevel=3)
        cka = cka.clone()
        cka[zero_a, :] = float("nan")
        cka[:, zero_b] = float("nan")
    return cka


def _blocks(M: torch.Tensor, offs: list[int]) -> list[torch.Tensor]:
    return [M[offs[l]:offs[l + 1], offs[l]:offs[l + 1]] for l in range(len(offs) - 1)]


def _unflatten(flat: torch.Tensor, dims: Sequence[int]) -> list[torch.Tensor]:
    out, o = [], 0
    for d in dims:
        out.append(flat[o:o + d * d].view(d, d))
        o += d * d
    return out


# -- one batch in memory: feature form or Gram form ----------------------------------------
def _feature_cost(n: int, dims_a, dims_b, same: bool) -> float:
    da, db = sum(dims_a), sum(dims_b)
    return n * (da * da if same else da * db + sum(d * d for d in dims_a) + sum(d * d for d in dims_b))


def _gram_cost(n: int, dims_a, dims_b, same: bool) -> float:
    da, db = sum(dims_a), sum(dims_b)
    return n * n * (da + (0 if same else db) + len(dims_a) * len(dims_b))


def _grams_hsic(ka: torch.Tensor, kb: torch.Tensor | None, estimator: str):
    """HSIC between every pair of stacked Gram matrices ``ka (La, n, n)``, ``kb (Lb, n, n)``
    (``kb=None``: model a with itself). Works in the Grams' dtype and modifies
    them in place (centring or zeroing the diagonal); returns float64."""
    n = ka.shape[-1]
    grams = [ka] if kb is None else [ka, kb]
    if estimator == "biased":
        for k in grams:
            k.sub_(k.mean(1, keepdim=True))
            k.sub_(k.mean(2, keepdim=True))
        fa = ka.reshape(ka.shape[0], -1)
        fb = fa if kb is None else kb.reshape(kb.shape[0], -1)
        c = (n - 1) ** 2
        hab = (fa @ fb.T).double() / c
        haa = _sqnorms(fa) / c
        hbb = haa if kb is None else _sqnorms(fb) / c
        return hab, haa, hbb
    for k in grams:
        k.diagonal(dim1=1, dim2=2).zero_()
    fa = ka.reshape(ka.shape[0], -1)
    fb = fa if kb is None else kb.reshape(kb.shape[0], -1)
    # float32 Grams: torch's cascaded sums and float32 GEMMs, finished in float64
    ca = ka.sum(2)  # K~ is symmetric: row sums = column sums, and the contiguous reduction is faster
    cb = ca if kb is None else kb.sum(2)
    ta, tb = ca.sum(1).double(), cb.sum(1).double()

    def h(tr, sk, sl, kl1):
        return (tr + sk * sl / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * kl1) / (n * (n - 3))

    hab = h((fa @ fb.T).double(), ta[:, None], tb[None, :], (ca @ cb.T).double())
    haa = h(_sqnorms(fa), ta, ta, _sqnorms(ca))
    hbb = haa if kb is None else h(_sqnorms(fb), tb, tb, _sqnorms(cb))
    return hab, haa, hbb


def _sqnorms(rows: torch.Tensor) -> torch.Tensor:
    """Squared norm of every row, one pass, float64 result."""
    return torch.linalg.vector_norm(rows, dim=1).double() ** 2


def _linear_grams(layers: list[torch.Tensor]) -> torch.Tensor:
    """Stacked ``X_l X_l^T`` in the layers' dtype, written straight into one buffer."""
    n = layers[0].shape[0]
    out = torch.empty(len(layers), n, n, dtype=layers[0].dtype, device=layers[0].device)
    for l, x in enumerate(layers):
        torch.mm(x, x.T, out=out[l])
    return out


def _use_gram_form(n: int, dims_a, dims_b, same: bool, itemsize: int) -> bool:
    gram_bytes = itemsize * n * n * (len(dims_a) + (0 if same else len(dims_b)))
    return (_gram_cost(n, dims_a, dims_b, same) < _feature_cost(n, dims_a, dims_b, same)
            and gram_bytes <= _GRAM_MEMORY_LIMIT)


def _feature_hsic(za: torch.Tensor, zb: torch.Tensor, offs_a: list[int], offs_b: list[int], same: bool,
                  estimator: str):
    """HSIC of every layer pair for one batch in feature form (rows centred), plus each
    layer's sum of squares. GEMMs in the batch's dtype, everything after in float64."""
    n = za.shape[0]
    la, lb = len(offs_a) - 1, len(offs_b) - 1
    ia, ib = layer_index(offs_a, za.device), layer_index(offs_b, zb.device)
    t = dict(zip(("sx", "sy", "na", "nb", "ay", "bx", "ab", "axd", "byd", "aa", "bb"),
                 batch_terms(za, zb, offs_a, offs_b)))
    t["C"] = (za.T @ zb).double()
    hab = _hsic_cross(t, float(n), ia, la, ib, lb, estimator)
    if same:
        haa = hbb = torch.diagonal(hab).clone()
    else:
        ga = [(za[:, a:b].T @ za[:, a:b]).double() for a, b in zip(offs_a, offs_a[1:])]
        gb = [(zb[:, a:b].T @ zb[:, a:b]).double() for a, b in zip(offs_b, offs_b[1:])]
        haa = _hsic_self(ga, t["sx"], t["na"], t["axd"], t["aa"], offs_a, float(n), estimator)
        hbb = _hsic_self(gb, t["sy"], t["nb"], t["byd"], t["bb"], offs_b, float(n), estimator)
    return hab, haa, hbb, t["na"], t["nb"]

