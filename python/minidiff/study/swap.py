"""Layer-swap sensitivity as a stage of a study (``[metrics.layer_swap]``).

After the evaluation pass, for every variant that shares the base's architecture,
:func:`run_layer_swap` calls :func:`minidiff.localize.layer_swap` on the base and the
variant (the first seed pair of a population) over a seeded sample of the evaluation
set, and returns the ``layer_swap`` section of results.json in its JSON form
(:mod:`minidiff.results.swap`). Nothing here measures anything itself: every number is
the library function's. :func:`run_swap_jobs` is the part every kind of study shares
(skip reasons, cache, cost line, swaps); :func:`run_layer_swap` makes its jobs for a
classifier study, :meth:`minidiff.lm.study.LMStudy.run_layer_swap` for a language-model
study (windows instead of examples, the study's scored tokens).

- The sample: :func:`swap_subset`, ``examples`` indices drawn without replacement by a
  ``torch.Generator`` seeded with the study seed and sorted (the rule of ``[data] limit``);
  every example when the set is not larger. The indices are stored in the entry.
- The batches: the study's batch size, each made by the base member's ``prepare`` (a
  tensor for images and tables, the tokenizer's dict, attention mask included, for text).
- Which variants: :func:`skip_reason` says why a variant is left out (it runs in ONNX
  Runtime or llama.cpp, or it lacks the base's modules at the chosen granularity); a swap
  that fails because two same-named modules take different shapes (a student of other
  widths) is left out with :func:`minidiff.localize.layer_swap`'s message. The reason is
  the entry's ``skipped["layer_swap"]``.
- The cost: :func:`minidiff.localize.plan` for every variant first (one timed forward
  pass of the base on the first batch each), then one line with the total number of
  forward passes and the estimated seconds is logged (logger ``minidiff.study.swap``,
  level INFO: ``minidiff run -v`` shows it) and put on the progress bar before any swap runs.
- The cache: each variant's entry is stored under ``layer_swap/<key>.json`` in the
  study cache, the key hashing both models' exact fingerprints, the data fingerprint,
  the indices, the settings and the batch size. A rerun (or a run resumed after an
  interruption) reads the variants already done and runs only the rest; a model that has
  no exact fingerprint is never read from or written to the cache.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal, Optional, Sequence

import torch
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator
from torch import nn

from minidiff.results.swap import SHARE_UNDEFINED
from minidiff.study.cache import StudyCache, hash_json

__all__ = ["LAYER_SWAP_EXAMPLES", "LayerSwapConfig", "SECTION_KEY", "SwapJob", "layer_swap_setting", "run_layer_swap",
           "run_swap_jobs", "skip_reason", "swap_batches", "swap_layers", "swap_subset"]

logger = logging.getLogger(__name__)

SECTION_KEY = "layer_swap"
#: Part of every cache key: bump when the stored entry changes meaning.
_ENTRY_VERSION = 1


#: Default of ``[metrics.layer_swap] examples``: evaluation examples each swap runs on. With
#: the study's batch size of 128 that is two batches, so a digits MLP (3 blocks) costs
#: 2 x (2 + 3) = 10 forward passes per variant, all-MiniLM-L6-v2 by block (9 blocks) 22.
LAYER_SWAP_EXAMPLES = 256


class LayerSwapConfig(BaseModel):
    """``[metrics.layer_swap]`` (or ``[metrics] layer_swap = true`` for the defaults):
    layer-swap sensitivity of every same-architecture variant
    (:func:`minidiff.localize.layer_swap`, run by :mod:`minidiff.study.swap`). The same
    table in a classifier and in a language-model study file (there ``examples`` counts
    windows)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    granularity: str | list[str] = Field(
        "block", description="'block', 'linear' or a list of module names present in the base and the variant")
    direction: Literal["into_base", "restore", "both"] = Field(
        "into_base", description="swap a variant layer into the base, restore a base layer in the variant, or both")
    examples: int = Field(LAYER_SWAP_EXAMPLES, ge=1,
                          description="evaluation examples (language-model studies: windows) the swaps run on "
                                      "(a seeded sample; all when fewer)")

    @field_validator("granularity")
    @classmethod
    def _names(cls, v: Any) -> Any:
        if isinstance(v, str) and v not in ("block", "linear"):
            raise ValueError(f"expected 'block', 'linear' or a list of module names, got {v!r} (one module: "
                             f"granularity = [{v!r}])")
        if isinstance(v, list):
            if not v:
                raise ValueError("an empty list names no layer; give module names, or 'block' / 'linear'")
            bad = [n for n in v if not n.strip()]
            if bad:
                raise ValueError("module names must be non-empty strings (e.g. 'encoder.layer.0')")
            dup = sorted({n for n in v if v.count(n) > 1})
            if dup:
                raise ValueError(f"module names are listed more than once: {dup}")
        return v


def layer_swap_setting(value: Any) -> Any:
    """The ``[metrics] layer_swap`` rule of every study file: ``true`` is the defaults,
    ``false`` not run; a table is validated as :class:`LayerSwapConfig`."""
    if isinstance(value, bool):
        return LayerSwapConfig() if value else None
    return value


#: The type of the ``layer_swap`` key in every study file's ``[metrics]`` (classifier and
#: language-model): ``true``/``false`` or a ``[metrics.layer_swap]`` table, one rule.
LayerSwapSetting = Annotated[Optional[LayerSwapConfig], BeforeValidator(layer_swap_setting)]


def swap_subset(n: int, examples: int, seed: int) -> list[int]:
    """The evaluation examples the swaps run on: ``examples`` of ``range(n)`` drawn
    without replacement (``torch.randperm`` with a generator seeded by ``seed``), sorted;
    all of them when ``examples >= n``."""
    if n < 1:
        raise ValueError(f"the evaluation set is empty (n={n}); layer swaps need examples")
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 1:
        raise ValueError(f"examples must be a positive int, got {examples!r}")
    if examples >= n:
        return list(range(n))
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=g)[:examples].sort().values.tolist()


def swap_batches(data: Any, indices: Sequence[int], prepare: Any, batch_size: int) -> list[Any]:
    """The batches of ``data`` at ``indices`` as the model takes them (``prepare`` is a
    study member's: raw inputs -> ``(tensor or dict, attention mask)``)."""
    sub = data.subset(list(indices))
    out = []
    for s in range(0, len(sub), int(batch_size)):
        args, _ = prepare(sub.inputs[s:s + int(batch_size)])
        out.append(args)
    return out


def _runtime(module: nn.Module) -> str | None:
    """The foreign runtime a model (or one of its submodules) runs in, if any."""
    from minidiff.models.sources.gguf import LlamaCppModule
    from minidiff.models.sources.onnx import OnnxModule

    for m in module.modules():
        if isinstance(m, OnnxModule):
            return f"ONNX Runtime ({type(m).__name__})"
        if isinstance(m, LlamaCppModule):
            return f"llama.cpp ({type(m).__name__})"
    return None


def swap_layers(base: nn.Module, granularity: str | list[str]) -> list[str]:
    """The base's layers the granularity names (:func:`minidiff.localize.block_names`,
    :func:`~minidiff.localize.linear_names`, or the listed names). The study calls it
    before its evaluation pass, so a wrong name fails before any model runs.

    Raises
    ------
    ValueError
        When a listed name is not a module of the base (with the nearest names).
    """
    from minidiff.localize import block_names, linear_names

    if granularity == "block":
        return block_names(base)
    if granularity == "linear":
        return linear_names(base)
    names = {n for n, _ in base.named_modules() if n}
    bad = [n for n in granularity if n not in names]
    if bad:
        import difflib
        near = sorted({m for n in bad for m in difflib.get_close_matches(n, sorted(names), n=3, cutoff=0.6)})
        raise ValueError(f"[metrics.layer_swap] granularity names module(s) {bad} that the base does not have"
                         + (f" (nearest: {near})" if near else "") + f"; the base's blocks are {block_names(base)}")
    return list(granularity)


def skip_reason(base: nn.Module, variant: nn.Module, granularity: str | list[str]) -> str | None:
    """Why layer swaps do not apply to this (base, variant) pair, or None when they do.

    They apply when the variant is a torch module holding every layer the granularity
    names in the base under the same name (pruned, quantized, cast or toolchain-quantized
    torch copies). They do not when the variant runs in another runtime (its layers live
    in that runtime's graph) or is of another architecture (a distilled student).

    Raises
    ------
    ValueError
        When ``granularity`` lists module names the base itself does not have (a study
        file error, not a property of the variant).
    """
    layers = swap_layers(base, granularity)
    rt = _runtime(variant)
    if rt is not None:
        return (f"the variant runs in {rt}: its layers are inside that runtime's graph, not torch modules that "
                "can be swapped with the base's (per-layer error and CKA still compare it)")
    if variant is base:
        return "the variant is the base model itself (the same object): there is nothing to swap"
    have = {n for n, _ in variant.named_modules()}
    missing = [n for n in layers if n not in have]
    if missing:
        what = granularity if isinstance(granularity, str) else "the listed"
        return (f"another architecture: the variant has no module(s) {missing[:6]}"
                + (f" (and {len(missing) - 6} more)" if len(missing) > 6 else "")
                + f" among the base's {what} layers; layer swaps need the base's module names "
                "(compare it by CKA instead)")
    return None


def _num_or_reason(x: float, reason: str) -> Any:
    return {"not_computed": reason} if math.isnan(x) else float(x)


def entry_of(res: Any, pair: Sequence[str], indices: Sequence[int]) -> dict[str, Any]:
    """A :class:`minidiff.localize.LayerSwapResult` as a ``layer_swap`` entry (JSON form)."""
    def rows(effects: list[Any]) -> list[dict[str, Any]]:
        return [{"rank": i + 1, "layer": e.layer, "direction": e.direction, "churn": float(e.churn),
                 "kl": float(e.kl), "same_top1": float(e.same_top1),
                 "share_churn": _num_or_reason(e.share_churn, SHARE_UNDEFINED),
                 "share_kl": _num_or_reason(e.share_kl, SHARE_UNDEFINED)} for i, e in enumerate(effects)]

    p = res.plan
    return {"kind": res.kind, "unit": res.unit, "granularity": p.granularity, "layers": list(p.layers),
            "directions": list(p.directions), "pair": list(pair), "n_examples": int(res.n_examples),
            "n_units": int(res.n_units), "indices": [int(i) for i in indices],
            "whole_churn": float(res.whole_churn), "whole_kl": float(res.whole_kl),
            "whole_same_top1": float(res.whole_same_top1), "into_base": rows(res.into_base),
            "restore": rows(res.restore),
            "plan": {"n_batches": int(p.n_batches), "forward_passes": int(p.forward_passes),
                     "seconds_per_pass": float(p.seconds_per_pass), "estimated_seconds": float(p.estimated_seconds)},
            "seconds": float(res.seconds), "kl_function": res.kl_function, "skipped": {}}


def _skipped(reason: str, pair: Sequence[str]) -> dict[str, Any]:
    return {"pair": list(pair), "skipped": {"layer_swap": reason}}


@dataclass
class SwapJob:
    """One variant's layer swap as :func:`run_swap_jobs` runs it.

    ``pair`` names the two models in the entry (``[base member, variant member]``);
    ``keys`` are their exact fingerprints (an empty key, or one starting with
    ``"unhashable"``, keeps the entry out of the cache); ``batches()`` makes the batches
    as the models take them (called only when the entry is not cached); ``forward`` is
    passed to :func:`minidiff.localize.layer_swap` (None: its default call); ``skip`` is a
    reason known before anything runs (the entry is then only that reason).
    """

    name: str
    pair: list[str]
    base: nn.Module
    variant: nn.Module
    keys: tuple[str, str]
    batches: Callable[[], list[Any]]
    forward: Callable[..., Any] | None = None
    skip: str | None = None


def run_swap_jobs(jobs: Sequence[SwapJob], cfg: Any, indices: Sequence[int], *, data_key: Any,
                  settings: dict[str, Any], cache: StudyCache | None = None, progress: bool = False,
                  what: str = "example(s)") -> dict[str, dict[str, Any]]:
    """The ``layer_swap`` section (JSON form), one entry per job, in job order: the part
    of the stage every kind of study shares (skip reasons, cache, the cost stated before
    running, the swaps).

    Parameters
    ----------
    jobs : list of SwapJob
    cfg : LayerSwapConfig
        granularity and direction (``examples`` has already chosen ``indices``).
    indices : list of int
        The sample the batches hold (stored in each entry, part of the cache key).
    data_key : JSON-able
        Fingerprint of the data the indices refer to (part of the cache key).
    settings : dict
        Everything else that changes the numbers (batch size, scoring rule); part of the
        cache key together with the granularity, direction and entry version.
    cache : StudyCache, optional
        Entries are read from and written to ``layer_swap/<key>.json``.
    progress : bool
        Show a progress bar (its title states the cost).
    what : str
        What ``indices`` count, for the logged cost line.
    """
    from minidiff.localize import layer_swap, plan

    indices = [int(i) for i in indices]
    settings = {**settings, "granularity": cfg.granularity, "direction": cfg.direction, "version": _ENTRY_VERSION}
    out: dict[str, dict[str, Any]] = {}
    todo: list[tuple[SwapJob, list[Any], Any, str | None]] = []
    for job in jobs:
        reason = job.skip if job.skip is not None else skip_reason(job.base, job.variant, cfg.granularity)
        if reason is not None:
            out[job.name] = _skipped(reason, job.pair)
            continue
        cacheable = cache is not None and not any(k.startswith("unhashable") or not k for k in job.keys)
        rel = None
        if cacheable:
            rel = "layer_swap/" + hash_json({"base": job.keys[0], "variant": job.keys[1], "data": data_key,
                                             "indices": indices, **settings})[:32] + ".json"
            got = cache.load_json(rel)
            if got is not None:
                out[job.name] = got
                continue
        batches = job.batches()
        try:
            p = plan(job.base, job.variant, batches, granularity=cfg.granularity, direction=cfg.direction,
                     forward=job.forward, max_examples=None)
        except ValueError as e:
            out[job.name] = _skipped(f"layer swaps do not apply: {e}", job.pair)
            continue
        out[job.name] = {}  # keeps the study's variant order; filled below
        todo.append((job, batches, p, rel))
    if todo:
        passes = sum(t[2].forward_passes for t in todo)
        est = sum(t[2].estimated_seconds for t in todo)
        msg = (f"layer swap: {len(todo)} variant(s) x {len(indices)} {what}, {cfg.granularity} granularity, "
               f"{cfg.direction}: {passes} forward passes, about {est:.1f} s")
        logger.info(msg)  # each variant's own plan is logged by layer_swap just before it runs
        from tqdm.auto import tqdm
        bar = tqdm(total=len(todo), desc=f"layer swap ({passes} forward passes)", unit="variant",
                   disable=not progress, leave=False)
        try:
            for job, batches, p, rel in todo:
                t0 = time.perf_counter()
                try:
                    res = layer_swap(job.base, job.variant, batches, granularity=cfg.granularity,
                                     direction=cfg.direction, forward=job.forward, max_examples=None)
                except ValueError as e:  # e.g. same names, other widths: layer_swap names the layer
                    out[job.name] = _skipped(f"layer swaps do not apply: {e}", job.pair)
                else:
                    out[job.name] = entry_of(res, job.pair, indices)
                    logger.info("  %s: done in %.1f s", job.name, time.perf_counter() - t0)
                if rel is not None:  # a failed swap fails again on the same models: keep its reason too
                    cache.save_json(rel, out[job.name])
                bar.update(1)
        finally:
            bar.close()
    return out


def run_layer_swap(pairs: Sequence[tuple[str, Any, Any]], data: Any, cfg: Any, *, seed: int, batch_size: int,
                   cache: StudyCache | None = None, progress: bool = False) -> dict[str, dict[str, Any]]:
    """The ``layer_swap`` section (JSON form) of a classifier study: one entry per variant.

    Parameters
    ----------
    pairs : list of (variant name, base member, variant member)
        :class:`minidiff.study.capture.Member` objects (module, ``prepare``, cache ``key``).
    data : ExampleSet
        The evaluation set; the swaps run on :func:`swap_subset` of it.
    cfg : LayerSwapConfig
        ``[metrics.layer_swap]``: granularity, direction, examples.
    seed, batch_size : int
        The study's.
    cache : StudyCache, optional
        Entries are read from and written to ``layer_swap/<key>.json``.
    progress : bool
        Show a progress bar (its title states the cost).
    """
    indices = swap_subset(len(data), cfg.examples, seed)
    jobs = [SwapJob(name, [bm.name, vm.name], bm.module, vm.module, (bm.key, vm.key),
                    functools.partial(swap_batches, data, indices, bm.prepare, batch_size))
            for name, bm, vm in pairs]
    return run_swap_jobs(jobs, cfg, indices, data_key=data.fingerprint() if cache is not None else None,
                         settings={"batch_size": int(batch_size)}, cache=cache, progress=progress)
