"""Activation capture: hooks vs output_hidden_states, token modes, padding,
streaming into CKAAccumulator, alignment checks, cleanup after exceptions."""

import pytest
import torch
from torch import nn

import minidiff
from minidiff import models as M

pytestmark = pytest.mark.usefixtures("one_thread")



def tiny_bert(seed=0, vocab=120):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    return BertModel(cfg).eval()


def make_batch(seed=1, b=5, t=12, vocab=120):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (b, t), generator=g)
    am = torch.ones(b, t, dtype=torch.long)
    am[1, 7:] = 0
    am[3, 4:] = 0
    ids[am == 0] = 0
    return {"input_ids": ids, "attention_mask": am, "example_id": torch.arange(b) + 100 * seed}


BLOCKS = ["embeddings", "encoder.layer.0", "encoder.layer.1"]


@pytest.mark.parametrize("mode", ["cls", "mean", "tokens", "flatten"])
def test_hooks_equal_output_hidden_states(mode):
    model = tiny_bert()
    batch = make_batch()
    by_hooks = M.capture(model, batch, layers=BLOCKS, token_mode=mode)
    by_hs = M.capture(model, batch, layers="hidden_states", token_mode=mode)
    with torch.no_grad():
        hs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   output_hidden_states=True).hidden_states
    am = batch["attention_mask"]
    for i, name in enumerate(BLOCKS):
        h = hs[i].double()
        if mode == "cls":
            ref = h[:, 0]
        elif mode == "mean":  # float64 reference of the masked mean
            ref = torch.stack([h[j, am[j].bool()].mean(0) for j in range(h.shape[0])])
        elif mode == "tokens":
            ref = torch.cat([h[j, am[j].bool()] for j in range(h.shape[0])])
            assert ref.shape[0] == int(am.sum())
        else:
            ref = h.reshape(h.shape[0], -1)
        torch.testing.assert_close(by_hooks[name].double(), ref, rtol=1e-6, atol=1e-6)
        assert torch.equal(by_hooks[name], by_hs[f"hidden_states.{i}"])


def test_mean_ignores_padding():
    model = tiny_bert()
    batch = make_batch()
    other = dict(batch)
    ids = batch["input_ids"].clone()
    ids[batch["attention_mask"] == 0] = torch.randint(1, 120, (int((batch["attention_mask"] == 0).sum()),))
    other["input_ids"] = ids
    a = M.capture(model, batch, layers="hidden_states", token_mode="mean")
    b = M.capture(model, other, layers="hidden_states", token_mode="mean")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    # pooling itself: garbage (even NaN) in padded positions never reaches the mean
    h = torch.randn(2, 5, 3, dtype=torch.float64)
    m = torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    h2 = h.clone()
    h2[m == 0] = float("nan")
    p = M.pool(h2, "mean", m)
    torch.testing.assert_close(p, torch.stack([h[0, :3].mean(0), h[1, 0]]), rtol=0, atol=1e-15)
    assert M.pool(h2, "tokens", m).shape == (4, 3)


def test_image_modes_and_errors():
    cnn = M.make_cnn(1, (4, 6), 10).eval()
    x = torch.randn(3, 1, 8, 8)
    f = M.capture(cnn, x, layers=["features.0", "features.3", "head"], token_mode="mean")
    with torch.no_grad():
        c0 = cnn.features[0](x)
    torch.testing.assert_close(f["features.0"], c0.mean(dim=(2, 3)))
    assert f["features.3"].shape == (3, 6) and f["head"].shape == (3, 10)
    g = M.capture(cnn, x, layers="features.*", token_mode="flatten")
    assert list(g) == ["features.0", "features.1", "features.2", "features.3"]
    assert g["features.0"].shape == (3, 4 * 8 * 8)
    with pytest.raises(ValueError, match="sequence outputs"):
        M.capture(cnn, x, layers=["features.0"], token_mode="cls")
    with pytest.raises(ValueError, match="nearest existing names: .*'features.0'"):
        M.capture(cnn, x, layers=["features.O"])
    with pytest.raises(ValueError, match="unknown token_mode"):
        M.capture(cnn, x, layers=["head"], token_mode="max")
    with pytest.raises(ValueError, match="matches no module"):
        M.capture(cnn, x, layers=["decoder.*"])


def test_tuple_and_modeloutput_outputs():
    class Tup(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return (self.lin(x), "aux")

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Tup()

        def forward(self, x):
            return self.inner(x)[0]

    m = Outer()
    x = torch.randn(2, 4)
    f = M.capture(m, x, layers=["inner"])
    torch.testing.assert_close(f["inner"], m.inner.lin(x).detach())
    bert = tiny_bert()  # BertModel itself returns a ModelOutput: first field = last_hidden_state
    outer = nn.ModuleDict({"bert": bert})
    batch = make_batch()
    g = M.capture(bert, batch, layers=["encoder"], token_mode="cls")
    with torch.no_grad():
        ref = bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state[:, 0]
    torch.testing.assert_close(g["encoder"], ref)
    del outer


def test_cleanup_after_exception():
    model = tiny_bert()
    model.train()
    model.encoder.layer[1].eval()  # mixed flags must come back exactly
    flags = {n: m.training for n, m in model.named_modules()}

    def bad_forward(m, batch, **kw):
        m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        M.capture(model, make_batch(), layers=BLOCKS, forward=bad_forward)
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    assert {n: m.training for n, m in model.named_modules()} == flags
    # a consumer raising is cleaned up the same way
    def bad_consumer(f):
        raise KeyError("consumer")
    with pytest.raises(KeyError):
        M.capture_stream(model, [make_batch()], layers=BLOCKS, consumers=[bad_consumer])
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    assert {n: m.training for n, m in model.named_modules()} == flags


def test_stream_into_cka_accumulator_matches_full_data():
    a, b = tiny_bert(0), tiny_bert(1)
    batches = [make_batch(seed=s) for s in range(1, 5)]
    w = M.probe_widths({"a": a, "b": b}, batches[0], layers=BLOCKS)
    acc = minidiff.CKAAccumulator(w["a"], w["b"])
    seen = []

    def collect(fa, fb):
        seen.append((fa, fb))

    summary = M.capture_stream({"a": a, "b": b}, batches, layers=BLOCKS, consumers=[acc, collect])
    assert summary.n_batches == 4 and summary.n_samples == 20
    assert summary.widths["a"] == dict(zip(BLOCKS, [32, 32, 32]))
    full_a = [torch.cat([s[0][n] for s in seen]) for n in BLOCKS]
    full_b = [torch.cat([s[1][n] for s in seen]) for n in BLOCKS]
    ref = minidiff.cka_matrix(full_a, full_b)
    torch.testing.assert_close(acc.compute(), ref, rtol=1e-6, atol=1e-6)  # float32 features
    # per batch, the features equal a direct capture of that batch
    direct = M.capture(a, batches[2], layers=BLOCKS)
    for n in BLOCKS:
        assert torch.equal(seen[2][0][n], direct[n])


def test_alignment_checks():
    from transformers import BertTokenizer

    a, b = tiny_bert(0), tiny_bert(1)
    import tempfile, pathlib
    d = pathlib.Path(tempfile.mkdtemp())
    (d / "v1.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"]))
    (d / "v2.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "world", "hello", "x"]))
    t1, t2 = BertTokenizer(str(d / "v1.txt")), BertTokenizer(str(d / "v2.txt"))
    with pytest.raises(ValueError, match="different tokenizers"):
        M.capture_stream({"a": a, "b": b}, [make_batch()], layers=BLOCKS, tokenizers={"a": t1, "b": t2})
    # per-model batches aligned by example id are accepted...
    texts = ["hello world", "world", "hello hello world"]
    ba = dict(t1(texts, padding=True, return_tensors="pt"), example_id=torch.arange(3))
    bb = dict(t2(texts, padding=True, return_tensors="pt"), example_id=torch.arange(3))
    got = []
    M.capture_stream({"a": a, "b": b}, {"a": [ba], "b": [bb]}, layers=BLOCKS,
                     tokenizers={"a": t1, "b": t2}, consumers=[lambda fa, fb: got.append((fa, fb))])
    assert got[0][0]["encoder.layer.1"].shape == got[0][1]["encoder.layer.1"].shape == (3, 32)
    # ...misaligned ones are not
    bb_bad = dict(bb, example_id=torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match="example ids"):
        M.capture_stream({"a": a, "b": b}, {"a": [ba], "b": [bb_bad]}, layers=BLOCKS)
    with pytest.raises(ValueError, match="different lengths"):
        M.capture_stream({"a": a, "b": b}, {"a": [ba, ba], "b": [bb]}, layers=BLOCKS)
    with pytest.raises(ValueError, match="example_id"):
        M.capture_stream({"a": a, "b": b}, {"a": [{"input_ids": ba["input_ids"]}], "b": [bb]}, layers=BLOCKS)


def test_minilm_capture_equals_hidden_states():
    lm = M.load_model("minilm")
    clf = M.TextClassifier(lm.model, lm.tokenizer, 2)
    batch = clf.tokenize(["A short one.", "A considerably longer sentence, with several more tokens in it."])
    hooks = M.capture(clf, batch, layers=["encoder.embeddings"] + [f"encoder.encoder.layer.{i}" for i in range(6)])
    hs = M.capture(clf, batch, layers="hidden_states")
    assert len(hs) == 7
    for (k1, v1), (k2, v2) in zip(hooks.items(), hs.items()):
        assert v1.shape == (2, 384)
        assert torch.equal(v1, v2), (k1, k2)


def test_per_model_layers_teacher_vs_student():
    from minidiff import compress as C

    teacher = M.TextClassifier(tiny_bert(), None, 2)
    student = C.distillation.make_student(teacher, keep_layers=[1])
    batches = [make_batch(seed=s) for s in (1, 2)]
    lay = {"t": "hidden_states", "s": "hidden_states"}
    w = M.probe_widths({"t": teacher, "s": student}, batches[0], layers=lay)
    assert len(w["t"]) == 3 and len(w["s"]) == 2
    acc = minidiff.CKAAccumulator(w["t"], w["s"])
    s = M.capture_stream({"t": teacher, "s": student}, batches, layers=lay, consumers=[acc])
    assert s.layers["s"] == ["hidden_states.0", "hidden_states.1"]
    cka = acc.compute()
    assert cka.shape == (3, 2)
    # the student's block is a copy of teacher block 1, fed by the same embeddings: layer 0 identical
    torch.testing.assert_close(cka[0, 0], torch.tensor(1.0, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="every model"):
        M.capture_stream({"t": teacher, "s": student}, batches, layers={"t": "hidden_states"})
