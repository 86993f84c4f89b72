"""Token-level divergence: the fused kernels and the accumulator against float64 numpy.

Every per-token statistic of every backend is compared with a numpy float64
reference written independently of the package (log-softmax by hand, a stable
sort for the top-k sets); the accumulator's llama.cpp statistics with the same
formulas applied to the numpy per-token values, and its percentiles with
``numpy.percentile`` within the stated histogram error.
"""

import math
import os

import numpy as np
import pytest
import torch

from minidiff.lm import TokenDivergenceAccumulator, token_divergence, token_divergence_reference
from minidiff.lm import accumulator as acc_mod
from minidiff.ops import token_divergence as ops_td

BACKENDS = ["native", "reference"]
NEG = -np.inf


# ---- numpy reference --------------------------------------------------------
def np_stats(z, w, t=None):
    z = np.asarray(z, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    out = {k: [] for k in ("kld", "kld_reverse", "js", "entropy_base", "top5_overlap", "top10_overlap",
                           "top1_base", "top1_variant", "logp_base", "logp_variant", "rank_base",
                           "rank_variant")}
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        for r in range(z.shape[0]):
            a, b = z[r], w[r]
            lp = a - (a.max() + np.log(np.exp(a - a.max()).sum()))
            lq = b - (b.max() + np.log(np.exp(b - b.max()).sum()))
            p, q = np.exp(lp), np.exp(lq)
            m = (p + q) / 2
            out["kld"].append(np.sum(np.where(p > 0, p * (lp - lq), 0.0)))
            out["kld_reverse"].append(np.sum(np.where(q > 0, q * (lq - lp), 0.0)))
            lm = np.log(m)
            out["js"].append(0.5 * np.sum(np.where(p > 0, p * (lp - lm), 0.0))
                             + 0.5 * np.sum(np.where(q > 0, q * (lq - lm), 0.0)))
            out["entropy_base"].append(-np.sum(np.where(p > 0, p * lp, 0.0)))
            sa = np.argsort(-a, kind="stable")
            sb = np.argsort(-b, kind="stable")
            for k in (5, 10):
                kk = min(k, a.size)
                out[f"top{k}_overlap"].append(len(set(sa[:kk]) & set(sb[:kk])) / kk)
            out["top1_base"].append(int(np.argmax(a)))
            out["top1_variant"].append(int(np.argmax(b)))
            if t is not None:
                y = int(t[r])
                out["logp_base"].append(lp[y])
                out["logp_variant"].append(lq[y])
                out["rank_base"].append(int((a > a[y]).sum()))
                out["rank_variant"].append(int((b > b[y]).sum()))
    res = {k: np.array(v) for k, v in out.items() if v}
    if t is not None:
        res["p_base"] = np.exp(res["logp_base"])
        res["p_variant"] = np.exp(res["logp_variant"])
    return res


def assert_matches(got, ref, *, scale=1.0):
    """Float columns within 1e-9 relative + 1e-13 * scale absolute (scale: logit magnitude,
    the size of the cancellation in sum p (log p - log q)); integer columns exactly."""
    assert set(got) == set(ref), (set(got) ^ set(ref))
    for k, r in ref.items():
        g = got[k].reshape(-1).cpu().numpy()
        if k.startswith(("top1_", "rank_")):
            assert g.dtype == np.int64
            np.testing.assert_array_equal(g, r, err_msg=k)
        else:
            assert got[k].dtype == torch.float64
            np.testing.assert_array_equal(np.isinf(g), np.isinf(r), err_msg=k)
            fin = np.isfinite(r)
            np.testing.assert_allclose(g[fin], r[fin], rtol=1e-9, atol=1e-13 * scale, err_msg=k)


def pair(rows, vocab, spread=3.0, noise=0.2, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(rows, vocab, generator=g, dtype=torch.float64) * spread
    w = z + noise * torch.randn(rows, vocab, generator=g, dtype=torch.float64)
    t = torch.randint(0, vocab, (rows,), generator=g)
    return z.to(dtype), w.to(dtype), t


# ---- per-token statistics ---------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab", [1, 2, 9, 1000, 50_000])
def test_per_token_matches_numpy(backend, vocab):
    rows = 6 if vocab == 50_000 else 40
    z, w, t = pair(rows, vocab, seed=vocab)
    assert_matches(token_divergence(z, w, t, backend=backend), np_stats(z, w, t), scale=20)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_and_half_inputs(backend):
    z, w, t = pair(30, 300, dtype=torch.float64)
    assert_matches(token_divergence(z, w, t, backend=backend), np_stats(z, w, t), scale=20)
    zb, wb = z.to(torch.bfloat16), w.to(torch.bfloat16)
    assert_matches(token_divergence(zb, wb, t, backend=backend), np_stats(zb.float(), wb.float(), t), scale=20)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extreme_logits(backend):
    z, w, t = pair(20, 500, spread=1.0, seed=3, dtype=torch.float64)
    z[:, ::7] = 1e4
    w[:, ::11] = -1e4
    w[:, 3] = 1e4
    z[5] = -1e4
    z[5, 17] = 1e4
    assert_matches(token_divergence(z, w, t, backend=backend), np_stats(z, w, t), scale=1e4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_vocabulary_exact(backend):
    z, w, t = pair(12, 64, seed=5)
    z[0, :40] = -math.inf          # masked in base only: q > 0 where p = 0 is finite KLD
    w[1, :40] = -math.inf          # masked in variant where p > 0: KLD = +inf, reported
    z[2, 10:] = -math.inf
    w[2, 10:] = -math.inf          # same mask in both: exact zeros
    z[3, :63] = -math.inf          # one token left: p is one-hot
    t[0] = 50
    t[1] = 50
    t[2] = 3
    t[3] = 63
    got = token_divergence(z, w, t, backend=backend)
    assert_matches(got, np_stats(z, w, t), scale=20)
    assert math.isinf(got["kld"][1]) and got["kld"][1] > 0
    assert math.isfinite(got["kld_reverse"][1]) and math.isfinite(got["js"][1])
    assert math.isfinite(got["kld"][0]) and math.isinf(got["kld_reverse"][0])
    assert got["js"][1] <= math.log(2) and got["entropy_base"][3] == 0.0


def test_native_paths_across_blocks_masks_and_growing_maxima():
    """The native kernel works in blocks of 1024 entries with an online logsumexp (sums
    rescaled when a later block has a larger maximum) and keeps its pass-1 exponentials
    for the JS pass: masks spanning whole blocks, a +inf KLD term in an early block whose
    weight later underflows to 0, rising maxima and a ragged last block, on every path."""
    from minidiff._native import cpu_core

    vocab = 5003
    z, w, t = pair(8, vocab, seed=31, dtype=torch.float64)
    z[0, :2048] = -math.inf                 # first two blocks masked in base
    w[0, 1024:3072] = -math.inf             # q = 0 where p = 0 and where p > 0 (KLD = inf)
    z[1, :1024] = -1e4                      # early block: p > 0 relative to its own maximum ...
    w[1, 5] = -math.inf                     # ... where q = 0: inf, until a later block ...
    z[1, 4000] = 1e4                        # ... makes that p underflow to 0: finite KLD
    z[2] = torch.linspace(-30, 30, vocab, dtype=torch.float64)  # the maximum grows every block
    w[2] = z[2].flip(0)
    w[3, 4096:] = -math.inf                 # masked tail (ragged last block)
    z[4] = w[4]                             # identical row among others
    z[5], w[5] = -1e4, -1e4                 # p, q near 1e-304: the AVX-512 JS loop divides there
    z[5, 0], w[5, 0] = 0.0, 0.0
    z[5, 1:100] -= 1e4 - 700
    w[5, 1:100] = z[5, 1:100] + torch.randn(99, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    z[6], w[6] = z[6].round(), w[6].round()  # ties everywhere: the top-10 keeps the smaller index
    t[1], t[3] = 4000, 10
    ref = np_stats(z, w, t)
    assert math.isfinite(ref["kld"][1]) and math.isinf(ref["kld"][0]) and ref["kld"][4] == 0.0
    paths = ["portable"] + [p for p in ("avx2", "avx512") if cpu_core().cpu_features()[p + "f" * (p == "avx512")]]
    for dtype in (torch.float64, torch.float32):
        zz, ww = z.to(dtype), w.to(dtype)
        ref = np_stats(zz, ww, t)
        for path in paths:
            of = torch.empty(8, 8, dtype=torch.float64)
            oi = torch.empty(8, 4, dtype=torch.int64)
            row, _, _ = cpu_core().token_divergence(zz.data_ptr(), ww.data_ptr(), dtype == torch.float64, 8, vocab,
                                                    t.data_ptr(), of.data_ptr(), oi.data_ptr(), 1, path)
            assert row == -1
            d = {n: of[:, j] for j, n in enumerate(ops_td.F_COLUMNS)} | {n: oi[:, j] for j, n in enumerate(ops_td.I_COLUMNS)}
            d["p_base"], d["p_variant"] = d["logp_base"].exp(), d["logp_variant"].exp()
            assert_matches(d, ref, scale=1e4)
            assert d["kld"][4] == 0.0 and d["kld_reverse"][4] == 0.0 and d["js"][4] == 0.0, path


def test_native_paths_reject_nan_and_inf_in_any_block():
    """After the first block the AVX-512 scan finds NaN and +inf among its top-10 candidates
    (no separate value check per entry): a bad entry in any later block, of either matrix,
    must still reject the row and name the matrix (the base when both are bad)."""
    from minidiff._native import cpu_core

    vocab = 4100
    paths = ["portable"] + [p for p in ("avx2", "avx512") if cpu_core().cpu_features()[p + "f" * (p == "avx512")]]

    def first_bad(zz, ww, t, path):
        of = torch.empty(3, 8, dtype=torch.float64)
        oi = torch.empty(3, 4, dtype=torch.int64)
        return cpu_core().token_divergence(zz.data_ptr(), ww.data_ptr(), zz.dtype == torch.float64, 3, vocab,
                                           t.data_ptr(), of.data_ptr(), oi.data_ptr(), 1, path)

    for dtype in (torch.float32, torch.float64):
        z, w, t = pair(3, vocab, seed=5, dtype=dtype)
        for bad in (math.nan, math.inf):
            for pos in (3, 1500, 4099):  # first, a middle and the last block
                for which in (0, 1):
                    zz, ww = z.clone(), w.clone()
                    (zz if which == 0 else ww)[1, pos] = bad
                    zz[2, 4000], ww[2, 2000] = bad, bad  # a later invalid row: the first one is reported
                    for path in paths:
                        got = first_bad(zz, ww, t, path)
                        assert got == (1, 1, which), (dtype, bad, pos, which, path, got)
            zz, ww = z.clone(), w.clone()
            zz[2, 4000] = bad  # base in a later block than the variant's: the base is named
            ww[2, 2000] = bad
            for path in paths:
                got = first_bad(zz, ww, t, path)
                assert got == (2, 1, 0), (dtype, bad, path, got)

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab", [1, 5, 4097])
def test_identical_rows_exactly_zero(backend, vocab):
    z, _, t = pair(17, vocab, seed=9)
    z[0, : vocab // 2] = -math.inf if vocab > 1 else z[0, 0]
    got = token_divergence(z, z.clone(), t, backend=backend)
    for k in ("kld", "kld_reverse", "js"):
        assert torch.equal(got[k], torch.zeros_like(got[k])), k
    assert torch.equal(got["top1_base"], got["top1_variant"])
    assert torch.equal(got["top5_overlap"], torch.ones_like(got["top5_overlap"]))
    acc = TokenDivergenceAccumulator(backend=backend)
    acc.update(z, z.clone(), t)
    res = acc.compute()
    assert res.kld == 0.0 and res.kld_reverse == 0.0 and res.same_top1 == 1.0 and res.delta_p_rms == 0.0
    assert res.ppl_base == res.ppl_variant and res.kld_percentiles[99.9] == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_swapping_models_swaps_directions(backend):
    z, w, t = pair(25, 777, seed=11)
    a = token_divergence(z, w, t, backend=backend)
    b = token_divergence(w, z, t, backend=backend)
    torch.testing.assert_close(a["kld"], b["kld_reverse"], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(a["kld_reverse"], b["kld"], rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(a["js"], b["js"], rtol=1e-12, atol=1e-16)
    assert torch.equal(a["top1_base"], b["top1_variant"]) and torch.equal(a["rank_base"], b["rank_variant"])


def test_ties_go_to_the_smaller_token_id():
    z = torch.zeros(2, 12)
    w = torch.zeros(2, 12)
    w[0, 11] = 1.0  # variant top-1 is 11; base's is 0 (all tied)
    w[1, :] = torch.arange(12.0)  # variant top-5 = 11..7, base top-5 = 0..4 (ties)
    got = token_divergence(z, w, torch.tensor([5, 5]), backend="native")
    assert got["top1_base"].tolist() == [0, 0] and got["top1_variant"].tolist() == [11, 11]
    assert got["top5_overlap"].tolist() == [0.8, 0.0] and got["top10_overlap"].tolist() == [0.9, 0.8]
    assert got["rank_base"].tolist() == [0, 0] and got["rank_variant"].tolist() == [1, 6]


def test_batch_shape_and_native_paths():
    z, w, t = pair(24, 333, seed=2)
    flat = token_divergence(z, w, t)
    shaped = token_divergence(z.reshape(4, 6, 333), w.reshape(4, 6, 333), t.reshape(4, 6))
    for k in flat:
        assert shaped[k].shape == (4, 6)
        assert torch.equal(shaped[k].reshape(-1), flat[k])
    from minidiff._native import cpu_core
    ref = np_stats(z, w, t)
    for path in ("avx512", "avx2", "portable"):
        if path == "avx512" and not cpu_core().cpu_features()["avx512f"]:
            continue
        if path == "avx2" and not cpu_core().cpu_features()["avx2"]:
            continue
        of = torch.empty(24, 8, dtype=torch.float64)
        oi = torch.empty(24, 4, dtype=torch.int64)
        row, _, _ = cpu_core().token_divergence(z.data_ptr(), w.data_ptr(), False, 24, 333, t.data_ptr(),
                                                of.data_ptr(), oi.data_ptr(), 2, path)
        assert row == -1
        got = ops_td.F_COLUMNS, ops_td.I_COLUMNS
        d = {n: of[:, j] for j, n in enumerate(got[0])} | {n: oi[:, j] for j, n in enumerate(got[1])}
        d["p_base"], d["p_variant"] = d["logp_base"].exp(), d["logp_variant"].exp()
        assert_matches(d, ref, scale=20)


# ---- validation ----------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_raise_value_error(backend):
    z, w, t = pair(4, 10)
    cases = [
        (z, w[:, :9], None, "same shape"),
        (z.int(), w.int(), None, "dtype"),
        (z[0], w[0], None, "tokens, V"),
        (z, w, t[:3], "shape"),
        (z, w, t.float(), "int32 or int64"),
        (z, w, torch.tensor([0, 1, 10, 2]), "outside"),
        (z, w, torch.tensor([0, -1, 1, 2]), "outside"),
        (z[:, :0], w[:, :0], None, "V = 0"),
    ]
    for a, b, tt, msg in cases:
        with pytest.raises(ValueError, match=msg):
            token_divergence(a, b, tt, backend=backend)
    for bad, msg in ((math.nan, "NaN"), (math.inf, "NaN or \\+inf")):
        zz = z.clone()
        zz[2, 3] = bad
        with pytest.raises(ValueError, match=f"base_logits row 2 contains {msg}"):
            token_divergence(zz, w, t, backend=backend)
        ww = w.clone()
        ww[1, 0] = bad
        with pytest.raises(ValueError, match="variant_logits row 1"):
            token_divergence(z, ww, t, backend=backend)
    zz = z.clone()
    zz[3] = -math.inf
    with pytest.raises(ValueError, match="row 3 has no finite logit"):
        token_divergence(zz, w, t, backend=backend)
    with pytest.raises(ValueError, match="backend"):
        token_divergence(z, w, t, backend="fast")


def test_registered_op_validates_its_arguments():
    op = ops_td.op()
    z, w, t = pair(4, 10)
    f, i = op(z, w, t)
    assert f.shape == (4, 8) and i.shape == (4, 4)
    with pytest.raises(ValueError):
        op(z, w[:3], t)
    with pytest.raises(ValueError):
        op(z, w, torch.tensor([0, 1, 99, 2]))
    with pytest.raises(ValueError):
        op(z, w.double(), t[:2])
    with pytest.raises(ValueError):
        op(z.reshape(2, 2, 10), w.reshape(2, 2, 10), None)
    fake_mode = torch._subclasses.fake_tensor.FakeTensorMode()
    with fake_mode:
        fz, fw = torch.empty(5, 7), torch.empty(5, 7)
        ff, fi = op(fz, fw, None)
    assert ff.shape == (5, 8) and ff.dtype == torch.float64 and fi.dtype == torch.int64


# ---- Triton kernel under the interpreter --------------------------------------------------
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 on CPU")
def test_triton_interpreter_matches_reference():
    pytest.importorskip("triton")
    z, w, t = pair(5, 300, seed=21)
    z[0, :100] = -math.inf
    w[1, 50:] = -math.inf
    t[1] = 10
    got = token_divergence(z, w, t, backend="triton")
    assert_matches(got, np_stats(z, w, t), scale=20)
    same = token_divergence(z, z.clone(), t, backend="triton")
    assert torch.equal(same["kld"], torch.zeros(5, dtype=torch.float64))
    assert torch.equal(same["js"], torch.zeros(5, dtype=torch.float64))


# ---- accumulator ---------------------------------------------------------------------
def _llama_stats(ref, n):
    """llama.cpp's formulas on numpy per-token values."""
    def mean_err(x):
        f = x.mean()
        return f, math.sqrt((np.mean(x * x) - f * f) / (n - 1))
    nb, nv = -ref["logp_base"], -ref["logp_variant"]
    lb, eb = mean_err(nb)
    lv, ev = mean_err(nv)
    cov = (np.mean(nb * nv) - lb * lv) / (n - 1)
    dp = ref["p_variant"] - ref["p_base"]
    mse, mse_e = mean_err(dp * dp)
    same = np.mean(ref["top1_base"] == ref["top1_variant"])
    return {
        "ppl_base": math.exp(lb), "ppl_variant": math.exp(lv), "ppl_base_err": math.exp(lb) * eb,
        "ln_ppl_ratio": lv - lb, "ln_ppl_ratio_err": math.sqrt(ev ** 2 + eb ** 2 - 2 * cov),
        "ppl_ratio": math.exp(lv - lb), "ppl_diff": math.exp(lv) - math.exp(lb),
        "ln_ppl_correlation": np.corrcoef(nb, nv)[0, 1],
        "kld": mean_err(ref["kld"])[0], "kld_err": mean_err(ref["kld"])[1],
        "kld_reverse": mean_err(ref["kld_reverse"])[0], "kld_reverse_err": mean_err(ref["kld_reverse"])[1],
        "js": ref["js"].mean(), "kld_max": ref["kld"].max(), "kld_min": ref["kld"].min(),
        "delta_p": dp.mean(), "delta_p_err": mean_err(dp)[1], "delta_p_max": dp.max(), "delta_p_min": dp.min(),
        "delta_p_rms": math.sqrt(mse), "delta_p_rms_err": 0.5 / math.sqrt(mse) * mse_e,
        "same_top1": same, "same_top1_err": math.sqrt(same * (1 - same) / (n - 1)),
        "top5_overlap": ref["top5_overlap"].mean(), "entropy_base": ref["entropy_base"].mean(),
    }


def _batches(n_windows=12, seq=16, vocab=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n_windows, seq, vocab, generator=g) * 3
    w = z + 0.4 * torch.randn(n_windows, seq, vocab, generator=g)
    t = torch.randint(0, vocab, (n_windows, seq), generator=g)
    return z, w, t


def test_accumulator_statistics_match_numpy():
    z, w, t = _batches()
    acc = TokenDivergenceAccumulator(backend="native")
    for s in range(0, 12, 5):  # windows in uneven batches
        acc.update(z[s:s + 5], w[s:s + 5], t[s:s + 5], window_ids=torch.arange(s, min(12, s + 5)))
    res = acc.compute()
    ref = np_stats(z.reshape(-1, 400), w.reshape(-1, 400), t.reshape(-1))
    n = ref["kld"].size
    want = _llama_stats(ref, n)
    for k, v in want.items():
        assert res[k] == pytest.approx(v, rel=1e-8, abs=1e-14), k
    assert res.n_tokens == res.n_scored == n
    # KLD percentiles within the stated relative error; Δp within the stated absolute error
    for p, v in res.kld_percentiles.items():
        exact = np.percentile(ref["kld"], p)
        assert abs(v - exact) <= acc_mod.KLD_RELATIVE_ERROR * exact + 1e-15, p
    dp = ref["p_variant"] - ref["p_base"]
    for p, v in res.delta_p_percentiles.items():
        assert abs(v - np.percentile(dp, p)) <= acc_mod.DELTA_P_ABSOLUTE_ERROR + 1e-15, p
    # per-window ln PPL correlation and the window ranking
    nb = -ref["logp_base"].reshape(12, 16).mean(1)
    nv = -ref["logp_variant"].reshape(12, 16).mean(1)
    assert res.window_ln_ppl_correlation == pytest.approx(np.corrcoef(nb, nv)[0, 1], rel=1e-9)
    wk = ref["kld"].reshape(12, 16).mean(1)
    assert [r["window_id"] for r in res.top_windows] == list(np.argsort(-wk, kind="stable")[:10])
    assert res.top_windows[0]["kld"] == pytest.approx(wk.max(), rel=1e-9)
    # buckets: position buckets partition the tokens; flips are the first flipped (window, position)
    flips = ref["top1_base"] != ref["top1_variant"]
    assert sum(b["n"] for b in res.by_position) == n
    assert res.by_position[3]["flip_rate"] == pytest.approx(flips.reshape(12, 16)[:, 3].mean())
    first = [divmod(int(i), 16) for i in np.nonzero(flips)[0][:acc.max_flips]]
    assert [(f["window_id"], f["position"]) for f in res.flips] == first
    f0 = res.flips[0]
    row = first[0][0] * 16 + first[0][1]
    assert f0["top1_base"] == ref["top1_base"][row] and f0["base_top3"][0][0] == f0["top1_base"]
    assert f0["base_top3"][0][1] >= f0["base_top3"][1][1] >= f0["base_top3"][2][1]
    assert res.to_dict()["kld"] == res["kld"]


def test_percentiles_on_wide_distributions():
    g = np.random.default_rng(4)
    kld = np.concatenate([10 ** g.uniform(-12, 2, 5000), np.zeros(30)])
    hist = torch.bincount(acc_mod._kld_bin(torch.from_numpy(kld)), minlength=acc_mod.KLD_BINS)
    got = acc_mod.histogram_percentiles(hist, acc_mod._kld_bin_centre, kld.min(), kld.max(),
                                        acc_mod.KLD_PERCENTILES)
    for p, v in got.items():
        exact = np.percentile(kld, p)
        assert abs(v - exact) <= acc_mod.KLD_RELATIVE_ERROR * exact + 1e-10, p
    dp = np.clip(g.normal(0, 0.05, 7000), -1, 1)
    dp[:3] = [-1.0, 1.0, 0.0]
    hist = torch.bincount(acc_mod._dp_bin(torch.from_numpy(dp)), minlength=acc_mod.DELTA_P_BINS)
    got = acc_mod.histogram_percentiles(hist, acc_mod._dp_bin_centre, dp.min(), dp.max(),
                                        acc_mod.DELTA_P_PERCENTILES)
    for p, v in got.items():
        assert abs(v - np.percentile(dp, p)) <= acc_mod.DELTA_P_ABSOLUTE_ERROR + 1e-15, p


def _fill(acc, z, w, t, windows, freq):
    acc.update(z, w, t, window_ids=windows, token_frequency=freq)


def test_streaming_merge_and_state_dict_equal_one_pass():
    z, w, t = _batches(n_windows=10, seq=8, vocab=300, seed=7)
    freq = torch.randint(1, 500, t.shape)
    ids = torch.arange(10)
    one = TokenDivergenceAccumulator(max_flips=7)
    _fill(one, z, w, t, ids, freq)
    streamed = TokenDivergenceAccumulator(max_flips=7)
    for s in range(10):
        _fill(streamed, z[s:s + 1], w[s:s + 1], t[s:s + 1], ids[s:s + 1], freq[s:s + 1])
    shards = [TokenDivergenceAccumulator(max_flips=7) for _ in range(3)]
    for sh, (a, b) in zip(shards, ((0, 3), (3, 4), (4, 10))):
        _fill(sh, z[a:b], w[a:b], t[a:b], ids[a:b], freq[a:b])
    merged = shards[0].merge(shards[1]).merge(shards[2])
    restored = TokenDivergenceAccumulator(max_flips=7)
    restored.load_state_dict(merged.state_dict())
    want = one.compute().to_dict()
    for other in (streamed, merged, restored):
        got = other.compute().to_dict()
        assert got.keys() == want.keys()
        for k in want:
            if isinstance(want[k], float):
                assert got[k] == pytest.approx(want[k], rel=1e-12, abs=1e-15, nan_ok=True), k
            elif k in ("by_frequency", "by_position", "by_entropy", "top_windows", "flips"):
                assert len(got[k]) == len(want[k]), k
                for a, b in zip(got[k], want[k]):
                    assert a.keys() == b.keys()
                    for kk in a:
                        assert a[kk] == pytest.approx(b[kk], rel=1e-12, abs=1e-15), (k, kk)
            else:
                assert got[k] == want[k], k
    assert len(want["flips"]) == 7
    assert sum(b["n"] for b in want["by_frequency"]) == 80


def test_accumulator_edge_cases():
    acc = TokenDivergenceAccumulator()
    res = acc.compute()
    assert res.n_tokens == 0 and math.isnan(res.kld) and math.isnan(res.ppl_base)
    z, w, t = pair(8, 20)
    w[0, int(torch.argmax(z[0]))] = -math.inf  # the base's top token masked in the variant: inf KLD
    acc.update(z, w)  # without targets: divergences only
    res = acc.compute()
    assert math.isinf(res.kld) and res.kld_inf_count == 1 and res.kld_max == math.inf
    assert math.isnan(res.ppl_base) and res.n_scored == 0 and math.isfinite(res.kld_reverse)
    with pytest.raises(ValueError, match="targets"):
        acc.update(z, w, token_frequency=torch.ones(8, dtype=torch.int64))
    with pytest.raises(ValueError, match="window_ids"):
        acc.update(z, w, t, window_ids=torch.arange(3))
    with pytest.raises(ValueError, match="cannot merge"):
        acc.merge(TokenDivergenceAccumulator(max_flips=3))
    with pytest.raises(ValueError):
        TokenDivergenceAccumulator(n_positions=0)
