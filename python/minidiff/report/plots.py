"""Matplotlib figures for the report, each returned as a base64 PNG string.

Every function takes plain numbers from ``results.json`` (the report knows only
results) and returns ``data:image/png;base64,...`` text ready for an ``<img>``.
The Agg backend is forced so that no display is needed.
"""

from __future__ import annotations

import base64
import io
from typing import Sequence

import matplotlib

matplotlib.use("Agg", force=True)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

_STYLE = {"font.size": 9, "axes.titlesize": 10, "axes.spines.top": False, "axes.spines.right": False}
BASE_COLOR = "#4c72b0"
VAR_COLOR = "#dd8452"


def _png(fig: "plt.Figure") -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _short(names: Sequence[str], width: int = 18) -> list[str]:
    """Layer names without their common dotted prefix (``encoder.encoder.layer.3`` -> ``layer.3``)."""
    names = [str(n) for n in names]
    dotted = [n for n in names if "." in n]
    if len(dotted) >= 2:
        import os.path
        pre = os.path.commonprefix(dotted)
        pre = pre[: pre.rfind(".") + 1] if "." in pre else ""
        parts = pre.split(".")
        if len(parts) > 2:  # keep the last component of the prefix ("layer.") for readability
            pre = ".".join(parts[:-2]) + "."
            names = [n[len(pre):] if n.startswith(pre) else n for n in names]
    return [n if len(n) <= width else "…" + n[-(width - 1):] for n in names]


def cka_heatmap(matrix: Sequence[Sequence[float]], layers_a: Sequence[str], layers_b: Sequence[str],
                title: str, label_a: str = "base", label_b: str = "variant") -> str:
    """Layer x layer CKA (rows: reference layers, columns: variant layers), values annotated when few."""
    m = np.asarray(matrix, dtype=float)
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(1.2 + 0.45 * max(m.shape[1], 3), 1.0 + 0.4 * max(m.shape[0], 3)))
        im = ax.imshow(m, vmin=0.0, vmax=1.0, cmap="magma", aspect="auto")
        ax.set_xticks(range(m.shape[1]), _short(layers_b), rotation=60, ha="right")
        ax.set_yticks(range(m.shape[0]), _short(layers_a))
        ax.set_xlabel(label_b)
        ax.set_ylabel(label_a)
        ax.set_title(title)
        if m.size <= 100:
            for i in range(m.shape[0]):
                for j in range(m.shape[1]):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if m[i, j] > 0.6 else "white")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="CKA")
        return _png(fig)


def accuracy_bars(names: Sequence[str], acc: Sequence[float], lo: Sequence[float], hi: Sequence[float],
                  title: str = "Accuracy with bootstrap CI") -> str:
    """Accuracy per model group with its confidence interval."""
    a, l, h = (np.asarray(v, dtype=float) for v in (acc, lo, hi))
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(1.5 + 0.7 * len(names), 2.8))
        colors = [BASE_COLOR] + [VAR_COLOR] * (len(names) - 1)
        ax.bar(range(len(names)), a, color=colors, yerr=np.vstack([a - l, h - a]), capsize=3)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        low = float(np.nanmin(l)) if len(l) else 0.0
        ax.set_ylim(max(0.0, low - 0.1), 1.0)
        ax.set_ylabel("accuracy")
        ax.set_title(title)
        return _png(fig)


def per_class_bars(class_names: Sequence[str], values: Sequence[float], significant: Sequence[bool],
                   title: str, ylabel: str = "normalized recall change") -> str:
    """Per-class change; significant classes (Welch t-test) drawn solid, the rest hatched."""
    v = np.asarray(values, dtype=float)
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(1.5 + 0.35 * len(v), 2.6))
        for i, (val, sig) in enumerate(zip(v, significant)):
            ax.bar(i, val, color="#c44e52" if sig else "#bbbbbb", hatch=None if sig else "//",
                   edgecolor="#555555", linewidth=0.4)
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.set_xticks(range(len(v)), _short(class_names, 12), rotation=60, ha="right")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        return _png(fig)


def histogram(edges: Sequence[float], counts: Sequence[float], title: str, xlabel: str,
              log: bool = True) -> str:
    """A pre-binned histogram (bins from results.json)."""
    e = np.asarray(edges, dtype=float)
    c = np.asarray(counts, dtype=float)
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(3.4, 2.4))
        ax.bar(e[:-1], c, width=np.diff(e), align="edge", color=VAR_COLOR, edgecolor="white", linewidth=0.3)
        if log and c.max(initial=0) > 0:
            ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("examples")
        ax.set_title(title)
        return _png(fig)


def reliability(bins_base: dict, bins_var: dict, title: str) -> str:
    """Reliability diagram: accuracy vs confidence per bin for base and variant."""
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(2.9, 2.9))
        ax.plot([0, 1], [0, 1], color="#999999", linewidth=0.8, linestyle="--")
        for bins, color, label in ((bins_base, BASE_COLOR, "base"), (bins_var, VAR_COLOR, "variant")):
            conf = np.asarray(bins.get("confidence", []), dtype=float)
            acc = np.asarray(bins.get("accuracy", []), dtype=float)
            cnt = np.asarray(bins.get("count", []), dtype=float)
            keep = cnt > 0
            ax.plot(conf[keep], acc[keep], marker="o", markersize=3, color=color, label=label)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.legend(loc="upper left", frameon=False)
        ax.set_title(title)
        return _png(fig)


def image_grid(images: Sequence[np.ndarray], captions: Sequence[str], title: str) -> str:
    """Example images (PIEs) with one caption each."""
    n = len(images)
    cols = min(n, 6)
    rows = (n + cols - 1) // cols
    with plt.rc_context(_STYLE):
        fig, axes = plt.subplots(rows, cols, figsize=(1.35 * cols, 1.55 * rows), squeeze=False)
        for k, ax in enumerate(axes.flat):
            ax.axis("off")
            if k < n:
                img = np.asarray(images[k], dtype=float)
                ax.imshow(img, cmap="gray_r" if img.ndim == 2 else None, vmin=0.0, vmax=1.0)
                ax.set_title(captions[k], fontsize=7)
        fig.suptitle(title, fontsize=9)
        return _png(fig)


def ecdf_pair(a: Sequence[float], b: Sequence[float], title: str, xlabel: str) -> str:
    """Two empirical CDFs from pre-computed quantiles (``a``/``b`` are values at equal probabilities)."""
    qa = np.asarray(a, dtype=float)
    qb = np.asarray(b, dtype=float)
    p = np.linspace(0, 1, len(qa))
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(3.2, 2.4))
        ax.plot(qa, p, color=BASE_COLOR, label="base")
        ax.plot(qb, np.linspace(0, 1, len(qb)), color=VAR_COLOR, label="variant")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("fraction of examples")
        ax.legend(frameon=False)
        ax.set_title(title)
        return _png(fig)
