"""minidiff.quant, the one quantizer: int8/int4 against independent numpy references, the
edge-case rules (zero rows, NaN/Inf), int4 packing, and the recipes on tiny decoders
(GPT-2 with its transposed Conv1D, Llama) built from configs in the test (no download)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minidiff import quant as Q
from minidiff.compress import load_variant, prune, quantize, save_variant
from minidiff.nn import Int4WeightOnlyLinear, Int8Linear, ReferenceInt8Linear
from minidiff.ops import int8 as I

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: threads only add contention


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    # rows spanning six decades of magnitude exercise the per-row scales
    return torch.randn(*shape, generator=g) * torch.logspace(-3, 3, shape[0])[:, None]


# -------------------------------------------------------------------- int8, numpy references
def _np_int8_weight(w: np.ndarray):
    s = (np.abs(w).astype(np.float32).max(axis=1) / np.float32(127)).astype(np.float32)
    safe = np.where(s > 0, s.astype(np.float64), 1.0)
    q = np.clip(np.rint(w.astype(np.float64) / safe[:, None]), -127, 127)
    return np.where(s[:, None] > 0, q, 0).astype(np.int8), s


def _np_per_token(x: np.ndarray):
    x = x.astype(np.float32)
    with np.errstate(invalid="ignore"):
        s = np.where(np.isfinite(x).all(axis=1), np.abs(x).max(axis=1) / np.float32(127), np.nan).astype(np.float32)
    ok = s > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        q = np.clip(np.rint(x / np.where(ok, s, np.float32(1))[:, None]), -127, 127)
    return np.where(ok[:, None], q, 0).astype(np.int8), s


def test_int8_weight_matches_numpy_exactly():
    w = _rand(40, 77)
    w[5] = 0.0
    q, s = Q.quantize_weight_int8(w)
    qn, sn = _np_int8_weight(w.numpy())
    assert q.dtype == torch.int8 and s.dtype == torch.float32
    assert np.array_equal(q.numpy(), qn) and np.array_equal(s.numpy(), sn)
    # every code within half a step of the weight, extreme of each row at +-127
    err = (Q.dequantize_weight_int8(q, s).double() - w.double()).abs()
    assert torch.all(err <= 0.5 * s.double()[:, None] * (1 + 1e-6))
    assert torch.equal(q[[i for i in range(40) if i != 5]].abs().amax(1), torch.full((39,), 127, dtype=torch.int8))


def test_int8_weight_hand_case_ties_to_even():
    w = torch.tensor([[1.0, -0.5, 0.25], [0.0, 0.0, 0.0], [-254.0, 127.0, 1.0]])
    q, s = Q.quantize_weight_int8(w)
    assert s.tolist() == pytest.approx([1 / 127, 0.0, 2.0])
    assert q.tolist() == [[127, -64, 32], [0, 0, 0], [-127, 64, 0]]  # 63.5 -> 64, 0.5 -> 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_per_token_matches_numpy_and_native_kernel(dtype):
    x = _rand(37, 300, seed=1).to(dtype)
    x[3] = 0
    x[4, 7] = float("nan")
    x[6, 0] = float("-inf")
    q, s = Q.quantize_per_token_reference(x)
    qn, sn = _np_per_token(x.float().numpy())
    assert np.array_equal(q.numpy(), qn)
    assert np.array_equal(np.nan_to_num(s.numpy(), nan=-1), np.nan_to_num(sn, nan=-1))
    qc, sc = I.quantize_rows(x)  # the native CPU kernel implements the same definition bit for bit
    assert torch.equal(qc, q) and torch.equal(sc.nan_to_num(-1), s.nan_to_num(-1))


def test_per_token_keeps_leading_dims():
    x = torch.randn(2, 3, 16)
    q, s = Q.quantize_per_token_reference(x)
    q2, s2 = Q.quantize_per_token_reference(x.reshape(6, 16))
    assert q.shape == (2, 3, 16) and s.shape == (2, 3)
    assert torch.equal(q.reshape(6, 16), q2) and torch.equal(s.reshape(6), s2)


def test_int8_references_exact_integer_part():
    x, w = torch.randn(9, 50), torch.randn(7, 50)
    wq, ws = Q.quantize_weight_int8(w)
    xq, xs = Q.quantize_per_token_reference(x)
    acc = Q.int8_matmul_reference(xq, wq)
    assert acc.dtype == torch.int32
    assert np.array_equal(acc.numpy(), xq.numpy().astype(np.int64) @ wq.numpy().astype(np.int64).T)
    b = torch.randn(7)
    ref = Q.int8_linear_reference(x, wq, ws, b)
    exp = acc.double() * xs.double()[:, None] * ws.double() + b.double()
    assert torch.equal(ref, exp)


# ------------------------------------------------------------------- the one edge-case rule
def test_zero_rows_dequantize_to_exact_zero_everywhere():
    w = torch.randn(6, 64)
    w[2] = 0.0
    q, s = Q.quantize_weight_int8(w)
    assert s[2] == 0 and not q[2].any() and not Q.dequantize_weight_int8(q, s)[2].any()
    for sym in (True, False):
        w4 = Q.quantize_weight_int4(w, group_size=32, symmetric=sym)
        deq = Q.dequantize_weight_int4(w4.packed, w4.scale, w4.zero, 32)
        assert not w4.scale[2].any() and not deq[2].any()
        assert torch.equal(Q.unpack_int4(w4.packed)[2], torch.full((64,), 8 if sym else 0, dtype=torch.uint8))
    # a zero activation row gives exactly the bias, on every path
    lin = nn.Linear(64, 6)
    x = torch.randn(3, 64)
    x[1] = 0
    for layer in (Int8Linear.from_linear(lin), ReferenceInt8Linear.from_linear(lin),
                  Int4WeightOnlyLinear.from_linear(lin, group_size=32)):
        with torch.no_grad():
            assert torch.equal(layer(x)[1], lin.bias.detach()), type(layer).__name__


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_weights_refused_naming_the_layer(bad):
    w = torch.randn(4, 32)
    w[1, 3] = bad
    with pytest.raises(ValueError, match="'blocks.0.fc'.*non-finite"):
        Q.quantize_weight_int8(w, name="blocks.0.fc")
    with pytest.raises(ValueError, match="'blocks.0.fc'.*non-finite"):
        Q.quantize_weight_int4(w, group_size=32, name="blocks.0.fc")
    model = nn.Sequential(nn.Linear(32, 4), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight.copy_(w)
    for method in ("int8", "int8-weight-only", "int4-weight-only"):
        with pytest.raises(ValueError, match="layer '0'"):
            quantize(model, method, group_size=32, layers=["0", "2"]) if method.startswith("int4") else \
                quantize(model, method, layers=["0", "2"])


def test_nonfinite_activation_row_gives_nan_outputs_only_there():
    lin = nn.Linear(32, 5)
    x = torch.randn(4, 32)
    x[1, 3] = float("nan")
    x[2, 0] = float("inf")
    wq, ws = Q.quantize_weight_int8(lin.weight)
    outs = [Q.int8_linear_reference(x, wq, ws, lin.bias.detach()),
            I.int8_linear(x, wq, ws, lin.bias.detach()).double()]
    with torch.no_grad():
        outs += [Int8Linear.from_linear(lin)(x).double(), ReferenceInt8Linear.from_linear(lin)(x).double()]
    for y in outs:
        assert torch.isnan(y[[1, 2]]).all() and torch.isfinite(y[[0, 3]]).all()
        torch.testing.assert_close(y[[0, 3]], outs[0][[0, 3]], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ int4
def _np_int4(w: np.ndarray, g: int, symmetric: bool):
    """Independent numpy version of the documented int4 rule: (codes 0..15, scale, zero)."""
    n, k = w.shape
    wg = w.astype(np.float64).reshape(n, k // g, g)
    wf = w.astype(np.float32).reshape(n, k // g, g)
    if symmetric:
        s = (np.abs(wf).max(-1) / np.float32(7)).astype(np.float32)
        safe = np.where(s > 0, s.astype(np.float64), 1.0)
        q = np.where(s[..., None] > 0, np.clip(np.rint(wg / safe[..., None]), -7, 7), 0) + 8
        z = np.full(s.shape, 8)
    else:
        lo, hi = np.minimum(wf.min(-1), 0).astype(np.float64), np.maximum(wf.max(-1), 0).astype(np.float64)
        s = ((hi - lo) / 15).astype(np.float32)
        safe = np.where(s > 0, s.astype(np.float64), 1.0)
        z = np.where(s > 0, np.clip(np.rint(-lo / safe), 0, 15), 0)
        q = np.where(s[..., None] > 0, np.clip(np.rint(wg / safe[..., None]) + z[..., None], 0, 15), 0)
    return q.reshape(n, k).astype(np.uint8), s, z


@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_matches_numpy_and_bounds_the_error(group_size, symmetric):
    w = _rand(24, 256, seed=2)
    w[3, :group_size] = 0.0  # one all-zero group
    w[4] = w[4].abs()  # a row without negative weights (asymmetric zero point 0)
    q = Q.quantize_weight_int4(w, group_size=group_size, symmetric=symmetric)
    codes, s, z = _np_int4(w.numpy(), group_size, symmetric)
    assert q.packed.dtype == torch.uint8 and q.packed.shape == (24, 128)
    assert q.scale.shape == (24, 256 // group_size) and q.group_size == group_size
    assert np.array_equal(Q.unpack_int4(q.packed).numpy(), codes)
    assert np.array_equal(q.scale.numpy(), s)
    assert (q.zero is None) == symmetric
    if not symmetric:
        assert np.array_equal(q.zero.numpy(), z.astype(np.uint8))
    exact = Q.dequantize_weight_int4(q.packed, q.scale, q.zero, group_size, torch.float64)
    ref = torch.from_numpy((codes.astype(np.float64).reshape(24, -1, group_size) - z[..., None])
                           * s.astype(np.float64)[..., None]).reshape(24, 256)
    assert torch.equal(exact, ref)
    # round to nearest: at most half a step from the weight (the asymmetric top may clip by < 1 step)
    step = q.scale.double().repeat_interleave(group_size, dim=1)
    err = (exact - w.double()).abs()
    assert torch.all(err <= (0.5 if symmetric else 1.0) * step * (1 + 1e-6))
    assert not exact[3, :group_size].any()


def test_int4_pack_unpack_exact():
    every = torch.arange(256, dtype=torch.int32).to(torch.uint8)[None, :]
    assert torch.equal(Q.pack_int4(Q.unpack_int4(every)), every)
    codes = torch.randint(0, 16, (7, 64), dtype=torch.uint8)
    packed = Q.pack_int4(codes)
    assert packed.shape == (7, 32)
    assert torch.equal(packed, codes[:, 0::2] | (codes[:, 1::2] << 4))  # low nibble = even index
    assert torch.equal(Q.unpack_int4(packed), codes)
    with pytest.raises(ValueError, match="even"):
        Q.pack_int4(codes[:, :63])
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        Q.pack_int4(codes + 16)


def test_int4_group_edges_are_refused_clearly():
    with pytest.raises(ValueError, match="'mlp.fc'.*in_features=100 is not a multiple of it"):
        Q.quantize_weight_int4(torch.randn(4, 100), group_size=32, name="mlp.fc")
    with pytest.raises(ValueError, match="positive even"):
        Q.quantize_weight_int4(torch.randn(4, 96), group_size=3)
    model = nn.Sequential(nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 4))
    with pytest.raises(ValueError, match="layer '2'.*exclude the layer with layers="):
        quantize(model, "int4-weight-only", group_size=32, layers=["0", "2"])
    v = quantize(model, "int4-weight-only", group_size=32, layers=["0"])  # the way out the message names
    assert isinstance(v.model[0], Int4WeightOnlyLinear) and type(v.model[2]) is nn.Linear


@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_module_forward_and_state_dict(symmetric):
    lin = nn.Linear(128, 40)
    m = Int4WeightOnlyLinear.from_linear(lin, group_size=32, symmetric=symmetric)
    x = torch.randn(3, 5, 128)
    w = Q.quantize_weight_int4(lin.weight, group_size=32, symmetric=symmetric)
    with torch.no_grad():
        y = m(x)
        # the forward pass is F.linear with exactly the dequantized weight
        assert torch.equal(y, F.linear(x, Q.dequantize_weight_int4(*w), lin.bias))
        ref = Q.int4_weight_only_linear_reference(x.reshape(-1, 128), w, lin.bias)
        torch.testing.assert_close(y.reshape(-1, 40).double(), ref, rtol=1e-5, atol=1e-5)
        assert (y - lin(x)).norm() / lin(x).norm() < 0.1
    fresh = Int4WeightOnlyLinear.from_spec({"in_features": 128, "out_features": 40, "bias": True, **m.spec()})
    fresh.load_state_dict(m.state_dict())
    with torch.no_grad():
        assert torch.equal(fresh(x), y)
    keys = {"weight_packed", "weight_scale", "bias"} | (set() if symmetric else {"weight_zero"})
    assert set(m.state_dict()) == keys
    half = Int4WeightOnlyLinear.from_linear(lin, group_size=32, symmetric=symmetric).to(torch.bfloat16)
    assert half.weight_scale.dtype == torch.float32 and half(x.bfloat16()).dtype == torch.bfloat16


# ----------------------------------------------------------------------- tiny decoders
@pytest.fixture(scope="module")
def tiny_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=128, n_layer=2, n_head=2, vocab_size=101, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def tiny_llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    cfg = transformers.LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=101,
                                   max_position_embeddings=32, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _decoder_linears(model):
    from transformers.pytorch_utils import Conv1D

    return {n: m for n, m in model.named_modules() if type(m) in (nn.Linear, Conv1D) and not n.endswith("lm_head")}


def _weight_out_in(m):
    from transformers.pytorch_utils import Conv1D

    return m.weight.detach().T if type(m) is Conv1D else m.weight.detach()


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(0, 101, (2, 24), generator=torch.Generator().manual_seed(3))
RECIPES = [("int8", {}, 0.03), ("int8-weight-only", {}, 0.025),
           ("int4-weight-only", {"group_size": 32}, 0.3),
           ("int4-weight-only", {"group_size": 128, "symmetric": False}, 0.3)]


@pytest.mark.parametrize("method,kw,tol", RECIPES)
@pytest.mark.parametrize("which", ["tiny_gpt2", "tiny_llama"])
def test_decoder_recipes_exact_weights_close_outputs_round_trip(request, tmp_path, which, method, kw, tol):
    model = request.getfixturevalue(which)
    lins = _decoder_linears(model)
    v = quantize(model, method, **kw)
    qm = dict(v.model.named_modules())
    # every Linear/Conv1D except the head is replaced, with weights equal to the one quantizer's
    assert sorted(v.manifest["parameters"]["layers"]) == sorted(lins)
    assert v.manifest["parameters"]["quantized_weights"] == sum(m.weight.numel() for m in lins.values())
    for name, m in lins.items():
        w = _weight_out_in(m)
        if method.startswith("int8"):
            q, s = Q.quantize_weight_int8(w)
            assert torch.equal(qm[name].weight_int8, q) and torch.equal(qm[name].weight_scale, s), name
        else:
            q = Q.quantize_weight_int4(w, **kw)
            assert torch.equal(qm[name].weight_packed, q.packed) and torch.equal(qm[name].weight_scale, q.scale)
            assert (q.zero is None) or torch.equal(qm[name].weight_zero, q.zero)
    # head and embeddings stay float (GPT-2's head stays tied to wte)
    assert type(v.model.lm_head) is nn.Linear
    assert torch.equal(v.model.lm_head.weight, model.lm_head.weight)
    if which == "tiny_gpt2":
        assert v.model.lm_head.weight is v.model.transformer.wte.weight
    y0, y = _logits(model, IDS), _logits(v.model, IDS)
    rel = ((y - y0).norm() / y0.norm()).item()
    assert rel < tol, rel
    # save/load round trip: same buffers, same logits, fewer bytes than float
    save_variant(v, tmp_path / "v")
    w2 = load_variant(tmp_path / "v")
    assert torch.equal(_logits(w2.model, IDS), y)
    sd, sd2 = v.model.state_dict(), w2.model.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    if which == "tiny_gpt2":
        assert w2.model.lm_head.weight is w2.model.transformer.wte.weight  # the tie survives loading
    assert v.manifest["state_bytes"] < sum(t.numel() * t.element_size() for t in model.state_dict().values())
    # parameter accounting: the quantized weights (and their biases, now buffers) left the float parameters
    biases = sum(m.bias.numel() for m in lins.values() if m.bias is not None)
    assert v.manifest["parameter_count"] == \
        sum(p.numel() for p in model.parameters()) - v.manifest["parameters"]["quantized_weights"] - biases


def test_int4_model_is_the_float_model_with_dequantized_weights(tiny_gpt2):
    """The int4 forward pass computes exactly what the float model does with W_hat put in."""
    import copy

    v = quantize(tiny_gpt2, "int4-weight-only", group_size=32, symmetric=False)
    manual = copy.deepcopy(tiny_gpt2)
    qm = dict(v.model.named_modules())
    with torch.no_grad():
        for name, m in _decoder_linears(manual).items():
            deq = qm[name].dequantized_weight()
            m.weight.copy_(deq.T if type(m) is not nn.Linear else deq)  # Conv1D stores (in, out)
    torch.testing.assert_close(_logits(v.model, IDS), _logits(manual, IDS), rtol=1e-5, atol=1e-5)


def test_w8a8_decoder_fast_equals_reference_backend(tiny_llama):
    fast = _logits(quantize(tiny_llama, "int8").model, IDS)
    ref = _logits(quantize(tiny_llama, "int8", backend="reference").model, IDS)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings("ignore:SemiStructuredLinear:RuntimeWarning")  # 2:4 runs dense on CPU, by design
@pytest.mark.parametrize("which", ["tiny_gpt2", "tiny_llama"])
def test_decoder_pruning_covers_conv1d_and_linear(request, tmp_path, which):
    model = request.getfixturevalue(which)
    lins = _decoder_linears(model)
    v = prune(model, sparsity=0.5)
    assert sorted(v.manifest["parameters"]["layers"]) == sorted(lins)
    mods = dict(v.model.named_modules())
    for name, m in lins.items():
        w = mods[name].weight
        assert int((w == 0).sum()) == round(0.5 * w.numel()), name
    assert torch.equal(v.model.lm_head.weight, model.lm_head.weight)
    v24 = prune(model, structure="2:4")
    mods = dict(v24.model.named_modules())
    for name, m in lins.items():
        w = _weight_out_in(mods[name])  # groups of 4 run along in_features, also for Conv1D
        nz = (w.reshape(w.shape[0], -1, 4) != 0).sum(-1)
        assert int(nz.max()) <= 2, name
        kept = _weight_out_in(m).reshape(w.shape[0], -1, 4).abs()
        # the two kept are the two largest |w| of each group
        assert torch.equal((w.reshape(kept.shape) != 0).sum(-1), torch.full_like(nz, 2))
        assert torch.all(kept.masked_fill(w.reshape(kept.shape) == 0, float("inf")).amin(-1)
                         >= kept.masked_fill(w.reshape(kept.shape) != 0, -1).amax(-1))
    s = prune(model, structure="2:4", to_sparse=True)
    save_variant(s, tmp_path / "s")
    torch.testing.assert_close(_logits(load_variant(tmp_path / "s").model, IDS), _logits(v24.model, IDS))


def test_heads_and_tied_layers_only_when_asked(tmp_path, tiny_gpt2, tiny_llama):
    # an untied head is quantized when named
    v = quantize(tiny_llama, "int8-weight-only", layers=["lm_head"])
    assert isinstance(v.model.lm_head, Int8Linear) and v.manifest["parameters"]["layers"] == ["lm_head"]
    # GPT-2's head is the embedding: quantizing it makes a quantized copy, the embedding stays float
    v = quantize(tiny_gpt2, "int8-weight-only", layers=["lm_head"])
    assert isinstance(v.model.lm_head, Int8Linear)
    assert torch.equal(v.model.transformer.wte.weight, tiny_gpt2.transformer.wte.weight)
    save_variant(v, tmp_path / "head")  # the untied, quantized head survives a save/load
    w = load_variant(tmp_path / "head")
    assert isinstance(w.model.lm_head, Int8Linear) and torch.equal(_logits(w.model, IDS), _logits(v.model, IDS))
    # ... but pruning it would prune the embedding too: refused
    with pytest.raises(ValueError, match="shares its weight with the embedding 'transformer.wte'"):
        prune(tiny_gpt2, sparsity=0.5, layers=["lm_head"])
