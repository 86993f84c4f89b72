"""The adversarial section of the report (moved here from the adversarial package,
which now only computes).

Reads only the adversarial results (:func:`minidiff.adversarial.run_adversarial`'s
dict, as stored in a results file); every string from the data (model names, texts,
class names) is HTML-escaped.
"""

from __future__ import annotations

from typing import Any

from minidiff.results import as_float

from . import plots
from .context import RenderContext, e, missing, register_renderer


def _fmt(v: Any, pct: bool = True, digits: int = 1) -> str:
    f = as_float(v)
    if f is None:
        return "&ndash;"
    return f"{100 * f:.{digits}f}%" if pct else f"{f:.{digits}f}"


def _ci(change: dict) -> str:
    d = as_float(change.get("delta"))
    if d is None:
        return "&ndash;"
    s = f"{100 * d:+.1f} pp"
    lo, hi = as_float(change.get("ci_low")), as_float(change.get("ci_high"))
    if lo is not None and hi is not None:
        s += f" [{100 * lo:+.1f}, {100 * hi:+.1f}]"
    return s


def _class(results: dict, idx: Any) -> str:
    names = results.get("class_names") or []
    try:
        i = int(idx)
    except (TypeError, ValueError):
        return str(idx)
    return names[i] if 0 <= i < len(names) else str(i)


def render_section(results: dict, ctx: RenderContext | None = None, tag: str = "") -> str:
    """HTML fragment: per attack a table (clean accuracy, accuracy under attack, success rate
    with its change from the base and bootstrap interval, mean perturbation, mean queries,
    gradient source), the transfer matrix as a heatmap, the Jaccard overlaps, and for the
    word-substitution attack a few adversarial texts with the changed words highlighted."""
    ctx = ctx or RenderContext()
    base = results.get("base", "")
    # no <h2>: the study report puts its own section heading above this fragment
    out = ['<section class="minidiff-adversarial">']
    cfg = results.get("config", {})
    out.append(
        "<p>Every model is attacked with the same budget and the same random starts "
        f"(seed {e(cfg.get('seed'))}, {e(cfg.get('steps'))} PGD steps, "
        f"{len(results.get('ids', []))} examples). Success rate counts only examples the model "
        "gets right before the attack. Changes are variant minus base "
        f"<b>{e(base)}</b>, with {e(cfg.get('confidence'))} paired bootstrap "
        "intervals. Transfer: row = model the attack was crafted on, column = model evaluated; "
        "the diagonal is each model's own success rate.</p>")
    for key, run in results.get("attacks", {}).items():
        out.append(f"<h3>{e(key)}</h3>")
        if not run.get("realizable", True):
            out.append("<p><i>Perturbation of the input embeddings: measures the decision boundary, "
                       "not a realizable text.</i></p>")
        out.append('<table class="minidiff-table"><thead><tr><th>model</th><th>gradient</th>'
                   "<th>clean acc.</th><th>acc. under attack</th><th>success rate</th>"
                   "<th>&Delta; success vs base</th><th>&Delta; acc. under attack</th>"
                   f"<th>mean perturbation ({e(run.get('norm', ''))})</th>"
                   "<th>mean queries</th></tr></thead><tbody>")
        for name, pm in run["per_model"].items():
            ch = run.get("change", {}).get(name)
            grad = e(pm.get("gradient", ""))
            if str(pm.get("gradient", "")).startswith(("surrogate", "gradient-free")):
                grad = f'<span title="{e(pm.get("gradient_note", ""))}"><b>{grad}</b></span>'
            out.append(
                f"<tr><td>{e(name)}</td><td>{grad}</td>"
                f"<td>{_fmt(pm['clean_accuracy'])}</td><td>{_fmt(pm['adversarial_accuracy'])}</td>"
                f"<td>{_fmt(pm['success_rate'])} ({e(pm['n_success'])}/{e(pm['n_correct'])})</td>"
                f"<td>{_ci(ch['success_rate']) if ch else 'base'}</td>"
                f"<td>{_ci(ch['adversarial_accuracy']) if ch else 'base'}</td>"
                f"<td>{_fmt(pm['mean_perturbation'], pct=False, digits=3)}</td>"
                f"<td>{_fmt(pm['mean_queries'], pct=False)}</td></tr>")
        out.append("</tbody></table>")
        notes = [f"{e(k)}: {e(v['gradient_note'])}" for k, v in run["per_model"].items()
                 if str(v.get("gradient", "")).startswith(("surrogate", "gradient-free"))]
        if notes:
            out.append("<p><b>Gradient substitutes:</b> " + "; ".join(notes) + "</p>")
        if run.get("not_measured"):
            out.append("<p><b>Not attacked here:</b> " + "; ".join(
                f"{e(k)}: {e(v)}" for k, v in run["not_measured"].items()) + "</p>")
        tr = run.get("transfer")
        if tr and len(tr.get("models", [])) > 1:  # one model: the table already says it all
            out.append(ctx.plot(f"adversarial_transfer_{tag + '_' if tag else ''}{key}", plots.transfer_heatmap,
                                tr["matrix"], tr["models"], title=f"transfer: {key}"))
        jac = run.get("jaccard")
        if jac and len(jac["models"]) > 1:
            cells = "".join(f"<th>{e(m)}</th>" for m in jac["models"])
            rows = "".join(
                f"<tr><th>{e(m)}</th>" + "".join(f"<td>{_fmt(v, pct=False, digits=2)}</td>" for v in row) + "</tr>"
                for m, row in zip(jac["models"], jac["matrix"]))
            out.append("<p>Jaccard overlap of the successfully attacked examples:</p>"
                       f'<table class="minidiff-table"><tr><th></th>{cells}</tr>{rows}</table>')
        for name, exs in (run.get("examples") or {}).items():
            if not exs:
                continue
            out.append(f"<p>Adversarial texts against <b>{e(name)}</b> (changed words marked):</p><ul>")
            for ex in exs:
                adv = "".join(f"<mark>{e(t)}</mark>" if chg else e(t) for t, chg in ex["segments"])
                out.append(
                    f"<li>{adv} <small>(was: &ldquo;{e(ex['original'])}&rdquo;; "
                    f"{e(_class(results, ex['label']))} &rarr; "
                    f"{e(_class(results, ex['adv_pred']))}, "
                    f"{_fmt(ex['fraction_changed'], digits=0)} of words, {e(ex['queries'])} queries)</small></li>")
            out.append("</ul>")
    out.append("</section>")
    return "\n".join(out)


def _not_measured(adv: Any) -> str:
    reason = (adv or {}).get("not_measured") or (adv or {}).get("not_computed") or "no [adversarial] table in the study"
    return f'<p class="muted">not_measured: {e(reason)}</p>'


@register_renderer("adversarial")
def render(results: Any, ctx: RenderContext) -> str:
    """The report's adversarial section: one fragment, or one per study in a combined report."""
    adv = results.get("adversarial") or {}
    if not adv or adv.get("not_measured") or missing(adv):
        return _not_measured(adv)
    try:
        if "attacks" not in adv:  # an index over several studies: one section each
            return "".join(f"<h3>{e(tag)}</h3>" + (render_section(a, ctx, tag) if a and not a.get("not_measured")
                                                   else _not_measured(a))
                           for tag, a in adv.items())
        return render_section(adv, ctx)
    except Exception as ex:  # the adversarial fragment must not take the whole report down
        return f'<p class="skip">adversarial section could not be rendered: {e(type(ex).__name__)}: {e(ex)}</p>'
