"""Discrete, realizable word-substitution attack (the TextFooler / BERT-Attack family).

Algorithm (Jin et al. 2020, "Is BERT really robust?" — TextFooler; Li et al. 2020,
"BERT-Attack"), run for all texts of a batch at once:

1. Query the clean text; only examples the model gets right are attacked.
2. Rank the attackable words by *drop-one importance*: ``I_w = p_y(x) - p_y(x without w)``,
   one query per word (when that exceeds the query budget the words are taken left to
   right instead, at no query cost); or, with ``word_scores`` from
   :func:`gradient_word_importance`, by the norm of the loss gradient with respect to
   the word's input embeddings, ``I_w = ||dL/dE_w||_2`` over its sub-word tokens (one
   forward+backward pass per text instead of one query per word; the gradient ranking
   of Yoo et al. 2020, "Searching for a search method", and TextAttack's
   ``wir_method="gradient"``). The two orders differ, so the attacks can find
   different substitutions.
3. In that order, try every candidate for the word (one query each), keep the candidate
   that lowers ``p_y`` the most if it lowers it at all, and stop at the first candidate that
   changes the predicted label (success). At most ``floor(word_budget * n_words)`` words are
   changed and at most ``query_budget`` queries are spent per example (the clean query
   included); an example that does not flip within budget is a failure.

Candidates are fixed before any model is attacked and are the same for every model
compared: the nearest whole-word vocabulary tokens of each word in the *base* model's
input-embedding space (cosine similarity), or, when an offline masked LM is configured,
its top predictions for the masked word in context (BERT-Attack). Attackable words are
alphabetic, at least two letters and (by default) not English stop words.
"""

from __future__ import annotations

import functools
import importlib.util
import pathlib
import re
import sys
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .textmodel import TextModel

_SPLIT = re.compile(r"(\s+)")
_CORE = re.compile(r"^(\W*)(.*?)(\W*)$", re.DOTALL)


@dataclass
class SplitText:
    """A text as alternating words and separators, so it can be rebuilt exactly."""

    parts: list[str]          # words at even positions, whitespace at odd positions
    word_slots: list[int]     # index in parts of each word
    cores: list[tuple[str, str, str]]  # (leading punctuation, core, trailing punctuation)

    @classmethod
    def of(cls, text: str) -> "SplitText":
        parts = _SPLIT.split(text)
        slots = [i for i, p in enumerate(parts) if p and not p.isspace()]
        cores = [_CORE.match(parts[i]).groups() for i in slots]
        return cls(parts, slots, cores)

    @property
    def n_words(self) -> int:
        return len(self.word_slots)

    def render(self, replace: dict[int, str], drop: Optional[int] = None) -> str:
        """The text with word ``k`` -> ``replace[k]`` (core only) and word ``drop`` removed."""
        parts = list(self.parts)
        for k, new in replace.items():
            pre, core, post = self.cores[k]
            parts[self.word_slots[k]] = pre + _match_case(core, new) + post
        if drop is not None:
            parts[self.word_slots[drop]] = ""
        text = "".join(parts)
        return re.sub(r"\s{2,}", " ", text).strip() if drop is not None else text


def _match_case(original: str, new: str) -> str:
    if original.isupper() and len(original) > 1:
        return new.upper()
    if original[:1].isupper():
        return new[:1].upper() + new[1:]
    return new


def attackable(core: str, stopwords: frozenset) -> bool:
    return len(core) >= 2 and core.isalpha() and core.lower() not in stopwords


def stopword_set(skip: bool) -> frozenset:
    """scikit-learn's English stop words (``ENGLISH_STOP_WORDS``), or none."""
    return _english_stop_words() if skip else frozenset()


@functools.lru_cache(maxsize=1)
def _english_stop_words() -> frozenset:
    # The list is a plain frozenset in sklearn/feature_extraction/_stop_words.py. Importing
    # it the usual way imports all of scikit-learn (2-6 s on a loaded CPU, more than the
    # whole attack on a few dozen sentences), so the file is executed on its own; the
    # ordinary import is the fallback where the file is not found.
    loaded = sys.modules.get("sklearn.feature_extraction._stop_words")
    if loaded is not None:
        return frozenset(loaded.ENGLISH_STOP_WORDS)
    spec = importlib.util.find_spec("sklearn")
    path = pathlib.Path(spec.origin).parent / "feature_extraction" / "_stop_words.py" if spec and spec.origin \
        else None
    if path is not None and path.is_file():
        file_spec = importlib.util.spec_from_file_location("_minidiff_english_stop_words", path)
        module = importlib.util.module_from_spec(file_spec)
        file_spec.loader.exec_module(module)
        return frozenset(module.ENGLISH_STOP_WORDS)
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS
    return frozenset(ENGLISH_STOP_WORDS)


# ---------------------------------------------------------------------- candidates
def whole_word_vocab(tokenizer) -> tuple[list[str], list[int]]:
    """Vocabulary tokens that are whole alphabetic words (no ``##`` pieces, no specials)."""
    special = set(getattr(tokenizer, "all_special_tokens", []) or [])
    vocab = tokenizer.get_vocab()
    items = sorted((i, t) for t, i in vocab.items()
                   if t not in special and len(t) >= 2 and t.isalpha() and t.isascii())
    return [t for _, t in items], [i for i, _ in items]


@torch.no_grad()
def embedding_neighbour_candidates(splits: Sequence[SplitText], base: TextModel, k: int,
                                   stopwords: frozenset) -> list[list[list[str]]]:
    """``cands[example][word]``: the ``k`` nearest whole-word tokens by cosine similarity
    of (mean sub-word) input embeddings of the base model. Non-attackable words get ``[]``."""
    tok = base.tokenizer
    if tok is None:
        raise ValueError("embedding-neighbour candidates need the tokenizer (pass tokenizer=...)")
    words, ids = whole_word_vocab(tok)
    if not words:
        raise ValueError("the tokenizer's vocabulary has no whole-word alphabetic tokens")
    table = base.embedding_matrix()
    dev = table.device
    ww = torch.nn.functional.normalize(table[torch.tensor(ids, device=dev)], dim=1)
    unique = sorted({c.lower() for s in splits for (_, c, _) in s.cores if attackable(c, stopwords)})
    neigh: dict[str, list[str]] = {}
    for s in range(0, len(unique), 256):
        chunk = unique[s:s + 256]
        vecs = []
        for w in chunk:
            piece_ids = tok.convert_tokens_to_ids(tok.tokenize(w)) or [tok.unk_token_id]
            vecs.append(table[torch.tensor(piece_ids, device=dev)].mean(0))
        q = torch.nn.functional.normalize(torch.stack(vecs), dim=1)
        sims = q @ ww.T
        top = sims.topk(min(k + 1, len(words)), dim=1).indices.cpu().tolist()
        for w, row in zip(chunk, top):
            neigh[w] = [words[j] for j in row if words[j] != w][:k]
    return [[neigh[c.lower()] if attackable(c, stopwords) else [] for (_, c, _) in s.cores]
            for s in splits]


@torch.no_grad()
def mlm_candidates(splits: Sequence[SplitText], mlm_dir: str, k: int, stopwords: frozenset,
                   batch_size: int, device=None) -> list[list[list[str]]]:
    """BERT-Attack candidates: the masked LM's top-``k`` whole-word predictions for each
    attackable word masked in its context. Loaded offline from ``mlm_dir``."""
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(mlm_dir, local_files_only=True)
        mlm = AutoModelForMaskedLM.from_pretrained(mlm_dir, local_files_only=True)
    except OSError as exc:
        raise ValueError(f"cannot load a masked LM from {mlm_dir!r} offline: {exc}") from exc
    mlm.eval().to(device or "cpu")
    words, ids = whole_word_vocab(tok)
    allowed = torch.full((len(tok),), float("-inf"))
    allowed[torch.tensor(ids)] = 0.0
    allowed = allowed.to(mlm.device)
    jobs, texts = [], []
    for e, s in enumerate(splits):
        for w, (_, c, _) in enumerate(s.cores):
            if attackable(c, stopwords):
                jobs.append((e, w, c.lower()))
                texts.append(s.render({w: tok.mask_token}).replace(
                    _match_case(c, tok.mask_token), tok.mask_token))
    out = [[[] for _ in s.cores] for s in splits]
    for b in range(0, len(texts), batch_size):
        enc = tok(texts[b:b + batch_size], padding=True, truncation=True, max_length=256,
                  return_tensors="pt").to(mlm.device)
        logits = mlm(**enc).logits
        for r, (e, w, orig) in enumerate(jobs[b:b + batch_size]):
            pos = (enc["input_ids"][r] == tok.mask_token_id).nonzero()
            if len(pos) == 0:  # truncated away
                continue
            scores = logits[r, pos[0, 0], : allowed.numel()] + allowed
            top = scores.topk(k + 1).indices.tolist()
            out[e][w] = [t for t in tok.convert_ids_to_tokens(top) if t != orig][:k]
    return out


# ---------------------------------------------------------------------- the attack
@dataclass
class TextAttackResult:
    adv_texts: list[str]
    correct: list[bool]           # clean prediction right
    success: list[bool]           # correct and flipped within budget
    adv_pred: list[int]
    queries: list[int]
    n_words: list[int]
    changes: list[dict] = field(default_factory=list)  # per example: {word index: new core}
    clean_pred: list[int] = field(default_factory=list)  # the model's prediction on the clean text

    def fraction_changed(self) -> list[float]:
        return [len(c) / n if n else 0.0 for c, n in zip(self.changes, self.n_words)]


def word_substitution(model: TextModel, texts: Sequence[str], labels: Sequence[int],
                      candidates: list[list[list[str]]], *, word_budget: float,
                      query_budget: int, batch_size: int,
                      splits: Optional[Sequence[SplitText]] = None,
                      word_scores: Optional[Sequence[Sequence[float]]] = None,
                      score_queries: int = 0,
                      clean_logits: Optional[torch.Tensor] = None) -> TextAttackResult:
    """Greedy word substitution against one model, all examples batched together.

    Parameters
    ----------
    model : TextModel
    texts, labels : sequences
        Clean texts and their integer labels.
    candidates : list
        ``candidates[example][word]`` -> replacement cores (shared by all models).
    word_budget : float
        At most ``floor(word_budget * n_words)`` words changed per text.
    query_budget : int
        At most this many queries per text, the clean query included.
    batch_size : int
        Texts per forward pass (queries from different examples are batched together).
    word_scores : list, optional
        ``word_scores[example][word]``: importance of each word (larger first; ties by
        position), e.g. from :func:`gradient_word_importance`. Replaces the drop-one
        queries.
    score_queries : int
        Queries charged to each attacked example for ``word_scores`` (1 for the model's
        own gradient pass, 0 for scores from another model).
    clean_logits : tensor, optional
        The model's logits ``(N, C)`` on ``texts`` if already computed (not re-queried;
        still counted as the first query of each example).
    """
    splits = list(splits) if splits is not None else [SplitText.of(t) for t in texts]
    n = len(texts)
    y = torch.as_tensor(list(labels), dtype=torch.long)
    if word_scores is not None and len(word_scores) != n:
        raise ValueError(f"word_scores has {len(word_scores)} rows for {n} texts")
    if clean_logits is None:
        clean_logits = model.logits(texts, batch_size)
    elif tuple(clean_logits.shape[:1]) != (n,):
        raise ValueError(f"clean_logits has shape {tuple(clean_logits.shape)}, expected ({n}, classes)")
    probs = clean_logits.float().cpu().softmax(-1)
    pred = probs.argmax(-1)
    correct = (pred == y).tolist()
    queries = [1] * n
    changes: list[dict] = [{} for _ in range(n)]
    adv_texts = list(texts)
    adv_pred = pred.tolist()
    success = [False] * n
    p_true = probs[torch.arange(n), y].tolist() if n else []
    max_changes = [int(word_budget * s.n_words + 1e-9) for s in splits]
    targets = set(attack_targets(correct, candidates, splits, word_budget))

    # -- 2. drop-one importance, all examples in one batched pass
    orders: list[list[int]] = [[] for _ in range(n)]
    jobs, variants = [], []
    for e in range(n):
        if e not in targets:
            continue
        pos = [w for w in range(splits[e].n_words) if candidates[e][w]]
        if word_scores is not None:
            sc = word_scores[e]
            orders[e] = sorted(pos, key=lambda w: (-sc[w], w))
            queries[e] += score_queries
            continue
        if queries[e] + len(pos) <= query_budget and len(pos) > 1:
            for w in pos:
                jobs.append((e, w))
                variants.append(splits[e].render({}, drop=w))
            queries[e] += len(pos)
        orders[e] = pos
    if variants:
        pv = _true_probs(model, variants, [int(y[e]) for e, _ in jobs], batch_size)
        imp: dict[int, dict[int, float]] = {}
        for (e, w), p in zip(jobs, pv):
            imp.setdefault(e, {})[w] = p_true[e] - p
        for e, scores in imp.items():
            orders[e] = sorted(orders[e], key=lambda w: (-scores[w], w))

    # -- 3. greedy substitution, one word position per round for every active example
    pointer = [0] * n
    active = [e for e in range(n) if orders[e]]
    while active:
        jobs, variants = [], []
        for e in active:
            w = orders[e][pointer[e]]
            room = query_budget - queries[e]
            for c in candidates[e][w][:room]:
                trial = dict(changes[e])
                trial[w] = c
                jobs.append((e, w, c))
                variants.append(splits[e].render(trial))
        if not variants:
            break
        logits = model.logits(variants, batch_size)
        pr = logits.softmax(-1)
        best: dict[int, tuple] = {}
        for r, (e, w, c) in enumerate(jobs):
            queries[e] += 1
            label = int(y[e])
            flipped = int(pr[r].argmax()) != label
            key = (0 if flipped else 1, float(pr[r, label]), r)
            if e not in best or key < best[e][0]:
                best[e] = (key, w, c, int(pr[r].argmax()))
        still = []
        for e in active:
            if e in best:
                (flip_rank, p, r), w, c, label_now = best[e]
                if flip_rank == 0:
                    changes[e][w] = c
                    success[e] = True
                    adv_pred[e] = label_now
                    continue
                if p < p_true[e]:
                    changes[e][w] = c
                    p_true[e] = p
            pointer[e] += 1
            if (pointer[e] < len(orders[e]) and len(changes[e]) < max_changes[e]
                    and queries[e] < query_budget):
                still.append(e)
        active = still
    for e in range(n):
        adv_texts[e] = splits[e].render(changes[e])
    return TextAttackResult(adv_texts, correct, success, adv_pred, queries,
                            [s.n_words for s in splits], changes, pred.tolist())


def attack_targets(correct: Sequence[bool], candidates: list[list[list[str]]], splits: Sequence[SplitText],
                   word_budget: float) -> list[int]:
    """Examples the attack works on: clean prediction right, at least one word with
    candidates, and a word budget that allows at least one change."""
    return [e for e, s in enumerate(splits)
            if correct[e] and any(candidates[e]) and int(word_budget * s.n_words + 1e-9) > 0]


def word_spans(split: SplitText) -> list[tuple[int, int]]:
    """Character span ``[start, end)`` of each word's core (punctuation excluded) in the text."""
    starts, pos = {}, 0
    for i, part in enumerate(split.parts):
        starts[i] = pos
        pos += len(part)
    out = []
    for slot, (pre, core, _) in zip(split.word_slots, split.cores):
        a = starts[slot] + len(pre)
        out.append((a, a + len(core)))
    return out


def gradient_word_importance(model: TextModel, splits: Sequence[SplitText], labels: Sequence[int],
                             batch_size: int) -> list[list[float]]:
    """Gradient word importance: ``I_w = ||dL/dE_w||_2`` for every word of every text.

    ``L`` is the cross-entropy of the true label, ``E_w`` the input (word) embeddings of
    the sub-word tokens inside the word's core (tokens mapped to words by character
    offsets), the norm taken over all of them together. One forward and one backward
    pass per text, batched. A word with no token left after truncation scores 0.
    Needs a model with a gradient with respect to its input embeddings (probe it with
    :func:`minidiff.adversarial.embedding.probe_embedding_gradient`) and a fast tokenizer.
    """
    texts = ["".join(s.parts) for s in splits]
    y_all = torch.as_tensor(list(labels), dtype=torch.long)
    out: list[list[float]] = []
    emb_mod = model.embedding_module()
    for s in range(0, len(texts), batch_size):
        ids, mask, offsets = model.encode_with_offsets(texts[s:s + batch_size])
        with torch.enable_grad():
            emb = emb_mod(ids).detach().requires_grad_(True)
            logits = model.logits_from_embeds(emb, mask)
            loss = torch.nn.functional.cross_entropy(logits.float(), y_all[s:s + len(ids)].to(logits.device),
                                                     reduction="sum")
            (g,) = torch.autograd.grad(loss, emb)
        model.n_queries += len(ids)
        model.n_forward += 1
        model.n_gradient += len(ids)
        sq = (g.detach().double() ** 2).sum(-1).cpu()  # (b, L) squared norm per token
        for r, split in enumerate(splits[s:s + batch_size]):
            starts, ends = offsets[r, :, 0], offsets[r, :, 1]
            real = (ends > starts) & mask[r].bool().cpu()
            scores = []
            for a, b in word_spans(split):
                inside = real & (starts >= a) & (ends <= b)
                scores.append(float(sq[r][inside].sum().sqrt()))
            out.append(scores)
    return out


def _true_probs(model: TextModel, texts: list[str], labels: list[int], batch_size: int) -> list[float]:
    p = model.logits(texts, batch_size).softmax(-1)
    return p[torch.arange(len(texts)), torch.as_tensor(labels)].tolist()
