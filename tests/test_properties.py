"""Property-based tests of the public engine functions and the int8 / sparse ops.

Random shapes, dtypes, memory layouts (transposed and strided views) and values
(NaN, Inf, huge, tiny, empty). The property is always the same: a valid input
gives the float64 (or exact integer) reference, an invalid one raises
ValueError/TypeError with a message -- never a signal, never a wrong number.
Cases that could crash the interpreter (corrupt CSR arrays, inconsistent op
arguments) run in a child process.

The default profile ("fast", registered in conftest.py) keeps the file well under a
minute; ``pytest --hypothesis-profile=long tests/test_properties.py`` runs 100x more
examples for a local soak.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import stats
from scipy.special import kl_div, xlogy

import minidiff
import minidiff.metrics as M
from minidiff.ops import int8 as I
from minidiff.ops import sparse as S
from minidiff.quant import quantize_weight_int8

ERRORS = (ValueError, TypeError)


def _raises_with_message(fn) -> None:
    with pytest.raises(ERRORS) as info:
        fn()
    assert len(str(info.value)) > 15, f"uninformative message: {info.value!r}"


# ---- strategies -------------------------------------------------------------------------
INT_DTYPES = st.sampled_from([np.int8, np.int16, np.int32, np.int64, np.uint8])


@st.composite
def layouts(draw, a: np.ndarray):
    """The same values as a numpy array, a contiguous tensor, a transposed-copy view or a
    strided view (every other column of a wider buffer)."""
    kind = draw(st.sampled_from(["numpy", "tensor", "transposed", "strided"]))
    if kind == "numpy":
        return a
    t = torch.from_numpy(np.ascontiguousarray(a))
    if kind == "tensor" or a.ndim < 2:
        return t
    if kind == "transposed":
        rev = tuple(range(a.ndim - 1, -1, -1))
        return t.permute(rev).contiguous().permute(rev)  # same values, reversed (column-major) strides
    wide = torch.zeros(a.shape[:-1] + (2 * a.shape[-1],), dtype=t.dtype)
    wide[..., ::2] = t
    return wide[..., ::2]


@st.composite
def predictions(draw, max_models=4, max_examples=40):
    n = draw(st.integers(1, max_models))
    m = draw(st.integers(1, max_examples))
    c = draw(st.integers(1, 6))
    dtype = draw(INT_DTYPES)
    p = draw(hnp.arrays(dtype, (n, m), elements=st.integers(0, c - 1)))
    y = draw(hnp.arrays(dtype, (m,), elements=st.integers(0, c - 1)))
    return p, y, c


def _np_disagreement(p):
    return (p[:, None, :] != p[None, :, :]).mean(-1)


def _np_modal(p, c):
    return np.array([np.bincount(col, minlength=c).argmax() for col in p.T.astype(np.int64)])


# ---- agreement: counts ------------------------------------------------------------------
@given(data=st.data(), pc=predictions())
def test_counts_equal_the_reference(data, pc):
    p, y, c = pc
    pv, yv = data.draw(layouts(p)), data.draw(layouts(y))
    d = minidiff.disagreement_matrix(pv)
    assert d.dtype == torch.float64
    assert np.array_equal(d.numpy(), _np_disagreement(p))
    right = p == y[None]
    f = minidiff.flip_matrix(pv, yv, num_classes=c)
    assert np.array_equal(f[..., 0].numpy(), (right[:, None] & ~right[None, :]).mean(-1))
    inter = (~right[:, None] & ~right[None, :]).sum(-1)
    union = (~right[:, None] | ~right[None, :]).sum(-1)
    jac = np.where(union == 0, 1.0, inter / np.maximum(union, 1))
    assert np.array_equal(minidiff.error_jaccard(pv, yv).numpy(), jac)


@given(data=st.data(), pc=predictions(max_models=5))
def test_population_statistics_equal_the_reference(data, pc):
    p, y, c = pc
    k = data.draw(st.integers(1, p.shape[0]))
    base, comp = p[:k], p[k - 1:]
    assert np.array_equal(minidiff.modal_labels(data.draw(layouts(base)), num_classes=c).numpy(), _np_modal(base, c))
    pie = minidiff.pie_mask(data.draw(layouts(base)), data.draw(layouts(comp)))
    cmax = int(max(base.max(), comp.max())) + 1
    assert np.array_equal(pie.numpy(), _np_modal(base, cmax) != _np_modal(comp, cmax))
    hb = np.stack([np.bincount(col, minlength=c) for col in base.T.astype(np.int64)]) / base.shape[0]
    hc = np.stack([np.bincount(col, minlength=c) for col in comp.T.astype(np.int64)]) / comp.shape[0]
    cie = minidiff.cie_scores(base, comp, num_classes=c).numpy()
    np.testing.assert_allclose(cie, np.abs(hc - hb).sum(1), rtol=1e-15, atol=1e-15)


@given(n=st.integers(0, 3), m=st.integers(0, 5),
       bad=st.sampled_from(["negative", "too_large", "float", "bool", "empty", "3d", "huge"]))
def test_bad_predictions_raise(n, m, bad):
    p = np.zeros((max(n, 1), max(m, 1)), dtype=np.int64)
    if bad == "negative":
        p[0, 0] = -1
    elif bad == "too_large":
        p[0, 0] = 7
    elif bad == "float":
        p = p.astype(np.float32)
    elif bad == "bool":
        p = p.astype(bool)
    elif bad == "empty":
        p = np.zeros((n, m) if n * m == 0 else (0, m), dtype=np.int64)
    elif bad == "3d":
        p = p[None]
    else:
        p[0, 0] = 2**40
    for fn in (lambda: minidiff.disagreement_matrix(p, num_classes=5),
               lambda: minidiff.modal_labels(p, num_classes=5),
               lambda: minidiff.cie_scores(p, p, num_classes=5)):
        _raises_with_message(fn)


# ---- agreement: divergences ----------------------------------------------------------------
POSITIVE = st.one_of(st.just(0.0), st.floats(1e-300, 1e-250), st.floats(1e-20, 1e-12),
                     st.floats(1e-6, 1.0), st.floats(1.0, 1e6), st.floats(1e200, 1e300))


def _js_reference(p, q):
    s = p + q
    with np.errstate(divide="ignore", invalid="ignore"):
        t = 0.5 * (xlogy(p, 2 * p / s) + xlogy(q, 2 * q / s))
    return np.where(s > 0, t, 0.0).sum(-1)


@given(data=st.data(), n=st.integers(1, 3), m=st.integers(1, 6), c=st.integers(1, 5),
       dtype=st.sampled_from([np.float32, np.float64]), kind=st.sampled_from(["kl", "js", "tv"]))
def test_divergences_equal_the_float64_reference(data, n, m, c, dtype, kind):
    raw = data.draw(hnp.arrays(np.float64, (n, m, c), elements=POSITIVE))
    sums = raw.sum(-1, keepdims=True)
    assume(np.all(np.isfinite(sums)) and np.all(sums > 0))
    probs = (raw / sums).astype(dtype)
    assume(np.all(np.abs(probs.astype(np.float64).sum(-1) - 1) <= 1e-3))
    d = minidiff.divergence_matrix(data.draw(layouts(probs)), kind).numpy()
    p64 = probs.astype(np.float64)
    for i in range(n):
        for j in range(n):
            p, q = p64[i], p64[j]
            if kind == "kl":
                ref = kl_div(np.maximum(p, 1e-12), np.maximum(q, 1e-12)).sum(-1)
            elif kind == "js":
                ref = _js_reference(p, q)
            else:
                ref = np.abs(p - q).sum(-1) / 2
            ref = 0.0 if i == j else ref.mean()
            assert d[i, j] >= 0
            assert d[i, j] == pytest.approx(ref, rel=1e-9, abs=1e-14), (i, j, kind)
    rows = minidiff.divergence_to_reference(probs, 0, kind).numpy()
    assert np.all(rows >= 0) and np.allclose(rows.mean(1), d[0], rtol=1e-12, atol=1e-15)


@given(special=st.sampled_from([np.nan, np.inf, -np.inf, -0.5, 2.0]), kind=st.sampled_from(["kl", "js", "tv"]))
def test_divergences_reject_non_distributions(special, kind):
    probs = np.full((2, 3, 4), 0.25)
    probs[1, 2, 1] = special
    _raises_with_message(lambda: minidiff.divergence_matrix(probs, kind))


# ---- metrics -----------------------------------------------------------------------------
SAMPLES = st.lists(st.one_of(st.floats(-1e6, 1e6), st.floats(-1e-300, 1e-300), st.integers(-5, 5)),
                   min_size=1, max_size=60)


@given(values=SAMPLES, as_list=st.booleans())
def test_bootstrap_mean_is_the_float64_mean(values, as_list):
    v = values if as_list else np.asarray(values, dtype=np.float64)
    mean, lo, hi = M.bootstrap_mean_ci(v, n_boot=200, seed=1)
    a = np.asarray(values, dtype=np.float64)
    assert mean == a.mean()
    assert a.min() - 1e-9 * np.abs(a).max() <= lo <= hi <= a.max() + 1e-9 * np.abs(a).max()


@given(a=SAMPLES, b=SAMPLES)
def test_ks_shift_equals_scipy(a, b):
    r = M.ks_shift(a, b)
    ref = stats.ks_2samp(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))
    assert r.statistic == ref.statistic and r.p_value == ref.pvalue


@given(values=SAMPLES, tpr=st.floats(0.01, 0.99),
       kind=st.sampled_from(["float", "np32", "np64", "tensor"]))
def test_ood_threshold_is_the_float64_quantile(values, tpr, kind):
    t = {"float": tpr, "np32": np.float32(tpr), "np64": np.float64(tpr),
         "tensor": torch.tensor(tpr, dtype=torch.float64)}[kind]
    assert M.ood_threshold(values, t) == np.quantile(np.asarray(values, dtype=np.float64), float(t))


@given(bad=st.sampled_from([[], [[1.0, 2.0]], [1.0, float("nan")], [float("inf")], ["x"], [1 + 2j]]))
def test_samples_reject_bad_values(bad):
    _raises_with_message(lambda: M.bootstrap_mean_ci(bad, n_boot=200))
    _raises_with_message(lambda: M.ks_shift(bad, [1.0]))
    _raises_with_message(lambda: M.ood_threshold(bad))


@given(data=st.data(), n_train=st.integers(1, 30), m=st.integers(1, 8), d=st.integers(1, 6),
       dtype=st.sampled_from([np.float32, np.float64]),
       scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e3, 1e30]))
def test_knn_ood_scores_equal_the_exact_distances(data, n_train, m, d, dtype, scale):
    train = data.draw(hnp.arrays(np.float64, (n_train, d), elements=st.floats(-1, 1)))
    extra = data.draw(hnp.arrays(np.float64, (m, d), elements=st.floats(-1, 1)))
    queries = np.concatenate([train[: m // 2] * 2, extra])[:m]  # some exact duplicates
    k = data.draw(st.integers(1, n_train))
    train32, queries32 = (train * scale).astype(dtype), (queries * scale).astype(dtype)
    if np.any(np.all(train32 == 0, axis=1)) or np.any(np.all(queries32 == 0, axis=1)):
        _raises_with_message(lambda: M.knn_ood_scores(train32, queries32, k=k))
        return
    got = M.knn_ood_scores(data.draw(layouts(train32)), queries32, k=k, chunk_size=data.draw(st.integers(1, 9))).numpy()
    zt, zq = _unit_rows(train32), _unit_rows(queries32)
    ref = np.sort(np.linalg.norm(zq[:, None, :] - zt[None, :, :], axis=2), axis=1)[:, k - 1]
    tol = 1e-6 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(got, ref, rtol=0, atol=tol)


def _unit_rows(a: np.ndarray) -> np.ndarray:
    """float64 rows scaled to unit norm without under/overflow (scaled by the row's max first)."""
    a = a.astype(np.float64)
    a = a / np.abs(a).max(axis=1, keepdims=True)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


# ---- int8 / sparse ops -------------------------------------------------------------------
@given(data=st.data(), m=st.integers(0, 5), k=st.integers(1, 24), n=st.integers(1, 9),
       density=st.floats(0, 1), bias=st.booleans(),
       x_scale=st.sampled_from([1e-20, 1.0, 1e15]))
def test_sparse_linear_equals_the_float64_reference(data, m, k, n, density, bias, x_scale):
    w = data.draw(hnp.arrays(np.float32, (n, k), elements=st.floats(-2, 2, width=32)))
    w = w * (data.draw(hnp.arrays(np.float64, (n, k), elements=st.floats(0, 1))) < density)
    x = data.draw(hnp.arrays(np.float32, (m, k), elements=st.floats(-1, 1, width=32))) * np.float32(x_scale)
    wt = torch.from_numpy(w.astype(np.float32))
    rp, col, val = S.to_csr(wt)
    b = torch.randn(n) if bias else None
    xt = data.draw(layouts(x))
    xt = xt if isinstance(xt, torch.Tensor) else torch.from_numpy(xt)
    y = S.sparse_linear(xt, rp, col, val, b)
    ref = S.sparse_linear_reference(xt, rp, col, val, b)
    mag = torch.from_numpy(np.abs(x).astype(np.float64)) @ torch.from_numpy(np.abs(w).astype(np.float64)).T
    if b is not None:
        mag = mag + b.double().abs()
    # float32 output: 1e-6 relative, and products below float32's range (2**-149) round to 0
    assert torch.all((y.double() - ref).abs() <= 1e-6 * mag + (k + 1) * 2.0**-149)


@given(data=st.data(), m=st.integers(0, 5), k=st.integers(1, 40), n=st.integers(1, 9),
       x_scale=st.sampled_from([1e-30, 1e-3, 1.0, 1e20]), weight_only=st.booleans())
def test_int8_linear_equals_the_reference(data, m, k, n, x_scale, weight_only):
    w = torch.from_numpy(data.draw(hnp.arrays(np.float32, (n, k), elements=st.floats(-1, 1, width=32))))
    x = torch.from_numpy(data.draw(hnp.arrays(np.float32, (m, k), elements=st.floats(-1, 1, width=32)))) * x_scale
    w_q, w_s = quantize_weight_int8(w)
    if weight_only:
        y = I.int8_weight_only_linear(x, w_q, w_s)
        ref = I.int8_weight_only_linear_reference(x, w_q, w_s)
        mag = x.double().abs() @ (w_q.double().abs() * w_s.double()[:, None]).T
    else:
        y = I.int8_linear(x, w_q, w_s)
        ref = I.int8_linear_reference(x, w_q, w_s)
        mag = ref.abs()
    assert y.dtype == torch.float32 and y.shape == (m, n)
    # float32 epilogue: besides 1e-6 relative, the scale product s_x s_w may be subnormal for
    # activations below ~1e-33, where float32 resolves only multiples of 2**-149 (times acc <= 127^2 K)
    # (and, in either mode, outputs below float32's range round to 0)
    subnormal = (k + 1) * 2.0**-149 if weight_only else 2 * 127 * 127 * k * 2.0**-149
    assert torch.all((y.double() - ref).abs() <= 1e-6 * mag + subnormal)


# ---- crash-prone: corrupt arguments to the registered ops, in a child process --------------
def _fuzz_registered_ops() -> None:
    """Child-process body: random, mostly inconsistent arguments to every op that takes
    index arrays or sizes; each call must return the reference or raise."""
    import importlib
    import pkgutil

    import minidiff.ops

    for mod in pkgutil.iter_modules(minidiff.ops.__path__):  # registers every op
        importlib.import_module(f"minidiff.ops.{mod.name}")
    O = torch.ops.minidiff
    n_examples = int(os.environ.get("MINIDIFF_FUZZ_EXAMPLES", "20"))

    @settings(max_examples=n_examples, deadline=None, derandomize=n_examples <= 100)
    @given(data=st.data())
    def fuzz(data):
        n, k = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 12))
        nnz = data.draw(st.integers(0, 12))
        rp = torch.tensor(data.draw(st.lists(st.integers(-3, 15), min_size=n + 1, max_size=n + 1)), dtype=torch.int32)
        col = torch.tensor(data.draw(st.lists(st.integers(-3, 2**31 - 1), min_size=nnz, max_size=nnz)),
                           dtype=torch.int32)
        x = torch.randn(data.draw(st.integers(0, 4)), k)
        try:
            y = O.sparse_linear(x, rp, col, torch.ones(nnz), None, k, torch.float32)
        except (ValueError, RuntimeError):
            pass
        else:  # accepted: the structure was valid and the result is the dense product
            assert torch.allclose(y.double(), S.sparse_linear_reference(x, rp, col, torch.ones(nnz)), atol=1e-5)

        pop = torch.tensor(data.draw(st.lists(st.integers(-2, 40), min_size=6, max_size=6)),
                           dtype=data.draw(st.sampled_from([torch.int32, torch.int64]))).view(2, 3)
        other = pop[:, : data.draw(st.integers(1, 3))].contiguous()
        nc = data.draw(st.integers(-1, 45))
        for call in (lambda: O.agreement_modal_labels(pop, nc), lambda: O.agreement_cie_scores(pop, other, nc),
                     lambda: O.agreement_pair_counts(pop, other[0].contiguous(), data.draw(st.integers(-2, 65)), nc)):
            try:
                call()
            except (ValueError, RuntimeError):
                pass
        offs = sorted(data.draw(st.lists(st.integers(-2, 12), min_size=1, max_size=4)))
        try:
            O.cka_batch_terms(torch.randn(3, 8), torch.randn(3, 5), offs, [0, 5])
        except (ValueError, RuntimeError):
            pass

    fuzz()
    print(json.dumps({"ok": True}))


def test_registered_ops_survive_random_arguments():
    examples = settings().max_examples
    code = ("import runpy, sys; sys.path.insert(0, 'tests'); "
            "ns = runpy.run_path('tests/test_properties.py'); ns['_fuzz_registered_ops']()")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "MINIDIFF_FUZZ_EXAMPLES": str(examples)})
    assert proc.returncode == 0, f"child failed with return code {proc.returncode}:\n{proc.stderr[-3000:]}"
    assert '{"ok": true}' in proc.stdout


# ---- more metrics ----------------------------------------------------------------------------
@st.composite
def prob_rows(draw, max_m=30, max_c=6):
    m, c = draw(st.integers(1, max_m)), draw(st.integers(1, max_c))
    raw = draw(hnp.arrays(np.float64, (m, c), elements=POSITIVE))
    sums = raw.sum(1, keepdims=True)
    assume(np.all(np.isfinite(sums)) and np.all(sums > 0))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    p = (raw / sums).astype(dtype)
    assume(np.all(np.abs(p.astype(np.float64).sum(1) - 1) <= 1e-3))
    y = draw(hnp.arrays(np.int64, (m,), elements=st.integers(0, c - 1)))
    return p, y


@given(data=st.data(), py=prob_rows(), n_bins=st.integers(1, 20))
def test_calibration_and_entropy_equal_the_reference(data, py, n_bins):
    p, y = py
    p64 = p.astype(np.float64)
    conf, pred = p64.max(1), p64.argmax(1)
    b = np.clip(np.ceil(conf * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    ece = sum(abs((pred[b == i] == y[b == i]).sum() - conf[b == i].sum()) for i in range(n_bins)) / len(y)
    onehot = np.eye(p.shape[1])[y]
    cal = M.calibration(data.draw(layouts(p)), y, n_bins=n_bins)
    assert cal.ece == pytest.approx(ece, rel=1e-12, abs=1e-15)
    assert cal.brier == pytest.approx(((p64 - onehot) ** 2).sum(1).mean(), rel=1e-12, abs=1e-15)
    from scipy.special import entr

    np.testing.assert_allclose(M.entropy(p).numpy(), entr(p64).sum(1), rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(M.confidence(p).numpy(), conf)


@given(data=st.data(), pc=predictions(max_models=2))
def test_accuracy_and_churn_equal_the_reference(data, pc):
    p, y, c = pc
    b, v = p[0], p[-1]
    assert M.accuracy(data.draw(layouts(b)), y) == (b == y).mean()
    assert M.churn(b, data.draw(layouts(v))) == (b != v).mean()
    f = M.flips(b, v, y)
    assert f.to_dict()  # JSON-ready
    ci = M.accuracy_ci(b, y, n_boot=100, seed=0)
    assert ci.accuracy == (b == y).mean() and 0 <= ci.low <= ci.high <= 1


@given(bad=st.sampled_from([0, -3, 2.5, True, "15", np.float64(3.0)]))
def test_integer_arguments_reject_non_integers(bad):
    p = np.full((4, 2), 0.5)
    y = np.zeros(4, dtype=np.int64)
    _raises_with_message(lambda: M.calibration(p, y, n_bins=bad))
    _raises_with_message(lambda: M.bootstrap_mean_ci([1.0, 2.0], n_boot=bad))
