"""The report renders in a real browser: headless Chromium loads report.html, every
image decodes, no script error. The page's inline script records image failures
and errors into <body data-...> attributes; ``--dump-dom`` returns the DOM after
the load event."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile

import pytest
import torch

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def _chromium() -> str | None:
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None


@pytest.fixture(scope="module")
def browser():
    path = _chromium()
    if path is None:
        if os.environ.get("MINIDIFF_REQUIRE_BROWSER"):
            pytest.fail("MINIDIFF_REQUIRE_BROWSER is set but no Chromium was found (apt-get install chromium)")
        pytest.skip("headless Chromium is not installed")
    return path


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A real report: two-seed MLP population on digits vs int8 and 70%-pruned, with an OOD set."""
    from minidiff.compress import prune, quantize
    from minidiff.compress.training import seeded, train
    from minidiff.data import ExampleSet, load_builtin
    from minidiff.models import make_mlp
    from minidiff.study import Study
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tr, te = load_builtin("digits").split(0.5, seed=0)
        te = te.subset(range(200))
        base = []
        for s in (0, 1):
            with seeded(s):
                m = make_mlp(64, [32], 10)
            train(m, (tr.inputs, tr.labels), epochs=5, lr=1e-2, batch_size=64, seed=s)
            base.append(m.eval())
        variants = {"int8": [quantize(m, "int8").model for m in base],
                    "prune-70": [prune(m, sparsity=0.7, scope="global").model for m in base]}
        ood = ExampleSet(name="noise", kind="image", inputs=torch.rand(40, 1, 8, 8, generator=torch.Generator().manual_seed(0)),
                         labels=None, class_names=[])
        out = tmp_path_factory.mktemp("report")
        Study(base, variants, te, ood=ood, progress=False, batch_size=64,
              metrics={"bootstrap": 100, "knn_k": 5, "ood_k": 5}).run(out=out)
    finally:
        torch.set_num_threads(n)
    return out / "report.html"


def _dump_dom(chromium: str, url: str) -> str:
    profile = tempfile.mkdtemp(prefix="minidiff-chromium-")
    try:
        p = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                            "--disable-background-networking", "--disable-component-update", "--disable-sync",
                            "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--virtual-time-budget=5000",
                            "--dump-dom", url], capture_output=True, text=True, timeout=180)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert p.returncode == 0, p.stderr[-2000:]
    return p.stdout


def _body_attr(dom: str, name: str) -> str | None:
    body = re.search(r"<body([^>]*)>", dom)
    assert body, "no <body> in the rendered DOM"
    m = re.search(rf'{name}="([^"]*)"', body.group(1))
    return m.group(1) if m else None


@pytest.mark.browser
def test_report_renders_in_chromium(browser, report):
    dom = _dump_dom(browser, report.resolve().as_uri())
    assert _body_attr(dom, "data-render") == "complete", "the load event never fired"
    total = int(_body_attr(dom, "data-images-total"))
    assert total >= 8  # accuracy, divergence, reliability, per-class, PIE grid, CKA, kNN ... per variant
    assert _body_attr(dom, "data-images-broken") == "0"
    assert _body_attr(dom, "data-script-error") is None
    assert 'id="summary"' in dom and "prune-70" in dom
    assert "v-not_measured" in dom and ">not_measured</span>" in dom  # adversarial: no [adversarial] table
    assert 'id="not-computed"' in dom  # the "Not computed, and why" section
    plots = report.parent / "plots"
    assert total == len(list(plots.glob("*.png"))) == len(list(plots.glob("*.svg")))  # every figure also a file


@pytest.mark.browser
def test_broken_image_is_detected(browser, tmp_path, report):
    """The check itself works: a page with a corrupt PNG reports one broken image."""
    html = report.read_text().replace('src="data:image/png;base64,', 'src="data:image/png;base64,AAAA', 1)
    bad = tmp_path / "bad.html"
    bad.write_text(html)
    dom = _dump_dom(browser, bad.resolve().as_uri())
    assert _body_attr(dom, "data-images-broken") == "1"
