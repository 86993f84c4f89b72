"""Tests for minidiff.adversarial (attacks, metrics, report); tiny models, a few seconds each."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from minidiff.adversarial import AdversarialConfig, render_section, run_adversarial
from minidiff.adversarial import continuous as C
from minidiff.adversarial import metrics as M
from minidiff.adversarial import text as T
from minidiff.adversarial.textmodel import TextModel
from minidiff.data import ExampleSet


# ---------------------------------------------------------------------- fixtures
pytestmark = pytest.mark.usefixtures("one_thread")


def _mlp(seed, d=16, k=3, hidden=12):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(d, hidden), nn.Tanh(), nn.Linear(hidden, k))


@pytest.fixture(scope="module")
def tabular():
    g = torch.Generator().manual_seed(3)
    x = torch.rand((96, 16), generator=g)
    base, var = _mlp(0), _mlp(0)
    with torch.no_grad():
        for p in var.parameters():  # a "compressed" copy: weights rounded to a coarse grid
            p.copy_(torch.round(p * 8) / 8)
        y = base(x).argmax(-1)  # base is right everywhere; the variant on most
    data = ExampleSet(name="t", kind="tabular", inputs=x, labels=y, class_names=["a", "b", "c"])
    return {"base": base, "var": var}, data


class NoGrad(nn.Module):
    """Stands in for an int8 kernel without backward: its output has no grad_fn."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        with torch.no_grad():
            return self.inner(x)


class Staircase(nn.Module):
    """Rounds its input first: the input gradient exists but is identically zero."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x * 4) / 4)


@pytest.fixture(scope="module")
def tiny_text():
    from transformers import AutoTokenizer, BertConfig, BertModel

    from minidiff.models import TextClassifier, embedded_minilm_dir

    tok = AutoTokenizer.from_pretrained(str(embedded_minilm_dir()))
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    models = {}
    for i, name in enumerate(["base", "var"]):
        torch.manual_seed(10 + i)
        models[name] = TextClassifier(BertModel(cfg), tok, 3, "mean").eval()
    texts = ["The weather today is lovely and bright",
             "I really enjoy reading long history books",
             "Computers crash when memory runs out",
             "Football players train hard every morning",
             "Good food makes people very happy",
             "Tell me a funny joke about robots please",
             "Stocks fell sharply after the announcement",
             "My favourite movie has amazing music"]
    with torch.no_grad():
        enc = models["base"].tokenize(texts, 64)
        for m in models.values():
            # a random encoder's pooled outputs are nearly constant: centre and scale the head
            # so that the classes split the texts and single words can move the decision
            h = m.pool(m.encoder(**enc).last_hidden_state, enc["attention_mask"])
            m.head.weight.mul_(1.0 / (h - h.mean(0)).std())
            m.head.bias.copy_(-(m.head.weight @ h.mean(0)))
        y = models["base"](**enc).argmax(-1)  # base right on every text: all are attacked
    data = ExampleSet(name="s", kind="text", inputs=texts, labels=y, class_names=["x<y", "b", "c"])
    return models, data, tok


# ---------------------------------------------------------------------- config
@pytest.mark.parametrize("kwargs, field", [
    ({"epsilon": -0.1}, "epsilon"),
    ({"epsilon": [0.1, float("nan")]}, "epsilon"),
    ({"epsilon_l2": [-1.0]}, "epsilon_l2"),
    ({"word_budget": 0.0}, "word_budget"),
    ({"word_budget": 1.5}, "word_budget"),
    ({"query_budget": 0}, "query_budget"),
    ({"steps": 0}, "steps"),
    ({"bootstrap": -1}, "bootstrap"),
    ({"attacks": ["fgsm", "fgsm"]}, "attacks"),
    ({"attacks": ["cw"]}, "attacks"),
    ({"epsiloon": 0.1}, "epsiloon"),
])
def test_config_rejects_out_of_range(kwargs, field):
    with pytest.raises(ValidationError, match=field):
        AdversarialConfig(**kwargs)


def test_config_cross_field_checks():
    with pytest.raises(ValidationError, match="larger than the input range"):
        AdversarialConfig(epsilon=[0.5, 2.0], clip_min=0, clip_max=1)
    with pytest.raises(ValidationError, match="together"):
        AdversarialConfig(clip_min=0)
    with pytest.raises(ValidationError, match="mlm_model"):
        AdversarialConfig(candidate_source="mlm")
    cfg = AdversarialConfig(epsilon=0.05)  # a scalar from TOML becomes a list
    assert cfg.epsilon == [0.05]
    assert cfg.resolved_attacks("image") == ["fgsm", "pgd-linf", "pgd-l2"]
    assert cfg.resolved_attacks("text") == ["embedding-pgd", "word-substitution"]
    with pytest.raises(ValueError, match="do not apply to text"):
        AdversarialConfig(attacks=["pgd-linf"]).resolved_attacks("text")
    assert AdversarialConfig.model_validate(json.loads(json.dumps(cfg.model_dump()))) == cfg


# ---------------------------------------------------------------------- continuous attacks
@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("random_init", [False, True])
def test_pgd_increases_loss_every_step_on_logistic_regression(norm, random_init):
    torch.manual_seed(0)
    model = nn.Linear(10, 2).double()  # softmax over 2 logits == logistic regression (convex)
    x = torch.randn(64, 10, dtype=torch.float64)
    y = torch.randint(0, 2, (64,))
    eps = 0.3 if norm == "linf" else 1.0
    res = C.pgd(model, x, y, epsilon=eps, norm=norm, steps=12, alpha=eps / 6, random_init=random_init,
                generator=torch.Generator().manual_seed(1), return_trace=True)
    trace = torch.stack(res.trace)  # (steps + 1, n)
    assert trace.shape == (13, 64)
    assert bool((trace[1:] >= trace[:-1] - 1e-12).all()), "loss decreased at some step"
    assert bool((trace[-1] > trace[0]).all())
    size = C.perturbation_norm(res.x_adv, x, norm)
    assert float(size.max()) <= eps * (1 + 1e-12)
    # a linear model in L-inf: the optimum sits on the corner, reached after enough steps
    if norm == "linf" and not random_init:
        w = (model.weight[1] - model.weight[0]).detach()
        corner = x + eps * torch.sign(w) * (1 - 2 * y.double()).unsqueeze(1)
        torch.testing.assert_close(res.x_adv, corner)


def test_fgsm_matches_hand_formula():
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    x = torch.rand(7, 5, dtype=torch.float64)  # inside the clip range, as run_adversarial checks
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0])
    xr = x.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(model(xr), y, reduction="sum").backward()
    expected = (x + 0.1 * xr.grad.sign()).clamp(0, 1)
    torch.testing.assert_close(C.fgsm(model, x, y, epsilon=0.1, clip=(0.0, 1.0)), expected)


def test_success_is_zero_at_epsilon_zero(tabular):
    models, data = tabular
    res = run_adversarial(models, data, AdversarialConfig(epsilon=[0.0], epsilon_l2=[0.0], bootstrap=0),
                          base="base")
    for key, run in res["attacks"].items():
        for name, pm in run["per_model"].items():
            assert pm["n_success"] == 0 and pm["success_rate"] == 0.0, (key, name)
            assert pm["adversarial_accuracy"] == pm["clean_accuracy"]
            assert not any(pm["success"])


def test_transfer_diagonal_and_counts(tabular):
    models, data = tabular
    cfg = AdversarialConfig(attacks=["pgd-linf", "pgd-l2"], epsilon=[0.2], epsilon_l2=[0.8],
                            bootstrap=50, batch_size=40)
    res = run_adversarial(models, data, cfg, base="base")
    json.dumps(res)  # JSON-able
    assert res["models"] == ["base", "var"]
    for run in res["attacks"].values():
        names = run["transfer"]["models"]
        for i, name in enumerate(names):
            pm = run["per_model"][name]
            assert run["transfer"]["matrix"][i][i] == pytest.approx(pm["success_rate"], abs=0)
            correct, success = np.array(pm["correct"]), np.array(pm["success"])
            assert pm["n_correct"] == correct.sum() and pm["n_success"] == success.sum()
            assert pm["adversarial_accuracy"] == pytest.approx((correct & ~success).mean())
            assert pm["mean_queries"] == 2 + cfg.steps  # clean + steps + final check
        assert run["per_model"]["base"]["clean_accuracy"] == 1.0
        assert run["per_model"]["base"]["success_rate"] > 0.2  # the attack does something
        ch = run["change"]["var"]["success_rate"]
        assert ch["delta"] == pytest.approx(run["per_model"]["var"]["success_rate"]
                                            - run["per_model"]["base"]["success_rate"])
        assert ch["ci_low"] <= ch["delta"] <= ch["ci_high"]


def test_deterministic_under_fixed_seed(tabular):
    models, data = tabular
    cfg = AdversarialConfig(attacks=["pgd-l2"], epsilon_l2=[0.6], steps=5, seed=7, bootstrap=30)
    a = run_adversarial(models, data, cfg, base="base")
    torch.manual_seed(123)  # the global RNG must not matter
    b = run_adversarial(models, data, cfg, base="base")
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def test_model_without_gradient_uses_labelled_surrogate(tabular):
    models, data = tabular
    models = {"base": models["base"], "int8": NoGrad(models["var"]), "round": Staircase(models["var"])}
    assert C.probe_gradient(models["int8"], data.inputs[:8], data.labels[:8]) is not None
    assert "zero" in C.probe_gradient(models["round"], data.inputs[:8], data.labels[:8])
    cfg = AdversarialConfig(attacks=["pgd-linf"], epsilon=[0.2], steps=4, bootstrap=0)
    res = run_adversarial(models, data, cfg, base="base")
    pm = res["attacks"]["pgd-linf eps=0.2"]["per_model"]
    assert pm["base"]["gradient"] == "own"
    assert pm["int8"]["gradient"] == "surrogate:base" and "no input gradient" in pm["int8"]["gradient_note"]
    assert pm["round"]["gradient"] == "surrogate:base"
    assert pm["int8"]["n_success"] > 0  # a real attack happened, not a zero-gradient no-op
    html = render_section(res)
    assert "surrogate:base" in html and "Gradient substitutes" in html

    cfg = AdversarialConfig(attacks=["pgd-linf"], epsilon=[0.2], steps=3, bootstrap=0,
                            no_gradient="gradient-free", spsa_samples=8)
    res = run_adversarial(models, data, cfg, base="base")
    pm = res["attacks"]["pgd-linf eps=0.2"]["per_model"]
    assert pm["int8"]["gradient"] == "gradient-free (SPSA)"
    assert pm["int8"]["mean_queries"] == 2 + 3 * 2 * 8
    assert pm["int8"]["n_success"] > 0


class ResidualCut(nn.Module):
    """A residual block whose branch has no backward (like an int8 Linear inside a
    transformer layer): the input gradient is non-zero but misses the branch."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.branch = NoGrad(nn.Linear(16, 16))

    def forward(self, x):
        return self.inner(x + self.branch(x))


def test_incomplete_gradient_behind_a_residual_is_not_used_silently(tabular):
    models, data = tabular
    cut = ResidualCut(models["var"])
    x, y = data.inputs[:8], data.labels[:8]
    g = C.autograd_gradient(cut)(x, y)
    assert bool(g.ne(0).any())  # the gradient itself looks fine ...
    reason = C.probe_gradient(cut, x, y)  # ... but a module cut the graph
    assert reason is not None and "branch.inner" not in reason and "branch (NoGrad)" in reason
    assert C.probe_gradient(models["var"], x, y) is None
    cfg = AdversarialConfig(attacks=["pgd-linf"], epsilon=[0.2], steps=3, bootstrap=0)
    pm = run_adversarial({"base": models["base"], "cut": cut}, data, cfg, base="base")["attacks"]["pgd-linf eps=0.2"]["per_model"]
    assert pm["cut"]["gradient"] == "surrogate:base" and "incomplete" in pm["cut"]["gradient_note"]


def test_bad_input_is_a_clear_error(tabular):
    models, data = tabular
    cfg = AdversarialConfig(bootstrap=0)
    with pytest.raises(ValueError, match="base 'nope'"):
        run_adversarial(models, data, cfg, base="nope")
    with pytest.raises(ValueError, match="not a torch.nn.Module"):
        run_adversarial({"base": models["base"], "x": object()}, data, cfg, base="base")
    unlabelled = ExampleSet(name="u", kind="tabular", inputs=data.inputs, labels=None, class_names=[])
    with pytest.raises(ValueError, match="labelled"):
        run_adversarial(models, unlabelled, cfg, base="base")
    with pytest.raises(ValueError, match="do not apply to tabular"):
        run_adversarial(models, data, AdversarialConfig(attacks=["word-substitution"]), base="base")
    with pytest.raises(ValueError, match="outside clip_min"):
        run_adversarial(models, data, AdversarialConfig(clip_min=0.5, clip_max=1.0, epsilon=[0.1]),
                        base="base")
    with pytest.raises(ValidationError, match="epsilon"):
        run_adversarial(models, data, {"epsilon": [-1.0]}, base="base")


# ---------------------------------------------------------------------- metrics
def test_metrics_hand_computed():
    correct = np.array([[1, 1, 1, 0], [1, 0, 1, 1]], bool)
    fooled = np.zeros((2, 2, 4), bool)
    fooled[0, 0] = [1, 0, 1, 1]  # model 0 attacked: successes on 0 and 2
    fooled[1, 1] = [0, 1, 0, 1]  # model 1: success on 3 (1 was already wrong)
    fooled[0, 1] = [1, 1, 0, 0]  # crafted on 0, evaluated on 1
    fooled[1, 0] = [0, 0, 1, 1]
    t = M.transfer_matrix(correct, fooled)
    # both right on {0, 2}: T01 = |{0}|/2, T10 = |{2}|/2
    assert t == [[2 / 3, 0.5], [0.5, 1 / 3]]
    success = correct & np.stack([fooled[0, 0], fooled[1, 1]])
    assert M.jaccard_matrix(success) == [[1.0, 0.0], [0.0, 1.0]]
    assert M.jaccard_matrix(np.zeros((2, 3), bool)) == [[1.0, 1.0], [1.0, 1.0]]
    s = M.model_summary(correct[0], success[0])
    assert (s["clean_accuracy"], s["adversarial_accuracy"], s["success_rate"]) == (0.75, 0.25, 2 / 3)
    with pytest.raises(ValueError):
        M.model_summary(np.array([False]), np.array([True]))


# ---------------------------------------------------------------------- text attacks
def test_split_text_roundtrip_and_case():
    s = T.SplitText.of("Hello,  World! it's fine.")
    assert s.render({}) == "Hello,  World! it's fine."
    assert [c for _, c, _ in s.cores] == ["Hello", "World", "it's", "fine"]
    assert s.render({0: "hi", 1: "earth"}) == "Hi,  Earth! it's fine."
    assert s.render({}, drop=1) == "Hello, it's fine."


def test_word_substitution_respects_budgets_and_uses_vocabulary(tiny_text):
    models, data, tok = tiny_text
    budget, queries = 0.34, 40
    cfg = AdversarialConfig(attacks=["word-substitution"], word_budget=budget, query_budget=queries,
                            num_candidates=6, bootstrap=20, batch_size=16, skip_stopwords=True)
    res = run_adversarial(models, data, cfg, base="base")
    run = res["attacks"]["word-substitution"]
    vocab = set(T.whole_word_vocab(tok)[0])
    stop = T.stopword_set(True)
    tm = TextModel(models["base"], tok, 64)
    splits = [T.SplitText.of(t) for t in data.inputs]
    cands = T.embedding_neighbour_candidates(splits, tm, 6, stop)
    for name in ["base", "var"]:
        pm = run["per_model"][name]
        assert pm["mean_queries"] <= queries
        if pm["mean_perturbation"] is not None:
            assert pm["mean_perturbation"] <= budget
        assert run["transfer"]["matrix"][res["models"].index(name)][res["models"].index(name)] == \
            pm["success_rate"]
    # re-run the attack directly to inspect each example
    res_b = T.word_substitution(tm, data.inputs, data.labels.tolist(), cands, word_budget=budget,
                                query_budget=queries, batch_size=16)
    assert res_b.success == run["per_model"]["base"]["success"]
    assert any(res_b.success), "a random tiny BERT should be flippable within budget"
    for e, sp in enumerate(splits):
        assert res_b.queries[e] <= queries
        assert len(res_b.changes[e]) <= int(budget * sp.n_words)
        for w, new in res_b.changes[e].items():
            assert new in vocab and new in cands[e][w] and sp.cores[w][1].lower() not in stop
            assert len(tok.tokenize(new)) == 1  # a real whole-word token
        # nothing but the changed words differs
        adv = T.SplitText.of(res_b.adv_texts[e])
        diff = [w for w in range(sp.n_words) if adv.cores[w][1] != sp.cores[w][1]]
        assert sorted(diff) == sorted(res_b.changes[e])
        if res_b.success[e]:
            pred = models["base"](**models["base"].tokenize([res_b.adv_texts[e]], 64)).argmax(-1)
            assert int(pred) != int(data.labels[e])
    # same candidates for every model: the variant's substitutions come from the same lists
    exs = run["examples"]["base"]
    assert exs and all(any(flag for _, flag in ex["segments"]) for ex in exs)
    html = render_section(res)
    assert "<mark>" in html and "x<y" not in html  # class names are escaped too
    assert "data:image/png;base64," in html


def test_word_substitution_deterministic_and_zero_budget(tiny_text):
    models, data, tok = tiny_text
    cfg = AdversarialConfig(attacks=["word-substitution"], word_budget=0.3, query_budget=30,
                            num_candidates=4, bootstrap=10, seed=3)
    a = run_adversarial(models, data, cfg, base="base")
    b = run_adversarial(models, data, cfg, base="base")
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    # a variant rebuilt from disk has no tokenizer of its own: the base's is shared
    from minidiff.models import TextClassifier

    bare = TextClassifier(models["var"].encoder, None, 3, "mean").eval()
    bare.head = models["var"].head
    c = run_adversarial({"base": models["base"], "var": bare}, data, cfg, base="base")
    assert json.dumps(c, sort_keys=True) == json.dumps(a, sort_keys=True)
    # a budget that allows no change (floor(0.1 * 7) == 0) attacks nothing and fails honestly
    cfg0 = cfg.model_copy(update={"word_budget": 0.1})
    r0 = run_adversarial(models, data, cfg0, base="base")["attacks"]["word-substitution"]
    pm = r0["per_model"]["base"]
    assert pm["n_correct"] == len(data) and pm["n_success"] == 0 and len(pm["success"]) == len(data)


def test_stopwords_are_scikit_learns_list():
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    assert T.stopword_set(True) == frozenset(ENGLISH_STOP_WORDS) and len(T.stopword_set(True)) > 300
    assert T.stopword_set(False) == frozenset()


def test_length_bucketed_queries(tiny_text):
    models, data, tok = tiny_text
    texts = list(data.inputs) + ["Hi", "Robots", "A much longer sentence about the weather in the old town square today"]
    tm = TextModel(models["base"], tok, 64)
    full = tm.logits(texts, 64)
    assert tm.n_forward == 1 and tm.n_queries == len(texts)
    tm.max_padding = 0.25
    bucketed = tm.logits(texts, 64)
    assert torch.allclose(bucketed, full, atol=1e-5, rtol=1e-5)  # same logits up to rounding
    lengths = sorted(tm._token_lengths(texts))
    chunks = tm._batches(lengths, 64)
    assert tm.n_forward == 1 + len(chunks) > 2 and [j for c in chunks for j in c] == list(range(len(texts)))
    for c in chunks:
        tokens, padded = sum(lengths[j] for j in c), len(c) * lengths[c[-1]]
        assert len(c) == 1 or 1 - tokens / padded <= 0.25
    assert all(len(c) <= 3 for c in tm._batches(lengths, 3))


def test_word_substitution_query_count_and_transfer_reuse(tiny_text):
    models, data, tok = tiny_text
    cfg = AdversarialConfig(attacks=["word-substitution"], word_budget=0.3, query_budget=30,
                            num_candidates=4, bootstrap=10, batch_size=5)
    run = run_adversarial(models, data, cfg, base="base")["attacks"]["word-substitution"]
    splits = [T.SplitText.of(t) for t in data.inputs]
    tms = {k: TextModel(models[k], tok, cfg.max_length) for k in models}
    cands = T.embedding_neighbour_candidates(splits, tms["base"], 4, T.stopword_set(True))
    res = {}
    for k, tm in tms.items():
        res[k] = T.word_substitution(tm, data.inputs, data.labels.tolist(), cands, word_budget=0.3,
                                     query_budget=30, batch_size=5, splits=splits)
        # every query is one example sent to the model, counted per example and in total
        assert tm.n_queries == sum(res[k].queries) and tm.n_forward >= 1 and tm.n_gradient == 0
        assert res[k].success == run["per_model"][k]["success"]
    # the transfer matrix from re-querying only the changed texts equals querying every text
    names = ["base", "var"]
    correct = np.stack([np.array(res[k].correct) for k in names])
    fooled = np.zeros((2, 2, len(splits)), bool)
    for a, i in enumerate(names):
        for b, j in enumerate(names):
            pred = tms[j].logits(res[i].adv_texts, 5).argmax(-1)
            fooled[a, b] = (pred != data.labels).numpy()
    assert M.transfer_matrix(correct, fooled) == run["transfer"]["matrix"]


def test_gradient_word_importance_matches_autograd(tiny_text):
    models, data, tok = tiny_text
    model = models["base"]
    tm = TextModel(model, tok, 64)
    splits = [T.SplitText.of(t) for t in data.inputs[:3]]
    y = data.labels[:3]
    scores = T.gradient_word_importance(tm, splits, y.tolist(), batch_size=2)
    assert tm.n_gradient == 3 and tm.n_queries == 3
    from minidiff.compress.variant import clone_model

    ref_model = clone_model(model).double()  # float64 reference, one text at a time (no padding)
    for e, sp in enumerate(splits):  # no punctuation: whitespace words are the tokenizer's words
        enc = tok(data.inputs[e], return_tensors="pt")
        emb = ref_model.input_embeddings()(enc["input_ids"]).detach().requires_grad_(True)
        logits = ref_model(inputs_embeds=emb, attention_mask=enc["attention_mask"])
        loss = torch.nn.functional.cross_entropy(logits, y[e:e + 1])
        (g,) = torch.autograd.grad(loss, emb)
        word_ids = enc.word_ids(0)
        ref = [float(sum((g[0, t] ** 2).sum() for t, w in enumerate(word_ids) if w == k) ** 0.5)
               for k in range(sp.n_words)]
        assert scores[e] == pytest.approx(ref, rel=1e-4, abs=1e-9)


def test_word_substitution_gradient_ranking(tiny_text):
    models, data, tok = tiny_text
    cfg = AdversarialConfig(attacks=["word-substitution"], word_budget=0.3, query_budget=30,
                            num_candidates=4, bootstrap=10)

    class NoGrad(nn.Module):  # the same classifier without an input gradient
        def __init__(self, inner):
            super().__init__()
            self.inner, self.tokenizer = inner, inner.tokenizer

        def tokenize(self, texts, max_length=128):
            return self.inner.tokenize(texts, max_length)

        def input_embeddings(self):
            return self.inner.input_embeddings()

        def forward(self, **kw):
            with torch.no_grad():
                return self.inner(**kw)

    ms = {"base": models["base"], "var": models["var"], "nograd": NoGrad(models["var"])}
    a = run_adversarial(ms, data, cfg, base="base", word_ranking="gradient")["attacks"]["word-substitution"]
    b = run_adversarial(ms, data, cfg, base="base", word_ranking="gradient")["attacks"]["word-substitution"]
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    pm = a["per_model"]
    assert pm["base"]["gradient"] == "own" and pm["var"]["gradient"] == "own"
    assert pm["nograd"]["gradient"] == "surrogate:base" and "no input-embedding gradient" in pm["nograd"]["gradient_note"]
    # the ranking by the model's own gradient, run directly, gives the same attack
    splits = [T.SplitText.of(t) for t in data.inputs]
    tm = TextModel(models["base"], tok, cfg.max_length)
    cands = T.embedding_neighbour_candidates(splits, tm, 4, T.stopword_set(True))
    scores = T.gradient_word_importance(tm, splits, data.labels.tolist(), cfg.batch_size)
    res = T.word_substitution(tm, data.inputs, data.labels.tolist(), cands, word_budget=0.3, query_budget=30,
                              batch_size=cfg.batch_size, splits=splits, word_scores=scores, score_queries=1)
    assert res.success == pm["base"]["success"]
    targets = T.attack_targets(res.correct, cands, splits, 0.3)
    # queries: clean + one gradient pass per attacked text + candidates (the drop-one queries are gone)
    assert tm.n_queries == sum(res.queries) + len(splits) - len(targets)
    assert max(res.queries) <= 30 and pm["base"]["mean_queries"] <= 30
    with pytest.raises(ValueError, match="word_ranking"):
        run_adversarial(ms, data, cfg, base="base", word_ranking="alphabetical")


def test_embedding_pgd_runs_and_is_marked_unrealizable(tiny_text):
    models, data, tok = tiny_text
    cfg = AdversarialConfig(attacks=["embedding-pgd"], embedding_epsilon=[0.0, 0.5], steps=3,
                            bootstrap=0)
    res = run_adversarial(models, data, cfg, base="base", tokenizer=tok)
    zero, big = res["attacks"]["embedding-pgd eps=0"], res["attacks"]["embedding-pgd eps=0.5"]
    assert not zero["realizable"] and zero["per_model"]["base"]["n_success"] == 0
    assert big["per_model"]["base"]["n_success"] > 0
    for i, name in enumerate(res["models"]):
        assert big["transfer"]["matrix"][i][i] == big["per_model"][name]["success_rate"]
        if big["per_model"][name]["mean_perturbation"] is not None:
            assert big["per_model"][name]["mean_perturbation"] <= 0.5 + 1e-5
    assert "not a realizable text" in render_section(res)

    class NoGradText(nn.Module):  # a text model whose forward has no backward
        def __init__(self, inner):
            super().__init__()
            self.inner, self.tokenizer = inner, inner.tokenizer

        def tokenize(self, texts, max_length=128):
            return self.inner.tokenize(texts, max_length)

        def input_embeddings(self):
            return self.inner.input_embeddings()

        def forward(self, **kw):
            with torch.no_grad():
                return self.inner(**kw)

    cfg = AdversarialConfig(attacks=["embedding-pgd"], embedding_epsilon=[0.5], steps=3, bootstrap=0)
    res = run_adversarial({"base": models["base"], "q": NoGradText(models["var"])}, data, cfg, base="base")
    pm = res["attacks"]["embedding-pgd eps=0.5"]["per_model"]
    assert pm["base"]["gradient"] == "own" and pm["q"]["gradient"] == "surrogate:base"


def test_mlm_candidates_are_whole_words(tiny_text, tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    _, data, tok = tiny_text
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    BertForMaskedLM(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    splits = [T.SplitText.of(t) for t in data.inputs[:3]]
    cands = T.mlm_candidates(splits, str(tmp_path), 5, T.stopword_set(True), batch_size=8)
    vocab = set(T.whole_word_vocab(tok)[0])
    for sp, row in zip(splits, cands):
        for (_, core, _), cs in zip(sp.cores, row):
            if T.attackable(core, T.stopword_set(True)):
                assert len(cs) == 5 and set(cs) <= vocab and core.lower() not in cs
            else:
                assert cs == []
    with pytest.raises(ValueError, match="offline"):
        T.mlm_candidates(splits, str(tmp_path / "missing"), 5, frozenset(), batch_size=8)


def test_report_escapes_text():
    res = {"base": "b<1>", "models": ["b<1>", "v&"], "ids": [0], "class_names": ["<i>a</i>", "b"],
           "config": {"seed": 0, "steps": 1, "confidence": 0.95},
           "attacks": {"word-substitution": {
               "attack": "word-substitution", "epsilon": 0.2, "norm": "fraction of words",
               "realizable": True,
               "per_model": {"b<1>": {"clean_accuracy": 1.0, "adversarial_accuracy": 0.0,
                                      "success_rate": 1.0, "n_success": 1, "n_correct": 1,
                                      "mean_perturbation": 0.5, "mean_queries": 3.0,
                                      "gradient": "none needed", "gradient_note": ""}},
               "transfer": {"models": ["b<1>", "v&"], "matrix": [[1.0, None], [0.5, 0.25]]},
               "jaccard": {"models": ["b<1>", "v&"], "matrix": [[1.0, 0.5], [0.5, 1.0]]}, "change": {},
               "examples": {"b<1>": [{"label": 0, "adv_pred": 1, "original": "<script>x</script> ok",
                                      "segments": [["<script>", True], [" ok", False]],
                                      "fraction_changed": 0.5, "queries": 3}]}}}}
    html = render_section(res)
    assert "<script>" not in html and "<i>a</i>" not in html and "b<1>" not in html and "v&<" not in html
    assert "<mark>&lt;script&gt;</mark>" in html
    assert re.search(r'src="data:image/png;base64,[A-Za-z0-9+/=]+"', html)


def test_embedding_attack_states_models_without_input_embeddings_as_not_measured(tiny_text):
    """A model that takes token ids only (an ONNX Runtime session) cannot join an
    embedding-space attack: that run says so for it, word substitution still attacks it."""
    models, data, tok = tiny_text

    class IdsOnly(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.tokenizer = inner, inner.tokenizer

        def tokenize(self, texts, max_length=128):
            return self.inner.tokenize(texts, max_length)

        def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None):
            if inputs_embeds is not None:
                raise TypeError("this model takes token ids only")
            return self.inner(input_ids=input_ids, attention_mask=attention_mask)

    three = {**models, "ids-only": IdsOnly(models["var"]).eval()}
    cfg = AdversarialConfig(attacks=["embedding-pgd", "word-substitution"], embedding_epsilon=[0.5], steps=2,
                            num_candidates=4, bootstrap=0)
    res = run_adversarial(three, data, cfg, base="base", tokenizer=tok)
    emb = res["attacks"]["embedding-pgd eps=0.5"]
    assert "ids-only" not in emb["per_model"] and "takes token ids only" in emb["not_measured"]["ids-only"]
    assert emb["transfer"]["models"] == ["base", "var"]
    assert "ids-only" in res["attacks"]["word-substitution"]["per_model"]
    assert "Not attacked here" in render_section(res)
