"""What each characteristic measures while the models stream, declared once.

A characteristic (prediction errors, representation, distribution) names the
streaming statistics it needs; the runner (:mod:`minidiff.study.runner`) builds
exactly those accumulators, feeds every batch to them and synchronises them
across ranks through their declared reductions; the analysis
(:mod:`minidiff.study.analysis`) reads their ``compute()``. Nothing else in the
study re-implements a statistic the library has.

Scopes
------
``"members"``: one accumulator over every model of the study (the pairwise
agreement counts of all N models at once: churn, flips, error sets for every
pair, the seed-to-seed reference included).
``"member"``: one accumulator per model (calibration bins, predicted-class
histogram).
``"pair"``: one per compared (base, variant) pair, fed the captured layers
(CKA statistics, per-layer error). Only these hold state that cannot be rebuilt
from the cached per-example outputs, so only these are stored in the cache after
each chunk.

A statistic that does not apply to a pair (per-layer error between layers of
different widths) builds a :class:`NotApplicable` in its place: it holds no state,
ignores every batch, and its ``compute()`` raises
:class:`~minidiff.metrics._checks.MetricSkipped` with the reason, which the
analysis reports under ``skipped``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

from minidiff.accumulate import Accumulator

Scope = Literal["members", "member", "pair"]


@dataclass(frozen=True)
class StatSetup:
    """What an accumulator's constructor may need."""

    metrics: Any                       # MetricsConfig
    num_models: int = 0                # scope "members"
    num_classes: int = 0               # width of the logits (scope "member")
    widths_a: tuple[int, ...] = ()     # captured layer widths (scope "pair")
    widths_b: tuple[int, ...] = ()
    device: str = "cpu"


@dataclass
class StatBatch:
    """One batch as the statistics see it (float32 logits, int64 labels or None)."""

    logits: list[torch.Tensor]         # one (b, C) per model of the scope (1, 2 or N)
    labels: torch.Tensor | None
    layers: list[list[torch.Tensor]]   # scope "pair": [layers_a, layers_b]


@dataclass(frozen=True)
class StreamStat:
    """A streaming statistic a characteristic declares.

    Attributes
    ----------
    name : key under which the runner returns the accumulator.
    characteristic : the characteristic that needs it.
    scope : see the module docstring.
    build : ``build(setup) -> Accumulator``.
    feed : ``feed(acc, batch)``, called once per batch.
    needs_labels : skipped when the data has no labels.
    """

    name: str
    characteristic: str
    scope: Scope
    build: Callable[[StatSetup], Accumulator]
    feed: Callable[[Accumulator, StatBatch], None]
    needs_labels: bool = False


class NotApplicable(Accumulator):
    """Stands in for a statistic that does not apply to a pair; ``compute()`` says why.

    It declares no state, so caching, resuming, merging and distributed sync treat it
    like any accumulator (with nothing to store or reduce).
    """

    def __init__(self, metric: str, reason: str) -> None:
        super().__init__()
        self.metric = metric
        self.reason = reason

    def config(self) -> dict:
        return {"metric": self.metric, "reason": self.reason}

    def update(self, *args: Any, **kwargs: Any) -> None:
        """Ignore the batch (nothing is measured)."""

    def compute(self) -> Any:
        from minidiff.metrics._checks import MetricSkipped
        raise MetricSkipped(self.metric, self.reason)


def _agreement(setup: StatSetup) -> Accumulator:
    from minidiff.agreement import AgreementAccumulator

    # no class bound here: models with different heads are reported by the study with their widths
    return AgreementAccumulator(setup.num_models)


def _feed_agreement(acc: Any, b: StatBatch) -> None:
    acc.update(torch.stack([lg.argmax(1) for lg in b.logits]), b.labels)


def _calibration(setup: StatSetup) -> Accumulator:
    from minidiff.metrics.calibration import CalibrationAccumulator

    return CalibrationAccumulator(setup.metrics.ece_bins)


def _feed_calibration(acc: Any, b: StatBatch) -> None:
    acc.update(torch.softmax(b.logits[0].double(), dim=1), b.labels)


def _class_histogram(setup: StatSetup) -> Accumulator:
    from minidiff.metrics.distribution import ClassHistogramAccumulator

    return ClassHistogramAccumulator(setup.num_classes)


def _feed_class_histogram(acc: Any, b: StatBatch) -> None:
    acc.update(b.logits[0].argmax(1))


def _cka(setup: StatSetup) -> Accumulator:
    from minidiff.similarity import CKAAccumulator

    return CKAAccumulator(list(setup.widths_a), list(setup.widths_b), estimator=setup.metrics.cka_estimator,
                          device=setup.device)


def _feed_cka(acc: Any, b: StatBatch) -> None:
    acc.update(b.layers[0], b.layers[1])


def _layer_error(setup: StatSetup) -> Accumulator:
    """Per-layer error (:class:`minidiff.LayerErrorAccumulator`) when the two members'
    captured layers match one to one in width: a variant of the base's architecture
    (pruned, quantized, cast, or an external model whose layers were matched by name)
    gets the base's aligned layer list. Other pairs get a :class:`NotApplicable`."""
    wa, wb = tuple(setup.widths_a), tuple(setup.widths_b)
    if not wa or wa != wb:
        why = (f"{len(wa)} layers of widths {list(wa)} against {len(wb)} of widths {list(wb)}"
               if len(wa) != len(wb) else f"layer widths {list(wa)} against {list(wb)}")
        return NotApplicable("layer_error", "per-layer error needs layers matched one to one with equal widths "
                             f"(the base's architecture); this variant has {why}: compare it by CKA instead")
    from minidiff.similarity import LayerErrorAccumulator

    return LayerErrorAccumulator(wa, device=setup.device)


def _feed_layer_error(acc: Any, b: StatBatch) -> None:
    acc.update(b.layers[0], b.layers[1])


#: Every streaming statistic of the study, by characteristic.
STREAM_STATS: tuple[StreamStat, ...] = (
    StreamStat("agreement", "prediction_errors", "members", _agreement, _feed_agreement),
    StreamStat("calibration", "prediction_errors", "member", _calibration, _feed_calibration, needs_labels=True),
    StreamStat("class_histogram", "distribution", "member", _class_histogram, _feed_class_histogram),
    StreamStat("cka", "representation", "pair", _cka, _feed_cka),
    StreamStat("layer_error", "representation", "pair", _layer_error, _feed_layer_error),
)


def stats_for(characteristics: list[str] | tuple[str, ...], *, labels: bool, scope: Scope,
              linear_cka: bool = True) -> list[StreamStat]:
    """The statistics the chosen characteristics need, for one scope."""
    out = []
    for s in STREAM_STATS:
        if s.scope != scope or s.characteristic not in characteristics or (s.needs_labels and not labels):
            continue
        if s.name == "cka" and not linear_cka:  # the RBF kernel does not stream (first rows only)
            continue
        out.append(s)
    return out
