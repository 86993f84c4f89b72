"""Models from other toolchains: every source kind on models made inside the test.

MiniLM (embedded, offline) through torch.ao dynamic int8, torchao int8 weight-only and
dynamic, bf16, torch.save; through ONNX (float, ORT dynamic int8, ORT QDQ static int8);
a tiny llama written to GGUF (F16, Q8_0, Q4_0) and read back. Every number is checked
against a hand computation from the model's own forward.
"""

from __future__ import annotations

import copy
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from minidiff import models as M
from minidiff.models.align import align_layers
from minidiff.models.facts import model_facts
from minidiff.models.fingerprint import UnhashableModelError, fingerprint

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::UserWarning")]

TEXTS = ["The cat sat on the mat.", "Compressed models forget rare examples.", "hi",
         "Quantization changes a few predictions while accuracy stays flat."]


@pytest.fixture(scope="module")
def minilm():
    lm = M.load_model("minilm")
    enc = lm.tokenizer(TEXTS, padding=True, return_tensors="pt")
    return lm, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _hand_hidden(model, batch):
    with torch.no_grad():
        hs = model(**batch, output_hidden_states=True).hidden_states
    return {f"hidden_states.{i}": M.masked_mean(h.float(), batch["attention_mask"]) for i, h in enumerate(hs)}


def _torch_forms(model):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
    forms = {"ao-dynamic": torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear},
                                                                  dtype=torch.qint8)}
    for name, cfg in (("torchao-int8-wo", Int8WeightOnlyConfig()),
                      ("torchao-int8-dyn", Int8DynamicActivationInt8WeightConfig())):
        m = copy.deepcopy(model)
        quantize_(m, cfg)
        forms[name] = m
    forms["bf16"] = copy.deepcopy(model).to(torch.bfloat16)
    return forms


@pytest.fixture(scope="module")
def torch_forms(minilm):
    return _torch_forms(minilm[0].model)


def test_torch_forms_capture_equals_own_forward(minilm, torch_forms, tmp_path):
    lm, batch = minilm
    # torch.save'd quantized module (saved before any output_hidden_states forward: transformers
    # leaves unpicklable hooks behind after one)
    path = tmp_path / "ao.pt"
    torch.save(torch_forms["ao-dynamic"], path)
    keys = {}
    for name, m in torch_forms.items():
        loaded = M.load_model(m)
        assert loaded.kind == "torch" and loaded.model is m and loaded.runtime.startswith("torch")
        got = M.capture(loaded.model, batch, layers="hidden_states", token_mode="mean")
        want = _hand_hidden(m, batch)
        assert list(got) == list(want) and len(got) == 7
        for k in want:
            assert got[k].dtype == torch.float32  # half precision pooled in float32
            torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
        keys[name] = loaded.fingerprint()
        assert fingerprint(m) == keys[name]  # same model, same key
    keys["fp32"] = fingerprint(lm.model)
    assert len(set(keys.values())) == len(keys), "two different models share a fingerprint"
    prov = {n: M.load_model(m).provenance for n, m in torch_forms.items()}
    assert prov["ao-dynamic"]["tool"] == "torch.ao.quantization"
    assert prov["torchao-int8-wo"]["tool"] == "torchao" and prov["torchao-int8-wo"]["version"]
    assert prov["bf16"]["method"] == "cast to bfloat16"
    back = M.load_model(path)
    assert back.kind == "torch" and back.fingerprint() == keys["ao-dynamic"]
    with torch.no_grad():
        torch.testing.assert_close(back.model(**batch).last_hidden_state,
                                   torch_forms["ao-dynamic"](**batch).last_hidden_state, rtol=0, atol=0)


def test_two_different_ao_models_never_share_a_key():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    m2 = copy.deepcopy(m)
    with torch.no_grad():
        m2[2].weight[5, 7] += 0.25  # one int8 value differs; repr() of the two looks the same
    q1 = torch.ao.quantization.quantize_dynamic(m, {nn.Linear}, dtype=torch.qint8)
    q2 = torch.ao.quantization.quantize_dynamic(m2, {nn.Linear}, dtype=torch.qint8)
    assert fingerprint(q1) != fingerprint(q2)
    assert fingerprint(q1) == fingerprint(copy.deepcopy(q1))
    # 0-dim buffers hash; a scale change alone changes the key
    b = nn.Module()
    b.register_buffer("s", torch.tensor(1.0))
    k1 = fingerprint(b)
    b.s.fill_(1.0 + 2 ** -20)
    assert fingerprint(b) != k1
    from minidiff.study.cache import hash_module
    assert hash_module(q1) == fingerprint(q1)


def test_unhashable_state_is_a_specific_error():
    m = nn.Linear(4, 4, device="meta")
    with pytest.raises(UnhashableModelError, match="meta"):
        fingerprint(m)


def test_facts_count_real_storage(minilm, torch_forms):
    lm, _ = minilm
    fp = model_facts(lm.model)
    n_float = sum(p.numel() for p in lm.model.parameters())
    assert fp.num_params == n_float and fp.bytes == 4 * n_float + sum(
        b.numel() * b.element_size() for n, b in lm.model.named_buffers()
        if n.rsplit(".", 1)[-1] not in lm.model.get_submodule(n.rsplit(".", 1)[0])._non_persistent_buffers_set)
    linear = [m for m in lm.model.modules() if isinstance(m, nn.Linear)]
    lin_w = sum(m.weight.numel() for m in linear)
    ao = model_facts(torch_forms["ao-dynamic"])
    assert ao.num_params == n_float  # int8 weights are counted (they were 0 before)
    # int8 weights (1 byte) + float bias + per-tensor scale/zero point replace the float weights
    assert ao.bytes == fp.bytes - 4 * lin_w + lin_w + 16 * len(linear)
    tao = model_facts(torch_forms["torchao-int8-wo"])
    assert tao.num_params == n_float and tao.bytes < fp.bytes and "Int8Tensor" in tao.storage
    bf = model_facts(torch_forms["bf16"])
    assert bf.num_params == n_float and bf.bytes < fp.bytes


# -- ONNX ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def onnx_files(minilm, tmp_path_factory):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic, \
        quantize_static
    lm, batch = minilm
    d = tmp_path_factory.mktemp("onnx")
    clf = M.TextClassifier(lm.model, lm.tokenizer, 3).eval()
    f32 = d / "minilm.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(clf, (), str(f32), kwargs=dict(batch), input_names=["input_ids", "attention_mask"],
                          output_names=["logits"], dynamo=False, opset_version=17,
                          dynamic_axes={"input_ids": {0: "b", 1: "t"}, "attention_mask": {0: "b", 1: "t"}})
    dyn = d / "minilm-int8.onnx"
    quantize_dynamic(str(f32), str(dyn), weight_type=QuantType.QInt8)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{k: v.numpy() for k, v in batch.items()}])

        def get_next(self):
            return next(self.items, None)

    qdq = d / "minilm-qdq.onnx"
    quantize_static(str(f32), str(qdq), Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"])
    return clf, {"float": f32, "dynamic": dyn, "qdq": qdq}


def test_onnx_outputs_from_unmodified_session_and_layers(minilm, onnx_files):
    import onnxruntime as ort
    lm, batch = minilm
    clf, files = onnx_files
    feeds = {k: v.numpy() for k, v in batch.items()}
    keys = set()
    torch_layers = [n for n in dict(clf.named_modules()) if n.startswith("encoder.encoder.layer.") and
                    n.count(".") == 3]
    for name, path in files.items():
        lo = M.load_model(path)
        assert lo.kind == "onnx" and lo.runtime.startswith("onnxruntime")
        assert any("second ONNX Runtime session" in n for n in lo.notes)
        if name != "float":
            assert lo.provenance["method"] == {"dynamic": "dynamic int8", "qdq": "QDQ static int8"}[name]
        want = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        # the wrapper's logits equal the plain session's, also while layers are captured
        feats = M.capture(lo.model, batch, layers=torch_layers, token_mode="mean")
        with torch.no_grad():
            out = lo.model(**batch)
        np.testing.assert_array_equal(out.logits.numpy(), want)
        assert list(feats) == torch_layers  # module names line up with the torch model's
        # the layers equal the graph tensors read from a hand-built second session
        import onnx
        proto = onnx.load(str(path))
        names = [lo.extra["layers"][n] for n in torch_layers]
        for t in names:
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
        hand = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(names, feeds)
        for n, h in zip(torch_layers, hand):
            torch.testing.assert_close(feats[n], M.masked_mean(torch.from_numpy(h), batch["attention_mask"]),
                                       rtol=0, atol=0)
        if name == "float":  # the exported graph computes what the torch model does
            with torch.no_grad():
                ref = _hand_hidden(clf.encoder, batch)
                torch.testing.assert_close(out.logits, clf(**batch), rtol=1e-4, atol=1e-4)
            for i, n in enumerate(torch_layers, start=1):
                torch.testing.assert_close(feats[n], ref[f"hidden_states.{i}"], rtol=1e-4, atol=1e-4)
            hs = lo.model(**batch, output_hidden_states=True).hidden_states
            assert len(hs) == 7  # embeddings + 6 blocks, the transformers layout
        keys.add(lo.fingerprint())
        f = lo.facts()
        assert f.num_params > 2e7 and f.storage.startswith("onnx")
    assert len(keys) == 3
    sizes = {n: M.load_model(p).facts().bytes for n, p in files.items()}
    assert sizes["dynamic"] < sizes["float"] / 2


def test_onnx_bad_tensor_name_lists_tensors(onnx_files):
    _, files = onnx_files
    with pytest.raises(ValueError, match="no graph tensor named"):
        M.load_model(files["float"], layers={"x": "not-a-tensor"})


# -- GGUF -----------------------------------------------------------------------------------

def _permute(w, n_head, n_kv):
    if n_kv is not None and n_head != n_kv:
        n_head = n_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model, path, qtype):
    """A llama model in llama.cpp's layout (names, Q/K row permutation) with the gguf writer."""
    import gguf
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(10000.0)
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    per = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
           "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
           "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for i in range(c.num_hidden_layers):
        for a, b in per.items():
            names[f"model.layers.{i}.{a}.weight"] = f"blk.{i}.{b}.weight"
    for hf, gn in names.items():
        a = sd[hf]
        if "q_proj" in hf:
            a = _permute(a, c.num_attention_heads, c.num_attention_heads)
        elif "k_proj" in hf:
            a = _permute(a, c.num_attention_heads, c.num_key_value_heads)
        if a.ndim == 2:
            w.add_tensor(gn, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gn, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return names


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      rms_norm_eps=1e-5, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("qname", ["F16", "Q8_0", "Q4_0"])
def test_gguf_dequantized_exactly(tiny_llama, tmp_path, qname):
    import gguf
    qtype = gguf.GGMLQuantizationType[qname]
    path = tmp_path / f"tiny-{qname}.gguf"
    names = write_llama_gguf(tiny_llama, path, qtype)
    lo = M.load_model(path)
    assert lo.kind == "gguf" and qname in lo.provenance["tensor_types"]
    model = lo.model
    sd = model.state_dict()
    reader = gguf.GGUFReader(str(path))
    raw = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    c = tiny_llama.config
    hand = {}
    for hf, gn in names.items():
        a = np.asarray(raw[gn], dtype=np.float32)
        if "q_proj" in hf or "k_proj" in hf:  # undo llama.cpp's row permutation: an exact reshuffle of rows
            kv = c.num_attention_heads if "q_proj" in hf else c.num_key_value_heads
            a = a[np.argsort(_permute(np.arange(a.shape[0]), c.num_attention_heads, kv))]
        hand[hf] = torch.from_numpy(np.ascontiguousarray(a))
        assert torch.equal(sd[hf], hand[hf]), hf
    if qname != "F16":
        assert not torch.equal(sd["model.layers.0.mlp.up_proj.weight"],
                               tiny_llama.state_dict()["model.layers.0.mlp.up_proj.weight"])
    # logits equal a hand forward of the same architecture with the hand-dequantized weights
    from transformers import LlamaForCausalLM
    ref = LlamaForCausalLM(c).eval()
    ref.load_state_dict(hand)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=0, atol=0)
    f = lo.facts()
    assert f.bytes == sum(int(t.n_bytes) for t in reader.tensors) == path.stat().st_size - reader.data_offset
    assert f.num_params == sum(p.numel() for p in tiny_llama.parameters())


def test_gguf_types_have_different_keys(tiny_llama, tmp_path):
    import gguf
    keys = set()
    for q in ("Q8_0", "Q4_0"):
        p = tmp_path / f"{q}.gguf"
        write_llama_gguf(tiny_llama, p, gguf.GGMLQuantizationType[q])
        keys.add(M.load_model(p).fingerprint())
    assert len(keys) == 2


# -- errors ---------------------------------------------------------------------------------

def _one_line(e: BaseException) -> str:
    msg = str(e)
    assert "\n" not in msg and msg
    return msg


def test_missing_packages_are_one_line(monkeypatch, tmp_path, tiny_llama):
    import gguf
    p = tmp_path / "m.gguf"
    write_llama_gguf(tiny_llama, p, gguf.GGMLQuantizationType.F16)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)
    with pytest.raises(ImportError) as e:
        M.load_model(p, runtime="llama.cpp")
    assert "pip install llama-cpp-python" in _one_line(e.value)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    f = tmp_path / "x.onnx"
    f.write_bytes(b"")
    with pytest.raises(ImportError) as e:
        M.load_model(f)
    assert "pip install onnxruntime" in _one_line(e.value)


def test_gpu_quantized_checkpoint_on_cpu_names_the_backend(tmp_path):
    import json
    d = tmp_path / "bnb"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "quantization_config": {
        "quant_method": "bitsandbytes", "load_in_8bit": True}}))
    with pytest.raises((ImportError, ValueError)) as e:
        M.load_model(d)
    assert "bitsandbytes" in _one_line(e.value)


def test_unsupported_format_and_kind(tmp_path):
    f = tmp_path / "model.safetensors.zip"
    f.write_bytes(b"xx")
    with pytest.raises(ValueError) as e:
        M.load_model(f)
    assert "kind=" in _one_line(e.value)
    with pytest.raises(ValueError, match="unknown model kind"):
        M.load_model(f, kind="tflite")
    sd = tmp_path / "sd.pt"
    torch.save({"w": torch.zeros(2)}, sd)
    with pytest.raises(ValueError, match="state dict"):
        M.load_model(sd)


def test_variant_folder_and_export(tmp_path):
    from minidiff.compress import quantize, save_variant
    mlp = M.make_mlp(16, [32], 4)
    v = quantize(mlp, "int8")
    save_variant(v, tmp_path / "v")
    lo = M.load_model(tmp_path / "v")
    assert lo.kind == "variant" and lo.provenance["tool"] == "minidiff"
    x = torch.randn(5, 16)
    torch.testing.assert_close(lo.model(x), v.model(x), rtol=0, atol=0)
    assert lo.fingerprint() == fingerprint(v.model)
    ep = torch.export.export(mlp, (x,))
    le = M.load_model(ep)
    torch.testing.assert_close(le.model(x), mlp(x), rtol=0, atol=0)
    assert le.provenance["tool"] == "torch.export"
    path = tmp_path / "p.pt2"
    torch.export.save(ep, str(path))
    torch.testing.assert_close(M.load_model(path).model(x), mlp(x), rtol=0, atol=0)


# -- alignment ------------------------------------------------------------------------------

def test_align_layers_rules():
    base = ["encoder.layer.0", "encoder.layer.1"]
    assert align_layers(base, base).rule == "name"
    a = align_layers(base, ["h.0", "h.1"])
    assert a.rule == "index" and a.pairs == [("encoder.layer.0", "h.0"), ("encoder.layer.1", "h.1")]
    m = align_layers(base, ["h.0", "h.1", "h.2"], layer_map={"encoder.layer.0": "h.0", "encoder.layer.1": "h.2"})
    assert m.rule == "layer_map" and m.variant == ["h.0", "h.2"]
    with pytest.raises(ValueError, match="base layers \\(2\\).*variant layers \\(3\\)"):
        align_layers(base, ["h.0", "h.1", "h.2"])
    with pytest.raises(ValueError, match="unknown layers"):
        align_layers(base, ["h.0"], layer_map={"encoder.layer.0": "nope"})


# -- study files ------------------------------------------------------------------------------

def test_study_file_model_sources(tmp_path):
    from minidiff.study.config import SourceModel, StudyFileError, parse_config
    base = {"data": {"source": "builtin", "name": "chatterbot-en"}, "base": {"kind": "hf", "path": str(tmp_path)},
            "variants": [{"name": "ort", "recipe": "model",
                          "model": {"kind": "onnx", "path": "m.onnx", "layer_map": {"a": "b"}}}]}
    cfg = parse_config(base)
    assert isinstance(cfg.base, SourceModel) and cfg.variants[0].model.layer_map == {"a": "b"}
    for bad, msg in (({"kind": "hf"}, "exactly one of"), ({"kind": "gguf", "path": "a", "runtime": "x", "zz": 1},
                                                           "unknown key"),
                     ({"kind": "onnx", "path": "a", "runtime": "llama.cpp"}, "applies to kind .gguf. only")):
        with pytest.raises(StudyFileError, match=msg):
            parse_config({**base, "base": bad})


def test_ort_int8_head_input_is_the_float_activation_not_a_quantizer_scale(tmp_path):
    """ONNX Runtime's dynamic quantization puts a DynamicQuantizeLinear before each MatMul;
    the head's input must be traced back through it to the float tensor it quantizes."""
    pytest.importorskip("onnxruntime")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from minidiff.models import load_model, make_mlp
    torch.manual_seed(0)
    m = make_mlp(16, [24, 12], 5).eval()
    f, q = tmp_path / "m.onnx", tmp_path / "m-int8.onnx"
    torch.onnx.export(m, (torch.randn(4, 16),), str(f), input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "b"}, "logits": {0: "b"}}, dynamo=False)
    quantize_dynamic(str(f), str(q), weight_type=QuantType.QInt8)
    fp, i8 = load_model(f, kind="onnx").model, load_model(q, kind="onnx").model
    assert i8.head_tensor == fp.head_tensor and not i8.head_tensor.endswith(("_scale", "_zero_point"))
