"""The language-model study: a base model against compressed variants, token by token.

Data flow (one direction): text -> :class:`~minidiff.lm.windows.TokenWindows`
(tokenized once, llama.cpp's scoring rule) -> every model on the same batch of
windows (:func:`minidiff.models.capture.capture_stream`, which also records the
layers for CKA) -> per variant a :class:`~minidiff.lm.TokenDivergenceAccumulator`
fed the scored rows of both models' logits, and a :class:`minidiff.CKAAccumulator`
fed every scored token's layer representations (token-level CKA between all layer
pairs: one sample per scored token) -> :class:`LMStudyResult` -> report.

Memory. One batch of windows is alive at a time: the logits of every model on it,
``O(models x batch x n_ctx x V)`` (halved for transformers causal LMs, which are
asked only for the logits of the scored half via ``logits_to_keep``), and the
accumulators' fixed-size states; nothing grows with the number of tokens.

Base file (``base_file=...``), for when the base and a variant do not fit on the
device together. A first pass runs only the base model and stores, per scored
token, its log-probabilities over the whole vocabulary in 16 bits, llama.cpp's
``--kl-divergence-base`` idea: ``u = round((log p - (m - R)) / s)`` in
``[0, 65535]`` with ``m`` the row's largest log-probability (float32) and
``s = R / 65535``, ``R = base_file_range`` nats (default 24). Entries more than
``R`` below the maximum are stored as ``u = 0`` (raised to ``m - R``). Each variant
pass then runs only the variant and reads the base rows back as
``m - R + u s`` (a valid logit row). The error this introduces on one token's KLD:
each reconstructed, renormalised log-probability is within ``eta = 2 eps`` of the
exact one, ``eps = s / 2``, hence (with ``a = log p``, ``b = log q``)

    ``|KLD' - KLD| <= eta + (exp(eta) - 1) * sum_v p_v |a_v - b_v|``

as long as no entry is raised to the floor; raised entries add at most
``V exp(-R)`` base probability in total (``6e-6`` for ``V = 152k``, ``R = 24``).
:func:`base_file_error_bound` evaluates the bound. A file costs ``2 V`` bytes per
scored token (``V = 32k``, 100 windows of 512: 1.7 GB). CKA needs both models'
activations at once and is not measured in this mode.

Layer swaps (``layer_swap=...``, a study file's ``[metrics.layer_swap]``). After the
divergence pass, for every variant of the base's architecture,
:func:`minidiff.localize.layer_swap` swaps one block (or Linear) at a time between the
base and the variant on a seeded sample of ``examples`` windows
(:func:`minidiff.study.swap.swap_subset`), fed in the study's batches
(:meth:`LMStudy._batch_windows` windows each, no padding: every window is ``n_ctx`` real
tokens) and compared on the study's scored tokens only (causal: the logits at positions
``n_ctx/2 .. n_ctx-2``; masked: each masked copy's masked position): KLD and same top-1.
The stage is :func:`minidiff.study.swap.run_swap_jobs`, shared with classifier studies
(skip reasons, the cost logged before running, entries cached under
``<cache>/layer_swap/``); the result is the ``layer_swap`` section of the saved results.

Distributed. Under ``torchrun`` every rank takes a contiguous block of windows
(:meth:`minidiff.distributed.DistContext.shard_range`, aligned to the batch), and
the accumulators are merged with :meth:`~minidiff.distributed.DistContext.sync`;
rank 0 writes the result.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch

from minidiff.models.capture import logits_of
from torch import nn

from .windows import TokenWindows, check_same_tokenizer, make_windows

DEFAULT_RANGE = 24.0
_U16 = 65535


# -- models ---------------------------------------------------------------------------

def _unwrap(model: Any) -> tuple[nn.Module, Any, dict[str, Any]]:
    """(module, tokenizer or None, manifest) of an ``nn.Module`` or a ``Variant``."""
    if isinstance(model, nn.Module):
        return model, getattr(model, "tokenizer", None), {}
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module):
        return inner, getattr(model, "tokenizer", None), dict(getattr(model, "manifest", {}) or {})
    raise TypeError(f"a model must be an nn.Module or a minidiff Variant, got {type(model).__name__}")


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def make_forward(model: nn.Module, keep: torch.Tensor | None) -> Callable[..., Any]:
    """``forward(model, batch, **kw)`` for :func:`capture_stream`: ``input_ids`` only,
    and only the logits of positions ``keep`` (a 1-D index tensor) where the model
    supports transformers' ``logits_to_keep``."""
    hf = _accepts(model, "input_ids")
    extra: dict[str, Any] = {"logits_to_keep": keep} if keep is not None and _accepts(model, "logits_to_keep") else {}
    if _accepts(model, "use_cache"):
        extra["use_cache"] = False  # one pass per window: a KV cache is only copying

    def forward(m: nn.Module, batch: Any, **kw: Any) -> Any:
        x = batch["input_ids"]
        if hf:
            return m(input_ids=x, **extra, **kw)
        if kw:  # plain modules have no hidden_states switch
            raise ValueError(f"{type(m).__name__} is not a transformers model; name the layers to capture "
                             "(layers=[...module names...]) or pass cka=False")
        return m(x)
    return forward


# -- results --------------------------------------------------------------------------

@dataclass
class LMVariantResult:
    """One variant against the base."""

    name: str
    divergence: dict[str, Any]
    cka: list[list[float]] | None = None
    layers_base: list[str] = field(default_factory=list)
    layers_variant: list[str] = field(default_factory=list)
    where_it_hurts: list[dict[str, Any]] = field(default_factory=list)
    flipped_tokens: list[dict[str, Any]] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict)


@dataclass
class LMStudyResult:
    """What :meth:`LMStudy.run` returns: ``variants[name].divergence`` etc. as plain data
    (``to_dict``); :meth:`to_results` is the :class:`minidiff.Results` that is saved."""

    study: dict[str, Any]
    variants: dict[str, LMVariantResult]
    timing: dict[str, float] = field(default_factory=dict)
    #: the ``layer_swap`` section (JSON form, :mod:`minidiff.results.swap`) when the study asked for it
    layer_swap: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        extra = {"layer_swap": self.layer_swap} if self.layer_swap is not None else {}
        return _jsonable({"schema": "minidiff.lm-study/1", "study": self.study,
                          "variants": {k: asdict(v) for k, v in self.variants.items()}, "timing": self.timing,
                          **extra})

    def table(self) -> str:
        """The llama.cpp-style terminal statistics of every variant."""
        from minidiff.report.lm import terminal_table

        return terminal_table(self.to_dict())

    def to_results(self) -> Any:
        """This result as a :class:`minidiff.Results`: the ``language_model`` section (one
        entry per variant), the ``layer_swap`` section when the study ran layer swaps, the
        verdicts of every registered rule (the ``language_model`` column decides from KLD
        and same top-1) and the timing; ``save(out)`` writes
        ``results.json`` (schema ``minidiff.results/2``), the CSV tables and ``report.html``."""
        from minidiff import __version__
        from minidiff.results import Results, decide_all
        from minidiff.results.lm import LanguageModelSection

        data = _from_json_form(self.to_dict())
        for v in data["variants"].values():
            if v.get("cka") is None:
                v["skipped"] = {"cka": "token-level CKA was not measured (cka=False, or the base-file mode, where "
                                       "the two models never run together)"}
        section = LanguageModelSection({"study": data["study"], "variants": data["variants"]})
        sections: dict[str, Any] = {"language_model": section}
        if self.layer_swap is not None:
            sections["layer_swap"] = data["layer_swap"]
        st = self.study
        return Results(
            study={"name": st.get("name") or "language-model study", "seed": 0, "minidiff_version": __version__,
                   "data": {"name": "text", "kind": "language-model", "num_eval": st.get("scored_tokens"),
                            "has_labels": True, "meta": {k: st.get(k) for k in ("task", "n_ctx", "n_windows",
                                                                                 "scored_per_window", "mode")}},
                   "notes": [f"scoring: {st.get('scoring', '')}"]},
            variants=list(self.variants),
            verdicts={v: decide_all(v, {"language_model": section.entry(v)}) for v in self.variants},
            sections=sections, timing=self.timing)


def _from_json_form(x: Any) -> Any:
    """:meth:`LMStudyResult.to_dict` back to numbers: ``"inf"`` strings to floats (``None``,
    a NaN, is left for :class:`minidiff.Results` to mark as not computed)."""
    if isinstance(x, Mapping):
        return {k: _from_json_form(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_from_json_form(v) for v in x]
    if x in ("inf", "-inf"):
        return float(x)
    return x


def _jsonable(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return _jsonable(x.detach().cpu().tolist())
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, Mapping):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "to_dict") and callable(x.to_dict):
        return _jsonable(x.to_dict())
    if hasattr(x, "__dataclass_fields__"):
        return _jsonable(asdict(x))
    return x


# -- base file --------------------------------------------------------------------------

def quantize_logprobs(logits: torch.Tensor, range_nats: float = DEFAULT_RANGE) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of logits -> ``(codes uint16 as int32 (rows, V), row max log-prob float32 (rows,))``
    (see the module docstring: step ``range_nats / 65535``, floor ``max - range_nats``)."""
    lp = torch.log_softmax(logits.double(), dim=-1)
    m = lp.amax(dim=-1).float()
    step = range_nats / _U16
    codes = torch.round((lp - (m.double()[:, None] - range_nats)) / step).clamp_(0, _U16).to(torch.int32)
    return codes, m


def dequantize_logprobs(codes: torch.Tensor, row_max: torch.Tensor, range_nats: float = DEFAULT_RANGE) -> torch.Tensor:
    """Inverse of :func:`quantize_logprobs` (float32 log-probabilities, up to the rounding)."""
    step = range_nats / _U16
    return (row_max.double()[:, None] - range_nats + codes.double() * step).float()


def base_file_error_bound(base_logits: torch.Tensor, variant_logits: torch.Tensor,
                          range_nats: float = DEFAULT_RANGE) -> torch.Tensor:
    """Per-token bound on ``|KLD(base file) - KLD(exact)|`` from the module docstring:
    ``eta + (exp(eta) - 1) * sum_v p_v |log p_v - log q_v|``, ``eta = range_nats / 65535``,
    plus ``V exp(-range_nats) * (1 + max|log p - log q|)`` for the entries raised to the floor."""
    a = torch.log_softmax(base_logits.double(), -1)
    b = torch.log_softmax(variant_logits.double(), -1)
    eta = range_nats / _U16
    d = (a - b).abs()
    finite = torch.where(torch.isfinite(d), d, torch.zeros_like(d))
    bound = eta + math.expm1(eta) * (a.exp() * finite).sum(-1)
    low = (a < a.amax(-1, keepdim=True) - range_nats).sum(-1).double()
    return bound + low * math.exp(-range_nats) * (1 + finite.amax(-1) + range_nats)


class BaseLogprobFile:
    """Per-scored-token base log-probabilities on disk (uint16 codes + float32 row maxima).

    Rows are in window order, ``n_scored`` rows per window. Files: ``codes.u16``
    (``rows x V``), ``rowmax.f32`` (``rows``) and ``meta.json``.
    """

    def __init__(self, folder: str | os.PathLike, vocab: int, rows: int, range_nats: float, meta: dict[str, Any],
                 mode: str = "r") -> None:
        self.folder = Path(folder)
        self.vocab, self.rows, self.range_nats = int(vocab), int(rows), float(range_nats)
        self.meta = meta
        self.folder.mkdir(parents=True, exist_ok=True)
        mm = "w+" if mode == "w" else "r"
        self.codes = np.memmap(self.folder / "codes.u16", dtype=np.uint16, mode=mm, shape=(self.rows, self.vocab))
        self.rowmax = np.memmap(self.folder / "rowmax.f32", dtype=np.float32, mode=mm, shape=(self.rows,))

    @classmethod
    def create(cls, folder: str | os.PathLike, vocab: int, rows: int, range_nats: float,
               meta: dict[str, Any]) -> "BaseLogprobFile":
        if not (range_nats > 0):
            raise ValueError(f"base_file_range must be a positive number of nats, got {range_nats}")
        return cls(folder, vocab, rows, range_nats, meta, mode="w")

    @classmethod
    def open(cls, folder: str | os.PathLike) -> "BaseLogprobFile":
        meta = json.loads((Path(folder) / "meta.json").read_text())
        return cls(folder, meta["vocab"], meta["rows"], meta["range_nats"], meta)

    def write(self, row0: int, logits: torch.Tensor) -> None:
        codes, m = quantize_logprobs(logits, self.range_nats)
        self.codes[row0:row0 + codes.shape[0]] = codes.cpu().numpy().astype(np.uint16)
        self.rowmax[row0:row0 + codes.shape[0]] = m.cpu().numpy()

    def finish(self) -> None:
        self.codes.flush()
        self.rowmax.flush()
        (self.folder / "meta.json").write_text(json.dumps({**self.meta, "vocab": self.vocab, "rows": self.rows,
                                                           "range_nats": self.range_nats}))

    def read(self, row0: int, row1: int) -> torch.Tensor:
        codes = torch.from_numpy(np.asarray(self.codes[row0:row1]).astype(np.int32))
        m = torch.from_numpy(np.asarray(self.rowmax[row0:row1]).copy())
        return dequantize_logprobs(codes, m, self.range_nats)

    @property
    def nbytes(self) -> int:
        return self.rows * (2 * self.vocab + 4)


# -- the study --------------------------------------------------------------------------

class LMStudy:
    """A base language model against compressed variants on one text.

    Parameters
    ----------
    base : nn.Module or Variant
        A transformers causal / masked LM, or any module mapping ``input_ids
        (batch, seq)`` to logits ``(batch, seq, V)`` (a tensor or an object with
        ``.logits``).
    variants : dict name -> nn.Module or Variant
        The compressed versions (same tokenizer, same vocabulary).
    text : str, list of str, or token ids
        What is scored (list entries are joined by blank lines); see
        :func:`minidiff.lm.windows.load_text` for files and built-in corpora.
    tokenizer
        The models' tokenizer (default: ``base.tokenizer``). Required for text;
        variants' own tokenizers (``Variant.tokenizer`` or ``tokenizers=``) must
        equal it (:func:`minidiff.lm.windows.check_same_tokenizer`).
    n_ctx, batch_size
        Window length; windows per forward pass (masked LMs: sequences per pass,
        each window costing one sequence per scored token).
    task : ``"causal-lm"`` or ``"masked-lm"``.
    layers
        Layers for token-level CKA: ``"hidden_states"`` (default for transformers
        models), module names / patterns (one list for all models, or a dict per
        model name), or ``None`` / ``cka=False`` for none.
    max_windows : keep only the first this many windows (0: all).
    base_file
        A folder: run in base-file mode (see the module docstring).
    explain_windows, explain_top_k
        How many highest-KLD windows per variant are decoded for the report,
        and how many candidates of each model are shown per token.
    dist : DistContext, optional
        Default: from the environment (``torchrun``), else one process.
    name, meta
        The study's name and extra JSON-able facts recorded in ``result.study``.
    seed : int
        Seeds the sample of windows the layer swaps run on.
    layer_swap : LayerSwapConfig, dict or bool, optional
        Run :meth:`run_layer_swap` after the divergence pass (``True``: the defaults;
        a dict: ``granularity``, ``direction``, ``examples`` windows, validated as a study
        file's ``[metrics.layer_swap]``). None or False: not run.
    cache : str, path or StudyCache, optional
        Where layer-swap entries are kept (``layer_swap/<key>.json``), so a rerun only runs
        the variants not done yet. None: nothing is cached.
    """

    def __init__(self, base: Any, variants: Mapping[str, Any], *, text: Any = None, tokenizer: Any = None,
                 tokenizers: Mapping[str, Any] | None = None, n_ctx: int = 512, batch_size: int = 4,
                 task: str = "causal-lm", layers: Any = "hidden_states", cka: bool = True, max_windows: int = 0,
                 add_bos: bool | None = None, base_file: str | os.PathLike | None = None,
                 base_file_range: float = DEFAULT_RANGE, explain_windows: int = 4, explain_top_k: int = 3,
                 max_flipped: int = 24, accumulator_options: Mapping[str, Any] | None = None,
                 dist: Any = None, progress: bool = False, name: str = "language-model study",
                 meta: Mapping[str, Any] | None = None, seed: int = 0, layer_swap: Any = None,
                 cache: Any = None) -> None:
        if not isinstance(variants, Mapping) or not variants:
            raise ValueError("variants must be a non-empty dict name -> model")
        if "base" in variants:
            raise ValueError("'base' is reserved for the base model; rename that variant")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.base, base_tok, self.base_manifest = _unwrap(base)
        self.variants: dict[str, nn.Module] = {}
        self.manifests: dict[str, dict[str, Any]] = {}
        toks: dict[str, Any] = {"base": tokenizer if tokenizer is not None else base_tok}
        for k, v in variants.items():
            self.variants[str(k)], vt, self.manifests[str(k)] = _unwrap(v)
            toks[str(k)] = (tokenizers or {}).get(k, vt)
        self.tokenizer = toks["base"] if toks["base"] is not None else next(
            (t for t in toks.values() if t is not None), None)
        check_same_tokenizer(toks)
        self.task, self.n_ctx, self.batch_size = task, int(n_ctx), int(batch_size)
        self.max_windows, self.add_bos = int(max_windows), add_bos
        if isinstance(text, (list, tuple)) and text and all(isinstance(t, str) for t in text):
            text = "\n\n".join(text)
        if text is None:
            raise ValueError("text is required: a string, a list of strings or token ids "
                             "(minidiff.lm.windows.load_text reads files and built-in corpora)")
        self.text = text
        self.layers = layers if cka else None
        self.base_file = Path(base_file) if base_file is not None else None
        self.base_file_range = float(base_file_range)
        self.explain_windows, self.explain_top_k, self.max_flipped = explain_windows, explain_top_k, max_flipped
        self.accumulator_options = dict(accumulator_options or {})
        self.dist, self.progress, self.name, self.meta = dist, progress, name, dict(meta or {})
        self.seed = int(seed)
        self.layer_swap = _swap_config(layer_swap)
        self.cache = _study_cache(cache)
        self._windows: TokenWindows | None = None
        self._best: dict[str, dict[int, float]] = {}  # variant -> window -> mean KLD (explained windows)
        self._details: dict[str, dict[int, dict[str, Any]]] = {}

    # -- data --------------------------------------------------------------------
    @property
    def windows(self) -> TokenWindows:
        if self._windows is None:
            self._windows = make_windows(self.text, self.n_ctx, tokenizer=self.tokenizer, task=self.task,
                                         add_bos=self.add_bos, max_windows=self.max_windows)
        return self._windows

    def _batch_windows(self) -> int:
        if self.task == "masked-lm":
            return max(1, self.batch_size // self.windows.n_scored)
        return self.batch_size

    def _inputs(self, lo: int, hi: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Model batch for windows [lo, hi) and the flat row index of every scored token
        in a ``(sequences * n_ctx)`` layout."""
        w = self.windows
        if self.task == "masked-lm":
            x, pos = w.masked_copies(lo, hi)
            rows = torch.arange(x.shape[0]) * w.n_ctx + pos
        else:
            x = w.input_ids[lo:hi]
            rows = (torch.arange(hi - lo)[:, None] * w.n_ctx + w.logit_positions[None, :]).reshape(-1)
        return {"input_ids": x, "example_id": torch.arange(lo, hi)}, rows

    def _scored_logits(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Scored rows ``(tokens, V)`` out of ``(sequences, positions, V)`` logits: every
        position, or (causal transformers models) only the scored ones, already in order."""
        if logits.ndim != 3:
            raise ValueError(f"a language model must return logits (batch, seq, vocab), got shape {tuple(logits.shape)}")
        seqs, kept, vocab = logits.shape
        if self.task == "causal-lm" and kept == self.windows.n_scored:  # logits_to_keep = logit_positions
            return logits.reshape(-1, vocab)
        if kept != self.n_ctx:
            raise ValueError(f"the model returned logits for {kept} positions of a {self.n_ctx}-token window; "
                             "return every position")
        return logits[(rows // self.n_ctx).to(logits.device), (rows % self.n_ctx).to(logits.device)]

    def _row_meta(self, lo: int, hi: int) -> dict[str, torch.Tensor]:
        w = self.windows
        targets = w.targets[lo:hi].reshape(-1)
        return {"targets": targets,
                "window_ids": torch.arange(lo, hi).repeat_interleave(w.n_scored),
                "positions": w.target_positions.repeat(hi - lo),
                "token_frequency": w.token_frequency[targets]}

    def _keep(self) -> torch.Tensor | None:
        return self.windows.logit_positions if self.task == "causal-lm" else None

    def _new_divergence(self) -> Any:
        from minidiff.lm import TokenDivergenceAccumulator

        return TokenDivergenceAccumulator(**self.accumulator_options)

    def _update(self, variant: str, acc: Any, base_logits: torch.Tensor, var_logits: torch.Tensor,
                meta: Mapping[str, torch.Tensor], lo: int) -> None:
        dev = base_logits.device
        var_logits = var_logits.to(dev)
        n0 = int(acc.windows.shape[0])
        acc.update(base_logits, var_logits, meta["targets"].to(dev), window_ids=meta["window_ids"],
                   positions=meta["positions"], token_frequency=meta["token_frequency"])
        if self.explain_windows:
            self._track(variant, acc.windows[n0:], base_logits, var_logits, acc.last_batch_stats, lo)

    def _track(self, variant: str, new_rows: torch.Tensor, base_logits: torch.Tensor, var_logits: torch.Tensor,
               stats: Mapping[str, torch.Tensor], lo: int) -> None:
        """Keep the token details of the ``explain_windows`` highest-mean-KLD windows seen so
        far, taken from the logits already in memory (no second forward pass). The window
        means come from the accumulator's per-window sums (one row per window per update)."""
        from .accumulator import _WINDOW_COLS

        iw, i_n, ik = (_WINDOW_COLS.index(c) for c in ("window_id", "n", "kld"))
        best = self._best.setdefault(variant, {})
        details = self._details.setdefault(variant, {})
        s = self.windows.n_scored
        for row in new_rows.detach().cpu().tolist():
            wid, mean = int(row[iw]), row[ik] / row[i_n]
            if len(best) >= self.explain_windows:
                worst = min(best, key=lambda k: (best[k], -k))
                if (mean, -wid) <= (best[worst], -worst):
                    continue
                del best[worst]
                details.pop(worst, None)
            best[wid] = mean
            r = slice((wid - lo) * s, (wid - lo + 1) * s)
            details[wid] = self._detail(base_logits[r], var_logits[r], {k: v[r] for k, v in stats.items()})

    def _detail(self, base_logits: torch.Tensor, var_logits: torch.Tensor, d: Mapping[str, torch.Tensor]
                ) -> dict[str, Any]:
        """Per scored token of one window: KLD, both models' p(correct), flip (from the
        accumulator's per-token statistics ``d`` of these rows), top-k candidates."""
        k = min(self.explain_top_k, base_logits.shape[-1])
        tb = base_logits.float().softmax(-1).topk(k, -1)
        tv = var_logits.float().softmax(-1).topk(k, -1)
        return {"kld": d["kld"].cpu().tolist(), "p_base": d["p_base"].cpu().tolist(),
                "p_variant": d["p_variant"].cpu().tolist(),
                "flipped": (d["top1_base"] != d["top1_variant"]).cpu().tolist(),
                "base_top": (tb.indices.cpu().tolist(), tb.values.cpu().tolist()),
                "variant_top": (tv.indices.cpu().tolist(), tv.values.cpu().tolist())}

    # -- streaming ---------------------------------------------------------------
    def stream(self, start: int = 0, stop: int | None = None) -> dict[str, dict[str, Any]]:
        """Run windows ``[start, stop)`` through every model; returns per variant
        ``{"divergence": accumulator, "cka": CKAAccumulator or None, "layers": (a, b)}``
        (unsynchronised: one shard's part)."""
        from minidiff.models.capture import capture_stream, eval_mode

        w = self.windows
        stop = w.n_windows if stop is None else stop
        names = ["base", *self.variants]
        models = {"base": self.base, **self.variants}
        keep = self._keep()
        forwards = {n: make_forward(m, keep) for n, m in models.items()}
        out = {v: {"divergence": self._new_divergence(), "cka": None, "layers": ([], [])} for v in self.variants}
        ranges = list(w.batches(self._batch_windows(), start, stop))
        metas: list[dict[str, torch.Tensor]] = []
        rows_of: list[torch.Tensor] = []

        def batches() -> Iterator[dict[str, torch.Tensor]]:
            for lo, hi in ranges:
                b, rows = self._inputs(lo, hi)
                metas.append(self._row_meta(lo, hi))
                rows_of.append(rows)
                yield b

        def consume_logits(step: int, outputs: Mapping[str, Any]) -> None:
            base_l = self._scored_logits(logits_of(outputs["base"]), rows_of[step])
            vocab = base_l.shape[-1]
            for v in self.variants:
                vl = self._scored_logits(logits_of(outputs[v]), rows_of[step])
                if vl.shape[-1] != vocab:
                    raise ValueError(f"variant {v!r} has a vocabulary of {vl.shape[-1]} logits, the base {vocab}; "
                                     "token-level divergence needs one vocabulary")
                self._update(v, out[v]["divergence"], base_l, vl, metas[step], ranges[step][0])

        if self.layers is None:
            import contextlib

            with torch.no_grad(), contextlib.ExitStack() as stack:
                for m in models.values():
                    stack.enter_context(eval_mode(m))
                for step, b in enumerate(batches()):
                    consume_logits(step, {n: forwards[n](models[n], _to(b, models[n])) for n in names})
            return out

        from minidiff.similarity import CKAAccumulator

        def consumer(sb: Any) -> None:
            consume_logits(sb.index, sb.outputs)
            rows = rows_of[sb.index]
            fb = [t[rows.to(t.device)] for t in sb.features["base"].values()]
            for v in self.variants:
                fv = [t[rows.to(t.device)] for t in sb.features[v].values()]
                if out[v]["cka"] is None:
                    out[v]["cka"] = CKAAccumulator([t.shape[1] for t in fb], [t.shape[1] for t in fv],
                                                   names_a=list(sb.features["base"]), names_b=list(sb.features[v]))
                    out[v]["layers"] = (list(sb.features["base"]), list(sb.features[v]))
                out[v]["cka"].update(fb, fv)
        consumer.wants_batch = True  # type: ignore[attr-defined]
        capture_stream(models, batches(), layers=self.layers, token_mode="tokens", consumers=[consumer],
                       forward=forwards, progress=self.progress)
        return out

    def write_base_file(self, start: int = 0, stop: int | None = None, folder: Path | None = None) -> BaseLogprobFile:
        """Base pass of base-file mode: scored log-probabilities of windows ``[start, stop)``."""
        from minidiff.models.capture import eval_mode

        w = self.windows
        stop = w.n_windows if stop is None else stop
        fwd = make_forward(self.base, self._keep())
        bf: BaseLogprobFile | None = None
        with torch.no_grad(), eval_mode(self.base):
            for lo, hi in w.batches(self._batch_windows(), start, stop):
                b, rows = self._inputs(lo, hi)
                lg = self._scored_logits(logits_of(fwd(self.base, _to(b, self.base))), rows)
                if bf is None:
                    bf = BaseLogprobFile.create(folder or self.base_file, lg.shape[-1], (stop - start) * w.n_scored,
                                                self.base_file_range,
                                                {"windows": w.fingerprint(), "start": start, "stop": stop,
                                                 "n_scored": w.n_scored})
                bf.write((lo - start) * w.n_scored, lg)
        assert bf is not None
        bf.finish()
        return bf

    def stream_from_base_file(self, bf: BaseLogprobFile, start: int = 0, stop: int | None = None
                              ) -> dict[str, dict[str, Any]]:
        """Variant passes of base-file mode, one model at a time."""
        from minidiff.models.capture import eval_mode

        w = self.windows
        stop = w.n_windows if stop is None else stop
        if bf.meta.get("windows") != w.fingerprint() or bf.meta.get("start") != start:
            raise ValueError(f"base file {bf.folder} was written for other windows; delete it or point base_file "
                             "at a new folder")
        out = {v: {"divergence": self._new_divergence(), "cka": None, "layers": ([], [])} for v in self.variants}
        for v, model in self.variants.items():
            fwd = make_forward(model, self._keep())
            with torch.no_grad(), eval_mode(model):
                for lo, hi in w.batches(self._batch_windows(), start, stop):
                    b, rows = self._inputs(lo, hi)
                    vl = self._scored_logits(logits_of(fwd(model, _to(b, model))), rows)
                    base_l = bf.read((lo - start) * w.n_scored, (hi - start) * w.n_scored).to(vl.device)
                    if base_l.shape[-1] != vl.shape[-1]:
                        raise ValueError(f"variant {v!r} has {vl.shape[-1]} logits, the base file {base_l.shape[-1]}")
                    self._update(v, out[v]["divergence"], base_l, vl, self._row_meta(lo, hi), lo)
        return out

    # -- layer swaps ---------------------------------------------------------------
    def swap_batches(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        """The windows ``indices`` as the study feeds them to its models: batches of
        :meth:`_batch_windows` windows, ``{"input_ids": (sequences, n_ctx)}`` (masked LMs:
        each window's masked copies, window-major). No padding, so no attention mask."""
        w = self.windows
        bw = self._batch_windows()
        out = []
        for s in range(0, len(indices), bw):
            ids = [int(i) for i in indices[s:s + bw]]
            if self.task == "masked-lm":
                x = torch.cat([w.masked_copies(i, i + 1)[0] for i in ids])
            else:
                x = w.input_ids[torch.tensor(ids)]
            out.append({"input_ids": x})
        return out

    def swap_forward(self) -> Callable[[nn.Module, Any], torch.Tensor]:
        """``forward(model, batch) -> (sequences, scored, V)`` logits of the study's scored
        tokens only (causal: positions ``logit_positions``, asked with ``logits_to_keep``
        where the model takes it; masked: each copy's masked position, ``scored = 1``),
        for :func:`minidiff.localize.layer_swap`."""
        w = self.windows
        keep = self._keep()
        made: dict[int, Callable[..., Any]] = {}

        def forward(m: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
            fwd = made.get(id(m))
            if fwd is None:  # the host of a swap is the base or the variant: one forward each
                fwd = made[id(m)] = make_forward(m, keep)
            n = int(batch["input_ids"].shape[0])
            if self.task == "masked-lm":
                rows = torch.arange(n) * w.n_ctx + w.target_positions.repeat(n // w.n_scored)
            else:
                rows = (torch.arange(n)[:, None] * w.n_ctx + w.logit_positions[None, :]).reshape(-1)
            lg = self._scored_logits(logits_of(fwd(m, batch)), rows)
            return lg.reshape(n, -1, lg.shape[-1])
        return forward

    def run_layer_swap(self) -> dict[str, dict[str, Any]] | None:
        """The ``layer_swap`` section (JSON form) when the study asked for it, else None.

        One entry per variant: :func:`minidiff.localize.layer_swap` of the base and the
        variant on :func:`~minidiff.study.swap.swap_subset` (``examples`` windows, seeded
        by ``seed``) in :meth:`swap_batches`, scored by :meth:`swap_forward`; run by
        :func:`minidiff.study.swap.run_swap_jobs` (the cost is logged before any swap runs;
        a variant in ONNX Runtime or llama.cpp, of another architecture, or in base-file
        mode is left out with its reason; entries cached in ``cache``).
        """
        cfg = self.layer_swap
        if cfg is None:
            return None
        from minidiff.study.swap import SwapJob, run_swap_jobs, swap_subset

        w = self.windows
        indices = swap_subset(w.n_windows, cfg.examples, self.seed)
        cache = self.cache
        keys = {n: _model_key(m) if cache is not None else "" for n, m in {"base": self.base, **self.variants}.items()}
        skip = ("base-file mode: the base and a variant never run together here (they need not fit on the "
                "device together), and a layer swap runs both" if self.base_file is not None else None)
        jobs = [SwapJob(v, ["base", v], self.base, m, (keys["base"], keys[v]),
                        functools.partial(self.swap_batches, indices), self.swap_forward(), skip)
                for v, m in self.variants.items()]
        return run_swap_jobs(jobs, cfg, indices, data_key=w.fingerprint() if cache is not None else None,
                             settings={"batch_size": self._batch_windows(), "scored": f"{self.task} scored tokens"},
                             cache=cache, progress=self.progress, what="window(s)")

    # -- run -----------------------------------------------------------------------
    def run(self, out: str | os.PathLike | None = None, *, overwrite: bool = False) -> LMStudyResult:
        """Stream this rank's windows, merge across ranks, explain the worst windows,
        and (rank 0, with ``out``) save :meth:`LMStudyResult.to_results` there
        (``results.json``, CSV tables, ``report.html``; ``overwrite`` as in
        :meth:`minidiff.Results.save`)."""
        from minidiff.distributed import DistContext

        ctx = self.dist if self.dist is not None else DistContext.from_env()
        if self.layer_swap is not None:  # a wrong layer name fails before any model runs
            from minidiff.study.swap import swap_layers
            swap_layers(self.base, self.layer_swap.granularity)
        t0 = time.perf_counter()
        w = self.windows
        t_tok = time.perf_counter() - t0
        start, stop = ctx.shard_range(w.n_windows, align=self._batch_windows())
        self._best, self._details = {}, {}
        t1 = time.perf_counter()
        if self.base_file is not None:
            folder = self.base_file if ctx.world_size == 1 else self.base_file / f"rank{ctx.rank}"
            bf = self.write_base_file(start, stop, folder) if stop > start else None
            parts = self.stream_from_base_file(bf, start, stop) if bf is not None else \
                {v: {"divergence": self._new_divergence(), "cka": None, "layers": ([], [])} for v in self.variants}
        else:
            parts = self.stream(start, stop)
        t_stream = time.perf_counter() - t1
        variants: dict[str, LMVariantResult] = {}
        for v, part in parts.items():
            acc = ctx.sync(part["divergence"])
            cka = None
            if part["cka"] is not None:
                cka = ctx.sync(part["cka"]).compute().tolist()
            res = acc.compute()
            variants[v] = LMVariantResult(name=v, divergence=_jsonable(res), cka=cka,
                                          layers_base=part["layers"][0], layers_variant=part["layers"][1],
                                          manifest=_jsonable(self.manifests.get(v, {})))
        t2 = time.perf_counter()
        if ctx.is_main:
            for v in variants:
                variants[v].where_it_hurts, variants[v].flipped_tokens = self.explain(v, variants[v].divergence)
        t_explain = time.perf_counter() - t2
        timing = {"tokenize_s": t_tok, "stream_s": t_stream, "explain_s": t_explain}
        swap = None
        if ctx.is_main and self.layer_swap is not None:  # rank 0 swaps and writes
            t3 = time.perf_counter()
            swap = self.run_layer_swap()
            timing["layer_swap_s"] = time.perf_counter() - t3
        result = LMStudyResult(study=self.describe(), variants=variants,
                               timing={**timing, "total_s": time.perf_counter() - t0}, layer_swap=swap)
        if out is not None and ctx.is_main:
            write_lm_output(out, result, overwrite=overwrite)
        return result

    def describe(self) -> dict[str, Any]:
        w = self.windows
        tok = self.tokenizer
        return {"name": self.name, "task": self.task, "n_ctx": w.n_ctx, "n_windows": w.n_windows,
                "scored_per_window": w.n_scored, "scored_tokens": w.n_windows * w.n_scored,
                "text_tokens": w.n_text_tokens, "add_bos": w.meta["add_bos"], "first": w.first,
                "tokenizer": type(tok).__name__ if tok is not None else None,
                "vocab_size": int(w.token_frequency.numel()), "base": type(self.base).__name__,
                "base_manifest": _jsonable(self.base_manifest), "variants": list(self.variants),
                "mode": "base-file" if self.base_file is not None else "same-batch",
                "base_file_range": self.base_file_range if self.base_file is not None else None,
                "cka": self.layers is not None and self.base_file is None,
                "scoring": ("llama.cpp perplexity rule: windows of n_ctx tokens, BOS substituted into position 0 "
                            "when the tokenizer adds BOS, logits at positions n_ctx/2 .. n_ctx-2 scored"
                            if self.task == "causal-lm" else
                            "pseudo-log-likelihood: [CLS] window [SEP], each scored token masked in its own copy"),
                **_jsonable(self.meta)}

    # -- where it hurts ------------------------------------------------------------
    def _token_text(self, ids: list[int]) -> list[str]:
        tok = self.tokenizer
        if tok is None:
            return [f"<{i}>" for i in ids]
        return [tok.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False) for i in ids]

    def _window_logits(self, model: nn.Module, lo: int, hi: int) -> torch.Tensor:
        from minidiff.models.capture import eval_mode

        b, rows = self._inputs(lo, hi)
        with torch.no_grad(), eval_mode(model):
            return self._scored_logits(logits_of(make_forward(model, self._keep())(model, _to(b, model))), rows)

    def explain(self, variant: str, divergence: Mapping[str, Any]) -> tuple[list[dict], list[dict]]:
        """Decode the highest-KLD windows and the flipped tokens of ``variant`` for the report.

        Windows come from the accumulator's bounded top-window list; their token
        details (every scored token's KLD, both models' probability of the correct
        token and their top ``explain_top_k`` candidates) were kept while streaming
        (:meth:`_track`); a window another rank scored is rerun through both models. Flipped
        tokens come from the accumulator's bounded list (the first ``max_flips``
        in text order); the ``max_flipped`` with the largest KLD among them are
        decoded with the text around them.
        """
        w = self.windows
        top = [int(t["window_id"]) for t in divergence.get("top_windows") or []][: self.explain_windows]
        windows_out = []
        scored = {int(p): j for j, p in enumerate(w.target_positions.tolist())}
        cached = self._details.get(variant, {})
        bf = None
        for wid in top:
            det = cached.get(wid)
            if det is None:  # scored on another rank: run both models on this one window
                model = self.variants[variant]
                vl = self._window_logits(model, wid, wid + 1)
                if self.base_file is not None and bf is None and (self.base_file / "meta.json").is_file():
                    bf = BaseLogprobFile.open(self.base_file)
                if bf is not None and bf.meta.get("start") == 0:
                    bl = bf.read(wid * w.n_scored, (wid + 1) * w.n_scored).to(vl.device)
                else:
                    bl = self._window_logits(self.base, wid, wid + 1).to(vl.device)
                from .divergence import token_divergence

                det = self._detail(bl, vl, token_divergence(bl, vl.to(bl.dtype), w.targets[wid].to(vl.device)))
            ids = w.input_ids[wid].tolist()
            text = self._token_text(ids)
            tokens = []
            for pos, (tid, s) in enumerate(zip(ids, text)):
                entry: dict[str, Any] = {"text": s, "id": tid, "scored": pos in scored}
                if pos in scored:
                    j = scored[pos]
                    entry.update(kld=det["kld"][j], p_base=det["p_base"][j], p_variant=det["p_variant"][j],
                                 flipped=bool(det["flipped"][j]),
                                 base_top=self._candidates(det["base_top"][0][j], det["base_top"][1][j]),
                                 variant_top=self._candidates(det["variant_top"][0][j], det["variant_top"][1][j]))
                tokens.append(entry)
            windows_out.append({"window": wid, "mean_kld": sum(det["kld"]) / len(det["kld"]),
                                "flips": int(sum(det["flipped"])), "tokens": tokens})
        flips_out = []
        kept = sorted(divergence.get("flips") or [], key=lambda f: -float(f.get("kld") or 0.0))
        for f in kept[: self.max_flipped]:
            wid, pos = int(f["window_id"]), int(f["position"])
            if not 0 <= wid < w.n_windows or not 0 <= pos < w.n_ctx:
                continue
            ids = w.input_ids[wid].tolist()
            lo_ctx = max(0, pos - 16)
            flips_out.append({"window": wid, "position": pos,
                              "context": "".join(self._token_text(ids[lo_ctx:pos])),
                              "target": self._token_text([ids[pos]])[0],
                              "after": "".join(self._token_text(ids[pos + 1:pos + 4])),
                              "kld": f.get("kld"),
                              "base_top": [[self._token_text([int(i)])[0], float(p)] for i, p in f["base_top3"]],
                              "variant_top": [[self._token_text([int(i)])[0], float(p)]
                                              for i, p in f["variant_top3"]]})
        return windows_out, flips_out

    def _candidates(self, ids: list[int], probs: list[float]) -> list[list[Any]]:
        return [[t, float(p)] for t, p in zip(self._token_text([int(i) for i in ids]), probs)]


def _swap_config(value: Any) -> Any:
    """``layer_swap=`` as a :class:`~minidiff.study.config.LayerSwapConfig` (or None), by the
    study file's rule for ``[metrics] layer_swap``."""
    from pydantic import TypeAdapter, ValidationError

    from minidiff.study.swap import LayerSwapConfig, LayerSwapSetting
    from minidiff.validation import format_validation_error

    if value is None or isinstance(value, LayerSwapConfig):
        return value
    if not isinstance(value, (bool, Mapping)):
        raise TypeError(f"layer_swap must be a LayerSwapConfig, a dict of its keys (granularity, direction, "
                        f"examples) or a bool, got {type(value).__name__}")
    try:  # the study file's type, so the same rule: true = the defaults, false = off
        return TypeAdapter(LayerSwapSetting).validate_python(value if isinstance(value, bool) else dict(value))
    except ValidationError as e:
        raise ValueError(format_validation_error(e, "layer_swap")) from None


def _study_cache(cache: Any) -> Any:
    from minidiff.study.cache import StudyCache

    if cache is None or isinstance(cache, StudyCache):
        return cache
    if not isinstance(cache, (str, os.PathLike)):
        raise TypeError(f"cache must be a folder (str or path) or a StudyCache, got {type(cache).__name__}")
    return StudyCache(cache)


def _model_key(model: nn.Module) -> str:
    """The model's exact fingerprint (a cache key), or ``"unhashable"`` (never cached)."""
    from minidiff.models.fingerprint import UnhashableModelError
    from minidiff.study.cache import hash_module

    try:
        return hash_module(model)
    except UnhashableModelError:
        return "unhashable"


def _to(batch: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    from minidiff.models.capture import _device_of, model_inputs, to_device

    return to_device(model_inputs(batch), _device_of(model))


def write_lm_output(out: str | os.PathLike, result: LMStudyResult, *, overwrite: bool = False) -> Path:
    """Save ``result`` through :class:`minidiff.Results`: ``out/results.json`` (schema
    ``minidiff.results/2``, section ``language_model``), the CSV tables (``language_model.csv``,
    ``lm_<variant>.csv`` statistics, ``lm_<variant>_buckets.csv``) and ``out/report.html``."""
    out = Path(out)
    result.to_results().save(out, overwrite=overwrite)
    return out


def run_lm_study(base: Any, variants: Mapping[str, Any], *, text: Any, out: str | os.PathLike | None = None,
                 overwrite: bool = False, **options: Any) -> LMStudyResult:
    """``LMStudy(base, variants, text=text, **options).run(out, overwrite=overwrite)``."""
    return LMStudy(base, variants, text=text, **options).run(out, overwrite=overwrite)
