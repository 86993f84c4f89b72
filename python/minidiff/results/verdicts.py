"""Verdict rules: one object per characteristic decides the verdict AND writes its legend.

Each rule holds its thresholds as fields; :meth:`VerdictRule.decide` applies them to
the numbers of one variant and :meth:`VerdictRule.legend` states them in words from
the same fields, so the legend in results.json and in the report can never drift
from what was decided. One vocabulary everywhere (results.json, CSV, terminal,
HTML): :class:`Verdict` ``same`` / ``minor`` / ``differs`` / ``not_measured``.

The registered rules, in order, ARE the list of characteristics
(:func:`characteristics`); a new characteristic (for example a language-model
token-divergence verdict) is added with :func:`register_rule`.
"""

from __future__ import annotations

import dataclasses
from enum import Enum
from typing import Any, Mapping, Sequence

from pydantic import BaseModel, ConfigDict

from .values import as_float, dig


class Verdict(str, Enum):
    """The verdict of one characteristic for one variant; the value is also its label."""

    SAME = "same"
    MINOR = "minor"
    DIFFERS = "differs"
    NOT_MEASURED = "not_measured"

    def __str__(self) -> str:
        return self.value

    @property
    def label(self) -> str:
        """The word shown in every output (HTML, terminal, CSV, JSON)."""
        return self.value

    @property
    def meaning(self) -> str:
        return _MEANING[self]


_MEANING = {
    Verdict.SAME: "within what retraining or resampling alone would change",
    Verdict.MINOR: "measurable but small",
    Verdict.DIFFERS: "the compressed model is not a miniature of the base on this characteristic",
    Verdict.NOT_MEASURED: "the data needed was not given (the reason is in the cell and in 'Not computed, and why')",
}


class VerdictCell(BaseModel):
    """One cell of the verdict table: the verdict and the numbers behind it in a few words."""

    model_config = ConfigDict(extra="allow")
    verdict: Verdict
    summary: str = ""

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def _cell(verdict: Verdict, summary: str) -> VerdictCell:
    return VerdictCell(verdict=verdict, summary=summary)


def _pts(x: float) -> str:
    v = 100 * x
    return f"{v:g} point" + ("" if v == 1 else "s")


_get = dig  # the one path getter (results.values)


class VerdictRule:
    """Base class: ``key`` (the verdict column), ``title`` (its header), ``decide``, ``legend``."""

    key: str = ""
    title: str = ""

    def decide(self, variant: str, sections: Mapping[str, Any]) -> VerdictCell:
        """The verdict for ``variant`` from the sections' numbers; ``sections`` maps a section
        name (``prediction_errors``, ``representation``, ...) to that variant's entry, except
        ``adversarial``, which is the whole adversarial section (it is keyed by model)."""
        raise NotImplementedError

    def legend(self) -> str:
        """How the verdict is decided, in words, from this rule's thresholds."""
        raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class AccuracyRule(VerdictRule):
    """Accuracy change (variant - base) with its paired-bootstrap CI."""

    minor_below: float = 0.01
    key: str = "accuracy"
    title: str = "Accuracy"

    def decide(self, variant: str, sections: Mapping[str, Any]) -> VerdictCell:
        ac = _get(sections.get("prediction_errors"), "accuracy_change")
        lo, hi, mean = (as_float(_get(ac, k)) for k in ("ci_low", "ci_high", "mean"))
        if lo is None or hi is None or mean is None:
            return _cell(Verdict.NOT_MEASURED, "no labels")
        if lo <= 0 <= hi:
            v = Verdict.SAME
        else:
            v = Verdict.DIFFERS if abs(mean) >= self.minor_below else Verdict.MINOR
        return _cell(v, f"Δ {100 * mean:+.2f} pts [{100 * lo:+.2f}, {100 * hi:+.2f}]")

    def legend(self) -> str:
        return (f"same: the paired-bootstrap CI of the accuracy change contains 0; minor: it excludes 0 but "
                f"|change| < {_pts(self.minor_below)}; differs: it excludes 0 and |change| >= {_pts(self.minor_below)}")


@dataclasses.dataclass(frozen=True)
class PredictionErrorsRule(VerdictRule):
    """Churn against the base seed-to-seed churn (or absolute bounds), McNemar as a floor."""

    same_ratio: float = 1.5
    differs_ratio: float = 3.0
    same_abs: float = 0.02
    differs_abs: float = 0.10
    alpha: float = 0.05
    key: str = "prediction_errors"
    title: str = "Prediction errors"

    def decide(self, variant: str, sections: Mapping[str, Any]) -> VerdictCell:
        pe = sections.get("prediction_errors")
        churn = as_float(_get(pe, "churn"))
        if churn is None:
            return _cell(Verdict.NOT_MEASURED, "prediction errors not measured")
        ref = as_float(_get(pe, "reference_churn"))
        if ref is not None:
            v = (Verdict.SAME if churn <= self.same_ratio * ref
                 else Verdict.DIFFERS if churn > self.differs_ratio * ref else Verdict.MINOR)
            summ = f"churn {100 * churn:.1f}% vs {100 * ref:.1f}% between base seeds"
        else:
            v = (Verdict.SAME if churn <= self.same_abs
                 else Verdict.DIFFERS if churn > self.differs_abs else Verdict.MINOR)
            summ = f"churn {100 * churn:.1f}%"
        mc = _get(pe, "mcnemar")
        p = as_float(_get(mc, "p_value"))
        if p is not None and p < self.alpha and v == Verdict.SAME:
            v = Verdict.MINOR
        if mc:
            summ += f"; McNemar p={p:.2g}" if p is not None else "; McNemar p not computed"
        pie = _get(pe, "pie")
        if _get(pie, "population") and as_float(_get(pie, "count")) is not None:
            summ += f"; {pie['count']} PIEs"
        return _cell(v, summ)

    def legend(self) -> str:
        return (f"churn = share of examples whose prediction changed. With >= 2 base seeds, reference r = churn "
                f"between two base seeds: same if churn <= {self.same_ratio:g} r, differs if churn > "
                f"{self.differs_ratio:g} r, minor between. Without seeds: same <= {100 * self.same_abs:g}%, differs > "
                f"{100 * self.differs_abs:g}%. A significant McNemar test (p < {self.alpha:g}) is at least minor")


@dataclasses.dataclass(frozen=True)
class RepresentationRule(VerdictRule):
    """Final-embedding CKA against fixed bars, relaxed by the two-base-seed CKA when there is one."""

    same_at: float = 0.95
    differs_below: float = 0.80
    reference_margin: float = 0.10
    key: str = "representation"
    title: str = "Representation"

    def decide(self, variant: str, sections: Mapping[str, Any]) -> VerdictCell:
        rep = sections.get("representation")
        cka = _get(rep, "cka")
        c = as_float(_get(cka, "final"))
        if not cka or c is None:
            return _cell(Verdict.NOT_MEASURED, "no layers captured" if not cka else "final CKA not computed")
        r = as_float(_get(cka, "reference_final"))
        same_bar = min(self.same_at, r) if r is not None else self.same_at
        diff_bar = min(self.differs_below, r - self.reference_margin) if r is not None else self.differs_below
        v = Verdict.SAME if c >= same_bar else (Verdict.DIFFERS if c < diff_bar else Verdict.MINOR)
        summ = f"final CKA {c:.3f}" + (f" (seeds {r:.3f})" if r is not None else "")
        knn = as_float(_get(rep, "knn_overlap", "mean"))
        if knn is not None:
            summ += f"; kNN overlap {knn:.2f}"
        return _cell(v, summ)

    def legend(self) -> str:
        return (f"final-embedding linear CKA c, with r = the CKA between two base seeds when there are several: "
                f"same if c >= {self.same_at:g} (or >= r), differs if c < {self.differs_below:g} and "
                f"c < r - {self.reference_margin:g}, minor between")


@dataclasses.dataclass(frozen=True)
class DistributionRule(VerdictRule):
    """OOD-flag agreement and the KS statistic of the confidence distributions."""

    jaccard_same: float = 0.7
    jaccard_differs: float = 0.5
    ks_same: float = 0.1
    ks_differs: float = 0.25
    key: str = "distribution"
    title: str = "Data distribution"

    def decide(self, variant: str, sections: Mapping[str, Any]) -> VerdictCell:
        dist = sections.get("distribution")
        ks = as_float(_get(dist, "confidence_shift", "statistic"))
        if ks is None:
            return _cell(Verdict.NOT_MEASURED, "distribution not measured")
        jac = as_float(_get(dist, "ood", "jaccard"))
        if jac is None:
            v = Verdict.SAME if ks <= self.ks_same else (Verdict.DIFFERS if ks > self.ks_differs else Verdict.MINOR)
            return _cell(v, f"confidence KS {ks:.2f}; OOD not measured")
        v = (Verdict.SAME if (ks <= self.ks_same and jac >= self.jaccard_same)
             else Verdict.DIFFERS if (ks > self.ks_differs or jac < self.jaccard_differs) else Verdict.MINOR)
        return _cell(v, f"OOD-flag Jaccard {jac:.2f}; confidence KS {ks:.2f}")

    def legend(self) -> str:
        return (f"same if OOD-flag Jaccard >= {self.jaccard_same:g} (when an OOD set is given) and the KS statistic "
                f"of the confidence distributions <= {self.ks_same:g}; differs if Jaccard < {self.jaccard_differs:g} "
                f"or KS > {self.ks_differs:g}; minor between")


@dataclasses.dataclass(frozen=True)
class AdversarialRule(VerdictRule):
    """Accuracy under attack, variant minus base, with a paired-bootstrap CI per attack."""

    differs_at: float = 0.05
    key: str = "adversarial"
    title: str = "Adversarial"

    def decide(self, variant: str, sections: Mapping[str, Any]) -> VerdictCell:
        adv = sections.get("adversarial")
        nm = _get(adv, "not_measured") or _get(adv, "not_computed")
        if not adv or nm:
            return _cell(Verdict.NOT_MEASURED, str(nm or "no [adversarial] table"))
        worst = None
        for name, run in (_get(adv, "attacks") or {}).items():
            ch = _get(run, "change", variant, "adversarial_accuracy")
            d = as_float(_get(ch, "delta"))
            if d is None:
                continue
            lo, hi = as_float(_get(ch, "ci_low")), as_float(_get(ch, "ci_high"))
            sig = lo is not None and hi is not None and not (lo <= 0 <= hi)
            if worst is None or (sig, abs(d)) > (worst[1], abs(worst[2])):
                worst = (name, sig, d)
        if worst is None:
            return _cell(Verdict.NOT_MEASURED, "no attack result for this variant")
        name, sig, d = worst
        v = Verdict.SAME if not sig else (Verdict.DIFFERS if abs(d) >= self.differs_at else Verdict.MINOR)
        return _cell(v, f"robust accuracy Δ {100 * d:+.1f} pts ({name})")

    def legend(self) -> str:
        return (f"accuracy under attack (same budget for every model), variant minus base with a paired bootstrap "
                f"CI per attack: same if every CI contains 0; differs if one excludes 0 with |change| >= "
                f"{_pts(self.differs_at)}; minor otherwise")


#: The registered rules, in column order: this IS the list of characteristics.
RULES: dict[str, VerdictRule] = {}


def register_rule(rule: VerdictRule, *, replace: bool = False) -> VerdictRule:
    """Add a verdict column. ``rule.key`` names it; a rule with a taken key needs ``replace=True``."""
    if not isinstance(rule, VerdictRule):
        raise TypeError(f"rule must be a VerdictRule, got {type(rule).__name__}")
    if not rule.key or not rule.title:
        raise ValueError("a verdict rule needs a non-empty key and title")
    if rule.key in RULES and not replace:
        raise ValueError(f"a verdict rule for {rule.key!r} is already registered; pass replace=True to swap it")
    RULES[rule.key] = rule
    return rule


for _r in (AccuracyRule(), PredictionErrorsRule(), RepresentationRule(), DistributionRule(), AdversarialRule()):
    register_rule(_r)


def characteristics() -> list[tuple[str, str]]:
    """``[(key, title), ...]`` of every verdict column, in order."""
    return [(r.key, r.title) for r in RULES.values()]


def measured_characteristics(verdicts: Mapping[str, Mapping[str, Any]], variants: Sequence[str]
                             ) -> list[tuple[str, str]]:
    """The verdict columns at least one variant was measured on (every column when none was).

    A column no variant was measured on says nothing (the language-model column of an
    image study, the classification columns of a language-model study), so the
    terminal summary and the report leave it out. ``verdicts[variant][key]`` is a
    :class:`VerdictCell` or its dict form.
    """
    def verdict(cell: Any) -> str:
        if cell is None:
            return Verdict.NOT_MEASURED.value
        v = cell.get("verdict") if isinstance(cell, Mapping) else cell.verdict
        return Verdict(v).value

    cols = characteristics()
    shown = [(k, t) for k, t in cols
             if any(verdict(verdicts.get(v, {}).get(k)) != Verdict.NOT_MEASURED.value for v in variants)]
    return shown or cols


def legends() -> dict[str, str]:
    """``{key: legend}`` of every registered rule (results.json ``thresholds``)."""
    return {k: r.legend() for k, r in RULES.items()}


def decide_all(variant: str, sections: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """Every registered rule's verdict for ``variant``, as plain dicts ``{verdict, summary}``."""
    return {k: r.decide(variant, sections).to_dict() for k, r in RULES.items()}
