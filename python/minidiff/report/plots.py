"""Matplotlib figures of the report, as :class:`matplotlib.figure.Figure` objects.

Every function takes plain numbers from a results object (the report knows only
results) and returns a ``Figure`` built without pyplot, so nothing here touches
matplotlib's global backend or pyplot's figure registry; the caller turns it into
an inline PNG and into ``plots/<name>.png`` / ``.svg`` files
(:class:`minidiff.report.context.RenderContext`). Text sizes come from a local
``rc_context``, restored when each function returns.
"""

from __future__ import annotations

import io
import os.path
from typing import Any, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure

STYLE = {"font.size": 9, "axes.titlesize": 10, "axes.spines.top": False, "axes.spines.right": False,
         "svg.fonttype": "none"}
BASE_COLOR = "#4c72b0"
VAR_COLOR = "#dd8452"
PNG_DPI = 90


def to_bytes(fig: Figure, fmt: str) -> bytes:
    """The figure as PNG or SVG bytes (tight bounding box, the report's style)."""
    buf = io.BytesIO()
    with matplotlib.rc_context(STYLE):
        fig.savefig(buf, format=fmt, dpi=PNG_DPI, bbox_inches="tight", metadata=_metadata(fmt))
    return buf.getvalue()


def _metadata(fmt: str) -> dict[str, Any]:
    # no creation date: the same results give byte-identical files
    return {"Date": None} if fmt == "svg" else {"Software": None} if fmt == "png" else {}


def _floats(x: Any) -> np.ndarray:
    """An array of floats from results values (``"NaN"``/``"Infinity"`` strings, not-computed as NaN)."""
    def f(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [f(u) for u in v]
        if isinstance(v, str):
            return float(v) if v in ("NaN", "Infinity", "-Infinity") else np.nan
        if v is None or isinstance(v, dict) or hasattr(v, "not_computed"):
            return np.nan
        return float(v)
    return np.asarray(f(list(x) if not isinstance(x, np.ndarray) else x.tolist()), dtype=float)


def short_names(names: Sequence[str], width: int = 18) -> list[str]:
    """Layer names without their common dotted prefix (``encoder.encoder.layer.3`` -> ``layer.3``)."""
    names = [str(n) for n in names]
    dotted = [n for n in names if "." in n]
    if len(dotted) >= 2:
        pre = os.path.commonprefix(dotted)
        pre = pre[: pre.rfind(".") + 1] if "." in pre else ""
        parts = pre.split(".")
        if len(parts) > 2:  # keep the last component of the prefix ("layer.") for readability
            pre = ".".join(parts[:-2]) + "."
            names = [n[len(pre):] if n.startswith(pre) else n for n in names]
    return [n if len(n) <= width else "…" + n[-(width - 1):] for n in names]


def cka_heatmap(matrix: Sequence[Sequence[float]], layers_a: Sequence[str], layers_b: Sequence[str],
                title: str, label_a: str = "base", label_b: str = "variant") -> Figure:
    """Layer x layer CKA (rows: reference layers, columns: variant layers), values annotated when few."""
    m = _floats(matrix)
    if m.ndim != 2:
        raise ValueError(f"a CKA matrix must be 2-D, got shape {m.shape}")
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(1.2 + 0.45 * max(m.shape[1], 3), 1.0 + 0.4 * max(m.shape[0], 3)))
        ax = fig.subplots()
        im = ax.imshow(m, vmin=0.0, vmax=1.0, cmap="magma", aspect="auto")
        ax.set_xticks(range(m.shape[1]), short_names(layers_b), rotation=60, ha="right")
        ax.set_yticks(range(m.shape[0]), short_names(layers_a))
        ax.set_xlabel(label_b)
        ax.set_ylabel(label_a)
        ax.set_title(title)
        if m.size <= 100:
            for i in range(m.shape[0]):
                for j in range(m.shape[1]):
                    txt = f"{m[i, j]:.2f}" if np.isfinite(m[i, j]) else "n/a"
                    ax.text(j, i, txt, ha="center", va="center", fontsize=7,
                            color="black" if m[i, j] > 0.6 else "white")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="CKA")
    return fig


def accuracy_bars(names: Sequence[str], acc: Sequence[float], lo: Sequence[float], hi: Sequence[float],
                  title: str = "Accuracy with bootstrap CI") -> Figure:
    """Accuracy per model group with its confidence interval."""
    a, l, h = (_floats(v) for v in (acc, lo, hi))
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(1.5 + 0.7 * len(names), 2.8))
        ax = fig.subplots()
        colors = [BASE_COLOR] + [VAR_COLOR] * (len(names) - 1)
        ax.bar(range(len(names)), a, color=colors, yerr=np.vstack([a - l, h - a]), capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        low = float(np.nanmin(l)) if len(l) and np.isfinite(l).any() else 0.0
        ax.set_ylim(max(0.0, low - 0.1), 1.0)
        ax.set_ylabel("accuracy")
        ax.set_title(title)
    return fig


def per_class_bars(class_names: Sequence[str], values: Sequence[float], significant: Sequence[bool],
                   title: str, ylabel: str = "normalized recall change") -> Figure:
    """Per-class change; significant classes (Welch t-test) drawn solid, the rest hatched."""
    v = _floats(values)
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(1.5 + 0.35 * len(v), 2.6))
        ax = fig.subplots()
        for i, (val, sig) in enumerate(zip(v, significant)):
            ax.bar(i, val, color="#c44e52" if sig else "#bbbbbb", hatch=None if sig else "//",
                   edgecolor="#555555", linewidth=0.4)
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.set_xticks(range(len(v)), short_names(class_names, 12), rotation=60, ha="right")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
    return fig


def histogram(edges: Sequence[float], counts: Sequence[float], title: str, xlabel: str,
              log: bool = True) -> Figure:
    """A pre-binned histogram (bins from the results)."""
    e = _floats(edges)
    c = _floats(counts)
    if len(e) != len(c) + 1:
        raise ValueError(f"a histogram needs one more edge than counts, got {len(e)} edges and {len(c)} counts")
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(3.4, 2.4))
        ax = fig.subplots()
        ax.bar(e[:-1], c, width=np.diff(e), align="edge", color=VAR_COLOR, edgecolor="white", linewidth=0.3)
        if log and c.max(initial=0) > 0:
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("examples")
        ax.set_title(title)
    return fig


def reliability(bins_base: dict, bins_var: dict, title: str) -> Figure:
    """Reliability diagram: accuracy vs confidence per bin for base and variant (empty bins left out)."""
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(2.9, 2.9))
        ax = fig.subplots()
        ax.plot([0, 1], [0, 1], color="#999999", linewidth=0.8, linestyle="--")
        for bins, color, label in ((bins_base, BASE_COLOR, "base"), (bins_var, VAR_COLOR, "variant")):
            conf = _floats(bins.get("confidence", []))
            acc = _floats(bins.get("accuracy", []))
            cnt = _floats(bins.get("count", []))
            keep = (cnt > 0) & np.isfinite(conf) & np.isfinite(acc)
            ax.plot(conf[keep], acc[keep], marker="o", markersize=3, color=color, label=label)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.legend(loc="upper left", frameon=False)
        ax.set_title(title)
    return fig


def image_grid(images: Sequence[Any], captions: Sequence[str], title: str) -> Figure:
    """Example images (PIEs) with one caption each."""
    n = len(images)
    if n == 0:
        raise ValueError("no images to show")
    cols = min(n, 6)
    rows = (n + cols - 1) // cols
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(1.35 * cols, 1.55 * rows))
        axes = fig.subplots(rows, cols, squeeze=False)
        for k, ax in enumerate(axes.flat):
            ax.axis("off")
            if k < n:
                img = _floats(images[k])
                ax.imshow(img, cmap="gray_r" if img.ndim == 2 else None, vmin=0.0, vmax=1.0)
                ax.set_title(captions[k], fontsize=7)
        fig.suptitle(title, fontsize=9)
    return fig


def transfer_heatmap(matrix: Sequence[Sequence[float]], names: Sequence[str], title: str) -> Figure:
    """Attack transfer: row = model the attack was crafted on, column = model evaluated."""
    m = _floats(matrix)
    size = 1.6 + 0.7 * len(names)
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(size + 1.2, size))
        ax = fig.subplots()
        im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_yticks(range(len(names)), names)
        ax.set_xlabel("evaluated on")
        ax.set_ylabel("crafted on")
        ax.set_title(title, fontsize=9)
        for i in range(len(names)):
            for j in range(len(names)):
                if np.isfinite(m[i, j]):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center",
                            color="white" if m[i, j] < 0.6 else "black", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return fig


def ecdf_pair(a: Sequence[float], b: Sequence[float], title: str, xlabel: str) -> Figure:
    """Two empirical CDFs from pre-computed quantiles (``a``/``b`` are values at equal probabilities)."""
    qa, qb = _floats(a), _floats(b)
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(3.2, 2.4))
        ax = fig.subplots()
        ax.plot(qa, np.linspace(0, 1, len(qa)), color=BASE_COLOR, label="base")
        ax.plot(qb, np.linspace(0, 1, len(qb)), color=VAR_COLOR, label="variant")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("fraction of examples")
        ax.legend(frameon=False)
        ax.set_title(title)
    return fig
