"""Magnitude pruning: unstructured (layer-wise or global), N:M semi-structured,
and structured (attention heads, FFN / hidden neurons, physically removed).

Unstructured (Han et al. 2015; Zhu & Gupta 2017): in each layer (``scope="layer"``)
or over all selected layers together (``scope="global"``) the ``k = round(s * n)``
weights of smallest ``|w|`` are set to zero (ties broken by position, so ``k`` is
exact); the achieved sparsity is ``k / n``.

N:M (Mishra et al. 2021, "Accelerating Sparse Deep Neural Networks"): in every group
of ``M`` consecutive weights along ``in_features`` (rows of ``W (out, in)``) the
``N`` largest ``|w|`` are kept: for 2:4 exactly 2 non-zeros in every group of 4,
the layout ``minidiff.nn`` semi-structured kernels consume.

Structured: heads are scored by the L1 norm of their query/key/value rows plus
their columns of the attention output projection; FFN neurons by the L1 norm of
their row in the up projection plus their column in the down projection (the
magnitude criterion of Li et al. 2017 applied to transformers). The lowest
``round(s * count)`` per layer are removed and the Linear layers rebuilt smaller.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from .training import Data, apply_masks, train
from minidiff.models.saved import (DEFAULT_EXCLUDE, Variant, _set_submodule, as_linear, clone_model,  # noqa: F401
                      default_layers, is_conv1d, linear_types, make_manifest, tied_to_embedding)
from minidiff.validation import check_module_has_data

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
"""Layer types unstructured pruning applies to (plus transformers' ``Conv1D``, see
:func:`minidiff.compress.variant.linear_types`)."""


def check_sparsity(sparsity: float) -> float:
    s = float(sparsity)
    if not (0.0 <= s < 1.0):
        raise ValueError(f"sparsity must be in [0, 1) (fraction of weights removed), got {sparsity}")
    return s


def parse_structure(structure: str) -> tuple[str, int, int]:
    """``"unstructured"``, ``"heads"``, ``"neurons"`` or ``"N:M"`` -> (kind, n, m)."""
    m = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", structure)
    if m:
        n_, m_ = int(m.group(1)), int(m.group(2))
        if not (0 < n_ < m_):
            raise ValueError(f"N:M pattern needs 0 < N < M, got {structure!r}")
        return "n:m", n_, m_
    if structure in ("unstructured", "heads", "neurons"):
        return structure, 0, 0
    raise ValueError(f"structure must be 'unstructured', 'heads', 'neurons' or 'N:M' like '2:4', got {structure!r}")


def select_layers(model: nn.Module, layers: str | Sequence[str] | None,
                  kinds: tuple[type, ...] = PRUNABLE) -> list[str]:
    """Names of the prunable modules: given names/patterns (validated) or, by default,
    every Linear/Conv (and transformers ``Conv1D``) except an output head named
    head/classifier/lm_head/score and layers whose weight is tied to an embedding.

    A layer tied to an embedding cannot be pruned even when named: its weight *is* the
    embedding table, so pruning one would prune the other.
    """
    from minidiff.models.capture import resolve_layers

    kinds = tuple(kinds) + tuple(t for t in linear_types() if t not in kinds and nn.Linear in kinds)
    mods = dict(model.named_modules())
    if layers is None:
        return default_layers(model, kinds)
    names: list[str] = []
    for item in ([layers] if isinstance(layers, str) else list(layers)):
        got = resolve_layers(model, item)
        if any(c in item for c in "*?["):  # a pattern selects only the prunable modules it matches
            got = [n for n in got if type(mods[n]) in kinds]
        names += [n for n in got if n not in names]
    bad = [n for n in names if type(mods[n]) not in kinds]
    if bad:
        raise ValueError(f"layers {bad[:5]} are not {'/'.join(k.__name__ for k in kinds)} modules and cannot be "
                         "pruned this way")
    if not names:
        raise ValueError(f"no prunable layers selected by {layers!r}")
    tied = {n: e for n, e in tied_to_embedding(model).items() if n in names}
    if tied:
        n, e = next(iter(tied.items()))
        raise ValueError(f"layer {n!r} shares its weight with the embedding {e!r}: pruning it would prune the "
                         "embedding too; untie them first (e.g. config.tie_word_embeddings=False) or leave it out")
    return names


def _smallest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` smallest entries of a 1-D tensor (stable: ties by position)."""
    return torch.argsort(scores, stable=True)[:k]


def magnitude_masks(weights: Mapping[str, torch.Tensor], sparsity: float, scope: str = "layer",
                    protected: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Keep-masks (bool, weight-shaped) removing the ``round(s n)`` smallest ``|w|``.

    ``protected`` masks (e.g. from an earlier IMP round) mark weights already
    pruned: they rank below everything and stay pruned (nested masks).
    """
    s = check_sparsity(sparsity)
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")

    def score(name: str, w: torch.Tensor) -> torch.Tensor:
        a = w.detach().abs().reshape(-1).to(torch.float64)
        if protected is not None and name in protected:
            a = torch.where(protected[name].reshape(-1).to(a.device), a, torch.full_like(a, -1.0))
        return a

    masks: dict[str, torch.Tensor] = {}
    if scope == "layer":
        for name, w in weights.items():
            a = score(name, w)
            k = int(round(s * a.numel()))
            keep = torch.ones(a.numel(), dtype=torch.bool, device=a.device)
            keep[_smallest(a, k)] = False
            masks[name] = keep.reshape(w.shape)
        return masks
    flat = torch.cat([score(n, w) for n, w in weights.items()])
    k = int(round(s * flat.numel()))
    keep = torch.ones(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[_smallest(flat, k)] = False
    start = 0
    for name, w in weights.items():
        masks[name] = keep[start:start + w.numel()].reshape(w.shape)
        start += w.numel()
    return masks


def nm_masks(weights: Mapping[str, torch.Tensor], n: int, m: int) -> dict[str, torch.Tensor]:
    """N:M keep-masks along the last (input) dimension of each 2-D ``(out, in)`` weight
    (pass ``weight.T`` for a ``Conv1D`` and transpose the mask back)."""
    masks = {}
    for name, w in weights.items():
        if w.ndim != 2:
            raise ValueError(f"N:M pruning needs 2-D Linear weights; {name} has shape {tuple(w.shape)}")
        out_f, in_f = w.shape
        if in_f % m:
            raise ValueError(f"{name}: in_features={in_f} is not divisible by M={m}; "
                             f"N:M groups of {m} must tile each row exactly (exclude this layer via layers=)")
        groups = w.detach().abs().reshape(out_f, in_f // m, m).to(torch.float64)
        order = torch.argsort(groups, dim=-1, descending=True, stable=True)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(-1, order[..., :n], True)
        masks[name] = keep.reshape(out_f, in_f)
    return masks


# -- structured -----------------------------------------------------------------------

def _sliced_linear(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    w = lin.weight.detach()
    b = lin.bias.detach() if lin.bias is not None else None
    if rows is not None:
        w = w[rows]
        b = b[rows] if b is not None else None
    if cols is not None:
        w = w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    return new


def _attention_blocks(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """(name, self-attention module with query/key/value, output projection Linear) for BERT-style attention."""
    blocks = []
    for name, mod in model.named_modules():
        sa = getattr(mod, "self", None)
        out = getattr(getattr(mod, "output", None), "dense", None)
        if sa is not None and all(isinstance(getattr(sa, a, None), nn.Linear) for a in ("query", "key", "value")) \
                and isinstance(out, nn.Linear) and hasattr(sa, "attention_head_size"):
            blocks.append((name, sa, out))
    return blocks


def prune_heads(model: nn.Module, fraction: float) -> dict[str, list[int]]:
    """Remove the lowest-L1 ``round(fraction * H)`` heads of every attention block, in place.

    At least one head per block is kept. Returns block name -> removed head indices.
    """
    blocks = _attention_blocks(model)
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no BERT-style attention blocks (self.query/key/value + "
                         "output.dense); head pruning supports BERT-family encoders")
    removed: dict[str, list[int]] = {}
    for name, sa, out in blocks:
        h, d = int(sa.num_attention_heads), int(sa.attention_head_size)
        k = min(int(round(fraction * h)), h - 1)
        score = torch.zeros(h, dtype=torch.float64)
        for lin in (sa.query, sa.key, sa.value):
            score += lin.weight.detach().abs().to(torch.float64).reshape(h, d, -1).sum(dim=(1, 2))
        score += out.weight.detach().abs().to(torch.float64).reshape(out.out_features, h, d).sum(dim=(0, 2))
        drop = sorted(_smallest(score, k).tolist())
        removed[name] = drop
        if not drop:
            continue
        keep_heads = [i for i in range(h) if i not in drop]
        idx = torch.tensor([i * d + j for i in keep_heads for j in range(d)], device=out.weight.device)
        sa.query, sa.key, sa.value = (_sliced_linear(sa.query, rows=idx), _sliced_linear(sa.key, rows=idx),
                                      _sliced_linear(sa.value, rows=idx))
        sa.num_attention_heads = len(keep_heads)
        sa.all_head_size = len(keep_heads) * d
        parent = model.get_submodule(name).output
        parent.dense = _sliced_linear(out, cols=idx)
    return removed


def _neuron_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(up projection, down projection) Linear name pairs whose hidden units can be removed."""
    mods = dict(model.named_modules())
    pairs = []
    for name, mod in mods.items():
        if name.endswith("intermediate.dense") and isinstance(mod, nn.Linear):
            down = name[: -len("intermediate.dense")] + "output.dense"
            if isinstance(mods.get(down), nn.Linear):
                pairs.append((name, down))
    if pairs:
        return pairs
    if isinstance(model, nn.Sequential):  # MLP: Linear -> elementwise -> Linear
        lins = [(n, m) for n, m in model.named_children()]
        linear_names = [n for n, m in lins if isinstance(m, nn.Linear)]
        elementwise = (nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.Dropout, nn.Identity, nn.SiLU, nn.LeakyReLU)
        for a, b in zip(linear_names, linear_names[1:]):
            between = [m for n, m in lins[[n for n, _ in lins].index(a) + 1:[n for n, _ in lins].index(b)]]
            if all(isinstance(m, elementwise) for m in between):
                pairs.append((a, b))
    return pairs


def prune_neurons(model: nn.Module, fraction: float) -> dict[str, list[int]]:
    """Remove the lowest-L1 ``round(fraction * width)`` hidden units of each FFN / MLP hidden layer, in place."""
    pairs = _neuron_pairs(model)
    if not pairs:
        raise ValueError(f"{type(model).__name__} has no FFN (intermediate.dense/output.dense) or MLP "
                         "(Linear -> activation -> Linear) blocks whose neurons can be removed")
    removed: dict[str, list[int]] = {}
    for up_name, down_name in pairs:
        up, down = model.get_submodule(up_name), model.get_submodule(down_name)
        width = up.out_features
        k = min(int(round(fraction * width)), width - 1)
        score = up.weight.detach().abs().to(torch.float64).sum(1) + down.weight.detach().abs().to(torch.float64).sum(0)
        drop = _smallest(score, k)
        keep = torch.ones(width, dtype=torch.bool)
        keep[drop] = False
        idx = keep.nonzero().flatten().to(up.weight.device)
        removed[up_name] = sorted(drop.tolist())
        _set_submodule(model, up_name, _sliced_linear(up, rows=idx))
        _set_submodule(model, down_name, _sliced_linear(down, cols=idx))
    return removed


# -- conversion to sparse layers --------------------------------------------------------

def convert_to_sparse(model: nn.Module, names: Sequence[str], kind: str) -> str:
    """Replace pruned Linear layers by ``minidiff.nn`` sparse layers (imported lazily)."""
    from minidiff.models.saved import minidiff_nn_class

    cls_name = "SemiStructuredLinear" if kind == "n:m" else "SparseLinear"
    cls = minidiff_nn_class(cls_name)
    if cls is None:
        raise ValueError(f"to_sparse needs minidiff.nn.{cls_name}, which is not available in this installation")
    mods = dict(model.named_modules())
    kinds = linear_types()
    for n in names:
        if type(mods[n]) in kinds:
            _set_submodule(model, n, cls.from_linear(as_linear(mods[n]), name=n))
    return cls_name


# -- entry point -------------------------------------------------------------------------

def _run_finetune(model: nn.Module, finetune: Any, masks: Mapping[str, torch.Tensor] | None, seed: int) -> Any:
    if finetune is None:
        return None
    if callable(finetune):
        finetune(model, masks)
        apply_masks(model, masks)
        return {"function": getattr(finetune, "__qualname__", repr(finetune))}
    if isinstance(finetune, Mapping):
        kw = dict(finetune)
        if "data" not in kw:
            raise ValueError("finetune dict needs 'data': (inputs, labels), plus train() options "
                             "(epochs, lr, batch_size, ...)")
        data = kw.pop("data")
        res = train(model, data, seed=seed, masks=masks, **kw)
        return {**kw, "steps": res.steps, "final_loss": res.losses[-1] if res.losses else None}
    raise ValueError("finetune must be None, a callable(model, masks) or a dict with 'data' and train() options")


def prune(model: nn.Module, *, sparsity: float = 0.5, structure: str = "unstructured", scope: str = "layer",
          layers: str | Sequence[str] | None = None, to_sparse: bool = False,
          finetune: Callable[[nn.Module, Any], None] | Mapping[str, Any] | None = None,
          seed: int = 0, source_id: str | None = None) -> Variant:
    """Magnitude-prune a copy of ``model``.

    Parameters
    ----------
    model : nn.Module
        Left untouched.
    sparsity : float in [0, 1)
        Fraction of weights (unstructured), heads (``"heads"``) or hidden
        neurons (``"neurons"``) removed. Ignored for N:M, whose sparsity is ``1 - N/M``.
    structure : {"unstructured", "N:M" (e.g. "2:4"), "heads", "neurons"}
    scope : {"layer", "global"}
        Unstructured only: rank weights within each layer or across all of them.
    layers
        Names / glob patterns of the Linear (or Conv, unstructured) layers to prune.
        Default: every Linear/Conv except a classification head named
        head/classifier/lm_head/score.
    to_sparse : bool
        Replace pruned Linear layers by ``minidiff.nn.SparseLinear`` (or
        ``SemiStructuredLinear`` for N:M).
    finetune
        Optional mask-preserving fine-tuning after pruning: a
        ``callable(model, masks)`` or a dict ``{"data": (inputs, labels), "epochs": ..,
        "lr": ..}`` for the built-in trainer (seeded by ``seed``: populations).
    seed : int
        Seeds the fine-tuning; magnitude pruning itself is deterministic.

    Returns
    -------
    Variant
        ``manifest["sparsity"]`` holds the achieved per-layer and overall
        sparsity; ``variant.masks`` the keep-masks (unstructured / N:M).
    """
    check_module_has_data(model)
    kind, n_keep, m_group = parse_structure(structure)
    s = check_sparsity(sparsity) if kind != "n:m" else 1.0 - n_keep / m_group
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
    new = clone_model(model)
    params: dict[str, Any] = {"structure": structure, "sparsity": s, "scope": scope if kind == "unstructured" else
                              None, "criterion": "magnitude"}
    extra: dict[str, Any] = {}
    masks: dict[str, torch.Tensor] | None = None
    base_counts = None
    if kind in ("unstructured", "n:m"):
        names = select_layers(new, layers, PRUNABLE if kind == "unstructured" else (nn.Linear,))
        mods = dict(new.named_modules())
        if kind == "unstructured":
            masks = magnitude_masks({f"{n}.weight": mods[n].weight for n in names}, s, scope)
        else:  # groups run along in_features: a Conv1D's weight (in, out) is transposed for the ranking
            conv1d = {n for n in names if is_conv1d(mods[n])}
            masks = nm_masks({f"{n}.weight": mods[n].weight.T if n in conv1d else mods[n].weight for n in names},
                             n_keep, m_group)
            masks = {k: v.T.contiguous() if k[: -len(".weight")] in conv1d else v for k, v in masks.items()}
        apply_masks(new, masks)
        params["layers"] = names
        if kind == "n:m":
            params.update({"n": n_keep, "m": m_group})
    else:
        if layers is not None:
            raise ValueError("structured pruning ('heads'/'neurons') applies to every block; do not pass layers=")
        base_counts = {n: m.weight.numel() for n, m in new.named_modules() if isinstance(m, nn.Linear)}
        removed = prune_heads(new, s) if kind == "heads" else prune_neurons(new, s)
        extra["removed_" + kind] = removed
        # only the layers that shrank count towards structured sparsity
        shrunk = {n for n, m in new.named_modules() if isinstance(m, nn.Linear) and m.weight.numel() != base_counts[n]}
        base_counts = {n: c for n, c in base_counts.items() if n in shrunk}
    ft = _run_finetune(new, finetune, masks, seed)
    if ft is not None:
        params["finetune"] = ft
    if to_sparse:
        if kind in ("heads", "neurons"):
            raise ValueError("to_sparse is for unstructured or N:M pruning; structured pruning already shrinks layers")
        if kind == "n:m" and (n_keep, m_group) != (2, 4):
            raise ValueError(f"to_sparse for N:M supports 2:4 (minidiff.nn.SemiStructuredLinear), got {structure}")
        params["sparse_layers"] = convert_to_sparse(new, params["layers"], kind)
    new.eval()
    if base_counts is not None:
        rep_model = new
        man = make_manifest("prune", params, seed, model, rep_model, base_counts=base_counts, source_id=source_id,
                            extra=extra)
        man["sparsity"]["per_layer"] = {k: v for k, v in man["sparsity"]["per_layer"].items() if k in base_counts}
        tot = sum(base_counts.values())
        now = sum(dict(new.named_modules())[k].weight.numel() for k in base_counts)
        man["sparsity"]["overall"] = 1 - now / tot if tot else 0.0
    else:
        man = make_manifest("prune", params, seed, model, new, masks=masks, source_id=source_id, extra=extra)
    return Variant(new, man, masks=masks, tokenizer=getattr(model, "tokenizer", None))
