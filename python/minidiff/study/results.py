"""results.json, the CSV tables, and writing an output folder safely.

Schema ``minidiff.results/1`` (all numbers are plain JSON; NaN/Inf become null)::

    schema            "minidiff.results/1"
    study             {name, seed, minidiff_version, population, config (the validated
                       study file, when there is one), data {name, kind, num_eval, num_train,
                       num_classes, class_names, has_labels}, ood {name, num_examples} | null,
                       notes [str]}
    variants          [variant names, in study order]
    thresholds        {characteristic: how its verdict is decided}
    verdicts          {variant: {accuracy|prediction_errors|representation|distribution|adversarial:
                                  {verdict: same|minor|differs|not_measured, summary: str}}}
    models            {"base" | variant: {members [model names], recipe, seeds, num_params,
                       nonzero_fraction, size_mb, accuracy {mean, ci_low, ci_high, per_member, n,
                       n_boot} | null, calibration {ece, brier}, skipped {metric: reason}}}
    prediction_errors {variant: {pairs, churn, reference_churn, accuracy_change {mean, ci_low,
                       ci_high}, flips {right_to_wrong, wrong_to_right, churn, error_jaccard},
                       error_jaccard, mcnemar {b, c, statistic, p_value, method, per_pair_p,
                       significant_pairs, pairs}, divergence {kl|js: {mean, p50, p90, p99, max,
                       histogram {edges, counts}}}, epsilon, calibration {ece_base, ece_variant,
                       brier_base, brier_variant, delta_ece, delta_brier, bins_base, bins_variant},
                       per_class {class_names, support, recall_base, recall_variant, recall_change,
                       normalized_change, p_value, significant, test_note, n_base, n_variant},
                       pie {count, fraction, population, mean_cie, acc_base_pie, acc_variant_pie,
                       acc_base_non_pie, acc_variant_non_pie, examples [{index, id, pie, score,
                       label, base_pred, variant_pred, text | image}]}, skipped}}
    representation    {variant: {cka {kernel, estimator, matrix [[...]], layers_base,
                       layers_variant, final, reference_final, correspondence [{layer, match,
                       cka}]}, knn_overlap {k, mean, median, reference_mean, histogram}, skipped}}
    distribution      {variant: {ood {ood_name, k, tpr, jaccard, detection_base,
                       detection_variant, reference_jaccard} | {not_measured: reason},
                       confidence_shift {statistic, p_value, mean_base, mean_variant},
                       entropy_shift {...}, predicted_class_shift {tv, p_value, counts_base,
                       counts_variant}, skipped}}
    adversarial       the adversarial module's dict (keyed by model name, plus "transfer"),
                      or {not_measured: reason}
    timing            {seconds per stage}

CSV tables: ``summary.csv`` (one row per variant: verdicts and headline numbers),
``models.csv``, ``prediction_errors.csv``, ``representation.csv``,
``distribution.csv``, ``cka_<variant>.csv`` (the layer x layer matrix) and
``pies_<variant>.csv``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from minidiff.metrics._checks import _jsonable

SCHEMA = "minidiff.results/1"
TOP_LEVEL_KEYS = ("schema", "study", "variants", "thresholds", "verdicts", "models", "prediction_errors",
                  "representation", "distribution", "adversarial")


class OutputWriteError(OSError):
    """Writing the output folder failed; nothing was left behind as if complete."""


def to_json(results: dict[str, Any]) -> str:
    return json.dumps(_jsonable(results), indent=1, allow_nan=False)


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    if not rows:
        return ""
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    w = csv.DictWriter(buf, fieldnames=keys, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _jsonable(v) for k, v in r.items()})
    return buf.getvalue()


def _g(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict):
            return None
        d = d.get(p)
    return d


def csv_tables(res: dict[str, Any]) -> dict[str, str]:
    """File name -> CSV text for the tables listed in the module docstring."""
    out: dict[str, str] = {}
    summary, pe_rows, rep_rows, dist_rows = [], [], [], []
    for v in res.get("variants", []):
        ver = res.get("verdicts", {}).get(v, {})
        pe = res.get("prediction_errors", {}).get(v, {})
        rep = res.get("representation", {}).get(v, {})
        di = res.get("distribution", {}).get(v, {})
        summary.append({"variant": v, **{f"{k}_verdict": c.get("verdict") for k, c in ver.items()},
                        **{f"{k}_summary": c.get("summary") for k, c in ver.items()}})
        pe_rows.append({"variant": v, "accuracy_change": _g(pe, "accuracy_change", "mean"),
                        "accuracy_change_ci_low": _g(pe, "accuracy_change", "ci_low"),
                        "accuracy_change_ci_high": _g(pe, "accuracy_change", "ci_high"),
                        "churn": pe.get("churn"), "reference_churn": pe.get("reference_churn"),
                        "right_to_wrong": _g(pe, "flips", "right_to_wrong"),
                        "wrong_to_right": _g(pe, "flips", "wrong_to_right"),
                        "error_jaccard": pe.get("error_jaccard"), "mcnemar_p": _g(pe, "mcnemar", "p_value"),
                        "kl_mean": _g(pe, "divergence", "kl", "mean"), "kl_p99": _g(pe, "divergence", "kl", "p99"),
                        "js_mean": _g(pe, "divergence", "js", "mean"), "js_p99": _g(pe, "divergence", "js", "p99"),
                        "ece_base": _g(pe, "calibration", "ece_base"), "ece_variant": _g(pe, "calibration", "ece_variant"),
                        "brier_base": _g(pe, "calibration", "brier_base"),
                        "brier_variant": _g(pe, "calibration", "brier_variant"),
                        "pie_count": _g(pe, "pie", "count"), "pie_fraction": _g(pe, "pie", "fraction")})
        rep_rows.append({"variant": v, "cka_final": _g(rep, "cka", "final"),
                         "cka_reference_final": _g(rep, "cka", "reference_final"),
                         "knn_overlap_mean": _g(rep, "knn_overlap", "mean"), "knn_k": _g(rep, "knn_overlap", "k"),
                         "knn_overlap_reference": _g(rep, "knn_overlap", "reference_mean")})
        dist_rows.append({"variant": v, "ood_jaccard": _g(di, "ood", "jaccard"),
                          "ood_detection_base": _g(di, "ood", "detection_base"),
                          "ood_detection_variant": _g(di, "ood", "detection_variant"),
                          "ood_not_measured": _g(di, "ood", "not_measured"),
                          "confidence_ks": _g(di, "confidence_shift", "statistic"),
                          "confidence_ks_p": _g(di, "confidence_shift", "p_value"),
                          "entropy_ks": _g(di, "entropy_shift", "statistic"),
                          "entropy_ks_p": _g(di, "entropy_shift", "p_value"),
                          "predicted_class_tv": _g(di, "predicted_class_shift", "tv")})
        cka = rep.get("cka") or {}
        if cka.get("matrix"):
            rows = [{"base_layer": la, **{lb: x for lb, x in zip(cka["layers_variant"], row)}}
                    for la, row in zip(cka["layers_base"], cka["matrix"])]
            out[f"cka_{v}.csv"] = _csv(rows)
        ex = _g(pe, "pie", "examples") or []
        if ex:
            out[f"pies_{v}.csv"] = _csv([{k: e.get(k) for k in ("index", "id", "pie", "score", "label", "base_pred",
                                                                 "variant_pred", "text")} for e in ex])
    out["summary.csv"] = _csv(summary)
    out["models.csv"] = _csv([{"model": g, "recipe": m.get("recipe"), "members": len(m.get("members", [])),
                               "accuracy": _g(m, "accuracy", "mean"), "ci_low": _g(m, "accuracy", "ci_low"),
                               "ci_high": _g(m, "accuracy", "ci_high"), "num_params": m.get("num_params"),
                               "nonzero_fraction": m.get("nonzero_fraction"), "size_mb": m.get("size_mb"),
                               "ece": _g(m, "calibration", "ece")} for g, m in res.get("models", {}).items()])
    out["prediction_errors.csv"] = _csv(pe_rows)
    out["representation.csv"] = _csv(rep_rows)
    out["distribution.csv"] = _csv(dist_rows)
    return out


def write_output(out_dir: str | Path, results: dict[str, Any],
                 render: Callable[[dict[str, Any]], str]) -> dict[str, Path]:
    """Write ``report.html``, ``results.json`` and the CSV tables into ``out_dir``.

    Everything is first written to a staging folder inside ``out_dir`` (where a full
    disk or any other failure shows up), then moved into place with ``os.replace``,
    ``report.html`` last. Before the move, an existing ``report.html`` and
    ``results.json`` from an earlier run are removed, so after a failure the folder
    never holds a report that looks complete but is not this run's.

    Raises
    ------
    OutputWriteError
        If anything could not be written; the staging folder is removed.
    """
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputWriteError(f"cannot create output folder {str(out)!r}: {e}") from None
    files = {"results.json": to_json(results), **csv_tables(results)}
    stage = Path(tempfile.mkdtemp(prefix=".minidiff-staging-", dir=out))
    try:
        files["report.html"] = render(results)
        for name, text in files.items():
            with open(stage / name, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        for old in ("report.html", "results.json"):
            (out / old).unlink(missing_ok=True)
        order = [n for n in files if n != "report.html"] + ["report.html"]
        for name in order:
            os.replace(stage / name, out / name)
    except OSError as e:
        for old in ("report.html", "results.json"):
            (out / old).unlink(missing_ok=True)
        raise OutputWriteError(f"writing the report to {str(out)!r} failed ({e}); nothing was left behind "
                               "as if complete — free some space and run again (the cache keeps finished work)") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return {name: out / name for name in files}
