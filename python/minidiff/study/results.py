"""Moved to :mod:`minidiff.results`; this module re-exports what it used to define.

``write_output(out, results, render)`` keeps its old signature: ``results`` may be a
:class:`minidiff.results.Results` or a results dict (schema ``/2`` or ``/1``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from minidiff.results import SCHEMA, OutputFolderInUseError, OutputWriteError, Results
from minidiff.results.core import coerce

TOP_LEVEL_KEYS = ("schema", "study", "variants", "thresholds", "verdicts", "models", "prediction_errors",
                  "representation", "distribution", "adversarial", "language_model", "layer_swap")


def to_json(results: Any) -> str:
    """results.json text for a Results or results dict."""
    return coerce(results).to_json()


def csv_tables(results: Any) -> dict[str, str]:
    """File name -> CSV text (see :meth:`minidiff.results.Results.csv_tables`)."""
    return coerce(results).csv_tables()


def write_output(out_dir: str | Path, results: Any, render: Callable[[Any], str] | None = None,
                 overwrite: bool = False) -> dict[str, Path]:
    """Write an output folder (:meth:`minidiff.results.Results.save`). A ``render`` other than
    the default report renderer writes its own ``report.html`` and no plots."""
    res = coerce(results)
    from minidiff.report.html import render as default_render
    if render is None or render is default_render:
        return res.save(out_dir, overwrite=overwrite)
    from minidiff.results.output import write_folder
    files = {"results.json": res.to_json(), **res.csv_tables()}
    return write_folder(out_dir, res.study.name, files, render=lambda stage: {"report.html": render(res)},
                        overwrite=overwrite)


__all__ = ["SCHEMA", "OutputWriteError", "OutputFolderInUseError", "Results", "to_json", "csv_tables",
           "write_output", "TOP_LEVEL_KEYS"]
