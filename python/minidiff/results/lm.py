"""The language-model section of :class:`~minidiff.results.Results` and its verdict rule.

Section ``language_model`` (what :meth:`minidiff.lm.LMStudy.run` produces): the
study's description and one typed entry per variant,

``{"study": {n_ctx, n_windows, scored_tokens, task, mode, scoring, ...},
"variants": {variant: LanguageModelEntry}}``,

or, in a combined report (the demo), an index ``{study tag: that}``, or
``{"not_measured": reason}``. An entry holds ``divergence`` (the llama.cpp
``--kl-divergence`` statistics of :class:`minidiff.lm.TokenDivergenceResult`, with
the where-it-hurts breakdowns ``by_frequency`` / ``by_position`` / ``by_entropy``,
``top_windows`` and ``flips``), ``cka`` (token-level layer x layer CKA with
``layers_base`` / ``layers_variant``), ``where_it_hurts`` (decoded worst windows),
``flipped_tokens`` (decoded flips in context) and the variant's ``manifest``.

Tables (CSV files): ``language_model`` (one row per variant), ``lm_<variant>``
(one row per llama.cpp statistic: value and uncertainty, then the KLD and Δp
percentiles) and ``lm_<variant>_buckets`` (the three breakdowns).

Verdict rule ``language_model`` (:class:`LanguageModelRule`): mean KLD(base || variant)
per token and the fraction of tokens whose top-1 is unchanged ("Same top p").
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Iterator, Mapping, Optional, Union

import pandas as pd

from .sections import Entry, Record, _num, register_section
from .values import Number, NotComputed, as_float, fill_missing, walk
from .verdicts import Verdict, VerdictCell, VerdictRule, _get, register_rule

__all__ = ["LanguageModelSection", "LanguageModelEntry", "LMStatistics", "LanguageModelRule", "LLAMA_CPP_ROWS"]

#: (llama.cpp line, value field, uncertainty field or None): the ``lm_<variant>`` table's rows
LLAMA_CPP_ROWS = (
    ("Mean PPL(Q)", "ppl_variant", "ppl_variant_err"),
    ("Mean PPL(base)", "ppl_base", "ppl_base_err"),
    ("Cor(ln(PPL(Q)), ln(PPL(base)))", "ln_ppl_correlation", None),
    ("Mean ln(PPL(Q)/PPL(base))", "ln_ppl_ratio", "ln_ppl_ratio_err"),
    ("Mean PPL(Q)/PPL(base)", "ppl_ratio", "ppl_ratio_err"),
    ("Mean PPL(Q)-PPL(base)", "ppl_diff", "ppl_diff_err"),
    ("Mean KLD", "kld", "kld_err"),
    ("Maximum KLD", "kld_max", None),
    ("Minimum KLD", "kld_min", None),
    ("Mean Δp", "delta_p", "delta_p_err"),
    ("Maximum Δp", "delta_p_max", None),
    ("Minimum Δp", "delta_p_min", None),
    ("RMS Δp", "delta_p_rms", "delta_p_rms_err"),
    ("Same top p", "same_top1", "same_top1_err"),
    ("Mean KLD(Q||base)", "kld_reverse", "kld_reverse_err"),
    ("Mean JS", "js", "js_err"),
    ("Top-5 overlap", "top5_overlap", None),
    ("Top-10 overlap", "top10_overlap", None),
    ("Mean base entropy", "entropy_base", None),
)


class LMStatistics(Record):
    """:class:`minidiff.lm.TokenDivergenceResult` as stored (typed headline fields; the
    percentiles, breakdowns, top windows and flips are kept as extra keys)."""

    n_tokens: int = 0
    n_scored: int = 0
    ppl_base: Optional[Number] = None
    ppl_variant: Optional[Number] = None
    ppl_ratio: Optional[Number] = None
    ln_ppl_ratio: Optional[Number] = None
    kld: Optional[Number] = None
    kld_err: Optional[Number] = None
    kld_max: Optional[Number] = None
    delta_p_rms: Optional[Number] = None
    same_top1: Optional[Number] = None
    same_top1_err: Optional[Number] = None


class LanguageModelEntry(Entry):
    """One variant against the base in a language-model study."""

    name: str = ""
    divergence: LMStatistics = LMStatistics()
    cka: Optional[Union[list[list[float]], NotComputed]] = None
    layers_base: list[str] = []
    layers_variant: list[str] = []
    where_it_hurts: list[dict[str, Any]] = []
    flipped_tokens: list[dict[str, Any]] = []
    manifest: dict[str, Any] = {}


def _is_study(d: Any) -> bool:
    return isinstance(d, Mapping) and "variants" in d and isinstance(d.get("variants"), Mapping)


class LanguageModelSection(dict):
    """The ``language_model`` section (layout in :mod:`minidiff.results.lm`)."""

    key: ClassVar[str] = "language_model"
    title: ClassVar[str] = "Language model"
    keyed_by: ClassVar[str] = "variant"
    description: ClassVar[str] = (
        "Token-level divergence of next-token distributions with the statistics of llama.cpp's "
        "llama-perplexity --kl-divergence (KLD, Δp, same top-1, PPL ratio), where it hurts (by token "
        "frequency, position, base entropy; worst windows and flipped tokens, cf. Hooker et al. 2019) "
        "and token-level CKA (Kornblith et al. 2019).")

    def __init__(self, data: Any = None) -> None:
        super().__init__()
        d = dict(data or {})
        if _is_study(d):
            self.update(self._study(d))
        elif set(d) <= {"not_measured", "not_computed"}:
            self.update(fill_missing(d))
        else:  # an index over several studies
            for tag, part in d.items():
                self[str(tag)] = self._study(part) if _is_study(part) else fill_missing(part)

    @staticmethod
    def _study(d: Mapping[str, Any]) -> dict[str, Any]:
        out = {"study": fill_missing(dict(d.get("study") or {})), "variants": {}}
        for v, e in d["variants"].items():
            out["variants"][str(v)] = e if isinstance(e, LanguageModelEntry) else LanguageModelEntry.model_validate(e)
        return out

    @classmethod
    def from_json(cls, data: Any) -> "LanguageModelSection":
        return cls(data)

    def to_json(self) -> Any:
        def one(s: Mapping[str, Any]) -> dict[str, Any]:
            return {"study": s["study"], "variants": {k: e.to_dict() for k, e in s["variants"].items()}}
        if _is_study(self):
            return one(self)
        return {k: (one(s) if _is_study(s) else s) for k, s in self.items()}

    def studies(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """``(tag, study part)``: one part with tag ``""``, or each part of an index."""
        if _is_study(self):
            yield "", self
        else:
            for tag, s in self.items():
                if _is_study(s):
                    yield tag, s

    def entries(self) -> Iterator[tuple[str, LanguageModelEntry]]:
        """``(name, entry)`` of every variant; names are ``<tag>-<variant>`` in an index."""
        for tag, s in self.studies():
            for v, e in s["variants"].items():
                yield (f"{tag}-{v}" if tag else v), e

    def entry(self, variant: str) -> LanguageModelEntry | None:
        return dict(self.entries()).get(variant)

    def frames(self) -> dict[str, pd.DataFrame]:
        rows, out = [], {}
        for name, e in self.entries():
            d = e.divergence
            g = lambda k: _num(d.get(k))  # noqa: E731
            kp = d.get("kld_percentiles") or {}
            rows.append({"variant": name, "n_tokens": d.get("n_tokens"), "ppl_base": g("ppl_base"),
                         "ppl_variant": g("ppl_variant"), "ppl_ratio": g("ppl_ratio"),
                         "ln_ppl_ratio": g("ln_ppl_ratio"), "ln_ppl_ratio_err": g("ln_ppl_ratio_err"),
                         "kld": g("kld"), "kld_err": g("kld_err"), "kld_p99": _pct(kp, 99.0), "kld_max": g("kld_max"),
                         "delta_p_rms": g("delta_p_rms"), "same_top1": g("same_top1"),
                         "same_top1_err": g("same_top1_err"), "top5_overlap": g("top5_overlap"), "js": g("js")})
            stats = [{"statistic": label, "value": g(k), "uncertainty": _num(d.get(err)) if err else math.nan}
                     for label, k, err in LLAMA_CPP_ROWS]
            for key, label in (("kld_percentiles", "KLD"), ("delta_p_percentiles", "Δp")):
                for p, x in (d.get(key) or {}).items():
                    stats.append({"statistic": f"{float(p):g}% {label}", "value": _num(x), "uncertainty": math.nan})
            out[f"lm_{name}"] = pd.DataFrame(stats)
            buckets = [{"breakdown": b, **{c: _num(r.get(c)) for c in ("lo", "hi", "n", "kld", "flip_rate", "delta_p")}}
                       for b in ("by_frequency", "by_position", "by_entropy") for r in (d.get(b) or [])]
            if buckets:
                out[f"lm_{name}_buckets"] = pd.DataFrame(buckets)
        return {self.key: pd.DataFrame(rows), **out}

    def not_computed(self) -> list[tuple[str, str, str]]:
        if self.get("not_measured"):
            return [("", "language_model", str(self["not_measured"]))]
        out: list[tuple[str, str, str]] = []
        for name, e in self.entries():
            seen = set()
            for path, x in walk(e):
                if isinstance(x, NotComputed) or (isinstance(x, dict) and set(x) == {"not_computed"}):
                    out.append((name, ".".join(path), x["not_computed"]))
                    seen.add(path[-1] if path else "")
            out += [(name, m, str(r)) for m, r in (e.skipped or {}).items() if m not in seen]
        return out


def _pct(pcts: Mapping[Any, Any], p: float) -> float:
    for k, v in pcts.items():
        if abs(float(k) - p) < 1e-9:
            return _num(v)
    return math.nan


@dataclasses.dataclass(frozen=True)
class LanguageModelRule(VerdictRule):
    """Mean KLD(base || variant) per scored token and the same-top-1 fraction.

    The defaults are this package's choice, not a standard: KLD <= 0.005 nats with
    >= 97% same top-1 is within what 8-bit weights typically cost; KLD > 0.05 or
    < 90% same top-1 means the variant picks a different next token for more than one
    token in ten. Pass other thresholds with ``register_rule(LanguageModelRule(...),
    replace=True)``.
    """

    kld_same: float = 0.005
    same_top1_same: float = 0.97
    kld_differs: float = 0.05
    same_top1_differs: float = 0.90
    key: str = "language_model"
    title: str = "Language model"

    def decide(self, variant: str, sections: Mapping[str, Any]) -> VerdictCell:
        e = sections.get("language_model")
        if isinstance(e, LanguageModelSection):
            e = e.entry(variant)
        kld, same = as_float(_get(e, "divergence", "kld")), as_float(_get(e, "divergence", "same_top1"))
        if kld is None or same is None or math.isnan(kld) or math.isnan(same):
            return VerdictCell(verdict=Verdict.NOT_MEASURED, summary="no language-model study")
        if kld <= self.kld_same and same >= self.same_top1_same:
            v = Verdict.SAME
        elif kld > self.kld_differs or same < self.same_top1_differs:
            v = Verdict.DIFFERS
        else:
            v = Verdict.MINOR
        ratio = as_float(_get(e, "divergence", "ppl_ratio"))
        tail = f", PPL ratio {ratio:.4f}" if ratio is not None and not math.isnan(ratio) else ""
        return VerdictCell(verdict=v, summary=f"KLD {kld:.5f}, same top-1 {100 * same:.1f}%{tail}")

    def legend(self) -> str:
        return (f"mean KLD(base || variant) per scored token k and same top-1 fraction s: same if "
                f"k <= {self.kld_same:g} and s >= {100 * self.same_top1_same:g}%; differs if "
                f"k > {self.kld_differs:g} or s < {100 * self.same_top1_differs:g}%; minor between")


register_section(LanguageModelSection)
register_rule(LanguageModelRule())
