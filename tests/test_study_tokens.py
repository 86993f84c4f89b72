"""Token-level studies: with token_mode="tokens" every non-padding token is a CKA
sample (the large-study mode of docs/architecture.md), while the per-example embedding used
by kNN overlap and OOD stays one attention-masked mean per example."""

from __future__ import annotations

import numpy as np
import pytest
import torch


pytestmark = pytest.mark.usefixtures("one_thread")


TEXTS = ["hello there", "what is your favourite book and why do you like it",
         "do you like football", "tell me a joke", "the weather is nice today, is it not",
         "who wrote hamlet", "i am learning to code in python", "what time is it",
         "my computer will not start", "how much money do i need to retire early",
         "can you recommend a film", "good night"]


def test_token_mode_cka_equals_all_tokens_reference():
    from transformers import AutoTokenizer, BertConfig, BertModel

    from minidiff.compress import prune
    from minidiff.data import ExampleSet
    from minidiff.models import TextClassifier, embedded_minilm_dir
    from minidiff.models.capture import capture
    from minidiff.similarity import cka_matrix
    from minidiff.study import Study

    tok = AutoTokenizer.from_pretrained(str(embedded_minilm_dir()))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    base = TextClassifier(BertModel(cfg), tok, 3).eval()
    variant = prune(base, sparsity=0.5).model.eval()
    labels = torch.arange(len(TEXTS)) % 3
    data = ExampleSet(name="t", kind="text", inputs=list(TEXTS), labels=labels, class_names=["a", "b", "c"])
    layers = ["encoder.encoder.layer.0", "encoder.encoder.layer.1"]
    res = Study(base, {"p": variant}, data, token_mode="tokens", layers=layers, batch_size=4, chunk_batches=1,
                progress=False, tokenizer=tok, metrics={"bootstrap": 100, "knn_k": 3, "ood_k": 3}).run()

    # reference: all non-padding tokens of the whole set in one batch, float64 CKA
    enc = tok(TEXTS, padding=True, truncation=True, max_length=128, return_tensors="pt")
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    fa = capture(base, batch, layers=layers, token_mode="tokens")
    fb = capture(variant, batch, layers=layers, token_mode="tokens")
    n_tokens = int(enc["attention_mask"].sum())
    assert all(t.shape[0] == n_tokens for t in fa.values())
    want = cka_matrix([t.double() for t in fa.values()], [t.double() for t in fb.values()],
                      estimator="unbiased").numpy()
    got = np.asarray(res["representation"]["p"]["cka"]["matrix"], dtype=float)
    assert got.shape == (2, 2)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_unknown_token_mode_is_named():
    from minidiff.study import Study
    from minidiff.data import ExampleSet

    data = ExampleSet(name="t", kind="tabular", inputs=torch.randn(8, 3), labels=torch.arange(8) % 2,
                      class_names=["a", "b"])
    m = torch.nn.Linear(3, 2)
    with pytest.raises(ValueError, match="token_mode"):
        Study(m, {"v": m}, data, token_mode="words")
