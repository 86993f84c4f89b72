"""Activation capture: per-layer representations, streamed batch by batch.

A layer is either a module name (``"encoder.layer.3"``; glob patterns such as
``"encoder.layer.*"`` expand in module order) or, with ``layers="hidden_states"``,
the model's own ``output_hidden_states`` (named ``"hidden_states.0"`` ... ``"hidden_states.L"``).
Module outputs may be tensors, tuples or ``ModelOutput`` objects: the first tensor is taken.

Each layer's output becomes a 2-D ``(samples, features)`` matrix by a token mode:

==========  =======================================  ==============================
mode        sequence output ``(b, t, d)``             image output ``(b, c, h, w)``
==========  =======================================  ==============================
``cls``     first token ``h[:, 0]`` -> ``(b, d)``     error
``mean``    mean over non-padding tokens -> (b, d)    mean over space -> ``(b, c)``
``tokens``  every non-padding token -> ``(n_tok, d)`` error
``flatten`` ``(b, t*d)`` (padding included)           ``(b, c*h*w)``
==========  =======================================  ==============================

2-D outputs ``(b, d)`` pass through unchanged. Pooling happens inside the hook, so
only the pooled ``(b, d_l)`` tensors of one batch are alive at a time: memory is
O(batch), never O(dataset). Hooks are removed and every module's train/eval flag
restored even when the forward raises.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

TOKEN_MODES = ("cls", "mean", "tokens", "flatten")
HIDDEN_STATES = "hidden_states"
#: batch keys that are bookkeeping, not model inputs
META_KEYS = frozenset({"labels", "label", "example_id", "example_ids", "ids", "idx"})

Forward = Callable[[nn.Module, Any], Any]


# -- layer names -------------------------------------------------------------------

def module_names(model: nn.Module) -> list[str]:
    """All named submodules of ``model`` (excluding the root), in registration order."""
    return [n for n, _ in model.named_modules() if n]


def resolve_layers(model: nn.Module, layers: str | Sequence[str]) -> list[str]:
    """Validate and expand layer names.

    Parameters
    ----------
    layers
        ``"hidden_states"``, a module name, a glob pattern, or a list of these.

    Raises
    ------
    ValueError
        For a name that is not a submodule (the message lists the nearest
        existing names) or a pattern that matches nothing.
    """
    if isinstance(layers, str):
        if layers == HIDDEN_STATES:
            return [HIDDEN_STATES]
        layers = [layers]
    if not layers:
        raise ValueError("layers is empty; name at least one module or use 'hidden_states'")
    names = module_names(model)
    known = set(names)
    out: list[str] = []
    for item in layers:
        if not isinstance(item, str):
            raise ValueError(f"layer names must be strings, got {type(item).__name__}")
        if item == HIDDEN_STATES:
            raise ValueError("'hidden_states' cannot be mixed with module names; capture them in separate calls")
        if any(ch in item for ch in "*?["):
            hits = [n for n in names if fnmatch.fnmatchcase(n, item)]
            if not hits:
                raise ValueError(f"layer pattern {item!r} matches no module of {type(model).__name__}; "
                                 f"examples of names: {names[:8]}")
            out += [h for h in hits if h not in out]
        elif item in known:
            if item not in out:
                out.append(item)
        else:
            near = difflib.get_close_matches(item, names, n=5, cutoff=0.5)
            hint = f"nearest existing names: {near}" if near else f"examples of names: {names[:8]}"
            raise ValueError(f"unknown layer {item!r} in {type(model).__name__}; {hint}")
    return out


# -- tensors out of module outputs -------------------------------------------------

def first_tensor(output: Any) -> torch.Tensor:
    """The representation in a module output: the tensor itself, the first tensor of
    a tuple/list, or the first field of a dict/``ModelOutput`` (``last_hidden_state``)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        for v in output.values():
            if isinstance(v, torch.Tensor):
                return v
    elif isinstance(output, (tuple, list)):
        for v in output:
            if isinstance(v, torch.Tensor):
                return v
    raise ValueError(f"module output of type {type(output).__name__} holds no tensor to capture")


def logits_of(output: Any) -> torch.Tensor:
    """The logits in a model's output: the tensor itself, ``.logits`` (a ``ModelOutput``, a
    model source's output), a ``"logits"`` key, else the first tensor (:func:`first_tensor`)."""
    if isinstance(output, torch.Tensor):
        return output
    lg = getattr(output, "logits", None)
    if isinstance(lg, torch.Tensor):
        return lg
    if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
        return output["logits"]
    return first_tensor(output)


def pool(x: torch.Tensor, token_mode: str, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Turn one layer's output into a ``(samples, features)`` matrix (see module docstring)."""
    if token_mode not in TOKEN_MODES:
        raise ValueError(f"unknown token_mode {token_mode!r}; use one of {TOKEN_MODES}")
    x = x.detach()
    if x.dtype in (torch.float16, torch.bfloat16):
        # pool in float32: a bf16 mean over tokens adds ~0.4% error to the features
        x = x.float()
    if x.ndim == 1:
        return x.unsqueeze(1)
    if x.ndim == 2:
        return x
    if x.ndim == 3:  # (b, t, d) sequence
        if attention_mask is not None and attention_mask.shape != x.shape[:2]:
            raise ValueError(f"layer output {tuple(x.shape)} does not match attention_mask "
                             f"{tuple(attention_mask.shape)}; capture a (batch, tokens, features) layer")
        if token_mode == "cls":
            return x[:, 0]
        if token_mode == "flatten":
            return x.reshape(x.shape[0], -1)
        if token_mode == "tokens":
            if attention_mask is None:
                return x.reshape(-1, x.shape[-1])
            return x[attention_mask.to(torch.bool)]
        from .classifier import masked_mean

        return masked_mean(x, attention_mask)
    # (b, c, *spatial) image / conv maps
    if token_mode in ("cls", "tokens"):
        raise ValueError(f"token_mode {token_mode!r} is for sequence outputs (b, t, d); this layer gives "
                         f"{tuple(x.shape)} (b, c, h, w): use 'mean' or 'flatten'")
    if token_mode == "flatten":
        return x.reshape(x.shape[0], -1)
    return x.mean(dim=tuple(range(2, x.ndim)))


# -- running a model on a batch ----------------------------------------------------

def model_inputs(batch: Any) -> Any:
    """Drop bookkeeping keys (labels, example ids) from a dict batch."""
    if isinstance(batch, Mapping):
        return {k: v for k, v in batch.items() if k not in META_KEYS}
    return batch


def attention_mask_of(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, Mapping):
        return batch.get("attention_mask")
    return None


def to_device(batch: Any, device: torch.device | None) -> Any:
    if device is None:
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def call_model(model: nn.Module, batch: Any, forward: Forward | None = None, **extra: Any) -> Any:
    """``forward(model, batch)`` if given, else ``model(**batch)`` for dicts,
    ``model(x)`` for a tensor or the first element of an ``(x, y)`` tuple."""
    if forward is not None:
        return forward(model, batch, **extra) if extra else forward(model, batch)
    inputs = model_inputs(batch)
    if isinstance(inputs, Mapping):
        return model(**inputs, **extra)
    if isinstance(inputs, (tuple, list)):
        return model(inputs[0], **extra)
    return model(inputs, **extra)


def _device_of(model: nn.Module) -> torch.device | None:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return None


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode and restore every submodule's own flag afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


class LayerRecorder:
    """Forward hooks that pool the named modules' outputs into ``self.features``.

    Use as a context manager; hooks are removed on exit, also after an exception.
    ``attention_mask`` must be set before each forward for ``mean``/``tokens``.
    ``token_mode="raw"`` keeps each output unpooled (detached), for callers that pool
    themselves (the study pools in float32 and compares outputs by identity).
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], token_mode: str) -> None:
        if token_mode not in TOKEN_MODES and token_mode != "raw":
            raise ValueError(f"unknown token_mode {token_mode!r}; use one of {TOKEN_MODES}")
        self.model = model
        self.layers = list(layers)
        self.token_mode = token_mode
        self.attention_mask: torch.Tensor | None = None
        self.features: dict[str, torch.Tensor] = {}
        self._handles: list[Any] = []

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            out = first_tensor(output)
            self.features[name] = out if self.token_mode == "raw" else pool(out, self.token_mode, self.attention_mask)
        return hook

    def __enter__(self) -> "LayerRecorder":
        modules = dict(self.model.named_modules())
        try:
            for name in self.layers:
                self._handles.append(modules[name].register_forward_hook(self._hook(name)))
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def take(self) -> dict[str, torch.Tensor]:
        missing = [n for n in self.layers if n not in self.features]
        if missing:
            raise ValueError(f"layers {missing} did not run during the forward pass; "
                             "they are not on this model's forward path")
        out = {n: self.features[n] for n in self.layers}
        self.features = {}
        return out


def _hidden_states(model: nn.Module, batch: Any, token_mode: str, forward: Forward | None) -> tuple[dict, Any]:
    out = call_model(model, batch, forward, output_hidden_states=True)
    hs = getattr(out, "hidden_states", None)
    if hs is None and isinstance(out, Mapping):
        hs = out.get("hidden_states")
    if hs is None:
        raise ValueError(f"{type(model).__name__} returned no hidden_states; capture by module name instead")
    mask = attention_mask_of(batch)
    feats = {f"{HIDDEN_STATES}.{i}": pool(h, token_mode, mask) for i, h in enumerate(hs)}
    return feats, out


def probe_widths(models: Any, batch: Any, *, layers: Any = HIDDEN_STATES, token_mode: str = "mean",
                 forward: Any = None) -> dict[str, list[int]]:
    """Feature width of every captured layer, per model, from one batch.

    Use it to size accumulators before streaming, e.g.
    ``w = probe_widths({"base": a, "variant": b}, first_batch, layers=...)``;
    ``CKAAccumulator(w["base"], w["variant"])``.
    """
    named = _as_named(models)
    single = {n: [batch] for n in named} if not isinstance(batch, Mapping) or set(batch) != set(named) else \
        {n: [batch[n]] for n in named}
    widths: dict[str, list[int]] = {}
    for n, m in named.items():
        lay = layers[n] if isinstance(layers, Mapping) else layers
        fw = forward.get(n) if isinstance(forward, Mapping) else forward
        feats = capture(m, single[n][0], layers=lay, token_mode=token_mode, forward=fw)
        widths[n] = [int(t.shape[1]) for t in feats.values()]
    return widths


def capture(model: nn.Module, batch: Any, *, layers: str | Sequence[str] = HIDDEN_STATES,
            token_mode: str = "mean", forward: Forward | None = None) -> dict[str, torch.Tensor]:
    """Per-layer ``(samples, features)`` representations of one batch.

    Parameters
    ----------
    model : nn.Module
    batch
        A dict of tensors (``model(**batch)``; keys ``labels``/``example_id`` are
        dropped), a tensor, or an ``(x, y)`` tuple; or anything ``forward`` accepts.
    layers
        Module names / glob patterns, or ``"hidden_states"``.
    token_mode
        ``"cls"``, ``"mean"``, ``"tokens"`` or ``"flatten"`` (see module docstring).
    forward
        Optional ``forward(model, batch, **kw)``.

    Returns
    -------
    dict
        layer name -> detached tensor ``(samples, features)``, in ``layers`` order.
    """
    result: dict[str, torch.Tensor] = {}

    def keep(feats: dict[str, torch.Tensor]) -> None:
        result.update(feats)

    capture_stream(model, [batch], layers=layers, token_mode=token_mode, consumers=[keep], forward=forward)
    return result


# -- streaming ---------------------------------------------------------------------

@dataclass
class StreamBatch:
    """What a ``wants_batch`` consumer receives for each batch."""

    index: int
    features: dict[str, dict[str, torch.Tensor]]  # model name -> layer -> (samples, d)
    outputs: dict[str, Any]  # model name -> raw model output (e.g. logits)
    batches: dict[str, Any]  # model name -> the batch it saw


@dataclass
class StreamSummary:
    """What :func:`capture_stream` returns."""

    n_batches: int = 0
    n_samples: int = 0  # rows per layer of the first model, summed over batches
    layers: dict[str, list[str]] = field(default_factory=dict)
    widths: dict[str, dict[str, int]] = field(default_factory=dict)


def _as_named(models: Any) -> dict[str, nn.Module]:
    if isinstance(models, nn.Module):
        return {"model": models}
    if isinstance(models, Mapping):
        out = dict(models)
    elif isinstance(models, (list, tuple)):
        out = {f"model{i}": m for i, m in enumerate(models)}
    else:
        raise ValueError(f"models must be an nn.Module, a list or a dict of them, got {type(models).__name__}")
    if not out:
        raise ValueError("no models given")
    for k, m in out.items():
        if not isinstance(m, nn.Module):
            raise ValueError(f"model {k!r} is a {type(m).__name__}, not an nn.Module")
    return out


def _vocab_key(tok: Any) -> Any:
    if tok is None:
        return None
    get_vocab = getattr(tok, "get_vocab", None)
    vocab = get_vocab() if get_vocab else None
    if vocab is None:
        return id(tok)
    return (type(tok).__name__, len(vocab), hash(frozenset(vocab.items())))


def check_same_tokenization(tokenizers: Mapping[str, Any]) -> None:
    """Raise if the models' tokenizers differ (different vocabularies), since then one
    stream of token ids means different text to each model."""
    keys = {name: _vocab_key(t) for name, t in tokenizers.items() if t is not None}
    if len(set(keys.values())) > 1:
        raise ValueError(
            f"models {sorted(keys)} use different tokenizers (vocabularies differ), so shared token ids would "
            "feed them different text. Tokenize the same texts once per model and pass per-model batches "
            "aligned by example id: capture_stream(models, {name: batches_for_that_model, ...}) where every "
            "batch dict carries an 'example_id' tensor.")


def _ids_of(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, Mapping):
        for k in ("example_id", "example_ids", "ids"):
            if k in batch:
                return torch.as_tensor(batch[k])
    return None


def _zip_per_model(per_model: Mapping[str, Iterable], names: list[str]) -> Iterator[dict[str, Any]]:
    missing = [n for n in names if n not in per_model]
    extra = [n for n in per_model if n not in names]
    if missing or extra:
        raise ValueError(f"per-model batches must have one entry per model: missing {missing}, unexpected {extra}")
    iters = {n: iter(per_model[n]) for n in names}
    done = object()
    step = 0
    while True:
        got = {n: next(iters[n], done) for n in names}
        ended = [n for n, b in got.items() if b is done]
        if ended:
            if len(ended) != len(names):
                raise ValueError(f"per-model batch streams have different lengths: {ended} ended at batch "
                                 f"{step}, the others did not")
            return
        ids = {n: _ids_of(b) for n, b in got.items()}
        if any(v is None for v in ids.values()):
            raise ValueError("per-model batches must carry an 'example_id' tensor so minidiff can check that "
                             f"all models see the same examples in the same order (batch {step})")
        ref_name = names[0]
        for n in names[1:]:
            if ids[n].shape != ids[ref_name].shape or not torch.equal(ids[n].cpu(), ids[ref_name].cpu()):
                raise ValueError(f"batch {step}: model {n!r} sees example ids {ids[n].tolist()[:8]}... but "
                                 f"{ref_name!r} sees {ids[ref_name].tolist()[:8]}...; align the inputs by example id")
        yield got
        step += 1


def capture_stream(
    models: nn.Module | Sequence[nn.Module] | Mapping[str, nn.Module],
    batches: Iterable[Any] | Mapping[str, Iterable[Any]],
    *,
    layers: str | Sequence[str] | Mapping[str, str | Sequence[str]] = HIDDEN_STATES,
    token_mode: str = "mean",
    consumers: Sequence[Any] = (),
    forward: Forward | Mapping[str, Forward] | None = None,
    tokenizers: Mapping[str, Any] | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> StreamSummary:
    """Run every model on every batch and feed the per-layer features to consumers.

    Parameters
    ----------
    models
        One model, a list (named ``model0``, ``model1``, ...) or a dict name -> model.
        All models see the same batch, in the same order.
    batches
        An iterable of batches shared by all models, or a dict model name ->
        iterable of that model's batches (for models with different tokenizers);
        per-model batches must be dicts carrying ``example_id`` tensors, which
        are checked equal across models at every step.
    layers
        Layer names / patterns / ``"hidden_states"``, for all models or as a dict
        per model name (e.g. a distilled student has fewer layers).
    token_mode
        ``"cls"``, ``"mean"``, ``"tokens"`` or ``"flatten"``.
    consumers
        Each is called once per batch, with one argument per model in model order.
        An object with an ``update`` method (an :class:`~minidiff.accumulate.Accumulator`
        such as ``minidiff.CKAAccumulator``) gets ``update(list_a, list_b, ...)``,
        each a list of ``(samples, d_l)`` tensors in ``summary.layers[name]`` order;
        a plain callable gets ``consumer(dict_a, dict_b, ...)``, each a
        ``dict[layer, (samples, d_l)]``. A consumer with attribute
        ``wants_batch = True`` instead receives one :class:`StreamBatch`
        (features, raw model outputs such as logits, and the batches).
    forward
        Optional ``forward(model, batch, **kw)`` for all models or per model name.
    tokenizers
        Optional dict model name -> tokenizer. With shared batches the tokenizers
        must agree (same vocabulary), else ValueError. ``TextClassifier``
        tokenizers are picked up automatically.
    device
        Move batches there (default: the device of each model's parameters).

    Returns
    -------
    StreamSummary
    """
    named = _as_named(models)
    names = list(named)
    if token_mode not in TOKEN_MODES:
        raise ValueError(f"unknown token_mode {token_mode!r}; use one of {TOKEN_MODES}")
    if isinstance(layers, Mapping) and set(layers) != set(names):
        raise ValueError(f"layers given per model must name every model: got {sorted(layers)}, models {names}")
    per_layers = {n: resolve_layers(named[n], layers[n] if isinstance(layers, Mapping) else layers) for n in names}
    forwards = {n: (forward.get(n) if isinstance(forward, Mapping) else forward) for n in names}

    toks = dict(tokenizers or {})
    for n, m in named.items():
        if n not in toks and getattr(m, "tokenizer", None) is not None:
            toks[n] = m.tokenizer
    shared = not isinstance(batches, Mapping)
    if shared and len(named) > 1:
        check_same_tokenization(toks)
    stream: Iterable[dict[str, Any]]
    if shared:
        stream = ({n: b for n in names} for b in batches)
    else:
        stream = _zip_per_model(batches, names)
    if progress:
        from tqdm.auto import tqdm

        stream = tqdm(stream, desc="capture", unit="batch")

    summary = StreamSummary(layers={n: list(v) for n, v in per_layers.items()})
    devices = {n: (torch.device(device) if device is not None else _device_of(named[n])) for n in names}
    with contextlib.ExitStack() as stack:
        recorders: dict[str, LayerRecorder | None] = {}
        for n in names:
            stack.enter_context(eval_mode(named[n]))
            if per_layers[n] == [HIDDEN_STATES]:
                recorders[n] = None
            else:
                recorders[n] = stack.enter_context(LayerRecorder(named[n], per_layers[n], token_mode))
        stack.enter_context(torch.no_grad())
        for step, per_model in enumerate(stream):
            feats: dict[str, dict[str, torch.Tensor]] = {}
            outs: dict[str, Any] = {}
            moved: dict[str, Any] = {}
            for n in names:
                b = to_device(per_model[n], devices[n])
                moved[n] = b
                rec = recorders[n]
                if rec is None:
                    feats[n], outs[n] = _hidden_states(named[n], b, token_mode, forwards[n])
                else:
                    rec.attention_mask = attention_mask_of(b)
                    outs[n] = call_model(named[n], b, forwards[n])
                    feats[n] = rec.take()
            rows = {n: {layer: t.shape[0] for layer, t in f.items()} for n, f in feats.items()}
            first = next(iter(rows[names[0]].values()))
            for n in names:
                for layer, r in rows[n].items():
                    if r != first:
                        raise ValueError(f"batch {step}: layer {n}:{layer} gives {r} samples but "
                                         f"{names[0]} gives {first}; models must see the same examples "
                                         "(with token_mode='tokens' also the same tokenization)")
            if step == 0:
                summary.layers = {n: list(f) for n, f in feats.items()}
                summary.widths = {n: {layer: int(t.shape[1]) for layer, t in f.items()} for n, f in feats.items()}
            summary.n_batches += 1
            summary.n_samples += first
            args = [feats[n] for n in names]
            for c in consumers:
                if getattr(c, "wants_batch", False):
                    c(StreamBatch(index=step, features=feats, outputs=outs, batches=moved))
                elif hasattr(c, "update") and callable(c.update):
                    c.update(*[list(f.values()) for f in args])
                elif callable(c):
                    c(*args)
                else:
                    raise ValueError(f"consumer {c!r} is neither callable nor has an update method")
    return summary
