"""Second-order similarity measures from centred covariances.

For layers ``X (n, dx)`` and ``Y (n, dy)`` with column-centred ``Xc``, ``Yc``,
every measure here is a function of the three covariance blocks

    ``Sxx = Xc^T Xc``,  ``Syy = Yc^T Yc``,  ``Sxy = Xc^T Yc``

which the streaming :class:`~minidiff.similarity.CKAAccumulator` holds for every
layer pair (``Sxx = G - s s^T / n`` from its Gram and sum states, whatever shift
they were taken at), so no second pass over the data and no ``n x n`` matrix is
needed. Cost: one ``eigh`` per layer and ``O(d^3)`` per pair, independent of n.

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

    cov: torch.Tensor            # (d, d) centred covariance, float64
    trace: float
    rank: int
    zero: bool                   # zero variance
    white: torch.Tensor | None   # W with W^T (Sxx [+ kappa I]) W = I, (d, d)
    sv_white: torch.Tensor | None  # SVCCA: leading directions scaled by lambda^-1/2, (d, k)


def _side(cov: torch.Tensor, name: str, need_white: bool, need_sv: bool, ridge: float, zero: bool) -> _Side:
    cov = 0.5 * (cov + cov.T)  # exactly symmetric for eigh (the states are symmetric up to rounding)
    d = cov.shape[0]
    trace = float(torch.diagonal(cov).sum())
    if zero or not trace > 0:
        return _Side(cov, trace, 0, True, None, None)
    white = sv = None
    lam, U = torch.linalg.eigh(cov) if (need_white or need_sv) else (None, None)
    rank = d
    if lam is not None:
        lmax = float(lam[-1])
        rank = int((lam > RANK_RTOL * lmax).sum())
        if need_white:
            if rank < d:
                kappa = ridge * trace / d
                warnings.warn(f"layer {name}: covariance is rank-deficient (numerical rank {rank} of {d} units: "
                              f"more units than samples, or dead units); CCA and regression use the ridge "
                              f"Sxx + {kappa:.3g} I (ridge={ridge:g} x mean variance per unit)",
                              RuntimeWarning, stacklevel=4)
                white = U * torch.rsqrt(lam + kappa)[None, :]
            else:
                white = U * torch.rsqrt(lam)[None, :]
        if need_sv:
            desc = lam.flip(0)
            frac = torch.cumsum(desc, 0) / desc.sum()
            k = min(int((frac < SVCCA_VARIANCE).sum()) + 1, rank)
            keep = desc[:k]
            sv = U.flip(1)[:, :k] * torch.rsqrt(keep)[None, :]
    return _Side(cov, trace, rank, False, white, sv)


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


def _pair_measures(cov_a, cov_b, cross, measures, names_a, names_b, ridge, same, zero_a, zero_b, threads):
    need_white = any(m in ("cca", "cca_mean", "regression", "regression_reverse") for m in measures)
    need_sv = "svcca" in measures
    zero_a = [False] * len(cov_a) if zero_a is None else [bool(z) for z in zero_a]
    zero_b = [False] * len(cov_b) if zero_b is None else [bool(z) for z in zero_b]
    sides_a = [_side(c, n, need_white, need_sv, ridge, z) for c, n, z in zip(cov_a, names_a, zero_a)]
    sides_b = sides_a if same else [_side(c, n, need_white, need_sv, ridge, z)
                                    for c, n, z in zip(cov_b, names_b, zero_b)]
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

    pairs = [(i, j) for i in range(la) for j in range(lb)]
    # pairs are independent and torch releases the GIL in LAPACK: one single-threaded
    # factorization per worker thread keeps every core busy
    workers = min(threads, len(pairs))
    if workers > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(one, pairs))
    else:
        results = [one(ij) for ij in pairs]
    for (i, j), vals in results:
        for m in measures:
            out[m][i, j] = vals[m]
    return out


def _one_pair(x: _Side, y: _Side, sxy: torch.Tensor, measures: Sequence[str]) -> dict[str, float]:
    vals: dict[str, float] = {}
    if x.white is not None:
        a = x.white.T @ sxy                      # Wx^T Sxy
        if "regression" in measures:
            vals["regression"] = float((a * a).sum()) / y.trace
        if "cca" in measures or "cca_mean" in measures:
            m = a @ y.white                      # Wx^T Sxy Wy; singular values rho_i
            r = min(x.rank, y.rank)
            if "cca" in measures:
                vals["cca"] = float((m * m).sum()) / r
            if "cca_mean" in measures:
                vals["cca_mean"] = float(torch.linalg.svdvals(m).sum()) / r
        if "regression_reverse" in measures:
            b = sxy @ y.white                    # (Wy^T Syx)^T
            vals["regression_reverse"] = float((b * b).sum()) / x.trace
    if "svcca" in measures:
        m = x.sv_white.T @ sxy @ y.sv_white
        vals["svcca"] = float(torch.linalg.svdvals(m).sum()) / min(m.shape)
    if "procrustes" in measures or "procrustes_distance" in measures:
        sim = float(torch.linalg.svdvals(sxy).sum()) / math.sqrt(x.trace * y.trace)
        vals["procrustes"] = sim
        # d^2 = 2 - 2 sim >= 0 exactly (von Neumann's trace inequality); a negative value is
        # rounding of a distance that is 0 to within float64 precision
        vals["procrustes_distance"] = math.sqrt(max(2.0 - 2.0 * sim, 0.0))
    if "rv" in measures:
        vals["rv"] = float((sxy * sxy).sum()) / math.sqrt(float((x.cov * x.cov).sum()) * float((y.cov * y.cov).sum()))
    return vals
