"""Text in, scored token windows out: the data side of a language-model study.

Text (a plain-text file, JSON Lines, a Hugging Face dataset saved to disk, a
built-in corpus, or a string) is tokenized **once**, as one stream, and cut into
consecutive, non-overlapping windows of ``n_ctx`` tokens. The scoring rule is
llama.cpp's ``llama-perplexity`` (``tools/perplexity/perplexity.cpp``,
``perplexity()`` and ``kl_divergence()``), so that numbers compare with the ones
quoted for that tool on the same text and tokenizer:

* the text is tokenized with a BOS token in front when the tokenizer adds one
  (``llama_vocab_get_add_bos``; GPT-2 and Qwen tokenizers do not, Llama ones do);
  an EOS token is never appended;
* ``n_windows = len(tokens) // n_ctx``; the tail that does not fill a window is
  dropped; window ``i`` is ``tokens[i*n_ctx : (i+1)*n_ctx]``;
* with BOS, the **first token of every window is replaced** by BOS (not
  prepended: the window stays ``n_ctx`` long, the overwritten token lies in the
  unscored context half);
* each window is evaluated as one sequence; with ``first = n_ctx // 2``, the
  logits at positions ``first .. n_ctx-2`` are scored against the tokens at
  positions ``first+1 .. n_ctx-1``: ``n_ctx - 1 - first`` scored tokens per
  window (255 for ``n_ctx = 512``). The first half is context only.

llama.cpp refuses text shorter than ``2 * n_ctx`` tokens; here one full window
is enough (the statistics' uncertainties say how little that is).

Masked language models are scored by **pseudo-log-likelihood** (Salazar et al.
2020, "Masked Language Model Scoring"): the window holds ``[CLS]``, ``n_ctx - 2``
text tokens and ``[SEP]``; the text tokens in the second half (positions
``first+1 .. n_ctx-2``) are scored, each by a copy of the window in which only
that token is replaced by ``[MASK]``; the logits at the masked position give the
model's distribution for that token. A window therefore costs
``n_ctx - 2 - first`` forward passes (run batched, see
:meth:`TokenWindows.masked_copies`), and the result is not a perplexity in the
causal sense: "PPL" of a masked LM is ``exp(mean -log p(token | all other tokens))``.

Token frequencies (:attr:`TokenWindows.token_frequency`) count every scored
target token of the text; the study buckets tokens by the frequency of the
correct token (are rare tokens hurt first?).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import torch

#: a text every tokenizer must split identically for two models to be compared
PROBE_TEXT = ("The quick brown fox, 3.14159 and naïve café — \"quoted\" text\n\tnew line; "
              "don't stop: über, 東京, ☃ 🙂 <tag> x+y=z")

TASKS = ("causal-lm", "masked-lm")
TEXT_SOURCES = ("builtin", "text", "jsonl", "hf_disk")


# -- text --------------------------------------------------------------------------

def chatterbot_text(language: str = "english", split: str = "all", eval_every: int = 10) -> str:
    """Conversation text of the chatterbot-corpus (installed from PyPI, offline).

    Each conversation becomes its lines joined by newlines; conversations are
    separated by a blank line, in file order. ``split="eval"`` keeps every
    ``eval_every``-th conversation (the held-out text), ``"train"`` the others,
    ``"all"`` everything.
    """
    import yaml

    from minidiff.data.builtin import _chatterbot_root, chatterbot_languages

    if split not in ("all", "train", "eval"):
        raise ValueError(f"split must be 'all', 'train' or 'eval', got {split!r}")
    if eval_every < 2:
        raise ValueError(f"eval_every must be >= 2, got {eval_every}")
    folder = os.path.join(_chatterbot_root(), language)
    if not os.path.isdir(folder):
        raise ValueError(f"chatterbot-corpus has no language {language!r}; available: {chatterbot_languages()}")
    convs: list[str] = []
    for fname in sorted(os.listdir(folder)):
        if not fname.endswith((".yml", ".yaml")):
            continue
        with open(os.path.join(folder, fname), encoding="utf-8") as fh:
            doc = yaml.safe_load(fh) or {}
        for conv in doc.get("conversations") or []:
            lines = [" ".join(str(x).split()) for x in (conv if isinstance(conv, list) else [conv])]
            lines = [x for x in lines if x]
            if lines:
                convs.append("\n".join(lines))
    if split == "eval":
        convs = convs[::eval_every]
    elif split == "train":
        convs = [c for i, c in enumerate(convs) if i % eval_every]
    return "\n\n".join(convs)


BUILTIN_TEXTS = {
    "chatterbot-en": lambda split="eval", **kw: chatterbot_text("english", split, **kw),
}


def load_text(source: str = "builtin", *, name: str = "", path: str | os.PathLike = "",
              text_column: str = "text", split: str = "", separator: str = "\n\n",
              options: Mapping[str, Any] | None = None) -> str:
    """Read the text a language-model study scores, as one string.

    Parameters
    ----------
    source
        ``"builtin"`` (``name``: ``chatterbot-en``; ``options`` e.g. ``{"split": "eval"}``,
        the default, the held-out conversations the tiny LM never trained on),
        ``"text"`` (a UTF-8 plain-text file at ``path``, read as is),
        ``"jsonl"`` (``text_column`` of every object, via :func:`minidiff.data.load_jsonl`)
        or ``"hf_disk"`` (``text_column`` of a dataset saved with ``save_to_disk``,
        via :func:`minidiff.data.load_hf_disk`; ``split`` for a DatasetDict).
    separator
        Joins the records of JSONL / datasets (like the blank lines between
        articles of ``wiki.test.raw``).
    """
    options = dict(options or {})
    if source == "builtin":
        if name not in BUILTIN_TEXTS:
            raise ValueError(f"unknown built-in text {name!r}; available: {sorted(BUILTIN_TEXTS)}")
        return BUILTIN_TEXTS[name](**options)
    if not path:
        raise ValueError(f"text source {source!r} needs a path")
    path = os.fspath(path)
    if source == "text":
        if not os.path.isfile(path):
            raise ValueError(f"text file {path!r} does not exist")
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    if source == "jsonl":
        from minidiff.data import load_jsonl

        return separator.join(load_jsonl(path, text_column=text_column, label_column=None).inputs)
    if source == "hf_disk":
        from minidiff.data import load_hf_disk

        return separator.join(load_hf_disk(path, split=split or None, text_column=text_column,
                                           label_column=None).inputs)
    raise ValueError(f"unknown text source {source!r}; use one of {TEXT_SOURCES}")


# -- tokenizers ---------------------------------------------------------------------

def adds_bos(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` puts a BOS token in front when it encodes with special tokens
    (the HF equivalent of llama.cpp's ``llama_vocab_get_add_bos``)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return len(with_special) > 0 and with_special[0] == bos


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens, as one stream (no length limit)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # fast tokenizer: no "sequence longer than model_max_length" warning
        return list(backend.encode(text, add_special_tokens=False).ids)
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 of a tokenizer's vocabulary and of its ids for :data:`PROBE_TEXT`."""
    h = hashlib.sha256()
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    for tok, i in sorted(vocab.items(), key=lambda kv: kv[1]):
        h.update(f"{i}\x00{tok}\x01".encode("utf-8", "surrogatepass"))
    h.update(str(encode(tokenizer, PROBE_TEXT)).encode())
    h.update(str(adds_bos(tokenizer)).encode())
    return h.hexdigest()


def check_same_tokenizer(tokenizers: Mapping[str, Any]) -> None:
    """Refuse models whose tokenizers differ.

    Token-level divergence compares two distributions over one vocabulary at the
    same position of the same token stream; with different tokenizers neither
    holds. Compared: the vocabulary (via :func:`minidiff.models.capture.check_same_tokenization`)
    and the ids of a probe text (same vocabulary, different merges or
    normalisation still split text differently) and whether BOS is added.
    """
    from minidiff.models.capture import check_same_tokenization

    named = {k: t for k, t in tokenizers.items() if t is not None}
    if len(named) < 2:
        return
    try:
        check_same_tokenization(named)
    except ValueError:
        sizes = {k: len(t.get_vocab()) if hasattr(t, "get_vocab") else "?" for k, t in named.items()}
        raise ValueError(f"models {sorted(named)} use different tokenizers (vocabulary sizes {sizes}); token-level "
                         "divergence needs one vocabulary and one token stream. Compare models that share a "
                         "tokenizer (a model and its compressed versions do).") from None
    ref_name, ref = next(iter(named.items()))
    ref_ids, ref_bos = encode(ref, PROBE_TEXT), adds_bos(ref)
    for k, t in named.items():
        ids = encode(t, PROBE_TEXT)
        if ids != ref_ids or adds_bos(t) != ref_bos:
            raise ValueError(f"models {ref_name!r} and {k!r} have the same vocabulary but tokenize text differently "
                             f"(probe text -> {ref_ids[:12]}... vs {ids[:12]}...; adds BOS {ref_bos} vs "
                             f"{adds_bos(t)}); token-level divergence needs one token stream")


# -- windows ------------------------------------------------------------------------

@dataclass
class TokenWindows:
    """Token windows of one text and the positions that are scored.

    Attributes
    ----------
    input_ids : (n_windows, n_ctx) int64
        What the model sees (BOS substituted into position 0 when ``bos_token_id``
        is set; for masked LMs ``[CLS] ... [SEP]`` and no masking yet).
    targets : (n_windows, n_scored) int64
        The correct token of every scored position.
    target_positions : (n_scored,) int64
        Positions in the window of the scored targets (``first+1 .. n_ctx-1`` for
        causal LMs).
    logit_positions : (n_scored,) int64
        Positions whose logits are scored: ``target_positions - 1`` (causal: the
        logits at ``j`` predict token ``j+1``), ``target_positions`` (masked).
    token_frequency : (vocab,) int64
        How often each token id occurs among all scored targets of the text.
    """

    input_ids: torch.Tensor
    targets: torch.Tensor
    target_positions: torch.Tensor
    logit_positions: torch.Tensor
    token_frequency: torch.Tensor
    n_ctx: int
    task: str = "causal-lm"
    bos_token_id: int | None = None
    mask_token_id: int | None = None
    n_text_tokens: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def n_windows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_scored(self) -> int:
        """Scored tokens per window."""
        return int(self.target_positions.numel())

    @property
    def first(self) -> int:
        """llama.cpp's ``first``: the first scored logit position (causal) = ``n_ctx // 2``."""
        return int(self.logit_positions[0]) if self.task == "causal-lm" else int(self.target_positions[0]) - 1

    def batches(self, batch_size: int, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, int]]:
        """``(lo, hi)`` window ranges of at most ``batch_size`` windows in ``[start, stop)``."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        stop = self.n_windows if stop is None else stop
        for lo in range(start, stop, batch_size):
            yield lo, min(lo + batch_size, stop)

    def masked_copies(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Pseudo-log-likelihood inputs of windows ``[lo, hi)``: every scored position
        masked in its own copy. Returns ``(input_ids (k*S, n_ctx), masked_pos (k*S,))``
        with copies ordered window-major, then by scored position."""
        if self.task != "masked-lm" or self.mask_token_id is None:
            raise ValueError("masked copies are for masked-lm windows with a mask token")
        x = self.input_ids[lo:hi]
        k, s = x.shape[0], self.n_scored
        copies = x.repeat_interleave(s, dim=0).clone()
        pos = self.target_positions.repeat(k)
        copies[torch.arange(k * s), pos] = self.mask_token_id
        return copies, pos

    def fingerprint(self) -> str:
        """SHA-256 of the windows' token ids and scoring rule (a cache key)."""
        h = hashlib.sha256()
        h.update(f"{self.task}:{self.n_ctx}:{self.bos_token_id}:{self.mask_token_id}".encode())
        h.update(self.input_ids.numpy().tobytes())
        h.update(self.targets.numpy().tobytes())
        return h.hexdigest()


def _vocab_size(tokenizer: Any, ids: torch.Tensor) -> int:
    n = len(tokenizer) if tokenizer is not None and hasattr(tokenizer, "__len__") else 0
    return max(n, int(ids.max()) + 1 if ids.numel() else 0)


def make_windows(tokens: Sequence[int] | torch.Tensor | str, n_ctx: int, *, tokenizer: Any = None,
                 task: str = "causal-lm", add_bos: bool | None = None, max_windows: int = 0,
                 vocab_size: int | None = None) -> TokenWindows:
    """Tokenize once and cut into scored windows (see the module docstring for the rule).

    Parameters
    ----------
    tokens
        The text (a ``str``, tokenized with ``tokenizer``) or its token ids.
    n_ctx
        Window length in tokens (>= 4; llama.cpp's default is 512).
    tokenizer
        A transformers tokenizer; required for text and for masked LMs.
    task
        ``"causal-lm"`` or ``"masked-lm"``.
    add_bos
        Causal LMs: put BOS at the start of every window (``None``: when the
        tokenizer adds BOS, like llama.cpp).
    max_windows
        Keep only the first this many windows (0: all).
    vocab_size
        Length of :attr:`TokenWindows.token_frequency` (default: the tokenizer's).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if not isinstance(n_ctx, int) or n_ctx < 4:
        raise ValueError(f"n_ctx must be an integer >= 4, got {n_ctx!r}")
    if max_windows < 0:
        raise ValueError(f"max_windows must be >= 0, got {max_windows}")
    if isinstance(tokens, str):
        if tokenizer is None:
            raise ValueError("text needs a tokenizer; pass tokenizer=... or token ids")
        ids = torch.tensor(encode(tokenizer, tokens), dtype=torch.int64)
    else:
        ids = torch.as_tensor(tokens, dtype=torch.int64).reshape(-1)
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError("token ids must be non-negative")
    bos = mask = None
    if task == "causal-lm":
        if add_bos is None:
            add_bos = tokenizer is not None and adds_bos(tokenizer)
        if add_bos:
            bos = getattr(tokenizer, "bos_token_id", None) if tokenizer is not None else None
            if bos is None:
                raise ValueError("add_bos=True but the tokenizer has no bos_token_id")
            ids = torch.cat([torch.tensor([bos]), ids])
        width = n_ctx
    else:
        if tokenizer is None:
            raise ValueError("masked-lm windows need the tokenizer (its [CLS], [SEP] and [MASK] tokens)")
        cls_id, sep_id = getattr(tokenizer, "cls_token_id", None), getattr(tokenizer, "sep_token_id", None)
        mask = getattr(tokenizer, "mask_token_id", None)
        if cls_id is None or sep_id is None or mask is None:
            raise ValueError(f"masked-lm scoring needs cls, sep and mask tokens; {type(tokenizer).__name__} has "
                             f"cls={cls_id}, sep={sep_id}, mask={mask}")
        width = n_ctx - 2
    n_windows = ids.numel() // width
    if max_windows:
        n_windows = min(n_windows, max_windows)
    if n_windows < 1:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of n_ctx={n_ctx}; "
                         "use more text or a smaller n_ctx")
    body = ids[: n_windows * width].reshape(n_windows, width).clone()
    first = n_ctx // 2
    if task == "causal-lm":
        x = body.clone()
        if bos is not None:
            x[:, 0] = bos
        target_pos = torch.arange(first + 1, n_ctx)
        logit_pos = target_pos - 1
        targets = body[:, target_pos]
    else:
        x = torch.cat([torch.full((n_windows, 1), cls_id), body, torch.full((n_windows, 1), sep_id)], dim=1)
        target_pos = torch.arange(first + 1, n_ctx - 1)  # the [SEP] at n_ctx-1 is not text
        logit_pos = target_pos
        targets = x[:, target_pos]
    vs = vocab_size or _vocab_size(tokenizer, ids)
    freq = torch.bincount(targets.reshape(-1), minlength=vs)
    return TokenWindows(input_ids=x.contiguous(), targets=targets.contiguous(), target_positions=target_pos,
                        logit_positions=logit_pos, token_frequency=freq, n_ctx=n_ctx, task=task,
                        bos_token_id=bos, mask_token_id=mask, n_text_tokens=int(ids.numel()),
                        meta={"add_bos": bool(bos is not None), "rule": "llama.cpp perplexity: second half scored"})
