"""Where a variant diverges, in the study: per-layer error of matched layers and the
matched-layer profile of every chosen similarity measure, against direct computation
on hand-captured layers; the first layer below the SQNR threshold on a constructed
case; a variant of another architecture gets the stated reason; resuming from the
cache gives the same numbers; token and pooled modes; the report and the CSVs."""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from minidiff.study import Study, StudyFileError, parse_config

pytestmark = pytest.mark.usefixtures("one_thread")

MEASURES = ["cka", "cca", "svcca", "procrustes", "regression"]
ERRORS = ("rel_error", "sqnr_db", "cosine", "max_abs")


@pytest.fixture(scope="module")
def models(digits_family):
    """conftest's digits MLP, its int8 and 80%-pruned copies and a distilled student."""
    return digits_family


def _study(models, variants=None, cache_dir=None, **metrics):
    m = {"bootstrap": 100, "knn_k": 5, "ood_k": 5, "similarity": MEASURES, "similarity_heatmaps": True,
         "characteristics": ["prediction_errors", "representation"], **metrics}
    return Study(models["base"], variants or models["variants"], models["data"], name="loc", batch_size=32,
                 chunk_batches=1, progress=False, cache_dir=cache_dir, metrics=m)


def _captured(module, x):
    """The layers the study captures, by hand (one forward over every example)."""
    from minidiff.study.capture import Member, tensor_prepare
    _, layers, _ = Member("m", "g", 0, module, tensor_prepare).forward(x, "cls")
    return [t.double() for t in layers]


@pytest.fixture(scope="module")
def run(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("loc") / "out"
    with pytest.warns(RuntimeWarning, match="rank-deficient"):  # 32/16 units, dead ReLUs: stated ridge
        res = _study(models).run(out=out)
    return res, out


def test_layer_error_and_profiles_equal_direct_computation(models, run):
    from minidiff import layer_error, similarity_matrix
    res, out = run
    saved = json.loads((out / "results.json").read_text())
    x = models["data"].inputs
    la = _captured(models["base"], x)
    for var in ("int8", "prune-80"):
        lb = _captured(models["variants"][var], x)
        le = saved["representation"][var]["layer_error"]
        assert le["layers"] == res["representation"][var]["cka"]["layers_base"]
        assert len(le["layers"]) == len(la) == len(lb)
        want = layer_error(la, lb)
        for k in ERRORS:
            np.testing.assert_allclose([float(v) for v in le[k]], want[k].numpy(), rtol=1e-9, atol=1e-12, err_msg=k)
        assert le["samples"] == x.shape[0] and le["pairs"] == 1
        sim = saved["representation"][var]["similarity"]
        assert sim["measures"] == MEASURES and sim["matched_by"] == "position"
        # the streamed statistics take float32 GEMMs of the float32 captures; the reference is float64
        # throughout: 2e-5 is the library's float32 bound for the measures (ridge regime included)
        with pytest.warns(RuntimeWarning, match="rank-deficient"):
            for m in MEASURES:
                full = similarity_matrix(la, lb, measure=m).numpy()
                np.testing.assert_allclose(sim["profile"][m], np.diagonal(full), rtol=0, atol=2e-5, err_msg=m)
                np.testing.assert_allclose(sim["matrices"][m], full, rtol=0, atol=2e-5, err_msg=m)
        # one CSV row per layer, the same numbers
        import pandas as pd
        df = pd.read_csv(out / f"layer_error_{var}.csv")
        assert list(df["layer"].astype(str)) == le["layers"]
        np.testing.assert_allclose(df["sqnr_db"], want["sqnr_db"].numpy(), rtol=1e-9)
        assert (out / f"similarity_{var}.csv").is_file()
    # int8 stays far above the 20 dB default; 80% pruning falls below it at the first layer
    assert res["representation"]["int8"]["layer_error"]["below_threshold"] == []
    assert res["representation"]["int8"]["layer_error"].get("first_below") is None
    pr = res["representation"]["prune-80"]["layer_error"]
    assert pr["threshold_db"] == 20.0
    assert pr["first_below"] == pr["layers"][0]


def test_other_architecture_states_why(run):
    res, out = run
    rep = res["representation"]["small"]
    assert "layer_error" not in rep
    why = rep["skipped"]["layer_error"]
    assert "equal widths" in why and "[32, 16]" in why and "[16]" in why
    # the similarity profile still compares each base layer with its best CKA match
    assert rep["similarity"]["matched_by"] == "cka_correspondence"
    assert len(rep["similarity"]["profile"]["cka"]) == len(rep["similarity"]["layers"])
    assert ("small", "layer_error", why) in res.sections["representation"].not_computed()
    html = (out / "report.html").read_text()
    assert "per-layer error not computed" in html
    assert 'data-plot="depth_profile"' in html and 'data-plot="similarity_profile"' in html
    assert 'data-plot="cca_prune-80"' in html  # heatmaps on request
    assert (out / "plots" / "depth_profile.svg").is_file()
    assert not (out / "layer_error_small.csv").exists()


def test_first_below_names_the_corrupted_layer(models):
    """Only the second hidden layer is changed: the first keeps SQNR = inf, the second is named."""
    late = copy.deepcopy(models["base"])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        w = late[3].weight
        w.add_(0.5 * w.std() * torch.randn(w.shape, generator=g))
    res = _study(models, {"late": late, "int8": models["variants"]["int8"]},
                 similarity=["cka"], similarity_heatmaps=False, sqnr_threshold_db=30.0).run()
    le = res["representation"]["late"]["layer_error"]
    assert le["sqnr_db"][0] == math.inf and le["rel_error"][0] == 0.0 and le["cosine"][0] == 1.0
    assert le["sqnr_db"][1] < 30.0
    assert le["first_below"] == le["layers"][1] and le["below_threshold"] == [le["layers"][1]]
    assert le["threshold_db"] == 30.0
    assert "matrices" not in res["representation"]["late"]["similarity"]
    js = res.json_data()["representation"]["late"]["layer_error"]
    assert js["sqnr_db"][0] == "Infinity"  # JSON keeps the infinite SQNR of an unchanged layer
    # a threshold above int8's lowest SQNR names int8's weakest early layer
    from minidiff.similarity.layer_error import first_below
    i8 = res["representation"]["int8"]["layer_error"]
    thr = max(i8["sqnr_db"]) + 1.0
    assert first_below(torch.tensor(i8["sqnr_db"]), thr, i8["layers"]) == i8["layers"][0]


def test_resume_from_cache_gives_identical_numbers(models, run, tmp_path):
    full, _ = run

    class Boom(RuntimeError):
        pass

    def stop(k):
        if k == 2:
            raise Boom("simulated crash")

    with pytest.raises(Boom):
        _study(models, cache_dir=tmp_path / "c").run(on_chunk=stop)
    st2 = _study(models, cache_dir=tmp_path / "c")
    with pytest.warns(RuntimeWarning):
        res = st2.run()
    assert set(st2.last_run["forward_chunks"].values()) == {2}  # chunks 3 and 4 of 5
    states = list((tmp_path / "c" / "pairs").rglob("state.safetensors"))
    assert states
    from safetensors.torch import load_file
    assert any(any(k.startswith("layer_error.") for k in load_file(str(p))) for p in states)
    for var in ("int8", "prune-80", "small"):
        a, b = res.json_data()["representation"][var], full.json_data()["representation"][var]
        assert a.get("layer_error") == b.get("layer_error")
        assert a["similarity"] == b["similarity"]
        assert a["skipped"] == b["skipped"]


TEXTS = ["hello there", "what is your favourite book and why do you like it", "do you like football",
         "tell me a joke", "the weather is nice today, is it not", "who wrote hamlet",
         "i am learning to code in python", "what time is it", "my computer will not start",
         "how much money do i need to retire early", "can you recommend a film", "good night"]


@pytest.mark.parametrize("mode", ["tokens", "mean"])
def test_token_and_pooled_modes(mode):
    """Token mode: every non-padding token is a sample (cosine per token); pooled: one per text."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from minidiff import layer_error
    from minidiff.compress import prune
    from minidiff.data import ExampleSet
    from minidiff.models import TextClassifier, embedded_minilm_dir
    from minidiff.models.capture import capture
    tok = AutoTokenizer.from_pretrained(str(embedded_minilm_dir()))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    base = TextClassifier(BertModel(cfg), tok, 3).eval()
    variant = prune(base, sparsity=0.5).model.eval()
    data = ExampleSet(name="t", kind="text", inputs=list(TEXTS), labels=torch.arange(len(TEXTS)) % 3,
                      class_names=["a", "b", "c"])
    layers = ["encoder.encoder.layer.0", "encoder.encoder.layer.1"]
    res = Study(base, {"p": variant}, data, token_mode=mode, layers=layers, batch_size=4, chunk_batches=1,
                progress=False, tokenizer=tok,
                metrics={"bootstrap": 100, "knn_k": 3, "ood_k": 3, "characteristics": ["representation"]}).run()
    enc = tok(TEXTS, padding=True, truncation=True, max_length=128, return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    fa = capture(base, batch, layers=layers, token_mode=mode)
    fb = capture(variant, batch, layers=layers, token_mode=mode)
    want = layer_error([t.double() for t in fa.values()], [t.double() for t in fb.values()])
    le = res["representation"]["p"]["layer_error"]
    assert le["layers"] == layers
    assert le["samples"] == (int(enc["attention_mask"].sum()) if mode == "tokens" else len(TEXTS))
    for k in ERRORS:
        np.testing.assert_allclose(le[k], want[k].numpy(), rtol=1e-5, atol=1e-6, err_msg=k)


def test_metrics_keys_are_validated():
    base = {"data": {"source": "builtin", "name": "digits"}, "base": {"kind": "mlp"},
            "variants": [{"name": "int8", "recipe": "int8"}]}
    cfg = parse_config({**base, "metrics": {"similarity": ["cka", "svcca"], "sqnr_threshold_db": 30}})
    assert cfg.metrics.similarity == ["cka", "svcca"] and cfg.metrics.sqnr_threshold_db == 30.0
    assert parse_config(base).metrics.similarity == ["cka"] and parse_config(base).metrics.sqnr_threshold_db == 20.0
    with pytest.raises(StudyFileError, match="unknown similarity measure"):
        parse_config({**base, "metrics": {"similarity": ["cka", "cosine"]}})
    with pytest.raises(StudyFileError, match="sqnr_threshold_db"):
        parse_config({**base, "metrics": {"sqnr_threshold_db": "nan"}})


def test_rbf_kernel_keeps_cka_profile_and_states_why_for_the_rest(models):
    res = _study(models, {"prune-80": models["variants"]["prune-80"]}, cka_kernel="rbf", rbf_max_examples=40,
                 similarity=["cka", "cca"], similarity_heatmaps=False, characteristics=["representation"]).run()
    rep = res["representation"]["prune-80"]
    m = np.asarray(rep["cka"]["matrix"], dtype=float)
    assert rep["similarity"]["measures"] == ["cka"]
    np.testing.assert_allclose(rep["similarity"]["profile"]["cka"], np.diagonal(m), rtol=0, atol=0)
    assert "cka_kernel = 'rbf'" in rep["skipped"]["similarity_measures"]
    assert rep["layer_error"]["samples"] == models["data"].inputs.shape[0]  # per-layer error streams all rows
