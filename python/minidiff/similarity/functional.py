"""In-memory similarity functions: :func:`cka`, :func:`cka_matrix`, :func:`similarity_matrix`.

Everything is computed in float64. ``cka_matrix`` picks the cheaper of the
feature form (cost ~ n d1 d2; the streaming accumulator fed one batch) and the
Gram form (~ n^2 (d1 + d2); the only form for the RBF kernel).
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch

from minidiff.ops._validate import real_scalar
from minidiff.ops.cka import gram_rbf
from minidiff.similarity.accumulator import CKAAccumulator
from minidiff.similarity.hsic import _GRAM_MEMORY_LIMIT, _feature_cost, _gram_cost, _grams_hsic, _ratio
from minidiff.similarity.inputs import (ESTIMATORS, KERNELS, _EPS, _as_features, _check_rows, _layer_list,
                                        _names)
from minidiff.similarity.measures import DEFAULT_RIDGE, check_measure

def cka_matrix(feats_a, feats_b=None, *, kernel: str = "linear", estimator: str = "unbiased",
               threshold: float = 1.0, names_a: Sequence[str] | None = None,
               names_b: Sequence[str] | None = None) -> torch.Tensor:
    """CKA between every layer of model a and every layer of model b.

    Parameters
    ----------
    feats_a, feats_b : lists of ``(n, d_l)`` features (torch or numpy; trailing
        dimensions are flattened), rows aligned across all layers of both models.
        ``feats_b=None`` compares model a with itself. Widths and layer counts
        may differ between the models.
    kernel : ``"linear"`` or ``"rbf"`` (bandwidth ``sigma^2 = threshold^2 *`` median
        squared distance, Kornblith et al. 2019).
    estimator : ``"unbiased"`` (HSIC_1, Song et al. 2012; n >= 4) or ``"biased"``.

    Returns
    -------
    ``(La, Lb)`` float64 tensor. Computed in float64 by the cheaper of the feature
    form (linear kernel only) and the Gram form; never clamped.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS} for in-memory CKA, got {estimator!r} "
                         "(the minibatch estimator is CKAAccumulator(estimator='minibatch'))")
    if kernel == "rbf":  # any real scalar: a np.float32 or 0-d tensor threshold is a number too
        threshold = real_scalar(threshold, "threshold", lo=0.0)
    same = feats_b is None
    la, na_, lb, nb_, n = _prepare_layers(feats_a, feats_b, names_a, names_b)
    need = 4 if estimator == "unbiased" else 2
    if n < need:
        raise ValueError(f"the {estimator} estimator needs at least {need} samples, got n={n}")
    device = la[0].device
    la = [_power_of_two_scaled(t.to(device=device, dtype=torch.float64)) for t in la]
    lb = la if same else [_power_of_two_scaled(t.to(device=device, dtype=torch.float64)) for t in lb]
    dims_a, dims_b = [t.shape[1] for t in la], [t.shape[1] for t in lb]
    gram_bytes = 8 * n * n * (len(la) + (0 if same else len(lb)))
    use_gram = kernel == "rbf" or (
        _gram_cost(n, dims_a, dims_b, same) < _feature_cost(n, dims_a, dims_b, same) and gram_bytes <= _GRAM_MEMORY_LIMIT)
    if not use_gram:
        acc = CKAAccumulator(dims_a, None if same else dims_b, estimator=estimator, device=device,
                             names_a=na_, names_b=None if same else nb_)
        acc.update(la, None if same else lb)
        return acc.compute()
    centred_a = [t - t.mean(0) for t in la]
    centred_b = centred_a if same else [t - t.mean(0) for t in lb]
    zero_a = _zero_centred(la, centred_a)
    zero_b = zero_a if same else _zero_centred(lb, centred_b)
    if kernel == "linear":
        ka = torch.stack([c @ c.T for c in centred_a])
        kb = None if same else torch.stack([c @ c.T for c in centred_b])
        undefined_a = undefined_b = None
    else:
        ka, undefined_a = _rbf_grams(centred_a, threshold, na_)
        kb, undefined_b = (None, undefined_a) if same else _rbf_grams(centred_b, threshold, nb_)
    hab, haa, hbb = _grams_hsic(ka, kb, estimator)
    out = _ratio(hab, haa, hbb, zero_a, zero_b, na_, nb_)
    if undefined_a is not None:
        out[undefined_a, :] = float("nan")
        out[:, undefined_b] = float("nan")
    return out


def _power_of_two_scaled(t: torch.Tensor) -> torch.Tensor:
    """``t * 2^-e`` with ``2^e`` the power of two at ``max |t|``: exact in binary floating
    point, and CKA and every measure here are invariant to scaling a layer, so features
    at 1e-100 or 1e100 neither underflow nor overflow in the fourth powers of HSIC."""
    peak = t.abs().max() if t.numel() else t.new_zeros(())
    if not bool(peak > 0) or not bool(torch.isfinite(peak)):
        return t
    _, e = torch.frexp(peak)
    return torch.ldexp(t, -e.to(torch.int64)) if int(e) != 0 else t


def _zero_centred(raw: Sequence[torch.Tensor], centred: Sequence[torch.Tensor]) -> torch.Tensor:
    """Layers whose centred values are zero to the rounding of the centring: ``||x - mean||_F <=
    64 eps ||x||_F`` (each centred value is exact to ~eps |x|, so a large mean with a small but
    real spread is not constant)."""
    flags = [float(torch.linalg.vector_norm(c)) <= 64 * _EPS * float(torch.linalg.vector_norm(r))
             for r, c in zip(raw, centred)]
    return torch.tensor(flags, device=raw[0].device)


def _prepare_layers(feats_a: Any, feats_b: Any, names_a: Any, names_b: Any) -> tuple[list, list, list, list, int]:
    """Validated float64 layers and names of both sides (``feats_b=None``: the same as a) and
    their common number of samples."""
    fa = _layer_list(feats_a, "a")
    na_ = _names(names_a, len(fa), "a")
    la = [_as_features(t, f"layer {name}") for t, name in zip(fa, na_)]
    if feats_b is None:
        lb, nb_ = la, na_
    else:
        fb = _layer_list(feats_b, "b")
        nb_ = _names(names_b, len(fb), "b")
        lb = [_as_features(t, f"layer {name}") for t, name in zip(fb, nb_)]
    return la, na_, lb, nb_, _check_rows(la + lb, na_ + nb_, None)


def _rbf_grams(centred: Sequence[torch.Tensor], threshold: float, names: Sequence[str]):
    """Stacked RBF Grams, and the layers whose bandwidth is undefined (their median squared
    pairwise distance is 0: more than half of the sample pairs coincide), which are zeroed
    here and reported as NaN with a warning."""
    grams = torch.stack([gram_rbf(c, threshold) for c in centred])
    undefined = ~torch.isfinite(grams).flatten(1).all(1)
    if bool(undefined.any()):
        bad = [names[i] for i in torch.nonzero(undefined).flatten().tolist()]
        warnings.warn(f"layer(s) {', '.join(bad)}: the median squared pairwise distance is 0 (more than half of "
                      "the sample pairs are identical), so the RBF bandwidth sigma^2 = threshold^2 * median is 0 "
                      "and RBF CKA is undefined; their rows/columns are NaN. Deduplicate the examples or use "
                      "kernel='linear'", RuntimeWarning, stacklevel=4)
        grams[undefined] = 0.0
    return grams, undefined


def cka(x, y, *, kernel: str = "linear", estimator: str = "biased", threshold: float = 1.0) -> float:
    """CKA between two representations of the same n examples.

    ``x: (n, d1)``, ``y: (n, d2)`` (torch tensors or numpy arrays). See
    :func:`cka_matrix` for kernels and estimators; the default here is the biased
    estimator of Kornblith et al. (2019). Returns a Python float (NaN, with a
    warning, when one representation has zero variance).
    """
    return float(cka_matrix([x], [y], kernel=kernel, estimator=estimator, threshold=threshold,
                            names_a=["x"], names_b=["y"])[0, 0])



def similarity_matrix(layers_a, layers_b=None, *, measure: str = "cka", estimator: str = "unbiased",
                      ridge: float = DEFAULT_RIDGE, names_a: Sequence[str] | None = None,
                      names_b: Sequence[str] | None = None) -> torch.Tensor:
    """A representation-similarity measure between every layer of model a and every layer of b.

    Parameters
    ----------
    layers_a, layers_b : lists of ``(n, d_l)`` features, rows aligned (``layers_b=None``:
        model a with itself).
    measure : ``"cka"`` (linear CKA with ``estimator``, Kornblith et al. 2019),
        ``"cca"`` (mean squared canonical correlation), ``"cca_mean"``, ``"svcca"``
        (Raghu et al. 2017, 99% of the variance kept per side), ``"procrustes"``
        (similarity ``1 - d^2 / 2`` on centred unit-Frobenius features, Williams et al.
        2021), ``"procrustes_distance"`` (``d``), ``"regression"`` (R^2 predicting b's
        layer from a's), ``"regression_reverse"`` or ``"rv"`` (RV coefficient = biased
        linear CKA). Formulas: :mod:`minidiff.similarity.measures` and docs/similarity.md.
    ridge : relative ridge for rank-deficient covariances (with a warning).

    Returns
    -------
    ``(La, Lb)`` float64 tensor. The same as ``CKAAccumulator.compute(measure=...)``
    fed the same data in any batches.
    """
    check_measure(measure)
    if measure == "cka":
        return cka_matrix(layers_a, layers_b, estimator=estimator, names_a=names_a, names_b=names_b)
    same = layers_b is None
    la, na_, lb, nb_, n = _prepare_layers(layers_a, layers_b, names_a, names_b)
    if n < 2:
        raise ValueError(f"second-order similarity measures need at least 2 samples, got n={n}")
    device = la[0].device
    la = [_power_of_two_scaled(t.to(device=device, dtype=torch.float64)) for t in la]
    lb = la if same else [_power_of_two_scaled(t.to(device=device, dtype=torch.float64)) for t in lb]
    acc = CKAAccumulator([t.shape[1] for t in la], None if same else [t.shape[1] for t in lb],
                         estimator="biased", device=device, names_a=na_, names_b=None if same else nb_)
    acc.update(la, None if same else lb)
    return acc.compute(measure, ridge=ridge)
