"""The command line: run / report / check on a tiny study file, clean errors with
exit codes, ``python -m minidiff``, and the demo on its reduced (CI) size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from minidiff.cli import main

TINY = """
[study]
name = "tiny digits"
batch_size = 64
chunk_batches = 1
progress = false

[data]
source = "builtin"
name = "digits"
eval_fraction = 0.5
limit = 120
train_limit = 300

[base]
kind = "mlp"
hidden = [16]
seeds = [0, 1]
train = { epochs = 4, lr = 0.02, batch_size = 64 }

[[variants]]
name = "prune-60"
recipe = "prune"
sparsity = 0.6

[[variants]]
name = "int8"
recipe = "int8"

[metrics]
bootstrap = 100
knn_k = 5
"""


pytestmark = pytest.mark.usefixtures("one_thread")


def test_run_then_report_from_cache(tmp_path, capsys):
    f = tmp_path / "study.toml"
    f.write_text(TINY)
    out = tmp_path / "out"
    assert main(["run", str(f), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "prune-60" in printed and "report.html" in printed
    res = json.loads((out / "results.json").read_text())
    assert res["variants"] == ["prune-60", "int8"]
    assert res["models"]["base"]["members"] == ["base#s0", "base#s1"]
    assert res["study"]["config"]["base"]["hidden"] == [16]
    assert (out / "report.html").stat().st_size > 10_000
    # models are cached: a second run builds and computes nothing
    from minidiff.study.study import build_study
    st = build_study(f, cache_dir=out / "cache", progress=False)
    assert st.build_info["built_fresh"] == 0
    st.run()
    assert set(st.last_run["forward_chunks"].values()) == {0}
    # the report regenerates from the cache alone
    out2 = tmp_path / "again"
    assert main(["report", "--cache", str(out / "cache"), "--out", str(out2)]) == 0
    res2 = json.loads((out2 / "results.json").read_text())
    assert res2["verdicts"] == res["verdicts"]
    assert (out2 / "report.html").is_file()


def test_bad_inputs_exit_nonzero_without_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text(TINY.replace("hidden = [16]", "hidden = [16]\nhiden = 3"))
    assert main(["run", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'base.hiden'" in err and "Traceback" not in err
    wrong = tmp_path / "wrong.toml"
    wrong.write_text(TINY.replace("batch_size = 64\nchunk", 'batch_size = "many"\nchunk'))
    assert main(["check", str(wrong)]) == 2
    assert "study.batch_size" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.toml"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    notoml = tmp_path / "x.toml"
    notoml.write_text("[study\nname=")
    assert main(["check", str(notoml)]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    assert main(["report", "--cache", str(tmp_path), "--out", str(tmp_path / "r")]) == 2
    assert "no completed study" in capsys.readouterr().err
    ok = tmp_path / "ok.toml"
    ok.write_text(TINY)
    assert main(["check", str(ok)]) == 0


def test_python_dash_m_entry_point(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(TINY.replace('recipe = "int8"', 'recipe = "int4"'))
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, "-m", "minidiff", "check", str(bad)], capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == 2
    assert "variants[1].recipe" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "-m", "minidiff", "--version"], capture_output=True, text=True,
                       env=env, timeout=300)
    assert p.returncode == 0 and p.stdout.startswith("minidiff ")


def test_example_study_files_are_valid():
    from minidiff.study import load_config
    files = sorted((Path(__file__).parent.parent / "examples").glob("*.toml"))
    assert len(files) >= 3
    for f in files:
        cfg = load_config(f)
        assert cfg.variants


@pytest.mark.slow
def test_demo_quick(tmp_path, capsys):
    """The README's main job on its reduced size: both embedded studies, combined report."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick", "--quiet"]) == 0
    res = json.loads((out / "results.json").read_text())
    names = res["variants"]
    assert {"digits-prune-50", "digits-int8", "digits-distill", "minilm-prune-50", "minilm-prune-2:4",
            "minilm-int8", "minilm-distill-3L"} <= set(names)
    for tag in ("digits", "minilm"):
        sub = json.loads((out / tag / "results.json").read_text())
        for v in sub["variants"]:
            assert sub["verdicts"][v]["prediction_errors"]["verdict"] in ("same", "minor", "differs")
            assert "jaccard" in sub["distribution"][v]["ood"]  # both studies have an OOD set
            assert sub["representation"][v]["cka"]["matrix"]
            assert sub["verdicts"][v]["adversarial"]["verdict"] in ("same", "minor", "differs")
    digits = json.loads((out / "digits" / "results.json").read_text())
    assert digits["prediction_errors"]["prune-90"]["pie"]["population"] is True
    assert digits["prediction_errors"]["prune-90"]["per_class"]["p_value"]
    minilm = json.loads((out / "minilm" / "results.json").read_text())
    assert minilm["models"]["base"]["accuracy"]["mean"] > 0.3  # 19 topics: chance is ~0.05
    assert minilm["prediction_errors"]["int8"]["pie"]["examples"] == [] or \
        "text" in minilm["prediction_errors"]["int8"]["pie"]["examples"][0]
    # the int8 MiniLM has no backward: attacked through the float base's gradient, and labelled so
    emb = next(v for k, v in minilm["adversarial"]["attacks"].items() if k.startswith("embedding-pgd"))
    assert emb["per_model"]["int8"]["gradient"] == "surrogate:base"
    assert (out / "report.html").is_file() and (out / "minilm" / "report.html").is_file()


_SIGTERM_AFTER_FIRST_CHUNK = """
import os, signal, sys
from minidiff.study import study as st
run = st.Study.run


def run_and_stop(self, *args, **kwargs):
    def on_chunk(k):
        if k == 0 and os.environ.get("STOP") == "1":
            os.kill(os.getpid(), signal.SIGTERM)  # a job scheduler's or kill's stop
    return run(self, *args, on_chunk=on_chunk, **kwargs)


st.Study.run = run_and_stop
from minidiff.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_says_why_and_the_rerun_resumes(tmp_path):
    f = tmp_path / "study.toml"
    f.write_text(TINY)
    script = tmp_path / "stop.py"
    script.write_text(_SIGTERM_AFTER_FIRST_CHUNK)
    cmd = [sys.executable, str(script), "run", str(f), "--out", str(tmp_path / "out"), "--quiet", "--threads", "1"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    r = subprocess.run(cmd, env=dict(env, STOP="1"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 143, r.stderr[-2000:]
    assert r.stderr.count("minidiff: error: stopped (SIGTERM)") == 1 and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "out" / "results.json").exists()
    assert list((tmp_path / "out" / "cache" / "models").glob("*/chunk_00000.safetensors"))
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "results.json").read_text())["variants"] == ["prune-60", "int8"]
