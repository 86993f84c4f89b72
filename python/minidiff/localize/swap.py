"""Layer-swap sensitivity: which layer's compression moves the output most?

For a base model and a variant of the same architecture (pruned, int8, half
precision, ...), put ONE layer of the variant into the base and measure how far the
output moves from the base's on an evaluation set (direction ``"into_base"``), or
put one layer of the base back into the variant and measure how much of the
variant's change disappears (direction ``"restore"``). This is the single-layer
sensitivity analysis of quantization toolkits (AIMET's per-layer quant analyzer,
the "quantize one layer at a time" loop of torch.ao's numeric suite), generalized
to any compression and any named submodule.

Output change, per swapped model ``s`` against the base ``b`` on the same inputs:

* classifiers (logits ``(batch, classes)``): churn ``mean_x [argmax b(x) != argmax s(x)]``
  (:class:`minidiff.agreement.AgreementAccumulator`) and mean
  ``KL(softmax b(x) || softmax s(x))`` (:func:`minidiff.divergence_to_reference`);
* language models (logits ``(batch, tokens, vocab)``, padding excluded by the
  batch's ``attention_mask``): the same two over tokens from
  :func:`minidiff.lm.token_divergence` (KL from float64 ``log_softmax``, no
  probability floor), the first reported as same-top-1 ``= 1 - churn``.

The whole-model change (base vs variant) is measured in the same run, so each layer
also gets the share of it that it explains: ``kl_layer / kl_whole`` when swapped into
the base, ``(kl_whole - kl_restored) / kl_whole`` when restored in the variant (and
the same for churn). Shares need not add up to 1: layers interact (the errors of
two layers can compound or cancel).

Nothing is deep-copied: a swap re-points one attribute of the host model at the
donor's module object and points it back afterwards (in a ``finally``), so memory
stays that of the two models however many layers are swapped. When the two
modules hold different floating dtypes (a float16 variant), the swapped module's
floating inputs are cast to its own dtype and its outputs back to the host's, with
hooks removed on exit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from minidiff.metrics._checks import Result
from minidiff.validation import check_module_has_data

__all__ = ["LayerSwapResult", "SwapEffect", "SwapPlan", "block_names", "layer_swap", "linear_names", "plan",
           "swap_modules"]

logger = logging.getLogger(__name__)

Forward = Callable[[nn.Module, Any], Any]
Direction = Literal["into_base", "restore", "both"]
_DIRECTIONS = ("into_base", "restore", "both")
DEFAULT_MAX_EXAMPLES = 512


# ---------------------------------------------------------------------- layer names
def _has_state(module: nn.Module) -> bool:
    """True when the module holds weights: parameters, buffers or packed state
    (torch.ao quantized modules keep theirs outside ``parameters()``)."""
    for _ in module.parameters():
        return True
    for _ in module.buffers():
        return True
    return len(module.state_dict()) > 0


def _state_numel(module: nn.Module) -> int:
    return sum(t.numel() for t in module.state_dict().values() if isinstance(t, torch.Tensor))


def block_names(model: nn.Module) -> list[str]:
    """The blocks of ``model``, in module order.

    The repeated blocks are the elements of its largest ``nn.ModuleList`` (by number
    of stored values; a transformer's layers). The other blocks are the largest
    submodules with weights that do not contain that list (embeddings, final norm,
    head). A model without a ``ModuleList`` is cut into the root's children that
    hold weights (for an ``nn.Sequential`` MLP: its Linear layers).
    """
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    container = max(lists, key=lambda nm: _state_numel(nm[1]))[0] if lists else None
    out: list[str] = []

    def walk(prefix: str, module: nn.Module) -> None:
        for cname, child in module.named_children():
            full = f"{prefix}.{cname}" if prefix else cname
            if full == container:
                out.extend(f"{full}.{i}" for i, sub in child.named_children() if _has_state(sub))
            elif container is not None and container.startswith(full + "."):
                walk(full, child)
            elif _has_state(child):
                out.append(full)

    walk("", model)
    return out


def _is_weight_module(name: str, module: nn.Module) -> bool:
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return True
    # minidiff.nn's Int8Linear / SparseLinear / SemiStructuredLinear, the reference int8
    # linear and torch.ao's (dynamic) quantized Linear all carry in/out_features
    return bool(name) and hasattr(module, "in_features") and hasattr(module, "out_features")


def linear_names(base: nn.Module, variant: nn.Module | None = None) -> list[str]:
    """Names of the weight layers (``nn.Linear``, ``nn.Conv*`` and their compressed
    replacements) of ``base``, or of either model, in ``base``'s module order,
    keeping the names both models have."""
    b = dict(base.named_modules())
    v = dict(variant.named_modules()) if variant is not None else b
    return [n for n in b if n in v and (_is_weight_module(n, b[n]) or _is_weight_module(n, v[n]))]


def _outermost(names: Sequence[str]) -> list[str]:
    """Drop names that lie inside another name of the list (swapping the outer module
    already brings them)."""
    keep = []
    for n in names:
        if not any(n != o and n.startswith(o + ".") for o in names) and n not in keep:
            keep.append(n)
    return keep


def _valid_names_hint(base: nn.Module, variant: nn.Module) -> str:
    v_names = {n for n, _ in variant.named_modules()}
    blocks = [n for n in block_names(base) if n in v_names]
    lins = linear_names(base, variant)
    shown = lins if len(lins) <= 40 else lins[:40] + [f"... ({len(lins) - 40} more)"]
    return f"blocks: {blocks}; linear layers: {shown}"


def _resolve(base: nn.Module, variant: nn.Module, granularity: str | Sequence[str]) -> tuple[str, list[str]]:
    """(granularity label, layer names present in both models)."""
    common = [n for n, _ in base.named_modules() if n]
    v_names = {n for n, _ in variant.named_modules()}
    common = [n for n in common if n in v_names]
    if isinstance(granularity, str):
        if granularity == "block":
            names = block_names(base)
            missing = [n for n in names if n not in v_names]
            if missing:
                raise ValueError(f"the variant lacks the base's blocks {missing[:8]}; layer swaps need two models "
                                 "of the same architecture (module names must match)")
            return "block", names
        if granularity == "linear":
            names = linear_names(base, variant)
            if not names:
                raise ValueError(f"{type(base).__name__} has no Linear/Conv layers present in both models; "
                                 "use granularity='block' or a list of module names")
            return "linear", names
        granularity = [granularity]
        label = "names"
    else:
        label = "names"
    if not isinstance(granularity, (list, tuple)) or not all(isinstance(n, str) for n in granularity):
        raise TypeError("granularity must be 'block', 'linear' or a list of module names (str), "
                        f"got {granularity!r}")
    if not granularity:
        raise ValueError("granularity is an empty list; name at least one module, or use 'block' / 'linear'")
    known = set(common)
    bad = [n for n in granularity if n not in known]
    if bad:
        near = sorted({m for n in bad for m in difflib.get_close_matches(n, common, n=3, cutoff=0.6)})
        raise ValueError(f"unknown layer name(s) {bad} (not a submodule of both models)"
                         + (f"; nearest: {near}" if near else "")
                         + f". Valid names include {_valid_names_hint(base, variant)}")
    return label, list(dict.fromkeys(granularity))


# ---------------------------------------------------------------------- swapping
def _float_dtype(module: nn.Module) -> torch.dtype | None:
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            return t.dtype
    return None


def _cast(obj: Any, dtype: torch.dtype) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(dtype) if obj.is_floating_point() and obj.dtype != dtype else obj
    if isinstance(obj, tuple) and not hasattr(obj, "_fields"):
        return tuple(_cast(o, dtype) for o in obj)
    if isinstance(obj, list):
        return [_cast(o, dtype) for o in obj]
    if type(obj) is dict:
        return {k: _cast(v, dtype) for k, v in obj.items()}
    if isinstance(obj, Mapping):  # transformers' ModelOutput
        return type(obj)(**{k: _cast(v, dtype) for k, v in obj.items()})
    return obj


def _bridge(donor: nn.Module, host_module: nn.Module) -> list[Any]:
    """Hooks that run ``donor`` at its own floating dtype inside a host of another
    dtype; empty when the dtypes agree (or one side has no floating state)."""
    inner, outer = _float_dtype(donor), _float_dtype(host_module)
    if inner is None or outer is None or inner == outer:
        return []

    def pre(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return _cast(args, inner), _cast(kwargs, inner)

    def post(_m: nn.Module, _args: tuple, output: Any) -> Any:
        return _cast(output, outer)

    return [donor.register_forward_pre_hook(pre, with_kwargs=True), donor.register_forward_hook(post)]


@contextlib.contextmanager
def swap_modules(host: nn.Module, donor: nn.Module, names: Sequence[str]) -> Iterator[nn.Module]:
    """Temporarily replace the submodules ``names`` of ``host`` by ``donor``'s modules
    of the same names (the same objects, not copies); everything is put back on exit,
    also when the body raises.

    Names inside another listed name are skipped (the outer module brings them). An
    empty list leaves ``host`` as it is. Yields ``host``.
    """
    saved: list[tuple[nn.Module, str, nn.Module]] = []
    handles: list[Any] = []
    try:
        for name in _outermost(list(names)):
            parent_name, _, attr = name.rpartition(".")
            parent = host.get_submodule(parent_name) if parent_name else host
            old = parent._modules[attr]
            new = donor.get_submodule(name)
            handles += _bridge(new, old)
            setattr(parent, attr, new)
            saved.append((parent, attr, old))
        yield host
    finally:
        for h in handles:
            h.remove()
        for parent, attr, old in reversed(saved):
            setattr(parent, attr, old)


# ---------------------------------------------------------------------- batches
def _batch_size(batch: Any) -> int:
    from minidiff.models.capture import first_tensor, model_inputs

    try:
        t = first_tensor(model_inputs(batch))
    except ValueError:
        t = None
    if t is None or t.ndim == 0:
        raise ValueError(f"cannot tell the number of examples of a batch of type {type(batch).__name__}; "
                         "pass tensors, (x, y) tuples or dicts of tensors (first dimension = examples)")
    return int(t.shape[0])


def _slice(batch: Any, k: int, size: int) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch[:k] if batch.ndim and batch.shape[0] == size else batch
    if isinstance(batch, Mapping):
        return {key: _slice(v, k, size) for key, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_slice(v, k, size) for v in batch)
    return batch


def _take(batches: Any, max_examples: int | None) -> tuple[list[Any], int]:
    """At most ``max_examples`` examples of ``batches`` as a list (the last batch cut)."""
    if isinstance(batches, (torch.Tensor, Mapping)):
        batches = [batches]
    if not isinstance(batches, Iterable):
        raise TypeError(f"batches must be an iterable of batches, got {type(batches).__name__}")
    out, n = [], 0
    for b in batches:
        size = _batch_size(b)
        if size == 0:
            continue
        if max_examples is not None and n + size > max_examples:
            b, size = _slice(b, max_examples - n, size), max_examples - n
        out.append(b)
        n += size
        if max_examples is not None and n >= max_examples:
            break
    if not out:
        raise ValueError("batches holds no examples; pass at least one non-empty batch")
    return out, n


def _logits(output: Any) -> torch.Tensor:
    from minidiff.models.capture import first_tensor

    t = output if isinstance(output, torch.Tensor) else getattr(output, "logits", None)
    if not isinstance(t, torch.Tensor):
        t = first_tensor(output)
    if t.ndim not in (2, 3):
        raise ValueError(f"the model returned logits of shape {tuple(t.shape)}; layer_swap needs "
                         "(batch, classes) for classifiers or (batch, tokens, vocab) for language models "
                         "(pass forward=... to pick the logits)")
    return t


def _device(model: nn.Module) -> torch.device | None:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return None


# ---------------------------------------------------------------------- the metrics
class _Change:
    """Running churn and KL of one model against the base (sums over examples/tokens)."""

    def __init__(self, kind: str) -> None:
        from minidiff.agreement import AgreementAccumulator

        self.kind = kind
        self.agree = AgreementAccumulator(2)
        self.kl_sum = 0.0

    def update(self, base: torch.Tensor, other: torch.Tensor, mask: torch.Tensor | None) -> None:
        from minidiff.agreement import divergence_to_reference

        if other.shape != base.shape:
            raise ValueError(f"swapped model returned logits {tuple(other.shape)}, base {tuple(base.shape)}")
        if self.kind == "language-model":
            from minidiff.lm.divergence import token_divergence

            if mask is not None:
                keep = mask.to(torch.bool).to(base.device)
                base, other = base[keep], other[keep]
            else:
                base, other = base.reshape(-1, base.shape[-1]), other.reshape(-1, other.shape[-1])
            if base.shape[0] == 0:
                return
            stats = token_divergence(base, other)
            self.kl_sum += float(stats["kld"].sum())
            self.agree.update(torch.stack([stats["top1_base"], stats["top1_variant"]]))
            return
        probs = torch.stack([torch.softmax(base.to(torch.float64), -1),
                             torch.softmax(other.to(torch.float64), -1)])
        self.kl_sum += float(divergence_to_reference(probs, ref=0, kind="kl")[1].sum())
        self.agree.update(torch.stack([base.argmax(-1), other.argmax(-1)]))

    def compute(self) -> tuple[float, float, int]:
        out = self.agree.compute()
        n = int(out["n"])
        return float(out["disagreement"][0, 1]), self.kl_sum / n, n


# ---------------------------------------------------------------------- results
@dataclass
class SwapPlan(Result):
    """What :func:`layer_swap` will run, stated before it runs.

    ``forward_passes = n_batches * (2 + n_swaps)``: the base and the variant once per
    batch, and one pass per swap per batch (``n_swaps = len(layers) * len(directions)``).
    ``estimated_seconds`` scales one timed base pass on the first batch by examples.
    """

    layers: list[str]
    directions: list[str]
    granularity: str
    n_batches: int
    n_examples: int
    forward_passes: int
    seconds_per_pass: float
    estimated_seconds: float

    def describe(self) -> str:
        return (f"layer_swap: {len(self.layers)} layer(s) ({self.granularity}) x {'+'.join(self.directions)} on "
                f"{self.n_examples} example(s) in {self.n_batches} batch(es): {self.forward_passes} forward passes, "
                f"about {self.estimated_seconds:.1f} s ({self.seconds_per_pass * 1e3:.1f} ms for the first batch)")


@dataclass
class SwapEffect(Result):
    """The output change of one swap, against the base.

    ``direction="into_base"``: the base with this layer taken from the variant;
    ``share_* = value / whole``. ``direction="restore"``: the variant with this layer
    taken back from the base; ``share_* = (whole - value) / whole`` (the part of the
    variant's change that restoring the layer removes). Shares are NaN when the
    whole-model change is 0. ``same_top1 = 1 - churn``.
    """

    layer: str
    direction: str
    churn: float
    kl: float
    same_top1: float
    share_churn: float
    share_kl: float


@dataclass
class LayerSwapResult(Result):
    """Layers ranked by the cost of their compression (see :func:`layer_swap`).

    ``into_base`` is sorted by ``kl`` (largest change first; ties by churn, then
    module order), ``restore`` by ``share_kl`` (largest recovery first). ``unit`` is
    ``"examples"`` for classifiers and ``"tokens"`` for language models; ``n_units``
    how many were compared. ``whole_*`` is the base-vs-variant change in the same run.
    """

    kind: str
    unit: str
    n_examples: int
    n_units: int
    whole_churn: float
    whole_kl: float
    into_base: list[SwapEffect]
    restore: list[SwapEffect]
    plan: SwapPlan
    seconds: float
    kl_function: str = "minidiff.divergence_to_reference"

    @property
    def whole_same_top1(self) -> float:
        return 1.0 - self.whole_churn

    def ranking(self, direction: str = "into_base") -> list[str]:
        """Layer names, costliest first, for ``direction`` ``"into_base"`` or ``"restore"``."""
        if direction not in ("into_base", "restore"):
            raise ValueError(f"direction must be 'into_base' or 'restore', got {direction!r}")
        effects = self.into_base if direction == "into_base" else self.restore
        if not effects:
            raise ValueError(f"this result has no {direction!r} swaps; run layer_swap with "
                             f"direction={direction!r} or 'both'")
        return [e.layer for e in effects]

    def to_frame(self) -> Any:
        """One row per swap (pandas DataFrame)."""
        import pandas as pd

        rows = [dataclasses.asdict(e) for e in self.into_base + self.restore]
        return pd.DataFrame(rows, columns=[f.name for f in dataclasses.fields(SwapEffect)])


def _share(value: float, whole: float, restore: bool) -> float:
    if whole == 0:
        return math.nan
    return (whole - value) / whole if restore else value / whole


# ---------------------------------------------------------------------- public API
def _check_args(base: Any, variant: Any, direction: str, forward: Any, max_examples: Any) -> list[str]:
    for name, m in (("base", base), ("variant", variant)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{name} must be a torch.nn.Module, got {type(m).__name__}")
    if base is variant:
        raise ValueError("base and variant are the same object; pass the compressed copy as variant")
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be one of {_DIRECTIONS}, got {direction!r}")
    if forward is not None and not callable(forward):
        raise TypeError(f"forward must be a callable (model, batch) -> logits, got {type(forward).__name__}")
    if max_examples is not None and (isinstance(max_examples, bool) or not isinstance(max_examples, int)
                                     or max_examples < 1):
        raise ValueError(f"max_examples must be a positive int or None (all), got {max_examples!r}")
    db, dv = _device(base), _device(variant)
    if db is not None and dv is not None and db != dv:
        raise ValueError(f"base is on {db} but variant on {dv}; move both to one device (swapped layers "
                         "run inside the other model)")
    return ["into_base", "restore"] if direction == "both" else [direction]


def _timed_forward(model: nn.Module, batch: Any, forward: Forward | None) -> tuple[torch.Tensor, float]:
    from minidiff.models.capture import call_model

    dev = _device(model)
    sync = dev is not None and dev.type == "cuda"
    if sync:
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    out = _logits(call_model(model, batch, forward))
    if sync:
        torch.cuda.synchronize(dev)
    return out, time.perf_counter() - t0


def _prepare(base, variant, batches, granularity, direction, forward, max_examples):
    check_module_has_data(base, "base")
    check_module_has_data(variant, "variant")
    from minidiff.models.capture import eval_mode, to_device

    directions = _check_args(base, variant, direction, forward, max_examples)
    label, layers = _resolve(base, variant, granularity)
    taken, n = _take(batches, max_examples)
    taken = [to_device(b, _device(base)) for b in taken]
    with eval_mode(base), torch.inference_mode():
        first, secs = _timed_forward(base, taken[0], forward)
    per_example = secs / _batch_size(taken[0])
    swaps = len(layers) * len(directions)
    p = SwapPlan(layers=layers, directions=directions, granularity=label, n_batches=len(taken), n_examples=n,
                 forward_passes=len(taken) * (2 + swaps), seconds_per_pass=secs,
                 estimated_seconds=per_example * n * (2 + swaps))
    return p, taken, first


def plan(base: nn.Module, variant: nn.Module, batches: Any, *, granularity: str | Sequence[str] = "block",
         direction: Direction = "into_base", forward: Forward | None = None,
         max_examples: int | None = DEFAULT_MAX_EXAMPLES) -> SwapPlan:
    """The cost of :func:`layer_swap` with the same arguments, without running it.

    Resolves the layers, takes the examples and times one forward pass of the base
    on the first batch (the only pass it runs). The plan is returned for the caller to
    state (logged at DEBUG; :func:`layer_swap` logs it at INFO before it runs).
    """
    p, _, _ = _prepare(base, variant, batches, granularity, direction, forward, max_examples)
    logger.debug(p.describe())
    return p


def layer_swap(base: nn.Module, variant: nn.Module, batches: Any, *,
               granularity: str | Sequence[str] = "block", direction: Direction = "into_base",
               forward: Forward | None = None, max_examples: int | None = DEFAULT_MAX_EXAMPLES) -> LayerSwapResult:
    """Rank the layers of a same-architecture variant by how much their compression
    moves the output.

    For each layer ``l``: ``into_base`` runs the base with module ``l`` taken from the
    variant, ``restore`` runs the variant with module ``l`` taken from the base, and
    each is compared with the base on the same examples: churn (share of examples, or
    tokens, whose top-1 differs) and mean ``KL(p_base || p_swapped)`` (natural log).
    The base-vs-variant change measured in the same pass gives each layer its share.
    Single-layer sensitivity as in quantization analyzers (AIMET's per-layer
    analysis; torch.ao numeric suite), see also Dong et al. 2019 (HAWQ) for the
    per-layer sensitivity ranking it approximates.

    Parameters
    ----------
    base, variant : nn.Module
        Same module names (the variant's modules may be compressed replacements:
        ``minidiff.nn`` int8/sparse linears, torch.ao quantized modules, float16 copies),
        on one device. Both are left exactly as they were, also on error.
    batches : iterable
        Batches as the models take them: tensors, ``(x, y)`` tuples or dicts (labels and
        ids are dropped before the call; a dict's ``attention_mask`` masks padding
        tokens of a language model). A single tensor or dict is one batch.
    granularity : {"block", "linear"} or list of str
        ``"block"``: :func:`block_names` (transformer layers, embeddings, head);
        ``"linear"``: every Linear/Conv layer and its compressed replacement
        (:func:`linear_names`); or explicit module names present in both models.
    direction : {"into_base", "restore", "both"}
    forward : callable, optional
        ``forward(model, batch) -> logits`` (default: ``model(**batch)`` for dicts,
        ``model(x)`` otherwise; a ``.logits`` attribute is taken).
    max_examples : int or None
        Use the first ``max_examples`` examples (default 512; None for all). The
        batches up to that point are kept in memory (they are re-used by every swap).

    Returns
    -------
    LayerSwapResult

    Notes
    -----
    Cost: ``n_batches * (2 + n_layers * n_directions)`` forward passes, stated by
    :func:`plan` and logged before running. Each swap is one forward pass per batch;
    the batch loop is outermost, so only one batch's logits are alive at a time.
    """
    from minidiff.models.capture import call_model, eval_mode

    p, taken, first = _prepare(base, variant, batches, granularity, direction, forward, max_examples)
    logger.info(p.describe())
    t0 = time.perf_counter() - p.seconds_per_pass  # the timed pass is the base pass of batch 0
    kind = "language-model" if first.ndim == 3 else "classifier"
    whole = _Change(kind)
    jobs = [(d, layer) for d in p.directions for layer in p.layers]
    changes = {job: _Change(kind) for job in jobs}
    with eval_mode(base), eval_mode(variant), torch.inference_mode():
        for i, batch in enumerate(taken):
            from minidiff.models.capture import attention_mask_of

            ref = first if i == 0 else _logits(call_model(base, batch, forward))
            mask = attention_mask_of(batch) if kind == "language-model" else None
            whole.update(ref, _logits(call_model(variant, batch, forward)), mask)
            for d, layer in jobs:
                host, donor = (base, variant) if d == "into_base" else (variant, base)
                try:
                    with swap_modules(host, donor, [layer]):
                        out = _logits(call_model(host, batch, forward))
                except (RuntimeError, TypeError) as exc:
                    raise ValueError(f"swapping {layer!r} ({d}) failed: {exc}. The two modules must take and "
                                     "return the same shapes (structured pruning changes inner widths: use a "
                                     "coarser granularity)") from exc
                changes[(d, layer)].update(ref, out, mask)
    w_churn, w_kl, n_units = whole.compute()
    effects: dict[str, list[SwapEffect]] = {"into_base": [], "restore": []}
    for (d, layer), ch in changes.items():
        churn, kl, _ = ch.compute()
        restore = d == "restore"
        effects[d].append(SwapEffect(layer, d, churn, kl, 1.0 - churn, _share(churn, w_churn, restore),
                                     _share(kl, w_kl, restore)))
    order = {n: i for i, n in enumerate(p.layers)}
    effects["into_base"].sort(key=lambda e: (-e.kl, -e.churn, order[e.layer]))
    effects["restore"].sort(key=lambda e: (e.kl, e.churn, order[e.layer]))
    return LayerSwapResult(kind=kind, unit="tokens" if kind == "language-model" else "examples",
                           n_examples=p.n_examples, n_units=n_units, whole_churn=w_churn, whole_kl=w_kl,
                           into_base=effects["into_base"], restore=effects["restore"], plan=p,
                           seconds=time.perf_counter() - t0,
                           kl_function="minidiff.lm.token_divergence" if kind == "language-model"
                           else "minidiff.divergence_to_reference")
