"""Run the configured attacks on every model and collect JSON-able results.

Results schema (``schema = "minidiff.adversarial/1"``)::

    {
      "schema", "base", "kind", "models": [names], "ids": [...], "labels": [...],
      "class_names": [...], "config": {...},
      "attacks": {
        "<attack> eps=<epsilon>": {
          "attack", "epsilon", "norm", "realizable" (False for embedding-pgd),
          "per_model": {name: {n_examples, n_correct, n_success, clean_accuracy,
                               adversarial_accuracy, success_rate, mean_perturbation,
                               mean_queries, gradient ("own" | "surrogate:<base>" |
                               "gradient-free (SPSA)" | "none needed"), gradient_note,
                               correct: [bool], success: [bool]}},
          "transfer": {"models": [...], "matrix": [[T_ij]]},   # row i crafted, column j evaluated
          "jaccard": {"models": [...], "matrix": [[...]]},
          "change": {variant: {metric: {"delta", "ci_low", "ci_high"}}},
          "examples": {name: [adversarial texts, changed words marked]}   # word-substitution
        }
      }
    }

Every model is attacked with the same budget and the same random starts (a generator per
(attack, epsilon) seeded from ``config.seed``); text candidates are computed once.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from torch import nn

from . import continuous as C
from . import embedding as E
from . import text as T
from .config import AdversarialConfig
from .metrics import change_with_ci, jaccard_matrix, model_summary, transfer_matrix
from .textmodel import TextModel, eval_mode, restore_mode

SCHEMA = "minidiff.adversarial/1"
WORD_RANKINGS = ("drop-one", "gradient")


def run_adversarial(models: Mapping[str, nn.Module], data: Any, config: AdversarialConfig | Mapping,
                    *, base: str, tokenizer: Any = None, device: Any = None,
                    word_ranking: str | None = None, progress: bool = False) -> dict:
    """Attack every model with the same budget; measure vulnerability, transfer and change.

    Parameters
    ----------
    models : dict of str -> nn.Module
        The base model and its variants. Text models follow ``minidiff.models.TextClassifier``
        (``forward(input_ids=, attention_mask=, inputs_embeds=)``, ``tokenize``,
        ``input_embeddings``); image/tabular models map float tensors to logits.
    data : minidiff.data.ExampleSet
        ``kind`` ("text" | "image" | "tabular"), ``inputs`` (list of str or float tensor),
        ``labels``, ``ids``, ``class_names``. The first ``config.max_examples`` are attacked.
    config : AdversarialConfig or mapping
        The ``[adversarial]`` table.
    base : str
        Name of the base model in ``models`` (source of surrogate gradients and of text
        candidates; the reference of every change).
    tokenizer : optional
        Hugging Face tokenizer, for text models without ``tokenize``/``tokenizer``.
    device : optional
        Move the models there first (otherwise they stay where they are; inputs follow each
        model's device).
    progress : bool
        Show a progress bar over the attack runs (one per attack and budget).
    word_ranking : {"drop-one", "gradient"}, optional
        How the word-substitution attack orders the words (default: the config's
        ``word_ranking`` if it has one, else ``"drop-one"``). ``"gradient"`` ranks by the
        input-embedding gradient norm of each model (one forward+backward pass per text
        instead of one query per word); a model without that gradient is ranked by the
        base's gradient when ``no_gradient = "surrogate"``, else by drop-one queries.

    Returns
    -------
    dict
        JSON-able results, see the module docstring.
    """
    if not isinstance(config, AdversarialConfig):
        config = AdversarialConfig.model_validate(dict(config))
    if not isinstance(models, Mapping) or not models:
        raise ValueError("models must be a non-empty dict of name -> torch.nn.Module")
    for name, m in models.items():
        if not isinstance(m, nn.Module):
            raise ValueError(f"models[{name!r}] is a {type(m).__name__}, not a torch.nn.Module")
    if base not in models:
        raise ValueError(f"base {base!r} is not one of the models {list(models)}")
    kind = getattr(data, "kind", None)
    attacks = config.resolved_attacks(kind)
    inputs, labels, ids = _slice_data(data, config.max_examples)
    if device is not None:
        for m in models.values():
            m.to(device)
    word_ranking = word_ranking or getattr(config, "word_ranking", None) or "drop-one"
    if word_ranking not in WORD_RANKINGS:
        raise ValueError(f"word_ranking must be one of {WORD_RANKINGS}, got {word_ranking!r}")
    names = [base] + [k for k in models if k != base]
    flags = eval_mode(models)
    bar = tqdm(total=_n_runs(config, attacks), desc=f"attacks on {len(names)} models", unit="run",
               disable=not progress, leave=False)
    try:
        if kind == "text":
            runs = _run_text(models, names, inputs, labels, config, attacks, tokenizer, word_ranking, bar=bar)
        else:
            runs = _run_continuous(models, names, inputs, labels, config, attacks, bar=bar)
    finally:
        bar.close()
        restore_mode(models, flags)
    for run in runs.values():
        _finish(run, names, config)
    return {
        "schema": SCHEMA, "base": base, "kind": kind, "models": names,
        "ids": ids, "labels": labels.tolist(),
        "class_names": [str(c) for c in (getattr(data, "class_names", None) or [])],
        "config": config.model_dump(mode="json"),
        "attacks": runs,
    }


# ---------------------------------------------------------------------- data
def _slice_data(data, max_examples):
    inputs = getattr(data, "inputs", None)
    labels = getattr(data, "labels", None)
    if inputs is None:
        raise ValueError("data must have .inputs (a minidiff.data.ExampleSet)")
    if labels is None:
        raise ValueError("adversarial attacks need labelled data (data.labels is None); "
                         "use a labelled ExampleSet")
    labels = torch.as_tensor(labels).long().flatten()
    n = len(labels)
    if len(inputs) != n:
        raise ValueError(f"data has {len(inputs)} inputs but {n} labels")
    if n == 0:
        raise ValueError("data is empty: nothing to attack")
    if bool((labels < 0).any()):
        raise ValueError("labels must be class indices >= 0")
    k = min(n, max_examples or n)
    ids = getattr(data, "ids", None)
    ids = list(ids)[:k] if ids is not None else list(range(k))
    ids = [i if isinstance(i, (int, str)) else str(i) for i in ids]
    if isinstance(inputs, torch.Tensor):
        if not inputs.is_floating_point():
            raise ValueError(f"continuous inputs must be a float tensor, got {inputs.dtype}")
        inputs = inputs[:k]
    else:
        inputs = list(inputs)[:k]
    return inputs, labels[:k], ids


def _seed(config: AdversarialConfig, *parts: int) -> int:
    return int(np.random.SeedSequence([config.seed, *parts]).generate_state(1)[0])


def _new_run(attack, epsilon, norm, realizable, n, names):
    return {"attack": attack, "epsilon": epsilon, "norm": norm, "realizable": realizable, "_names": list(names),
            "_correct": {k: np.zeros(n, bool) for k in names},
            "_fooled": {(i, j): np.zeros(n, bool) for i in names for j in names},
            "_size": {k: np.full(n, np.nan) for k in names},
            "_queries": {k: np.zeros(n) for k in names},
            "_gradient": {}, "_note": {}}


# ---------------------------------------------------------------------- continuous
def _gradient_plan(models, names, base, x, y, config, probe) -> tuple[dict, dict]:
    """How each model's gradient is obtained: its own, the base's (surrogate), or SPSA."""
    reasons = {k: probe(models[k], x, y) for k in names}
    plan, notes = {}, {}
    for k in names:
        if reasons[k] is None:
            plan[k], notes[k] = "own", ""
        elif config.no_gradient == "surrogate" and reasons[base] is None:
            plan[k] = f"surrogate:{base}"
            notes[k] = f"no input gradient ({reasons[k]}); crafted with the gradient of {base!r}"
        else:
            plan[k] = "gradient-free (SPSA)"
            notes[k] = f"no input gradient ({reasons[k]}); SPSA gradient estimate from queries"
    return plan, notes


def _n_runs(config: AdversarialConfig, attacks: list[str]) -> int:
    """Attack runs ahead (one per attack and budget), for the progress bar."""
    per = {"pgd-l2": len(config.epsilon_l2), "word-substitution": 1}
    return sum(per.get(a, len(config.embedding_epsilon) if a.startswith("embedding") else len(config.epsilon))
               for a in attacks)


class _Runs(dict):
    """The runs of an attack stage; each finished run advances the progress bar."""

    def __init__(self, bar: Any) -> None:
        super().__init__()
        self._bar = bar

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, value)
        if self._bar is not None:
            self._bar.update(1)


def _run_continuous(models, names, x_all, y_all, config, attacks, bar=None):
    if not isinstance(x_all, torch.Tensor):
        raise ValueError("image/tabular data needs .inputs as a float tensor (N, ...)")
    if not torch.isfinite(x_all).all():
        raise ValueError("inputs contain NaN or inf")
    clip = None
    if config.clip_min is not None:
        clip = (config.clip_min, config.clip_max)
        lo, hi = float(x_all.min()), float(x_all.max())
        if lo < clip[0] or hi > clip[1]:
            raise ValueError(
                f"inputs span [{lo:g}, {hi:g}], outside clip_min/clip_max = [{clip[0]:g}, {clip[1]:g}]; "
                "fix the clip range to the inputs' valid range")
    base = names[0]
    n = len(y_all)
    bs = config.batch_size
    probe_n = min(n, 32)
    plan, notes = _gradient_plan(models, names, base, x_all[:probe_n], y_all[:probe_n], config,
                                 C.probe_gradient)
    clean = {k: _predict(models[k], x_all, bs) for k in names}
    runs = _Runs(bar)
    for a, attack in enumerate(attacks):
        norm = "l2" if attack == "pgd-l2" else "linf"
        radii = config.epsilon_l2 if attack == "pgd-l2" else config.epsilon
        for r, eps in enumerate(radii):
            run = _new_run(attack, eps, norm, True, n, names)
            seed = _seed(config, a, r)
            gens = {k: torch.Generator().manual_seed(seed) for k in names}
            spsa_gens = {k: torch.Generator().manual_seed(seed + 1) for k in names}
            for s in range(0, n, bs):
                x, y = x_all[s:s + bs], y_all[s:s + bs]
                adv = {}
                for k in names:
                    dev = C.model_device(models[k])  # craft where the model lives
                    xk, yk = x.to(dev), y.to(dev)
                    adv[k], q = _craft(models, k, base, plan[k], attack, xk, yk, eps, config, clip,
                                       gens[k], spsa_gens[k])
                    run["_queries"][k][s:s + bs] = q
                    run["_size"][k][s:s + bs] = C.perturbation_norm(adv[k], xk, norm).cpu().numpy()
                for i in names:
                    for j in names:
                        pred = _predict(models[j], adv[i], bs)
                        run["_fooled"][(i, j)][s:s + bs] = (pred != y).numpy()
            for k in names:
                run["_correct"][k] = (clean[k] == y_all).numpy()
                run["_gradient"][k], run["_note"][k] = plan[k], notes[k]
            runs[f"{attack} eps={eps:g}"] = run
    return runs


def _craft(models, k, base, how, attack, x, y, eps, config, clip, gen, spsa_gen):
    model = models[k]
    grad_fn, counter = None, None
    if how.startswith("surrogate"):
        grad_fn = C.autograd_gradient(models[base])
    elif how.startswith("gradient-free"):
        grad_fn, counter = C.spsa_gradient(C.loss_of(model), samples=config.spsa_samples,
                                           delta=config.spsa_delta * max(eps, 1e-12),
                                           generator=spsa_gen, batch_size=config.batch_size)
    if attack == "fgsm":
        x_adv, steps = C.fgsm(model, x, y, epsilon=eps, clip=clip, grad_fn=grad_fn), 1
    else:
        alpha = config.alpha() * eps
        x_adv = C.pgd(model, x, y, epsilon=eps, norm="l2" if attack == "pgd-l2" else "linf",
                      steps=config.steps, alpha=alpha, random_init=config.random_start,
                      generator=gen, clip=clip, grad_fn=grad_fn).x_adv
        steps = config.steps
    # queries of the attacked model per example: clean + gradient evaluations + final check
    if eps == 0:
        q = 2
    elif counter is not None:
        q = 2 + counter[0] / len(y)
    elif how == "own":
        q = 2 + steps
    else:
        q = 2  # the surrogate's gradient costs the attacked model nothing
    return x_adv, q


@torch.no_grad()
def _predict(model, x, bs):
    dev = C.model_device(model)
    return torch.cat([model(x[s:s + bs].to(dev)).argmax(-1).cpu() for s in range(0, len(x), bs)])


# ---------------------------------------------------------------------- text
def _run_text(models, names, texts, y_all, config, attacks, tokenizer, word_ranking="drop-one", bar=None):
    if not all(isinstance(t, str) for t in texts):
        raise ValueError("text data needs .inputs as a list of str")
    base = names[0]
    shared_tok = tokenizer if tokenizer is not None else getattr(models[base], "tokenizer", None)
    tm = {k: TextModel(models[k], tokenizer if tokenizer is not None else
                       (getattr(models[k], "tokenizer", None) or shared_tok), config.max_length)
          for k in names}
    n = len(texts)
    bs = config.batch_size
    runs = _Runs(bar)
    for a, attack in enumerate(attacks):
        if attack == "word-substitution":
            runs["word-substitution"] = _run_words(tm, names, texts, y_all, config, word_ranking)
            continue
        skipped = {k: why for k in names if (why := _no_embeddings(tm[k])) is not None}
        if base in skipped:
            raise ValueError(f"{attack}: the base model {base!r} cannot be attacked in embedding space "
                             f"({skipped[base]}); use attacks = ['word-substitution']")
        full_names, names = names, [k for k in names if k not in skipped]
        probe_batch = E.prepare(tm[base], texts[: min(n, 8)])
        yp = y_all[: min(n, 8)]
        plan, notes = _gradient_plan(
            tm, names, base, probe_batch, yp, config,
            lambda m, b, yy: E.probe_embedding_gradient(m, b, yy.to(b.ids.device)))
        clean = {k: tm[k].logits(texts, bs).argmax(-1) for k in names}
        for r, eps in enumerate(config.embedding_epsilon):
            run = _new_run(attack, eps, "l2-per-token", False, n, names)
            radius = E.embedding_radius(tm[base], eps)
            seed = _seed(config, a, r)
            gens = {k: torch.Generator().manual_seed(seed) for k in names}
            spsa_gens = {k: torch.Generator().manual_seed(seed + 1) for k in names}
            for s in range(0, n, bs):
                batch = E.prepare(tm[base], texts[s:s + bs])
                y = y_all[s:s + bs].to(batch.ids.device)
                deltas = {}
                for k in names:
                    grad_fn, counter, how = None, None, plan[k]
                    if how.startswith("surrogate"):
                        grad_fn = E.autograd_embedding_gradient(tm[base], batch, y)
                    elif how.startswith("gradient-free"):
                        grad_fn, counter = C.spsa_gradient(
                            E.embed_loss(tm[k], batch, y, grad=False),
                            samples=config.spsa_samples, delta=config.spsa_delta * max(radius, 1e-12),
                            generator=spsa_gens[k], batch_size=bs)
                    deltas[k] = E.embedding_pgd(tm[k], batch, y, radius=radius, steps=config.steps,
                                                alpha=config.alpha(), random_init=config.random_start,
                                                generator=gens[k], grad_fn=grad_fn)
                    rel = deltas[k].norm(dim=-1).amax(dim=-1) / max(radius / eps, 1e-30) if eps else \
                        torch.zeros(len(y))
                    run["_size"][k][s:s + bs] = rel.double().cpu().numpy()
                    q = 2 if eps == 0 else (2 + counter[0] / len(y) if counter is not None
                                            else (2 + config.steps if how == "own" else 2))
                    run["_queries"][k][s:s + bs] = q
                for i in names:
                    for j in names:
                        pred = E.predict_with_delta(tm[j], batch, deltas[i])
                        run["_fooled"][(i, j)][s:s + bs] = (pred != y.cpu()).numpy()
            for k in names:
                run["_correct"][k] = (clean[k] == y_all).numpy()
                run["_gradient"][k], run["_note"][k] = plan[k], notes[k]
            if skipped:
                run["not_measured"] = dict(skipped)
            runs[f"{attack} eps={eps:g}"] = run
        names = full_names
    return runs


def _no_embeddings(tm: TextModel) -> str | None:
    """Why a model cannot join an embedding-space attack (None when it can): an ONNX Runtime
    session, say, takes token ids only."""
    try:
        tm.embedding_module()
    except (ValueError, AttributeError, NotImplementedError) as exc:
        return f"not measured: it takes token ids only, not input embeddings ({exc})"
    return None


def _word_ranking_plan(tm, names, texts, y_all, config, ranking, splits, cands, clean):
    """Per model: (word scores or None, queries charged per example, gradient label, note).

    Gradient scores are computed only for the examples that will be attacked (clean
    prediction right, a word with candidates, room in the word budget), once per
    gradient source (a model's own, or the base's as a surrogate)."""
    base = names[0]
    if ranking == "drop-one":
        return {k: (None, 0, "none needed", "drop-one importance (queries only)") for k in names}
    probe_n = min(len(texts), 8)
    probe_batch = E.prepare(tm[base], texts[:probe_n])
    yp = y_all[:probe_n].to(probe_batch.ids.device)

    def usable(k):
        if not getattr(tm[k].tokenizer, "is_fast", False):
            return "no fast tokenizer to map tokens to words"
        return E.probe_embedding_gradient(tm[k], probe_batch, yp)

    reasons = {k: usable(k) for k in names}
    source = {}
    for k in names:
        source[k] = k if reasons[k] is None else (
            base if config.no_gradient == "surrogate" and reasons[base] is None else None)
    scores = {}
    for src in dict.fromkeys(v for v in source.values() if v is not None):
        need = sorted({e for k in names if source[k] == src
                       for e in T.attack_targets((clean[k].argmax(-1) == y_all).tolist(), cands, splits,
                                                 config.word_budget)})
        got = T.gradient_word_importance(tm[src], [splits[e] for e in need], y_all[need].tolist(),
                                         config.batch_size) if need else []
        table = [[] for _ in texts]
        for e, row in zip(need, got):
            table[e] = row
        scores[src] = table
    plan = {}
    for k in names:
        src = source[k]
        if src is None:
            plan[k] = (None, 0, "none needed",
                       f"drop-one importance (queries only): no input-embedding gradient ({reasons[k]})")
        elif src == k:
            plan[k] = (scores[k], 1, "own", "words ranked by the input-embedding gradient norm")
        else:
            plan[k] = (scores[src], 0, f"surrogate:{base}",
                       f"no input-embedding gradient ({reasons[k]}); words ranked by the gradient of {base!r}")
    return plan


def _run_words(tm, names, texts, y_all, config, ranking="drop-one"):
    base = names[0]
    n = len(texts)
    splits = [T.SplitText.of(t) for t in texts]
    stop = T.stopword_set(config.skip_stopwords)
    if config.resolved_candidate_source() == "mlm":
        cands = T.mlm_candidates(splits, config.mlm_model, config.num_candidates, stop,
                                 config.batch_size, device=tm[base].device)
    else:
        cands = T.embedding_neighbour_candidates(splits, tm[base], config.num_candidates, stop)
    run = _new_run("word-substitution", config.word_budget, "fraction of words", True, n, names)
    # each model's clean logits: one query per text, used by the ranking and the attack
    clean = {k: tm[k].logits(texts, config.batch_size) for k in names}
    plan = _word_ranking_plan(tm, names, texts, y_all, config, ranking, splits, cands, clean)
    results = {}
    for k in names:
        scores, cost, how, note = plan[k]
        res = T.word_substitution(tm[k], texts, y_all.tolist(), cands, word_budget=config.word_budget,
                                  query_budget=config.query_budget, batch_size=config.batch_size,
                                  splits=splits, word_scores=scores, score_queries=cost,
                                  clean_logits=clean[k])
        results[k] = res
        run["_correct"][k] = np.array(res.correct, bool)
        run["_queries"][k] = np.array(res.queries, float)
        run["_size"][k] = np.array(res.fraction_changed(), float)
        run["_gradient"][k], run["_note"][k] = how, note
    for i in names:
        for j in names:
            if i == j:
                run["_fooled"][(i, j)] = np.array(
                    [(not c) or s for c, s in zip(results[i].correct, results[i].success)], bool)
                continue
            # a text that model i's attack left unchanged is the clean text, whose prediction
            # by model j is already known: only the changed texts are queried
            pred = np.array(results[j].clean_pred)
            changed = [e for e in range(n) if results[i].changes[e]]
            if changed:
                pred[changed] = tm[j].logits([results[i].adv_texts[e] for e in changed],
                                             config.batch_size).argmax(-1).numpy()
            run["_fooled"][(i, j)] = pred != y_all.numpy()
    run["examples"] = {k: _text_examples(results[k], splits, y_all, config.n_text_examples)
                       for k in names}
    run["candidate_source"] = config.resolved_candidate_source()
    return run


def _text_examples(res: "T.TextAttackResult", splits, y_all, limit):
    out = []
    for e in range(len(splits)):
        if len(out) >= limit:
            break
        if not res.success[e]:
            continue
        sp = splits[e]
        changed_slots = {sp.word_slots[w]: w for w in res.changes[e]}
        segments, original = [], []
        for p, part in enumerate(sp.parts):
            if p in changed_slots:
                w = changed_slots[p]
                pre, core, post = sp.cores[w]
                new = T._match_case(core, res.changes[e][w])
                segments += [[pre, False], [new, True], [post, False]]
                original.append(core)
            else:
                segments.append([part, False])
        out.append({"index": e, "label": int(y_all[e]), "adv_pred": int(res.adv_pred[e]),
                    "original": "".join(sp.parts), "adversarial": res.adv_texts[e],
                    "segments": [s for s in segments if s[0]],
                    "replaced": [[o, res.changes[e][w]] for o, w in zip(original, sorted(res.changes[e]))],
                    "fraction_changed": res.fraction_changed()[e], "queries": res.queries[e]})
    return out


# ---------------------------------------------------------------------- assemble
def _finish(run: dict, names: list[str], config: AdversarialConfig) -> None:
    names = run.pop("_names", names)  # the models this run attacked (all, or those it applies to)
    correct = run.pop("_correct")
    fooled = run.pop("_fooled")
    size = run.pop("_size")
    queries = run.pop("_queries")
    grad = run.pop("_gradient")
    note = run.pop("_note")
    success = {k: correct[k] & fooled[(k, k)] for k in names}
    per_model = {}
    for k in names:
        summary = model_summary(correct[k], success[k])
        s = success[k]
        summary["mean_perturbation"] = float(np.nanmean(size[k][s])) if s.any() else None
        summary["mean_queries"] = float(queries[k][correct[k]].mean()) if correct[k].any() else None
        summary["gradient"] = grad[k]
        summary["gradient_note"] = note[k]
        summary["correct"] = correct[k].tolist()
        summary["success"] = s.tolist()
        per_model[k] = summary
    run["per_model"] = per_model
    cmat = np.stack([correct[k] for k in names])
    fmat = np.stack([np.stack([fooled[(i, j)] for j in names]) for i in names])
    run["transfer"] = {"models": names, "matrix": transfer_matrix(cmat, fmat)}
    run["jaccard"] = {"models": names, "matrix": jaccard_matrix(np.stack([success[k] for k in names]))}
    base = names[0]
    run["change"] = {
        v: change_with_ci(correct[base], success[base], correct[v], success[v],
                          resamples=config.bootstrap, confidence=config.confidence,
                          seed=config.seed)
        for v in names[1:]}
