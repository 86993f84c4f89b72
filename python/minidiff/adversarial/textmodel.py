"""A thin, uniform view of a text classifier for the attacks.

Works with ``minidiff.models.TextClassifier`` (``forward(input_ids=None, attention_mask=None,
inputs_embeds=None) -> logits``, ``.tokenize(texts, max_length)``, ``.input_embeddings()``)
and with any module that has the same forward signature plus a Hugging Face tokenizer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional, Sequence

import torch
from torch import Tensor, nn

from minidiff.models.capture import logits_of

from .continuous import model_device


class TextModel:
    """Tokenize, query and embed for one text classifier.

    Parameters
    ----------
    model : nn.Module
        The classifier (put in eval mode by the caller).
    tokenizer : optional
        A Hugging Face tokenizer; used when the model has no ``tokenize`` method, and for
        the vocabulary (``model.tokenizer`` is used when this is None).
    max_length : int
        Token limit (longer texts are truncated).
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, max_length: int = 128):
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        self.max_length = max_length
        self.device = model_device(model)
        #: model queries so far: examples sent, forward passes (batches) run, and
        #: examples sent through a forward+backward pass (gradient word ranking)
        self.n_queries = 0
        self.n_forward = 0
        self.n_gradient = 0
        # the model's own tokenize() when it can run (a TextClassifier rebuilt from a saved
        # variant has tokenize() but no tokenizer: then the shared tokenizer is used)
        self._own_tokenize = hasattr(model, "tokenize") and getattr(model, "tokenizer", True) is not None
        if not self._own_tokenize and self.tokenizer is None:
            raise ValueError(
                "a text model needs a .tokenize(texts, max_length) method or a tokenizer; pass "
                "tokenizer=... to run_adversarial")

    # ------------------------------------------------------------------ tokens
    def encode(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """``(input_ids, attention_mask)``, padded to the longest text, on the model's device."""
        texts = list(texts)
        if self._own_tokenize:
            enc = self.model.tokenize(texts, self.max_length)
        else:
            enc = self.tokenizer(texts, padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors="pt")
        if isinstance(enc, Mapping) or hasattr(enc, "keys"):
            ids, mask = enc["input_ids"], enc.get("attention_mask")
        else:
            ids, mask = enc[0], enc[1] if len(enc) > 1 else None
        ids = torch.as_tensor(ids)
        mask = torch.ones_like(ids) if mask is None else torch.as_tensor(mask)
        return ids.to(self.device), mask.to(self.device)

    # ------------------------------------------------------------------ queries
    @torch.no_grad()
    def logits(self, texts: Sequence[str], batch_size: int) -> Tensor:
        """Logits (N, C), float32 on CPU, in the order of ``texts``.

        The texts are sorted by length and sent in batches of ``batch_size``, so that each
        batch pads to a similar length (padding is most of the work otherwise). With
        :attr:`max_padding` set (a share in (0, 1)), texts are sorted by their length in
        tokens and, on CPU, where a forward pass costs in proportion to its padded tokens, a
        batch is also cut where adding the next (longer) text would make padding exceed that
        share of its tokens (on other devices batches stay full: padding is cheap there, small
        batches are not). Off by default: a different batch shape changes logits by rounding
        (1 ulp), which an int8 model's per-token activation rounding can amplify into a
        different choice between two nearly equal candidates.
        """
        texts = list(texts)
        if not texts:
            return torch.zeros((0, 0))
        if self.max_padding is None:
            lengths = [len(t) for t in texts]
        else:
            lengths = self._token_lengths(texts)
        order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
        out = []
        for chunk in self._batches([lengths[i] for i in order], batch_size):
            ids, mask = self.encode([texts[order[j]] for j in chunk])
            out.append(logits_of(self.model(input_ids=ids, attention_mask=mask)).float().cpu())
            self.n_queries += len(ids)
            self.n_forward += 1
        sorted_logits = torch.cat(out)
        result = torch.empty_like(sorted_logits)
        result[torch.tensor(order)] = sorted_logits
        return result

    #: largest share of padding tokens in a CPU batch, or None for full batches (see :meth:`logits`)
    max_padding: Optional[float] = None

    def _token_lengths(self, texts: list[str]) -> list[int]:
        tok = self.tokenizer
        if tok is None or not getattr(tok, "is_fast", False):
            return [len(t) for t in texts]
        enc = tok(texts, truncation=True, max_length=self.max_length)
        return [len(ids) for ids in enc["input_ids"]]

    def _batches(self, sorted_lengths: list[int], batch_size: int) -> list[range]:
        """Consecutive runs of the length-sorted texts, one per forward pass."""
        cut_padding = self.max_padding is not None and torch.device(self.device).type == "cpu"
        out, start, tokens = [], 0, 0
        for j, n in enumerate(sorted_lengths):
            count = j - start
            if count and (count >= batch_size or
                          (cut_padding and (count + 1) * n > (tokens + n) / (1.0 - self.max_padding))):
                out.append(range(start, j))
                start, tokens = j, 0
            tokens += n
        out.append(range(start, len(sorted_lengths)))
        return out

    def encode_with_offsets(self, texts: Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
        """``(input_ids, attention_mask, offsets)`` with ``offsets (N, L, 2)`` the character
        span of each token in its text ((0, 0) for special and padding tokens). Needs a fast
        Hugging Face tokenizer; the ids are checked against :meth:`encode`'s (the ones the
        model is queried with)."""
        tok = self.tokenizer
        if tok is None or not getattr(tok, "is_fast", False):
            raise ValueError("token offsets need a fast Hugging Face tokenizer (tokenizer.is_fast)")
        texts = list(texts)
        enc = tok(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt",
                  return_offsets_mapping=True)
        ids, mask = self.encode(texts)
        if not torch.equal(enc["input_ids"].to(ids.device), ids):
            raise ValueError("the model's tokenize() does not match its tokenizer; cannot align tokens to words")
        return ids, mask, enc["offset_mapping"]

    def logits_from_embeds(self, embeds: Tensor, mask: Tensor) -> Tensor:
        return logits_of(self.model(inputs_embeds=embeds.to(self.device), attention_mask=mask.to(self.device)))

    # ------------------------------------------------------------------ embeddings
    def embedding_module(self) -> nn.Module:
        if hasattr(self.model, "input_embeddings"):
            return self.model.input_embeddings()
        if hasattr(self.model, "get_input_embeddings"):
            return self.model.get_input_embeddings()
        raise ValueError("the text model has no input_embeddings() (or get_input_embeddings())")

    def embed(self, ids: Tensor) -> Tensor:
        """Word embeddings of ``ids`` (no gradient)."""
        with torch.no_grad():
            return self.embedding_module()(ids.to(self.device)).detach()

    def embedding_matrix(self) -> Tensor:
        """The input-embedding table (vocab, hidden) as float32, dequantized if needed."""
        mod = self.embedding_module()
        w = getattr(mod, "weight", None)
        if isinstance(w, Tensor) and w.is_floating_point():
            return w.detach().float()
        # e.g. a quantized table: embed every id instead
        n = self.vocab_size()
        return self.embed(torch.arange(n, device=self.device)).float()

    def vocab_size(self) -> int:
        if self.tokenizer is not None:
            return len(self.tokenizer)
        return self.embedding_module().num_embeddings

    def special_ids(self) -> set[int]:
        tok = self.tokenizer
        return set(getattr(tok, "all_special_ids", []) or []) if tok is not None else set()


def eval_mode(models: Mapping[str, nn.Module]) -> dict[str, bool]:
    """Put every model in eval mode; returns the previous ``training`` flags to restore."""
    flags = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    return flags


def restore_mode(models: Mapping[str, nn.Module], flags: Mapping[str, bool],
                 only: Optional[set] = None) -> None:
    for name, m in models.items():
        if only is None or name in only:
            m.train(flags[name])
