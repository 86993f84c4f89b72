"""From the models' outputs to the numbers of results.json and the verdicts.

Input: per-model logits and embeddings (evaluation set, OOD set), CKA
accumulators per (base, variant) pair, the labels. Output: the ``models``,
``prediction_errors``, ``representation`` and ``distribution`` sections and a
verdict per variant and characteristic (thresholds in :data:`THRESHOLDS`).

Populations: a group is a list of models built from seeds ``s_1..s_P``; variant
``v#s_i`` is compared with ``base#s_i`` (its own parent). Pairwise numbers are
averaged over the P pairs; population numbers (PIE, Welch t-test) use all of
them. With P >= 2 base seeds, the same numbers between two base seeds
(``base#s_1`` vs ``base#s_2``) are reported as the *reference*: how much two
equally good originals already differ, which is what a verdict compares with.
A metric that cannot be computed (no labels, a population of one) is listed
under ``skipped`` with the reason, never silently left out.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from importlib import import_module

from minidiff.metrics._checks import MetricSkipped, _jsonable
from minidiff.results.verdicts import RULES, decide_all, legends
from minidiff.metrics.distribution import entropy, ks_shift, predicted_class_shift
from minidiff.metrics.neighbors import knn_overlap, layer_correspondence
from minidiff.metrics.ood import ood_agreement, ood_detect
from minidiff.metrics.prediction import accuracy, accuracy_ci, accuracy_difference_ci
from minidiff.metrics.summaries import histogram, quantiles

# by module path: ``minidiff.metrics.calibration`` the attribute is the function of that name
cal = import_module("minidiff.metrics.calibration")
pop = import_module("minidiff.metrics.population")
pr = import_module("minidiff.metrics.prediction")

#: How each verdict is decided, in words: written by the verdict rules from the same thresholds
#: they decide with (:mod:`minidiff.results.verdicts`); also in results.json and the report legend.
THRESHOLDS = legends()


def softmax64(logits: torch.Tensor) -> torch.Tensor:
    """Class probabilities in float64 (the metrics' input)."""
    return torch.softmax(logits.double(), dim=1)


def _mean_dicts(ds: list[dict[str, Any]], keys: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in keys:
        vals = [d[k] for d in ds if d.get(k) is not None and not (isinstance(d[k], float) and math.isnan(d[k]))]
        out[k] = float(np.mean(vals)) if vals else None
    return out


def _population_accuracy(preds: torch.Tensor, labels: torch.Tensor, n_boot: int, level: float, seed: int
                         ) -> dict[str, Any]:
    """Mean accuracy of a population ``(P, M)`` with its bootstrap CI over examples
    (:func:`minidiff.metrics.accuracy_ci`) and each member's accuracy."""
    r = accuracy_ci(preds, labels, n_boot=n_boot, confidence=level, seed=seed)
    per = [accuracy(preds[i], labels) for i in range(preds.shape[0])]
    return {"mean": r.accuracy, "ci_low": r.low, "ci_high": r.high, "per_member": per, "n": r.n, "n_boot": n_boot}


def _accuracy_change(bp: torch.Tensor, vp: torch.Tensor, labels: torch.Tensor, n_boot: int, level: float,
                     seed: int) -> dict[str, Any]:
    """Paired bootstrap CI of acc(variant population) - acc(base population)
    (:func:`minidiff.metrics.accuracy_difference_ci`)."""
    r = accuracy_difference_ci(bp, vp, labels, n_boot=n_boot, confidence=level, seed=seed)
    return {"mean": r.accuracy, "ci_low": r.low, "ci_high": r.high}


def _cka_matrix(acc: Any) -> np.ndarray:
    out = acc.compute()
    if hasattr(out, "matrix"):
        out = out.matrix
    return np.asarray(torch.as_tensor(out).double().cpu().numpy(), dtype=float)


class Analysis:
    """Computes every section from a finished run (see the module docstring).

    Parameters
    ----------
    groups : dict
        ``{"base": [member names], variant: [member names]}``, seed-aligned lists.
    logits, embeddings : dict member -> tensor over the evaluation set.
    labels : int64 tensor or None.
    class_names : list of str.
    cka : dict ``"a~b"`` -> CKA accumulator (or precomputed matrix via ``cka_matrices``).
    layer_names : dict member -> captured layer names.
    ood_embeddings : dict member -> OOD-set embeddings, or None when no OOD set.
    metrics : MetricsConfig.
    seed : int (bootstrap and OOD bank split).
    """

    def __init__(self, *, groups: dict[str, list[str]], logits: dict[str, torch.Tensor],
                 embeddings: dict[str, torch.Tensor], labels: torch.Tensor | None, class_names: list[str],
                 cka_matrices: dict[str, np.ndarray], layer_names: dict[str, list[str]],
                 ood_embeddings: dict[str, torch.Tensor] | None, ood_reason: str, metrics: Any, seed: int,
                 display: Any = None, data_kind: str = "text", ids: list[str] | None = None,
                 ood_name: str = "", stats: Any = None) -> None:
        self.groups = groups
        self.logits = logits
        self.emb = embeddings
        self.labels = labels
        self.class_names = class_names
        self.cka = cka_matrices
        self.layer_names = layer_names
        self.ood = ood_embeddings
        self.ood_reason = ood_reason
        self.ood_name = ood_name
        self.cfg = metrics
        self.seed = seed
        self.display = display
        self.kind = data_kind
        self.ids = ids or []
        self.num_classes = len(class_names) if class_names else int(next(iter(logits.values())).shape[1])
        self.probs = {k: softmax64(v) for k, v in logits.items()}
        self.preds = {k: v.argmax(1) for k, v in logits.items()}
        self.base = groups["base"]
        self.variants = [g for g in groups if g != "base"]
        # streamed statistics (minidiff.study.characteristics): computed once, read by every section
        self._agreement = None
        self._member_stats: dict[str, dict[str, Any]] = {}
        self._pair_stats: dict[str, dict[str, Any]] = getattr(stats, "pair_stats", None) or {}
        if stats is not None:
            if "agreement" in stats.study_stats:
                self._agreement = (stats.study_stats["agreement"].compute(),
                                   {m: i for i, m in enumerate(stats.member_order)})
            self._member_stats = stats.member_stats

    # -- helpers --------------------------------------------------------------------
    def _pop(self, group: str) -> torch.Tensor:
        return torch.stack([self.preds[m] for m in self.groups[group]])

    def _pairs(self, var: str) -> list[tuple[str, str]]:
        b = self.base
        return [(b[i % len(b)], v) for i, v in enumerate(self.groups[var])]

    def _agree(self, a: str, b: str, y: torch.Tensor | None) -> dict[str, Any]:
        """Churn, flips and error Jaccard of members ``a`` -> ``b``, from the streamed
        :class:`minidiff.agreement.AgreementAccumulator` (equal to
        :func:`minidiff.metrics.churn` / :func:`minidiff.metrics.flips` on the outputs)."""
        if self._agreement is None:
            fl = pr.flips(self.preds[a], self.preds[b], y).to_dict() if y is not None else {}
            return {"churn": pr.churn(self.preds[a], self.preds[b]), **fl}
        res, idx = self._agreement
        i, j = idx[a], idx[b]
        out: dict[str, Any] = {"churn": float(res["disagreement"][i, j])}
        if y is not None:
            out.update(right_to_wrong=float(res["flips"][i, j, 0]), wrong_to_right=float(res["flips"][i, j, 1]),
                       error_jaccard=float(res["error_jaccard"][i, j]))
        return out

    def _calibration(self, member: str) -> Any:
        """:class:`minidiff.metrics.Calibration` of one member (streamed when available)."""
        acc = self._member_stats.get(member, {}).get("calibration")
        if acc is not None:
            return acc.compute()
        return cal.calibration(self.probs[member], self.labels, self.cfg.ece_bins)

    def _class_shift(self, a: str, b: str) -> Any:
        ha = self._member_stats.get(a, {}).get("class_histogram")
        hb = self._member_stats.get(b, {}).get("class_histogram")
        if ha is not None and hb is not None:
            return ha.shift_to(hb)
        return predicted_class_shift(self.preds[a], self.preds[b], self.num_classes)

    def _ref_pair(self) -> tuple[str, str] | None:
        return (self.base[0], self.base[1]) if len(self.base) >= 2 else None

    @staticmethod
    def _try(skipped: dict[str, str], name: str, fn: Any) -> Any:
        try:
            return fn()
        except MetricSkipped as e:
            skipped[name] = e.reason
        except ValueError as e:
            skipped[name] = str(e)
        return None

    # -- sections -------------------------------------------------------------------
    def models(self, info: dict[str, dict[str, Any]]) -> dict[str, Any]:
        out = {}
        for g, members in self.groups.items():
            entry: dict[str, Any] = {"members": members, **info.get(g, {})}
            skipped: dict[str, str] = {}
            if self.labels is not None:
                entry["accuracy"] = _population_accuracy(self._pop(g), self.labels, self.cfg.bootstrap,
                                                         self.cfg.ci_level, self.seed)
                cals = [self._try(skipped, "calibration", lambda m=m: self._calibration(m)) for m in members]
                cals = [c for c in cals if c is not None]
                if cals:
                    entry["calibration"] = {"ece": float(np.mean([c.ece for c in cals])),
                                            "brier": float(np.mean([c.brier for c in cals]))}
            else:
                entry["accuracy"] = None
                skipped["accuracy"] = "needs labels; the evaluation data has none"
            entry["skipped"] = skipped
            out[g] = entry
        return out

    def prediction_errors(self, var: str) -> dict[str, Any]:
        sk: dict[str, str] = {}
        y = self.labels
        pairs = self._pairs(var)
        out: dict[str, Any] = {"pairs": [f"{a}~{b}" for a, b in pairs]}
        agree = [self._agree(a, b, y) for a, b in pairs]
        out["churn"] = float(np.mean([g["churn"] for g in agree]))
        ref = self._ref_pair()
        if ref is not None:
            rc = [self._agree(self.base[i], self.base[j], None)["churn"]
                  for i in range(len(self.base)) for j in range(i + 1, len(self.base))]
            out["reference_churn"] = float(np.mean(rc))
        else:
            out["reference_churn"] = None
            sk["reference_churn"] = "one base model only: no seed-to-seed reference (give the base several seeds)"
        div: dict[str, Any] = {}
        for kind, hi in (("kl", None), ("js", math.log(2))):
            per = torch.stack([pr.per_example_divergence(self.probs[a], self.probs[b], kind)
                               for a, b in pairs]).mean(0)
            q = quantiles(per, [0.5, 0.9, 0.99], name=f"{kind} divergence")
            top = float(per.max()) if hi is None else hi
            div[kind] = {"mean": float(per.mean()), "p50": float(q[0]), "p90": float(q[1]), "p99": float(q[2]),
                         "max": float(per.max()), "histogram": histogram(per, 0.0, max(top, 1e-12))}
        out["divergence"] = div
        from minidiff.agreement import DEFAULT_EPS
        out["epsilon"] = DEFAULT_EPS
        if y is None:
            for k in ("accuracy_change", "flips", "error_jaccard", "mcnemar", "calibration", "per_class",
                      "pie_accuracy"):
                sk[k] = "needs labels; the evaluation data has none"
        else:
            out["accuracy_change"] = _accuracy_change(self._pop("base"), self._pop(var), y, self.cfg.bootstrap,
                                                      self.cfg.ci_level, self.seed)
            out["flips"] = _mean_dicts(agree, ["right_to_wrong", "wrong_to_right", "churn", "error_jaccard"])
            out["error_jaccard"] = out["flips"]["error_jaccard"]
            mc = [pr.mcnemar(self.preds[a], self.preds[b], y).to_dict() for a, b in pairs]
            out["mcnemar"] = {**mc[0], "per_pair_p": [m["p_value"] for m in mc],
                              "significant_pairs": sum(1 for m in mc if m["p_value"] < 0.05), "pairs": len(mc)}
            cc = [cal.CalibrationChange(base=cb, variant=cv, delta_ece=cv.ece - cb.ece, delta_brier=cv.brier - cb.brier)
                  for cb, cv in ((self._calibration(a), self._calibration(b)) for a, b in pairs)]

            def bins(c: Any) -> dict[str, Any]:
                d = c.bins.to_dict()
                return {"confidence": d["mean_confidence"], "accuracy": d["accuracy"], "count": d["count"]}
            out["calibration"] = {"ece_base": float(np.mean([c.base.ece for c in cc])),
                                  "ece_variant": float(np.mean([c.variant.ece for c in cc])),
                                  "brier_base": float(np.mean([c.base.brier for c in cc])),
                                  "brier_variant": float(np.mean([c.variant.brier for c in cc])),
                                  "delta_ece": float(np.mean([c.delta_ece for c in cc])),
                                  "delta_brier": float(np.mean([c.delta_brier for c in cc])),
                                  "bins_base": bins(cc[0].base), "bins_variant": bins(cc[0].variant)}
            ci = self._try(sk, "per_class", lambda: pop.class_impact(self._pop("base"), self._pop(var), y,
                                                                     self.num_classes, self.class_names))
            if ci is not None:
                d = ci.to_dict()
                out["per_class"] = {k: d[k] for k in ("class_names", "support", "recall_base", "recall_variant",
                                                      "recall_change", "normalized_change", "p_value", "significant",
                                                      "test_note", "n_base", "n_variant")}
                if ci.test_note:
                    sk["per_class_welch_t_test"] = ci.test_note
        out["pie"] = self._pie(var, sk)
        out["skipped"] = sk
        return out

    def _pie(self, var: str, sk: dict[str, str]) -> dict[str, Any]:
        bp, vp = self._pop("base"), self._pop(var)
        ps = pop.pie_summary(bp, vp, self.num_classes, top=self.cfg.pie_examples)
        population = bp.shape[0] >= 2 and vp.shape[0] >= 2
        out: dict[str, Any] = {"count": ps.n_pie, "fraction": ps.pie_fraction, "population": population,
                               "base_size": int(bp.shape[0]), "variant_size": int(vp.shape[0]),
                               "mean_cie": float(ps.cie.mean()), "kind": self.kind}
        if not population:
            sk["pie_population"] = ("PIE needs populations (several seeds); with one model each a PIE is an example "
                                    "whose prediction changed")
        if self.labels is not None:
            pa = pop.accuracy_on_pie(torch.cat([bp, vp]), self.labels, ps.pie)
            nb = bp.shape[0]
            pacc, nacc = pa.pie_accuracy, pa.non_pie_accuracy
            out.update({"acc_base_pie": _jsonable(pacc[:nb].mean()), "acc_variant_pie": _jsonable(pacc[nb:].mean()),
                        "acc_base_non_pie": _jsonable(nacc[:nb].mean()),
                        "acc_variant_non_pie": _jsonable(nacc[nb:].mean()),
                        "per_model_pie_accuracy": _jsonable(pacc), "per_model_non_pie_accuracy": _jsonable(nacc)})
        # order: PIEs first, then CIE score, then the mean per-example JS divergence of the seed
        # pairs (with one model per side every changed example has CIE 2: JS ranks them)
        js = torch.stack([pr.per_example_divergence(self.probs[a], self.probs[b], "js")
                          for a, b in self._pairs(var)]).mean(0).numpy()
        m = js.shape[0]
        order = np.lexsort((np.arange(m), -js, -ps.cie.double().numpy(), ~ps.pie.numpy()))
        top = order[: self.cfg.pie_examples].tolist()
        ex = []
        for i in top:
            if float(ps.cie[i]) <= 0 and not bool(ps.pie[i]):
                break
            e: dict[str, Any] = {"index": i, "id": self.ids[i] if i < len(self.ids) else str(i),
                                 "pie": bool(ps.pie[i]), "score": float(ps.cie[i]), "js": float(js[i]),
                                 "base_pred": self._cname(int(ps.modal_base[i])),
                                 "variant_pred": self._cname(int(ps.modal_variant[i]))}
            if self.labels is not None:
                e["label"] = self._cname(int(self.labels[i]))
            if self.display is not None:
                d = self.display(i)
                if isinstance(d, str):
                    e["text"] = d
                else:
                    e["image"] = np.round(np.asarray(d, dtype=float), 3).tolist()
            ex.append(e)
        out["examples"] = ex
        return out

    def _cname(self, c: int) -> str:
        return self.class_names[c] if self.class_names and c < len(self.class_names) else str(c)

    def representation(self, var: str) -> dict[str, Any]:
        sk: dict[str, str] = {}
        out: dict[str, Any] = {}
        pairs = self._pairs(var)
        mats = [self.cka[f"{a}~{b}"] for a, b in pairs if f"{a}~{b}" in self.cka]
        if mats and all(m.shape == mats[0].shape for m in mats):
            m = np.mean(mats, axis=0)
            la, lb = self.layer_names[pairs[0][0]], self.layer_names[pairs[0][1]]
            corr = layer_correspondence(torch.from_numpy(m), la, lb)
            out["cka"] = {"kernel": self.cfg.cka_kernel, "estimator": self.cfg.cka_estimator,
                          "matrix": _jsonable(m), "layers_base": la, "layers_variant": lb,
                          "final": float(m[-1, -1]), "pairs": len(mats),
                          "correspondence": [{"layer": a, "match": b, "cka": s} for a, b, s in corr.pairs()]}
            ref = self._ref_pair()
            if ref is not None and f"{ref[0]}~{ref[1]}" in self.cka:
                out["cka"]["reference_final"] = float(self.cka[f"{ref[0]}~{ref[1]}"][-1, -1])
        else:
            sk["cka"] = "no layer representations were captured for this variant"
        for key, fn in (("similarity", lambda: self._similarity(pairs, sk)),
                        ("layer_error", lambda: self._layer_error(pairs))):
            got = self._try(sk, key, fn)
            if got is not None:
                out[key] = got
        k = self.cfg.knn_k
        n = next(iter(self.emb.values())).shape[0]
        if n > k + 1:
            ov = [knn_overlap(self.emb[a], self.emb[b], k=k) for a, b in pairs]
            per = torch.stack([o.per_example for o in ov]).mean(0)
            out["knn_overlap"] = {"k": k, "mean": float(per.mean()), "median": float(per.median()),
                                  "histogram": histogram(per, 0.0, 1.0, bins=20)}
            ref = self._ref_pair()
            if ref is not None:
                out["knn_overlap"]["reference_mean"] = knn_overlap(self.emb[ref[0]], self.emb[ref[1]], k=k).mean
        else:
            sk["knn_overlap"] = f"needs more than k + 1 = {k + 1} examples, got {n}"
        out["skipped"] = sk
        return out

    def _matched(self, a: str, b: str) -> tuple[list[int], str]:
        """For each of ``a``'s layers, the index of ``b``'s layer it is compared with, and how:
        by position when the study aligned ``b``'s layers with ``a``'s (same count), else the
        best CKA match (:func:`minidiff.metrics.layer_correspondence`)."""
        la, lb = self.layer_names[a], self.layer_names[b]
        if len(la) == len(lb):
            return list(range(len(la))), "position"
        m = self.cka.get(f"{a}~{b}")
        if m is None:
            raise MetricSkipped("similarity", "the layers differ in number and no CKA matrix matches them")
        corr = layer_correspondence(torch.from_numpy(np.asarray(m, dtype=float)), la, lb)
        return corr.best_for_a.tolist(), "cka_correspondence"  # -1: no match (an all-NaN row)

    def _similarity(self, pairs: list[tuple[str, str]], sk: dict[str, str]) -> dict[str, Any]:
        """The matched-layer profile of every measure in ``[metrics] similarity``, mean over the
        seed pairs, from each pair's streamed CKA statistics (``CKAAccumulator.compute_measures``:
        no second pass over the data); with ``similarity_heatmaps`` also the full matrices.
        ``"cka"`` is the section's CKA matrix (either kernel)."""
        measures = list(self.cfg.similarity)
        if not measures:
            raise MetricSkipped("similarity", "no measure chosen ([metrics] similarity = [])")
        if any(f"{a}~{b}" not in self.cka for a, b in pairs):
            raise MetricSkipped("similarity", "no layer representations were captured for this variant")
        accs = [self._pair_stats.get(f"{a}~{b}", {}).get("cka") for a, b in pairs]
        rest = [m for m in measures if m != "cka"]
        if rest and any(acc is None for acc in accs):
            why = (f"{', '.join(rest)}: the second-order measures come from the streamed linear-kernel "
                   f"statistics, and cka_kernel = {self.cfg.cka_kernel!r} streams none (set cka_kernel = 'linear')")
            if "cka" not in measures:
                raise MetricSkipped("similarity", why)
            sk["similarity_measures"] = why
            measures, rest = ["cka"], []
        per_pair = []
        for (a, b), acc in zip(pairs, accs):
            got = {k: v.double().cpu().numpy() for k, v in acc.compute_measures(rest).items()} if rest else {}
            if "cka" in measures:
                got["cka"] = self.cka[f"{a}~{b}"]  # the matrix of the cka entry (same numbers as compute("cka"))
            per_pair.append(got)
        mats = {m: np.mean([p[m] for p in per_pair], axis=0) for m in measures}
        a0, b0 = pairs[0]
        idx, how = self._matched(a0, b0)
        la, lb = self.layer_names[a0], self.layer_names[b0]
        out: dict[str, Any] = {"measures": measures, "matched_by": how, "layers": la,
                               "matched_layers": [lb[j] if j >= 0 else "" for j in idx], "pairs": len(pairs),
                               "profile": {m: [float(mats[m][i, j]) if j >= 0 else math.nan for i, j in enumerate(idx)]
                                           for m in measures}}
        if self.cfg.similarity_heatmaps:
            out["matrices"] = {m: mats[m].tolist() for m in measures}
            out["layers_variant"] = lb
        return out

    def _layer_error(self, pairs: list[tuple[str, str]]) -> dict[str, Any]:
        """Per-layer error of the matched layers (:func:`minidiff.layer_error`) over every seed
        pair's samples together: the pairs' streamed sums are merged, so SQNR and relative error
        pool signal and error power over all pairs, cosine averages over all samples (tokens in
        token mode) and the max is over all. Names the first layer whose SQNR falls below
        ``[metrics] sqnr_threshold_db`` (:func:`minidiff.similarity.layer_error.first_below`)."""
        from minidiff.similarity import LayerErrorAccumulator
        from minidiff.similarity.layer_error import first_below
        accs = [self._pair_stats.get(f"{a}~{b}", {}).get("layer_error") for a, b in pairs]
        if any(acc is None for acc in accs):
            raise MetricSkipped("layer_error", "no layer representations were captured for this variant")
        for acc in accs:
            if not isinstance(acc, LayerErrorAccumulator):
                acc.compute()  # NotApplicable: raises MetricSkipped with its reason
        names = self.layer_names[pairs[0][0]]
        total = LayerErrorAccumulator(accs[0].dims, names=names)
        for acc in accs:
            total.merge(acc)
        res = {k: v.tolist() for k, v in total.compute().items()}  # +inf SQNR (identical layer) kept
        thr = float(self.cfg.sqnr_threshold_db)
        sq = torch.tensor(res["sqnr_db"], dtype=torch.float64)
        out: dict[str, Any] = {"layers": names, **res, "samples": int(total.count[0]), "pairs": len(pairs),
                               "threshold_db": thr,
                               "below_threshold": [n for n, x in zip(names, res["sqnr_db"]) if x < thr]}
        first = first_below(sq, thr, names)
        if first is not None:
            out["first_below"] = first
        return out

    def _ood_flags(self, member: str) -> Any:
        e = self.emb[member]
        g = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(e.shape[0], generator=g)
        half = e.shape[0] // 2
        bank, held = e[perm[:half]], e[perm[half:]]
        k = min(self.cfg.ood_k, bank.shape[0])
        return ood_detect(bank, held, self.ood[member], k=k, tpr=self.cfg.ood_tpr)

    def distribution(self, var: str) -> dict[str, Any]:
        sk: dict[str, str] = {}
        out: dict[str, Any] = {}
        pairs = self._pairs(var)
        if self.ood is None:
            out["ood"] = {"not_measured": self.ood_reason}
            sk["ood_agreement"] = self.ood_reason
        else:
            flags = {m: self._ood_flags(m) for pair in pairs for m in pair}
            ag = [ood_agreement(flags[a].flags, flags[b].flags) for a, b in pairs]
            out["ood"] = {"ood_name": self.ood_name, "k": flags[pairs[0][0]].k, "tpr": self.cfg.ood_tpr,
                          "jaccard": float(np.mean([a.jaccard for a in ag])),
                          "detection_base": float(np.mean([a.detection_rate_base for a in ag])),
                          "detection_variant": float(np.mean([a.detection_rate_variant for a in ag])),
                          "n": ag[0].n, "bank": "half of the evaluation set (seeded split); the other half sets the threshold"}
            ref = self._ref_pair()
            if ref is not None:
                out["ood"]["reference_jaccard"] = ood_agreement(self._ood_flags(ref[0]).flags,
                                                                self._ood_flags(ref[1]).flags).jaccard
        a, b = pairs[0]
        pa, pb = self.probs[a], self.probs[b]
        levels = np.linspace(0, 1, 41)
        for key, fa, fb in (("confidence_shift", pa.max(1).values, pb.max(1).values),
                            ("entropy_shift", entropy(pa), entropy(pb))):
            r = ks_shift(fa, fb, key.split("_")[0])
            out[key] = {"statistic": r.statistic, "p_value": r.p_value, "mean_base": r.mean_base,
                        "mean_variant": r.mean_variant, "pair": f"{a}~{b}",
                        "quantiles_base": quantiles(fa, levels).tolist(),
                        "quantiles_variant": quantiles(fb, levels).tolist()}
        cs = self._class_shift(a, b)
        out["predicted_class_shift"] = {"tv": cs.total_variation, "p_value": cs.p_value,
                                        "counts_base": cs.hist_base.tolist(), "counts_variant": cs.hist_variant.tolist(),
                                        "pair": f"{a}~{b}"}
        out["skipped"] = sk
        return out

    # -- verdicts ---------------------------------------------------------------------
    @staticmethod
    def verdicts(var: str, models: dict, pe: dict, rep: dict, dist: dict, adv: dict | None) -> dict[str, Any]:
        """Every registered verdict rule applied to this variant's sections (:mod:`minidiff.results.verdicts`)."""
        return decide_all(var, {"models": models, "prediction_errors": pe, "representation": rep,
                                "distribution": dist, "adversarial": adv})


def adversarial_verdict(var: str, adv: dict | None) -> dict[str, Any]:
    """Verdict cell for the adversarial column (:class:`minidiff.results.verdicts.AdversarialRule`)."""
    return RULES["adversarial"].decide(var, {"adversarial": adv}).to_dict()
