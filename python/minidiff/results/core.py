"""The :class:`Results` object: typed sections, verdicts, DataFrames, save and load."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any, Iterator, Mapping

import pandas as pd

from .sections import RESERVED_KEYS, SECTIONS, Record
from .values import encode, fill_missing
from .verdicts import Verdict, VerdictCell, characteristics, legends

SCHEMA = "minidiff.results/2"
SCHEMA_V1 = "minidiff.results/1"
SUPPORTED = (SCHEMA, SCHEMA_V1)


class StudyInfo(Record):
    """What was compared on which data (``results["study"]``)."""

    name: str = "study"
    seed: int = 0
    minidiff_version: str = ""
    population: int = 1
    config: dict[str, Any] | None = None
    notes: list[str] = []
    data: dict[str, Any] = {}
    #: the OOD set; absent when none was given (the reason is in ``skipped["ood"]``)
    ood: dict[str, Any] | None = None
    skipped: dict[str, str] = {}


def _drop_none(obj: Any) -> Any:
    """A study file echo without its unset (None) keys: they mean "use the default"."""
    if isinstance(obj, dict):
        return {k: _drop_none(v) for k, v in obj.items() if v is not None}
    if isinstance(obj, list):
        return [_drop_none(v) for v in obj]
    return obj


def _decode_arrays(obj: Any) -> Any:
    """JSON -> Python: ``"NaN"``/``"Infinity"``/``"-Infinity"`` back to floats inside arrays
    of numbers (a list that holds at least one real number)."""
    if isinstance(obj, dict):
        return {k: _decode_arrays(v) for k, v in obj.items()}
    if isinstance(obj, list):
        if any(isinstance(x, (int, float)) and not isinstance(x, bool) for x in obj):
            return [float(x) if isinstance(x, str) and x in ("NaN", "Infinity", "-Infinity") else _decode_arrays(x)
                    for x in obj]
        return [_decode_arrays(x) for x in obj]
    return obj


#: The module that draws the report, loaded by name when a report is needed (the way pandas
#: loads its plotting backend), so that this layer does not depend on the report layer. It
#: must provide ``render_files(results, plots=True) -> {file name: text or bytes}`` (at least
#: ``report.html``; figures as ``plots/<name>.png`` / ``.svg``) and ``verdict_table(results) -> html``.
REPORT_BACKEND = "minidiff.report"


def report_backend() -> Any:
    """The report module named by :data:`REPORT_BACKEND`."""
    import importlib
    mod = importlib.import_module(REPORT_BACKEND)
    missing = [f for f in ("render_files", "verdict_table") if not hasattr(mod, f)]
    if missing:
        raise TypeError(f"report backend {REPORT_BACKEND!r} lacks {missing}")
    return mod


class Results:
    """The outcome of a study, typed: ``study``, ``variants``, ``verdicts`` and one section per
    registered section type (``models``, ``prediction_errors``, ``representation``,
    ``distribution``, ``adversarial``, plus any registered later).

    Dict-style reading works as on the JSON form: ``results["verdicts"]["int8"]["accuracy"]["verdict"]``,
    ``results["prediction_errors"]["int8"]["churn"]``. See :mod:`minidiff.results` and
    ``docs/results.md`` for the schema.
    """

    def __init__(self, *, study: StudyInfo | Mapping[str, Any] | None = None, variants: list[str] | None = None,
                 verdicts: Mapping[str, Mapping[str, Any]] | None = None,
                 sections: Mapping[str, Any] | None = None, thresholds: Mapping[str, str] | None = None,
                 timing: Mapping[str, float] | None = None, studies: Mapping[str, Any] | None = None,
                 extra: Mapping[str, Any] | None = None) -> None:
        st = study if isinstance(study, StudyInfo) else dict(study or {})
        if isinstance(st, dict):
            if st.get("config") is not None:
                st["config"] = _drop_none(st["config"])
            else:
                st.pop("config", None)
            ood = st.pop("ood", None)
            st = fill_missing(st)
            if ood is None or (isinstance(ood, dict) and set(ood) == {"not_computed"}):
                st["skipped"] = {**st.get("skipped", {}), "ood": (ood or {}).get("not_computed", "no OOD set was given")}
            else:
                st["ood"] = fill_missing(ood)
            st = StudyInfo.model_validate(st)
        self.study: StudyInfo = st
        self.variants: list[str] = list(variants or [])
        self.verdicts: dict[str, dict[str, VerdictCell]] = {
            str(v): {str(k): c if isinstance(c, VerdictCell) else VerdictCell.model_validate(c)
                     for k, c in (cells or {}).items()}
            for v, cells in (verdicts or {}).items()}
        self.sections: dict[str, Any] = {}
        for key, data in (sections or {}).items():
            typ = SECTIONS.get(key)
            if typ is None:
                self.sections[key] = fill_missing(data)  # a section type this installation does not know
            else:
                self.sections[key] = data if isinstance(data, typ) else typ.from_json(data)
        self.thresholds: dict[str, str] = dict(thresholds) if thresholds else legends()
        self.timing: dict[str, float] = dict(timing or {})
        self.studies: dict[str, Any] = dict(studies or {})
        self.extra: dict[str, Any] = fill_missing(dict(extra or {}))

    # -- construction -----------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | "Results") -> "Results":
        """From the JSON form (``minidiff.results/2`` or ``/1``; a Results is returned as is)."""
        if isinstance(data, Results):
            return data
        if not isinstance(data, Mapping):
            raise TypeError(f"expected a results dict or Results, got {type(data).__name__}")
        d = _decode_arrays(dict(data))
        schema = d.get("schema", SCHEMA)
        if schema not in SUPPORTED:
            raise ValueError(f"unsupported results schema {schema!r}; this minidiff reads {', '.join(SUPPORTED)}")
        v1 = schema == SCHEMA_V1
        sec_keys = [k for k in d if k in SECTIONS] + [k for k in d.get("sections", []) if k not in SECTIONS and k in d]
        extra = {k: v for k, v in d.items() if k not in RESERVED_KEYS and k not in sec_keys}
        return cls(study=d.get("study"), variants=d.get("variants"), verdicts=d.get("verdicts"),
                   sections={k: d[k] for k in sec_keys}, thresholds=None if v1 else d.get("thresholds"),
                   timing=d.get("timing"), studies=d.get("studies"), extra=extra)

    @classmethod
    def load(cls, path: str | Path) -> "Results":
        """Read a ``results.json`` (schema ``/2`` or ``/1``), or the one inside an output folder."""
        p = Path(path)
        if p.is_dir():
            p = p / "results.json"
        if not p.is_file():
            raise FileNotFoundError(f"no results file at {str(p)!r}; give a results.json or the output folder "
                                    "that holds one")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ValueError(f"{str(p)!r} is not valid JSON ({e}); it is not a minidiff results file") from None
        if not isinstance(data, dict) or "schema" not in data:
            raise ValueError(f"{str(p)!r} is not a minidiff results file (no 'schema' key)")
        return cls.from_dict(data)

    # -- dict-style access (the JSON form's keys) ----------------------------------------
    def keys(self) -> list[str]:
        ks = ["schema", "study", "variants", "thresholds", "verdicts", *self.sections]
        return ks + (["timing"] if self.timing else []) + (["studies"] if self.studies else []) + list(self.extra)

    def __getitem__(self, key: str) -> Any:
        if key == "schema":
            return SCHEMA
        if key in ("study", "variants", "thresholds", "verdicts", "timing", "studies"):
            return getattr(self, key)
        if key in self.sections:
            return self.sections[key]
        if key in self.extra:
            return self.extra[key]
        raise KeyError(key)

    def __setitem__(self, key: str, value: Any) -> None:
        if key in ("timing", "studies", "thresholds", "variants"):
            setattr(self, key, value)
        elif key in SECTIONS:
            self.sections[key] = SECTIONS[key].from_json(value)
        elif key in RESERVED_KEYS:
            raise KeyError(f"{key!r} cannot be replaced; build a new Results")
        else:
            self.extra[key] = value

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def setdefault(self, key: str, default: Any) -> Any:
        if key not in self or (key == "timing" and not self.timing and default is not None):
            if key == "timing":
                self.timing = default
                return self.timing
            self[key] = default
        return self[key]

    def section(self, key: str) -> Any:
        """The section named ``key``; KeyError names the sections there are."""
        if key not in self.sections:
            raise KeyError(f"no section {key!r}; this results has {list(self.sections)}")
        return self.sections[key]

    def verdict(self, variant: str, characteristic: str) -> Verdict:
        cell = self.verdicts.get(variant, {}).get(characteristic)
        return cell.verdict if cell is not None else Verdict.NOT_MEASURED

    # -- JSON -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON form as Python data (floats unencoded; no None where a value is defined)."""
        out: dict[str, Any] = {
            "schema": SCHEMA,
            "study": self.study.to_dict(),
            "variants": list(self.variants),
            "sections": list(self.sections),
            "thresholds": dict(self.thresholds),
            "verdicts": {v: {k: c.to_dict() for k, c in cells.items()} for v, cells in self.verdicts.items()},
        }
        for key, sec in self.sections.items():
            out[key] = sec.to_json() if hasattr(sec, "to_json") else sec
        if self.timing:
            out["timing"] = dict(self.timing)
        if self.studies:
            out["studies"] = fill_missing(self.studies)
        out.update(self.extra)
        return out

    def json_data(self) -> dict[str, Any]:
        """The JSON form as plain JSON data (what ``json.loads(results.to_json())`` gives)."""
        return encode(self.to_dict())

    def to_json(self, indent: int | None = 1) -> str:
        """``results.json`` text: JSON without NaN/Infinity literals (see :mod:`minidiff.results.values`)."""
        return json.dumps(encode(self.to_dict()), indent=indent, allow_nan=False, ensure_ascii=False)

    # -- tables ------------------------------------------------------------------------
    def verdict_frame(self) -> pd.DataFrame:
        """One row per variant: ``<characteristic>_verdict`` and ``<characteristic>_summary`` columns."""
        rows = []
        for v in self.variants:
            cells = self.verdicts.get(v, {})
            row: dict[str, Any] = {"variant": v}
            for key, _ in characteristics():
                c = cells.get(key)
                row[f"{key}_verdict"] = (c.verdict if c else Verdict.NOT_MEASURED).label
                row[f"{key}_summary"] = c.summary if c else ""
            rows.append(row)
        return pd.DataFrame(rows, columns=["variant"] + [f"{k}_{s}" for k, _ in characteristics()
                                                         for s in ("verdict", "summary")])

    def frames(self) -> dict[str, pd.DataFrame]:
        """Every table by name: ``summary`` (the verdicts), then each section's tables."""
        out = {"summary": self.verdict_frame()}
        for sec in self.sections.values():
            if hasattr(sec, "frames"):
                out.update(sec.frames())
        out["not_computed"] = self.not_computed_frame()
        return out

    def to_frame(self, section: str = "summary") -> pd.DataFrame:
        """A pandas DataFrame: ``"summary"`` (verdicts, also ``"verdicts"``), a section's main
        table (``"models"``, ``"prediction_errors"``, ``"representation"``, ``"distribution"``,
        ``"adversarial"``, ...), a per-variant table (``"cka_<variant>"``, ``"pies_<variant>"``)
        or ``"not_computed"``. :meth:`frames` gives them all."""
        if section == "verdicts":
            section = "summary"
        frames = self.frames()
        if section not in frames:
            raise KeyError(f"no table {section!r}; tables: {sorted(frames)}")
        return frames[section]

    def not_computed(self) -> list[tuple[str, str, str, str]]:
        """``(section, entry, metric, reason)`` for everything that was not computed."""
        out = []
        for key, sec in self.sections.items():
            if hasattr(sec, "not_computed"):
                out += [(key, *row) for row in sec.not_computed()]
        out += [("study", "", k, str(r)) for k, r in self.study.skipped.items()]
        return out

    def not_computed_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.not_computed(), columns=["section", "entry", "metric", "reason"])

    def csv_tables(self) -> dict[str, str]:
        """File name -> CSV text for every table of :meth:`frames` (empty tables left out)."""
        out = {}
        for name, df in self.frames().items():
            if df.empty and name != "summary":
                continue
            buf = io.StringIO()
            df.to_csv(buf, index=name.startswith("cka_"), lineterminator="\n")
            out[f"{name}.csv"] = buf.getvalue()
        return out

    # -- notebook / files --------------------------------------------------------------
    def _repr_html_(self) -> str:
        return report_backend().verdict_table(self)

    def __repr__(self) -> str:
        return (f"Results(study={self.study.name!r}, variants={self.variants}, sections={list(self.sections)}, "
                f"schema={SCHEMA!r})")

    def save(self, out: str | Path, *, overwrite: bool = False, plots: bool = True) -> dict[str, Path]:
        """Write ``out/results.json`` (schema ``minidiff.results/2``), the CSV tables,
        ``out/report.html`` and every figure as ``out/plots/<name>.png`` and ``.svg``.

        The folder holds one run's files only: the earlier run's files that are not
        rewritten are removed, and a folder holding another study's outputs (or files
        minidiff did not write) is refused unless ``overwrite=True``. Writing is atomic
        per file and ``report.html`` comes last (see :mod:`minidiff.results.output`).

        Returns ``{file name: path}``.

        Raises
        ------
        OutputFolderInUseError (a ValueError), OutputWriteError (an OSError)
        """
        from .output import write_folder
        backend = report_backend()
        files = {"results.json": self.to_json(), **self.csv_tables()}
        return write_folder(out, self.study.name, files, render=lambda stage: backend.render_files(self, plots=plots),
                            overwrite=overwrite)


def coerce(results: Any) -> Results:
    """A :class:`Results` from a Results or a results dict (either schema)."""
    return Results.from_dict(results)


__all__ = ["Results", "StudyInfo", "SCHEMA", "SCHEMA_V1", "REPORT_BACKEND", "coerce", "report_backend"]
