"""Layer-swap sensitivity as a study stage ([metrics.layer_swap]): the section's numbers
equal minidiff.localize.layer_swap called directly on the same models and sample; the
rankings are sorted; a variant of another architecture and an unchanged copy carry
reasons instead of nulls; a rerun reads the cache; the report and CSVs show it only
when computed; the study file's keys are validated by name."""

from __future__ import annotations

import copy
import json

import pandas as pd
import pytest
import torch

from minidiff.study import Study, StudyFileError, parse_config

pytestmark = pytest.mark.usefixtures("one_thread")

SWAP = {"direction": "both", "examples": 100}


@pytest.fixture(scope="module")
def models(digits_family):
    """conftest's digits MLP, its int8 and 80%-pruned copies and a distilled student of
    another architecture, plus an unchanged copy (listed before the student)."""
    v = dict(digits_family["variants"])
    small = v.pop("small")
    return {**digits_family, "variants": {**v, "copy": copy.deepcopy(digits_family["base"]).eval(), "small": small}}


def _study(models, variants=None, cache_dir=None, swap=SWAP, seed=0):
    metrics = {"bootstrap": 100, "knn_k": 5, "characteristics": ["prediction_errors"]}
    if swap is not None:
        metrics["layer_swap"] = swap
    return Study(models["base"], variants or models["variants"], models["data"], name="swap", batch_size=32,
                 chunk_batches=1, progress=False, cache_dir=cache_dir, metrics=metrics, seed=seed)


@pytest.fixture(scope="module")
def run(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("swap") / "out"
    res = _study(models, cache_dir=out.parent / "cache").run(out=out)
    return res, out


def _direct(models, var, indices):
    from minidiff.localize import layer_swap
    x = models["data"].inputs[torch.as_tensor(indices)]
    batches = [x[s:s + 32] for s in range(0, len(indices), 32)]
    return layer_swap(models["base"], models["variants"][var], batches, granularity="block", direction="both",
                      max_examples=None)


def test_numbers_equal_layer_swap_called_directly(models, run):
    from minidiff.study.swap import swap_subset
    res, out = run
    saved = json.loads((out / "results.json").read_text())
    assert "layer_swap" in saved["sections"]
    indices = swap_subset(len(models["data"]), 100, 0)
    assert len(indices) == 100 and indices == sorted(set(indices))
    assert swap_subset(len(models["data"]), 500, 0) == list(range(150))  # all when the set is smaller
    for var in ("int8", "prune-80"):
        ent = saved["layer_swap"][var]
        assert ent["indices"] == indices and ent["n_examples"] == 100 and ent["unit"] == "examples"
        assert ent["pair"] == ["base", var] and ent["granularity"] == "block"
        want = _direct(models, var, indices)
        assert ent["layers"] == want.plan.layers == ["1", "3", "5"]
        assert ent["whole_churn"] == want.whole_churn and ent["whole_kl"] == want.whole_kl
        assert ent["plan"]["forward_passes"] == want.plan.forward_passes == 4 * (2 + 2 * 3)
        for d in ("into_base", "restore"):
            got = [(r["layer"], r["churn"], r["kl"], r["same_top1"], r["share_churn"], r["share_kl"])
                   for r in ent[d]]
            assert got == [(e.layer, e.churn, e.kl, e.same_top1, e.share_churn, e.share_kl)
                           for e in getattr(want, d)], (var, d)
        # the CSV holds every swap, the same numbers
        df = pd.read_csv(out / f"layer_swap_{var}.csv", dtype={"layer": str})
        assert len(df) == 6 and list(df.columns) == ["direction", "rank", "layer", "churn", "kl", "same_top1",
                                                     "share_churn", "share_kl"]
        ib = df[df.direction == "into_base"]
        assert list(ib["layer"]) == [r["layer"] for r in ent["into_base"]]
        assert list(ib["kl"]) == [r["kl"] for r in ent["into_base"]]
    # pruning 80% moves the output far more than int8 rounding
    assert saved["layer_swap"]["prune-80"]["whole_kl"] > 100 * saved["layer_swap"]["int8"]["whole_kl"]


def test_rankings_are_sorted(run):
    res, _ = run
    for var in ("int8", "prune-80"):
        ent = res["layer_swap"][var]
        ib, rs = ent["into_base"], ent["restore"]
        assert [r["rank"] for r in ib] == [1, 2, 3] and [r["rank"] for r in rs] == [1, 2, 3]
        kls = [r["kl"] for r in ib]
        assert kls == sorted(kls, reverse=True)
        shares = [r["share_kl"] for r in rs]  # largest recovery first
        assert shares == sorted(shares, reverse=True)
        for r in ib:
            assert r["share_kl"] == pytest.approx(r["kl"] / ent["whole_kl"], rel=1e-12)


def test_skipped_and_undefined_values_carry_reasons(run, null_paths):
    res, out = run
    saved = json.loads((out / "results.json").read_text())
    sec = saved["layer_swap"]
    small = sec["small"]
    assert set(small) == {"pair", "skipped"}
    why = small["skipped"]["layer_swap"]
    assert "another architecture" in why and "'5'" in why
    assert ("small", "layer_swap", why) in res.sections["layer_swap"].not_computed()
    # an unchanged copy: the whole change is exactly 0, so the shares are 0/0 and say so
    cp = sec["copy"]
    assert cp["whole_churn"] == 0.0 and cp["whole_kl"] == 0.0
    for r in cp["into_base"] + cp["restore"]:
        assert r["kl"] == 0.0 and r["churn"] == 0.0
        assert "whole-model change 0" in r["share_kl"]["not_computed"]
        assert "whole-model change 0" in r["share_churn"]["not_computed"]

    assert null_paths(sec) == []
    main = pd.read_csv(out / "layer_swap.csv")
    assert list(main["variant"]) == ["int8", "prune-80", "copy", "small"]
    assert main.set_index("variant").loc["small", "skipped"] == why
    assert not (out / "layer_swap_small.csv").exists()


def test_report_shows_the_ranking_only_when_computed(run, models):
    res, out = run
    html = (out / "report.html").read_text()
    assert 'id="layer-swap"' in html and 'data-plot="layer_swap"' in html
    assert (out / "plots" / "layer_swap.svg").is_file()
    i = html.index('id="layer-swap"')
    part = html[i:html.index('id="not-computed"')]
    assert "<h3>prune-80</h3>" in part and "share of whole KL" in part
    top = res["layer_swap"]["prune-80"]["into_base"][0]
    assert f"<td class=num>1</td><td>{top['layer']}</td>" in part
    assert "small: layer swaps not run: another architecture" in part
    # without [metrics.layer_swap]: no section, no heading
    from minidiff.report import render
    data = res.json_data()
    del data["layer_swap"]
    data["sections"].remove("layer_swap")
    page = render(data)
    assert 'id="layer-swap"' not in page and "Layer-swap sensitivity" not in page


def test_rerun_reads_the_cache(models, run, monkeypatch):
    import minidiff.localize
    res, out = run

    def boom(*a, **k):
        raise AssertionError("layer_swap ran again instead of reading the cache")

    monkeypatch.setattr(minidiff.localize, "layer_swap", boom)
    monkeypatch.setattr(minidiff.localize, "plan", boom)
    again = _study(models, cache_dir=out.parent / "cache").run()
    assert again.json_data()["layer_swap"] == res.json_data()["layer_swap"]
    # another sample (other seed) is not the cached one
    with pytest.raises(AssertionError, match="ran again"):
        _study(models, {"int8": models["variants"]["int8"]}, cache_dir=out.parent / "cache", seed=1).run()


def test_absent_unless_asked_and_named_layers(models):
    res = _study(models, {"int8": models["variants"]["int8"]}, swap=None).run()
    assert "layer_swap" not in res.sections and "layer_swap" not in res.json_data()
    res = _study(models, {"prune-80": models["variants"]["prune-80"]},
                 swap={"granularity": ["5"], "direction": "restore", "examples": 40}).run()
    ent = res["layer_swap"]["prune-80"]
    assert ent["layers"] == ["5"] and ent["directions"] == ["restore"] and ent["granularity"] == "names"
    assert ent["into_base"] == [] and len(ent["restore"]) == 1 and ent["n_examples"] == 40
    with pytest.raises(ValueError, match=r"\[metrics.layer_swap\] granularity.*'55'.*nearest: \['5'\]"):
        _study(models, {"int8": models["variants"]["int8"]}, swap={"granularity": ["55"]}).run()


BASE = {"data": {"source": "builtin", "name": "digits"}, "base": {"kind": "mlp"},
        "variants": [{"name": "int8", "recipe": "int8"}]}


def test_study_file_keys_are_validated():
    assert parse_config(BASE).metrics.layer_swap is None
    on = parse_config({**BASE, "metrics": {"layer_swap": True}}).metrics.layer_swap
    assert (on.granularity, on.direction, on.examples) == ("block", "into_base", 256)
    assert parse_config({**BASE, "metrics": {"layer_swap": False}}).metrics.layer_swap is None
    cfg = parse_config({**BASE, "metrics": {"layer_swap": {"granularity": "linear", "direction": "both",
                                                           "examples": 64}}})
    assert cfg.metrics.layer_swap.granularity == "linear" and cfg.metrics.layer_swap.examples == 64
    for bad, key in (({"granularity": "blocks"}, "metrics.layer_swap.granularity"),
                     ({"granularity": []}, "metrics.layer_swap.granularity"),
                     ({"granularity": ["0", "0"]}, "metrics.layer_swap.granularity"),
                     ({"direction": "into"}, "metrics.layer_swap.direction"),
                     ({"examples": 0}, "metrics.layer_swap.examples"),
                     ({"exemples": 10}, "metrics.layer_swap.exemples")):
        with pytest.raises(StudyFileError, match=key.replace(".", r"\.")):
            parse_config({**BASE, "metrics": {"layer_swap": bad}})
    with pytest.raises(StudyFileError, match=r"metrics\.layer_swap"):
        parse_config({**BASE, "metrics": {"layer_swap": "yes"}})


def test_check_states_the_plan(tmp_path):
    from minidiff.study.check import check_study
    p = tmp_path / "study.toml"
    p.write_text('[data]\nsource = "builtin"\nname = "digits"\n[base]\nkind = "mlp"\n'
                 '[[variants]]\nname = "int8"\nrecipe = "int8"\n[[variants]]\nname = "small"\nrecipe = "distill"\n'
                 'student = {hidden = [16]}\n[metrics.layer_swap]\ndirection = "both"\nexamples = 64\n')
    lines = [x for x in check_study(p) if "layer_swap" in x]
    assert len(lines) == 1
    assert "on 64 evaluation examples" in lines[0] and "direction both" in lines[0]
    assert "left out: small (a distilled student has another architecture)" in lines[0]


TEXTS = ["hello there", "what is your favourite book and why do you like it", "do you like football",
         "tell me a joke", "the weather is nice today, is it not", "who wrote hamlet",
         "i am learning to code in python", "what time is it", "my computer will not start",
         "how much money do i need to retire early", "can you recommend a film", "good night"]


def test_text_classifier_swaps_blocks_on_tokenized_batches():
    """Text data: batches are the tokenizer's dicts (attention mask included), blocks are the
    transformer's layers plus embeddings and head; the numbers equal a direct call."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from minidiff.compress import quantize
    from minidiff.data import ExampleSet
    from minidiff.localize import layer_swap
    from minidiff.models import TextClassifier, embedded_minilm_dir
    from minidiff.study.swap import swap_subset
    tok = AutoTokenizer.from_pretrained(str(embedded_minilm_dir()))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    base = TextClassifier(BertModel(cfg), tok, 3).eval()
    q8 = quantize(base, "int8").model.eval()
    data = ExampleSet(name="t", kind="text", inputs=list(TEXTS), labels=torch.arange(len(TEXTS)) % 3,
                      class_names=["a", "b", "c"])
    res = Study(base, {"int8": q8}, data, batch_size=4, chunk_batches=1, progress=False, tokenizer=tok,
                metrics={"bootstrap": 100, "knn_k": 3, "characteristics": ["prediction_errors"],
                         "layer_swap": {"examples": 8}}).run()
    ent = res.json_data()["layer_swap"]["int8"]
    idx = swap_subset(len(TEXTS), 8, 0)
    assert ent["indices"] == idx
    batches = []
    for s in range(0, 8, 4):
        enc = tok([TEXTS[i] for i in idx[s:s + 4]], padding=True, truncation=True, max_length=128,
                  return_tensors="pt")
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    want = layer_swap(base, q8, batches, max_examples=None)
    assert any(n.endswith("layer.0") for n in ent["layers"]) and ent["layers"] == want.plan.layers
    assert ent["whole_kl"] == want.whole_kl and ent["whole_churn"] == want.whole_churn
    assert [(r["layer"], r["kl"], r["churn"]) for r in ent["into_base"]] == [(e.layer, e.kl, e.churn)
                                                                          for e in want.into_base]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_onnx_runtime_variant_is_left_out_with_its_reason(models, tmp_path):
    pytest.importorskip("onnxruntime")
    from minidiff.models.sources.onnx import OnnxModule
    from minidiff.study.swap import skip_reason
    path = tmp_path / "base.onnx"
    torch.onnx.export(models["base"], (torch.randn(2, 64),), str(path), input_names=["x"],
                      dynamic_axes={"x": {0: "b"}}, dynamo=False)
    why = skip_reason(models["base"], OnnxModule(path), "block")
    assert why is not None and why.startswith("the variant runs in ONNX Runtime (OnnxModule)")
    assert skip_reason(models["base"], models["variants"]["int8"], "linear") is None
    assert "itself" in skip_reason(models["base"], models["base"], "block")
