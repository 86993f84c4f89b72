"""Prediction agreement engine: hand-computed cases, every backend against the
int64/float64 references (exact for counts), streaming, and bad input."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import minidiff
from minidiff._native import cpu_core
from minidiff.agreement import AgreementAccumulator
from minidiff.ops import agreement as ops

# Three models, four examples; worked by hand:
#   model 0 right on {0, 1, 2}, model 1 on {0, 1}, model 2 on {2}.
P = np.array([[0, 1, 2, 1],
              [0, 1, 1, 1],
              [2, 2, 2, 1]])
Y = np.array([0, 1, 2, 0])


# ---- hand-computed cases ------------------------------------------------------------
def test_disagreement_hand():
    d = minidiff.disagreement_matrix(P)
    expected = torch.tensor([[0, 1, 2], [1, 0, 3], [2, 3, 0]], dtype=torch.float64) / 4
    assert d.dtype == torch.float64
    assert torch.equal(d, expected)


def test_flips_hand():
    f = minidiff.flip_matrix(P, Y)
    assert f.shape == (3, 3, 2)
    right_wrong = torch.tensor([[0, 1, 2], [0, 0, 2], [0, 1, 0]], dtype=torch.float64) / 4
    assert torch.equal(f[..., 0], right_wrong)
    assert torch.equal(f[..., 1], right_wrong.T)
    acc = torch.tensor([3, 2, 1], dtype=torch.float64) / 4
    assert torch.allclose(f[..., 1] - f[..., 0], acc[None, :] - acc[:, None])


def test_error_jaccard_hand():
    # E0 = {3}, E1 = {2, 3}, E2 = {0, 1, 3}
    j = minidiff.error_jaccard(P, Y)
    expected = torch.tensor([[1, 1 / 2, 1 / 3], [1 / 2, 1, 1 / 4], [1 / 3, 1 / 4, 1]], dtype=torch.float64)
    assert torch.allclose(j, expected, rtol=0, atol=1e-15)


def test_error_jaccard_both_perfect_is_one():
    y = np.array([3, 1, 4, 1, 5])
    preds = np.stack([y, y, np.array([3, 1, 4, 1, 0])])
    j = minidiff.error_jaccard(preds, y)
    assert j[0, 1] == 1.0 and j[1, 0] == 1.0
    assert j[0, 2] == 0.0 and j[2, 2] == 1.0


def test_modal_pie_cie_hand():
    base = np.array([[0, 1, 2, 1, 0], [0, 1, 1, 1, 1], [2, 2, 2, 1, 2]])
    # example 4: 0, 1, 2 once each -> tie -> smallest label 0
    assert minidiff.modal_labels(base).tolist() == [0, 1, 2, 1, 0]
    comp = np.array([[0, 2, 1, 1, 2], [0, 2, 1, 1, 2]])
    assert minidiff.modal_labels(comp).tolist() == [0, 2, 1, 1, 2]
    assert minidiff.pie_mask(base, comp).tolist() == [False, True, True, False, True]
    s = minidiff.cie_scores(base, comp, 3)
    # ex0: base (2/3, 0, 1/3) vs (1, 0, 0) -> 1/3 + 1/3; ex1: (0, 2/3, 1/3) vs (0, 0, 1) -> 4/3
    # ex2: (0, 1/3, 2/3) vs (0, 1, 0) -> 4/3; ex3: equal; ex4: (1/3, 1/3, 1/3) vs (0, 0, 1) -> 4/3
    expected = torch.tensor([2 / 3, 4 / 3, 4 / 3, 0, 4 / 3], dtype=torch.float64)
    assert torch.allclose(s, expected, rtol=0, atol=1e-15)
    # a single model is a population of one
    assert minidiff.modal_labels(np.array([4, 0, 2])).tolist() == [4, 0, 2]


def test_divergences_hand():
    probs = torch.tensor([[[1.0, 0.0]], [[0.5, 0.5]]], dtype=torch.float64)
    kl = minidiff.divergence_matrix(probs, "kl")
    eps = 1e-12

    def phi(x, y):  # the per-class KL term x log(x/y) - x + y on floored probabilities
        return x * math.log(x / y) - x + y

    assert kl[0, 1].item() == pytest.approx(phi(1, 0.5) + phi(eps, 0.5), rel=1e-15)
    assert kl[0, 1].item() == pytest.approx(math.log(2), abs=1e-10)
    assert kl[1, 0].item() == pytest.approx(phi(0.5, 1) + phi(0.5, eps), rel=1e-14)
    assert kl[1, 0].item() == pytest.approx(0.5 * math.log(0.5) + 0.5 * math.log(0.5 / eps), rel=1e-12)
    assert kl[0, 0] == 0 and kl[1, 1] == 0
    js = minidiff.divergence_matrix(probs, "js")
    expected_js = (math.log(1 / 0.75) + 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)) / 2
    assert js[0, 1].item() == pytest.approx(expected_js, abs=1e-15)
    assert js[1, 0] == js[0, 1]
    assert minidiff.divergence_matrix(probs, "tv")[0, 1].item() == pytest.approx(0.5, abs=1e-15)
    # the floor is stated: a larger eps gives a smaller penalty
    assert minidiff.divergence_matrix(probs, "kl", eps=1e-3)[1, 0] < kl[1, 0]
    rows = minidiff.divergence_to_reference(probs, ref=1, kind="kl")
    assert rows.shape == (2, 1) and rows[1, 0] == 0
    assert rows[0, 0].item() == pytest.approx(kl[1, 0].item(), rel=1e-14)


# ---- native core vs reference (exact) -------------------------------------------------
CASES = [(1, 1, 2), (2, 63, 3), (3, 64, 2), (5, 65, 10), (7, 1000, 1000), (65, 777, 10),
         (4, 5000, 2**20), (9, 40_000, 7)]


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("n,m,c", CASES)
def test_native_pair_counts_exact(dtype, n, m, c):
    g = torch.Generator().manual_seed(n * 1000 + m)
    preds = torch.randint(0, c, (n, m), generator=g, dtype=dtype)
    if n > 2:  # make some rows agree a lot, so counts are not all near-uniform
        preds[1, : m // 2] = preds[0, : m // 2]
    labels = torch.randint(0, c, (m,), generator=g, dtype=dtype)
    labels[: m // 3] = preds[0, : m // 3]
    ref_d, ref_r = ops.pair_counts_reference(preds, labels)
    nbits = max(1, (c - 1).bit_length())
    for path in ("auto", "popcnt", "portable"):
        for bits in (nbits, -1):  # fixed planes, and planes from each block's max
            d = torch.empty(n, n, dtype=torch.int64)
            r = torch.empty(n, n, dtype=torch.int64)
            lo, hi = cpu_core().agreement_pair_counts(
                preds.data_ptr(), labels.data_ptr(), dtype == torch.int64, n, m, bits, c - 1,
                d.data_ptr(), r.data_ptr(), 2, path)
            assert (lo, hi) == (int(preds.min()), int(preds.max()))
            assert torch.equal(d, ref_d), (path, bits)
            assert torch.equal(r, ref_r), (path, bits)
        # nbits = 0: only the both-right counts (what flips and error sets need)
        cpu_core().agreement_pair_counts(preds.data_ptr(), labels.data_ptr(), dtype == torch.int64,
                                         n, m, 0, c - 1, d.data_ptr(), r.data_ptr(), 2, path)
        assert torch.equal(r, ref_r) and not d.any(), path
    d, r = ops.pair_counts(preds, None)
    assert torch.equal(d, ref_d) and torch.equal(r, torch.zeros_like(r))


def test_native_large_class_indices():
    # int64 ids up to 2**40 (no num_classes): 41 bit-planes, per block
    g = torch.Generator().manual_seed(9)
    preds = torch.randint(0, 2**40, (6, 3000), generator=g, dtype=torch.int64)
    preds[1, ::2] = preds[0, ::2]
    labels = preds[2].clone()
    ref_d, ref_r = ops.pair_counts_reference(preds, labels)
    d, r = ops.pair_counts(preds, labels, backend="native")
    assert torch.equal(d, ref_d) and torch.equal(r, ref_r)
    p32 = torch.randint(2**30, 2**31 - 1, (4, 999), generator=g, dtype=torch.int32)
    p32[3, 5] = 2**31 - 1
    assert torch.equal(ops.pair_counts(p32, backend="native")[0], ops.pair_counts_reference(p32)[0])


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("numel", [1, 7, 17, 3_000_001])
def test_native_minmax(dtype, numel):
    t = torch.randint(-1000, 1000, (numel,), dtype=dtype)
    t[numel // 2] = torch.iinfo(dtype).max
    t[numel - 1] = torch.iinfo(dtype).min if numel > 1 else t[0]
    lo, hi = torch.aminmax(t)
    assert ops.minmax(t) == (int(lo), int(hi))


def test_simd_cap_selects_portable_kernel():
    code = "from minidiff import _C; print(_C.agreement_path())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"MINIDIFF_SIMD": "scalar", "PATH": ""}, check=True)
    assert out.stdout.strip() == "portable"
    assert cpu_core().agreement_path() in {"avx512_vpopcntdq", "popcnt", "portable"}


@pytest.mark.parametrize("k,m,c", [(1, 10, 3), (5, 3000, 10), (30, 700, 1000), (4, 257, 2)])
def test_native_populations_match_reference(k, m, c):
    g = torch.Generator().manual_seed(k + m)
    base = torch.randint(0, c, (k, m), generator=g, dtype=torch.int32)
    comp = torch.randint(0, c, (k + 2, m), generator=g, dtype=torch.int64)
    comp[:, : m // 2] = base[0, : m // 2].long()
    assert torch.equal(ops.modal_labels(base, c, backend="native"), ops.modal_labels_reference(base, c))
    for t in (base, comp):
        assert torch.equal(ops.label_histogram(t, c).long(), ops.label_histogram_reference(t, c))
    s = ops.cie_scores(base, comp, c, backend="native")
    assert torch.allclose(s, ops.cie_scores_reference(base, comp, c), rtol=0, atol=1e-14)
    # the integer Taxicab sum of the torch path is bit-identical to the native one
    assert torch.equal(s, ops.cie_scores(base, comp, c, backend="torch"))


# ---- Triton under the interpreter (exact) -----------------------------------------
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("n,m,c", [(1, 5, 2), (3, 100, 10), (33, 70, 4)])
def test_triton_pair_counts_exact(dtype, n, m, c):
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(7 * n + m)
    preds = torch.randint(0, c, (n, m), generator=g, dtype=dtype)
    labels = torch.randint(0, c, (m,), generator=g, dtype=dtype)
    ref_d, ref_r = ops.pair_counts_reference(preds, labels)
    d, r = ops.pair_counts(preds, labels, backend="triton")
    assert torch.equal(d, ref_d) and torch.equal(r, ref_r)
    d, _ = ops.pair_counts(preds, None, backend="triton")
    assert torch.equal(d, ref_d)
    d, r = ops.pair_counts(preds, labels, nbits=0, backend="triton")
    assert torch.equal(r, ref_r) and not d.any()


def test_triton_histogram_and_populations_exact():
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(3)
    base = torch.randint(0, 5, (6, 90), generator=g, dtype=torch.int32)
    comp = torch.randint(0, 5, (3, 90), generator=g, dtype=torch.int32)
    h = ops.label_histogram(base, 5, backend="triton")
    assert torch.equal(h.long(), ops.label_histogram_reference(base, 5))
    assert torch.equal(ops.modal_labels(base, 5, backend="triton"), ops.modal_labels_reference(base, 5))
    assert torch.equal(ops.cie_scores(base, comp, 5, backend="triton"),
                       ops.cie_scores(base, comp, 5, backend="native"))


# ---- divergences vs the literal float64 definition ---------------------------------------
@pytest.mark.parametrize("kind", ["kl", "js", "tv"])
def test_divergences_match_reference(kind):
    g = torch.Generator().manual_seed(11)
    probs = torch.softmax(3 * torch.randn(4, 50, 7, generator=g), -1).to(torch.float32)
    probs[2, :5] = 0
    probs[2, :5, 1] = 1  # exact zeros: 0 log 0 and the eps floor are exercised
    out = minidiff.divergence_matrix(probs, kind)
    rows = minidiff.divergence_to_reference(probs, ref=2, kind=kind)
    for i in range(4):
        for j in range(4):
            per_example = ops.divergence_reference(probs[i], probs[j], kind, 1e-12)
            assert out[i, j].item() == pytest.approx(per_example.mean().item(), rel=1e-10, abs=1e-13)
            if i == 2:
                assert torch.allclose(rows[j], per_example, rtol=1e-10, atol=1e-13)
    assert torch.all(out.diagonal() == 0)
    if kind != "kl":
        assert torch.equal(out, out.T)


def test_js_keeps_precision_for_nearly_equal_models():
    # JS(p, q) = (1/8) sum (p - q)^2 / p + O(delta^3): no cancellation at delta = 1e-7,
    # where S(p) - S(m) style formulas lose most digits.
    g = torch.Generator().manual_seed(5)
    p = torch.softmax(torch.randn(300, 10, generator=g, dtype=torch.float64), -1)
    q = p * (1 + 1e-7 * torch.randn(300, 10, generator=g, dtype=torch.float64))
    js = minidiff.divergence_matrix(torch.stack([p, q]), "js")[0, 1].item()
    approx = (((p - q) ** 2 / (p + q)).sum(-1) / 4).mean().item()
    assert js == pytest.approx(approx, rel=1e-5)


# ---- public API: numpy and torch inputs, fast paths agree -----------------------------------
def test_numpy_and_torch_inputs_agree():
    rng = np.random.default_rng(0)
    preds = rng.integers(0, 10, size=(6, 3000)).astype(np.int64)
    labels = rng.integers(0, 10, size=3000).astype(np.int16)
    for fn in (minidiff.flip_matrix, minidiff.error_jaccard):
        a = fn(preds, labels)
        b = fn(torch.from_numpy(preds).to(torch.int32), torch.from_numpy(labels))
        assert torch.equal(a, b)
    d = minidiff.disagreement_matrix(preds.astype(np.uint8))
    ref_d, ref_r = ops.pair_counts_reference(torch.from_numpy(preds), torch.from_numpy(labels))
    assert torch.equal(d, ref_d.double() / 3000)
    jac = minidiff.error_jaccard(preds, labels)
    right = ref_r.diagonal()
    inter = 3000 - right[:, None] - right[None, :] + ref_r
    assert torch.allclose(jac, inter.double() / (3000 - ref_r).double(), rtol=0, atol=1e-15)


def test_custom_ops_register_fake():
    preds = torch.randint(0, 4, (3, 20), dtype=torch.int32)
    labels = torch.randint(0, 4, (20,), dtype=torch.int32)
    torch.library.opcheck(torch.ops.minidiff.agreement_pair_counts.default, (preds, labels, -1, 4),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.minidiff.agreement_modal_labels.default, (preds, 4),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(torch.ops.minidiff.agreement_cie_scores.default, (preds, preds[:2].contiguous(), 4),
                          test_utils=("test_schema", "test_faketensor"))


# ---- real data: a linear classifier on scikit-learn's digits and compressed copies ------
def test_real_digits_models_all_backends_agree():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = np.hstack([x / 16.0, np.ones((len(x), 1))])
    w, *_ = np.linalg.lstsq(x, np.eye(10)[y], rcond=None)  # least-squares linear classifier
    pruned = np.where(np.abs(w) >= np.quantile(np.abs(w), 0.7), w, 0.0)  # 70 % magnitude pruning
    scale = np.abs(w).max() / 127
    quantized = np.round(w / scale).clip(-127, 127) * scale  # int8 per-tensor
    weights = [w, quantized, pruned, np.where(np.abs(w) >= np.quantile(np.abs(w), 0.9), w, 0.0)]
    logits = torch.tensor(np.stack([x @ v for v in weights]))
    preds = logits.argmax(-1)
    labels = torch.from_numpy(y)
    probs = torch.softmax(8 * logits, -1)
    ref_d, ref_r = ops.pair_counts_reference(preds, labels)
    for backend in ("native", "torch", "triton"):
        d, r = ops.pair_counts(preds.contiguous(), labels, backend=backend)
        assert torch.equal(d, ref_d) and torch.equal(r, ref_r), backend
    d = minidiff.disagreement_matrix(preds)
    assert 0 < d[0, 1] < d[0, 3] < 1  # int8 changes fewer answers than 90 % pruning
    f = minidiff.flip_matrix(preds, y)
    acc = (preds == labels).double().mean(1)
    assert torch.allclose(f[..., 1] - f[..., 0], acc[None, :] - acc[:, None], atol=1e-15)
    js = minidiff.divergence_matrix(probs, "js")
    for j in range(4):
        ref = ops.divergence_reference(probs[0], probs[j], "js", 1e-12).mean()
        assert js[0, j].item() == pytest.approx(ref.item(), rel=1e-10, abs=1e-15)
    # populations: the two mild variants vs the two strong ones
    base, comp = preds[:2].contiguous(), preds[2:].contiguous()
    assert torch.equal(minidiff.modal_labels(base), ops.modal_labels_reference(base, 10))
    assert torch.allclose(minidiff.cie_scores(base, comp, 10), ops.cie_scores_reference(base, comp, 10),
                          rtol=0, atol=1e-15)


def test_ops_trace_under_torch_compile():
    preds = torch.randint(0, 10, (3, 100), dtype=torch.int32)
    labels = torch.randint(0, 10, (100,), dtype=torch.int32)

    def churn_and_right(p, y):
        d, r = ops.pair_counts(p, y, num_classes=10)
        return d.to(torch.float64) / p.shape[1], r.diagonal(), ops.modal_labels(p, 10)

    d, right, modal = torch.compile(churn_and_right, backend="eager", fullgraph=True)(preds, labels)
    ref_d, ref_r = ops.pair_counts_reference(preds, labels)
    assert torch.equal(d, ref_d.double() / 100)
    assert torch.equal(right, ref_r.diagonal())
    assert torch.equal(modal, ops.modal_labels_reference(preds, 10))


# ---- streaming -------------------------------------------------------------------------
def _random(n=5, m=2000, c=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, c, (n, m), generator=g), torch.randint(0, c, (m,), generator=g)


def test_accumulator_streaming_equals_full():
    preds, labels = _random()
    acc = AgreementAccumulator(5, num_classes=10)
    for s in range(0, 2000, 300):
        acc.update(preds[:, s:s + 300], labels[s:s + 300].numpy())
    out = acc.compute()
    assert out["n"] == 2000
    assert torch.equal(out["disagreement"], minidiff.disagreement_matrix(preds))
    assert torch.equal(out["flips"], minidiff.flip_matrix(preds, labels))
    assert torch.equal(out["error_jaccard"], minidiff.error_jaccard(preds, labels))


def test_accumulator_merge_equals_single_stream():
    preds, labels = _random(seed=1)
    single, a, b = (AgreementAccumulator(5) for _ in range(3))
    for s in range(0, 2000, 500):
        single.update(preds[:, s:s + 500], labels[s:s + 500])
        (a if s < 1000 else b).update(preds[:, s:s + 500], labels[s:s + 500])
    merged = a.merge(b).compute()
    ref = single.compute()
    for key in ("disagreement", "flips", "error_jaccard"):
        assert torch.equal(merged[key], ref[key])
    c = AgreementAccumulator(5)
    c.load_state_dict(single.state_dict())
    assert torch.equal(c.compute()["flips"], ref["flips"])
    assert single.reductions == {k: "sum" for k in ("disagree", "right_wrong", "err_inter",
                                                     "err_union", "n", "n_labelled", "n_invalid")}


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_accumulator_deferred_checks(backend):
    """The GPU path: no per-batch range check; bad values counted and raised at compute()."""
    if backend == "triton":
        pytest.importorskip("triton")
    preds, labels = _random(n=3, m=200, seed=4)
    acc = AgreementAccumulator(3, num_classes=10, defer_checks=True)
    acc.backend = backend
    for s in range(0, 200, 64):
        acc.update(preds[:, s:s + 64], labels[s:s + 64].to(torch.int32))
    out = acc.compute()
    assert torch.equal(out["flips"], minidiff.flip_matrix(preds, labels))
    assert torch.equal(out["disagreement"], minidiff.disagreement_matrix(preds))
    bad = preds[:, :50].clone()
    bad[1, 7] = 10
    acc.update(bad, labels[:50].to(torch.int32))  # no error yet: checked lazily
    other = AgreementAccumulator(3, num_classes=10, defer_checks=True)
    other.backend = backend
    other.update(preds[:, :50], torch.full((50,), -1))
    with pytest.raises(ValueError, match=r"51 class index/indices passed to update\(\) were outside \[0, 10\)"):
        acc.merge(other).compute()


def test_accumulator_without_labels_and_mixing():
    preds, labels = _random(seed=2)
    acc = AgreementAccumulator(5)
    acc.update(preds[:, :100])
    out = acc.compute()
    assert out["flips"] is None and out["error_jaccard"] is None
    with pytest.raises(ValueError, match="labels with every batch or with none"):
        acc.update(preds[:, 100:200], labels[100:200])
    with pytest.raises(ValueError, match="num_models=5"):
        acc.update(preds[:3])
    with pytest.raises(ValueError, match="seen no examples"):
        AgreementAccumulator(2).compute()
    with pytest.raises(ValueError, match="different settings"):
        AgreementAccumulator(5).merge(AgreementAccumulator(5, num_classes=3))


# ---- bad input -------------------------------------------------------------------------
def test_bad_label_values_are_named():
    preds = np.zeros((2, 6), dtype=np.int64)
    labels = np.array([0, 1, 12, 3, 15, 2])
    with pytest.raises(ValueError, match=r"labels has 2 value\(s\) outside \[0, 10\) \(first: 12 at labels\[2\]\)"):
        minidiff.flip_matrix(preds, labels, num_classes=10)
    bad = preds.copy()
    bad[1, 4] = -3
    with pytest.raises(ValueError, match=r"preds has 1 value\(s\) outside \[0, inf\) \(first: -3 at preds\[1, 4\]\)"):
        minidiff.disagreement_matrix(bad)
    with pytest.raises(ValueError, match="outside"):
        minidiff.cie_scores(bad, preds, 10)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_out_of_range_found_inside_the_counting_pass(backend):
    preds = torch.randint(0, 10, (5, 20_000), dtype=torch.int32)
    preds[3, 17_001] = 10
    with pytest.raises(ValueError, match=r"preds has 1 value\(s\) outside \[0, 10\) \(first: 10 at preds\[3, 17001\]\)"):
        ops.pair_counts(preds, None, num_classes=10, backend=backend)
    preds[3, 17_001] = -1
    with pytest.raises(ValueError, match=r"first: -1 at preds\[3, 17001\]"):
        ops.pair_counts(preds, None, backend=backend)
    with pytest.raises(ValueError, match=r"first: -1 at preds\[3, 17001\]"):
        minidiff.flip_matrix(preds, torch.zeros(20_000, dtype=torch.int32))


def test_bad_shapes_and_dtypes():
    preds = np.zeros((2, 6), dtype=np.int64)
    with pytest.raises(ValueError, match="labels has 5 examples but preds has 6"):
        minidiff.error_jaccard(preds, np.zeros(5, dtype=np.int64))
    with pytest.raises(ValueError, match="2-D"):
        minidiff.disagreement_matrix(np.zeros(6, dtype=np.int64))
    with pytest.raises(ValueError, match="argmax"):
        minidiff.disagreement_matrix(np.zeros((2, 6), dtype=np.float32))
    with pytest.raises(ValueError, match="argmax"):
        minidiff.flip_matrix(preds, np.zeros(6, dtype=bool))
    with pytest.raises(ValueError, match="at least one model and one example"):
        minidiff.disagreement_matrix(np.zeros((2, 0), dtype=np.int64))
    with pytest.raises(ValueError, match="needs labels"):
        minidiff.flip_matrix(preds, None)
    with pytest.raises(ValueError, match="same examples"):
        minidiff.pie_mask(preds, np.zeros((3, 5), dtype=np.int64))
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        minidiff.cie_scores(preds, preds, 0)
    with pytest.raises(ValueError, match="backend"):
        ops.pair_counts(torch.zeros(2, 3, dtype=torch.int32), backend="gpu")


def test_bad_probabilities():
    good = torch.softmax(torch.randn(2, 4, 3), -1)
    with pytest.raises(ValueError, match=r"do not sum to 1.*softmax"):
        minidiff.divergence_matrix(good * 1.5)
    neg = good.clone()
    neg[0, 0, 0] = -0.1
    neg[0, 0, 1] += 0.1
    with pytest.raises(ValueError, match=r"1 negative entrie\(s\).*not logits"):
        minidiff.divergence_matrix(neg)
    nan = good.clone()
    nan[1, 2, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        minidiff.divergence_matrix(nan, "tv")
    with pytest.raises(ValueError, match="kind='l2'"):
        minidiff.divergence_matrix(good, "l2")
    with pytest.raises(ValueError, match="floating"):
        minidiff.divergence_matrix(torch.ones(2, 4, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="3-D"):
        minidiff.divergence_matrix(good[0])
    with pytest.raises(ValueError, match="ref must be a model index"):
        minidiff.divergence_to_reference(good, ref=2)
    with pytest.raises(ValueError, match="eps"):
        minidiff.divergence_matrix(good, "kl", eps=0.0)


# ---- GPU (skipped without CUDA) ---------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
def test_cuda_backends_match_reference(dtype):
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    # conftest sets TRITON_INTERPRET=1 unless the environment overrides it, so
    # the Triton kernel may run interpreted here: keep the shapes moderate.
    for n, m, c in [(1, 7, 2), (3, 1000, 10), (64, 20_011, 1000), (70, 5000, 3)]:
        preds = torch.randint(0, c, (n, m), device=dev, dtype=dtype, generator=g)
        labels = torch.randint(0, c, (m,), device=dev, dtype=dtype, generator=g)
        ref_d, ref_r = ops.pair_counts_reference(preds, labels)
        backends = ["triton", "auto"]
        if ops.cuda_core() is not None:
            backends.append("cuda")
        for backend in backends:
            d, r = ops.pair_counts(preds, labels, backend=backend)
            assert torch.equal(d, ref_d) and torch.equal(r, ref_r), backend
            hist_backend = "triton" if backend == "auto" else backend
            if c <= 10 or hist_backend == "cuda":
                h = ops.label_histogram(preds, c, backend=hist_backend)
                assert torch.equal(h.long(), ops.label_histogram_reference(preds, c)), backend
        assert torch.equal(ops.modal_labels(preds, c), ops.modal_labels_reference(preds, c))
        cpu = ops.cie_scores(preds.cpu(), preds[: max(1, n // 2)].cpu().contiguous(), c)
        assert torch.equal(ops.cie_scores(preds, preds[: max(1, n // 2)].contiguous(), c).cpu(), cpu)
    assert ops.cuda_backend(dev) in {"cuda", "triton", "torch"}
    d = minidiff.disagreement_matrix(preds)
    assert d.device.type == "cuda"
    assert torch.equal(d.cpu(), minidiff.disagreement_matrix(preds.cpu()))
    acc = AgreementAccumulator(preds.shape[0], num_classes=c)  # deferred checks on CUDA
    for s in range(0, preds.shape[1], 1024):
        acc.update(preds[:, s:s + 1024], labels[s:s + 1024])
    out = acc.compute()
    assert torch.equal(out["flips"].cpu(), minidiff.flip_matrix(preds.cpu(), labels.cpu()))


# ---- divergence numerics (issue: confident models, negative KL) ----------------------------
def test_js_of_a_confident_model_is_finite_and_exact():
    from scipy.spatial.distance import jensenshannon

    p, q = [1.0, 3.77e-18], [0.429, 0.571]
    probs = torch.tensor([[p], [q]], dtype=torch.float64)
    js = minidiff.divergence_matrix(probs, "js")
    expected = jensenshannon(p, q) ** 2  # scipy: sqrt of JS in nats
    assert js[0, 1].item() == pytest.approx(expected, rel=1e-12)
    assert js[0, 1].item() == pytest.approx(0.2566, abs=1e-4)
    assert minidiff.divergence_to_reference(probs, 0, "js")[1, 0].item() == pytest.approx(expected, rel=1e-12)


def test_per_class_terms_match_high_precision():
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    g = torch.Generator().manual_seed(3)
    x = torch.rand(400, generator=g, dtype=torch.float64) + 1e-3
    rel = torch.cat([10.0 ** -torch.arange(1, 17, dtype=torch.float64).repeat(20),
                     torch.rand(80, generator=g, dtype=torch.float64)])
    y = x * (1 + rel * torch.where(torch.rand(400, generator=g) < 0.5, -1.0, 1.0))
    kl = ops._kl_term(x, y)
    js = ops._js_term(x, y)
    for i in range(0, 400, 7):
        xi, yi = mpmath.mpf(float(x[i])), mpmath.mpf(float(y[i]))
        m = (xi + yi) / 2
        kl_ref = xi * mpmath.log(xi / yi) - xi + yi
        js_ref = (xi * mpmath.log(xi / m) + yi * mpmath.log(yi / m)) / 2
        assert kl[i].item() >= 0 and js[i].item() >= 0
        assert float(abs(kl[i].item() - kl_ref)) <= 1e-14 * float(kl_ref) + 1e-300, (i, kl[i].item(), kl_ref)
        assert float(abs(js[i].item() - js_ref)) <= 1e-14 * float(js_ref) + 1e-300, (i, js[i].item(), js_ref)


def test_kl_is_never_negative():
    # The eps floor adds mass to q; with p log(p'/q') this row was -1e-13.
    delta = 1e-13
    probs = torch.tensor([[[1 - delta, delta]], [[1.0, 0.0]]], dtype=torch.float64)
    kl = minidiff.divergence_to_reference(probs, 0, "kl")
    assert kl[1, 0].item() >= 0
    # float32 softmax rows sum to 1 only within ~1e-7: nearly equal rows must not go negative
    g = torch.Generator().manual_seed(8)
    logits = 4 * torch.randn(2000, 10, generator=g)
    p = torch.softmax(logits, -1)
    q = torch.softmax(logits + 1e-4 * torch.randn(2000, 10, generator=g), -1)
    rows = minidiff.divergence_to_reference(torch.stack([p, q, p]), 0, "kl")
    assert bool((rows >= 0).all())
    assert bool((rows[2] == 0).all())  # identical rows: exactly 0
    # and agrees with the float64 definition on the same (float32-valued) inputs
    ref = ops.divergence_reference(p, q, "kl", 1e-12)
    assert torch.allclose(rows[1], ref, rtol=1e-6, atol=1e-15)


def test_huge_class_indices_get_a_clear_error():
    preds = np.array([[2**40, 1, 0], [3, 1, 0]])
    with pytest.raises(ValueError, match=r"largest class index 1099511627776.*np.unique"):
        minidiff.modal_labels(preds)
    with pytest.raises(ValueError, match="np.unique"):
        minidiff.pie_mask(preds, preds[::-1].copy())
    with pytest.raises(ValueError, match="np.unique"):
        minidiff.cie_scores(preds, preds, num_classes=2**40 + 1)
    # counting needs no histogram: large ids are exact there
    d = minidiff.disagreement_matrix(preds)
    assert d[0, 1].item() == pytest.approx(1 / 3, rel=1e-15)


def test_eps_accepts_any_real_scalar():
    probs = torch.tensor([[[0.5, 0.5]], [[0.4, 0.6]]], dtype=torch.float64)
    ref = minidiff.divergence_matrix(probs, "kl", eps=1e-6)
    for eps in (np.float32(1e-6), np.float64(1e-6), torch.tensor(1e-6, dtype=torch.float64)):
        out = minidiff.divergence_matrix(probs, "kl", eps=eps)
        assert torch.allclose(out, ref, rtol=1e-12, atol=0)
    for bad in (0.0, 1.0, float("nan"), True, "1e-6", torch.tensor([1e-6, 1e-6])):
        with pytest.raises(ValueError, match="eps"):
            minidiff.divergence_matrix(probs, "kl", eps=bad)
