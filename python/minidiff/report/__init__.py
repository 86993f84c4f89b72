"""The report: every renderer of results lives here, and only here uses matplotlib.

- :func:`render` — the self-contained HTML page of a :class:`minidiff.results.Results`;
  :func:`render_files` — the page plus every figure as ``plots/<name>.png`` / ``.svg``.
- :func:`verdict_table` — the verdict table with its legend (``Results._repr_html_``).
- :func:`register_renderer` — draw a new results section: ``(results, ctx) -> html``,
  figures through ``ctx.figure(name, Figure, alt)`` (see :mod:`.context`).
- :mod:`.plots` — the figures, as ``matplotlib.figure.Figure`` objects (no pyplot,
  the global backend is never switched); :mod:`.adversarial` — the adversarial section.

A new section's renderer (e.g. ``report/lm.py`` for language models, a per-layer
localization section) registers with ``@register_renderer("<section key>")`` when its
module is imported: import that module in :mod:`.html` next to ``.adversarial``. The page
then draws every registered section type of ``minidiff.results`` in registration order
(a section without a renderer is shown as its tables), before "Not computed, and why".
"""

from .context import RENDERERS, RenderContext, register_renderer
from .html import render, render_files, verdict_table

__all__ = ["render", "render_files", "verdict_table", "register_renderer", "RenderContext", "RENDERERS"]
