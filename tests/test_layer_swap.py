"""Layer-swap sensitivity (minidiff.localize.layer_swap): exactness of the swaps,
rankings on constructed cases, float64 references for the metrics, error messages."""

from __future__ import annotations

import copy
import warnings

import minidiff
import pytest
import torch
from minidiff.compress import prune, quantize
from minidiff.compress.variant import state_sha256
from minidiff.localize import block_names, layer_swap, linear_names, plan, swap_modules
from minidiff.models import make_mlp


def _ref_change(base_logits: torch.Tensor, other_logits: torch.Tensor) -> tuple[float, float]:
    """float64 reference: churn and mean KL(softmax base || softmax other)."""
    lp = torch.log_softmax(base_logits.double(), -1)
    lq = torch.log_softmax(other_logits.double(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).mean()
    churn = (base_logits.argmax(-1) != other_logits.argmax(-1)).double().mean()
    return float(churn), float(kl)


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    return make_mlp(16, [32, 32], 4).eval()


@pytest.fixture(scope="module")
def xs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(96, 16, generator=g)


def _snapshot(model):
    return state_sha256(model), [id(m) for m in model.modules()]


def test_all_layers_swapped_equals_variant_and_none_equals_base(mlp, xs):
    variant = prune(mlp, sparsity=0.6).model
    with torch.no_grad():
        with swap_modules(mlp, variant, block_names(mlp)):
            all_swapped = mlp(xs)
        with swap_modules(mlp, variant, []):
            none_swapped = mlp(xs)
        assert torch.equal(all_swapped, variant(xs))
        assert torch.equal(none_swapped, mlp(xs))
        assert not torch.equal(mlp(xs), variant(xs))


def test_whole_change_matches_float64_reference_and_models_untouched(mlp, xs):
    variant = prune(mlp, sparsity=0.6).model
    before_b, before_v = _snapshot(mlp), _snapshot(variant)
    res = layer_swap(mlp, variant, [xs[:40], xs[40:]], direction="both", max_examples=None)
    assert _snapshot(mlp) == before_b and _snapshot(variant) == before_v
    with torch.no_grad():
        churn, kl = _ref_change(mlp(xs), variant(xs))
    assert res.whole_churn == pytest.approx(churn, abs=0)  # exact count / n
    assert res.whole_kl == pytest.approx(kl, rel=1e-9, abs=1e-15)
    assert res.kind == "classifier" and res.n_examples == res.n_units == 96
    # every single-layer effect against its own float64 reference
    with torch.no_grad():
        for e in res.into_base + res.restore:
            host, donor = (mlp, variant) if e.direction == "into_base" else (variant, mlp)
            with swap_modules(host, donor, [e.layer]):
                out = host(xs)
            c, k = _ref_change(mlp(xs), out)
            assert e.churn == pytest.approx(c, abs=0)
            assert e.kl == pytest.approx(k, rel=1e-9, abs=1e-15)
            assert e.same_top1 == pytest.approx(1 - c)
    assert res.plan.forward_passes == 2 * (2 + 2 * 3)
    assert [e.kl for e in res.into_base] == sorted((e.kl for e in res.into_base), reverse=True)
    frame = res.to_frame()
    assert len(frame) == 6 and set(frame["direction"]) == {"into_base", "restore"}


def test_ranking_on_one_perturbed_layer(mlp, xs):
    variant = copy.deepcopy(mlp)
    with torch.no_grad():
        variant[3].weight.add_(0.5 * torch.randn_like(variant[3].weight))
    res = layer_swap(mlp, variant, xs, direction="both")
    assert res.ranking("into_base")[0] == "3"
    assert res.ranking("restore")[0] == "3"
    eff = {e.layer: e for e in res.into_base}
    # identical weights in both models: exactly no change
    for name in ("1", "5"):
        assert eff[name].kl == 0.0 and eff[name].churn == 0.0 and eff[name].share_kl == 0.0
    # the one perturbed layer explains the whole change; restoring it removes all of it
    assert eff["3"].kl == res.whole_kl > 0 and eff["3"].share_kl == 1.0
    rest = {e.layer: e for e in res.restore}
    assert rest["3"].kl == 0.0 and rest["3"].share_kl == 1.0
    assert rest["1"].kl == res.whole_kl and rest["1"].share_kl == 0.0


def test_identical_models_give_zero_and_nan_shares(mlp, xs):
    res = layer_swap(mlp, copy.deepcopy(mlp), xs)
    assert res.whole_kl == 0.0 and res.whole_churn == 0.0
    assert all(e.kl == 0.0 and e.churn == 0.0 for e in res.into_base)
    assert all(e.share_kl != e.share_kl for e in res.into_base)  # NaN: no change to share


def test_max_examples_and_plan_stated_before(mlp, xs, caplog):
    variant = prune(mlp, sparsity=0.5).model
    p = plan(mlp, variant, [xs[:30], xs[30:60], xs[60:]], granularity="linear", max_examples=50)
    assert p.n_examples == 50 and p.n_batches == 2 and p.layers == ["1", "3", "5"]
    assert p.forward_passes == 2 * (2 + 3) and p.estimated_seconds > 0
    with caplog.at_level("INFO", logger="minidiff.localize.swap"):
        res = layer_swap(mlp, variant, iter([xs[:30], xs[30:60], xs[60:]]), granularity="linear", max_examples=50)
    assert res.n_examples == 50 and "forward passes" in caplog.text
    with torch.no_grad():
        _, kl = _ref_change(mlp(xs[:50]), variant(xs[:50]))
    assert res.whole_kl == pytest.approx(kl, rel=1e-9)


def test_torch_ao_dynamic_int8_and_fp16_modules(mlp, xs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = torch.ao.quantization.quantize_dynamic(copy.deepcopy(mlp), {torch.nn.Linear}, dtype=torch.qint8)
    assert linear_names(mlp, qmodel) == ["1", "3", "5"]
    with torch.no_grad(), swap_modules(mlp, qmodel, linear_names(mlp, qmodel)):
        assert torch.equal(mlp(xs), qmodel(xs))
    res = layer_swap(mlp, qmodel, xs, granularity="linear")
    assert res.whole_kl > 0 and {e.layer for e in res.into_base} == {"1", "3", "5"}
    # float16 variant: the swapped module runs in float16 inside the float32 base
    half = quantize(mlp, "fp16").model
    with torch.no_grad(), swap_modules(mlp, half, ["1", "3", "5"]):
        assert torch.equal(mlp(xs), half(xs).float())
    res = layer_swap(mlp, half, xs, granularity="linear", direction="both")
    assert res.whole_kl > 0 and all(e.kl >= 0 for e in res.into_base)


def test_bad_input_errors(mlp, xs):
    variant = prune(mlp, sparsity=0.5).model
    with pytest.raises(ValueError, match=r"unknown layer name\(s\) \['7'\].*Valid names include.*linear layers: "
                                         r"\['1', '3', '5'\]"):
        layer_swap(mlp, variant, xs, granularity=["7"])
    with pytest.raises(ValueError, match="direction"):
        layer_swap(mlp, variant, xs, direction="sideways")
    with pytest.raises(ValueError, match="same object"):
        layer_swap(mlp, mlp, xs)
    with pytest.raises(ValueError, match="max_examples"):
        layer_swap(mlp, variant, xs, max_examples=0)
    with pytest.raises(ValueError, match="no examples"):
        layer_swap(mlp, variant, [])
    with pytest.raises(TypeError, match="nn.Module"):
        layer_swap(mlp, "variant", xs)
    other = make_mlp(16, [8], 4)
    with pytest.raises(ValueError, match="unknown layer name"):
        layer_swap(mlp, other, xs, granularity=["5"])
    # a swap whose shapes do not fit fails cleanly and leaves the model intact
    snap = _snapshot(mlp)
    with pytest.raises(ValueError, match="swapping '3'"):
        layer_swap(mlp, other, xs, granularity=["3"])
    assert _snapshot(mlp) == snap


# ---------------------------------------------------------------------- MiniLM
# (kept to a few forward passes: MiniLM on a loaded 2-core CPU takes ~1 s per batch)
@pytest.fixture(scope="module")
def minilm():
    from minidiff.data import load_builtin
    from minidiff.models import TextClassifier

    torch.manual_seed(0)
    model = TextClassifier.from_pretrained("minilm", num_classes=4).eval()
    texts = list(load_builtin("chatterbot-en").inputs[:24])
    batches = [model.tokenize(texts[s:s + 12]) for s in range(0, len(texts), 12)]
    return model, batches


def test_minilm_int8(minilm):
    model, batches = minilm
    chosen = ["encoder.encoder.layer.0.attention.self.query", "encoder.encoder.layer.5.output.dense", "head"]
    variant = quantize(model, "int8", layers="encoder.encoder.layer.[05].*").model
    names = linear_names(model, variant)
    assert len(names) == 38 and type(variant.get_submodule(chosen[0])).__name__ != "Linear"
    with torch.no_grad():
        b = batches[0]
        with swap_modules(model, variant, names):
            assert torch.equal(model(**b), variant(**b))
        with swap_modules(model, variant, block_names(model)):
            assert torch.equal(model(**b), variant(**b))
    res = layer_swap(model, variant, batches, granularity=chosen)
    assert res.n_examples == 24 and res.plan.forward_passes == 2 * (2 + 3)
    eff = {e.layer: e for e in res.into_base}
    assert eff["head"].kl == 0.0 and eff["head"].churn == 0.0  # head not quantized: identical weights
    assert eff[chosen[0]].kl > 0 and eff[chosen[1]].kl > 0
    with torch.no_grad():
        base = torch.cat([model(**b) for b in batches])
        var = torch.cat([variant(**b) for b in batches])
    churn, kl = _ref_change(base, var)
    assert res.whole_churn == churn and res.whole_kl == pytest.approx(kl, rel=1e-9)


def test_minilm_one_perturbed_block(minilm):
    model, batches = minilm
    perturbed = copy.deepcopy(model)
    with torch.no_grad():
        perturbed.encoder.encoder.layer[2].intermediate.dense.weight.mul_(0.5)
    blocks = ["encoder.embeddings", "encoder.encoder.layer.2", "encoder.encoder.layer.4", "head"]
    assert set(blocks) <= set(block_names(model))
    res = layer_swap(model, perturbed, batches, granularity=blocks, direction="both", max_examples=12)
    assert res.ranking("into_base")[0] == "encoder.encoder.layer.2"
    assert res.ranking("restore")[0] == "encoder.encoder.layer.2"
    assert all(e.kl == 0.0 for e in res.into_base if e.layer != "encoder.encoder.layer.2")
    assert {e.layer: e for e in res.restore}["encoder.encoder.layer.2"].share_kl == 1.0


# ---------------------------------------------------------------------- language model
def test_language_model_tokens():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=3, n_head=2,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(cfg).eval()
    variant = copy.deepcopy(base)
    with torch.no_grad():
        variant.transformer.h[1].mlp.c_fc.weight.mul_(1.5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (6, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[3:, 7:] = 0  # padding tokens never count
    batch = {"input_ids": ids, "attention_mask": mask}
    assert "transformer.h.1" in block_names(base)
    res = layer_swap(base, variant, batch, granularity=["transformer.h.0", "transformer.h.1", "transformer.h.2"])
    assert res.kind == "language-model" and res.unit == "tokens" and res.n_units == int(mask.sum())
    assert res.ranking("into_base")[0] == "transformer.h.1"
    with torch.no_grad():
        keep = mask.bool()
        churn, kl = _ref_change(base(**batch).logits[keep], variant(**batch).logits[keep])
    assert res.whole_churn == churn and res.whole_kl == pytest.approx(kl, rel=1e-9)
    assert res.kl_function == "minidiff.lm.token_divergence"


def test_public_export():
    assert minidiff.layer_swap is layer_swap
