"""The language-model study in the terminal and in HTML (rendered from results only).

:func:`terminal_table` prints, per variant, the final statistics of llama.cpp's
``llama-perplexity --kl-divergence`` with the same line names, order and number
formats (``tools/perplexity/perplexity.cpp``, ``kl_divergence()``), so the block
can be pasted next to llama.cpp output; a one-line-per-variant summary with the
columns of llama.cpp's per-chunk lines comes first, and the statistics llama.cpp
does not print (reverse KLD, JS) follow under their own heading.

:func:`lm_section` is the HTML section (statistics table per variant, KLD and
flip rate by frequency bucket of the correct token, by position in the window
and by the base model's predictive entropy, token-level CKA of matching layers,
and "where it hurts": the highest-KLD windows with every scored token shaded by
its KLD, flipped tokens outlined, both models' top candidates on hover, and the
flipped tokens in context). :func:`render_lm_report` wraps it in a page. Every
piece of text from the data (tokens, names) is HTML-escaped.
"""

from __future__ import annotations

import base64
import html
import io
import math
from typing import Any, Mapping, Sequence

from matplotlib.figure import Figure

from .context import RenderContext, register_renderer

BASE_COLOR = "#4c72b0"
_COLORS = ("#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")
KLD_PCTS = (99.9, 99.0, 95.0, 90.0, 50.0, 10.0, 5.0, 1.0, 0.1)
DP_PCTS = (99.9, 99.0, 95.0, 90.0, 75.0, 50.0, 25.0, 10.0, 5.0, 1.0, 0.1)


# -- numbers ---------------------------------------------------------------------------

def _f(x: Any) -> float:
    if x is None or isinstance(x, Mapping) or hasattr(x, "not_computed"):  # missing / not computed
        return math.nan
    if isinstance(x, str):
        try:
            return float(x)
        except ValueError:
            return math.nan
    return float(x)


def _pct(pcts: Mapping[Any, Any] | None, p: float) -> float | None:
    for k, v in (pcts or {}).items():
        if abs(_f(k) - p) < 1e-9:
            return _f(v)
    return None


# -- terminal --------------------------------------------------------------------------

def llama_cpp_block(d: Mapping[str, Any]) -> list[str]:
    """llama.cpp's final statistics for one variant (``d``: a TokenDivergenceResult as a dict)."""
    g = lambda k: _f(d.get(k))  # noqa: E731
    lines = ["====== Perplexity statistics ======",
             f"Mean PPL(Q)                   : {g('ppl_variant'):10.6f} ± {g('ppl_variant_err'):10.6f}",
             f"Mean PPL(base)                : {g('ppl_base'):10.6f} ± {g('ppl_base_err'):10.6f}",
             f"Cor(ln(PPL(Q)), ln(PPL(base))): {100 * g('ln_ppl_correlation'):6.2f}%",
             f"Mean ln(PPL(Q)/PPL(base))     : {g('ln_ppl_ratio'):10.6f} ± {g('ln_ppl_ratio_err'):10.6f}",
             f"Mean PPL(Q)/PPL(base)         : {g('ppl_ratio'):10.6f} ± {g('ppl_ratio_err'):10.6f}",
             f"Mean PPL(Q)-PPL(base)         : {g('ppl_diff'):10.6f} ± {g('ppl_diff_err'):10.6f}",
             "",
             "====== KL divergence statistics ======",
             f"Mean    KLD: {g('kld'):10.6f} ± {g('kld_err'):10.6f}",
             f"Maximum KLD: {g('kld_max'):10.6f}"]
    for p in KLD_PCTS:
        v = _pct(d.get("kld_percentiles"), p)
        if v is not None:
            lines.append(f"Median  KLD: {v:10.6f}" if p == 50.0 else f"{p:4.1f}%   KLD: {v:10.6f}")
    lines += [f"Minimum KLD: {g('kld_min'):10.6f}", "",
              "====== Token probability statistics ======",
              f"Mean    Δp: {100 * g('delta_p'):6.3f} ± {100 * g('delta_p_err'):5.3f} %",
              f"Maximum Δp: {100 * g('delta_p_max'):6.3f}%"]
    for p in DP_PCTS:
        v = _pct(d.get("delta_p_percentiles"), p)
        if v is not None:
            lines.append(f"Median  Δp: {100 * v:6.3f}%" if p == 50.0 else f"{p:4.1f}%   Δp: {100 * v:6.3f}%")
    lines += [f"Minimum Δp: {100 * g('delta_p_min'):6.3f}%",
              f"RMS Δp    : {100 * g('delta_p_rms'):6.3f} ± {100 * g('delta_p_rms_err'):5.3f} %",
              f"Same top p: {100 * g('same_top1'):6.3f} ± {100 * g('same_top1_err'):5.3f} %"]
    return lines


def terminal_table(res: Mapping[str, Any]) -> str:
    """The llama.cpp-style text of a language-model study's results (``LMStudyResult.to_dict()``)."""
    st = res.get("study", {})
    out = [f"{st.get('name', 'language-model study')}: {st.get('n_windows')} windows x {st.get('n_ctx')} tokens, "
           f"{st.get('scored_tokens')} scored ({st.get('task')}, {st.get('mode')})", "",
           f"{'variant':<16}{'PPL':>22}{'ln(PPL(Q)/PPL(base))':>27}{'KL Divergence':>25}{'Δp RMS':>20}"
           f"{'Same top p':>20}"]
    for name, v in res.get("variants", {}).items():
        d = v["divergence"]
        g = lambda k: _f(d.get(k))  # noqa: E731
        out.append(f"{name[:15]:<16}{g('ppl_variant'):10.4f} ± {g('ppl_variant_err'):9.4f}"
                   f"    {g('ln_ppl_ratio'):10.5f} ± {g('ln_ppl_ratio_err'):10.5f}"
                   f"    {g('kld'):10.5f} ± {g('kld_err'):10.5f}"
                   f"    {100 * g('delta_p_rms'):6.3f} ± {100 * g('delta_p_rms_err'):6.3f} %"
                   f"    {100 * g('same_top1'):6.3f} ± {100 * g('same_top1_err'):6.3f} %")
    for name, v in res.get("variants", {}).items():
        d = v["divergence"]
        g = lambda k: _f(d.get(k))  # noqa: E731
        out += ["", f"### {name} (Q) vs base", *llama_cpp_block(d), "",
                "====== minidiff: beyond llama.cpp ======",
                f"Mean    KLD(Q||base): {g('kld_reverse'):10.6f} ± {g('kld_reverse_err'):10.6f}"
                f"   max {g('kld_reverse_max'):10.6f}",
                f"Mean    JS          : {g('js'):10.6f} ± {g('js_err'):10.6f}",
                f"Top-5 / top-10 overlap: {100 * g('top5_overlap'):6.2f}% / {100 * g('top10_overlap'):6.2f}%",
                f"Cor(window ln PPL)  : {100 * g('window_ln_ppl_correlation'):6.2f}%"]
    return "\n".join(out) + "\n"


# -- figures ---------------------------------------------------------------------------

def png_uri(fig: Figure) -> str:
    """A Figure as an inline ``data:image/png;base64`` URI."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def breakdown_figure(variants: Mapping[str, Any], key: str, xlabel: str, log_x: bool = False) -> Figure:
    """Mean KLD (left) and flip rate (right) per bucket of ``key`` (``by_frequency`` /
    ``by_position`` / ``by_entropy``), one line per variant."""
    fig = Figure(figsize=(9.0, 3.0))
    ax_k, ax_f = fig.subplots(1, 2)
    for i, (name, v) in enumerate(variants.items()):
        rows = v["divergence"].get(key) or []
        if not rows:
            continue
        x = [(_f(r["lo"]) * _f(r["hi"])) ** 0.5 if log_x else (_f(r["lo"]) + _f(r["hi"])) / 2 for r in rows]
        c = _COLORS[i % len(_COLORS)]
        ax_k.plot(x, [_f(r["kld"]) for r in rows], marker="o", ms=3, color=c, label=name)
        ax_f.plot(x, [100 * _f(r["flip_rate"]) for r in rows], marker="o", ms=3, color=c, label=name)
    for ax, yl in ((ax_k, "mean KLD(base || variant)"), (ax_f, "top-1 flip rate (%)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(yl)
        ax.spines["top"].set_visible(False)
        ax.spines["right"].set_visible(False)
        if log_x:
            ax.set_xscale("log", base=2)
    ax_k.set_yscale("log", nonpositive="mask")  # KLD >= 0; exact zeros (identical models) are not drawn
    if variants:
        ax_f.legend(fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


# -- html ------------------------------------------------------------------------------

def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _num(x: Any, fmt: str = "{:.6f}") -> str:
    v = _f(x)
    return "–" if math.isnan(v) else ("∞" if math.isinf(v) else fmt.format(v))


def _stats_table(d: Mapping[str, Any]) -> str:
    rows = [("Mean PPL(Q)", d.get("ppl_variant"), d.get("ppl_variant_err")),
            ("Mean PPL(base)", d.get("ppl_base"), d.get("ppl_base_err")),
            ("Mean ln(PPL(Q)/PPL(base))", d.get("ln_ppl_ratio"), d.get("ln_ppl_ratio_err")),
            ("Mean PPL(Q)/PPL(base)", d.get("ppl_ratio"), d.get("ppl_ratio_err")),
            ("Mean PPL(Q)-PPL(base)", d.get("ppl_diff"), d.get("ppl_diff_err")),
            ("Mean KLD(base‖Q)", d.get("kld"), d.get("kld_err")),
            ("Mean KLD(Q‖base)", d.get("kld_reverse"), d.get("kld_reverse_err")),
            ("Mean JS", d.get("js"), d.get("js_err"))]
    body = "".join(f"<tr><td>{_e(n)}</td><td>{_num(v)}</td><td>± {_num(e)}</td></tr>" for n, v, e in rows)
    body += (f"<tr><td>Cor(ln(PPL(Q)), ln(PPL(base)))</td><td>{_num(_f(d.get('ln_ppl_correlation')) * 100, '{:.2f}%')}"
             "</td><td></td></tr>"
             f"<tr><td>RMS Δp</td><td>{_num(_f(d.get('delta_p_rms')) * 100, '{:.3f}%')}</td>"
             f"<td>± {_num(_f(d.get('delta_p_rms_err')) * 100, '{:.3f}%')}</td></tr>"
             f"<tr><td>Same top p</td><td>{_num(_f(d.get('same_top1')) * 100, '{:.3f}%')}</td>"
             f"<td>± {_num(_f(d.get('same_top1_err')) * 100, '{:.3f}%')}</td></tr>")
    pk = "".join(f"<tr><td>{_e(p)}%</td><td>{_num(_pct(d.get('kld_percentiles'), p))}</td>"
                 f"<td>{_num(_pct(d.get('kld_reverse_percentiles'), p))}</td></tr>"
                 for p in KLD_PCTS if _pct(d.get("kld_percentiles"), p) is not None)
    pd = "".join(f"<tr><td>{_e(p)}%</td><td>{_num(_f(_pct(d.get('delta_p_percentiles'), p)) * 100, '{:.3f}%')}</td></tr>"
                 for p in DP_PCTS if _pct(d.get("delta_p_percentiles"), p) is not None)
    return (f"<div class='lm-tables'><table class='lm-stats'><tr><th>statistic</th><th>value</th><th>uncertainty</th>"
            f"</tr>{body}</table>"
            f"<table class='lm-stats'><tr><th>KLD</th><th>base‖Q</th><th>Q‖base</th></tr>"
            f"<tr><td>max</td><td>{_num(d.get('kld_max'))}</td><td>{_num(d.get('kld_reverse_max'))}</td></tr>{pk}"
            f"<tr><td>min</td><td>{_num(d.get('kld_min'))}</td><td>{_num(d.get('kld_reverse_min'))}</td></tr></table>"
            f"<table class='lm-stats'><tr><th>Δp</th><th>p_Q − p_base</th></tr>"
            f"<tr><td>max</td><td>{_num(_f(d.get('delta_p_max')) * 100, '{:.3f}%')}</td></tr>{pd}"
            f"<tr><td>min</td><td>{_num(_f(d.get('delta_p_min')) * 100, '{:.3f}%')}</td></tr></table></div>")


def _cands(c: Sequence[Sequence[Any]]) -> str:
    return ", ".join(f"{_show(t)} {100 * _f(p):.1f}%" for t, p in c)


def _show(token: Any) -> str:
    """A token as visible text: quotes, with newlines and tabs as escapes."""
    return repr(str(token))


def _window_html(win: Mapping[str, Any]) -> str:
    spans = []
    for t in win.get("tokens", []):
        txt = str(t.get("text", ""))
        vis = _e(txt).replace("\n", "↵<br>")
        if not t.get("scored"):
            spans.append(f"<span class='ctx'>{vis}</span>")
            continue
        kld = _f(t.get("kld"))
        alpha = 0.0 if not kld > 0 else min(1.0, math.log10(1 + kld * 1e3) / 3)
        tip = (f"KLD {kld:.4g} | p_base(token) {_f(t.get('p_base')):.3f}, p_Q(token) {_f(t.get('p_variant')):.3f}"
               f" | base: {_cands(t.get('base_top', []))} | variant: {_cands(t.get('variant_top', []))}")
        cls = "tok flip" if t.get("flipped") else "tok"
        spans.append(f"<span class='{cls}' style='background: rgba(196,78,82,{alpha:.3f})' "
                     f"title='{_e(tip)}'>{vis}</span>")
    return (f"<div class='lm-window'><div class='lm-window-head'>window {_e(win.get('window'))}: mean KLD "
            f"{_num(win.get('mean_kld'), '{:.5f}')}, {_e(win.get('flips'))} flipped top-1</div>"
            f"<div class='lm-text'>{''.join(spans)}</div></div>")


def _flips_html(flips: Sequence[Mapping[str, Any]]) -> str:
    if not flips:
        return "<p>No top-1 flips among the scored tokens.</p>"
    rows = "".join(
        f"<tr><td>{_e(f.get('window'))}:{_e(f.get('position'))}</td>"
        f"<td class='lm-ctx'>{_e(f.get('context', '')).replace(chr(10), '↵')}"
        f"<mark>{_e(f.get('target', '')).replace(chr(10), '↵')}</mark>"
        f"<span class='ctx'>{_e(f.get('after', '')).replace(chr(10), '↵')}</span></td>"
        f"<td>{_num(f.get('kld'), '{:.4g}')}</td><td>{_e(_cands(f.get('base_top', [])))}</td>"
        f"<td>{_e(_cands(f.get('variant_top', [])))}</td></tr>" for f in flips)
    return ("<table class='lm-flips'><tr><th>window:pos</th><th>context [correct token]</th><th>KLD</th>"
            f"<th>base top candidates</th><th>variant top candidates</th></tr>{rows}</table>")


def _cka_html(v: Mapping[str, Any]) -> str:
    m = v.get("cka")
    if not isinstance(m, list) or not m:  # not measured (None, or a not-computed reason)
        return ""
    la, lb = v.get("layers_base") or [], v.get("layers_variant") or []
    diag = [(la[i] if i < len(la) else i, _f(m[i][i])) for i in range(min(len(m), len(m[0])))]
    cells = "".join(f"<td title='{_e(n)}'>{c:.4f}</td>" for n, c in diag)
    return (f"<p>Token-level linear CKA (unbiased; every scored token a sample) of matching layers, "
            f"base vs variant ({len(la)} x {len(lb)} layer pairs in results.json):</p>"
            f"<table class='lm-stats'><tr>{''.join(f'<th>{_e(n)}</th>' for n, _ in diag)}</tr>"
            f"<tr>{cells}</tr></table>")


CSS = """
.lm-tables{display:flex;gap:1.5em;flex-wrap:wrap;align-items:flex-start}
table.lm-stats,table.lm-flips{border-collapse:collapse;font-size:13px;margin:.5em 0}
.lm-stats td,.lm-stats th,.lm-flips td,.lm-flips th{border-bottom:1px solid #ddd;padding:2px 8px;text-align:right}
.lm-flips td.lm-ctx{text-align:left;font-family:monospace;white-space:pre-wrap}
.lm-text{font-family:monospace;font-size:13px;line-height:1.7;white-space:pre-wrap;border:1px solid #ddd;padding:.5em}
.lm-text .ctx,.lm-ctx .ctx{color:#999}
.lm-text .tok.flip{outline:2px solid #c44e52;border-radius:2px}
.lm-window-head{font-weight:600;margin-top:1em}
mark{background:#f4c7c3;outline:2px solid #c44e52}
"""


def _figure(ctx: Any, name: str, fig: Figure, alt: str) -> str:
    """A figure in the page: through the report's context (also written to ``plots/``), or inline."""
    if ctx is not None:
        return ctx.figure(name, fig, alt)
    return f"<img alt='{_e(alt)}' src='{png_uri(fig)}'>"


def lm_section(res: Mapping[str, Any], plots: bool = True, *, ctx: Any = None, heading: bool = True,
               tag: str = "") -> str:
    """The HTML section of a language-model study (a fragment; see :func:`render_lm_report`).

    ``res``: ``{"study": ..., "variants": {name: entry}}`` (``LMStudyResult.to_dict()`` or
    the ``language_model`` section of a :class:`minidiff.Results`); ``ctx``: the report's
    :class:`~minidiff.report.context.RenderContext` (figures also go to ``plots/``)."""
    st = res.get("study", {})
    variants = res.get("variants", {})
    head = "<h2>Language model: token-level divergence</h2>" if heading else ""
    parts = [f"<section class='lm'>{head}"
             f"<p>{_e(st.get('n_windows'))} windows of {_e(st.get('n_ctx'))} tokens, "
             f"{_e(st.get('scored_tokens'))} scored tokens ({_e(st.get('task'))}; {_e(st.get('scoring', ''))}). "
             f"Statistics with the names and definitions of llama.cpp's <code>llama-perplexity --kl-divergence"
             f"</code> (Q = the variant); uncertainties are standard errors.</p>",
             f"<pre class='lm-terminal'>{_e(terminal_table(res))}</pre>"]
    if plots and variants:
        for key, label, logx in (("by_frequency", "frequency of the correct token in the scored text", True),
                                 ("by_position", "position in the window", False),
                                 ("by_entropy", "base model's predictive entropy (nats)", False)):
            fig = breakdown_figure(variants, key, label, logx)
            name = f"lm_{tag + '_' if tag else ''}{key}"
            parts.append(f"<h3>KLD and flip rate by {_e(label)}</h3>"
                         + _figure(ctx, name, fig, f"mean KLD and top-1 flip rate by {label}"))
    for name, v in variants.items():
        parts.append(f"<h3>{_e(name)} vs base</h3>{_stats_table(v.get('divergence', {}))}{_cka_html(v)}")
        wins = v.get("where_it_hurts") or []
        if wins:
            parts.append("<h4>Where it hurts: the windows with the largest mean KLD</h4>"
                         "<p>Scored tokens are shaded by KLD(base‖variant); outlined tokens are top-1 flips; "
                         "hover a token for both models' top candidates. Grey: unscored context.</p>")
            parts += [_window_html(w) for w in wins]
        parts.append("<h4>Flipped tokens in context (largest KLD first)</h4>" + _flips_html(v.get("flipped_tokens")
                                                                                               or []))
    parts.append("</section>")
    return "\n".join(parts)


def render_lm_report(res: Mapping[str, Any], plots: bool = True) -> str:
    """A standalone HTML page holding :func:`lm_section` (without the rest of a study report)."""
    title = _e(res.get("study", {}).get("name", "language-model study"))
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{title}</title>"
            f"<style>body{{font-family:sans-serif;max-width:1200px;margin:1em auto;padding:0 1em}}{CSS}</style>"
            f"</head><body><h1>{title}</h1>{lm_section(res, plots)}</body></html>")


@register_renderer("language_model")
def render(results: Any, ctx: RenderContext) -> str:
    """The report's ``language_model`` section: the whole study (statistics, breakdown figures,
    where it hurts), or in a combined report per study its llama.cpp table and a link to its
    own report."""
    sec = results.get("language_model") or {}
    if not sec or sec.get("not_measured"):
        return f"<p class='muted'>not_measured: {_e(sec.get('not_measured') or 'no language-model study')}</p>"
    try:
        if "variants" in sec:
            return f"<style>{CSS}</style>" + lm_section(sec, ctx=ctx, heading=False)
        out = [f"<style>{CSS}</style>"]
        for tag, part in sec.items():
            if not isinstance(part, Mapping) or "variants" not in part:
                out.append(f"<h3>{_e(tag)}</h3><p class='muted'>not_measured: "
                           f"{_e((part or {}).get('not_measured', 'no results'))}</p>")
                continue
            link = part.get("study", {}).get("report")
            out.append(f"<h3>{_e(tag)}</h3>"
                       + (f"<p>Full report (where it hurts, flipped tokens in context): "
                          f"<a href='{_e(link)}'>{_e(link)}</a></p>" if link else "")
                       + f"<pre class='lm-terminal'>{_e(terminal_table(part))}</pre>")
        return "".join(out)
    except Exception as ex:  # the language-model fragment must not take the whole report down
        return f"<p class='skip'>language-model section could not be rendered: {_e(type(ex).__name__)}: {_e(ex)}</p>"
