"""HTML section for the adversarial results (self-contained: figures as base64 PNG).

Reads only the results dict of :func:`minidiff.adversarial.run_adversarial`; every string
from the data (model names, texts, class names) is HTML-escaped.
"""

from __future__ import annotations

import base64
import io
from html import escape
from typing import Optional


def _fmt(v: Optional[float], pct: bool = True, digits: int = 1) -> str:
    if v is None:
        return "&ndash;"
    return f"{100 * v:.{digits}f}%" if pct else f"{v:.{digits}f}"


def _ci(change: dict) -> str:
    if change.get("delta") is None:
        return "&ndash;"
    s = f"{100 * change['delta']:+.1f} pp"
    if change.get("ci_low") is not None:
        s += f" [{100 * change['ci_low']:+.1f}, {100 * change['ci_high']:+.1f}]"
    return s


def _heatmap_png(matrix, names, title: str) -> str:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = np.array([[np.nan if v is None else v for v in row] for row in matrix], float)
    size = 1.6 + 0.7 * len(names)
    fig = Figure(figsize=(size + 1.2, size))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
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
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _class(results: dict, idx: int) -> str:
    names = results.get("class_names") or []
    return names[idx] if 0 <= idx < len(names) else str(idx)


def render_section(results: dict) -> str:
    """HTML fragment: per attack a table (clean accuracy, accuracy under attack, success rate
    with its change from the base and bootstrap interval, mean perturbation, mean queries,
    gradient source), the transfer matrix as a heatmap, the Jaccard overlaps, and for the
    word-substitution attack a few adversarial texts with the changed words highlighted."""
    base = results.get("base", "")
    # no <h2>: the study report puts its own section heading above this fragment
    out = ['<section class="minidiff-adversarial">']
    cfg = results.get("config", {})
    out.append(
        "<p>Every model is attacked with the same budget and the same random starts "
        f"(seed {escape(str(cfg.get('seed')))}, {escape(str(cfg.get('steps')))} PGD steps, "
        f"{len(results.get('ids', []))} examples). Success rate counts only examples the model "
        "gets right before the attack. Changes are variant minus base "
        f"<b>{escape(str(base))}</b>, with {escape(str(cfg.get('confidence')))} paired bootstrap "
        "intervals. Transfer: row = model the attack was crafted on, column = model evaluated; "
        "the diagonal is each model's own success rate.</p>")
    for key, run in results.get("attacks", {}).items():
        out.append(f"<h3>{escape(key)}</h3>")
        if not run.get("realizable", True):
            out.append("<p><i>Perturbation of the input embeddings: measures the decision boundary, "
                       "not a realizable text.</i></p>")
        out.append('<table class="minidiff-table"><thead><tr><th>model</th><th>gradient</th>'
                   "<th>clean acc.</th><th>acc. under attack</th><th>success rate</th>"
                   "<th>&Delta; success vs base</th><th>&Delta; acc. under attack</th>"
                   f"<th>mean perturbation ({escape(str(run.get('norm', '')))})</th>"
                   "<th>mean queries</th></tr></thead><tbody>")
        for name, pm in run["per_model"].items():
            ch = run.get("change", {}).get(name)
            grad = escape(pm.get("gradient", ""))
            if pm.get("gradient", "").startswith(("surrogate", "gradient-free")):
                grad = f'<span title="{escape(pm.get("gradient_note", ""))}"><b>{grad}</b></span>'
            out.append(
                f"<tr><td>{escape(name)}</td><td>{grad}</td>"
                f"<td>{_fmt(pm['clean_accuracy'])}</td><td>{_fmt(pm['adversarial_accuracy'])}</td>"
                f"<td>{_fmt(pm['success_rate'])} ({pm['n_success']}/{pm['n_correct']})</td>"
                f"<td>{_ci(ch['success_rate']) if ch else 'base'}</td>"
                f"<td>{_ci(ch['adversarial_accuracy']) if ch else 'base'}</td>"
                f"<td>{_fmt(pm['mean_perturbation'], pct=False, digits=3)}</td>"
                f"<td>{_fmt(pm['mean_queries'], pct=False)}</td></tr>")
        out.append("</tbody></table>")
        notes = [f"{escape(k)}: {escape(v['gradient_note'])}" for k, v in run["per_model"].items()
                 if v.get("gradient", "").startswith(("surrogate", "gradient-free"))]
        if notes:
            out.append("<p><b>Gradient substitutes:</b> " + "; ".join(notes) + "</p>")
        tr = run.get("transfer")
        if tr and len(tr.get("models", [])) > 1:  # one model: the table already says it all
            png = _heatmap_png(tr["matrix"], tr["models"], f"transfer: {key}")
            out.append(f'<img alt="transfer matrix {escape(key)}" src="data:image/png;base64,{png}">')
        jac = run.get("jaccard")
        if jac and len(jac["models"]) > 1:
            cells = "".join(f"<th>{escape(m)}</th>" for m in jac["models"])
            rows = "".join(
                f"<tr><th>{escape(m)}</th>" + "".join(f"<td>{v:.2f}</td>" for v in row) + "</tr>"
                for m, row in zip(jac["models"], jac["matrix"]))
            out.append("<p>Jaccard overlap of the successfully attacked examples:</p>"
                       f'<table class="minidiff-table"><tr><th></th>{cells}</tr>{rows}</table>')
        for name, exs in (run.get("examples") or {}).items():
            if not exs:
                continue
            out.append(f"<p>Adversarial texts against <b>{escape(name)}</b> (changed words marked):</p><ul>")
            for ex in exs:
                adv = "".join(f"<mark>{escape(t)}</mark>" if ch else escape(t) for t, ch in ex["segments"])
                out.append(
                    f"<li>{adv} <small>(was: &ldquo;{escape(ex['original'])}&rdquo;; "
                    f"{escape(_class(results, ex['label']))} &rarr; "
                    f"{escape(_class(results, ex['adv_pred']))}, "
                    f"{100 * ex['fraction_changed']:.0f}% of words, {ex['queries']} queries)</small></li>")
            out.append("</ul>")
    out.append("</section>")
    return "\n".join(out)
