"""Typed study results: :class:`Results`, its sections, verdict rules, and the output folder.

>>> res = study.run(out="study-out")          # a Results
>>> res.to_frame("prediction_errors")          # pandas DataFrame; res.frames() gives every table
>>> res                                        # in a notebook: the verdict table
>>> res.save("study-out")                      # results.json, CSVs, report.html, plots/*.png + *.svg
>>> res = minidiff.Results.load("study-out")   # schema minidiff.results/2 or /1

Layout:

- :mod:`.values` — numbers in results: :class:`NotComputed` (a value that could not
  be computed carries its reason; results.json never holds ``null`` where a value is
  defined) and the JSON spelling of non-finite numbers (``"Infinity"``, ``"NaN"``).
- :mod:`.verdicts` — :class:`Verdict` (``same`` / ``minor`` / ``differs`` /
  ``not_measured``, one vocabulary for every output) and the verdict rules, which
  decide and write their own legend from the same thresholds.
- :mod:`.sections` — one section type per characteristic (``models``,
  ``prediction_errors``, ``representation``, ``distribution``, ``adversarial``); :mod:`.lm`
  (``language_model``) and :mod:`.swap` (``layer_swap``, present only when a study asked
  for layer-swap sensitivity) register theirs.
- :mod:`.core` — :class:`Results` (dict-style access on the JSON form, DataFrames,
  ``save``/``load``, the ``/1`` reader).
- :mod:`.output` — the output folder: atomic, all of one run, never over another
  study's files.

Extending (a new characteristic, e.g. language-model token divergence or per-layer
localization) takes up to three registrations, none of which touches this package:

1. the numbers: subclass :class:`Section` (``key``, ``title``, ``Entry`` = a
   :class:`Entry` subclass with typed fields; override ``frames`` for curated
   tables) and call :func:`register_section`; ``results.json`` then carries a
   top-level ``key`` and lists it under ``sections``, ``to_frame(key)`` and the CSVs
   include it, and the "Not computed, and why" table reads its ``skipped`` maps;
2. a verdict column (optional): subclass :class:`~minidiff.results.verdicts.VerdictRule`
   (``key``, ``title``, thresholds as fields, ``decide`` and ``legend``) and call
   :func:`register_rule`;
3. the report: ``minidiff.report.register_renderer(key)`` on a function
   ``(results, ctx) -> html`` (figures through ``ctx.figure``), e.g. in
   ``minidiff/report/lm.py``; a section without a renderer is shown as its tables.

The study produces the sections in the JSON form (plain dicts); ``Results`` types
them. The report package imports this one, never the reverse: ``save`` and
``_repr_html_`` load the report module by name (:data:`minidiff.results.core.REPORT_BACKEND`,
``"minidiff.report"``), the way pandas loads its plotting backend.
"""

from .core import SCHEMA, SCHEMA_V1, Results, StudyInfo
from .output import OutputFolderInUseError, OutputWriteError, check_output
from .sections import (SECTIONS, AdversarialSection, DistributionSection, Entry, ModelsSection,
                       PredictionErrorsSection, Record, RepresentationSection, Section, register_section)
from .values import NotComputed, as_float, is_number
from .lm import LanguageModelEntry, LanguageModelRule, LanguageModelSection
from .swap import LayerSwapEntry, LayerSwapSection, SwapRow
from .verdicts import (RULES, Verdict, VerdictCell, VerdictRule, characteristics, decide_all, legends,
                       measured_characteristics, register_rule)

__all__ = ["Results", "StudyInfo", "SCHEMA", "SCHEMA_V1", "OutputWriteError", "OutputFolderInUseError", "check_output",
           "Section", "Entry", "Record", "SECTIONS", "register_section", "ModelsSection", "PredictionErrorsSection",
           "RepresentationSection", "DistributionSection", "AdversarialSection", "NotComputed", "as_float",
           "is_number", "Verdict", "VerdictCell", "VerdictRule", "RULES", "register_rule", "characteristics",
           "measured_characteristics",
           "legends", "decide_all", "LanguageModelSection", "LanguageModelEntry", "LanguageModelRule",
           "LayerSwapSection", "LayerSwapEntry", "SwapRow"]
