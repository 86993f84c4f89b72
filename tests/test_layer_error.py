"""Per-layer error (relative error, SQNR, cosine, max abs) against float64 definitions."""

from __future__ import annotations

import math

import pytest
import torch

import minidiff
from minidiff.similarity import LayerErrorAccumulator, layer_error
from minidiff.similarity.layer_error import first_below


def _pair(n=300, dims=(16, 40, 7), noise=(1e-3, 0.1, 1.0), seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    a = [torch.randn(n, d, generator=g, dtype=torch.float64) * (1 + l) + 3 for l, d in enumerate(dims)]
    b = [x + s * torch.randn(x.shape, generator=g, dtype=torch.float64) for x, s in zip(a, noise)]
    return [x.to(dtype) for x in a], [y.to(dtype) for y in b]


def _reference(a, b):
    """Definitions, float64, one layer at a time."""
    out = {k: [] for k in ("rel_error", "sqnr_db", "cosine", "max_abs")}
    for x, y in zip(a, b):
        x, y = x.double(), y.double()
        err2, sig2 = float(((x - y) ** 2).sum()), float((x ** 2).sum())
        out["rel_error"].append(math.sqrt(err2 / sig2))
        out["sqnr_db"].append(10 * math.log10(sig2 / err2))
        out["cosine"].append(float(torch.nn.functional.cosine_similarity(x, y, dim=1, eps=0).mean()))
        out["max_abs"].append(float((x - y).abs().max()))
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}


def test_functional_equals_definition_and_streaming_and_merge():
    a, b = _pair()
    ref = _reference(a, b)
    got = layer_error(a, b)
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v, rtol=1e-12, atol=1e-12, msg=k)
    dims = [t.shape[1] for t in a]
    acc, shard = LayerErrorAccumulator(dims), LayerErrorAccumulator(dims)
    for s, e in ((0, 17), (17, 150)):
        acc.update([t[s:e] for t in a], [t[s:e] for t in b])
    for s, e in ((150, 151), (151, 300)):
        shard.update([t[s:e] for t in a], [t[s:e] for t in b])
    acc.merge(shard)
    for k, v in acc.compute().items():
        torch.testing.assert_close(v, ref[k], rtol=1e-12, atol=1e-12, msg=k)
    # the layer with 1e-3 noise has high SQNR; the one with noise ~ signal/4 is the first below 20 dB
    assert float(got["sqnr_db"][0]) > 50 > 20 > float(got["sqnr_db"][2])
    assert first_below(got["sqnr_db"], 20.0, ["emb", "mid", "out"]) == "out"
    assert first_below(got["sqnr_db"], -100.0) is None


def test_identical_and_edge_cases():
    a, _ = _pair(n=20, dims=(5,))
    same = layer_error(a, [t.clone() for t in a])
    assert float(same["rel_error"][0]) == 0 and math.isinf(float(same["sqnr_db"][0]))
    assert float(same["cosine"][0]) == pytest.approx(1.0, abs=1e-15) and float(same["max_abs"][0]) == 0
    x = torch.zeros(4, 3)
    y = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 0, 0], [0, 2, 0]])
    with pytest.warns(RuntimeWarning, match="all zero"):
        got = layer_error([x], [y])
    assert math.isnan(float(got["rel_error"][0])) and math.isnan(float(got["sqnr_db"][0]))
    assert float(got["cosine"][0]) == pytest.approx(0.5)  # two rows both zero (1), two one-sided zero (0)
    assert float(got["max_abs"][0]) == 2.0


def test_token_features_and_real_minilm_layers():
    """Per-token rows (tokens, d): MiniLM hidden states against the same model with
    bfloat16-rounded weights; SQNR of the embedding layer far above the last layer's."""
    from transformers import AutoModel, AutoTokenizer

    from minidiff.models.capture import capture
    from minidiff.models.loading import embedded_minilm_dir
    path = str(embedded_minilm_dir())
    tok = AutoTokenizer.from_pretrained(path)
    base, variant = AutoModel.from_pretrained(path).eval(), AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        for p in variant.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    batch = dict(tok(["the cat sat on the mat", "compression changes models"], padding=True,
                     return_tensors="pt"))
    fa = list(capture(base, batch, token_mode="tokens").values())
    fb = list(capture(variant, batch, token_mode="tokens").values())
    got = layer_error(fa, fb)
    ref = _reference(fa, fb)
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v, rtol=1e-9, atol=1e-12, msg=k)
    assert len(fa) == 7 and float(got["sqnr_db"][0]) > float(got["sqnr_db"][-1]) > 10


def test_bad_input():
    a, b = _pair(n=10)
    with pytest.raises(ValueError, match="matched layers"):
        layer_error(a, b[:2])
    with pytest.raises(ValueError, match="same shape"):
        layer_error([a[0]], [b[1]])
    with pytest.raises(ValueError, match="non-finite"):
        layer_error([a[0]], [b[0] * float("nan")])
    acc = LayerErrorAccumulator([16, 40, 7])
    with pytest.raises(ValueError, match="no samples"):
        acc.compute()
    with pytest.raises(ValueError, match="width"):
        acc.update([a[1], a[0], a[2]], [b[1], b[0], b[2]])
    with pytest.raises(ValueError, match="positive layer widths"):
        LayerErrorAccumulator([0])
    with pytest.raises(ValueError, match="threshold_db"):
        first_below(torch.zeros(2), "20")
    assert minidiff.layer_error is layer_error and minidiff.LayerErrorAccumulator is LayerErrorAccumulator
