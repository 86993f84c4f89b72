"""Compression methods: exact sparsity, N:M layout, structured shapes, int8 accuracy,
distillation, lottery tickets, populations, and save/load."""

import json
import os

import pytest
import torch
from torch import nn

from minidiff import compress as C
from minidiff import models as M

@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models: intra-op threads only add synchronisation cost (and stall on a busy machine)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)



def tiny_bert(seed=0, layers=2):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    return BertModel(cfg).eval()


@pytest.fixture
def clf():
    return M.TextClassifier(tiny_bert(), None, 3)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 120, (5, 12), generator=g)
    am = torch.ones(5, 12, dtype=torch.long)
    am[1, 7:] = 0
    am[3, 4:] = 0
    return {"input_ids": ids, "attention_mask": am}


def linear_weights(model):
    return {n: m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_unstructured_sparsity_exact(clf, scope):
    before = {k: v.clone() for k, v in clf.state_dict().items()}
    v = C.prune(clf, sparsity=0.25, scope=scope)
    # original untouched
    assert all(torch.equal(before[k], t) for k, t in clf.state_dict().items())
    layers = v.manifest["parameters"]["layers"]
    assert "head" not in layers and len(layers) == 2 * 6 + 1  # 6 Linear per block + pooler
    mods = dict(v.model.named_modules())
    total = sum(mods[n].weight.numel() for n in layers)
    zeros = sum(int((mods[n].weight == 0).sum()) for n in layers)
    assert zeros == round(0.25 * total)
    assert v.manifest["sparsity"]["overall"] == zeros / total
    if scope == "layer":
        for n in layers:  # every layer size here is a multiple of 4: exact
            z = int((mods[n].weight == 0).sum())
            assert z == mods[n].weight.numel() // 4
            assert v.manifest["sparsity"]["per_layer"][n] == 0.25
        # magnitude criterion: every pruned |w| <= every kept |w| in a layer
        for n in layers:
            w0 = dict(clf.named_modules())[n].weight.abs()
            keep = mods[n].weight != 0
            assert w0[~keep].max() <= w0[keep].min()


def test_nm_24_layout(clf, batch):
    v = C.prune(clf, structure="2:4")
    for n in v.manifest["parameters"]["layers"]:
        w = dict(v.model.named_modules())[n].weight
        nz = (w != 0).reshape(w.shape[0], -1, 4).sum(-1)
        assert torch.all(nz == 2), n
        # kept are the 2 largest of each group
        w0 = dict(clf.named_modules())[n].weight.abs().reshape(w.shape[0], -1, 4)
        kept = (w != 0).reshape_as(w0)
        assert torch.all(w0.masked_fill(~kept, float("inf")).amin(-1) >= w0.masked_fill(kept, -1).amax(-1))
    assert v.manifest["sparsity"]["overall"] == 0.5
    assert v.model(**batch).shape == (5, 3)


def test_structured_shrinks_and_runs(clf, batch):
    h = C.prune(clf, sparsity=0.5, structure="heads")
    sa = h.model.encoder.encoder.layer[0].attention.self
    assert sa.query.out_features == 16 and sa.num_attention_heads == 2
    assert h.model.encoder.encoder.layer[0].attention.output.dense.in_features == 16
    assert h.model(**batch).shape == (5, 3)
    f = C.prune(clf, sparsity=0.25, structure="neurons")
    lay = f.model.encoder.encoder.layer[1]
    assert lay.intermediate.dense.out_features == 48 and lay.output.dense.in_features == 48
    assert f.model(**batch).shape == (5, 3)
    assert sum(p.numel() for p in f.model.parameters()) < sum(p.numel() for p in clf.parameters())
    # removing 0 neurons changes nothing at all
    z = C.prune(clf, sparsity=0.0, structure="neurons")
    torch.testing.assert_close(z.model(**batch), clf(**batch), rtol=0, atol=0)


def test_structured_neurons_equals_zeroing(batch):
    """Removing MLP hidden units == zeroing their rows/columns (float64, exact maths)."""
    mlp = M.make_mlp(16, [12], 4).double()
    x = torch.randn(7, 16, dtype=torch.float64)
    v = C.prune(mlp, sparsity=0.5, structure="neurons")
    removed = v.manifest["removed_neurons"]["1"]
    ref = C.variant.clone_model(mlp)
    with torch.no_grad():
        ref[1].weight[removed] = 0
        ref[1].bias[removed] = 0
    torch.testing.assert_close(v.model(x), ref(x), rtol=1e-12, atol=1e-12)
    assert v.model[1].out_features == 6 and v.model[3].in_features == 6


def test_bad_inputs(clf):
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        C.prune(clf, sparsity=1.0)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        C.prune(clf, sparsity=-0.1)
    with pytest.raises(ValueError, match="not divisible"):
        C.prune(M.make_mlp(10, [8], 3), structure="2:4")
    with pytest.raises(ValueError, match="nearest existing names"):
        C.prune(clf, layers=["encoder.encoder.layer.0.attention.self.qury"])
    with pytest.raises(ValueError, match="no nn.Linear"):
        C.quantize(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()), "int8")
    with pytest.raises(ValueError, match="deeper"):
        C.distill(clf, ({"input_ids": torch.zeros(4, 3, dtype=torch.long)}, torch.zeros(4, dtype=torch.long)),
                  num_layers=3)
    with pytest.raises(ValueError, match="N:M"):
        C.prune(clf, structure="4:2")


def test_save_load_roundtrip_bit_exact(clf, batch, tmp_path):
    for v in (C.prune(clf, sparsity=0.5, structure="heads"), C.quantize(clf, "int8"),
              C.quantize(clf, "int8-weight-only"), C.quantize(clf, "bf16")):
        p = C.save_variant(v, tmp_path / v.manifest["method"])
        w = C.load_variant(p)
        sa, sb = v.model.state_dict(), w.model.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k
        assert torch.equal(v.model(**batch), w.model(**batch))
        assert w.manifest["bytes_on_disk"] == os.path.getsize(p / "model.safetensors")
        assert w.manifest["source"]["sha256"] == C.variant.state_sha256(clf)
    # no temp directories left behind
    assert sorted(os.listdir(tmp_path)) == ["bf16", "prune", "quantize"] or all(
        not n.startswith(".") for n in os.listdir(tmp_path))


def test_load_detects_corruption(clf, tmp_path):
    v = C.prune(clf, sparsity=0.5)
    p = C.save_variant(v, tmp_path / "v")
    raw = bytearray((p / "model.safetensors").read_bytes())
    raw[-3] ^= 0xFF
    (p / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="corrupted"):
        C.load_variant(p)
    p2 = C.save_variant(v, tmp_path / "v2")
    man = json.loads((p2 / "manifest.json").read_text())
    man["storage"]["modules"]["head"]["out_features"] = 7
    (p2 / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ValueError, match="does not match"):
        C.load_variant(p2)
    with pytest.raises(ValueError, match="not a saved variant"):
        C.load_variant(tmp_path / "nothing")
