"""minidiff.Results: typed sections, the /2 file and the /1 reader, DataFrames, the notebook
view, the output folder (one run's files only, never over another study), no null where a
value is defined, plots as PNG + SVG, and verdict rules whose legend states their thresholds."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from minidiff.results import (RULES, SECTIONS, measured_characteristics, OutputFolderInUseError, Results, Section, Entry, Verdict,
                              decide_all, register_section)
from minidiff.results.verdicts import (AccuracyRule, AdversarialRule, DistributionRule, PredictionErrorsRule,
                                       RepresentationRule)

V1 = Path(__file__).parent / "data" / "results_v1_digits.json"  # a quick digits demo study, schema /1, trimmed


@pytest.fixture(scope="module")
def v1() -> dict:
    return json.loads(V1.read_text())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("saved")
    res = Results.load(V1)
    files = res.save(out)
    return res, out, files


def test_v1_file_loads_with_the_same_numbers_and_verdicts(v1, null_paths):
    res = Results.load(V1)
    assert res["schema"] == "minidiff.results/2" and res.variants == ["prune-90", "int8"]
    for v in res.variants:
        for k, cell in v1["verdicts"][v].items():
            assert res["verdicts"][v][k]["verdict"] == cell["verdict"]
            assert res.verdicts[v][k].summary == cell["summary"]
        assert res["prediction_errors"][v]["churn"] == v1["prediction_errors"][v]["churn"]
        assert res["representation"][v]["cka"]["matrix"] == v1["representation"][v]["cka"]["matrix"]
        # the verdict rules decide the file's verdicts again from the file's numbers
        secs = {k: v1[k][v] for k in ("prediction_errors", "representation", "distribution")}
        # (rules registered since /1, e.g. language_model, add cells the file does not have)
        again = decide_all(v, {**secs, "adversarial": v1["adversarial"]})
        assert {k: c for k, c in again.items() if k in v1["verdicts"][v]} == v1["verdicts"][v]
    # /1 wrote null for empty calibration bins: an undefined cell, read as NaN
    conf = res["prediction_errors"]["int8"]["calibration"]["bins_base"]["confidence"]
    assert any(isinstance(c, float) and math.isnan(c) for c in conf)
    assert not null_paths(res.json_data())


def test_round_trip_v2(saved):
    res, out, files = saved
    data = json.loads((out / "results.json").read_text())
    assert data["schema"] == "minidiff.results/2"
    assert data["sections"] == [k for k in SECTIONS if k in res.sections]  # registration order
    assert data["sections"][:5] == ["models", "prediction_errors", "representation", "distribution", "adversarial"]
    back = Results.load(out)
    assert back.to_json() == res.to_json()
    assert back["models"]["base"]["accuracy"]["mean"] == res["models"]["base"]["accuracy"]["mean"]
    assert isinstance(back.verdicts["int8"]["accuracy"].verdict, Verdict)


def test_no_null_where_a_value_is_defined(saved):
    res, out, _ = saved
    text = (out / "results.json").read_text()
    assert "null" not in text and "NaN," not in text.replace('"NaN"', "")
    assert json.loads(text)["study"]["config"]["variants"][0].get("model", "unset") == "unset"  # unset: left out


def test_missing_and_non_finite_values_carry_reasons(tmp_path, null_paths):
    d = {"schema": "minidiff.results/2", "study": {"name": "hand-made"}, "variants": ["v"],
         "models": {"base": {"members": ["base"], "accuracy": None, "nonzero_fraction": None,
                             "skipped": {"accuracy": "needs labels; the evaluation data has none"}}},
         "prediction_errors": {"v": {"churn": 0.1, "reference_churn": None, "error_jaccard": float("nan"),
                                     "divergence": {"kl": {"mean": float("inf"), "p50": 0.1, "p90": 0.2,
                                                           "p99": 1.0, "max": float("inf")}},
                                     "skipped": {"reference_churn": "one base model only"}}},
         "representation": {"v": {"cka": {"final": float("nan"), "matrix": [[float("nan"), 0.5]],
                                          "layers_base": ["a"], "layers_variant": ["a", "b"]}}},
         "distribution": {"v": {"confidence_shift": {"statistic": 0.05, "p_value": 0.9}}},
         "adversarial": {"not_measured": "no [adversarial] table in the study"}}
    res = Results.from_dict(d)
    j = json.loads(res.to_json())
    pe = j["prediction_errors"]["v"]
    assert pe["reference_churn"] == {"not_computed": "one base model only"}
    assert "0/0" in pe["error_jaccard"]["not_computed"]
    assert pe["divergence"]["kl"]["max"] == "Infinity"  # the value IS infinite: written as such
    assert j["models"]["base"]["accuracy"] == {"not_computed": "needs labels; the evaluation data has none"}
    assert j["models"]["base"]["nonzero_fraction"]["not_computed"]
    assert j["representation"]["v"]["cka"]["matrix"] == [["NaN", 0.5]]
    assert "constant" in j["representation"]["v"]["cka"]["final"]["not_computed"]
    assert "ood" not in j["study"] and j["study"]["skipped"] == {"ood": "no OOD set was given"}
    assert not null_paths(j)
    res.save(tmp_path / "o")
    back = Results.load(tmp_path / "o")
    assert back["prediction_errors"]["v"]["divergence"]["kl"]["max"] == math.inf
    assert math.isnan(back["representation"]["v"]["cka"]["matrix"][0][0])
    html = (tmp_path / "o" / "report.html").read_text()
    assert "Not computed, and why" in html and "one base model only" in html
    assert "no [adversarial] table in the study" in html
    rows = {(s, m) for s, _, m, _ in res.not_computed()}
    assert {("prediction_errors", "reference_churn"), ("models", "accuracy"), ("adversarial", "adversarial"),
            ("study", "ood")} <= rows
    # the verdicts read missing values as missing
    assert decide_all("v", {"prediction_errors": pe, "representation": j["representation"]["v"],
                            "distribution": j["distribution"]["v"], "adversarial": j["adversarial"]}
                      )["representation"]["verdict"] == "not_measured"


def test_to_frame_columns(saved):
    res, _, _ = saved
    s = res.to_frame()
    assert list(s["variant"]) == res.variants
    assert {f"{k}_verdict" for k in RULES} <= set(s.columns)
    pe = res.to_frame("prediction_errors")
    assert {"variant", "accuracy_change", "accuracy_change_ci_low", "churn", "reference_churn", "mcnemar_p",
            "kl_mean", "js_p99", "pie_count"} <= set(pe.columns)
    assert pe.set_index("variant").loc["int8", "churn"] == res["prediction_errors"]["int8"]["churn"]
    assert {"model", "accuracy", "ci_low", "ci_high", "size_mb"} <= set(res.to_frame("models").columns)
    assert {"cka_final", "knn_overlap_mean"} <= set(res.to_frame("representation").columns)
    assert {"ood_jaccard", "confidence_ks"} <= set(res.to_frame("distribution").columns)
    adv = res.to_frame("adversarial")
    assert {"attack", "model", "adversarial_accuracy", "adversarial_accuracy_change_ci_low"} <= set(adv.columns)
    cka = res.to_frame("cka_int8")
    m = res["representation"]["int8"]["cka"]["matrix"]
    assert cka.shape == (len(m), len(m[0])) and cka.iloc[0, 0] == m[0][0]
    with pytest.raises(KeyError, match="no table"):
        res.to_frame("nope")


def test_csv_files_and_plots_png_and_svg(saved):
    res, out, files = saved
    for f in ("summary.csv", "models.csv", "prediction_errors.csv", "representation.csv", "distribution.csv",
              "adversarial.csv", "cka_int8.csv", "pies_int8.csv", "report.html", "results.json"):
        assert (out / f).is_file(), f
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["variant"]) == res.variants
    pngs = sorted(p.stem for p in (out / "plots").glob("*.png"))
    svgs = sorted(p.stem for p in (out / "plots").glob("*.svg"))
    assert pngs == svgs and {"accuracy", "cka_int8", "js_prune-90", "reliability_int8"} <= set(pngs)
    assert (out / "plots" / "cka_int8.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<svg" in (out / "plots" / "cka_int8.svg").read_text()[:500]
    html = (out / "report.html").read_text()
    assert html.count("<img ") == len(pngs)  # every figure in the page is also a file
    assert all(f'data-plot="{n}"' in html for n in pngs)


def test_repr_html_is_the_verdict_table(saved):
    res, _, _ = saved
    h = res._repr_html_()
    assert 'id="summary"' in h and all(v in h for v in res.variants)
    # a column no variant was measured on (here the language-model one) is left out, with its legend
    shown = measured_characteristics(res.verdicts, res.variants)
    assert ("language_model", "Language model") not in shown and len(shown) == len(RULES) - 1
    assert all(title in h for _, title in shown) and "Language model" not in h
    unescaped = h.replace("&gt;", ">").replace("&lt;", "<")
    assert all(RULES[k].legend() in unescaped for k, _ in shown)


def test_one_vocabulary_everywhere(saved):
    res, out, _ = saved
    words = {v.value for v in Verdict}
    assert words == {"same", "minor", "differs", "not_measured"} and all(v.label == v.value for v in Verdict)
    summary = pd.read_csv(out / "summary.csv")
    verdicts = json.loads((out / "results.json").read_text())["verdicts"]
    keys = {k for cells in verdicts.values() for k in cells}  # the /1 file's columns (no language_model)
    csv_words = set(summary[[f"{k}_verdict" for k in keys]].to_numpy().ravel())
    json_words = {c["verdict"] for cells in verdicts.values() for c in cells.values()}
    assert csv_words == json_words and csv_words <= words
    html = (out / "report.html").read_text()
    for w in json_words:
        assert f'class="v v-{w}"' in html and f">{w}</span>" in html
    assert "slight change" not in html and "not measured</span>" not in html


def _small(variants, name="small study") -> Results:
    """A results with one 2x2 CKA matrix (one figure) per variant: cheap to save."""
    return Results.from_dict({
        "schema": "minidiff.results/2", "study": {"name": name}, "variants": list(variants),
        "prediction_errors": {v: {"churn": 0.01 * (i + 1)} for i, v in enumerate(variants)},
        "representation": {v: {"cka": {"final": 0.9, "matrix": [[1.0, 0.5], [0.5, 0.9]], "layers_base": ["a", "b"],
                                       "layers_variant": ["a", "b"]}} for v in variants}})


def test_output_folder_holds_one_run(tmp_path):
    out = tmp_path / "o"
    _small(["p90", "int8"]).save(out)
    assert (out / "cka_p90.csv").exists() and (out / "plots" / "cka_p90.svg").exists()
    # the same study again, with one variant fewer: the earlier variant's files are removed
    _small(["int8"]).save(out)
    assert not (out / "cka_p90.csv").exists() and not list((out / "plots").glob("*p90*"))
    assert (out / "cka_int8.csv").exists() and (out / "plots" / "cka_int8.svg").exists()
    assert Results.load(out).variants == ["int8"]
    # another study: refused, nothing touched
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(OutputFolderInUseError, match="another study"):
        _small(["x"], name="another study").save(out)
    assert sorted(p.name for p in out.iterdir()) == before
    _small(["x"], name="another study").save(out, overwrite=True)
    assert Results.load(out).study.name == "another study" and not (out / "cka_int8.csv").exists()
    # files minidiff did not write: refused; with overwrite they are left alone
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("x")
    with pytest.raises(OutputFolderInUseError, match="thesis.tex"):
        _small(["a"]).save(mine)
    _small(["a"]).save(mine, overwrite=True)
    assert (mine / "thesis.tex").read_text() == "x" and (mine / "results.json").exists()
    # a cache folder and nested study outputs (a combined report) are not foreign
    nested = tmp_path / "combined"
    _small(["a"], name="part").save(nested / "part")
    (nested / "cache" / "part").mkdir(parents=True)
    _small(["a"], name="combined").save(nested)
    assert (nested / "part" / "results.json").exists()


def test_v1_output_folder_is_cleaned_on_rerun(tmp_path, v1):
    out = tmp_path / "old"
    out.mkdir()
    (out / "results.json").write_text(json.dumps({**v1, "study": {**v1["study"], "name": "small study"}}))
    (out / "cka_gone.csv").write_text("x\n")  # a variant of the earlier /1 run
    (out / "summary.csv").write_text("x\n")
    _small(["a"]).save(out)
    assert not (out / "cka_gone.csv").exists() and (out / "summary.csv").read_text() != "x\n"


@pytest.mark.parametrize("rule", [AccuracyRule(minor_below=0.02), PredictionErrorsRule(same_ratio=1.25, differs_abs=0.2),
                                  RepresentationRule(same_at=0.9, reference_margin=0.05),
                                  DistributionRule(ks_differs=0.3, jaccard_same=0.75), AdversarialRule(differs_at=0.08)])
def test_rule_legend_states_its_thresholds(rule):
    text = rule.legend()
    for f in dataclasses.fields(rule):
        val = getattr(rule, f.name)
        if isinstance(val, float):
            forms = {f"{val:g}", f"{100 * val:g}"}
            assert any(x in text for x in forms), (f.name, val, text)
    default = type(rule)()
    assert rule.legend() != default.legend()


def test_rules_decide_at_their_thresholds():
    ac = lambda m, lo, hi: {"prediction_errors": {"accuracy_change": {"mean": m, "ci_low": lo, "ci_high": hi}}}
    assert AccuracyRule().decide("v", ac(-0.015, -0.02, -0.01)).verdict == "differs"
    assert AccuracyRule(minor_below=0.02).decide("v", ac(-0.015, -0.02, -0.01)).verdict == "minor"
    assert AccuracyRule().decide("v", ac(-0.015, -0.02, 0.001)).verdict == "same"
    pe = lambda churn, ref: {"prediction_errors": {"churn": churn, "reference_churn": ref}}
    assert PredictionErrorsRule().decide("v", pe(0.14, 0.1)).verdict == "same"
    assert PredictionErrorsRule(same_ratio=1.25).decide("v", pe(0.14, 0.1)).verdict == "minor"
    assert PredictionErrorsRule().decide("v", pe(0.31, 0.1)).verdict == "differs"
    assert PredictionErrorsRule().decide("v", pe(0.05, None)).verdict == "minor"
    rep = lambda c, r: {"representation": {"cka": {"final": c, "reference_final": r}}}
    assert RepresentationRule().decide("v", rep(0.93, 0.92)).verdict == "same"   # >= the seeds' CKA
    assert RepresentationRule().decide("v", rep(0.79, 0.92)).verdict == "differs"
    assert RepresentationRule().decide("v", rep(0.79, 0.85)).verdict == "minor"  # not below r - 0.10
    assert RepresentationRule(reference_margin=0.05).decide("v", rep(0.79, 0.85)).verdict == "differs"
    dist = lambda ks, jac: {"distribution": {"confidence_shift": {"statistic": ks}, "ood": {"jaccard": jac}}}
    assert DistributionRule().decide("v", dist(0.05, 0.8)).verdict == "same"
    assert DistributionRule().decide("v", dist(0.05, 0.6)).verdict == "minor"
    assert DistributionRule().decide("v", dist(0.3, 0.8)).verdict == "differs"
    adv = lambda d, lo, hi: {"adversarial": {"attacks": {"a": {"change": {"v": {"adversarial_accuracy": {
        "delta": d, "ci_low": lo, "ci_high": hi}}}}}}}
    assert AdversarialRule().decide("v", adv(0.06, 0.01, 0.1)).verdict == "differs"
    assert AdversarialRule(differs_at=0.08).decide("v", adv(0.06, 0.01, 0.1)).verdict == "minor"
    assert AdversarialRule().decide("v", adv(0.06, -0.01, 0.1)).verdict == "same"


def test_a_registered_section_plugs_in(tmp_path):
    from minidiff.report import RENDERERS, register_renderer
    from minidiff.report import plots

    class ToyEntry(Entry):
        score: float

    class ToySection(Section):
        key = "toy"
        title = "Toy characteristic"
        Entry = ToyEntry

    register_section(ToySection)
    try:
        res = Results.from_dict({"schema": "minidiff.results/2", "study": {"name": "toy"}, "variants": ["v"],
                                 "toy": {"v": {"score": 0.5, "note": "kept"}}})
        assert isinstance(res["toy"]["v"], ToyEntry) and res["toy"]["v"]["note"] == "kept"
        assert list(res.to_frame("toy").columns) == ["variant", "score", "note"]
        res.save(tmp_path / "a")
        assert "Toy characteristic" in (tmp_path / "a" / "report.html").read_text()  # shown as its table
        assert (tmp_path / "a" / "toy.csv").exists()

        @register_renderer("toy")
        def _toy(results, ctx):
            return "<p>toy renderer</p>" + ctx.figure("toy_hist", plots.histogram([0, 1], [3], "t", "x"), "toy")
        try:
            Results.load(tmp_path / "a").save(tmp_path / "a")
            assert "toy renderer" in (tmp_path / "a" / "report.html").read_text()
            assert (tmp_path / "a" / "plots" / "toy_hist.svg").exists()
        finally:
            RENDERERS.pop("toy")
    finally:
        SECTIONS.pop("toy")


def test_matplotlib_only_in_the_report_and_never_pyplot(tmp_path):
    pkg = Path(__file__).parent.parent / "python" / "minidiff"
    imports = re.compile(r"^\s*(import matplotlib|from matplotlib)|import_module\([\"']matplotlib", re.M)
    users = sorted(str(p.relative_to(pkg)) for p in pkg.rglob("*.py")
                   if imports.search(p.read_text()) and p.parent.name != "report")
    assert users == []
    # the raw rcParams entry: matplotlib.get_backend() itself would import pyplot to resolve it
    small = tmp_path / "small.json"
    small.write_text(_small(["a", "b"]).to_json())
    code = ("import sys, matplotlib; raw = lambda: dict.__getitem__(matplotlib.rcParams, 'backend'); b = raw();"
            "import minidiff.report as r, minidiff.results as m;"
            "res = m.Results.load(sys.argv[1]); r.render_files(res);"
            "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported';"
            "assert raw() == b, 'backend switched'")
    p = subprocess.run([sys.executable, "-c", code, str(small)], capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]


def test_study_results_module_is_a_reexport():
    import minidiff
    import minidiff.study.results as old
    assert old.Results is Results and old.SCHEMA == "minidiff.results/2"
    assert minidiff.Results is Results
