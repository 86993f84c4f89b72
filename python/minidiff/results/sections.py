"""Section types of a :class:`~minidiff.results.Results`: one per characteristic.

A section is a ``dict`` subclass (so ``results["prediction_errors"]["int8"]["churn"]``
keeps working) whose values are typed entries (pydantic models with dict-style
access) keyed by variant, or by model group for ``models``. Each section type
knows its JSON key, its title, how its entries are typed, and how it becomes
pandas DataFrames and CSV tables. The report renders sections through the
renderer registered for the same key (``minidiff.report.register_renderer``).

Extension point: subclass :class:`Section`, set ``key``, ``title`` and ``Entry``
(a :class:`Entry` subclass; unknown fields are kept), override
:meth:`Section.frames` if one row per entry with the scalar fields is not the right
table, and call :func:`register_section`. Results then read, write and
list it like the built-in sections.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Iterator, Optional, Union

import pandas as pd
from pydantic import BaseModel, ConfigDict, model_validator

from .values import Number, NotComputed, as_float, dig, fill_missing, is_number


class Record(BaseModel):
    """A typed mapping: attributes are also reachable as ``record["name"]``; extra keys are kept."""

    model_config = ConfigDict(extra="allow")

    def __getitem__(self, key: str) -> Any:
        if key in type(self).model_fields or key in (self.model_extra or {}):
            return getattr(self, key)
        raise KeyError(key)

    def __setitem__(self, key: str, value: Any) -> None:
        setattr(self, key, value)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self.keys()

    def __iter__(self) -> Iterator[str]:  # type: ignore[override]
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def get(self, key: str, default: Any = None) -> Any:
        v = getattr(self, key, None) if key in self.keys() else None
        return default if v is None else v

    def setdefault(self, key: str, default: Any) -> Any:
        if self.get(key) is None:
            setattr(self, key, default)
        return getattr(self, key)

    def keys(self) -> list[str]:
        names = [k for k in type(self).model_fields if getattr(self, k) is not None]
        return names + [k for k, v in (self.model_extra or {}).items() if v is not None]

    def items(self) -> list[tuple[str, Any]]:
        return [(k, getattr(self, k)) for k in self.keys()]

    def values(self) -> list[Any]:
        return [getattr(self, k) for k in self.keys()]

    def to_dict(self) -> dict[str, Any]:
        """The plain Python form (nested models become dicts; absent fields are left out)."""
        return self.model_dump(mode="python", exclude_none=True)


class Entry(Record):
    """One entry of a section (a variant's numbers). Missing values are filled with their
    reason on validation (:func:`minidiff.results.values.fill_missing`)."""

    skipped: dict[str, str] = {}

    @model_validator(mode="before")
    @classmethod
    def _fill(cls, data: Any) -> Any:
        return fill_missing(data) if isinstance(data, dict) else data


class CI(Record):
    mean: Number
    ci_low: Number
    ci_high: Number


class AccuracyStats(CI):
    per_member: list[float] = []
    n: Optional[int] = None
    n_boot: Optional[int] = None


class ModelEntry(Entry):
    members: list[str] = []
    recipe: str = ""
    seeds: list[Any] = []
    num_params: Optional[Union[int, NotComputed]] = None
    nonzero_fraction: Optional[Number] = None
    size_mb: Optional[Number] = None
    accuracy: Optional[Union[AccuracyStats, NotComputed]] = None
    calibration: Optional[dict[str, Number]] = None


class DivergenceStats(Record):
    mean: Number
    p50: Number
    p90: Number
    p99: Number
    max: Number
    histogram: dict[str, list[float]] = {}


class PredictionErrorsEntry(Entry):
    pairs: list[str] = []
    churn: Number
    reference_churn: Optional[Number] = None
    accuracy_change: Optional[Union[CI, NotComputed]] = None
    flips: Optional[dict[str, Number]] = None
    error_jaccard: Optional[Number] = None
    divergence: dict[str, DivergenceStats] = {}
    epsilon: Optional[float] = None


class SimilarityProfile(Record):
    """Second-order similarity of matched layers (``[metrics] similarity``), mean over the
    seed pairs. ``profile[measure][i]`` compares base layer ``layers[i]`` with the variant's
    ``matched_layers[i]`` (``matched_by``: ``"position"`` for aligned layers, else
    ``"cka_correspondence"``); ``matrices`` (layers x ``layers_variant``) only with
    ``similarity_heatmaps``."""

    measures: list[str] = []
    matched_by: str = "position"
    layers: list[str] = []
    matched_layers: list[str] = []
    pairs: Optional[int] = None
    profile: dict[str, list[float]] = {}
    matrices: Optional[dict[str, list[list[float]]]] = None
    layers_variant: Optional[list[str]] = None


class LayerErrorStats(Record):
    """Per-layer error of matched layers (:func:`minidiff.layer_error`), pooled over the seed
    pairs: one value per layer in ``layers``. SQNR is ``+inf`` where a layer is unchanged.
    ``first_below`` (absent when no layer is) is the first layer whose SQNR is below
    ``threshold_db``; ``samples`` counts rows per pair (tokens in token mode)."""

    layers: list[str] = []
    rel_error: list[float] = []
    sqnr_db: list[float] = []
    cosine: list[float] = []
    max_abs: list[float] = []
    samples: Optional[int] = None
    pairs: Optional[int] = None
    threshold_db: Optional[float] = None
    below_threshold: list[str] = []
    first_below: Optional[str] = None


class RepresentationEntry(Entry):
    cka: Optional[dict[str, Any]] = None
    knn_overlap: Optional[dict[str, Any]] = None
    similarity: Optional[Union[SimilarityProfile, NotComputed]] = None
    layer_error: Optional[Union[LayerErrorStats, NotComputed]] = None


class DistributionEntry(Entry):
    ood: Optional[dict[str, Any]] = None
    confidence_shift: Optional[dict[str, Any]] = None
    entropy_shift: Optional[dict[str, Any]] = None
    predicted_class_shift: Optional[dict[str, Any]] = None


def _flat_row(prefix: str, obj: Any, row: dict[str, Any]) -> None:
    """Scalars of ``obj`` into ``row`` as ``prefix_key`` columns; lists and histograms are left out."""
    if isinstance(obj, NotComputed):
        row[prefix] = math.nan
        return
    if isinstance(obj, BaseModel):
        obj = {k: getattr(obj, k) for k in obj.keys()} if isinstance(obj, Record) else obj.model_dump()
    if isinstance(obj, dict):
        if "not_computed" in obj and len(obj) == 1:
            row[prefix] = math.nan
            return
        for k, v in obj.items():
            if k in ("skipped", "histogram", "examples", "matrix") or k.startswith("quantiles"):
                continue
            _flat_row(f"{prefix}_{k}" if prefix else k, v, row)
    elif is_number(obj) or isinstance(obj, (str, bool)):
        row[prefix] = obj


class Section(dict):
    """A results section: ``{variant (or model group): Entry}``. Subclass and register to add one."""

    key: ClassVar[str] = ""
    title: ClassVar[str] = ""
    #: what the entries are keyed by: "variant" or "model"
    keyed_by: ClassVar[str] = "variant"
    Entry: ClassVar[type[Record]] = Entry
    #: one sentence for the report: what the section measures, with the papers
    description: ClassVar[str] = ""

    def __init__(self, data: Any = None) -> None:
        super().__init__()
        for k, v in dict(data or {}).items():
            self[str(k)] = v if isinstance(v, self.Entry) or v == {} else self.Entry.model_validate(v)

    @classmethod
    def from_json(cls, data: Any) -> "Section":
        return cls(data)

    def to_json(self) -> Any:
        return {k: (v.to_dict() if isinstance(v, Record) else fill_missing(v)) for k, v in self.items()}

    def frames(self) -> dict[str, pd.DataFrame]:
        """Named DataFrames of this section; by default one row per entry with its scalar fields
        (nested dicts flattened as ``outer_inner`` columns, a value not computed as NaN)."""
        rows = []
        for k, v in self.items():
            row: dict[str, Any] = {self.keyed_by: k}
            _flat_row("", v, row)
            rows.append(row)
        return {self.key: pd.DataFrame(rows)}

    def not_computed(self) -> list[tuple[str, str, str]]:
        """``(entry, metric, reason)`` for every skipped metric and every value not computed."""
        from .values import walk
        out: list[tuple[str, str, str]] = []
        for k, v in self.items():
            seen = set()
            for path, x in walk(v):
                if isinstance(x, NotComputed) or (isinstance(x, dict) and set(x) == {"not_computed"}):
                    name = ".".join(path)
                    out.append((k, name, x["not_computed"]))
                    seen.add(path[-1] if path else "")
            sk = v.get("skipped") if hasattr(v, "get") else None
            for m, reason in (sk or {}).items():
                if m not in seen:
                    out.append((k, m, str(reason)))
        return out


class ModelsSection(Section):
    key = "models"
    title = "Models"
    keyed_by = "model"
    Entry = ModelEntry
    description = "Every model group: how it was made, its size, accuracy with a bootstrap CI and calibration."

    def frames(self) -> dict[str, pd.DataFrame]:
        rows = [{"model": g, "recipe": m.get("recipe"), "members": len(m.get("members") or []),
                 "accuracy": _num(_g(m, "accuracy", "mean")), "ci_low": _num(_g(m, "accuracy", "ci_low")),
                 "ci_high": _num(_g(m, "accuracy", "ci_high")), "num_params": _num(m.get("num_params")),
                 "nonzero_fraction": _num(m.get("nonzero_fraction")), "size_mb": _num(m.get("size_mb")),
                 "ece": _num(_g(m, "calibration", "ece"))} for g, m in self.items()]
        return {self.key: pd.DataFrame(rows)}


class PredictionErrorsSection(Section):
    key = "prediction_errors"
    title = "Prediction errors"
    Entry = PredictionErrorsEntry
    description = ("Flips, churn and error overlap (Dutta et al. 2024), KL/JS divergence of predictive "
                   "distributions, calibration, per-class effects and compression-identified exemplars "
                   "(Hooker et al. 2019/2020).")

    def frames(self) -> dict[str, pd.DataFrame]:
        rows = []
        out: dict[str, pd.DataFrame] = {}
        for v, pe in self.items():
            rows.append({"variant": v, "accuracy_change": _num(_g(pe, "accuracy_change", "mean")),
                         "accuracy_change_ci_low": _num(_g(pe, "accuracy_change", "ci_low")),
                         "accuracy_change_ci_high": _num(_g(pe, "accuracy_change", "ci_high")),
                         "churn": _num(_g(pe, "churn")), "reference_churn": _num(_g(pe, "reference_churn")),
                         "right_to_wrong": _num(_g(pe, "flips", "right_to_wrong")),
                         "wrong_to_right": _num(_g(pe, "flips", "wrong_to_right")),
                         "error_jaccard": _num(_g(pe, "error_jaccard")), "mcnemar_p": _num(_g(pe, "mcnemar", "p_value")),
                         "kl_mean": _num(_g(pe, "divergence", "kl", "mean")), "kl_p99": _num(_g(pe, "divergence", "kl", "p99")),
                         "js_mean": _num(_g(pe, "divergence", "js", "mean")), "js_p99": _num(_g(pe, "divergence", "js", "p99")),
                         "ece_base": _num(_g(pe, "calibration", "ece_base")),
                         "ece_variant": _num(_g(pe, "calibration", "ece_variant")),
                         "brier_base": _num(_g(pe, "calibration", "brier_base")),
                         "brier_variant": _num(_g(pe, "calibration", "brier_variant")),
                         "pie_count": _num(_g(pe, "pie", "count")), "pie_fraction": _num(_g(pe, "pie", "fraction"))})
            ex = _g(pe, "pie", "examples") or []
            if ex:
                out[f"pies_{v}"] = pd.DataFrame([{k: e.get(k) for k in ("index", "id", "pie", "score", "label",
                                                                        "base_pred", "variant_pred", "text")}
                                                 for e in ex])
        return {self.key: pd.DataFrame(rows), **out}


class RepresentationSection(Section):
    key = "representation"
    title = "Data representation"
    Entry = RepresentationEntry
    description = ("Layer-by-layer CKA (Kornblith et al. 2019; unbiased HSIC, Song et al. 2012), "
                   "k-nearest-neighbour overlap of final embeddings (Rai et al. 2024), and where the "
                   "variant diverges: per-layer SQNR and relative error of matched layers and the "
                   "matched-layer profile of CCA, SVCCA, Procrustes and regression measures "
                   "(Klabunde et al. 2023).")

    def frames(self) -> dict[str, pd.DataFrame]:
        """``representation`` (one row per variant), ``cka_<variant>`` (layer x layer),
        ``layer_error_<variant>`` and ``similarity_<variant>`` (one row per layer)."""
        rows = [{"variant": v, "cka_final": _num(_g(r, "cka", "final")),
                 "cka_reference_final": _num(_g(r, "cka", "reference_final")),
                 "knn_overlap_mean": _num(_g(r, "knn_overlap", "mean")), "knn_k": _num(_g(r, "knn_overlap", "k")),
                 "knn_overlap_reference": _num(_g(r, "knn_overlap", "reference_mean")),
                 "sqnr_threshold_db": _num(_g(r, "layer_error", "threshold_db")),
                 "first_layer_below_sqnr": _g(r, "layer_error", "first_below") or "",
                 "sqnr_db_min": _min(_g(r, "layer_error", "sqnr_db"))} for v, r in self.items()]
        out = {self.key: pd.DataFrame(rows)}
        for var, e in self.items():
            cka = e.get("cka") if hasattr(e, "get") else None
            if cka and cka.get("matrix"):
                out[f"cka_{var}"] = pd.DataFrame(cka["matrix"], index=pd.Index(cka["layers_base"], name="base_layer"),
                                                 columns=cka["layers_variant"]).map(_num)
            le = e.get("layer_error") if hasattr(e, "get") else None
            if le and le.get("layers"):
                below = set(le.get("below_threshold") or [])
                out[f"layer_error_{var}"] = pd.DataFrame(
                    {"layer": le["layers"], **{k: [_num(x) for x in le[k]] for k in
                                               ("rel_error", "sqnr_db", "cosine", "max_abs")},
                     "below_threshold": [n in below for n in le["layers"]]})
            sim = e.get("similarity") if hasattr(e, "get") else None
            if sim and sim.get("layers"):
                out[f"similarity_{var}"] = pd.DataFrame(
                    {"layer": sim["layers"], "matched_layer": sim.get("matched_layers") or [""] * len(sim["layers"]),
                     **{m: [_num(x) for x in vals] for m, vals in (sim.get("profile") or {}).items()}})
        return out


class DistributionSection(Section):
    key = "distribution"
    title = "Data distribution"
    Entry = DistributionEntry
    description = ("Agreement of deep-kNN out-of-distribution flags (Sun et al. 2022), confidence and entropy "
                   "shifts (two-sample KS), predicted-class shift.")

    def frames(self) -> dict[str, pd.DataFrame]:
        rows = [{"variant": v, "ood_jaccard": _num(_g(d, "ood", "jaccard")),
                 "ood_detection_base": _num(_g(d, "ood", "detection_base")),
                 "ood_detection_variant": _num(_g(d, "ood", "detection_variant")),
                 "ood_not_measured": _g(d, "ood", "not_measured") or "",
                 "confidence_ks": _num(_g(d, "confidence_shift", "statistic")),
                 "confidence_ks_p": _num(_g(d, "confidence_shift", "p_value")),
                 "entropy_ks": _num(_g(d, "entropy_shift", "statistic")),
                 "entropy_ks_p": _num(_g(d, "entropy_shift", "p_value")),
                 "predicted_class_tv": _num(_g(d, "predicted_class_shift", "tv"))} for v, d in self.items()]
        return {self.key: pd.DataFrame(rows)}


class AdversarialSection(dict):
    """The adversarial section: :func:`minidiff.adversarial.run_adversarial`'s dict (keyed by
    attack under ``attacks``), an index ``{study tag: that dict}`` in a combined report, or
    ``{"not_measured": reason}``. Its shape belongs to the adversarial package; here it is
    kept as plain data with missing values filled in."""

    key: ClassVar[str] = "adversarial"
    title: ClassVar[str] = "Adversarial vulnerability"
    keyed_by: ClassVar[str] = "attack"
    description: ClassVar[str] = ("Accuracy under attack with the same budget for every model, the change "
                                  "from the base with a paired bootstrap CI, and transfer between models.")

    def __init__(self, data: Any = None) -> None:
        super().__init__(fill_missing(dict(data or {})))

    @classmethod
    def from_json(cls, data: Any) -> "AdversarialSection":
        return cls(data)

    def to_json(self) -> Any:
        return dict(self)

    def _runs(self) -> Iterator[tuple[str, dict[str, Any]]]:
        if "attacks" in self:
            yield "", dict(self)
        else:
            for tag, a in self.items():
                if isinstance(a, dict) and "attacks" in a:
                    yield tag, a

    def frames(self) -> dict[str, pd.DataFrame]:
        """One row per (attack, model): success rate, accuracy under attack, change from base."""
        rows = []
        for tag, adv in self._runs():
            for attack, run in adv["attacks"].items():
                for model, pm in run.get("per_model", {}).items():
                    row: dict[str, Any] = {"study": tag, "attack": attack, "model": model}
                    for k in ("clean_accuracy", "adversarial_accuracy", "success_rate", "mean_perturbation",
                              "mean_queries", "n_correct", "n_success", "gradient"):
                        row[k] = _num(pm.get(k)) if k != "gradient" else pm.get(k)
                    ch = (run.get("change") or {}).get(model) or {}
                    for k in ("adversarial_accuracy", "success_rate"):
                        c = ch.get(k) or {}
                        row[f"{k}_change"] = _num(c.get("delta"))
                        row[f"{k}_change_ci_low"] = _num(c.get("ci_low"))
                        row[f"{k}_change_ci_high"] = _num(c.get("ci_high"))
                    rows.append(row)
        df = pd.DataFrame(rows)
        if not rows or not any(t for t, _ in self._runs()):
            df = df.drop(columns=["study"], errors="ignore")
        return {self.key: df}

    def not_computed(self) -> list[tuple[str, str, str]]:
        if self.get("not_measured"):
            return [("", "adversarial", str(self["not_measured"]))]
        out = []
        for tag, a in self.items():
            if isinstance(a, dict) and a.get("not_measured"):
                out.append((tag, "adversarial", str(a["not_measured"])))
        return out


_g = dig  # the one path getter (results.values)


def _min(xs: Any) -> Any:
    """The smallest defined number of a list (NaN when there is none)."""
    vals = [f for f in (as_float(x) for x in (xs or [])) if f is not None and not math.isnan(f)]
    return min(vals) if vals else math.nan


def _num(x: Any) -> Any:
    f = as_float(x)
    return math.nan if f is None else f


#: The registered section types, in report order.
SECTIONS: dict[str, type] = {}


def register_section(section_type: type, *, replace: bool = False) -> type:
    """Register a section type (a :class:`Section` subclass, or any class with ``key``,
    ``title``, ``from_json``, ``to_json``, ``frames`` and ``not_computed``). Usable as a
    class decorator. Its ``key`` becomes a top-level key of results.json."""
    key = getattr(section_type, "key", "")
    if not key or not getattr(section_type, "title", ""):
        raise ValueError(f"{section_type!r} needs non-empty class attributes key and title")
    missing = [m for m in ("from_json", "to_json", "frames", "not_computed") if not hasattr(section_type, m)]
    if missing:
        raise TypeError(f"{section_type.__name__} lacks {missing}; subclass minidiff.results.Section")
    if key in RESERVED_KEYS:
        raise ValueError(f"{key!r} is a reserved top-level key of results.json")
    if key in SECTIONS and SECTIONS[key] is not section_type and not replace:
        raise ValueError(f"a section type for {key!r} is already registered; pass replace=True to swap it")
    SECTIONS[key] = section_type
    return section_type


#: top-level keys of results.json that are not sections
RESERVED_KEYS = frozenset({"schema", "study", "variants", "sections", "thresholds", "verdicts", "timing", "studies"})

for _s in (ModelsSection, PredictionErrorsSection, RepresentationSection, DistributionSection, AdversarialSection):
    register_section(_s)
