"""Metrics: hand-computed cases, float64 brute-force references, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

import minidiff.metrics as M
from minidiff.metrics import MetricSkipped


def _probs(m, c, seed=0, temp=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(m, c, generator=g, dtype=torch.float64) * temp, 1)


# -- 1. prediction errors ---------------------------------------------------------------------------
def test_flips_hand_computed():
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    b = torch.tensor([0, 1, 2, 0, 1, 0, 1, 1])  # wrong on 5, 6
    v = torch.tensor([0, 2, 2, 0, 0, 2, 1, 1])  # wrong on 1, 4, 6
    f = M.flips(b, v, y)
    assert (f.n_right_to_wrong, f.n_wrong_to_right) == (2, 1)
    assert f.right_to_wrong == pytest.approx(2 / 8) and f.wrong_to_right == pytest.approx(1 / 8)
    assert f.churn == pytest.approx(3 / 8)  # differ on 1, 4, 5
    assert f.error_jaccard == pytest.approx(1 / 4)  # E_b={5,6}, E_v={1,4,6}


def test_churn_and_acc():
    y = torch.tensor([0, 1, 1, 0])
    assert M.churn(torch.tensor([0, 1, 1, 1]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.25)
    assert M.accuracy(torch.tensor([0, 1, 0, 0]), y) == pytest.approx(0.75)


def test_accuracy_ci_matches_index_bootstrap():
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 4, (400,), generator=g)
    p = torch.where(torch.rand(400, generator=g) < 0.8, y, (y + 1) % 4)
    ci = M.accuracy_ci(p, y, n_boot=4000, seed=0)
    acc = float((p == y).double().mean())
    assert ci.accuracy == acc and ci.low < acc < ci.high
    # reference: classic resampling of example indices
    rng = np.random.default_rng(123)
    right = (p == y).numpy()
    boots = right[rng.integers(0, 400, size=(4000, 400))].mean(1)
    lo, hi = np.quantile(boots, [0.025, 0.975])
    assert abs(ci.low - lo) <= 0.0075 and abs(ci.high - hi) <= 0.0075
    # normal approximation as a second check
    se = math.sqrt(acc * (1 - acc) / 400)
    assert ci.low == pytest.approx(acc - 1.96 * se, abs=0.01) and ci.high == pytest.approx(acc + 1.96 * se, abs=0.01)
    assert M.accuracy_ci(p, y, n_boot=500, seed=7) == M.accuracy_ci(p, y, n_boot=500, seed=7)


def test_accuracy_difference_ci_paired():
    y = torch.zeros(1000, dtype=torch.long)
    b = y.clone()
    v = y.clone()
    v[:50] = 1  # variant loses 5 points on the same examples
    ci = M.accuracy_difference_ci(b, v, y, n_boot=2000)
    assert ci.accuracy == pytest.approx(-0.05) and ci.low < -0.05 < ci.high and ci.high < 0


def test_mcnemar_exact_and_chi2():
    y = torch.zeros(100, dtype=torch.long)
    b = y.clone()
    v = y.clone()
    b[:3] = 1  # base wrong, variant right: c = 3
    v[3:13] = 1  # base right, variant wrong: b = 10
    r = M.mcnemar(b, v, y)
    assert (r.b, r.c, r.method) == (10, 3, "exact")
    # exact two-sided binomial p: 2 * P(X <= 3), X ~ Bin(13, 1/2)
    p_ref = 2 * sum(math.comb(13, i) for i in range(4)) / 2 ** 13
    assert r.p_value == pytest.approx(p_ref, rel=1e-12)
    y = torch.zeros(200, dtype=torch.long)
    b, v = y.clone(), y.clone()
    b[:20] = 1
    v[20:60] = 1  # b = 40, c = 20
    r = M.mcnemar(b, v, y)
    assert r.method == "chi2-cc" and r.statistic == pytest.approx((20 - 1) ** 2 / 60)
    assert r.p_value == pytest.approx(math.erfc(math.sqrt(r.statistic / 2)), rel=1e-10)
    same = M.mcnemar(y, y, y)
    assert same.p_value == 1.0 and same.b == same.c == 0


def _kl64(p, q, eps=1e-12):
    """KL on eps-floored probabilities in the form sum_c x log(x/y) - x + y (scipy.special.kl_div),
    equal to sum_c p log(p/q) for two distributions, and >= 0 even when float32 rows sum to 1 +- 1e-7."""
    from scipy.special import kl_div

    p, q = p.double().clamp_min(eps).numpy(), q.double().clamp_min(eps).numpy()
    return torch.from_numpy(kl_div(p, q).sum(-1))


@pytest.mark.parametrize("kind", ["kl", "js", "tv"])
def test_divergence_against_float64(kind):
    p, q = _probs(300, 7, 0, 3.0), _probs(300, 7, 1, 3.0)
    p32, q32 = p.float(), q.float()
    d = M.per_example_divergence(p32, q32, kind)
    p, q = p32.double(), q32.double()
    if kind == "kl":
        ref = _kl64(p, q)
    elif kind == "js":
        m = (p + q) / 2
        ref = (_kl64(p, m) + _kl64(q, m)) / 2
    else:
        ref = (p - q).abs().sum(-1) / 2
    torch.testing.assert_close(d, ref, rtol=1e-6, atol=1e-9)
    s = M.divergence_summary(p32, q32, kind)
    assert s.mean == pytest.approx(float(ref.mean()), rel=1e-6)
    assert s.p90 == pytest.approx(float(np.percentile(ref.numpy(), 90)), rel=1e-6)
    assert s.p99 <= s.max and s.p50 <= s.p90


def test_divergence_hand_computed():
    p = torch.tensor([[1.0, 0.0]])
    q = torch.tensor([[0.5, 0.5]])
    assert M.divergence_summary(p, q, "kl").mean == pytest.approx(math.log(2))
    js = 0.5 * (math.log(1 / 0.75)) + 0.5 * (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25))
    assert M.divergence_summary(p, q, "js").mean == pytest.approx(js)
    assert M.divergence_summary(p, p, "js").mean == pytest.approx(0.0, abs=1e-12)


def _ece_brute(p, y, bins):
    conf, pred = p.max(1)
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        sel = [i for i in range(len(y)) if (lo < conf[i] <= hi) or (b == 0 and conf[i] == 0)]
        if sel:
            acc = np.mean([float(pred[i] == y[i]) for i in sel])
            cf = np.mean([float(conf[i]) for i in sel])
            total += len(sel) / len(y) * abs(acc - cf)
    return total


def test_calibration_hand_computed():
    # confidences kept off the bin edges (0.6 in float32 is 0.6000000238, in the next bin)
    p = torch.tensor([[0.95, 0.05], [0.65, 0.35], [0.25, 0.75], [0.15, 0.85]])
    y = torch.tensor([0, 1, 1, 1])
    # 2 bins: (0, .5] empty; (.5, 1] all 4: conf mean .8, acc 3/4 -> ECE .05
    assert M.ece(p, y, n_bins=2) == pytest.approx(0.05, rel=1e-6)
    # 10 bins, one example each: .95 right, .65 wrong, .75 right, .85 right
    assert M.ece(p, y, n_bins=10) == pytest.approx((0.05 + 0.65 + 0.25 + 0.15) / 4, rel=1e-6)
    brier = ((0.05 ** 2 * 2) + (0.65 ** 2 * 2) + (0.25 ** 2 * 2) + (0.15 ** 2 * 2)) / 4
    assert M.brier(p, y) == pytest.approx(brier, rel=1e-6)
    bins = M.reliability_bins(p, y, n_bins=10)
    assert bins.count.tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
    assert math.isnan(float(bins.accuracy[0])) and float(bins.accuracy[6]) == 0.0


def test_calibration_against_brute_and_accumulator():
    p = _probs(500, 6, 3, 2.5)
    y = torch.randint(0, 6, (500,), generator=torch.Generator().manual_seed(9))
    for bins in (1, 7, 15):
        assert M.ece(p, y, bins) == pytest.approx(_ece_brute(p, y, bins), rel=1e-12, abs=1e-15)
    acc = M.CalibrationAccumulator(15)
    acc.update(p[:123], y[:123])
    other = M.CalibrationAccumulator(15)
    other.update(p[123:], y[123:])
    got = acc.merge(other).compute()
    ref = M.calibration(p, y, 15)
    assert got.ece == pytest.approx(ref.ece, rel=1e-12) and got.brier == pytest.approx(ref.brier, rel=1e-12)
    assert torch.equal(got.bins.count, ref.bins.count)
    ch = M.calibration_change(p, _probs(500, 6, 4), y)
    assert ch.delta_ece == pytest.approx(ch.variant.ece - ch.base.ece)
    d = ch.to_dict()
    assert d["base"]["bins"]["count"] == ref.bins.count.tolist()


def test_class_impact_against_scipy():
    g = torch.Generator().manual_seed(5)
    c, m = 4, 400
    y = torch.randint(0, c, (m,), generator=g)

    def population(n, err_rate_class3):
        out = []
        for _ in range(n):
            p = y.clone()
            noise = torch.rand(m, generator=g)
            rate = torch.where(y == 3, err_rate_class3, 0.1)
            p[noise < rate] = (p[noise < rate] + 1) % c
            out.append(p)
        return torch.stack(out)

    base, comp = population(5, 0.1), population(5, 0.5)
    r = M.class_impact(base, comp, y, c, class_names=list("abcd"))
    def recall(p, k):
        return int(((p == y) & (y == k)).sum()) / int((y == k).sum())

    rec_b = np.array([[recall(p, k) for k in range(c)] for p in base])
    rec_v = np.array([[recall(p, k) for k in range(c)] for p in comp])
    acc_b = np.array([float((p == y).double().mean()) for p in base])
    acc_v = np.array([float((p == y).double().mean()) for p in comp])
    nb, nv = rec_b / acc_b[:, None], rec_v / acc_v[:, None]
    np.testing.assert_allclose(r.normalized_change.numpy(), nv.mean(0) / nb.mean(0) - 1, rtol=1e-12)
    ref = stats.ttest_ind(nv, nb, axis=0, equal_var=False)
    np.testing.assert_allclose(r.p_value.numpy(), ref.pvalue, rtol=1e-10)
    assert bool(r.significant[3]) and float(r.normalized_change[3]) < -0.2
    # classes 0..2 lose less than average -> relatively better
    assert all(float(x) > 0 for x in r.normalized_change[:3])
    single = M.class_impact(base[0], comp[0], y, c)
    assert torch.isnan(single.p_value).all() and "needs >= 2 models" in single.test_note


def test_pie_summary_and_accuracy_on_pie():
    # 3 base models, 3 compressed, 4 examples, 3 classes
    base = torch.tensor([[0, 1, 2, 0], [0, 1, 2, 1], [0, 1, 1, 2]])
    comp = torch.tensor([[0, 2, 2, 0], [0, 2, 1, 0], [0, 1, 1, 0]])
    s = M.pie_summary(base, comp, 3, top=3)
    # modal: base [0,1,2,0] (ex 3 ties 0/1/2 -> 0), comp [0,2,1,0]
    assert s.modal_base.tolist() == [0, 1, 2, 0] and s.modal_variant.tolist() == [0, 2, 1, 0]
    assert s.pie.tolist() == [False, True, True, False] and s.n_pie == 2
    # CIE: ex1 base hist (0,1,0), comp (0,1/3,2/3) -> 4/3; ex2 (0,1/3,2/3) vs (0,2/3,1/3) -> 2/3
    # ex3 (1/3,1/3,1/3) vs (1,0,0) -> 4/3
    torch.testing.assert_close(s.cie, torch.tensor([0.0, 4 / 3, 2 / 3, 4 / 3], dtype=torch.float64))
    assert s.top.tolist() == [1, 2, 3]  # PIEs first by score, then the non-PIE with the highest score
    y = torch.tensor([0, 1, 2, 0])
    a = M.accuracy_on_pie(torch.cat([base, comp]), y, s.pie)
    assert a.pie_accuracy.tolist()[:3] == [1.0, 1.0, 0.5] and a.non_pie_accuracy.tolist()[:3] == [1.0, 0.5, 0.5]
    assert a.n_pie == 2 and a.n_non_pie == 2


# -- 2. representation ------------------------------------------------------------------------------
def _knn_brute(x, k):
    z = x.double() / x.double().norm(dim=1, keepdim=True)
    sim = z @ z.T
    sim.fill_diagonal_(-math.inf)
    return [set(row) for row in sim.topk(k, dim=1).indices.tolist()]


def test_knn_overlap_against_brute_force():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(130, 12, generator=g)
    b = a @ torch.randn(12, 20, generator=g) + 0.5 * torch.randn(130, 20, generator=g)
    for k in (1, 5, 17):
        r = M.knn_overlap(a, b, k=k, chunk_size=32)  # chunks that do not divide M
        na, nb = _knn_brute(a, k), _knn_brute(b, k)
        ref = torch.tensor([len(x & y) / len(x | y) for x, y in zip(na, nb)], dtype=torch.float64)
        torch.testing.assert_close(r.per_example, ref)
        assert r.mean == pytest.approx(float(ref.mean()))
    same = M.knn_overlap(a, 3.0 * a, k=4)
    assert same.mean == 1.0  # cosine ignores scale


def test_knn_indices_hand_computed():
    x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [-1.0, 0.0]])
    nn = M.knn_indices(x, 2)
    assert nn[0].tolist() == [1, 2] and nn[3].tolist() == [2, 1]


def test_layer_correspondence():
    cka = torch.tensor([[0.9, 0.2, 0.1], [0.3, 0.8, 0.7], [float("nan")] * 3, [0.1, 0.4, 0.95]])
    lc = M.layer_correspondence(cka, ["a0", "a1", "a2", "a3"], ["b0", "b1", "b2"])
    assert lc.best_for_a.tolist() == [0, 1, -1, 2] and lc.best_for_b.tolist() == [0, 1, 3]
    assert lc.pairs()[1] == ("a1", "b1", pytest.approx(0.8)) and lc.pairs()[2][1] is None


# -- 3. distribution --------------------------------------------------------------------------------
def test_knn_ood_scores_against_brute_force():
    g = torch.Generator().manual_seed(4)
    train = torch.randn(200, 8, generator=g)
    test = torch.randn(50, 8, generator=g)
    s = M.knn_ood_scores(train, test, k=7, chunk_size=16)
    zt = train.double() / train.double().norm(dim=1, keepdim=True)
    zx = test.double() / test.double().norm(dim=1, keepdim=True)
    ref = torch.cdist(zx, zt).sort(dim=1).values[:, 6]
    torch.testing.assert_close(s, ref, rtol=1e-5, atol=1e-6)


def test_ood_detect_threshold_and_agreement():
    g = torch.Generator().manual_seed(6)
    centre = torch.zeros(16)
    centre[0] = 4.0
    train = centre + torch.randn(400, 16, generator=g)
    idv = centre + torch.randn(200, 16, generator=g)
    ood = -centre + torch.randn(100, 16, generator=g)
    r = M.ood_detect(train, idv, ood, k=10)
    assert r.threshold == pytest.approx(float(np.quantile(r.id_scores.numpy(), 0.95)))
    assert r.id_acceptance == pytest.approx(0.95, abs=0.006) and r.detection_rate == 1.0
    fb = torch.tensor([True, True, False, False, True])
    fv = torch.tensor([True, False, True, False, True])
    a = M.ood_agreement(fb, fv)
    assert a.jaccard == pytest.approx(2 / 4) and a.detection_rate_base == pytest.approx(3 / 5)
    assert M.ood_agreement(torch.zeros(3, dtype=torch.bool), torch.zeros(3, dtype=torch.bool)).jaccard == 1.0


def test_output_shift_and_class_shift():
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    assert M.entropy(p).tolist() == pytest.approx([0.0, math.log(2)])
    assert M.confidence(p).tolist() == [1.0, 0.5]
    a, b = _probs(300, 5, 0, 1.0), _probs(300, 5, 1, 4.0)  # variant much more confident
    sh = M.output_shift(a, b)
    ref = stats.ks_2samp(a.max(1).values.numpy(), b.max(1).values.numpy())
    assert sh.confidence.statistic == pytest.approx(ref.statistic) and sh.confidence.p_value < 1e-6
    bp = torch.tensor([0, 0, 1, 1, 2, 2, 2, 2])
    vp = torch.tensor([0, 1, 1, 1, 2, 2, 2, 2])
    cs = M.predicted_class_shift(bp, vp, 4)
    assert cs.total_variation == pytest.approx(1 / 8) and cs.dof == 2  # class 3 never predicted: dropped
    ref = stats.chi2_contingency(np.array([[2, 2, 4], [1, 3, 4]]), correction=False)
    assert cs.chi2 == pytest.approx(ref.statistic) and cs.p_value == pytest.approx(ref.pvalue)
    h1, h2 = M.ClassHistogramAccumulator(4), M.ClassHistogramAccumulator(4)
    h1.update(bp[:3])
    h1.update(bp[3:])
    h2.update(vp)
    assert h1.compute().tolist() == [2, 2, 4, 0] and h1.shift_to(h2).chi2 == pytest.approx(cs.chi2)


# -- bad input --------------------------------------------------------------------------------------
def test_metrics_without_labels_are_skipped():
    p = torch.tensor([0, 1])
    probs = torch.tensor([[0.6, 0.4], [0.3, 0.7]])
    for call in (lambda: M.accuracy_ci(p, None), lambda: M.flips(p, p, None), lambda: M.mcnemar(p, p, None),
                 lambda: M.ece(probs, None), lambda: M.class_impact(p, p, None, 2),
                 lambda: M.accuracy_on_pie(p, None, torch.tensor([True, False]))):
        with pytest.raises(MetricSkipped, match="needs labels") as info:
            call()
        assert info.value.reason == "needs labels; the dataset has none"
    # label-free metrics still work
    assert M.churn(p, p) == 0.0 and M.output_shift(probs, probs).confidence.statistic == 0.0


def test_bad_input_messages():
    y = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"labels values must lie in \[0, 2\)"):
        M.ece(torch.tensor([[0.5, 0.5]] * 3), y)
    with pytest.raises(ValueError, match="not logits"):
        M.ece(torch.tensor([[2.0, -1.0]] * 3), torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="rows must sum to 1"):
        M.brier(torch.tensor([[0.5, 0.1]] * 3), torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match="NaN"):
        M.divergence_summary(torch.tensor([[float("nan"), 1.0]]), torch.tensor([[0.5, 0.5]]))
    with pytest.raises(ValueError, match="different numbers of examples"):
        M.flips(torch.tensor([0, 1]), torch.tensor([0, 1, 1]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="integer class labels"):
        M.churn(torch.tensor([0.0, 1.0]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels has 2 entries"):
        M.accuracy(torch.tensor([0, 1, 1]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"k must be in \[1, 2\]"):
        M.knn_overlap(torch.randn(3, 4), torch.randn(3, 4), k=3)
    with pytest.raises(ValueError, match="all-zero row"):
        M.knn_indices(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), 1)
    with pytest.raises(ValueError, match="same model and layer"):
        M.knn_ood_scores(torch.randn(5, 3), torch.randn(2, 4), k=2)
    with pytest.raises(ValueError, match="NaN/Inf"):
        M.knn_overlap(torch.tensor([[float("inf"), 0.0]] * 3), torch.randn(3, 2), k=1)
    with pytest.raises(ValueError, match="2-D"):
        M.knn_overlap(torch.randn(3, 2, 2), torch.randn(3, 2), k=1)
    with pytest.raises(ValueError, match="n_bins"):
        M.CalibrationAccumulator(0)
    with pytest.raises(ValueError, match="different settings"):
        M.CalibrationAccumulator(10).merge(M.CalibrationAccumulator(15))


# -- population bootstrap and real data ---------------------------------------------------------------
def test_population_bootstrap_matches_index_resampling():
    g = torch.Generator().manual_seed(11)
    y = torch.randint(0, 3, (300,), generator=g)
    pop = torch.stack([torch.where(torch.rand(300, generator=g) < 0.7, y, (y + 1) % 3) for _ in range(3)])
    ci = M.accuracy_ci(pop, y, n_boot=4000, seed=1)
    r = (pop == y[None]).double().mean(0).numpy()
    assert ci.n_models == 3 and ci.accuracy == pytest.approx(float(r.mean()), abs=1e-15)
    rng = np.random.default_rng(5)
    boots = r[rng.integers(0, 300, size=(4000, 300))].mean(1)
    lo, hi = np.quantile(boots, [0.025, 0.975])
    assert abs(ci.low - lo) < 0.008 and abs(ci.high - hi) < 0.008
    # single-model population == single model
    assert M.accuracy_ci(pop[0], y, seed=2) == M.accuracy_ci(pop[:1], y, seed=2)
    d = M.accuracy_difference_ci(pop[:2], pop[2:], y, n_boot=1000)
    ref = float((pop[2] == y).double().mean() - (pop[:2] == y).double().mean())
    assert d.accuracy == pytest.approx(ref, abs=1e-12) and d.low <= ref <= d.high
    with pytest.raises(ValueError, match="NaN"):
        M.bootstrap_mean_ci(torch.tensor([1.0, float("nan")]))


def test_knn_overlap_on_real_digits():
    from sklearn.decomposition import PCA

    from minidiff.data import load_builtin

    x = load_builtin("digits").features()[:500].double()
    pca = torch.from_numpy(PCA(n_components=12, random_state=0).fit_transform(x.numpy()))
    k = 10
    r = M.knn_overlap(x.float(), pca.float(), k=k, chunk_size=128)

    def brute(e):
        z = e / e.norm(dim=1, keepdim=True)
        sim = z @ z.T
        sim.fill_diagonal_(-math.inf)
        top = sim.topk(k + 1, dim=1)
        clear = (top.values[:, k - 1] - top.values[:, k]) > 1e-5  # no tie at the k-th place
        return [set(row[:k]) for row in top.indices.tolist()], clear

    na, ca = brute(x)
    nb, cb = brute(pca)
    ok = (ca & cb).numpy()
    assert ok.mean() > 0.9
    ref = np.array([len(a & b) / len(a | b) for a, b in zip(na, nb)])
    np.testing.assert_allclose(r.per_example.numpy()[ok], ref[ok], rtol=0, atol=1e-12)
    assert 0.2 < r.mean < 0.9  # PCA keeps part of the neighbourhood structure


def test_ood_on_real_digits():
    from minidiff.data import load_builtin

    d = load_builtin("digits")
    x = d.features()
    id_mask = d.labels < 5
    idx = torch.nonzero(id_mask).reshape(-1)
    train, held = x[idx[::2]], x[idx[1::2]]
    ood = x[~id_mask]
    r = M.ood_detect(train, held, ood, k=10)
    assert r.id_acceptance == pytest.approx(0.95, abs=0.01)
    assert 0.2 < r.detection_rate < 1.0  # unseen digit classes are partly flagged on raw pixels
    assert torch.equal(r.flags, r.ood_scores > r.threshold)


def test_class_impact_undefined_classes_are_nan():
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    base = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 0, 1, 0, 0, 2]])  # class 2: recall 0 in model 0 only
    comp = torch.tensor([[0, 1, 1, 1, 2, 0], [0, 0, 0, 1, 2, 2]])
    r = M.class_impact(base, comp, y, 4)  # class 3 has no examples
    assert torch.isnan(r.normalized_change[3]) and not torch.isnan(r.normalized_change[2])
    assert r.to_dict()["normalized_change"][3] is None
    r0 = M.class_impact(base[:1], comp, y, 3)
    assert torch.isnan(r0.normalized_change[2])  # base never right on class 2


# ---- numerics and scalar arguments (regressions) -------------------------------------------
@pytest.mark.parametrize("n_boot", [0, 1, 99])
def test_bootstrap_needs_enough_resamples(n_boot):
    with pytest.raises(ValueError, match="at least 100 resamples"):
        M.bootstrap_mean_ci([0.0, 1.0, 1.0], n_boot=n_boot)
    y = torch.tensor([0, 1, 1, 0])
    with pytest.raises(ValueError, match="at least 100"):
        M.accuracy_ci(y, y, n_boot=n_boot)
    with pytest.raises(ValueError, match="at least 100"):
        M.accuracy_difference_ci(y, y, y, n_boot=n_boot)


def test_bootstrap_scalar_arguments():
    with pytest.raises(TypeError, match="n_boot must be an integer"):
        M.bootstrap_mean_ci([0.0, 1.0], n_boot=250.5)
    with pytest.raises(TypeError, match="confidence"):
        M.bootstrap_mean_ci([0.0, 1.0], confidence=True)
    a = M.bootstrap_mean_ci([0.0, 1.0, 1.0], n_boot=np.int64(300), confidence=np.float32(0.9))
    b = M.bootstrap_mean_ci([0.0, 1.0, 1.0], n_boot=300, confidence=torch.tensor(0.9, dtype=torch.float64))
    assert a[0] == b[0] == pytest.approx(2 / 3, rel=1e-15)


def test_python_lists_stay_float64():
    vals = [1.0 + 1e-9, 1.0 + 3e-9]  # float32 would round both to 1.0
    assert M.bootstrap_mean_ci(vals, n_boot=200)[0] == np.mean(vals)
    ks = M.ks_shift(vals, [0.5, 0.25])
    assert ks.mean_base == np.mean(vals) and ks.median_base == np.median(vals)
    assert M.ood_threshold([0.1, 0.2, 0.3], tpr=0.5) == 0.2  # float32 0.2 is 0.200000003
    assert M.ood_threshold([0.1, 0.2, 0.3], tpr=np.float32(0.5)) == 0.2
    assert M.ood_threshold(torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64), tpr=torch.tensor(0.5)) == 0.2
    with pytest.raises(TypeError, match="tpr"):
        M.ood_threshold([0.1, 0.2], tpr="0.5")
    with pytest.raises(ValueError, match="tpr"):
        M.ood_threshold([0.1, 0.2], tpr=1.0)
    with pytest.raises(TypeError, match="real numbers"):
        M.ks_shift(["a", "b"], [0.5])


def test_knn_ood_scores_exact_for_near_duplicates():
    g = torch.Generator().manual_seed(4)
    train = torch.randn(300, 64, generator=g)
    queries = torch.cat([train[:20] * 3.0,                                   # exact duplicates (distance 0)
                         train[20:40] + 1e-5 * torch.randn(20, 64, generator=g),  # near duplicates
                         torch.randn(20, 64, generator=g)])                 # ordinary queries
    for k in (1, 5):
        got = M.knn_ood_scores(train, queries, k=k, chunk_size=16)
        zt = train.double() / train.double().norm(dim=1, keepdim=True)
        zq = queries.double() / queries.double().norm(dim=1, keepdim=True)
        ref = torch.cdist(zq, zt, compute_mode="donot_use_mm_for_euclid_dist").kthvalue(k, dim=1).values
        # float32 normalization is the only rounding left: ~1e-7, not the 5e-4 of sqrt(2 - 2 cos)
        assert torch.allclose(got, ref, rtol=0, atol=2e-7), (got - ref).abs().max()
        if k == 1:
            assert torch.all(got[:20] <= 2e-7)


def test_knn_ood_scores_many_ties_fall_back_to_all_candidates():
    # 40 copies of one direction: the 16 spare candidates cannot hold every tie
    g = torch.Generator().manual_seed(9)
    base = torch.randn(1, 32, generator=g)
    train = torch.cat([base.repeat(40, 1) * torch.linspace(1, 2, 40)[:, None], torch.randn(60, 32, generator=g)])
    q = torch.cat([base + 1e-4 * torch.randn(3, 32, generator=g), torch.randn(2, 32, generator=g)])
    got = M.knn_ood_scores(train, q, k=30)
    zt = train.double() / train.double().norm(dim=1, keepdim=True)
    zq = q.double() / q.double().norm(dim=1, keepdim=True)
    ref = torch.cdist(zq, zt, compute_mode="donot_use_mm_for_euclid_dist").kthvalue(30, dim=1).values
    assert torch.allclose(got, ref, rtol=0, atol=2e-7)


def test_summaries_and_layer_correspondence_read_lists_as_float64():
    from minidiff.metrics.summaries import quantiles

    assert quantiles([0.1, 0.2, 0.3], 0.5) == 0.2  # float32 0.2 is 0.200000003
    # float32 would round 0.30000001 to 0.3 and make the argmax a tie
    assert M.layer_correspondence([[0.3, 0.30000001], [0.5, 0.1]]).best_for_a.tolist() == [1, 0]
