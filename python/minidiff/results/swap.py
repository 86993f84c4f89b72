"""The ``layer_swap`` section of :class:`~minidiff.results.Results`: which layer's
compression the output pays for.

Written by a study whose ``[metrics]`` asks for layer-swap sensitivity
(:mod:`minidiff.study.swap`, numbers from :func:`minidiff.localize.layer_swap`);
absent otherwise. One entry per variant:

``{kind, unit, granularity, directions, pair [base member, variant member], n_examples,
n_units, indices, whole_churn, whole_kl, whole_same_top1, into_base [SwapRow], restore
[SwapRow], plan {n_batches, forward_passes, seconds_per_pass, estimated_seconds},
seconds, kl_function, skipped}``

A :class:`SwapRow` is one swapped layer: ``rank`` (1 = costliest; ``into_base`` by
``kl``, ``restore`` by recovered share), ``layer``, ``churn``, ``kl``, ``same_top1`` and
the shares of the whole-model change ``share_churn``, ``share_kl`` (``{"not_computed":
reason}`` when the whole-model change is 0). A variant the stage does not apply to (an
ONNX Runtime session, another architecture) has only ``skipped["layer_swap"]`` with the
reason.

Tables (CSV files): ``layer_swap`` (one row per variant: the whole-model change, the
costliest layer and its share, the cost) and ``layer_swap_<variant>`` (one row per swap:
every swapped layer in each direction, ranked).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Optional

import pandas as pd

from .sections import Entry, Record, Section, _num, register_section
from .values import Number

__all__ = ["LayerSwapEntry", "LayerSwapSection", "SwapRow", "SHARE_UNDEFINED"]

#: Why a share of the whole-model change is not a number.
SHARE_UNDEFINED = ("undefined: the variant's output equals the base's on these examples (whole-model change 0), "
                   "so there is nothing to take a share of")


class SwapRow(Record):
    """One swap: the base with ``layer`` from the variant (``into_base``), or the variant
    with ``layer`` back from the base (``restore``), compared with the base."""

    rank: int
    layer: str
    direction: str
    churn: Number
    kl: Number
    same_top1: Number
    share_churn: Number
    share_kl: Number


class SwapPlanInfo(Record):
    """:class:`minidiff.localize.SwapPlan`, as stated before the swaps ran."""

    n_batches: int = 0
    forward_passes: int = 0
    seconds_per_pass: Optional[Number] = None
    estimated_seconds: Optional[Number] = None


class LayerSwapEntry(Entry):
    """A variant's layer-swap sensitivity (see :mod:`minidiff.results.swap`)."""

    kind: Optional[str] = None
    unit: Optional[str] = None
    granularity: Optional[str] = None
    layers: Optional[list[str]] = None
    directions: Optional[list[str]] = None
    pair: list[str] = []
    n_examples: Optional[int] = None
    n_units: Optional[int] = None
    indices: Optional[list[int]] = None
    whole_churn: Optional[Number] = None
    whole_kl: Optional[Number] = None
    whole_same_top1: Optional[Number] = None
    into_base: Optional[list[SwapRow]] = None
    restore: Optional[list[SwapRow]] = None
    plan: Optional[SwapPlanInfo] = None
    seconds: Optional[Number] = None
    kl_function: Optional[str] = None


class LayerSwapSection(Section):
    """``layer_swap``: ``{variant: LayerSwapEntry}`` (layout in :mod:`minidiff.results.swap`)."""

    key: ClassVar[str] = "layer_swap"
    title: ClassVar[str] = "Layer-swap sensitivity"
    Entry: ClassVar[type[Record]] = LayerSwapEntry
    description: ClassVar[str] = (
        "Which layer's compression moves the output: one layer of the variant swapped into the base (or one base "
        "layer restored in the variant) at a time, churn and mean KL(base || swapped) on a sample of the "
        "evaluation set, and the share of the whole-model change each layer explains (single-layer sensitivity "
        "as in AIMET's per-layer quantization analysis; cf. HAWQ, Dong et al. 2019).")

    def frames(self) -> dict[str, pd.DataFrame]:
        """``layer_swap`` (one row per variant) and ``layer_swap_<variant>`` (one row per swap)."""
        rows = []
        out: dict[str, pd.DataFrame] = {}
        for var, e in self.items():
            why = (e.get("skipped") or {}).get("layer_swap", "")
            top = (e.get("into_base") or e.get("restore") or [None])[0]
            rows.append({"variant": var, "granularity": e.get("granularity") or "",
                         "directions": "+".join(e.get("directions") or []), "n_examples": _num(e.get("n_examples")),
                         "unit": e.get("unit") or "", "whole_churn": _num(e.get("whole_churn")),
                         "whole_kl": _num(e.get("whole_kl")), "top_layer": top["layer"] if top is not None else "",
                         "top_direction": top["direction"] if top is not None else "",
                         "top_kl": _num(top["kl"]) if top is not None else math.nan,
                         "top_share_kl": _num(top["share_kl"]) if top is not None else math.nan,
                         "forward_passes": _num((e.get("plan") or {}).get("forward_passes")),
                         "seconds": _num(e.get("seconds")), "skipped": why})
            swaps = list(e.get("into_base") or []) + list(e.get("restore") or [])
            if swaps:
                out[f"layer_swap_{var}"] = pd.DataFrame(
                    [{"direction": r["direction"], "rank": r["rank"], "layer": r["layer"], "churn": _num(r["churn"]),
                      "kl": _num(r["kl"]), "same_top1": _num(r["same_top1"]), "share_churn": _num(r["share_churn"]),
                      "share_kl": _num(r["share_kl"])} for r in swaps],
                    columns=["direction", "rank", "layer", "churn", "kl", "same_top1", "share_churn", "share_kl"])
        return {self.key: pd.DataFrame(rows), **out}


register_section(LayerSwapSection)
