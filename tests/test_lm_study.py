"""The language-model study: windows and the llama.cpp scoring rule, study numbers against a
direct computation from the models' logits, streaming and shards, tokenizer refusal, the
base-file mode's error bound, and the quick LM demo."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from minidiff.lm import TokenDivergenceAccumulator, token_divergence
from minidiff.lm.study import (LMStudy, base_file_error_bound, dequantize_logprobs, quantize_logprobs)
from minidiff.lm.tinylm import train_tokenizer
from minidiff.lm.windows import adds_bos, chatterbot_text, check_same_tokenizer, make_windows

SCALARS = ("kld", "kld_err", "kld_reverse", "js", "same_top1", "ppl_base", "ppl_variant", "delta_p", "delta_p_rms",
           "ln_ppl_ratio", "ln_ppl_ratio_err", "kld_max", "kld_min", "top5_overlap", "entropy_base",
           "window_ln_ppl_correlation")


class _BosTok:
    bos_token_id = 1

    def __len__(self) -> int:
        return 40


def _perturbed(model: nn.Module, scale: float = 0.05, seed: int = 1) -> nn.Module:
    v = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in v.parameters():
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=g))
    return v


# -- windows ------------------------------------------------------------------------------

def test_window_rule_by_hand():
    w = make_windows(list(range(10, 30)), 8)  # 20 tokens, no BOS: 2 windows, tail of 4 dropped
    assert w.input_ids.tolist() == [list(range(10, 18)), list(range(18, 26))]
    assert w.logit_positions.tolist() == [4, 5, 6]  # first = n_ctx/2 = 4 .. n_ctx-2
    assert w.target_positions.tolist() == [5, 6, 7]  # n_ctx - 1 - first = 3 scored per window
    assert w.targets.tolist() == [[15, 16, 17], [23, 24, 25]]
    assert int(w.token_frequency.sum()) == 6 and int(w.token_frequency[15]) == 1

    b = make_windows(list(range(10, 30)), 8, tokenizer=_BosTok(), add_bos=True)
    # BOS goes in front of the text once, then replaces the first token of every window
    assert b.input_ids.tolist() == [[1, *range(10, 17)], [1, *range(18, 25)]]
    assert b.targets.tolist() == [[14, 15, 16], [22, 23, 24]]
    with pytest.raises(ValueError, match="fewer than one window"):
        make_windows([1, 2, 3], 8)


def test_windows_follow_the_tokenizer(tok, text):
    assert adds_bos(tok)
    w = make_windows(text, 32, tokenizer=tok, max_windows=3)
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]
    assert w.input_ids[1, 1:].tolist() == ids[33:64] and int(w.input_ids[1, 0]) == tok.bos_token_id
    assert w.targets[2].tolist() == ids[64 + 17:96]


def test_scoring_equals_hand_computed_nll(tok, text, tiny_lm):
    base = tiny_lm(tok)
    st = LMStudy(base, {"same": copy.deepcopy(base)}, text=text, tokenizer=tok, n_ctx=16, batch_size=3,
                 max_windows=5, cka=False, explain_windows=0)
    res = st.run().variants["same"].divergence
    nll = []
    with torch.no_grad():
        for x in st.windows.input_ids:
            lp = torch.log_softmax(base(input_ids=x[None]).logits[0].double(), -1)
            nll += [-float(lp[j, x[j + 1]]) for j in range(8, 15)]  # logits at first..n_ctx-2
    assert res["ppl_base"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)
    assert res["n_tokens"] == 5 * 7


# -- study numbers ------------------------------------------------------------------------

def test_identical_models_give_zero(tok, text, tiny_lm):
    base = tiny_lm(tok)
    res = LMStudy(base, {"copy": copy.deepcopy(base)}, text=text, tokenizer=tok, n_ctx=16, batch_size=4,
                  max_windows=6).run().variants["copy"]
    d = res.divergence
    assert d["kld"] == 0.0 and d["kld_reverse"] == 0.0 and d["kld_max"] == 0.0 and d["js"] == 0.0
    assert d["same_top1"] == 1.0 and d["delta_p_rms"] == 0.0 and d["ppl_base"] == d["ppl_variant"]
    assert res.flipped_tokens == []
    cka = torch.tensor(res.cka, dtype=torch.float64)
    assert torch.allclose(cka.diagonal(), torch.ones(cka.shape[0], dtype=torch.float64), atol=1e-9)


def _direct(st: LMStudy, base: nn.Module, var: nn.Module) -> TokenDivergenceAccumulator:
    """One accumulator update over every scored token of every window, from full logits."""
    w = st.windows
    with torch.no_grad():
        lb = base(input_ids=w.input_ids).logits[:, w.logit_positions]
        lv = var(input_ids=w.input_ids).logits[:, w.logit_positions]
    acc = TokenDivergenceAccumulator()
    acc.update(lb.reshape(-1, lb.shape[-1]), lv.reshape(-1, lv.shape[-1]), w.targets.reshape(-1),
               window_ids=torch.arange(w.n_windows).repeat_interleave(w.n_scored),
               positions=w.target_positions.repeat(w.n_windows),
               token_frequency=w.token_frequency[w.targets.reshape(-1)])
    return acc


def _close(a, b, rel=1e-7):
    for k in SCALARS:
        x, y = a[k], b[k]
        assert (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, rel=rel, abs=1e-12), k


def test_study_equals_direct_computation(tok, text, tiny_lm):
    from minidiff import cka_matrix

    base = tiny_lm(tok)
    var = _perturbed(base)
    st = LMStudy(base, {"v": var}, text=text, tokenizer=tok, n_ctx=16, batch_size=3, max_windows=7)
    res = st.run().variants["v"]
    direct = _direct(st, base, var).compute()
    _close(res.divergence, direct)
    # where it hurts: details kept while streaming == both models rerun on those windows
    assert [x["window"] for x in res.where_it_hurts] == [t["window_id"] for t in direct.top_windows[:4]]
    st._details = {}
    rerun, _ = st.explain("v", res.divergence)
    for a, b in zip(res.where_it_hurts, rerun):
        assert a["mean_kld"] == pytest.approx(b["mean_kld"], rel=1e-6) and a["flips"] == b["flips"]
        for ta, tb in zip(a["tokens"], b["tokens"]):
            for key in ("base_top", "variant_top"):
                assert [c[0] for c in ta.get(key, [])] == [c[0] for c in tb.get(key, [])]
                assert [c[1] for c in ta.get(key, [])] == pytest.approx([c[1] for c in tb.get(key, [])], rel=1e-5)
    assert res.divergence["kld"] > 1e-4  # a real difference was measured
    for key in ("by_frequency", "by_position", "by_entropy", "top_windows"):
        assert res.divergence[key] == pytest.approx(_as_plain(direct[key]))
    # token-level CKA: one sample per scored token, all layer pairs
    w = st.windows
    with torch.no_grad():
        hb = base(input_ids=w.input_ids, output_hidden_states=True).hidden_states
        hv = var(input_ids=w.input_ids, output_hidden_states=True).hidden_states
    fa = [h[:, w.logit_positions].reshape(-1, h.shape[-1]) for h in hb]
    fb = [h[:, w.logit_positions].reshape(-1, h.shape[-1]) for h in hv]
    ref = cka_matrix(fa, fb, estimator="unbiased")
    assert torch.allclose(torch.tensor(res.cka, dtype=torch.float64), torch.as_tensor(ref).double(), atol=1e-6)
    assert res.layers_base == [f"hidden_states.{i}" for i in range(len(hb))]


def _as_plain(x):
    from minidiff.lm.study import _jsonable

    return _jsonable(x)


def test_streaming_and_shards_equal_one_pass(tok, text, tiny_lm):
    base = tiny_lm(tok)
    var = _perturbed(base)
    one = LMStudy(base, {"v": var}, text=text, tokenizer=tok, n_ctx=16, batch_size=9, max_windows=9, cka=False)
    full = one.stream()["v"]["divergence"]
    st = LMStudy(base, {"v": var}, text=text, tokenizer=tok, n_ctx=16, batch_size=2, max_windows=9, cka=False)
    a = st.stream(0, 4)["v"]["divergence"]  # two shards of windows, as two torchrun ranks would hold
    b = st.stream(4, 9)["v"]["divergence"]
    merged = a.merge(b).compute()
    ref = full.compute()
    _close(merged, ref, rel=1e-9)
    assert merged.top_windows == ref.top_windows and merged.flips == ref.flips


def test_plain_module_returning_logits(tok, text):
    class Bigram(nn.Module):
        def __init__(self, v: int, seed: int) -> None:
            super().__init__()
            torch.manual_seed(seed)
            self.emb = nn.Embedding(v, 16)
            self.out = nn.Linear(16, v)

        def forward(self, x):
            return self.out(torch.tanh(self.emb(x))) * 5

    a, b = Bigram(len(tok), 0), Bigram(len(tok), 1)
    st = LMStudy(a, {"b": b}, text=text, tokenizer=tok, n_ctx=16, batch_size=4, max_windows=4, layers=["emb", "out"])
    res = st.run().variants["b"]
    assert res.layers_base == ["emb", "out"] and len(res.cka) == 2
    with torch.no_grad():
        w = st.windows
        direct = token_divergence(a(w.input_ids)[:, w.logit_positions], b(w.input_ids)[:, w.logit_positions],
                                  w.targets)
    assert res.divergence["kld"] == pytest.approx(float(direct["kld"].mean()), rel=1e-9)
    with pytest.raises(ValueError, match="not a transformers model"):
        LMStudy(a, {"b": b}, text=text, tokenizer=tok, n_ctx=16, max_windows=2).run()


def test_different_tokenizers_refused(tok, text, tiny_lm):
    other = train_tokenizer(text, 280)
    base = tiny_lm(tok)
    with pytest.raises(ValueError, match="different tokenizers"):
        LMStudy(base, {"v": base}, text=text, tokenizer=tok, tokenizers={"v": other}, n_ctx=16)
    with pytest.raises(ValueError, match="different tokenizers"):
        check_same_tokenizer({"a": tok, "b": other})
    check_same_tokenizer({"a": tok, "b": copy.deepcopy(tok)})  # equal tokenizers pass


# -- base-file mode -------------------------------------------------------------------------

def test_logprob_quantization_error_within_bound():
    g = torch.Generator().manual_seed(0)
    z = 2.0 * torch.randn(64, 5000, generator=g, dtype=torch.float64)
    w = z + 0.3 * torch.randn(64, 5000, generator=g, dtype=torch.float64)
    codes, m = quantize_logprobs(z)
    assert int(codes.min()) >= 0 and int(codes.max()) == 65535
    back = dequantize_logprobs(codes, m).double()
    exact = token_divergence(z, w)["kld"]
    approx = token_divergence(back, w)["kld"]
    bound = base_file_error_bound(z, w)
    err = (approx - exact).abs()
    assert bool((err <= bound).all()), float((err - bound).max())
    assert float(bound.max()) < 1e-3


def test_base_file_mode_matches_exact_within_bound(tok, text, tmp_path, tiny_lm):
    base = tiny_lm(tok)
    var = _perturbed(base)
    kw = dict(text=text, tokenizer=tok, n_ctx=16, batch_size=4, max_windows=8)
    exact = LMStudy(base, {"v": var}, cka=False, **kw)
    res_e = exact.run().variants["v"].divergence
    res_f = LMStudy(base, {"v": var}, base_file=tmp_path / "basefile", **kw).run()
    d = res_f.variants["v"].divergence
    assert res_f.study["mode"] == "base-file" and res_f.variants["v"].cka is None
    w = exact.windows
    with torch.no_grad():
        lb = base(input_ids=w.input_ids).logits[:, w.logit_positions].reshape(-1, len(tok))
        lv = var(input_ids=w.input_ids).logits[:, w.logit_positions].reshape(-1, len(tok))
    bound = float(base_file_error_bound(lb, lv).mean())
    assert abs(d["kld"] - res_e["kld"]) <= bound
    assert d["same_top1"] == pytest.approx(res_e["same_top1"], abs=2 / d["n_tokens"])
    assert d["ppl_variant"] == pytest.approx(res_e["ppl_variant"], rel=1e-9)  # the variant pass is exact
    assert res_f.variants["v"].where_it_hurts  # windows explained from the base file


# -- report and demo ---------------------------------------------------------------------------

def test_report_escapes_text():
    from minidiff.report.lm import render_lm_report, terminal_table

    d = {"kld": 0.1, "kld_err": 0.01, "kld_percentiles": {"50.0": 0.05}, "delta_p_percentiles": {"50.0": -0.01},
         "by_frequency": [], "by_position": [], "by_entropy": []}
    res = {"study": {"name": "<script>x</script>", "n_windows": 1, "n_ctx": 8},
           "variants": {"<b>v</b>": {"divergence": d, "where_it_hurts": [
               {"window": 0, "mean_kld": 0.1, "flips": 1, "tokens": [
                   {"text": "<img src=x>", "scored": False},
                   {"text": "\"'&", "scored": True, "kld": 0.2, "p_base": 0.5, "p_variant": 0.1, "flipped": True,
                    "base_top": [["<a>", 0.5]], "variant_top": [["</td>", 0.6]]}]}],
               "flipped_tokens": [{"window": 0, "position": 1, "context": "<i>", "target": "<u>", "after": "",
                                   "kld": 0.2, "base_top": [["<a>", 0.5]], "variant_top": [["</td>", 0.6]]}]}}}
    page = render_lm_report(res, plots=False)
    for raw in ("<script>", "<img src=x>", "<b>v</b>", "<a>", "</td>'", "<i>", "<u>"):
        assert raw not in page
    assert "&lt;img src=x&gt;" in page and "Median  KLD:   0.050000" in terminal_table(res)


@pytest.fixture(scope="module")
def lm_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("lm-cache")


def test_quick_lm_demo(tmp_path, capsys, lm_cache):
    from minidiff.study.demo import run_lm_demo

    res = run_lm_demo(tmp_path / "lm", quick=True, cache_dir=lm_cache)
    table = capsys.readouterr().out
    for line in ("====== Perplexity statistics ======", "Mean PPL(Q)/PPL(base)", "====== KL divergence statistics",
                 "99.9%   KLD:", "RMS Δp    :", "Same top p:"):
        assert line in table
    assert res.variants == ["int8", "int4-g32", "prune-50"]
    kl = {k: v["divergence"]["kld"] for k, v in res["language_model"]["variants"].items()}
    assert 0 < kl["int8"] < kl["prune-50"]
    page = (tmp_path / "lm" / "report.html").read_text(encoding="utf-8")
    assert "Flipped tokens in context" in page and "<mark>" in page and "Language model" in page
    assert {"results.json", "language_model.csv", "lm_int8.csv", "lm_prune-50_buckets.csv"} <= {
        f.name for f in (tmp_path / "lm").iterdir()}
    # the combined demo report: the LM variants' verdicts and a link to lm/report.html
    from minidiff import Results
    from minidiff.study.demo import merge_results

    from minidiff.results import decide_all, legends

    other = {"schema": "minidiff.results/2", "thresholds": legends(), "variants": ["a"],
             "verdicts": {"a": decide_all("a", {})}, "models": {}, "prediction_errors": {}, "representation": {},
             "distribution": {}, "adversarial": {"not_measured": "no attacks"},
             "study": {"name": "s", "seed": 0, "minidiff_version": "0", "population": 1,
                       "data": {"name": "d", "num_eval": 3}, "ood": None}}
    merged = Results.from_dict(merge_results({"x": other}, "demo", res))
    assert merged.variants == ["x-a", "lm-int8", "lm-int4-g32", "lm-prune-50"]
    assert merged.verdicts["lm-int8"]["language_model"].verdict == res.verdicts["int8"]["language_model"].verdict
    merged.save(tmp_path / "combined")
    page = (tmp_path / "combined" / "report.html").read_text(encoding="utf-8")
    assert 'href="lm/report.html"' in page and "<th>lm-prune-50</th>" in page  # link + verdict row
    assert Results.load(tmp_path / "combined").section("language_model")["lm"]["study"]["report"] == "lm/report.html"


def test_study_file(tmp_path, lm_cache):
    from minidiff.lm.config import build_lm_study, is_lm_study, load_lm_config, parse_lm_config
    from minidiff.study.config import StudyFileError

    f = tmp_path / "lm.toml"
    f.write_text("""
[study]
task = "causal-lm"
batch_size = 8
[data]
source = "builtin"
name = "chatterbot-en"
n_ctx = 64
max_windows = 4
[base]
kind = "tinylm"
quick = true
[[variants]]
name = "int4"
recipe = "int4-weight-only"
group_size = 32
[[variants]]
name = "sparse"
recipe = "prune-2:4"
[layers]
cka = false
""")
    cfg = load_lm_config(f)
    assert is_lm_study({"study": {"task": "causal-lm"}})
    res = build_lm_study(cfg, cache_dir=lm_cache).run()  # the demo test's cached tiny LM
    assert set(res.variants) == {"int4", "sparse"} and res.study["n_windows"] == 4
    assert res.variants["sparse"].divergence["kld"] > 0
    with pytest.raises(StudyFileError, match="group_sizes|unknown|Extra inputs"):
        parse_lm_config({"data": {"name": "chatterbot-en"}, "base": {}, "variants": [{"name": "a", "recipe": "int8",
                                                                                         "group_sizes": 3}]})


def test_masked_lm_pseudo_log_likelihood(text):
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from minidiff.models.loading import embedded_minilm_dir

    btok = AutoTokenizer.from_pretrained(embedded_minilm_dir())
    torch.manual_seed(0)
    conf = BertConfig(vocab_size=len(btok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=64)
    base = BertForMaskedLM(conf).eval()
    var = _perturbed(base, 0.2)
    st = LMStudy(base, {"v": var}, text=text, tokenizer=btok, task="masked-lm", n_ctx=12, batch_size=10,
                 max_windows=3, cka=False)
    w = st.windows
    assert int(w.input_ids[0, 0]) == btok.cls_token_id and int(w.input_ids[0, -1]) == btok.sep_token_id
    assert w.target_positions.tolist() == [7, 8, 9, 10]  # second half of the 10 text tokens
    res = st.run().variants["v"].divergence
    nll = []
    with torch.no_grad():
        for x in w.input_ids:
            for p in w.target_positions.tolist():
                xm = x.clone()
                xm[p] = btok.mask_token_id
                nll.append(-float(torch.log_softmax(base(input_ids=xm[None]).logits[0, p].double(), -1)[x[p]]))
    assert res["ppl_base"] == pytest.approx(math.exp(sum(nll) / len(nll)), rel=1e-5)
    assert res["n_tokens"] == 12 and res["kld"] > 0


def test_load_text_sources(tmp_path):
    from minidiff.lm.windows import load_text

    (tmp_path / "a.txt").write_text("plain text\nline two", encoding="utf-8")
    (tmp_path / "b.jsonl").write_text('{"text": "first"}\n{"text": "second", "x": 1}\n', encoding="utf-8")
    assert load_text("text", path=tmp_path / "a.txt") == "plain text\nline two"
    assert load_text("jsonl", path=tmp_path / "b.jsonl") == "first\n\nsecond"
    held_out, train = load_text("builtin", name="chatterbot-en"), chatterbot_text("english", "train")
    n = [t.count("\n\n") + 1 for t in (held_out, train, chatterbot_text("english", "all"))]
    assert n[0] + n[1] == n[2] and n[0] == -(-n[2] // 10)  # every 10th conversation held out
    with pytest.raises(ValueError, match="unknown built-in text"):
        load_text("builtin", name="nope")
    with pytest.raises(ValueError, match="needs a path"):
        load_text("jsonl")


# -- results system: the language_model section and its verdict rule --------------------------

def test_lm_results_round_trip(tmp_path, tok, text, tiny_lm):
    from minidiff import Results
    from minidiff.results import RULES, LanguageModelSection, Verdict

    base = tiny_lm(tok)
    st = LMStudy(base, {"v": _perturbed(base), "same": copy.deepcopy(base)}, text=text, tokenizer=tok, n_ctx=16,
                 batch_size=3, max_windows=5)
    res = st.run(tmp_path / "lm")
    back = Results.load(tmp_path / "lm")
    assert back.json_data()["schema"] == "minidiff.results/2" and back.variants == ["v", "same"]
    sec = back.section("language_model")
    assert isinstance(sec, LanguageModelSection) and sec["study"]["n_windows"] == 5
    for v in ("v", "same"):
        d, e = res.variants[v].divergence, sec["variants"][v]["divergence"]
        for k in SCALARS:
            x = d[k]
            y = e[k] if not isinstance(e[k], dict) else None
            if x is None:  # NaN in LMStudyResult: not computed in Results
                assert y is None or math.isnan(y), k
            else:
                assert y == x, k
        assert e["kld_percentiles"] == d["kld_percentiles"]  # keys "99.9", ... in both forms
        assert sec["variants"][v]["flipped_tokens"] == res.variants[v].flipped_tokens
        assert sec["variants"][v]["cka"] == res.variants[v].cka
    assert back.verdict("same", "language_model") == Verdict.SAME
    frames = back.frames()
    stats = frames["lm_v"].set_index("statistic")
    assert stats.loc["Mean KLD", "value"] == res.variants["v"].divergence["kld"]
    assert stats.loc["Same top p", "uncertainty"] == res.variants["v"].divergence["same_top1_err"]
    assert set(frames["lm_v_buckets"]["breakdown"]) == {"by_frequency", "by_position", "by_entropy"}
    assert frames["language_model"]["variant"].tolist() == ["v", "same"]
    page = (tmp_path / "lm" / "report.html").read_text(encoding="utf-8")
    assert "====== KL divergence statistics" in page and "Where it hurts" in page
    assert back.thresholds["language_model"] == RULES["language_model"].legend()
    # saving the loaded results again gives the same JSON
    back.save(tmp_path / "again")
    assert Results.load(tmp_path / "again").json_data() == back.json_data()
    # without CKA the entry says why (the report's "Not computed, and why")
    no_cka = LMStudy(base, {"v": _perturbed(base)}, text=text, tokenizer=tok, n_ctx=16, batch_size=3, max_windows=2,
                     cka=False).run().to_results()
    assert [r[:3] for r in no_cka.not_computed() if r[2] == "cka"] == [("language_model", "v", "cka")]


@pytest.mark.parametrize("kld,same,want", [(0.001, 0.99, "same"), (0.005, 0.97, "same"), (0.006, 0.99, "minor"),
                                           (0.001, 0.95, "minor"), (0.0501, 0.99, "differs"),
                                           (0.01, 0.899, "differs"), (0.05, 0.90, "minor")])
def test_language_model_verdict_rule(kld, same, want):
    from minidiff.results import LanguageModelRule, RULES

    rule = RULES["language_model"]
    assert isinstance(rule, LanguageModelRule)
    cell = rule.decide("q", {"language_model": {"divergence": {"kld": kld, "same_top1": same, "ppl_ratio": 1.01}}})
    assert cell.verdict.value == want and f"{100 * same:.1f}%" in cell.summary
    strict = LanguageModelRule(kld_same=0.0005)
    assert "0.0005" in strict.legend() and "97%" in rule.legend()
    assert rule.decide("q", {}).verdict.value == "not_measured"
    assert rule.decide("q", {"language_model": {"divergence": {"kld": {"not_computed": "x"}, "same_top1": 1.0}}}
                       ).verdict.value == "not_measured"


def test_flip_top3_tie_rule_and_skip():
    """The flipped tokens' top-3 equal a stable descending sort (smaller id first on ties),
    and skipping flips that cannot enter a full list changes nothing."""
    from minidiff.lm.accumulator import _top_k_smallest_id_first

    g = torch.Generator().manual_seed(3)
    for trial in range(50):
        V = int(torch.randint(3, 40, (1,), generator=g))
        x = torch.randint(0, 3, (6, V), generator=g).double() if trial % 2 else torch.randn(6, V, generator=g,
                                                                                           dtype=torch.float64)
        ids, vals = _top_k_smallest_id_first(x, 3)
        ref = torch.sort(x, dim=-1, descending=True, stable=True)
        assert torch.equal(ids, ref.indices[:, :3]) and torch.equal(vals, ref.values[:, :3])
    z = torch.randn(200, 30, generator=g)
    w = z + 2 * torch.randn(200, 30, generator=g)
    w[:, :4] = torch.round(w[:, :4])  # ties among the top candidates
    t = torch.randint(0, 30, (200,), generator=g)
    wid = torch.arange(200) // 20
    one = TokenDivergenceAccumulator(max_flips=7)
    one.update(z, w, t, window_ids=wid, positions=torch.arange(200) % 20)
    small = TokenDivergenceAccumulator(max_flips=7)
    for lo in range(0, 200, 20):  # later batches meet a full list
        small.update(z[lo:lo + 20], w[lo:lo + 20], t[lo:lo + 20], window_ids=wid[lo:lo + 20],
                     positions=torch.arange(20))
    assert one.compute().flips == small.compute().flips and len(one.compute().flips) == 7
