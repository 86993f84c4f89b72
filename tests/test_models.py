"""Model loading, the embedded MiniLM and the small classifiers."""

import pytest
import torch

from minidiff import models as M

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture(scope="module")
def minilm():
    return M.load_model("minilm")


def test_embedded_dir_has_weights():
    d = M.embedded_minilm_dir()
    assert (d / "config.json").exists()
    assert any(d.glob("*.safetensors"))


def test_load_minilm_offline_and_embed(minilm):
    assert type(minilm.model).__name__ == "BertModel"
    assert minilm.model.config.num_hidden_layers == 6 and minilm.model.config.hidden_size == 384
    assert not minilm.model.training
    clf = M.TextClassifier(minilm.model, minilm.tokenizer, 3)
    batch = clf.tokenize(["The cat sat on the mat.", "Compressed models forget rare examples."])
    logits = clf(**batch)
    assert logits.shape == (2, 3)
    # sentence-transformers' MiniLM: paraphrases are closer than unrelated sentences
    texts = ["A man is eating food.", "A man is eating a meal.", "The stock market fell sharply today."]
    b = clf.tokenize(texts)
    with torch.no_grad():
        h = clf.encoder(**b).last_hidden_state
    e = torch.nn.functional.normalize(M.masked_mean(h, b["attention_mask"]), dim=1)
    sims = e @ e.T
    assert sims[0, 1] > 0.8 > sims[0, 2]


def test_inputs_embeds_matches_input_ids(minilm):
    clf = M.TextClassifier(minilm.model, minilm.tokenizer, 2)
    b = clf.tokenize(["hello there", "general kenobi, you are a bold one"])
    with torch.no_grad():
        a = clf(**b)
        emb = clf.input_embeddings()(b["input_ids"])
        c = clf(inputs_embeds=emb, attention_mask=b["attention_mask"])
    torch.testing.assert_close(a, c)


def test_hub_id_offline_is_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match="HF_HUB_OFFLINE"):
        M.load_model("some-org/definitely-not-cached-model-xyz")


def test_bad_sources():
    with pytest.raises(ValueError, match="not a directory"):
        M.load_model("/nonexistent/dir/for/minidiff")
    with pytest.raises(ValueError, match="unknown task"):
        M.load_model("minilm", task="nope")


def test_plain_module_and_factories():
    mlp = M.make_mlp(64, [32], 10)
    lm = M.load_model(mlp, forward=lambda m, b: m(b))
    assert lm.model is mlp and lm.task == "module" and lm.tokenizer is None
    assert mlp(torch.randn(5, 8, 8)).shape == (5, 10)
    cnn = M.make_cnn(1, (4, 8), 10)
    assert cnn(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    for m in (mlp, cnn):
        rebuilt = M.build_from_spec(M.architecture_of(m))
        assert [(n, p.shape) for n, p in rebuilt.named_parameters()] == [(n, p.shape) for n, p in m.named_parameters()]
