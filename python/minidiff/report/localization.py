"""Where the variants diverge: the depth profile of the representation section, and the
layer-swap ranking.

Reads only the ``representation`` section of a results object: per variant its
``layer_error`` (per-layer relative error, SQNR, cosine and max error of matched
layers, the first layer below the SQNR threshold) and its ``similarity`` profile
(the matched-layer values of each measure chosen in ``[metrics] similarity``, and
the full matrices with ``similarity_heatmaps = true``). Draws

- the depth profile: SQNR, CKA of the matched layer pair and relative error
  against depth, one line per variant, the threshold as a dashed line and the
  first layer below it marked;
- the matched-layer profile of every other chosen measure (one panel each);
- on request, the layer x layer heatmap of every chosen measure per variant.

The representation renderer (:mod:`.html`) puts this fragment above its per-variant
CKA heatmaps.

It also renders the ``layer_swap`` section (registered renderer; the section exists
only when the study asked for layer-swap sensitivity): per variant the whole-model
change, the layers ranked by the share of it they explain (top :data:`SWAP_TOP` per
direction) and one bar chart of those shares (:func:`swap_bars`); a variant the swaps
do not apply to shows its reason. Every string from the data is HTML-escaped.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from .context import RenderContext, e, fmt, missing, register_renderer
from .plots import STYLE, _floats, short_names

#: Axis label of each measure (minidiff.similarity.MEASURES) in the profile and heatmap figures.
MEASURE_LABELS = {
    "cka": "linear CKA", "cca": "mean squared CCA", "cca_mean": "mean CCA", "svcca": "SVCCA (99%)",
    "procrustes": "Procrustes similarity", "procrustes_distance": "Procrustes distance",
    "regression": "regression R² (base → variant)", "regression_reverse": "regression R² (variant → base)",
    "rv": "RV coefficient",
}
#: Colour range of a measure's heatmap (every measure lies in [0, 1] but the distance, in [0, sqrt 2]).
MEASURE_RANGE = {"procrustes_distance": (0.0, math.sqrt(2.0))}


def _finite_or_nan(x: Sequence[Any]) -> np.ndarray:
    """Values to draw: infinities (SQNR of an unchanged layer) become gaps, like NaN."""
    a = _floats(x)
    a[~np.isfinite(a)] = np.nan
    return a


def depth_profile(layers: Sequence[str], lines: Mapping[str, Mapping[str, Sequence[Any]]], threshold_db: float | None,
                  first_below: Mapping[str, str], title: str = "Where the variants diverge") -> Figure:
    """Three panels against depth (x = the base's layers), one line per variant:
    SQNR in dB (higher is closer; the threshold dashed, each variant's first layer below
    it circled), CKA of the matched layer pair, relative error ``||a - b|| / ||a||`` (log).

    ``lines``: variant -> ``{"sqnr_db", "cka", "rel_error"}`` (each optional, one value per layer).
    """
    n = len(layers)
    if n == 0:
        raise ValueError("no layers to draw")
    if not lines:
        raise ValueError("no variant has per-layer values")
    panels = [("sqnr_db", "SQNR [dB]"), ("cka", "CKA of matched layers"), ("rel_error", "relative error")]
    x = np.arange(n)
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(max(4.2, 1.6 + 0.55 * n), 6.4))
        axes = fig.subplots(3, 1, sharex=True)
        colors = matplotlib.colormaps["tab10"]
        for k, (var, vals) in enumerate(lines.items()):
            c = colors(k % 10)
            for ax, (key, _) in zip(axes, panels):
                if vals.get(key) is None:
                    continue
                y = _finite_or_nan(vals[key])
                if len(y) != n:
                    raise ValueError(f"{var}: {len(y)} values of {key} for {n} layers")
                if key == "rel_error":
                    y[y <= 0] = np.nan  # an unchanged layer has no place on a log axis: a gap
                ax.plot(x, y, marker="o", markersize=3, color=c, label=var)
            fb = first_below.get(var)
            if fb is not None and fb in layers and vals.get("sqnr_db") is not None:
                i = list(layers).index(fb)
                yv = _finite_or_nan(vals["sqnr_db"])[i]
                axes[0].plot([i], [yv], marker="o", markersize=9, markerfacecolor="none", color=c)
        if threshold_db is not None:
            axes[0].axhline(threshold_db, color="#c44e52", linestyle="--", linewidth=0.9,
                            label=f"threshold {threshold_db:g} dB")
        if any(ln.get_ydata().size and np.isfinite(ln.get_ydata()).any() for ln in axes[2].get_lines()):
            axes[2].set_yscale("log")
        for ax, (_, label) in zip(axes, panels):
            ax.set_ylabel(label)
            ax.grid(True, linewidth=0.3, alpha=0.6)
        seen: dict[str, Any] = {}  # every variant once, whichever panel it is drawn in
        for ax in axes:
            for h, lab in zip(*ax.get_legend_handles_labels()):
                seen.setdefault(lab, h)
        axes[0].legend(list(seen.values()), list(seen), loc="best", frameon=False, fontsize=7)
        axes[0].set_title(title)
        axes[-1].set_xticks(x, short_names(layers), rotation=45, ha="right")
        axes[-1].set_xlabel("base layer (depth →)")
    return fig


def measure_profiles(layers: Sequence[str], profiles: Mapping[str, Mapping[str, Sequence[Any]]],
                     measures: Sequence[str], title: str = "Matched-layer similarity") -> Figure:
    """One panel per measure: its value for each base layer and the variant layer matched with it,
    one line per variant. ``profiles``: variant -> measure -> values per layer."""
    if not measures or not profiles:
        raise ValueError("no similarity profile to draw")
    n = len(layers)
    x = np.arange(n)
    cols = min(len(measures), 3)
    rows = (len(measures) + cols - 1) // cols
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(cols * max(2.8, 1.0 + 0.45 * n), 2.4 * rows + 0.4))
        axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
        colors = matplotlib.colormaps["tab10"]
        for ax, m in zip(axes, measures):
            for k, (var, prof) in enumerate(profiles.items()):
                if prof.get(m) is not None:
                    ax.plot(x, _floats(prof[m]), marker="o", markersize=3, color=colors(k % 10), label=var)
            ax.set_title(MEASURE_LABELS.get(m, m))
            ax.set_xticks(x, short_names(layers), rotation=45, ha="right")
            ax.grid(True, linewidth=0.3, alpha=0.6)
        for ax in axes[len(measures):]:
            ax.axis("off")
        axes[0].legend(loc="best", frameon=False, fontsize=7)
        fig.suptitle(title)
        fig.tight_layout()
    return fig


def measure_heatmap(matrix: Sequence[Sequence[Any]], layers_a: Sequence[str], layers_b: Sequence[str],
                    measure: str, title: str) -> Figure:
    """Layer x layer values of one measure (rows: base layers, columns: variant layers)."""
    m = _floats(matrix)
    if m.ndim != 2 or m.shape != (len(layers_a), len(layers_b)):
        raise ValueError(f"a {measure} matrix of shape {m.shape} does not match {len(layers_a)} x {len(layers_b)} layers")
    lo, hi = MEASURE_RANGE.get(measure, (0.0, 1.0))
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(1.2 + 0.45 * max(m.shape[1], 3), 1.0 + 0.4 * max(m.shape[0], 3)))
        ax = fig.subplots()
        im = ax.imshow(m, vmin=lo, vmax=hi, cmap="magma", aspect="auto")
        ax.set_xticks(range(m.shape[1]), short_names(layers_b), rotation=60, ha="right")
        ax.set_yticks(range(m.shape[0]), short_names(layers_a))
        ax.set_xlabel("variant layers")
        ax.set_ylabel("base layers")
        ax.set_title(title)
        if m.size <= 100:
            mid = lo + 0.6 * (hi - lo)
            for i in range(m.shape[0]):
                for j in range(m.shape[1]):
                    txt = f"{m[i, j]:.2f}" if np.isfinite(m[i, j]) else "n/a"
                    ax.text(j, i, txt, ha="center", va="center", fontsize=7,
                            color="black" if m[i, j] > mid else "white")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label=MEASURE_LABELS.get(measure, measure))
    return fig


def _matched_cka(rep: Any) -> list[Any] | None:
    """CKA of each base layer with its matched variant layer: the similarity profile's ``cka``
    when chosen, else the CKA matrix's diagonal (aligned layers) or best matches."""
    sim = rep.get("similarity") or {}
    prof = sim.get("profile") or {}
    if prof.get("cka") is not None:
        return list(prof["cka"])
    cka = rep.get("cka") or {}
    mat = cka.get("matrix")
    if not mat:
        return None
    if len(cka.get("layers_base") or []) == len(cka.get("layers_variant") or []):
        return [row[i] for i, row in enumerate(mat)]
    corr = cka.get("correspondence") or []
    return [c.get("cka") for c in corr] or None


def _layers(rep: Any) -> list[str]:
    for key, sub in (("layer_error", "layers"), ("similarity", "layers"), ("cka", "layers_base")):
        got = (rep.get(key) or {}).get(sub)
        if got:
            return list(got)
    return []


def _db(x: Any) -> str:
    return "?" if x is None else f"{float(x):g}"


def _row(var: str, rep: Any, thr: float | None) -> str:
    le = rep.get("layer_error")
    if missing(le) or not le:
        why = (rep.get("skipped") or {}).get("layer_error") or "not measured"
        return f'<tr><th>{e(var)}</th><td colspan="5" class="skip">per-layer error not computed: {e(why)}</td></tr>'
    names = list(le.get("layers") or [])
    sq = _floats(le.get("sqnr_db") or [])
    first = le.get("first_below")
    below = list(le.get("below_threshold") or [])
    if first is not None:
        first_txt = f"<b>{e(first)}</b>" + (f" (and {len(below) - 1} more)" if len(below) > 1 else "")
    else:
        first_txt = f"none: every layer is at or above {_db(thr)} dB"
    finite = np.where(np.isnan(sq), np.inf, sq)
    lo = int(np.argmin(finite)) if len(sq) and np.isfinite(finite).any() else None
    low_txt = f"{fmt(sq[lo], 3)} dB ({e(names[lo])})" if lo is not None else "∞ (every layer unchanged)"
    last = len(names) - 1
    return (f"<tr><th>{e(var)}</th><td>{first_txt}</td><td class=num>{low_txt}</td>"
            f"<td class=num>{fmt(sq[last] if last >= 0 else None, 3)}</td>"
            f"<td class=num>{fmt((le.get('rel_error') or [None])[-1], 3)}</td>"
            f"<td class=num>{fmt((le.get('cosine') or [None])[-1], 4)}</td></tr>")


def render(res: Any, ctx: RenderContext) -> str:
    """The localization fragment of the representation section (empty when no variant has
    per-layer values, e.g. results written before this existed)."""
    sec = res.get("representation") or {}
    variants = [v for v in res.variants if sec.get(v)]
    reps = {v: sec[v] for v in variants}
    if not any(r.get("layer_error") or r.get("similarity") for r in reps.values()):
        return ""
    thr = next((as_thr for r in reps.values() if (as_thr := (r.get("layer_error") or {}).get("threshold_db"))
                is not None), None)
    layers = next((ls for r in reps.values() if (ls := _layers(r))), [])
    out = ["<h3>Where the variants diverge, layer by layer</h3>",
           '<p class="muted">For each layer of the base and the variant\'s matching layer (same position when the '
           "variant shares the base's architecture): SQNR = 10 log<sub>10</sub>(‖a‖² / ‖a − b‖²) in dB and relative "
           "error ‖a − b‖ / ‖a‖ over every evaluation sample (every token in token mode), pooled over the seed "
           f"pairs, as in torch.ao's numeric suite; the threshold is {_db(thr)} dB "
           "(<code>[metrics] sqnr_threshold_db</code>; each variant's first layer below it is circled). An unchanged "
           "layer has SQNR ∞ and leaves a gap in the figure.</p>"]
    out.append(f"<table><tr><th>variant</th><th>first layer below {_db(thr)} dB</th><th>lowest SQNR</th>"
               "<th>last-layer SQNR [dB]</th><th>last-layer relative error</th><th>last-layer cosine</th></tr>"
               + "".join(_row(v, reps[v], thr) for v in variants) + "</table>")
    lines: dict[str, dict[str, Any]] = {}
    firsts: dict[str, str] = {}
    for v, r in reps.items():
        le = r.get("layer_error")
        le = None if missing(le) else le
        entry: dict[str, Any] = {"cka": _matched_cka(r)}
        if le and list(le.get("layers") or []) == layers:
            entry.update(sqnr_db=le.get("sqnr_db"), rel_error=le.get("rel_error"))
            if le.get("first_below") is not None:
                firsts[v] = le["first_below"]
        if entry["cka"] is not None and len(entry["cka"]) != len(layers):
            entry["cka"] = None
        if any(x is not None for x in entry.values()):
            lines[v] = entry
    figs = []
    if layers and lines:
        figs.append(ctx.plot("depth_profile", depth_profile, layers, lines, thr, firsts,
                             title="Where the variants diverge"))
    profiles = {v: (r.get("similarity") or {}).get("profile") or {} for v, r in reps.items()
                if not missing(r.get("similarity")) and r.get("similarity")}
    measures = [m for m in next((list(r["similarity"].get("measures") or []) for r in reps.values()
                                 if not missing(r.get("similarity")) and r.get("similarity")), []) if m != "cka"]
    if measures and profiles:
        figs.append(ctx.plot("similarity_profile", measure_profiles, layers, profiles, measures,
                             title="Matched-layer similarity"))
    if figs:
        out.append('<div class="figs">' + "".join(figs) + "</div>")
    matched = {v: r["similarity"].get("matched_by") for v, r in reps.items()
               if not missing(r.get("similarity")) and r.get("similarity")}
    other = [v for v, how in matched.items() if how != "position"]
    if other:
        out.append('<p class="muted">' + ", ".join(e(v) for v in other) + ": layers of another architecture, each "
                   "base layer compared with the variant layer of highest CKA.</p>")
    heat = []
    for v, r in reps.items():
        sim = r.get("similarity")
        if missing(sim) or not sim or not sim.get("matrices"):
            continue
        for m, mat in sim["matrices"].items():
            if m == "cka":
                continue  # drawn below with the variant's CKA
            heat.append(ctx.plot(f"{m}_{v}", measure_heatmap, mat, sim["layers"], sim.get("layers_variant") or [],
                                 m, title=f"{MEASURE_LABELS.get(m, m)}: {v}"))
    if heat:
        out.append("<h3>Similarity of every layer pair, per measure</h3>" + '<div class="figs">' + "".join(heat)
                   + "</div>")
    for v, r in reps.items():
        why = (r.get("skipped") or {}).get("similarity")
        if why:
            out.append(f'<p class="skip">{e(v)}: similarity profile not computed: {e(why)}</p>')
    return "\n".join(out)


# -- layer-swap sensitivity (section ``layer_swap``) ------------------------------------

#: Layers listed per variant and direction in the report's ranking (every swap is in the CSV).
SWAP_TOP = 10


def swap_bars(ranked: Mapping[str, Mapping[str, Any]], title: str = "Share of the whole-model change per layer"
              ) -> Figure:
    """One panel per variant: the share of the whole-model mean KL that each layer explains,
    as horizontal bars, costliest on top. ``ranked``: variant -> ``{"layers": [...],
    "into_base": [share per layer] or None, "restore": [share per layer] or None}`` (the
    layers in ranking order; a share not computed is a missing bar)."""
    if not ranked:
        raise ValueError("no variant has layer-swap results")
    n = len(ranked)
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    height = max(len(r["layers"]) for r in ranked.values())
    with matplotlib.rc_context(STYLE):
        fig = Figure(figsize=(cols * 3.6, rows * (0.9 + 0.28 * height) + 0.4))
        axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
        for ax, (var, r) in zip(axes, ranked.items()):
            layers = list(r["layers"])
            y = np.arange(len(layers))
            dirs = [d for d in ("into_base", "restore") if r.get(d) is not None]
            if not layers or not dirs:
                raise ValueError(f"{var}: no swapped layer to draw")
            h = 0.8 / len(dirs)
            for k, d in enumerate(dirs):
                vals = _floats(r[d])
                if len(vals) != len(layers):
                    raise ValueError(f"{var}: {len(vals)} {d} shares for {len(layers)} layers")
                ax.barh(y + (k - (len(dirs) - 1) / 2) * h, np.nan_to_num(vals, nan=0.0), height=h,
                        color=("#dd8452" if d == "into_base" else "#4c72b0"),
                        label="variant layer in the base" if d == "into_base" else "base layer restored in the variant")
            ax.axvline(1.0, color="#777", linestyle=":", linewidth=0.8)  # the whole change
            ax.axvline(0.0, color="#333", linewidth=0.6)  # a restore share below 0: restoring made it worse
            ax.set_yticks(y, short_names(layers))
            ax.invert_yaxis()
            ax.set_xlabel("share of the whole-model KL")
            ax.set_title(var)
            ax.grid(True, axis="x", linewidth=0.3, alpha=0.6)
        for ax in axes[n:]:
            ax.axis("off")
        axes[0].legend(loc="lower right", frameon=False, fontsize=7)
        fig.suptitle(title)
        fig.tight_layout()
    return fig


def _swap_rows(rows: Sequence[Any], lm: bool) -> str:
    out = []
    for r in rows[:SWAP_TOP]:
        first = fmt(r.get("same_top1"), 3, pct=True) if lm else fmt(r.get("churn"), 3, pct=True)
        out.append(f"<tr><td class=num>{e(r.get('rank'))}</td><td>{e(r.get('layer'))}</td>"
                   f"<td class=num>{first}</td><td class=num>{fmt(r.get('kl'), 3)}</td>"
                   f"<td class=num>{fmt(r.get('share_kl'), 3, pct=True)}</td>"
                   f"<td class=num>{fmt(r.get('share_churn'), 3, pct=True)}</td></tr>")
    return "".join(out)


_DIR_TEXT = {"into_base": ("variant layer swapped into the base", "change of the swapped base"),
             "restore": ("base layer restored in the variant", "change left in the restored variant")}


def _swap_entry(var: str, ent: Any) -> str:
    why = (ent.get("skipped") or {}).get("layer_swap")
    if why:
        return f'<p class="skip">{e(var)}: layer swaps not run: {e(why)}</p>'
    lm = ent.get("kind") == "language-model"
    first = "same top-1" if lm else "churn"
    kl = "mean KLD" if lm else "mean KL"
    pair = " vs ".join(ent.get("pair") or [])
    out = [f"<h3>{e(var)}</h3>",
           f"<p>Whole model ({e(pair)}, {e(ent.get('n_units'))} {e(ent.get('unit', 'examples'))}): "
           f"{first} <b>{fmt(ent.get('whole_same_top1') if lm else ent.get('whole_churn'), 3, pct=True)}</b>, "
           f"{kl} <b>{fmt(ent.get('whole_kl'), 3)}</b>.</p>"]
    for d in ent.get("directions") or []:
        rows = list(ent.get(d) or [])
        if not rows:
            continue
        what, value = _DIR_TEXT[d]
        more = (f" (top {SWAP_TOP} of {len(rows)}; every layer in <code>layer_swap_{e(var)}.csv</code>)"
                if len(rows) > SWAP_TOP else "")
        out.append(f"<p class=muted>{e(what)}: {e(value)} against the base{more}</p>"
                   f'<table class="swap"><tr><th>rank</th><th>layer</th><th>{first}</th><th>{kl}</th>'
                   f"<th>share of whole KL</th><th>share of whole churn</th></tr>{_swap_rows(rows, lm)}</table>")
    return "".join(out)


@register_renderer("layer_swap")
def render_layer_swap(res: Any, ctx: RenderContext) -> str:
    """The ``layer_swap`` section: per variant the whole-model change and the layers ranked by
    how much of it they explain, and one bar chart of the shares (the costliest layers)."""
    sec = res.get("layer_swap") or {}
    variants = [v for v in res.variants if v in sec] + [v for v in sec if v not in res.variants]
    done = {v: sec[v] for v in variants if not (sec[v].get("skipped") or {}).get("layer_swap")}
    any_ent = next(iter(done.values()), None)
    out = []
    if any_ent is not None:
        plan = any_ent.get("plan") or {}
        out.append(
            '<p class="muted">Each row runs the model once with a single layer exchanged: into the base, the '
            "base with that one layer taken from the variant (what compressing only that layer costs); restored, "
            "the variant with that one layer taken back from the base. Both are compared with the base on the "
            + (f"scored tokens of the same {e(any_ent.get('n_examples'))} windows (a seeded sample; "
               if any_ent.get("kind") == "language-model" else
               f"same {e(any_ent.get('n_examples'))} evaluation examples (a seeded sample; ")
            + f"<code>[metrics.layer_swap] examples</code>), {e(any_ent.get('granularity'))} granularity. Share of "
            "whole KL: the swapped model's mean KL(base ‖ swapped) over the variant's, or for a restored layer "
            "the part of the variant's KL that restoring it removes; shares need not add up to 100% (the errors "
            "of layers compound or cancel). Cost: one forward pass per swap and batch, "
            f"{e(plan.get('forward_passes', '?'))} per variant here; numbers from "
            "<code>minidiff.localize.layer_swap</code>.</p>")
    for v in variants:
        out.append(_swap_entry(v, sec[v]))
    ranked = {}
    for v, ent in done.items():
        order = list(ent.get("into_base") or ent.get("restore") or [])[:SWAP_TOP]
        layers = [r["layer"] for r in order]
        entry: dict[str, Any] = {"layers": layers}
        for d in ("into_base", "restore"):
            rows = {r["layer"]: r.get("share_kl") for r in (ent.get(d) or [])}
            entry[d] = [rows.get(n) for n in layers] if rows else None
        if layers:
            ranked[v] = entry
    if ranked:
        out.append('<div class="figs">' + ctx.plot("layer_swap", swap_bars, ranked,
                                                   title="Share of the whole-model change per layer") + "</div>")
    return "\n".join(out)
