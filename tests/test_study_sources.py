"""Studies whose variants come from other toolchains, checked against hand computations.

A digits MLP (trained here) is the base; its variants are made by ONNX Runtime (the
``ort-int8`` recipe: torch.onnx export + ``quantize_dynamic``), torchao (``torchao-int8``),
``torch.ao.quantization.quantize_dynamic`` saved with ``torch.save`` and read from a study
file (``kind = "torch"``), and a ``minidiff.save_variant`` folder (``kind = "variant"``).
Every churn, accuracy and CKA number of the study equals the same number computed by hand
from that model's own logits and hidden states (run in the study's batches: dynamic int8
quantizes activations per batch) with the public metric functions. A tiny BERT classifier
covers the text path of the ONNX recipe and the bf16 layer list.
"""

from __future__ import annotations

import copy
import sys

import numpy as np
import pytest
import torch
from torch import nn

from minidiff.metrics import accuracy, churn
from minidiff.similarity import cka_matrix
from minidiff.study import Study, StudyFileError, parse_config

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

BATCH = 40
LAYERS = ["2", "4"]  # the MLP's ReLUs: its automatic layers


def _mlp(seed: int, data):
    from minidiff.compress.training import seeded, train
    from minidiff.models import make_mlp
    with seeded(seed):
        m = make_mlp(64, [32, 16], 10)
    train(m, (data.inputs, data.labels), epochs=4, lr=1e-2, batch_size=64, seed=seed)
    return m.eval()


@pytest.fixture(scope="module")
def mlps():
    from minidiff.data import load_builtin
    tr, _ = load_builtin("digits").split(0.5, seed=0)
    return _mlp(0, tr), _mlp(1, tr)


def _toml(d: dict) -> str:
    """A study dict as TOML (flat enough for these tests)."""
    def val(v):
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\") + '"'
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, dict):
            return "{" + ", ".join(f'{k} = {val(x)}' for k, x in v.items()) + "}"
        if isinstance(v, list):
            return "[" + ", ".join(val(x) for x in v) + "]"
        return str(v)
    out = []
    for table, body in d.items():
        rows = body if isinstance(body, list) else [body]
        for row in rows:
            out.append(f"[[{table}]]" if isinstance(body, list) else f"[{table}]")
            out += [f"{k} = {val(v)}" for k, v in row.items()]
    return "\n".join(out) + "\n"


def _study_file(tmp, variants, name="sources") -> str:
    f = tmp / f"{name}.toml"
    f.write_text(_toml({
        "study": {"name": name, "batch_size": BATCH, "chunk_batches": 1, "progress": False},
        "data": {"source": "builtin", "name": "digits", "limit": 120},
        "base": {"kind": "torch", "path": "base.pt"},
        "variants": variants,
        "metrics": {"bootstrap": 100, "knn_k": 5, "characteristics": ["prediction_errors", "representation"]},
    }))
    return str(f)


def _run(path, cache):
    st = Study.from_config(path, cache_dir=cache, progress=False)
    return st, st.run()


@torch.no_grad()
def _torch_outputs(model, x, layers=LAYERS):
    """Logits and the layers' outputs of a torch module, batch by batch as the study runs it."""
    logits, feats = [], {n: [] for n in layers}
    mods = dict(model.named_modules())
    for s in range(0, len(x), BATCH):
        got = {}
        hs = [mods[n].register_forward_hook(lambda m, i, o, n=n: got.__setitem__(n, o)) for n in layers]
        try:
            logits.append(model(x[s:s + BATCH]).float())
        finally:
            for h in hs:
                h.remove()
        for n in layers:
            feats[n].append(got[n].float())
    return torch.cat(logits), [torch.cat(feats[n]) for n in layers]


def _ort_outputs(path, tensors, feeds_of, n):
    """Logits from a plain ONNX Runtime session on the file, layers from a hand-built session
    exposing ``tensors`` as outputs (batch by batch)."""
    import onnx
    import onnxruntime as ort
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    proto = onnx.load(str(path))
    for t in tensors:
        proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
    cap = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    logits, feats = [], [[] for _ in tensors]
    for s in range(0, n, BATCH):
        feeds = feeds_of(s, min(s + BATCH, n))
        logits.append(torch.from_numpy(sess.run(None, feeds)[0]))
        for k, a in enumerate(cap.run(list(tensors), feeds)):
            feats[k].append(torch.from_numpy(a))
    return torch.cat(logits), [torch.cat(f) for f in feats]


def _check(res, var, base_out, var_out, labels):
    (lb, fb), (lv, fv) = base_out, var_out
    pb, pv = lb.argmax(1), lv.argmax(1)
    assert res["prediction_errors"][var]["churn"] == pytest.approx(churn(pb, pv), abs=1e-12)
    assert res["models"][var]["accuracy"]["mean"] == pytest.approx(accuracy(pv[None], labels), abs=1e-12)
    want = cka_matrix([t.double() for t in fb], [t.double() for t in fv], estimator="unbiased").numpy()
    got = np.asarray(res["representation"][var]["cka"]["matrix"])
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)


def test_toolchain_variants_equal_hand_computation(mlps, tmp_path):
    from minidiff.compress import quantize, save_variant
    base = mlps[0]
    torch.save(base, tmp_path / "base.pt")
    torch.save(torch.ao.quantization.quantize_dynamic(copy.deepcopy(base), {nn.Linear}, dtype=torch.qint8),
               tmp_path / "ao.pt")
    save_variant(quantize(base, "int8"), tmp_path / "int8-folder")
    path = _study_file(tmp_path, [
        {"name": "ort", "recipe": "ort-int8"},
        {"name": "tao", "recipe": "torchao-int8"},
        {"name": "tao-dyn", "recipe": "torchao-int8", "int8_mode": "dynamic"},
        {"name": "ao", "recipe": "model", "model": {"kind": "torch", "path": "ao.pt"}},
        {"name": "saved", "recipe": "model", "model": {"kind": "variant", "path": "int8-folder"}},
    ])
    st, res = _run(path, tmp_path / "cache")
    x, y = st.data.inputs, st.data.labels
    base_out = _torch_outputs(st.base[0], x)
    for var in ("tao", "tao-dyn", "ao", "saved"):
        _check(res, var, base_out, _torch_outputs(st.variants[var][0], x), y)
    ort_mod = st.variants["ort"][0]
    tensors = [ort_mod.layer_map[n] for n in LAYERS]
    ort_out = _ort_outputs(ort_mod.path, tensors, lambda a, b: {"input": x[a:b].numpy()}, len(x))
    _check(res, "ort", base_out, ort_out, y)
    # every variant lists the base's layers, whatever wraps them
    for var in ("ort", "tao", "tao-dyn", "ao", "saved"):
        assert np.asarray(res["representation"][var]["cka"]["matrix"]).shape == (2, 2)
    # the model notes name the tool and version, the head and the runtime
    import onnxruntime
    import torchao
    m = res["models"]
    assert f"ONNX Runtime {onnxruntime.__version__} dynamic int8" in m["ort"]["recipe"]
    assert m["ort"]["head"].startswith("the base's") and m["tao"]["head"].startswith("the base's")
    assert "head: the base's" in m["ort"]["recipe"] and "head: the base's" in m["tao"]["recipe"]
    assert m["ort"]["runtime"].startswith("onnxruntime") and m["ort"]["provenance"]["method"] == "dynamic int8"
    assert any("second ONNX Runtime session" in n for n in m["ort"]["source_notes"])
    assert f"torchao {torchao.__version__} int8 weight-only" in m["tao"]["recipe"]
    assert m["tao"]["provenance"]["tool"] == "torchao"
    assert "int8 activations per batch" in m["tao-dyn"]["recipe"] and m["tao-dyn"]["source_notes"]
    assert m["ao"]["provenance"]["tool"] == "torch.ao.quantization"
    assert m["ao"]["head"] == "its own (from its checkpoint)"
    # the recipes' artefacts are cached: a rebuild from the same cache makes nothing
    assert Study.from_config(path, cache_dir=tmp_path / "cache", progress=False).build_info["built_fresh"] == 0


def test_different_quantized_models_never_share_a_cache_entry(mlps, tmp_path):
    """The same study file and cache folder, run on two different models under the same file
    names: each run's numbers are its own models' (keys are exact fingerprints)."""
    path = _study_file(tmp_path, [{"name": "ort", "recipe": "ort-int8"},
                                  {"name": "ao", "recipe": "model", "model": {"kind": "torch", "path": "ao.pt"}}])
    cache = tmp_path / "cache"
    runs = []
    for base in (mlps[0], mlps[1], mlps[0]):
        torch.save(base, tmp_path / "base.pt")
        torch.save(torch.ao.quantization.quantize_dynamic(copy.deepcopy(base), {nn.Linear}, dtype=torch.qint8),
                   tmp_path / "ao.pt")
        st, res = _run(path, cache)
        x, y = st.data.inputs, st.data.labels
        base_out = _torch_outputs(st.base[0], x)
        _check(res, "ao", base_out, _torch_outputs(st.variants["ao"][0], x), y)
        ort_mod = st.variants["ort"][0]
        _check(res, "ort", base_out, _ort_outputs(ort_mod.path, [ort_mod.layer_map[n] for n in LAYERS],
                                                  lambda a, b: {"input": x[a:b].numpy()}, len(x)), y)
        runs.append((st, res))
    (s0, r0), (s1, r1), (s2, r2) = runs
    assert s0.build_info["built_fresh"] == 1 and s1.build_info["built_fresh"] == 1  # a new ONNX export
    assert s2.build_info["built_fresh"] == 0  # the first base's export, from the cache
    assert r0["prediction_errors"]["ao"]["churn"] == r2["prediction_errors"]["ao"]["churn"]
    assert r0["models"]["ao"]["accuracy"]["mean"] != r1["models"]["ao"]["accuracy"]["mean"]
    assert r0["models"]["ort"]["accuracy"]["mean"] != r1["models"]["ort"]["accuracy"]["mean"]


def test_unhashable_model_is_never_cached_and_the_study_says_so(mlps, tmp_path):
    from minidiff.data import load_builtin
    from minidiff.models.fingerprint import UnhashableModelError

    class Opaque(nn.Sequential):
        def minidiff_fingerprint(self):
            raise UnhashableModelError("opaque runtime state")
    variant = Opaque(*copy.deepcopy(mlps[1]))
    data = load_builtin("digits").subset(range(80))
    runs = []
    for _ in range(2):
        st = Study(mlps[0], {"opaque": variant}, data, batch_size=BATCH, chunk_batches=1, progress=False,
                   cache_dir=tmp_path / "c", metrics={"bootstrap": 100, "characteristics": ["prediction_errors"]})
        runs.append((st, st.run()))
    (_, r0), (st1, r1) = runs
    assert any(n.startswith("not cached") and "opaque" in n for n in r1["study"]["notes"])
    assert st1.last_run["forward_chunks"]["opaque"] == 2 and st1.last_run["forward_chunks"]["base"] == 0
    assert r0["prediction_errors"]["opaque"]["churn"] == r1["prediction_errors"]["opaque"]["churn"]
    with torch.no_grad():
        pb, pv = mlps[0](data.inputs).argmax(1), variant(data.inputs).argmax(1)
    assert r1["prediction_errors"]["opaque"]["churn"] == pytest.approx(churn(pb, pv), abs=1e-12)


# -- text: a tiny BERT classifier ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_bert():
    from transformers import BertConfig, BertModel

    from minidiff.models import TextClassifier, load_model
    tok = load_model("minilm").tokenizer
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    return TextClassifier(BertModel(cfg), tok, num_classes=19, pooling="mean").eval()


def test_bf16_variant_lists_the_base_layers(tiny_bert):
    """Regression: a bf16 copy pools its embedding in bf16, which made it report the embedding as
    an extra layer (a 2x3 CKA matrix); it now follows its base's layer list."""
    from minidiff.data import load_builtin
    data = load_builtin("chatterbot-en").subset(range(24))
    bf16 = copy.deepcopy(tiny_bert).to(torch.bfloat16)
    st = Study(tiny_bert, {"bf16": bf16}, data, batch_size=12, chunk_batches=1, progress=False, token_mode="mean",
               max_length=16, metrics={"bootstrap": 100, "characteristics": ["representation"]})
    res = st.run()
    cka = res["representation"]["bf16"]["cka"]
    assert np.asarray(cka["matrix"]).shape == (2, 2)
    groups, _ = st._members()
    assert groups["bf16"][0].layers == groups["base"][0].layers == ["encoder.encoder.layer.0",
                                                                    "encoder.encoder.layer.1"]


def test_ort_int8_recipe_on_a_text_classifier(tiny_bert, tmp_path):
    torch.save(tiny_bert, tmp_path / "base.pt")
    f = tmp_path / "text.toml"
    f.write_text(_toml({
        "study": {"name": "text", "batch_size": BATCH, "chunk_batches": 1, "progress": False},
        "data": {"source": "builtin", "name": "chatterbot-en", "limit": 48},
        "base": {"kind": "torch", "path": "base.pt", "max_length": 16},
        "variants": [{"name": "ort", "recipe": "ort-int8"}],
        "layers": {"token_mode": "mean"},
        "metrics": {"bootstrap": 100, "characteristics": ["prediction_errors", "representation"]},
    }))
    st, res = _run(f, tmp_path / "cache")
    texts, y = list(st.data.inputs), st.data.labels
    tok = tiny_bert.tokenizer

    def feeds(a, b):
        enc = tok(texts[a:b], padding=True, truncation=True, max_length=16, return_tensors="np")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    from minidiff.models import masked_mean
    layers = ["encoder.encoder.layer.0", "encoder.encoder.layer.1"]
    ort_mod = st.variants["ort"][0]
    lv, fv = [], []
    for s in range(0, len(texts), BATCH):  # token mode "mean": masked mean per batch, before concatenating
        lg, hs = _ort_outputs(ort_mod.path, [ort_mod.layer_map[n] for n in layers], lambda a, b: feeds(s + a, s + b),
                              min(BATCH, len(texts) - s))
        mask = torch.from_numpy(feeds(s, s + BATCH)["attention_mask"])
        lv.append(lg)
        fv.append([masked_mean(h, mask) for h in hs])
    lb, fb = [], []
    with torch.no_grad():
        for s in range(0, len(texts), BATCH):
            enc = {k: torch.from_numpy(v) for k, v in feeds(s, s + BATCH).items()}
            out = tiny_bert.encoder(**enc, output_hidden_states=True)
            lb.append(tiny_bert(**enc))
            fb.append([masked_mean(h, enc["attention_mask"]) for h in out.hidden_states[1:]])
    cat = lambda rows: [torch.cat([r[k] for r in rows]) for k in range(len(layers))]  # noqa: E731
    _check(res, "ort", (torch.cat(lb), cat(fb)), (torch.cat(lv), cat(fv)), y)
    assert res["models"]["ort"]["head"].startswith("the base's")


# -- errors ---------------------------------------------------------------------------------------
def test_unsupported_format_and_missing_package_are_one_line(mlps, tmp_path, monkeypatch):
    from minidiff.models import load_model
    with pytest.raises(StudyFileError) as e:
        parse_config({"data": {"source": "builtin", "name": "digits"}, "base": {"kind": "mlp"},
                      "variants": [{"name": "v", "recipe": "model", "model": {"kind": "tflite", "path": "m.tflite"}}]})
    assert "\n" not in str(e.value) and "tflite" in str(e.value)
    (tmp_path / "m.tflite").write_bytes(b"\0" * 8)
    with pytest.raises(ValueError) as e:
        load_model(tmp_path / "m.tflite")
    assert "\n" not in str(e.value) and "kind=" in str(e.value)
    with pytest.raises(StudyFileError, match="weight-only. does not apply"):
        parse_config({"data": {"source": "builtin", "name": "digits"}, "base": {"kind": "mlp"},
                      "variants": [{"name": "v", "recipe": "ort-int8", "int8_mode": "weight-only"}]})
    torch.save(mlps[0], tmp_path / "base.pt")
    path = _study_file(tmp_path, [{"name": "tao", "recipe": "torchao-int8"}])
    monkeypatch.setitem(sys.modules, "torchao", None)
    with pytest.raises(ImportError) as e:
        Study.from_config(path, progress=False)
    assert "\n" not in str(e.value) and "pip install torchao" in str(e.value)


def test_int8_mode_defaults_survive_a_round_trip():
    """Unset int8_mode means dynamic for int8 and weight-only for torchao-int8, also after the
    config is dumped and parsed again (as ``minidiff demo`` does with its overrides)."""
    cfg = parse_config({"data": {"source": "builtin", "name": "digits"}, "base": {"kind": "mlp"},
                        "variants": [{"name": "a", "recipe": "int8"}, {"name": "b", "recipe": "torchao-int8"},
                                     {"name": "c", "recipe": "torchao-int8", "int8_mode": "dynamic"}]})
    again = parse_config(cfg.model_dump(mode="python"))
    for c in (cfg, again):
        assert [v.resolved_int8_mode() for v in c.variants] == ["dynamic", "weight-only", "dynamic"]
