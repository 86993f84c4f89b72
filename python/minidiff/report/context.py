"""What every report renderer shares: the render context (figures), formatting, the renderer registry.

A section renderer is a function ``(results, ctx) -> str`` (an HTML fragment)
registered for a section key with :func:`register_renderer`. Figures go through
:meth:`RenderContext.figure`, which embeds them in the page as PNG and keeps them
so that :func:`minidiff.report.html.render_files` also writes ``plots/<name>.png``
and ``plots/<name>.svg``.
"""

from __future__ import annotations

import base64
import html
import re
from typing import Any, Callable

from minidiff.results import NotComputed, Verdict, as_float

from . import plots

#: section key -> renderer ``(results, ctx) -> html``
RENDERERS: dict[str, Callable[[Any, "RenderContext"], str]] = {}


def register_renderer(key: str, *, replace: bool = False) -> Callable:
    """Decorator: render the results section ``key`` with the decorated function.

    >>> @register_renderer("lm_divergence")
    ... def _lm(results, ctx):
    ...     return "<p>...</p>" + ctx.figure("lm_divergence", plots_figure, "per-token KL")
    """
    def deco(fn: Callable[[Any, RenderContext], str]) -> Callable[[Any, RenderContext], str]:
        if key in RENDERERS and RENDERERS[key] is not fn and not replace:
            raise ValueError(f"a renderer for section {key!r} is already registered; pass replace=True")
        RENDERERS[key] = fn
        return fn
    return deco


class RenderContext:
    """Collects the figures of one rendering; ``figure`` returns the ``<img>`` to put in the page."""

    def __init__(self, keep_figures: bool = False) -> None:
        self.keep = keep_figures
        self.figures: dict[str, Any] = {}   # name -> Figure (kept only for files)
        self.pngs: dict[str, bytes] = {}    # name -> PNG bytes (kept only for files)

    def _name(self, name: str) -> str:
        base = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "figure"
        n, k = base, 2
        while n in self.figures or n in self.pngs:
            n, k = f"{base}_{k}", k + 1
        return n

    def figure(self, name: str, fig: Any, alt: str) -> str:
        """Embed ``fig`` (a matplotlib Figure) as a PNG and keep it under a unique file-safe ``name``."""
        png = plots.to_bytes(fig, "png")
        n = self._name(name)
        if self.keep:
            self.figures[n] = fig
            self.pngs[n] = png
        else:
            self.pngs[n] = b""  # reserve the name
        b64 = base64.b64encode(png).decode("ascii")
        return f'<img alt="{e(alt)}" data-plot="{e(n)}" src="data:image/png;base64,{b64}">'

    def plot(self, name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
        """``fn(*args, **kwargs)`` as a figure, or a stated reason if it cannot be drawn."""
        try:
            fig = fn(*args, **kwargs)
        except (ValueError, TypeError, KeyError, IndexError) as ex:
            return f'<p class="skip">figure not drawn: {e(ex)}</p>'
        return self.figure(name, fig, kwargs.get("title", args[-1] if args and isinstance(args[-1], str) else name))

    def files(self) -> dict[str, bytes]:
        """``plots/<name>.png`` and ``plots/<name>.svg`` for every kept figure."""
        out: dict[str, bytes] = {}
        for n, fig in self.figures.items():
            out[f"plots/{n}.png"] = self.pngs[n]
            out[f"plots/{n}.svg"] = plots.to_bytes(fig, "svg")
        return out


def e(x: Any) -> str:
    """HTML-escaped text."""
    return html.escape(str(x))


def fmt(x: Any, digits: int = 3, pct: bool = False) -> str:
    """A number for a table cell; a value not computed is "–" (its reason is in its own section)."""
    if isinstance(x, bool):
        return str(x)
    f = as_float(x)
    if f is None:
        return "–"
    if f != f:
        return "n/a"
    if f in (float("inf"), float("-inf")):
        return "∞" if f > 0 else "−∞"
    if pct:
        return f"{100 * f:.{max(digits - 2, 1)}f}%"
    if isinstance(x, int):
        return str(x)
    return f"{f:.{digits}g}" if abs(f) < 1e-3 and f != 0 else f"{f:.{digits}f}"


def pval(x: Any) -> str:
    f = as_float(x)
    if f is None or f != f:
        return "–"
    return "<1e-4" if f < 1e-4 else f"{f:.3g}"


def badge(verdict: Any) -> str:
    """The verdict as a coloured label; the text is :attr:`Verdict.label`, as in every other output."""
    try:
        v = Verdict(str(verdict))
    except ValueError:
        return f'<span class="v">{e(verdict)}</span>'
    return f'<span class="v v-{v.value}" title="{e(v.meaning)}">{e(v.label)}</span>'


def missing(x: Any) -> bool:
    """True for a value that was not computed (``None``, NotComputed, ``{"not_computed": ...}``)."""
    return x is None or isinstance(x, NotComputed) or (isinstance(x, dict) and "not_computed" in x)
