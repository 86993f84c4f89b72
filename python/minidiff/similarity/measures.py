"""Second-order similarity measures from centred covariances.

For layers ``X (n, dx)`` and ``Y (n, dy)`` with column-centred ``Xc``, ``Yc``,
every measure here is a function of the three covariance blocks

    ``Sxx = Xc^T Xc``,  ``Syy = Yc^T Yc``,  ``Sxy = Xc^T Yc``

which the streaming :class:`~minidiff.similarity.CKAAccumulator` holds for every
layer pair (``Sxx = G - s s^T / n`` from its Gram and sum states, whatever shift
they were taken at), so no second pass over the data and no ``n x n`` matrix is
needed. Cost, independent of n: one ``eigh`` per layer; per pair (``d = dx = dy``,
float64 flops) the rotation ``S' = (Ux^T Sxy) Uy`` into both eigenbases (``4 d^3``), from which
CCA and both regressions are ``O(d^2)`` sums (a regression alone needs only one side's ``eigh``
and ``Ux^T Sxy``, ``2 d^3``) and SVCCA is the nuclear norm of S''s ``kx x ky`` block of kept
directions (``~7/3 k^3``); RV is ``O(d^2)`` from Sxy; Procrustes is ``svdvals(Sxy)``
(``8/3 d^3``); the mean canonical correlation a nuclear norm of the whitened S' (``7/3 d^3``
where :func:`nuclear_norm` proves its Gram route accurate, else ``8/3 d^3`` more). The CKA pass
costs ``~2 n d^2 (1 + 1/L)`` float32 flops per pair, so the measures' share falls as ``d / n``.

Measures (``MEASURES``; survey: Klabunde et al. 2023, "Similarity of Neural
Network Models: A Survey of Functional and Representational Measures")
-----------------------------------------------------------------------------
``"cka"``                  linear CKA (Kornblith et al. 2019), from the HSIC estimators.
``"cca"``                  mean squared canonical correlation, ``sum rho_i^2 / min(r_x, r_y)``
                           (Yanai's R^2_CCA), ``rho_i`` the singular values of
                           ``Sxx^{-1/2} Sxy Syy^{-1/2}`` and ``r`` the ranks (Hotelling 1936).
``"cca_mean"``             mean canonical correlation ``sum rho_i / min(r_x, r_y)``.
``"svcca"``                SVCCA (Raghu et al. 2017): keep, per side, the leading eigen-directions
                           of ``Sxx`` (the singular directions of ``Xc``) that explain 99% of the
                           variance, then the mean canonical correlation of the reduced data.
``"procrustes"``           orthogonal Procrustes similarity on centred, unit-Frobenius features
                           (Williams et al. 2021): ``||Sxy||_* / sqrt(tr Sxx tr Syy)`` (nuclear norm)
                           ``= 1 - d^2 / 2``.
``"procrustes_distance"``  ``d = min_Q ||Xc/||Xc||_F - Yc Q/||Yc||_F||_F = sqrt(2 - 2 similarity)``
                           (narrower side zero-padded; Q orthogonal).
``"regression"``           R^2 of the least-squares prediction of Y from X (with intercept),
                           variance weighted: ``tr(Syx Sxx^{-1} Sxy) / tr Syy``.
``"regression_reverse"``   the same predicting X from Y.
``"rv"``                   RV coefficient (Robert & Escoufier 1976) ``||Sxy||_F^2 / (||Sxx||_F ||Syy||_F)``;
                           equal to biased linear CKA.

Rank-deficient covariances (more units than samples, dead units): where
``lambda_min(Sxx) <= RANK_RTOL * lambda_max(Sxx)`` the inverse square root uses
``Sxx + kappa I`` with ``kappa = ridge * tr(Sxx) / dx`` (``ridge`` default
``DEFAULT_RIDGE``) and a ``RuntimeWarning`` names the layer, its numerical rank
and kappa. A dead unit (an exactly zero row of Sxx and Sxy) then adds nothing,
and the rank ``r`` (eigenvalues above ``RANK_RTOL * lambda_max``) is the
denominator of the CCA means. A layer with zero variance gives NaN for every
measure of its row/column, with a warning.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

MEASURES = ("cka", "cca", "cca_mean", "svcca", "procrustes", "procrustes_distance", "regression",
            "regression_reverse", "rv")
COVARIANCE_MEASURES = MEASURES[1:]
SVCCA_VARIANCE = 0.99
RANK_RTOL = 1e-10
DEFAULT_RIDGE = 1e-6
NUCLEAR_RTOL = 1e-9  # nuclear norms from the Gram's eigenvalues only where provably this accurate
_EPS = torch.finfo(torch.float64).eps


def check_measure(measure: str) -> str:
    if measure not in MEASURES:
        raise ValueError(f"measure must be one of {MEASURES}, got {measure!r}")
    return measure


def _check_ridge(ridge: float) -> float:
    if isinstance(ridge, bool) or not isinstance(ridge, (int, float)) or not (ridge > 0 and math.isfinite(ridge)):
        raise ValueError(f"ridge must be a positive finite number (relative to the mean variance per unit), "
                         f"got {ridge!r}")
    return float(ridge)


@dataclass
class _Side:
    """One layer's covariance and what the measures need of it."""

    trace: float
    frob: float                       # ||Sxx||_F (RV)
    rank: int
    zero: bool                        # zero variance
    basis: torch.Tensor | None        # eigenvectors of Sxx, ascending eigenvalues: all d of them (d, d) when a
                                      # whitened measure is asked, else only SVCCA's k leading ones (d, k)
    inv: torch.Tensor | None          # 1 / (lambda [+ kappa]) for each column of a full basis, (d,)
    sv_scale: torch.Tensor | None     # SVCCA: lambda^{-1/2} of the k leading directions (the basis' last k), (k,)
    kappa: float | None = None        # the ridge taken for a rank-deficient covariance


def _side(cov: torch.Tensor, need_white: bool, need_sv: bool, ridge: float, zero: bool) -> _Side:
    cov = 0.5 * (cov + cov.T)  # exactly symmetric for eigh (the states are symmetric up to rounding)
    d = cov.shape[0]
    trace = float(torch.diagonal(cov).sum())
    frob = float(torch.linalg.matrix_norm(cov))
    if zero or not trace > 0:
        return _Side(trace, frob, 0, True, None, None, None)
    if not (need_white or need_sv):
        return _Side(trace, frob, d, False, None, None, None)
    lam, U = torch.linalg.eigh(cov)
    lmax = float(lam[-1])
    rank = int((lam > RANK_RTOL * lmax).sum())
    basis = inv = sv_scale = kappa = None
    if need_white:
        basis = U
        if rank < d:
            kappa = ridge * trace / d
            inv = 1.0 / (lam + kappa)
        else:
            inv = 1.0 / lam
    if need_sv:
        frac = torch.cumsum(lam.flip(0), 0) / lam.sum()
        k = min(int((frac < SVCCA_VARIANCE).sum()) + 1, rank)
        sv_scale = torch.rsqrt(lam[d - k:])
        if basis is None:
            basis = U[:, d - k:]
    return _Side(trace, frob, rank, False, basis, inv, sv_scale, kappa)


def nuclear_norm(m: torch.Tensor, rtol: float = NUCLEAR_RTOL) -> float:
    """``||M||_* = sum_i sigma_i(M)`` of a float64 matrix, from the eigenvalues of its smaller
    Gram ``G`` (``M^T M`` or ``M M^T``) where that is provably accurate, else from ``svdvals``.

    ``eigvalsh(G)`` costs ``p q^2 + 4/3 q^3`` flops (``q <= p`` the sides) against the
    ``4 p q^2 - 4/3 q^3`` of the bidiagonalization behind ``svdvals`` (less than half the time,
    measured at 768 x 768). Its values are the exact eigenvalues of a matrix within
    ``delta = (p + q) eps ||M||_F^2`` of ``M^T M`` in the 2-norm (rounding of the product,
    ``|fl(G) - G| <= p eps |M|^T |M|``, plus the backward error ``c(q) eps ||G||_2`` of the
    tridiagonal eigensolver, LAPACK's modest ``c(q)`` taken as ``q``), so by Weyl's theorem ``|lambda_i - sigma_i^2| <= delta`` and
    ``|sqrt(max(lambda_i, 0)) - sigma_i| <= sqrt(2) delta / sqrt(max(lambda_i, delta))``.
    The summed bound must be at most ``rtol`` times the result; otherwise (singular values
    near ``sqrt(delta)``: ill-conditioned or rank-deficient matrices, e.g. most raw
    cross-covariances, or fewer samples than units) the nuclear norm comes from ``svdvals``,
    accurate to ``O(eps sigma_max)`` per value. A Cholesky factorization of ``G - tau I``
    (``q^3 / 3`` flops) first skips the eigenvalues where the bound must fail: one
    ``lambda_i < tau + delta = 2 delta^2 / (rtol^2 q ||M||_F^2)`` alone adds more than
    ``rtol ||M||_*`` to it (``||M||_* <= sqrt(q) ||M||_F``).
    """
    if m.numel() == 0:
        return 0.0
    g = m.T @ m if m.shape[1] <= m.shape[0] else m @ m.T
    p, q = max(m.shape), min(m.shape)
    fro2 = float(torch.diagonal(g).sum())  # ||M||_F^2
    if fro2 == 0.0:
        return 0.0
    delta = (p + q) * _EPS * fro2
    # a failed factorization means lambda_min(G) < tau + delta (its backward error is within delta)
    tau = 2.0 * delta ** 2 / (rtol ** 2 * q * fro2) - delta
    if tau <= 0 or int(torch.linalg.cholesky_ex(g - tau * torch.eye(q, dtype=g.dtype, device=g.device)).info) == 0:
        lam = torch.linalg.eigvalsh(g)
        total = float(torch.sqrt(lam.clamp_min(0.0)).sum())  # lambda_i < 0 is rounding within delta of 0,
        bound = float((math.sqrt(2.0) * delta / torch.sqrt(lam.clamp_min(delta))).sum())  # ... bounded here
        if bound <= rtol * total:
            return total
    return float(torch.linalg.svdvals(m).sum())


def pair_measures(cov_a: Sequence[torch.Tensor], cov_b: Sequence[torch.Tensor],
                  cross: Callable[[int, int], torch.Tensor], measures: Sequence[str],
                  names_a: Sequence[str], names_b: Sequence[str], *, ridge: float = DEFAULT_RIDGE,
                  same: bool = False, zero_a: Sequence[bool] | None = None,
                  zero_b: Sequence[bool] | None = None) -> dict[str, torch.Tensor]:
    """Every requested covariance measure for every layer pair.

    Parameters
    ----------
    cov_a, cov_b : per-layer centred covariances ``Sxx (dx, dx)``, ``Syy (dy, dy)`` (float64).
    cross : ``cross(l, m)`` -> ``Sxy (dx_l, dy_m)`` for layer l of a and m of b.
    measures : names from ``COVARIANCE_MEASURES``.
    same : model a against itself (``cov_b`` is ``cov_a``; each layer is analysed once).
    zero_a, zero_b : per-layer flags of zero variance judged by the caller against the
        rounding level of its sums (default: a non-positive trace).

    Returns
    -------
    dict of ``(La, Lb)`` float64 tensors, one per measure.
    """
    measures = list(dict.fromkeys(measures))
    for m in measures:
        if m not in COVARIANCE_MEASURES:
            raise ValueError(f"{m!r} is not a covariance measure; use one of {COVARIANCE_MEASURES}")
    ridge = _check_ridge(ridge)
    threads = torch.get_num_threads() if cov_a[0].device.type == "cpu" else 1
    with _one_thread(cov_a[0].device):
        return _pair_measures(cov_a, cov_b, cross, measures, names_a, names_b, ridge, same, zero_a, zero_b,
                              threads)


@contextlib.contextmanager
def _one_thread(device: torch.device):
    """LAPACK on one d x d matrix at a time: on the CPU, torch's thread team costs more than it
    gives (svdvals of 384 x 384 measured 0.04 s on one thread, 1-4 s on two busy cores)."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _parallel_map(fn, items: list, workers: int) -> list:
    """``[fn(x) for x in items]`` on ``workers`` threads: the items are independent and torch
    releases the GIL in BLAS/LAPACK, so one single-threaded factorization per worker keeps every
    core busy."""
    workers = min(workers, len(items))
    if workers <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(fn, items))


def _pair_measures(cov_a, cov_b, cross, measures, names_a, names_b, ridge, same, zero_a, zero_b, threads):
    # each side's eigenbasis: whole for its whitening (regression whitens a's side only, its reverse
    # b's), else only the directions SVCCA keeps
    need_white_a = any(m in ("cca", "cca_mean", "regression") for m in measures)
    need_white_b = any(m in ("cca", "cca_mean", "regression_reverse") for m in measures)
    if same:
        need_white_a = need_white_b = need_white_a or need_white_b
    need_sv = "svcca" in measures
    zero_a = [False] * len(cov_a) if zero_a is None else [bool(z) for z in zero_a]
    zero_b = [False] * len(cov_b) if zero_b is None else [bool(z) for z in zero_b]
    layers = [(c, z, need_white_a) for c, z in zip(cov_a, zero_a)]
    layers += [] if same else [(c, z, need_white_b) for c, z in zip(cov_b, zero_b)]
    sides = _parallel_map(lambda t: _side(t[0], t[2], need_sv, ridge, t[1]), layers, threads)
    sides_a = sides[:len(cov_a)]
    sides_b = sides_a if same else sides[len(cov_a):]
    for side, name in zip(sides, list(names_a) + ([] if same else list(names_b))):
        if side.kappa is not None:  # warned here, not in a worker thread, so the caller's filters apply
            d = side.basis.shape[0]
            warnings.warn(f"layer {name}: covariance is rank-deficient (numerical rank {side.rank} of {d} units: "
                          f"more units than samples, or dead units); CCA and regression use the ridge "
                          f"Sxx + {side.kappa:.3g} I (ridge={ridge:g} x mean variance per unit)",
                          RuntimeWarning, stacklevel=4)
    la, lb = len(sides_a), len(sides_b)
    device = cov_a[0].device
    out = {m: torch.empty(la, lb, dtype=torch.float64, device=device) for m in measures}
    zero = [names_a[i] for i, s in enumerate(sides_a) if s.zero]
    zero += [names_b[j] for j, s in enumerate(sides_b) if s.zero and names_b[j] not in zero]
    if zero:
        warnings.warn(f"layer(s) {', '.join(zero)} have zero variance (constant features); their similarity "
                      "rows/columns are NaN", RuntimeWarning, stacklevel=3)

    def one(ij: tuple[int, int]) -> tuple[tuple[int, int], dict[str, float]]:
        i, j = ij
        x, y = sides_a[i], sides_b[j]
        if x.zero or y.zero:
            return ij, {m: float("nan") for m in measures}
        return ij, _one_pair(x, y, cross(i, j), measures)

    for (i, j), vals in _parallel_map(one, [(i, j) for i in range(la) for j in range(lb)], threads):
        for m in measures:
            out[m][i, j] = vals[m]
    return out


def _one_pair(x: _Side, y: _Side, sxy: torch.Tensor, measures: Sequence[str]) -> dict[str, float]:
    vals: dict[str, float] = {}
    # Sxy in the eigenbases: P = Ux^T Sxy, then S' = P Uy (all directions, or SVCCA's kept ones).
    # The whitened measures are O(d^2) weightings of their squares (row norms of S' are those of P,
    # column norms those of Sxy Uy): regression reads P, CCA and the reverse regression S'
    both = any(m in measures for m in ("cca", "cca_mean", "svcca"))
    p = x.basis.T @ sxy if x.basis is not None and (both or "regression" in measures) else None
    s = p @ y.basis if both else None
    if "regression" in measures:                # ||(Sxx + k)^-1/2 Sxy||_F^2 / tr Syy
        vals["regression"] = float(x.inv @ (p * p).sum(1)) / y.trace
    if "regression_reverse" in measures:        # ||Sxy (Syy + k)^-1/2||_F^2 / tr Sxx
        t = s if s is not None and y.inv is not None and x.inv is not None else sxy @ y.basis
        vals["regression_reverse"] = float((t * t).sum(0) @ y.inv) / x.trace
    if "cca" in measures or "cca_mean" in measures:
        r = min(x.rank, y.rank)
        if "cca" in measures:                   # sum rho_i^2 = ||Sxx^-1/2 Sxy Syy^-1/2||_F^2
            vals["cca"] = float(x.inv @ ((s * s) @ y.inv)) / r
        if "cca_mean" in measures:
            vals["cca_mean"] = nuclear_norm(s * torch.sqrt(x.inv)[:, None] * torch.sqrt(y.inv)[None, :]) / r
    if "svcca" in measures:
        kx, ky = x.sv_scale.shape[0], y.sv_scale.shape[0]
        block = s[s.shape[0] - kx:, s.shape[1] - ky:]
        vals["svcca"] = nuclear_norm(block * x.sv_scale[:, None] * y.sv_scale[None, :]) / min(kx, ky)
    if "procrustes" in measures or "procrustes_distance" in measures:
        # svdvals, not nuclear_norm: raw cross-covariances are ill-conditioned (cond(Sxy^T Sxy) of 1e12
        # on the benchmark's layers and on MiniLM's), so the Gram route's accuracy bound fails and trying
        # it first only adds the Gram and the Cholesky test (+18% measured at 768 x 768)
        sim = float(torch.linalg.svdvals(sxy).sum()) / math.sqrt(x.trace * y.trace)
        vals["procrustes"] = sim
        # d^2 = 2 - 2 sim >= 0 exactly (von Neumann's trace inequality); a negative value is
        # rounding of a distance that is 0 to within float64 precision
        vals["procrustes_distance"] = math.sqrt(max(2.0 - 2.0 * sim, 0.0))
    if "rv" in measures:
        vals["rv"] = float((sxy * sxy).sum()) / (x.frob * y.frob)
    return vals
