"""Second-order similarity measures (CCA, SVCCA, Procrustes, regression, RV) from the CKA
accumulator's streamed statistics, against float64 in-memory references written from each
paper's definition, on random and real (MiniLM) activations."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import minidiff
from minidiff.similarity import CKAAccumulator, cka_matrix, similarity_matrix
from minidiff.similarity.measures import DEFAULT_RIDGE, MEASURES


# -- references from the definitions (data matrices, never the covariance algebra) ---------
def _centred(x):
    x = torch.as_tensor(x, dtype=torch.float64)
    return x - x.mean(0)


def _orthonormal_basis(xc, kappa=None):
    """Q with orthonormal columns whose inner products give the whitened data: the thin QR of
    Xc (Hotelling's CCA), or of the ridge-augmented [Xc; sqrt(kappa) I] (its first n rows)."""
    if kappa is None:
        q, r = torch.linalg.qr(xc)
        return q
    d = xc.shape[1]
    aug = torch.cat([xc, kappa ** 0.5 * torch.eye(d, dtype=torch.float64)])
    _, r = torch.linalg.qr(aug)
    return torch.linalg.solve_triangular(r, xc, upper=True, left=False)  # Xc R^{-1}


def ref_cca(x, y, kappa_x=None, kappa_y=None, rank=None):
    xc, yc = _centred(x), _centred(y)
    rho = torch.linalg.svdvals(_orthonormal_basis(xc, kappa_x).T @ _orthonormal_basis(yc, kappa_y))
    denom = rank if rank is not None else min(xc.shape[1], yc.shape[1])
    return float((rho ** 2).sum()) / denom, float(rho.sum()) / denom


def ref_svcca(x, y, keep=0.99):
    """Raghu et al. 2017: SVD of each centred data matrix, keep the leading directions
    explaining ``keep`` of the variance, CCA of the reduced data, mean correlation."""
    reduced = []
    for z in (x, y):
        u, s, _ = torch.linalg.svd(_centred(z), full_matrices=False)
        frac = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
        k = int((frac < keep).sum()) + 1
        reduced.append(u[:, :k] * s[:k])
    rho = torch.linalg.svdvals(torch.linalg.qr(reduced[0])[0].T @ torch.linalg.qr(reduced[1])[0])
    return float(rho.sum()) / min(r.shape[1] for r in reduced)


def ref_procrustes(x, y):
    """Williams et al. 2021: centred, unit-Frobenius, narrower side zero-padded; the optimal
    rotation from the SVD of Y^T X; returns (similarity 1 - d^2/2, distance d)."""
    xn, yn = _centred(x), _centred(y)
    xn, yn = xn / torch.linalg.norm(xn), yn / torch.linalg.norm(yn)
    w = max(xn.shape[1], yn.shape[1])
    xn = torch.nn.functional.pad(xn, (0, w - xn.shape[1]))
    yn = torch.nn.functional.pad(yn, (0, w - yn.shape[1]))
    u, _, vh = torch.linalg.svd(yn.T @ xn)
    d = float(torch.linalg.norm(xn - yn @ (u @ vh)))
    return 1 - d * d / 2, d


def ref_regression(x, y):
    """R^2 of least squares with intercept, predicting y from x, variance weighted."""
    from sklearn.linear_model import LinearRegression
    from sklearn.metrics import r2_score
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    pred = LinearRegression().fit(x, y).predict(x)
    xc, yc = _centred(x), _centred(y)
    beta = torch.linalg.lstsq(xc, yc).solution
    mine = 1 - float(((yc - xc @ beta) ** 2).sum()) / float((yc ** 2).sum())
    assert mine == pytest.approx(r2_score(y, pred, multioutput="variance_weighted"), abs=1e-9)
    return mine


def ref_rv(x, y):
    xc, yc = _centred(x), _centred(y)
    kx, ky = xc @ xc.T, yc @ yc.T
    return float((kx * ky).sum() / torch.sqrt((kx * kx).sum() * (ky * ky).sum()))


def references(x, y):
    cca, cca_mean = ref_cca(x, y)
    sim, dist = ref_procrustes(x, y)
    return {"cca": cca, "cca_mean": cca_mean, "svcca": ref_svcca(x, y), "procrustes": sim,
            "procrustes_distance": dist, "regression": ref_regression(x, y),
            "regression_reverse": ref_regression(y, x), "rv": ref_rv(x, y)}


def _related(n=400, widths_a=(12, 20, 7), widths_b=(15, 9), mean=0.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 6, generator=g, dtype=torch.float64)
    fa = [(base @ torch.randn(6, w, generator=g, dtype=torch.float64) * (1 + i)
           + 0.7 * torch.randn(n, w, generator=g, dtype=torch.float64) + mean).to(dtype)
          for i, w in enumerate(widths_a)]
    fb = [(torch.tanh(base) @ torch.randn(6, w, generator=g, dtype=torch.float64)
           + torch.randn(n, w, generator=g, dtype=torch.float64) - mean).to(dtype) for w in widths_b]
    return fa, fb


def _reference_matrices(fa, fb, refs=references):
    table = [[refs(x, y) for y in fb] for x in fa]
    return {m: torch.tensor([[row[m] for row in rows] for rows in table], dtype=torch.float64) for m in table[0][0]}


def _check_all(ref: dict, got: dict, abs_tol: float):
    for m, v in ref.items():
        torch.testing.assert_close(got[m], v, rtol=0, atol=abs_tol, msg=m)


def _streamed(fa, fb, sizes, shards=1, **kw):
    """Stream in the given batch sizes, optionally over several shards merged at the end."""
    n = fa[0].shape[0]
    cuts = np.linspace(0, n, shards + 1).astype(int)
    accs = []
    for s, e in zip(cuts, cuts[1:]):
        acc = CKAAccumulator([t.shape[1] for t in fa], None if fb is None else [t.shape[1] for t in fb], **kw)
        i, k = s, 0
        while i < e:
            j = min(e, i + sizes[k % len(sizes)])
            acc.update([t[i:j] for t in fa], None if fb is None else [t[i:j] for t in fb])
            i, k = j, k + 1
        accs.append(acc)
    for other in accs[1:]:
        accs[0].merge(other)
    return accs[0]


# -- random activations ---------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["unbiased", "biased"])
def test_streamed_measures_equal_definitions_random(estimator):
    fa, fb = _related(n=240, mean=30.0)  # a large mean: the covariances come from shifted sums
    ref = _reference_matrices(fa, fb)
    # the RV coefficient is biased linear CKA (Kornblith et al. 2019)
    torch.testing.assert_close(ref["rv"], cka_matrix(fa, fb, estimator="biased"), rtol=0, atol=1e-10)
    for sizes, shards in (([240], 1), ([37, 5, 64], 1), ([50], 3)):
        acc = _streamed(fa, fb, sizes, shards, estimator=estimator)
        got = acc.compute_measures([m for m in MEASURES if m != "cka"])
        _check_all(ref, got, 1e-9)
        for m in ("cca", "procrustes", "regression"):
            torch.testing.assert_close(acc.compute(m), got[m], rtol=0, atol=0)
        # alone, these take cheaper products (Sxy Uy; SVCCA's kept directions only): equal to rounding
        for m in ("regression_reverse", "svcca", "cca_mean"):
            torch.testing.assert_close(acc.compute(m), got[m], rtol=0, atol=1e-14)
    for m in MEASURES[1:]:
        torch.testing.assert_close(similarity_matrix(fa, fb, measure=m), got[m], rtol=0, atol=1e-10)


@pytest.mark.parametrize("subset", [("regression", "svcca"), ("regression_reverse", "svcca"), ("cca", "rv"),
                                    ("regression", "regression_reverse"), ("svcca", "procrustes")])
def test_any_subset_of_measures_gives_the_same_values(subset):
    """Each side's eigenbasis is whole or SVCCA's kept part depending on the measures asked; the
    values do not depend on it (beyond rounding)."""
    fa, fb = _related(n=300, widths_a=(12, 30), widths_b=(25, 9))
    acc = _streamed(fa, fb, [300])
    every = acc.compute_measures([m for m in MEASURES if m != "cka"])
    got = acc.compute_measures(list(subset))
    assert set(got) == set(subset)
    for m in subset:
        torch.testing.assert_close(got[m], every[m], rtol=0, atol=1e-14, msg=m)


def test_self_comparison_and_float32_stream():
    fa, _ = _related(n=300, widths_a=(10, 16, 6))
    got = similarity_matrix(fa, measure="cca")
    torch.testing.assert_close(got, similarity_matrix(fa, [t.clone() for t in fa], measure="cca"), atol=1e-10, rtol=0)
    torch.testing.assert_close(torch.diagonal(got), torch.ones(3, dtype=torch.float64), atol=1e-10, rtol=0)
    f32 = [t.float() for t in fa]
    got32 = _streamed(f32, None, [64, 100]).compute_measures(MEASURES[1:])
    ref = {m: similarity_matrix([t.double() for t in f32], measure=m) for m in MEASURES[1:]}
    for m in MEASURES[1:]:  # float32 features: float32 GEMM partial sums, float64 after
        torch.testing.assert_close(got32[m], ref[m], atol=2e-5, rtol=0, msg=m)
    d = similarity_matrix(fa, measure="procrustes_distance")
    torch.testing.assert_close(torch.diagonal(d), torch.zeros(3, dtype=torch.float64), atol=2e-7, rtol=0)


def _kappa(z):
    zc = _centred(z)
    return DEFAULT_RIDGE * float((zc * zc).sum()) / z.shape[1]


def ref_ridge(x, y):
    """Ridge-regularised CCA and regression from the augmented data matrices [Zc; sqrt(kappa) I]
    (Gram Szz + kappa I, kappa = ridge x mean variance per unit): (mean squared CCA over the
    smaller numerical rank, tr(Syx (Sxx + kappa I)^-1 Sxy) / tr Syy)."""
    xc, yc = _centred(x), _centred(y)
    kx, ky = _kappa(x), _kappa(y)
    aug = torch.cat([xc, kx ** 0.5 * torch.eye(xc.shape[1], dtype=torch.float64)])
    beta = torch.linalg.lstsq(aug, torch.cat([yc, torch.zeros(xc.shape[1], yc.shape[1], dtype=torch.float64)])).solution
    r2 = float((yc * (xc @ beta)).sum()) / float((yc * yc).sum())
    rho = torch.linalg.svdvals(_orthonormal_basis(xc, kx).T @ _orthonormal_basis(yc, ky))
    rank = min(int(torch.linalg.matrix_rank(z, rtol=1e-5)) for z in (xc, yc))  # eigenvalues of S > 1e-10 max
    return float((rho ** 2).sum()) / rank, r2


def test_measures_match_definitions_on_minilm_tokens(minilm_tokens):
    """Real activations: MiniLM token features (layers 0 and 6; 384 wide; 24 sentences, ~300
    tokens) against the same model with bfloat16-rounded weights. Fewer tokens than units (and
    LayerNorm outputs satisfy one linear constraint), so CCA and regression take the stated
    ridge; their references are the ridge definitions from the augmented data matrices."""
    fa, fb = minilm_tokens
    n = fa[0].shape[0]
    with pytest.warns(RuntimeWarning, match="rank-deficient"):
        got = _streamed(fa, fb, [97, 64, 128], shards=2).compute_measures(MEASURES)
        one = _streamed(fa, fb, [n]).compute_measures(MEASURES)
    for m in MEASURES:  # streamed after batching and merging == in memory
        torch.testing.assert_close(got[m], one[m], rtol=0, atol=1e-8, msg=m)
    torch.testing.assert_close(got["rv"], cka_matrix(fa, fb, estimator="biased"), atol=1e-9, rtol=0)
    for i, j in ((0, 0), (0, 1)):
        x, y = fa[i], fb[j]
        sim, dist = ref_procrustes(x, y)
        assert float(got["procrustes"][i, j]) == pytest.approx(sim, abs=1e-8)
        assert float(got["procrustes_distance"][i, j]) == pytest.approx(dist, abs=1e-6)
        assert float(got["svcca"][i, j]) == pytest.approx(ref_svcca(x, y), abs=1e-7)
        assert float(got["rv"][i, j]) == pytest.approx(ref_rv(x, y), abs=1e-9)
        cca, r2 = ref_ridge(x, y)
        assert float(got["cca"][i, j]) == pytest.approx(cca, abs=1e-7)
        assert float(got["regression"][i, j]) == pytest.approx(r2, abs=1e-7)
    # matched layers of a model and its bf16-weight copy stay close
    assert float(got["procrustes"][1, 1]) > 0.9 and float(got["svcca"][0, 0]) > 0.99
    torch.testing.assert_close(similarity_matrix(fa, fb, measure="procrustes"), got["procrustes"], rtol=0, atol=1e-8)
@pytest.fixture(scope="module")
def minilm_tokens():
    from transformers import AutoModel, AutoTokenizer

    from minidiff.data import load_builtin
    from minidiff.models.capture import capture
    from minidiff.models.loading import embedded_minilm_dir
    path = str(embedded_minilm_dir())
    tok = AutoTokenizer.from_pretrained(path)
    base = AutoModel.from_pretrained(path).eval()
    variant = AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        for p in variant.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    texts = list(load_builtin("chatterbot-en").inputs[:24])
    batch = dict(tok(texts, padding=True, return_tensors="pt"))
    mask = batch["attention_mask"].bool()
    out = []
    for model in (base, variant):
        feats = list(capture(model, batch, layers="hidden_states", token_mode="tokens").values())
        # layers 0 and 6; real tokens only, as (tokens, 384) float64
        out.append([f.reshape(mask.shape[0], mask.shape[1], -1)[mask].double() if f.shape[0] != mask.sum()
                    else f.double() for f in (feats[0], feats[6])])
    return out


# -- rank deficiency: a stated ridge with a warning, never a silent NaN ----------------------
def test_dead_units_warn_and_equal_cca_on_live_units():
    fa, fb = _related(n=200, widths_a=(10,), widths_b=(8,))
    x = torch.cat([fa[0], torch.zeros(200, 3, dtype=torch.float64)], 1)  # three dead units
    with pytest.warns(RuntimeWarning, match="rank-deficient.*ridge"):
        got = similarity_matrix([x], fb, measure="cca")
    rank = min(10, 8)
    assert float(got[0, 0]) == pytest.approx(ref_cca(x, fb[0], kappa_x=_kappa(x), rank=rank)[0], abs=1e-9)
    # the dead units add nothing; the ridge (1e-6 of the mean variance) barely moves the live ones
    assert float(got[0, 0]) == pytest.approx(ref_cca(fa[0], fb[0])[0], abs=1e-5)
    with pytest.warns(RuntimeWarning, match="rank-deficient"):
        reg = similarity_matrix([x], fb, measure="regression")
    assert float(reg[0, 0]) == pytest.approx(ref_regression(fa[0], fb[0]), abs=1e-5)


def test_more_units_than_samples_uses_the_stated_ridge():
    g = torch.Generator().manual_seed(3)
    n = 30
    x = torch.randn(n, 50, generator=g, dtype=torch.float64)
    y = x[:, :20] @ torch.randn(20, 12, generator=g, dtype=torch.float64) + torch.randn(n, 12, generator=g,
                                                                                          dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match=r"rank 29 of 50"):
        got = similarity_matrix([x], [y], measure="cca")
    expect = ref_cca(x, y, kappa_x=_kappa(x), rank=12)[0]
    assert torch.isfinite(got).all() and float(got[0, 0]) == pytest.approx(expect, abs=1e-8)


def test_constant_layer_is_nan_with_a_warning():
    fa, fb = _related(n=100, widths_a=(5,), widths_b=(4,))
    const = torch.full((100, 3), 7.0, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="zero variance"):
        got = similarity_matrix([fa[0], const], fb, measure="procrustes")
    assert torch.isnan(got[1]).all() and torch.isfinite(got[0]).all()


def test_bad_arguments():
    fa, fb = _related(n=50)
    with pytest.raises(ValueError, match="measure must be one of"):
        similarity_matrix(fa, fb, measure="cosine")
    acc = CKAAccumulator([t.shape[1] for t in fa], [t.shape[1] for t in fb], estimator="minibatch")
    acc.update(fa, fb)
    with pytest.raises(ValueError, match="minibatch"):
        acc.compute("cca")
    with pytest.raises(ValueError, match="ridge"):
        similarity_matrix(fa, fb, measure="cca", ridge=-1.0)
    assert minidiff.similarity_matrix is similarity_matrix


def test_no_warning_for_full_rank_data():
    fa, fb = _related(n=300)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        similarity_matrix(fa, fb, measure="cca")


# -- nuclear norms from the Gram's eigenvalues, where provably accurate ----------------------
def _with_spectrum(p, q, sigma, seed):
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(p, len(sigma), generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(q, len(sigma), generator=g, dtype=torch.float64))[0]
    return (u * sigma) @ v.T


@pytest.mark.parametrize("p, q", [(60, 60), (90, 40), (40, 90)])
@pytest.mark.parametrize("cond", [1.0, 1e3, 1e6, 1e12])
def test_nuclear_norm_is_within_its_bound_and_falls_back_where_it_cannot_prove_it(p, q, cond, monkeypatch):
    from minidiff.similarity import measures
    k = min(p, q)
    sigma = torch.logspace(0, -math.log10(cond), k, dtype=torch.float64)
    m = _with_spectrum(p, q, sigma, seed=int(cond) % 97 + p)
    calls = []
    real = torch.linalg.svdvals
    monkeypatch.setattr(torch.linalg, "svdvals", lambda x: calls.append(x.shape) or real(x))
    got = measures.nuclear_norm(m)
    exact = float(sigma.sum())  # the spectrum it was built with (to the QR's rounding)
    assert got == pytest.approx(exact, rel=measures.NUCLEAR_RTOL)
    # well-conditioned: from the Gram (no SVD); ill-conditioned: the bound fails and svdvals decides
    assert (calls == []) == (cond <= 1e3), (cond, calls)


def test_nuclear_norm_of_rank_deficient_and_zero_matrices():
    from minidiff.similarity import measures
    sigma = torch.cat([torch.linspace(1, 2, 30, dtype=torch.float64), torch.zeros(20, dtype=torch.float64)])
    m = _with_spectrum(50, 50, sigma, seed=1)
    # zero singular values: sqrt of rounding-level Gram eigenvalues would be ~1e-8 each
    assert measures.nuclear_norm(m) == pytest.approx(float(sigma.sum()), rel=1e-12)
    assert measures.nuclear_norm(torch.zeros(4, 3, dtype=torch.float64)) == 0.0
    assert measures.nuclear_norm(torch.zeros(0, 3, dtype=torch.float64)) == 0.0
