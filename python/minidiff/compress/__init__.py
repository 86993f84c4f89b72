"""Compressed variants out: pruning, quantization, distillation, lottery tickets,
populations over seeds, and safetensors storage.

Every method returns a :class:`Variant` (a NEW model + a manifest); the model it
was given is never modified. Quantization (int8 W8A8 / weight-only, group-wise int4
weight-only, fp16/bf16) and magnitude / N:M pruning apply to every ``nn.Linear`` and
GPT-2 ``Conv1D`` of a model, language-model decoders included, leaving output heads and
embedding-tied layers alone unless named; the quantizers are ``minidiff.quant``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from torch import nn

from .distillation import distill
from .lottery import lottery_ticket
from .pruning import prune
from .quantization import quantize
from .training import finetune
from . import variant  # noqa: F401  (the variant API under its historical name, minidiff.compress.variant)
from minidiff.models.saved import Variant, load_variant, save_variant

METHODS: dict[str, Callable[..., Variant]] = {
    "prune": prune, "quantize": quantize, "distill": distill, "lottery_ticket": lottery_ticket,
    "finetune": finetune,
}


def population(method: str | Callable[..., Variant], model: nn.Module, seeds: Sequence[int],
               *args: Any, **kwargs: Any) -> list[Variant]:
    """Apply ``method`` once per seed: ``[method(model, *args, seed=s, **kwargs) for s in seeds]``.

    Population-level measures (PIE, CIE, per-class t-tests; Hooker et al. 2019)
    need several models per condition; the seed drives fine-tuning data order,
    dropout and initialisation. ``method`` is a callable or one of
    ``"prune"``, ``"quantize"``, ``"distill"``, ``"lottery_ticket"``, ``"finetune"``.
    Each variant's manifest gets ``name = "<method>-seed<s>"`` and the
    population's seed list.
    """
    fn = METHODS.get(method) if isinstance(method, str) else method
    if fn is None or not callable(fn):
        raise ValueError(f"unknown method {method!r}; use a callable or one of {sorted(METHODS)}")
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds must be a non-empty list of distinct integers, got {seeds}")
    out = []
    label = method if isinstance(method, str) else getattr(method, "__name__", "variant")
    for s in seeds:
        v = fn(model, *args, seed=s, **kwargs)
        v.manifest.setdefault("name", f"{label}-seed{s}")
        v.manifest["population_seeds"] = seeds
        out.append(v)
    return out


__all__ = ["Variant", "distill", "finetune", "load_variant", "lottery_ticket", "population", "prune", "quantize",
           "save_variant"]
