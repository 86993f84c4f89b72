"""Layer-swap sensitivity in a language-model study ([metrics.layer_swap] of a causal-lm study
file, LMStudy(layer_swap=...)): the section's numbers equal minidiff.localize.layer_swap called
directly on the same models and windows (scored tokens only); rankings are sorted; units are
tokens, same top-1 = 1 - churn; the cost is logged before any swap; a rerun reads the cache;
GPT-2 variants of another architecture, other widths and base-file mode carry reasons; the
LM report and CSVs show the section; study-file errors name the key."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from minidiff.compress import quantize
from minidiff.localize import layer_swap
from minidiff.lm.study import LMStudy
from minidiff.study.swap import swap_subset

pytestmark = pytest.mark.usefixtures("one_thread")

N_CTX, BATCH, WINDOWS, EXAMPLES, SEED = 16, 3, 7, 5, 3


def _gpt2(tok) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=64)).eval()


@pytest.fixture(scope="module")
def models(tok, tiny_lm):
    base = tiny_lm(tok)
    return base, quantize(base, "int8"), quantize(base, "int4-weight-only", group_size=16)


def _study(tok, text, base, variants, **kw) -> LMStudy:
    opts = dict(text=text, tokenizer=tok, n_ctx=N_CTX, batch_size=BATCH, max_windows=WINDOWS, cka=False,
                explain_windows=0, seed=SEED)
    return LMStudy(base, variants, **{**opts, **kw})


def _direct(st: LMStudy, base: nn.Module, var: nn.Module, direction: str):
    """layer_swap on the study's sample of windows, batched as the study does, written here
    from the windows: full logits of every position, then the scored positions."""
    w = st.windows
    idx = swap_subset(w.n_windows, EXAMPLES, SEED)
    batches = [{"input_ids": w.input_ids[idx[s:s + BATCH]]} for s in range(0, len(idx), BATCH)]

    def fwd(m, b):
        return m(input_ids=b["input_ids"]).logits[:, w.logit_positions]
    return layer_swap(base, var, batches, granularity="block", direction=direction, forward=fwd,
                      max_examples=None), idx


def test_section_equals_direct_layer_swap(tok, text, models, tmp_path, caplog):
    base, q8, q4 = models
    st = _study(tok, text, base, {"int8": q8, "int4": q4}, layer_swap={"direction": "both", "examples": EXAMPLES})
    with caplog.at_level(logging.INFO, logger="minidiff"):
        res = st.run(tmp_path / "out")
    sec = res.layer_swap
    assert list(sec) == ["int8", "int4"]
    w = st.windows
    for name, var in (("int8", q8), ("int4", q4)):
        ent = sec[name]
        ref, idx = _direct(st, base, var.model, "both")
        assert ent["indices"] == idx and len(idx) == EXAMPLES and idx == sorted(idx)
        assert ent["kind"] == "language-model" and ent["unit"] == "tokens"
        assert ent["kl_function"] == "minidiff.lm.token_divergence"
        assert ent["n_examples"] == EXAMPLES and ent["n_units"] == EXAMPLES * w.n_scored == ref.n_units
        assert ent["pair"] == ["base", name] and ent["skipped"] == {}
        assert ent["whole_kl"] == pytest.approx(ref.whole_kl, rel=1e-6, abs=1e-12)
        assert ent["whole_churn"] == pytest.approx(ref.whole_churn, abs=1e-12)
        assert ent["whole_same_top1"] == pytest.approx(1.0 - ent["whole_churn"], abs=1e-15)
        assert ent["whole_kl"] > 0
        for d in ("into_base", "restore"):
            rows, want = ent[d], getattr(ref, d)
            assert [r["layer"] for r in rows] == [e.layer for e in want] == ref.ranking(d)
            assert [r["rank"] for r in rows] == list(range(1, len(rows) + 1))
            assert sorted(r["layer"] for r in rows) == sorted(ent["layers"])
            for r, e in zip(rows, want):
                assert r["kl"] == pytest.approx(e.kl, rel=1e-6, abs=1e-12)
                assert r["churn"] == pytest.approx(e.churn, abs=1e-12)
                assert r["same_top1"] == pytest.approx(1.0 - r["churn"], abs=1e-15)
            kls = [r["kl"] for r in rows]
            assert kls == (sorted(kls, reverse=True) if d == "into_base" else sorted(kls))
        # the model's own layers, not the lm_head alone: the transformer blocks are ranked
        assert {"model.layers.0", "model.layers.1"} <= set(ent["layers"])
        p = ent["plan"]
        assert p["forward_passes"] == p["n_batches"] * (2 + 2 * len(ent["layers"])) and p["n_batches"] == 2
    # the cost is stated before the first swap runs
    msgs = [r.getMessage() for r in caplog.records]
    cost = next(i for i, m in enumerate(msgs) if m.startswith("layer swap: 2 variant(s) x 5 window(s)"))
    done = next(i for i, m in enumerate(msgs) if m.endswith("s") and ": done in " in m)
    assert cost < done and "forward passes" in msgs[cost]

    # saved: typed section, CSVs, and the LM report shows it
    from minidiff import Results

    loaded = Results.load(tmp_path / "out")
    assert loaded.section("layer_swap")["int8"]["whole_kl"] == pytest.approx(sec["int8"]["whole_kl"], rel=1e-12)
    files = {f.name for f in (tmp_path / "out").iterdir()}
    assert {"layer_swap.csv", "layer_swap_int8.csv", "layer_swap_int4.csv", "language_model.csv"} <= files
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "Layer-swap sensitivity" in page and "same top-1" in page and "mean KLD" in page
    assert f"same {EXAMPLES} windows" in page and "model.layers.0" in page


def test_rerun_reads_cache(tok, text, models, tmp_path, monkeypatch):
    base, q8, _ = models
    cfg = {"examples": 3, "granularity": ["model.layers.1", "lm_head"]}
    first = _study(tok, text, base, {"int8": q8}, layer_swap=cfg, cache=tmp_path / "c").run().layer_swap
    assert [r["layer"] for r in first["int8"]["into_base"]] != [] and first["int8"]["granularity"] == "names"
    assert len(list((tmp_path / "c" / "layer_swap").glob("*.json"))) == 1

    def boom(*a, **k):
        raise AssertionError("a cached entry was recomputed")
    monkeypatch.setattr("minidiff.localize.layer_swap", boom)
    again = _study(tok, text, base, {"int8": q8}, layer_swap=cfg, cache=tmp_path / "c").run().layer_swap
    assert again == first
    with pytest.raises(AssertionError, match="recomputed"):  # another sample is another entry
        _study(tok, text, base, {"int8": q8}, layer_swap={**cfg, "examples": 2}, cache=tmp_path / "c").run()


def test_variants_left_out_with_reasons(tok, text, models, tmp_path, tiny_lm):
    base, q8, _ = models
    wide = tiny_lm(tok, hidden=48, seed=1)  # same module names, other widths
    res = _study(tok, text, base, {"gpt2": _gpt2(tok), "wide": wide, "int8": q8},
                 layer_swap={"examples": 2}).run(tmp_path / "o")
    sec = res.layer_swap
    assert "another architecture" in sec["gpt2"]["skipped"]["layer_swap"]
    assert "layer swaps do not apply" in sec["wide"]["skipped"]["layer_swap"]
    assert sec["int8"]["skipped"] == {} and sec["int8"]["whole_kl"] > 0
    page = (tmp_path / "o" / "report.html").read_text(encoding="utf-8")
    assert "gpt2: layer swaps not run" in page

    bf = _study(tok, text, base, {"int8": q8}, layer_swap=True, base_file=tmp_path / "bf").run().layer_swap
    assert "base-file mode" in bf["int8"]["skipped"]["layer_swap"]


def test_gpt2_base(tok, text):
    base = _gpt2(tok)
    with torch.no_grad():
        base.lm_head.weight.mul_(20.0)  # tied to the embedding; sharpen the output
    q8 = quantize(base, "int8")
    st = _study(tok, text, base, {"int8": q8}, layer_swap={"examples": 4})
    ent = st.run().layer_swap["int8"]
    w = st.windows
    idx = swap_subset(w.n_windows, 4, SEED)
    batches = [{"input_ids": w.input_ids[idx[s:s + BATCH]]} for s in range(0, len(idx), BATCH)]
    ref = layer_swap(base, q8.model, batches, forward=lambda m, b: m(input_ids=b["input_ids"]).logits[
        :, w.logit_positions], max_examples=None)
    assert "transformer.h.0" in ent["layers"] and ent["n_units"] == 4 * w.n_scored and ent["whole_kl"] > 0
    assert ent["whole_kl"] == pytest.approx(ref.whole_kl, rel=1e-6)
    assert [r["layer"] for r in ent["into_base"]] == ref.ranking()
    assert [r["kl"] for r in ent["into_base"]] == pytest.approx([e.kl for e in ref.into_base], rel=1e-6)


def test_study_file_keys(tok, text, tmp_path, tiny_lm):
    from minidiff.lm.config import build_lm_study, load_lm_config, parse_lm_config
    from minidiff.study.config import LayerSwapConfig
    from minidiff.validation import StudyFileError

    base = tiny_lm(tok)
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    f = tmp_path / "lm.toml"
    f.write_text(f"""
[study]
task = "causal-lm"
batch_size = 3
progress = false
[data]
source = "text"
path = "{(tmp_path / 'text.txt').as_posix()}"
n_ctx = 16
max_windows = 4
[base]
kind = "path"
path = "{(tmp_path / 'base').as_posix()}"
[[variants]]
name = "int8"
recipe = "int8"
[layers]
cka = false
[metrics.layer_swap]
examples = 3
direction = "restore"
""")
    cfg = load_lm_config(f)
    assert cfg.metrics.layer_swap == LayerSwapConfig(examples=3, direction="restore")
    res = build_lm_study(cfg, cache_dir=tmp_path / "cache").run(tmp_path / "out")
    ent = res.layer_swap["int8"]
    assert ent["directions"] == ["restore"] and ent["into_base"] == [] and len(ent["indices"]) == 3
    assert list((tmp_path / "cache" / "layer_swap").glob("*.json"))
    assert "Layer-swap sensitivity" in (tmp_path / "out" / "report.html").read_text(encoding="utf-8")

    data = {"data": {"name": "chatterbot-en"}, "base": {}, "variants": [{"name": "a", "recipe": "int8"}]}
    assert parse_lm_config({**data, "metrics": {"layer_swap": True}}).metrics.layer_swap == LayerSwapConfig()
    assert parse_lm_config({**data, "metrics": {"layer_swap": False}}).metrics.layer_swap is None
    assert parse_lm_config(data).metrics.layer_swap is None
    for bad, key in (({"granularity": "blocks"}, "layer_swap.granularity"), ({"examples": 0}, "layer_swap.examples"),
                     ({"exampels": 3}, "exampels")):
        with pytest.raises(StudyFileError, match=key):
            parse_lm_config({**data, "metrics": {"layer_swap": bad}})
    with pytest.raises(StudyFileError, match="metrics.cka"):
        parse_lm_config({**data, "metrics": {"cka": True}})
    # Python API: the same rule, and a layer the base lacks fails before any model runs
    with pytest.raises(ValueError, match="layer_swap: key .direction."):
        _study(tok, text, base, {"int8": quantize(base, "int8")}, layer_swap={"direction": "sideways"})
    with pytest.raises(TypeError, match="layer_swap must be"):
        _study(tok, text, base, {"int8": quantize(base, "int8")}, layer_swap="block")
    with pytest.raises(ValueError, match=r"\[metrics.layer_swap\] granularity names module"):
        _study(tok, text, base, {"int8": quantize(base, "int8")}, layer_swap={"granularity": ["model.layer.0"]}).run()


def test_masked_lm_scores_the_masked_positions(text):
    """Masked LMs: the swaps run on the study's masked copies and compare each copy's masked
    position only (the pseudo-log-likelihood tokens)."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from minidiff.models.loading import embedded_minilm_dir

    btok = AutoTokenizer.from_pretrained(embedded_minilm_dir())
    torch.manual_seed(0)
    base = BertForMaskedLM(BertConfig(vocab_size=len(btok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=64)).eval()
    var = quantize(base, "int8")
    st = LMStudy(base, {"int8": var}, text=text, tokenizer=btok, task="masked-lm", n_ctx=12, batch_size=8,
                 max_windows=5, cka=False, explain_windows=0, seed=SEED, layer_swap={"examples": 3})
    ent = st.run().layer_swap["int8"]
    w = st.windows
    idx = swap_subset(w.n_windows, 3, SEED)
    per = max(1, 8 // w.n_scored)  # windows per batch, as the study batches masked copies
    batches, positions = [], []
    for s in range(0, len(idx), per):
        xs = [w.masked_copies(i, i + 1) for i in idx[s:s + per]]
        batches.append({"input_ids": torch.cat([x for x, _ in xs])})
        positions.append(torch.cat([p for _, p in xs]))

    def fwd(m, b):
        x = b["input_ids"]
        p = next(pp for bb, pp in zip(batches, positions) if torch.equal(bb["input_ids"], x))
        return m(input_ids=x).logits[torch.arange(x.shape[0]), p][:, None]
    ref = layer_swap(base, var.model, batches, forward=fwd, max_examples=None)
    assert ent["n_units"] == ref.n_units == 3 * w.n_scored and ent["unit"] == "tokens"
    assert ent["whole_kl"] == pytest.approx(ref.whole_kl, rel=1e-6) and ent["whole_kl"] > 0
    assert [r["layer"] for r in ent["into_base"]] == ref.ranking()
    assert [r["kl"] for r in ent["into_base"]] == pytest.approx([e.kl for e in ref.into_base], rel=1e-6)
