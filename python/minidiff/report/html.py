"""The self-contained HTML report, rendered from a results dict only.

The first screen answers the question: one row per variant, one column per
characteristic, a verdict per cell (``same`` / ``minor`` / ``differs`` /
``not measured``) with the number behind it, and a legend with the thresholds.
Below come the evidence: accuracy with confidence intervals, flips and
divergence histograms, reliability diagrams, per-class change bars, PIE/CIE
examples with their text or image, CKA heatmaps, neighbourhood overlap, OOD
agreement and distribution shifts, the adversarial section, and every skipped
metric with its reason. All images are inline base64 PNGs; the page loads
nothing from the network. A small inline script records image load failures and
script errors into ``<body data-...>`` attributes, which the browser test reads.
"""

from __future__ import annotations

import html
from typing import Any, Callable

import numpy as np

from minidiff.report import plots

VERDICT_TEXT = {"same": "≈ same", "minor": "slight change", "differs": "differs", "not_measured": "not measured"}
CHARACTERISTICS = [("accuracy", "Accuracy"), ("prediction_errors", "Prediction errors"),
                   ("representation", "Representation"), ("distribution", "Data distribution"),
                   ("adversarial", "Adversarial")]

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


def _e(x: Any) -> str:
    return html.escape(str(x))


def _f(x: Any, digits: int = 3, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)):
        return "–"
    if pct:
        return f"{100 * float(x):.{max(digits - 2, 1)}f}%"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    return f"{float(x):.{digits}g}" if abs(float(x)) < 1e-3 and float(x) != 0 else f"{float(x):.{digits}f}"


def _p(x: Any) -> str:
    if x is None:
        return "–"
    return "<1e-4" if float(x) < 1e-4 else f"{float(x):.3g}"


def badge(verdict: str) -> str:
    return f'<span class="v v-{_e(verdict)}">{_e(VERDICT_TEXT.get(verdict, verdict))}</span>'


def _img(src: str, alt: str) -> str:
    return f'<img src="{src}" alt="{_e(alt)}">'


def _safe_plot(fn: Callable[..., str], *args: Any, **kwargs: Any) -> str:
    """A figure, or a stated reason if it cannot be drawn (never a broken image)."""
    try:
        return _img(fn(*args, **kwargs), kwargs.get("title", args[-1] if args else "figure"))
    except (ValueError, TypeError, KeyError, IndexError) as e:
        return f'<p class="skip">figure not drawn: {_e(e)}</p>'


# -- sections -------------------------------------------------------------------

def _summary(res: dict[str, Any]) -> str:
    verdicts = res.get("verdicts", {})
    thresholds = res.get("thresholds", {})
    rows = []
    for var in res.get("variants", []):
        cells = [f"<th>{_e(var)}</th>"]
        for key, _ in CHARACTERISTICS:
            v = verdicts.get(var, {}).get(key, {"verdict": "not_measured", "summary": ""})
            cells.append(f'<td>{badge(v.get("verdict", "not_measured"))}'
                         f'<span class="cell-note">{_e(v.get("summary", ""))}</span></td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    head = "<tr><th>variant vs base</th>" + "".join(f"<th>{_e(t)}</th>" for _, t in CHARACTERISTICS) + "</tr>"
    legend = "".join(f"<li><b>{_e(k)}</b>: {_e(v)}</li>" for k, v in thresholds.items())
    return (f'<table class="summary" id="summary">{head}{"".join(rows)}</table>'
            f'<div class="legend"><b>How to read the verdicts</b> — {badge("same")} within what retraining '
            f'or resampling alone would change; {badge("minor")} measurable but small; {badge("differs")} '
            f'the compressed model is not a miniature of the base on this characteristic; '
            f'{badge("not_measured")} the data needed was not given (reason in the section).'
            f'<ul>{legend}</ul></div>')


def _models(res: dict[str, Any]) -> str:
    models = res.get("models", {})
    rows = []
    names, acc, lo, hi = [], [], [], []
    for g, m in models.items():
        a = m.get("accuracy") or {}
        rows.append(f"<tr><th>{_e(g)}</th><td>{_e(m.get('recipe', ''))}</td><td class=num>{len(m.get('members', []))}</td>"
                    f"<td class=num>{_f(a.get('mean'), 4)}</td><td class=num>[{_f(a.get('ci_low'), 4)}, {_f(a.get('ci_high'), 4)}]</td>"
                    f"<td class=num>{_f(m.get('nonzero_fraction'), 3)}</td><td class=num>{_f(m.get('size_mb'), 3)}</td>"
                    f"<td class=num>{_f((m.get('calibration') or {}).get('ece'), 3)}</td></tr>")
        if a.get("mean") is not None:
            names.append(g)
            acc.append(a["mean"])
            lo.append(a.get("ci_low", a["mean"]))
            hi.append(a.get("ci_high", a["mean"]))
    out = ("<table><tr><th>model</th><th>how it was made</th><th>seeds</th><th>accuracy</th><th>95% CI</th>"
           "<th>non-zero weights</th><th>size (MB)</th><th>ECE</th></tr>" + "".join(rows) + "</table>")
    if names:
        out += f'<div class="figs">{_safe_plot(plots.accuracy_bars, names, acc, lo, hi)}</div>'
    return out


def _skipped(section: dict[str, Any]) -> str:
    sk = section.get("skipped") or {}
    if not sk:
        return ""
    return "".join(f'<p class="skip">{_e(k)} not measured: {_e(v)}</p>' for k, v in sk.items())


def _prediction_errors(res: dict[str, Any], var: str) -> str:
    pe = res.get("prediction_errors", {}).get(var)
    if not pe:
        return '<p class="muted">not measured</p>'
    out = [_skipped(pe)]
    fl = pe.get("flips") or {}
    mc = pe.get("mcnemar") or {}
    div = pe.get("divergence") or {}
    cal = pe.get("calibration") or {}
    ac = pe.get("accuracy_change") or {}
    rows = [("accuracy change (variant − base), 95% CI",
             f"{_f(ac.get('mean'), 4)} [{_f(ac.get('ci_low'), 4)}, {_f(ac.get('ci_high'), 4)}]" if ac else "–"),
            ("churn (disagreement with base)", _f(pe.get("churn"), 3, pct=True)),
            ("base seed-to-seed churn (reference)", _f(pe.get("reference_churn"), 3, pct=True)),
            ("flips right→wrong / wrong→right", f"{_f(fl.get('right_to_wrong'), 3, pct=True)} / "
                                                f"{_f(fl.get('wrong_to_right'), 3, pct=True)}"),
            ("error-set Jaccard", _f(pe.get("error_jaccard"), 3)),
            ("McNemar p-value", _p(mc.get("p_value"))),
            ("mean / p99 KL(base‖variant)", f"{_f((div.get('kl') or {}).get('mean'), 3)} / {_f((div.get('kl') or {}).get('p99'), 3)}"),
            ("mean / p99 JS", f"{_f((div.get('js') or {}).get('mean'), 3)} / {_f((div.get('js') or {}).get('p99'), 3)}"),
            ("ECE base → variant", f"{_f(cal.get('ece_base'), 3)} → {_f(cal.get('ece_variant'), 3)}"),
            ("Brier base → variant", f"{_f(cal.get('brier_base'), 3)} → {_f(cal.get('brier_variant'), 3)}")]
    pie = pe.get("pie") or {}
    if pie.get("count") is not None:
        rows.append(("PIEs (modal label changed)", f"{pie['count']} ({_f(pie.get('fraction'), 3, pct=True)})"))
        rows.append(("base / variant accuracy on PIEs", f"{_f(pie.get('acc_base_pie'), 3)} / {_f(pie.get('acc_variant_pie'), 3)}"))
        rows.append(("base / variant accuracy on non-PIEs", f"{_f(pie.get('acc_base_non_pie'), 3)} / {_f(pie.get('acc_variant_non_pie'), 3)}"))
    out.append("<table>" + "".join(f"<tr><th>{_e(k)}</th><td class=num>{v}</td></tr>" for k, v in rows) + "</table>")
    figs = []
    hist = (div.get("js") or {}).get("histogram")
    if hist:
        figs.append(_safe_plot(plots.histogram, hist["edges"], hist["counts"],
                               title=f"JS divergence per example: {var}", xlabel="JS(base, variant) [nats]"))
    if cal.get("bins_base") and cal.get("bins_variant"):
        figs.append(_safe_plot(plots.reliability, cal["bins_base"], cal["bins_variant"], title=f"Reliability: {var}"))
    pc = pe.get("per_class") or {}
    if pc.get("normalized_change"):
        sig = [p is not None and p < 0.05 for p in pc.get("p_values", [None] * len(pc["normalized_change"]))]
        figs.append(_safe_plot(plots.per_class_bars, pc["class_names"], pc["normalized_change"], sig,
                               title=f"Per-class change of normalized recall: {var}"))
    if figs:
        out.append(f'<div class="figs">{"".join(figs)}</div>')
    if pc.get("normalized_change"):
        out.append('<p class="muted">Bars: normalized recall r̃<sub>c</sub> = recall<sub>c</sub> / accuracy; bar = '
                   'mean<sub>variant</sub> r̃<sub>c</sub> / mean<sub>base</sub> r̃<sub>c</sub> − 1: below 0, the class lost '
                   'more than the overall accuracy did (Hooker et al. 2019, 2020). Solid red where Welch\'s t-test across '
                   'seeds gives p &lt; 0.05, hatched otherwise. ' + _e(pc.get("test_note") or "") + '</p>')
    out.append(_pie_examples(pie, var))
    return "".join(out)


def _pie_examples(pie: dict[str, Any], var: str) -> str:
    ex = pie.get("examples") or []
    if not ex:
        return ""
    kind = pie.get("kind", "text")
    title = f"Examples the compression changed most ({'PIE' if pie.get('population') else 'CIE'}): {var}"
    if kind == "image" and all(e.get("image") is not None for e in ex):
        caps = [f"y={e.get('label', '?')} b={e.get('base_pred', '?')} v={e.get('variant_pred', '?')}" for e in ex]
        return (f"<h3>{_e(title)}</h3>" + _safe_plot(plots.image_grid, [np.asarray(e["image"]) for e in ex], caps, title=title)
                + '<p class="muted">y: true label, b: base (modal) prediction, v: variant (modal) prediction.</p>')
    rows = "".join(f"<tr><td>{_e(e.get('id', ''))}</td><td>{_e(e.get('text', e.get('display', '')))}</td><td>{_e(e.get('label', ''))}</td>"
                   f"<td>{_e(e.get('base_pred', ''))}</td><td>{_e(e.get('variant_pred', ''))}</td>"
                   f"<td class=num>{_f(e.get('score'), 3)}</td><td class=num>{_f(e.get('js'), 3)}</td></tr>" for e in ex)
    return (f"<h3>{_e(title)}</h3><table class='pie-text'><tr><th>id</th><th>example</th><th>label</th><th>base</th>"
            f"<th>variant</th><th>CIE score</th><th>JS</th></tr>{rows}</table>"
            '<p class="muted">PIEs first, then by CIE score (Taxicab distance of the label histograms), then by '
            'JS divergence of the predictive distributions.</p>')


def _representation(res: dict[str, Any], var: str) -> str:
    rep = res.get("representation", {}).get(var)
    if not rep:
        return '<p class="muted">not measured</p>'
    out = [_skipped(rep)]
    cka = rep.get("cka") or {}
    if cka.get("matrix"):
        out.append('<div class="figs">' + _safe_plot(
            plots.cka_heatmap, cka["matrix"], cka["layers_base"], cka["layers_variant"],
            title=f"{cka.get('kernel', 'linear')} CKA ({cka.get('estimator', '')}): {var}",
            label_a="base layers", label_b=f"{var} layers") + "</div>")
        corr = cka.get("correspondence") or []
        if corr:
            out.append("<table><tr><th>base layer</th><th>best-matching variant layer</th><th>CKA</th></tr>" +
                       "".join(f"<tr><td>{_e(c['layer'])}</td><td>{_e(c['match'])}</td><td class=num>{_f(c['cka'], 3)}</td></tr>"
                               for c in corr) + "</table>")
        out.append(f"<p>Final-representation CKA: <b>{_f(cka.get('final'), 3)}</b>"
                   + (f" (two base seeds: {_f(cka.get('reference_final'), 3)})" if cka.get("reference_final") is not None else "")
                   + "</p>")
    knn = rep.get("knn_overlap") or {}
    if knn.get("mean") is not None:
        out.append(f"<p>k-nearest-neighbour overlap (k={_e(knn.get('k'))}, cosine, Jaccard per example): mean "
                   f"<b>{_f(knn['mean'], 3)}</b>, median {_f(knn.get('median'), 3)}"
                   + (f"; two base seeds: {_f(knn.get('reference_mean'), 3)}" if knn.get("reference_mean") is not None else "")
                   + "</p>")
        if knn.get("histogram"):
            out.append('<div class="figs">' + _safe_plot(plots.histogram, knn["histogram"]["edges"], knn["histogram"]["counts"],
                                                         title=f"kNN overlap per example: {var}", xlabel="Jaccard", log=False) + "</div>")
    return "".join(out)


def _distribution(res: dict[str, Any], var: str) -> str:
    d = res.get("distribution", {}).get(var)
    if not d:
        return '<p class="muted">not measured</p>'
    out = [_skipped(d)]
    ood = d.get("ood") or {}
    if ood.get("not_measured"):
        out.append(f'<p class="skip">OOD agreement not measured: {_e(ood["not_measured"])}</p>')
    elif ood:
        out.append("<table><tr><th>OOD set</th><th>Jaccard of flagged sets</th><th>detection rate base</th>"
                   "<th>detection rate variant</th><th>k</th></tr>"
                   f"<tr><td>{_e(ood.get('ood_name', ''))}</td><td class=num>{_f(ood.get('jaccard'), 3)}</td>"
                   f"<td class=num>{_f(ood.get('detection_base'), 3, pct=True)}</td><td class=num>{_f(ood.get('detection_variant'), 3, pct=True)}</td>"
                   f"<td class=num>{_e(ood.get('k', ''))}</td></tr></table>")
    rows = []
    for key, label in (("confidence_shift", "confidence (max probability)"), ("entropy_shift", "predictive entropy")):
        ks = d.get(key) or {}
        if ks:
            rows.append(f"<tr><td>{_e(label)}</td><td class=num>{_f(ks.get('statistic'), 3)}</td><td class=num>{_p(ks.get('p_value'))}</td>"
                        f"<td class=num>{_f(ks.get('mean_base'), 3)} → {_f(ks.get('mean_variant'), 3)}</td></tr>")
    if rows:
        out.append("<table><tr><th>distribution</th><th>KS statistic</th><th>p-value</th><th>mean base → variant</th></tr>"
                   + "".join(rows) + "</table>")
    pcs = d.get("predicted_class_shift") or {}
    if pcs:
        out.append(f"<p>Predicted-class distribution shift: total variation {_f(pcs.get('tv'), 3)}, "
                   f"chi-square p {_p(pcs.get('p_value'))}.</p>")
    return "".join(out)


def _adversarial(res: dict[str, Any]) -> str:
    adv = res.get("adversarial") or {}
    if not adv or adv.get("not_measured"):
        return f'<p class="muted">not measured: {_e(adv.get("not_measured", "no [adversarial] table in the study"))}</p>'
    try:
        from minidiff.adversarial import render_section
        if "attacks" not in adv:  # an index over several studies: one section each
            return "".join(f"<h3>{_e(tag)}</h3>" + (render_section(a) if a and not a.get("not_measured")
                                                    else f'<p class="muted">not measured: {_e((a or {}).get("not_measured", ""))}</p>')
                           for tag, a in adv.items())
        return render_section(adv)
    except Exception as e:  # the adversarial fragment must not take the whole report down
        return f'<p class="skip">adversarial section could not be rendered: {_e(type(e).__name__)}: {_e(e)}</p>'


def render(res: dict[str, Any]) -> str:
    """The full HTML page for a results dict (see ``minidiff.study.results`` for the schema)."""
    st = res.get("study", {})
    data = st.get("data", {})
    ood = st.get("ood") or {}
    sub = (f"{_e(data.get('name', ''))}: {_e(data.get('num_eval', '?'))} evaluation examples"
           f"{', ' + _e(data.get('num_classes')) + ' classes' if data.get('num_classes') else ''}"
           f"{', unlabelled' if not data.get('has_labels', True) else ''}"
           f"{'; OOD set ' + _e(ood.get('name')) + ' (' + _e(ood.get('num_examples')) + ' examples)' if ood else '; no OOD set'}"
           f" · base population of {_e(st.get('population', 1))} seed(s) · minidiff {_e(st.get('minidiff_version', ''))}")
    parts = [f"<h1>Is the compressed model a miniature of the original? — {_e(st.get('name', 'study'))}</h1>",
             f'<div class="sub">{sub}</div>', _summary(res)]
    studies = res.get("studies") or {}
    if studies:
        parts.append("<p>Studies in this report (each has its full report with every figure):</p><ul>" + "".join(
            f'<li><a href="{_e(s.get("report", ""))}">{_e(s.get("name", tag))}</a> — {_e(s.get("data", ""))}</li>'
            for tag, s in studies.items()) + "</ul>")
    notes = st.get("notes") or []
    if notes and not studies:
        parts.append("<ul>" + "".join(f'<li class="skip">{_e(n)}</li>' for n in notes) + "</ul>")
    parts.append("<h2>Models</h2>" + _models(res))
    if studies:  # an index over several studies: the evidence lives in each study's own report
        parts.append('<p class="muted">Every figure and table behind these verdicts is in the linked study reports.</p>')
        return _page(st, "\n".join(parts))
    parts.append('<h2 id="prediction-errors">Prediction errors</h2><p class="muted">Flips, churn and error overlap '
                 '(Dutta et al. 2024), KL/JS divergence of predictive distributions, calibration, per-class effects and '
                 'compression-identified exemplars (Hooker et al. 2019/2020).</p>')
    for var in res.get("variants", []):
        parts.append(f"<h3>{_e(var)}</h3>" + _prediction_errors(res, var))
    parts.append('<h2 id="representation">Data representation</h2><p class="muted">Layer-by-layer CKA (Kornblith et al. 2019; '
                 'unbiased HSIC, Song et al. 2012) and k-nearest-neighbour overlap of final embeddings (Rai et al. 2024).</p>')
    for var in res.get("variants", []):
        parts.append(f"<h3>{_e(var)}</h3>" + _representation(res, var))
    parts.append('<h2 id="distribution">Data distribution</h2><p class="muted">Agreement of deep-kNN out-of-distribution flags '
                 '(Sun et al. 2022), confidence and entropy shifts (two-sample KS), predicted-class shift.</p>')
    for var in res.get("variants", []):
        parts.append(f"<h3>{_e(var)}</h3>" + _distribution(res, var))
    parts.append('<h2 id="adversarial">Adversarial vulnerability</h2>' + _adversarial(res))
    parts.append(f'<p class="muted" style="margin-top:30px">Numbers: results.json (schema {_e(res.get("schema", ""))}) '
                 "and the CSV tables beside this file.</p>")
    return _page(st, "\n".join(parts))


def _page(st: dict[str, Any], body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>minidiff report — {_e(st.get('name', 'study'))}</title><style>{_CSS}</style>"
            f"<script>{_JS}</script></head><body>\n{body}\n</body></html>\n")
