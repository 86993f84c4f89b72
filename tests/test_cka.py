"""CKA engine: estimators against float64 definitions, streaming, merge, ops, bad input."""

import io
import math
import warnings

import numpy as np
import pytest
import torch

import minidiff
from minidiff.similarity import accumulator as acc_module
from minidiff.similarity import functional
from minidiff.ops import cka as ops
from minidiff.similarity import CKAAccumulator, cka, cka_matrix


def _kornblith():
    np.random.seed(1337)
    x = np.random.randn(100, 10)
    y = np.random.randn(100, 10) + x
    return x, y


def _related(n=600, widths_a=(12, 20, 8), widths_b=(15, 9), dtype=torch.float32, mean=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 6, generator=g, dtype=torch.float64)
    fa = [(base @ torch.randn(6, w, generator=g, dtype=torch.float64)
           + 0.7 * torch.randn(n, w, generator=g, dtype=torch.float64) + mean).to(dtype) for w in widths_a]
    fb = [(base @ torch.randn(6, w, generator=g, dtype=torch.float64)
           + torch.randn(n, w, generator=g, dtype=torch.float64) - mean).to(dtype) for w in widths_b]
    return fa, fb


def _reference_matrix(fa, fb, estimator, kernel="linear", threshold=1.0):
    """ops.cka_reference for every pair, with each layer's Gram and self-HSIC computed once."""
    gram = ops.gram_linear if kernel == "linear" else (lambda z: ops.gram_rbf(z, threshold))
    ka, kb = [gram(x) for x in fa], [gram(y) for y in fb]
    sa = [ops.hsic_reference(k, k, estimator) for k in ka]
    sb = [ops.hsic_reference(k, k, estimator) for k in kb]
    return torch.tensor([[float(ops.hsic_reference(k, m, estimator) / torch.sqrt(u * v))
                          for m, v in zip(kb, sb)] for k, u in zip(ka, sa)], dtype=torch.float64)


def test_reference_helper_is_the_definition():
    fa, fb = _related(n=40, dtype=torch.float64)
    for est in ("biased", "unbiased"):
        assert _reference_matrix(fa, fb, est)[2, 1] == pytest.approx(
            ops.cka_reference(fa[2], fb[1], "linear", est), abs=1e-14)


def _stream(acc, fa, fb, sizes):
    i = 0
    for s in sizes:
        acc.update([f[i:i + s] for f in fa], None if fb is None else [f[i:i + s] for f in fb])
        i += s
    return acc


# -- reference values and definitions ------------------------------------------------------
def test_kornblith_reference_values():
    x, y = _kornblith()
    assert abs(cka(x, y) - 0.55761) < 5e-6
    assert abs(cka(x, y, estimator="unbiased") - 0.51346) < 5e-6
    assert abs(cka(x, y, kernel="rbf", threshold=0.5) - 0.65483) < 5e-6
    # and the float64 definitions (H-centring, U-centring) agree with the fast paths
    assert cka(x, y) == pytest.approx(ops.cka_reference(torch.tensor(x), torch.tensor(y)), abs=1e-12)
    assert cka(x, y, estimator="unbiased") == pytest.approx(
        ops.cka_reference(torch.tensor(x), torch.tensor(y), estimator="unbiased"), abs=1e-12)


@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_gram_form_equals_feature_form(monkeypatch, estimator):
    fa, fb = _related(n=120, dtype=torch.float64)
    monkeypatch.setattr(functional, "_gram_cost", lambda *a: 0.0)
    gram = cka_matrix(fa, fb, estimator=estimator)
    gram_self = cka_matrix(fa, estimator=estimator)
    monkeypatch.setattr(functional, "_gram_cost", lambda *a: math.inf)
    feat = cka_matrix(fa, fb, estimator=estimator)
    feat_self = cka_matrix(fa, estimator=estimator)
    ref = _reference_matrix(fa, fb, estimator)
    torch.testing.assert_close(gram, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(feat, ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(gram_self, feat_self, atol=1e-12, rtol=0)
    assert gram.shape == (3, 2) and gram_self.shape == (3, 3)


@pytest.mark.parametrize("kernel,estimator", [("linear", "biased"), ("linear", "unbiased"),
                                              ("rbf", "biased"), ("rbf", "unbiased")])
def test_self_similarity_is_one_and_symmetric(kernel, estimator):
    fa, fb = _related(n=80, dtype=torch.float64)
    x, y = fa[1], fb[0]
    assert cka(x, x, kernel=kernel, estimator=estimator) == pytest.approx(1.0, abs=1e-12)
    assert cka(x, y, kernel=kernel, estimator=estimator) == pytest.approx(
        cka(y, x, kernel=kernel, estimator=estimator), abs=1e-12)
    m = cka_matrix(fa, fb, kernel=kernel, estimator=estimator)
    torch.testing.assert_close(m, cka_matrix(fb, fa, kernel=kernel, estimator=estimator).T, atol=1e-12, rtol=0)
    torch.testing.assert_close(m, _reference_matrix(fa, fb, estimator, kernel), atol=1e-10, rtol=0)
    assert torch.diagonal(cka_matrix(fa, kernel=kernel, estimator=estimator)).sub(1).abs().max() < 1e-12


@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
def test_invariances(estimator):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(90, 12, generator=g, dtype=torch.float64)
    y = x[:, :7] @ torch.randn(7, 9, generator=g, dtype=torch.float64) + torch.randn(90, 9, generator=g,
                                                                                    dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
    base = cka(x, y, estimator=estimator)
    assert cka(x @ q, y, estimator=estimator) == pytest.approx(base, abs=1e-12)          # orthogonal
    assert cka(3.7 * x, 0.01 * y, estimator=estimator) == pytest.approx(base, abs=1e-12)  # isotropic scaling
    shift = torch.randn(12, generator=g, dtype=torch.float64) * 50
    assert cka(x + shift, y - 3, estimator=estimator) == pytest.approx(base, abs=1e-10)   # translation
    assert cka(x @ q, y, kernel="rbf", estimator=estimator) == pytest.approx(
        cka(x, y, kernel="rbf", estimator=estimator), abs=1e-12)
    # a general invertible (ill-conditioned) linear map changes CKA
    a = torch.diag(torch.logspace(0, 3, 12, dtype=torch.float64)) @ q
    assert abs(cka(x @ a, y, estimator=estimator) - base) > 0.05


def test_unbiased_near_zero_for_independent_wide_features():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 2000, generator=g, dtype=torch.float64)
    y = torch.randn(40, 2000, generator=g, dtype=torch.float64)
    biased, unbiased = cka(x, y), cka(x, y, estimator="unbiased")
    assert biased > 0.8                 # inflated by d >> n
    assert abs(unbiased) < 0.05
    assert unbiased == pytest.approx(ops.cka_reference(x, y, estimator="unbiased"), abs=1e-12)


def test_unbiased_can_be_negative_and_is_not_clamped():
    values = [cka(torch.randn(12, 3, dtype=torch.float64), torch.randn(12, 3, dtype=torch.float64),
                  estimator="unbiased") for _ in range(20)]
    assert min(values) < 0


# -- streaming -------------------------------------------------------------------------------
@pytest.mark.parametrize("estimator", ["biased", "unbiased"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_streaming_equals_full_data(estimator, dtype, monkeypatch):
    monkeypatch.setattr(acc_module, "FLUSH_SAMPLES", 200)  # exercise float32 partial-sum folding
    fa, fb = _related(n=500, dtype=dtype, mean=2.0)
    sizes = [128, 5, 200, 67, 100]
    acc = _stream(CKAAccumulator([12, 20, 8], [15, 9], estimator=estimator), fa, fb, sizes)
    assert acc.n == 500
    f64a, f64b = [f.double() for f in fa], [f.double() for f in fb]
    torch.testing.assert_close(acc.compute(), _reference_matrix(f64a, f64b, estimator), atol=1e-6, rtol=0)
    torch.testing.assert_close(acc.compute(), cka_matrix(fa, fb, estimator=estimator), atol=1e-6, rtol=0)
    self_acc = _stream(CKAAccumulator([12, 20, 8], estimator=estimator), fa, None, sizes)
    torch.testing.assert_close(self_acc.compute(), _reference_matrix(f64a, f64a, estimator), atol=1e-6, rtol=0)


def test_streaming_accepts_stacked_layers_and_numpy():
    fa, fb = _related(n=300)
    acc1 = _stream(CKAAccumulator([12, 20, 8], [15, 9]), fa, fb, [100, 200])
    acc2 = CKAAccumulator([12, 20, 8], [15, 9])
    acc2.update(torch.cat(fa, 1)[:100], torch.cat(fb, 1)[:100])
    acc2.update([f[100:].numpy() for f in fa], [f[100:].numpy() for f in fb])
    torch.testing.assert_close(acc1.compute(), acc2.compute(), atol=1e-12, rtol=0)


def test_large_mean_features_stay_exact():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4000, 32, generator=g, dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))
    xm, xq = (x + 1e3).float(), ((x + 1e3) @ q).float()
    acc = CKAAccumulator([32], [32])
    for i in range(0, 4000, 500):
        acc.update([xm[i:i + 500]], [xq[i:i + 500]])
    assert abs(acc.compute().item() - 1) < 1e-6
    assert abs(cka(xm, xq) - 1) < 1e-6
    assert abs(cka(xm, xq, estimator="unbiased") - 1) < 1e-6
    # why the shift matters: the same float32 accumulation without it is far off
    raw = CKAAccumulator([32], [32], shift_a=torch.zeros(32), shift_b=torch.zeros(32))
    for i in range(0, 4000, 500):
        raw.update([xm[i:i + 500]], [xq[i:i + 500]])
    assert not abs(raw.compute().item() - 1) < 1e-4   # far off, or NaN from a negative self-HSIC


@pytest.mark.parametrize("estimator", ["biased", "unbiased", "minibatch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_merge_equals_single_stream(estimator, dtype):
    # float64 checks the re-expression at another shift exactly; float32 to the
    # float32-GEMM rounding of differently shifted data
    tol = 1e-11 if dtype == torch.float64 else 1e-6
    fa, fb = _related(n=500, mean=5.0, dtype=dtype)
    whole = _stream(CKAAccumulator([12, 20, 8], [15, 9], estimator=estimator), fa, fb, [100, 100, 100, 200])
    left = _stream(CKAAccumulator([12, 20, 8], [15, 9], estimator=estimator), fa, fb, [100, 100])
    right = CKAAccumulator([12, 20, 8], [15, 9], estimator=estimator)
    right.update([f[200:300] for f in fa], [f[200:300] for f in fb])   # its own (different) shift
    right.update([f[300:] for f in fa], [f[300:] for f in fb])
    empty = CKAAccumulator([12, 20, 8], [15, 9], estimator=estimator)
    merged = empty.merge(left).merge(right)
    assert merged.n == 500
    torch.testing.assert_close(merged.compute(), whole.compute(), atol=tol, rtol=0)
    # the model-vs-itself form merges too
    s_whole = _stream(CKAAccumulator([12, 20, 8], estimator=estimator), fa, None, [250, 250])
    s_left = _stream(CKAAccumulator([12, 20, 8], estimator=estimator), fa[:], None, [250])
    s_right = CKAAccumulator([12, 20, 8], estimator=estimator)
    s_right.update([f[250:] for f in fa])
    torch.testing.assert_close(s_left.merge(s_right).compute(), s_whole.compute(), atol=tol, rtol=0)


def test_summed_states_need_a_common_shift():
    """What distributed sync does: add the declared states. Aligned shifts -> exact."""
    fa, fb = _related(n=400, mean=3.0, dtype=torch.float64)
    whole = _stream(CKAAccumulator([12, 20, 8], [15, 9]), fa, fb, [200, 200])
    r0 = _stream(CKAAccumulator([12, 20, 8], [15, 9]), fa, fb, [200])
    r1 = CKAAccumulator([12, 20, 8], [15, 9])
    r1.update([f[200:] for f in fa], [f[200:] for f in fb])
    assert set(r0.reductions.values()) == {"sum"}
    naive = CKAAccumulator([12, 20, 8], [15, 9])
    naive.load_state_dict(r0.state_dict())
    for name in naive.reductions:
        setattr(naive, name, getattr(r0, name) + getattr(r1, name))
    with pytest.raises(ValueError, match="different shifts"):
        naive.compute()
    r1.align_shift(r0.shift_a, r0.shift_b)
    for name in naive.reductions:
        setattr(naive, name, getattr(r0, name) + getattr(r1, name))
    torch.testing.assert_close(naive.compute(), whole.compute(), atol=1e-9, rtol=0)


@pytest.mark.parametrize("estimator", ["unbiased", "minibatch"])
def test_state_dict_round_trip(estimator):
    fa, fb = _related(n=300)
    acc = _stream(CKAAccumulator([12, 20, 8], [15, 9], estimator=estimator), fa, fb, [150])
    buf = io.BytesIO()
    torch.save(acc.state_dict(), buf)
    buf.seek(0)
    again = CKAAccumulator([12, 20, 8], [15, 9], estimator=estimator)
    again.load_state_dict(torch.load(buf))
    for a in (acc, again):
        a.update([f[150:] for f in fa], [f[150:] for f in fb])
    torch.testing.assert_close(again.compute(), acc.compute(), atol=0, rtol=0)
    with pytest.raises(ValueError):
        CKAAccumulator([12, 20], [15, 9], estimator=estimator).load_state_dict(acc.state_dict())


def _minibatch_reference(fa, fb, size):
    n = fa[0].shape[0]
    hab = torch.zeros(len(fa), len(fb), dtype=torch.float64)
    haa, hbb = torch.zeros(len(fa), dtype=torch.float64), torch.zeros(len(fb), dtype=torch.float64)
    for i in range(0, n, size):
        ka = [ops.gram_linear(f[i:i + size]) for f in fa]
        kb = [ops.gram_linear(f[i:i + size]) for f in fb]
        f64 = dict(dtype=torch.float64)
        hab += torch.tensor([[float(ops.hsic_reference(k, m, "unbiased")) for m in kb] for k in ka], **f64)
        haa += torch.tensor([float(ops.hsic_reference(k, k, "unbiased")) for k in ka], **f64)
        hbb += torch.tensor([float(ops.hsic_reference(m, m, "unbiased")) for m in kb], **f64)
    return hab / torch.sqrt(haa[:, None] * hbb[None, :])


@pytest.mark.parametrize("size", [20, 100])  # Gram form (b < d) and feature form (b > d) per batch
def test_minibatch_estimator(size):
    fa, fb = _related(n=200, dtype=torch.float64)
    acc = _stream(CKAAccumulator([12, 20, 8], [15, 9], estimator="minibatch"), fa, fb, [size] * (200 // size))
    torch.testing.assert_close(acc.compute(), _minibatch_reference(fa, fb, size), atol=1e-9, rtol=0)
    exact = cka_matrix(fa, fb)
    if size == 20:  # it depends on the batch size; the exact estimator does not
        assert (acc.compute() - exact).abs().max() > 1e-3
    same = _stream(CKAAccumulator([12, 20, 8], estimator="minibatch"), fa, None, [size] * (200 // size))
    torch.testing.assert_close(same.compute(), _minibatch_reference(fa, fa, size), atol=1e-9, rtol=0)


# -- the op: _C, Triton (interpreter), reference, torch.compile ----------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(70, [0, 10, 25, 40], [0, 33]), (5, [0, 3], [0, 1, 2, 9]),
                                   (33, [0, 64, 96], [0, 40, 80])])
def test_batch_terms_backends_match_reference(dtype, shape):
    b, ox, oy = shape
    g = torch.Generator().manual_seed(b)
    x = torch.randn(b, ox[-1], generator=g).to(dtype)
    y = torch.randn(b, oy[-1], generator=g).to(dtype) + 2
    ref = ops.batch_terms(x, y, ox, oy, backend="reference")
    for backend in ("native", "auto", "triton"):
        got = ops.batch_terms(x, y, ox, oy, backend=backend)
        for name, gv, rv in zip(ops.TERMS, got, ref):
            assert gv.dtype == torch.float64 and gv.shape == rv.shape, (backend, name)
            torch.testing.assert_close(gv, rv, rtol=1e-12, atol=1e-9, msg=f"{backend} {name}")


@pytest.mark.parametrize("level", ["scalar", "avx2"])
def test_batch_terms_every_simd_level(monkeypatch, level):
    from minidiff._native import cpu_core

    monkeypatch.setenv("MINIDIFF_SIMD", level)
    assert cpu_core().simd_level() in {level, "scalar"}
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(37, 50, generator=g), torch.randn(37, 21, generator=g)
    ref = ops.batch_terms(x, y, [0, 17, 50], [0, 21], backend="reference")
    for gv, rv in zip(ops.batch_terms(x, y, [0, 17, 50], [0, 21], backend="native"), ref):
        torch.testing.assert_close(gv, rv, rtol=1e-12, atol=1e-9)


def test_batch_terms_multithreaded_matches(monkeypatch):
    monkeypatch.setattr(ops, "num_threads", lambda: 3)
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(1000, 24, generator=g), torch.randn(1000, 16, generator=g)
    ref = ops.batch_terms(x, y, [0, 8, 24], [0, 16], backend="reference")
    for gv, rv in zip(ops.batch_terms(x, y, [0, 8, 24], [0, 16], backend="native"), ref):
        torch.testing.assert_close(gv, rv, rtol=1e-11, atol=1e-8)


def test_op_traces_under_torch_compile():
    x, y = torch.randn(16, 12), torch.randn(16, 5)

    def f(a, b):
        return torch.ops.minidiff.cka_batch_terms(a, b, [0, 4, 12], [0, 5]).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    assert compiled(x, y).item() == pytest.approx(f(x, y).item(), rel=1e-12)


def test_batch_terms_rejects_bad_input():
    x = torch.randn(8, 6)
    with pytest.raises(ValueError, match="layer boundaries"):
        ops.batch_terms(x, x, [0, 4], [0, 6])
    with pytest.raises(ValueError, match="same number of rows"):
        ops.batch_terms(x, torch.randn(7, 6), [0, 6], [0, 6])
    with pytest.raises(ValueError, match="dtype"):
        ops.batch_terms(x.half(), x.half(), [0, 6], [0, 6])
    with pytest.raises(ValueError, match="unknown backend"):
        ops.batch_terms(x, x, [0, 6], [0, 6], backend="gpu")


# -- bad input ---------------------------------------------------------------------------------
def test_bad_input_messages():
    x = torch.randn(20, 5)
    with pytest.raises(ValueError, match="same examples"):
        cka(x, torch.randn(19, 5))
    with pytest.raises(ValueError, match="same examples"):
        cka_matrix([x, torch.randn(21, 3)])
    with pytest.raises(ValueError, match="at least 4 samples"):
        cka(x[:3], x[:3], estimator="unbiased")
    with pytest.raises(ValueError, match="dtype int64"):
        cka(torch.arange(20).reshape(10, 2), x[:10])
    with pytest.raises(ValueError, match="floating-point"):
        cka_matrix([np.ones((10, 2), dtype=bool)])
    with pytest.raises(ValueError, match="shape"):
        cka(torch.randn(20), x)
    with pytest.raises(ValueError, match="kernel"):
        cka(x, x, kernel="poly")
    with pytest.raises(ValueError, match="threshold"):
        cka(x, x, kernel="rbf", threshold=-1)
    with pytest.raises(ValueError, match="list"):
        cka_matrix(x)
    bad = x.clone()
    bad[3, 1], bad[7, 2], bad[9, 0] = float("nan"), float("inf"), -float("inf")
    with pytest.raises(ValueError, match=r"layer b\[1\] contains 3 non-finite"):
        cka_matrix([x], [x, bad])


def test_accumulator_bad_input():
    acc = CKAAccumulator([5, 3], [4], names_a=["enc.0", "enc.1"], names_b=["student.0"])
    good_a, good_b = [torch.randn(10, 5), torch.randn(10, 3)], [torch.randn(10, 4)]
    with pytest.raises(ValueError, match="width 4 but the accumulator expects 3"):
        acc.update([good_a[0], torch.randn(10, 4)], good_b)
    with pytest.raises(ValueError, match="has 1 layers"):
        acc.update(good_a[:1], good_b)
    with pytest.raises(ValueError, match="same examples"):
        acc.update(good_a, [torch.randn(9, 4)])
    with pytest.raises(ValueError, match="batch_b is required"):
        acc.update(good_a)
    bad = good_a[1].clone()
    bad[0, 0], bad[4, 2] = float("nan"), float("inf")
    with pytest.raises(ValueError, match=r"layer enc\.1 contains 2 non-finite"):
        acc.update([good_a[0], bad], good_b)
    assert acc.n == 0 and acc.shift_a is None   # nothing half-applied
    with pytest.raises(ValueError, match=r"layer enc\.1 contains 2 non-finite"):
        acc.update(torch.cat([good_a[0], bad], 1), good_b)
    with pytest.raises(ValueError, match="dtype int32"):
        acc.update([torch.ones(10, 5, dtype=torch.int32), good_a[1]], good_b)
    acc.update([t[:3] for t in good_a], [t[:3] for t in good_b])
    with pytest.raises(ValueError, match="at least 4 samples"):
        acc.compute()
    with pytest.raises(ValueError, match="only batch_a"):
        CKAAccumulator([5]).update([good_a[0]], [good_a[0]])
    with pytest.raises(ValueError, match="estimator"):
        CKAAccumulator([5], estimator="exact")
    with pytest.raises(ValueError, match="positive layer widths"):
        CKAAccumulator([5, 0])
    with pytest.raises(ValueError, match="at least 4 samples"):
        CKAAccumulator([5], estimator="minibatch").update([torch.randn(3, 5)])
    with pytest.raises(ValueError, match="different settings"):
        CKAAccumulator([5]).merge(CKAAccumulator([6]))


def test_zero_variance_gives_nan_and_names_the_layer():
    g = torch.Generator().manual_seed(9)
    x = torch.randn(50, 4, generator=g)
    const = torch.full((50, 3), 2.5)
    with pytest.warns(RuntimeWarning, match=r"y have zero variance"):
        assert math.isnan(cka(x, const))
    with pytest.warns(RuntimeWarning, match=r"dead have zero variance"):
        m = cka_matrix([x, const], [x], names_a=["live", "dead"], kernel="rbf")
    assert math.isnan(m[1, 0]) and m[0, 0] == pytest.approx(1.0)
    for estimator in ("unbiased", "biased", "minibatch"):
        acc = CKAAccumulator([4, 3], [4], estimator=estimator, names_a=["live", "dead"])
        for i in range(0, 50, 25):
            acc.update([x[i:i + 25], const[i:i + 25]], [x[i:i + 25]])
        with pytest.warns(RuntimeWarning, match="dead"):
            m = acc.compute()
        assert math.isnan(m[1, 0]) and m[0, 0] == pytest.approx(1.0, abs=1e-6), estimator
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cka(x, x + 1)   # no warning for healthy layers


def test_public_exports():
    assert minidiff.cka is cka and minidiff.cka_matrix is cka_matrix and minidiff.CKAAccumulator is CKAAccumulator
    assert issubclass(CKAAccumulator, minidiff.Accumulator)


def test_reset_and_reuse():
    fa, fb = _related(n=200)
    acc = _stream(CKAAccumulator([12, 20, 8], [15, 9]), fa, fb, [100])
    acc.reset()
    assert acc.n == 0
    _stream(acc, fa, fb, [120, 80])
    torch.testing.assert_close(acc.compute(), cka_matrix(fa, fb), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_streaming_equal_widths_batched_path(dtype):
    fa, fb = _related(n=300, widths_a=(8, 8, 8), widths_b=(6, 6), dtype=dtype, mean=1.0)
    acc = _stream(CKAAccumulator([8, 8, 8], [6, 6]), fa, fb, [100, 150, 50])
    ref = _reference_matrix([f.double() for f in fa], [f.double() for f in fb], "unbiased")
    torch.testing.assert_close(acc.compute(), ref, atol=1e-6, rtol=0)


# -- upper-block-triangle self Grams (minidiff.ops.selfgram) ---------------------------------
def test_selfgram_blocks_cover_every_width():
    from minidiff.ops import selfgram

    for d in (1, 5, 64, 288, 290, 384, 500, 768, 1000, 4096):
        e = selfgram.block_edges(d)
        assert e[0] == 0 and e[-1] == d and all(a < b for a, b in zip(e, e[1:]))
        assert len(e) - 1 <= selfgram.MAX_BLOCKS
    assert selfgram.block_edges(128) == [0, 128]          # narrow layers: one full GEMM
    assert len(selfgram.block_edges(768)) - 1 == 4
    assert selfgram.runs([7, 7, 3, 7, 7, 7]) == [(0, 2, 7), (2, 1, 3), (3, 3, 7)]
    # about half of sum d^2: (k + 1) / (2k) of it
    assert selfgram.pending_numel([768] * 13) == 13 * (768 ** 2 + 4 * 192 ** 2) // 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_selfgram_equals_float64_grams(dtype):
    """Upper blocks added over several batches, mirrored on folding: every X_l^T X_l
    exactly as the float64 reference, for runs of equal widths, uneven blocks and
    narrow layers, including a strided (column-sliced) batch."""
    from minidiff.ops.selfgram import SelfGrams

    dims = [500, 500, 64, 384, 290, 290, 290]
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(b, sum(dims), generator=g, dtype=torch.float64) for b in (40, 1, 77)]
    grams = SelfGrams(dims, dtype, torch.device("cpu"))
    flat = torch.zeros(sum(d * d for d in dims), dtype=torch.float64)
    for i, z in enumerate(batches):
        wide = torch.cat([z, z[:, :3]], 1).to(dtype)[:, :sum(dims)]   # row stride != width
        grams.add(wide)
        if i == 1:
            grams.fold_into(flat)
    grams.fold_into(flat)
    assert not grams.buffer.any()
    z = torch.cat(batches)
    o, c = 0, 0
    tol = 1e-12 if dtype == torch.float64 else 2e-4
    for d in dims:
        x = z[:, c:c + d]
        torch.testing.assert_close(flat[o:o + d * d].view(d, d), x.T @ x, atol=tol * z.shape[0], rtol=tol)
        o, c = o + d * d, c + d


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_streaming_wide_layers_equals_full_data(dtype, monkeypatch):
    """Widths where the self Grams are split into blocks (k = 2..4), in equal-width runs
    and alone, across a fold of the partial sums."""
    monkeypatch.setattr(acc_module, "FLUSH_SAMPLES", 150)
    widths_a, widths_b = (384, 384, 500, 64), (768, 290)
    fa, fb = _related(n=300, widths_a=widths_a, widths_b=widths_b, dtype=dtype, mean=2.0)
    for estimator in ("unbiased", "biased"):
        acc = _stream(CKAAccumulator(widths_a, widths_b, estimator=estimator), fa, fb, [100, 120, 80])
        ref = _reference_matrix([f.double() for f in fa], [f.double() for f in fb], estimator)
        torch.testing.assert_close(acc.compute(), ref, atol=1e-6, rtol=0)
        # a model with itself: Z^T Z as its upper block triangle (7 blocks of the stacked 1332)
        ref_self = _reference_matrix([f.double() for f in fa], [f.double() for f in fa], estimator)
        self_acc = _stream(CKAAccumulator(widths_a, estimator=estimator), fa, None, [100, 120, 80])
        torch.testing.assert_close(self_acc.compute(), ref_self, atol=1e-6, rtol=0)
    # a batch of another dtype folds the partial sums first, then continues
    mixed = CKAAccumulator(widths_a, widths_b)
    mixed.update([f[:150].float() for f in fa], [f[:150].float() for f in fb])
    mixed.update([f[150:].double() for f in fa], [f[150:].double() for f in fb])
    ref = _reference_matrix([f.double() for f in fa], [f.double() for f in fb], "unbiased")
    torch.testing.assert_close(mixed.compute(), ref, atol=1e-6, rtol=0)


# -- numerical edge cases (regressions) ---------------------------------------------------------
def test_gram_form_large_mean_small_spread_is_not_constant(monkeypatch):
    """The Gram form judged a layer constant from its raw sum of squares; a mean of 1e6 with a
    spread of 1e-3 is a real signal (the feature form always said so)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    y = x @ torch.randn(6, 4, generator=g, dtype=torch.float64) + 0.3 * torch.randn(40, 4, generator=g,
                                                                                    dtype=torch.float64)
    shifted = 1e6 + 1e-3 * x
    monkeypatch.setattr(functional, "_gram_cost", lambda *a: 0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gram = cka(shifted, y)
    monkeypatch.setattr(functional, "_gram_cost", lambda *a: math.inf)
    # centring 1e6 + 1e-3 x in float64 keeps ~7 digits of x
    assert gram == pytest.approx(cka(shifted, y), abs=1e-6) and gram == pytest.approx(cka(x, y), abs=1e-6)
    with pytest.warns(RuntimeWarning, match="zero variance"):
        assert math.isnan(cka(torch.full((40, 3), 1e6, dtype=torch.float64), y))


@pytest.mark.parametrize("scale", [1e-100, 1e-30, 1e30, 1e100])
def test_extreme_feature_scales(scale, monkeypatch):
    """CKA is scale invariant: features at 1e-100 .. 1e100 give the same numbers, in both forms
    and for the RBF kernel (the layers are rescaled by exact powers of two)."""
    x, y = (torch.tensor(v) for v in _kornblith())
    for cost in (0.0, math.inf):
        monkeypatch.setattr(functional, "_gram_cost", lambda *a, c=cost: c)
        assert cka(x * scale, y) == pytest.approx(0.55761, abs=5e-6)
        assert cka(x * scale, y / scale, estimator="unbiased") == pytest.approx(0.51346, abs=5e-6)
    assert cka(x * scale, y, kernel="rbf", threshold=0.5) == pytest.approx(0.65483, abs=5e-6)
    if scale in (1e-30, 1e30):  # float32 features at the edge of float32's range
        assert cka((x * scale).float(), y.float()) == pytest.approx(0.55761, abs=5e-6)
    # the streaming accumulator does not rescale: an extreme scale is refused, never a wrong number
    acc = CKAAccumulator([10], [10])
    if scale in (1e-100, 1e100):
        with pytest.raises(ValueError, match="power of two"):
            acc.update([x * scale], [y])
            acc.compute()


def test_float32_streaming_bound():
    """float32 features streamed in batches against the float64 stream: within the README's
    1e-6 at n = 8k, with transformer-like outlier dimensions (mean 200, 60x spread)."""
    g = torch.Generator().manual_seed(1)
    n = 8192
    base = torch.randn(n, 16, generator=g)

    def layer(f):
        x = f(base) @ torch.randn(16, 96, generator=g) + 0.5 * torch.randn(n, 96, generator=g)
        x[:, :4] = x[:, :4] * 60 + 200
        return x

    fa, fb = [layer(lambda b: b) for _ in range(2)], [layer(torch.tanh) for _ in range(2)]
    a32, a64 = CKAAccumulator([96] * 2, [96] * 2), CKAAccumulator([96] * 2, [96] * 2)
    for s in range(0, n, 2048):
        a32.update([t[s:s + 2048] for t in fa], [t[s:s + 2048] for t in fb])
        a64.update([t[s:s + 2048].double() for t in fa], [t[s:s + 2048].double() for t in fb])
    assert float((a32.compute() - a64.compute()).abs().max()) < 1e-6


def test_rbf_with_mostly_identical_samples_warns():
    g = torch.Generator().manual_seed(2)
    x = torch.zeros(20, 3, dtype=torch.float64)
    x[:4] = torch.randn(4, 3, generator=g, dtype=torch.float64)  # 16 of 20 rows identical
    y = torch.randn(20, 2, generator=g, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="median squared pairwise distance is 0"):
        got = cka_matrix([x, y], [y], kernel="rbf")
    assert math.isnan(float(got[0, 0])) and float(got[1, 0]) == pytest.approx(1.0, abs=1e-12)


def test_huge_accumulator_is_refused_with_the_memory_formula():
    with pytest.raises(ValueError, match=r"need .*TiB .*8 \* \(D_a \* D_b \+ sum d_a\^2 \+ sum d_b\^2\)"):
        CKAAccumulator([10 ** 6], [10 ** 6])
    with pytest.raises(ValueError, match=r"8 \* D\^2"):
        CKAAccumulator([10 ** 6])
