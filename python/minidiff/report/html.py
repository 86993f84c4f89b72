"""The self-contained HTML report, rendered from a :class:`minidiff.results.Results` only.

The first screen answers the question: one row per variant, one column per
characteristic (the registered verdict rules), a verdict per cell (``same`` /
``minor`` / ``differs`` / ``not_measured``, the same words as in results.json, the
CSVs and the terminal) with the number behind it, and a legend that each rule
writes from its own thresholds. Below comes one section per registered section
type, each drawn by the renderer registered for its key
(:func:`minidiff.report.register_renderer`; a section without one is shown as its
tables), then "Not computed, and why". All images are inline base64 PNGs (also
written as ``plots/<name>.png`` and ``.svg`` by :func:`render_files`); the page
loads nothing from the network. A small inline script records image load failures
and script errors into ``<body data-...>`` attributes, which the browser test reads.
"""

from __future__ import annotations

from typing import Any

from minidiff.results import SECTIONS, Results, Verdict, as_float, measured_characteristics
from minidiff.results.core import coerce

from . import adversarial as _adversarial  # noqa: F401  (registers the adversarial renderer)
from . import localization as _localization  # the depth profile of the representation section
from . import lm as _lm  # noqa: F401  (registers the language-model renderer)
from . import plots
from .context import RENDERERS, RenderContext, badge, e, fmt, missing, pval, register_renderer

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1180px;color:#222;
     padding:0 16px;line-height:1.4}
h1{font-size:22px;margin:0 0 4px} h2{font-size:18px;margin-top:34px;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{font-size:15px;margin:20px 0 6px} .sub{color:#666;font-size:13px;margin-bottom:14px}
table{border-collapse:collapse;font-size:13px;margin:6px 0 10px} th,td{border:1px solid #ddd;padding:4px 8px;
     text-align:left;vertical-align:top} th{background:#f4f4f4}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.v{display:inline-block;padding:2px 8px;border-radius:10px;font-weight:600;font-size:12px;white-space:nowrap}
.v-same{background:#d9f0dc;color:#1e6b2b} .v-minor{background:#fff1c7;color:#7a5a00}
.v-differs{background:#f9d3d3;color:#8c1d1d} .v-not_measured{background:#e8e8e8;color:#555}
.cell-note{display:block;color:#555;font-size:11px;margin-top:2px;max-width:230px}
table.summary td{min-width:130px} .legend{font-size:12px;color:#444;background:#fafafa;border:1px solid #eee;
     padding:8px 12px;margin:8px 0 0} .legend li{margin:2px 0}
.figs{display:flex;flex-wrap:wrap;gap:12px;align-items:flex-start} .figs img{border:1px solid #eee;max-width:100%}
.skip{color:#8a6d00;font-size:13px;margin:3px 0} .muted{color:#777;font-size:13px} .pie-text td{max-width:520px}
code{background:#f4f4f4;padding:0 3px;border-radius:3px}
"""

_JS = """
(function(){
  var errs=[];
  window.addEventListener('error',function(e){
    var t=e.target;
    if(t&&t.tagName==='IMG'){errs.push('img:'+(t.alt||'?'));}
    else{document.body.setAttribute('data-script-error',String(e.message||e));}
  },true);
  window.addEventListener('load',function(){
    var imgs=document.images,broken=0;
    for(var i=0;i<imgs.length;i++){if(!imgs[i].complete||imgs[i].naturalWidth===0){broken++;}}
    document.body.setAttribute('data-images-total',String(imgs.length));
    document.body.setAttribute('data-images-broken',String(broken));
    document.body.setAttribute('data-render','complete');
  });
})();
"""


def _figs(*imgs: str) -> str:
    imgs = tuple(i for i in imgs if i)
    return f'<div class="figs">{"".join(imgs)}</div>' if imgs else ""


# -- the verdict table ------------------------------------------------------------------

def verdict_table(res: Any, style: bool = True) -> str:
    """The verdict table with its legend (the report's first screen; ``Results._repr_html_``)."""
    res = coerce(res)
    cols = measured_characteristics(res.verdicts, res.variants)
    rows = []
    for var in res.variants:
        cells = [f"<th>{e(var)}</th>"]
        for key, _ in cols:
            c = res.verdicts.get(var, {}).get(key)
            v = c.verdict if c is not None else Verdict.NOT_MEASURED
            cells.append(f'<td>{badge(v)}<span class="cell-note">{e(c.summary if c is not None else "")}</span></td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    head = "<tr><th>variant vs base</th>" + "".join(f"<th>{e(t)}</th>" for _, t in cols) + "</tr>"
    titles = dict(cols)
    legend = "".join(f"<li><b>{e(titles.get(k, k))}</b>: {e(v)}</li>" for k, v in res.thresholds.items()
                     if k in titles)
    words = "; ".join(f"{badge(v)} {e(v.meaning)}" for v in Verdict)
    out = (f'<table class="summary" id="summary">{head}{"".join(rows)}</table>'
           f'<div class="legend"><b>How to read the verdicts</b> — {words}.<ul>{legend}</ul></div>')
    return (f"<style>{_CSS}</style>" + out) if style else out


# -- built-in section renderers ---------------------------------------------------------

def _skipped(section: Any) -> str:
    sk = section.get("skipped") if hasattr(section, "get") else None
    if not sk:
        return ""
    return "".join(f'<p class="skip">{e(k)} not measured: {e(v)}</p>' for k, v in sk.items())


@register_renderer("models")
def _models(res: Results, ctx: RenderContext) -> str:
    models = res.get("models") or {}
    rows = []
    names, acc, lo, hi = [], [], [], []
    for g, m in models.items():
        a = m.get("accuracy") or {}
        cal = m.get("calibration") or {}
        rows.append(f"<tr><th>{e(g)}</th><td>{e(m.get('recipe', ''))}</td><td class=num>{len(m.get('members') or [])}</td>"
                    f"<td class=num>{fmt(a.get('mean'), 4)}</td><td class=num>[{fmt(a.get('ci_low'), 4)}, {fmt(a.get('ci_high'), 4)}]</td>"
                    f"<td class=num>{fmt(m.get('nonzero_fraction'), 3)}</td><td class=num>{fmt(m.get('size_mb'), 3)}</td>"
                    f"<td class=num>{fmt(cal.get('ece'), 3)}</td></tr>")
        if not missing(a.get("mean")):
            names.append(g)
            acc.append(a["mean"])
            lo.append(a.get("ci_low", a["mean"]))
            hi.append(a.get("ci_high", a["mean"]))
    out = ("<table><tr><th>model</th><th>how it was made</th><th>seeds</th><th>accuracy</th><th>95% CI</th>"
           "<th>non-zero weights</th><th>size (MB)</th><th>ECE</th></tr>" + "".join(rows) + "</table>")
    if names:
        out += _figs(ctx.plot("accuracy", plots.accuracy_bars, names, acc, lo, hi))
    return out


def _per_variant(res: Results, key: str, fn: Any, ctx: RenderContext) -> str:
    sec = res.get(key) or {}
    return "".join(f"<h3>{e(var)}</h3>" + (fn(sec[var], var, ctx) if sec.get(var) else
                                           '<p class="muted">not_measured</p>') for var in res.variants)


def _pe_entry(pe: Any, var: str, ctx: RenderContext) -> str:
    out = [_skipped(pe)]
    fl = pe.get("flips") or {}
    mc = pe.get("mcnemar") or {}
    div = pe.get("divergence") or {}
    cal = pe.get("calibration") or {}
    ac = pe.get("accuracy_change") or {}
    kl, js = div.get("kl") or {}, div.get("js") or {}
    rows = [("accuracy change (variant − base), 95% CI",
             f"{fmt(ac.get('mean'), 4)} [{fmt(ac.get('ci_low'), 4)}, {fmt(ac.get('ci_high'), 4)}]" if ac else "–"),
            ("churn (disagreement with base)", fmt(pe.get("churn"), 3, pct=True)),
            ("base seed-to-seed churn (reference)", fmt(pe.get("reference_churn"), 3, pct=True)),
            ("flips right→wrong / wrong→right", f"{fmt(fl.get('right_to_wrong'), 3, pct=True)} / "
                                                f"{fmt(fl.get('wrong_to_right'), 3, pct=True)}"),
            ("error-set Jaccard", fmt(pe.get("error_jaccard"), 3)),
            ("McNemar p-value", pval(mc.get("p_value"))),
            ("mean / p99 KL(base‖variant)", f"{fmt(kl.get('mean'), 3)} / {fmt(kl.get('p99'), 3)}"),
            ("mean / p99 JS", f"{fmt(js.get('mean'), 3)} / {fmt(js.get('p99'), 3)}"),
            ("ECE base → variant", f"{fmt(cal.get('ece_base'), 3)} → {fmt(cal.get('ece_variant'), 3)}"),
            ("Brier base → variant", f"{fmt(cal.get('brier_base'), 3)} → {fmt(cal.get('brier_variant'), 3)}")]
    pie = pe.get("pie") or {}
    if not missing(pie.get("count")):
        rows.append(("PIEs (modal label changed)", f"{e(pie['count'])} ({fmt(pie.get('fraction'), 3, pct=True)})"))
        rows.append(("base / variant accuracy on PIEs", f"{fmt(pie.get('acc_base_pie'), 3)} / {fmt(pie.get('acc_variant_pie'), 3)}"))
        rows.append(("base / variant accuracy on non-PIEs",
                     f"{fmt(pie.get('acc_base_non_pie'), 3)} / {fmt(pie.get('acc_variant_non_pie'), 3)}"))
    out.append("<table>" + "".join(f"<tr><th>{e(k)}</th><td class=num>{v}</td></tr>" for k, v in rows) + "</table>")
    figs = []
    hist = js.get("histogram")
    if hist:
        figs.append(ctx.plot(f"js_{var}", plots.histogram, hist["edges"], hist["counts"],
                             title=f"JS divergence per example: {var}", xlabel="JS(base, variant) [nats]"))
    if cal.get("bins_base") and cal.get("bins_variant"):
        figs.append(ctx.plot(f"reliability_{var}", plots.reliability, cal["bins_base"], cal["bins_variant"],
                             title=f"Reliability: {var}"))
    pc = pe.get("per_class") or {}
    if pc.get("normalized_change"):
        pvals = pc.get("p_value") or [None] * len(pc["normalized_change"])
        sig = [p is not None and p == p and p < 0.05 for p in (as_float(x) for x in pvals)]
        figs.append(ctx.plot(f"per_class_{var}", plots.per_class_bars, pc["class_names"], pc["normalized_change"], sig,
                             title=f"Per-class change of normalized recall: {var}"))
    out.append(_figs(*figs))
    if pc.get("normalized_change"):
        out.append('<p class="muted">Bars: normalized recall r̃<sub>c</sub> = recall<sub>c</sub> / accuracy; bar = '
                   'mean<sub>variant</sub> r̃<sub>c</sub> / mean<sub>base</sub> r̃<sub>c</sub> − 1: below 0, the class lost '
                   'more than the overall accuracy did (Hooker et al. 2019, 2020). Solid red where Welch\'s t-test across '
                   'seeds gives p &lt; 0.05, hatched otherwise. ' + e(pc.get("test_note") or "") + '</p>')
    out.append(_pie_examples(pie, var, ctx))
    return "".join(out)


def _pie_examples(pie: Any, var: str, ctx: RenderContext) -> str:
    ex = pie.get("examples") or []
    if not ex:
        return ""
    kind = pie.get("kind", "text")
    title = f"Examples the compression changed most ({'PIE' if pie.get('population') else 'CIE'}): {var}"
    if kind == "image" and all(x.get("image") is not None for x in ex):
        caps = [f"y={x.get('label', '?')} b={x.get('base_pred', '?')} v={x.get('variant_pred', '?')}" for x in ex]
        return (f"<h3>{e(title)}</h3>" + ctx.plot(f"pies_{var}", plots.image_grid, [x["image"] for x in ex], caps,
                                                  title=title)
                + '<p class="muted">y: true label, b: base (modal) prediction, v: variant (modal) prediction.</p>')
    rows = "".join(f"<tr><td>{e(x.get('id', ''))}</td><td>{e(x.get('text', x.get('display', '')))}</td>"
                   f"<td>{e(x.get('label', ''))}</td><td>{e(x.get('base_pred', ''))}</td><td>{e(x.get('variant_pred', ''))}</td>"
                   f"<td class=num>{fmt(x.get('score'), 3)}</td><td class=num>{fmt(x.get('js'), 3)}</td></tr>" for x in ex)
    return (f"<h3>{e(title)}</h3><table class='pie-text'><tr><th>id</th><th>example</th><th>label</th><th>base</th>"
            f"<th>variant</th><th>CIE score</th><th>JS</th></tr>{rows}</table>"
            '<p class="muted">PIEs first, then by CIE score (Taxicab distance of the label histograms), then by '
            'JS divergence of the predictive distributions.</p>')


def _rep_entry(rep: Any, var: str, ctx: RenderContext) -> str:
    out = [_skipped(rep)]
    cka = rep.get("cka") or {}
    if cka.get("matrix"):
        out.append(_figs(ctx.plot(f"cka_{var}", plots.cka_heatmap, cka["matrix"], cka["layers_base"],
                                  cka["layers_variant"],
                                  title=f"{cka.get('kernel', 'linear')} CKA ({cka.get('estimator', '')}): {var}",
                                  label_a="base layers", label_b=f"{var} layers")))
        corr = cka.get("correspondence") or []
        if corr:
            out.append("<table><tr><th>base layer</th><th>best-matching variant layer</th><th>CKA</th></tr>" +
                       "".join(f"<tr><td>{e(c['layer'])}</td><td>{e(c['match'])}</td><td class=num>{fmt(c['cka'], 3)}</td></tr>"
                               for c in corr) + "</table>")
        ref = cka.get("reference_final")
        out.append(f"<p>Final-representation CKA: <b>{fmt(cka.get('final'), 3)}</b>"
                   + (f" (two base seeds: {fmt(ref, 3)})" if ref is not None else "") + "</p>")
    knn = rep.get("knn_overlap") or {}
    if not missing(knn.get("mean")):
        ref = knn.get("reference_mean")
        out.append(f"<p>k-nearest-neighbour overlap (k={e(knn.get('k'))}, cosine, Jaccard per example): mean "
                   f"<b>{fmt(knn['mean'], 3)}</b>, median {fmt(knn.get('median'), 3)}"
                   + (f"; two base seeds: {fmt(ref, 3)}" if ref is not None else "") + "</p>")
        if knn.get("histogram"):
            out.append(_figs(ctx.plot(f"knn_{var}", plots.histogram, knn["histogram"]["edges"],
                                      knn["histogram"]["counts"], title=f"kNN overlap per example: {var}",
                                      xlabel="Jaccard", log=False)))
    return "".join(out)


def _dist_entry(d: Any, var: str, ctx: RenderContext) -> str:
    out = [_skipped(d)]
    ood = d.get("ood") or {}
    if ood.get("not_measured"):
        out.append(f'<p class="skip">OOD agreement not measured: {e(ood["not_measured"])}</p>')
    elif ood:
        out.append("<table><tr><th>OOD set</th><th>Jaccard of flagged sets</th><th>detection rate base</th>"
                   "<th>detection rate variant</th><th>k</th></tr>"
                   f"<tr><td>{e(ood.get('ood_name', ''))}</td><td class=num>{fmt(ood.get('jaccard'), 3)}</td>"
                   f"<td class=num>{fmt(ood.get('detection_base'), 3, pct=True)}</td>"
                   f"<td class=num>{fmt(ood.get('detection_variant'), 3, pct=True)}</td>"
                   f"<td class=num>{e(ood.get('k', ''))}</td></tr></table>")
    rows = []
    for key, label in (("confidence_shift", "confidence (max probability)"), ("entropy_shift", "predictive entropy")):
        ks = d.get(key) or {}
        if ks:
            rows.append(f"<tr><td>{e(label)}</td><td class=num>{fmt(ks.get('statistic'), 3)}</td><td class=num>{pval(ks.get('p_value'))}</td>"
                        f"<td class=num>{fmt(ks.get('mean_base'), 3)} → {fmt(ks.get('mean_variant'), 3)}</td></tr>")
    if rows:
        out.append("<table><tr><th>distribution</th><th>KS statistic</th><th>p-value</th><th>mean base → variant</th></tr>"
                   + "".join(rows) + "</table>")
    pcs = d.get("predicted_class_shift") or {}
    if pcs:
        out.append(f"<p>Predicted-class distribution shift: total variation {fmt(pcs.get('tv'), 3)}, "
                   f"chi-square p {pval(pcs.get('p_value'))}.</p>")
    return "".join(out)


@register_renderer("prediction_errors")
def _prediction_errors(res: Results, ctx: RenderContext) -> str:
    return _per_variant(res, "prediction_errors", _pe_entry, ctx)


@register_renderer("representation")
def _representation(res: Results, ctx: RenderContext) -> str:
    return _localization.render(res, ctx) + _per_variant(res, "representation", _rep_entry, ctx)


@register_renderer("distribution")
def _distribution(res: Results, ctx: RenderContext) -> str:
    return _per_variant(res, "distribution", _dist_entry, ctx)


def _tables(res: Results, key: str, ctx: RenderContext) -> str:
    """A section without a registered renderer: its tables."""
    sec = res.sections.get(key)
    if not hasattr(sec, "frames"):
        return '<p class="muted">this minidiff has no renderer for this section; its numbers are in results.json</p>'
    return "".join(df.to_html(index=False, na_rep="–", border=0, float_format=lambda x: f"{x:.4g}")
                   for df in sec.frames().values() if not df.empty)


def _not_computed(res: Results) -> str:
    rows = res.not_computed()
    if not rows:
        return '<p class="muted">Every value was computed.</p>'
    return ('<table id="not-computed-table"><tr><th>section</th><th>variant / model</th><th>metric</th><th>why</th></tr>'
            + "".join(f"<tr><td>{e(s)}</td><td>{e(n)}</td><td>{e(m)}</td><td>{e(r)}</td></tr>" for s, n, m, r in rows)
            + "</table>")


# -- the page ---------------------------------------------------------------------------

def _body(res: Results, ctx: RenderContext) -> str:
    st = res.study
    data = st.get("data") or {}
    ood = st.get("ood")
    has_ood = bool(ood) and not missing(ood)
    sub = (f"{e(data.get('name', ''))}: {e(data.get('num_eval', '?'))} evaluation examples"
           f"{', ' + e(data.get('num_classes')) + ' classes' if data.get('num_classes') else ''}"
           f"{', unlabelled' if not data.get('has_labels', True) else ''}"
           f"{'; OOD set ' + e(ood.get('name')) + ' (' + e(ood.get('num_examples')) + ' examples)' if has_ood else '; no OOD set'}"
           f" · base population of {e(st.get('population', 1))} seed(s) · minidiff {e(st.get('minidiff_version', ''))}")
    parts = [f"<h1>Is the compressed model a miniature of the original? — {e(st.get('name', 'study'))}</h1>",
             f'<div class="sub">{sub}</div>', verdict_table(res, style=False)]
    studies = res.studies
    if studies:
        parts.append("<p>Studies in this report (each has its full report with every figure):</p><ul>" + "".join(
            f'<li><a href="{e(s.get("report", ""))}">{e(s.get("name", tag))}</a> — {e(s.get("data", ""))}</li>'
            for tag, s in studies.items()) + "</ul>")
    notes = st.get("notes") or []
    if notes and not studies:
        parts.append("<ul>" + "".join(f'<li class="skip">{e(n)}</li>' for n in notes) + "</ul>")
    keys = [k for k in SECTIONS if k in res.sections] + [k for k in res.sections if k not in SECTIONS]
    for key in keys:
        typ = SECTIONS.get(key)
        title = getattr(typ, "title", key)
        desc = getattr(typ, "description", "")
        if studies and key != "models":
            continue  # an index over several studies: the evidence lives in each study's own report
        head = f'<h2 id="{e(key.replace("_", "-"))}">{e(title)}</h2>'
        if desc and key not in ("models", "adversarial"):
            head += f'<p class="muted">{e(desc)}</p>'
        fn = RENDERERS.get(key)
        try:
            body = fn(res, ctx) if fn is not None else _tables(res, key, ctx)
        except Exception as ex:  # one broken section must not take the whole report down
            body = f'<p class="skip">section could not be rendered: {e(type(ex).__name__)}: {e(ex)}</p>'
        parts.append(head + body)
    if studies:
        parts.append('<p class="muted">Every figure and table behind these verdicts is in the linked study reports.</p>')
    parts.append('<h2 id="not-computed">Not computed, and why</h2>' + _not_computed(res))
    parts.append(f'<p class="muted" style="margin-top:30px">Numbers: results.json (schema {e(res["schema"])}), '
                 "the CSV tables beside this file, and every figure in plots/ as PNG and SVG.</p>")
    return "\n".join(parts)


def _page(res: Results, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>minidiff report — {e(res.study.get('name', 'study'))}</title><style>{_CSS}</style>"
            f"<script>{_JS}</script></head><body>\n{body}\n</body></html>\n")


def render(res: Any) -> str:
    """The full HTML page for a :class:`~minidiff.results.Results` (or a results dict, either schema)."""
    res = coerce(res)
    return _page(res, _body(res, RenderContext()))


def render_files(res: Any, plots: bool = True) -> dict[str, bytes | str]:
    """``report.html`` and, with ``plots``, ``plots/<name>.png`` and ``plots/<name>.svg`` for every figure."""
    res = coerce(res)
    ctx = RenderContext(keep_figures=plots)
    out: dict[str, bytes | str] = {"report.html": _page(res, _body(res, ctx))}
    if plots:
        out.update(ctx.files())
    return out


__all__ = ["render", "render_files", "verdict_table", "register_renderer", "RenderContext"]
