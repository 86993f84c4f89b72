"""The package's shape: no import cycles, a clean public namespace, nothing that
points outside the repository.

Imports are read from the source with ``ast`` (module level and inside
functions alike: a lazy import is still a dependency), so a cycle hidden behind
a function-local import is found too.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import minidiff

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "python" / "minidiff"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def _imports(mod: str, path: Path, known: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod if is_pkg else mod.rpartition(".")[0]
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                src = f"{base}.{node.module}" if node.module else base
            else:
                src = node.module or ""
            # `from pkg import sub` names a module when pkg/sub.py exists
            targets = [f"{src}.{a.name}" if f"{src}.{a.name}" in known else src for a in node.names]
        for t in targets:
            if t == "minidiff" or t.startswith("minidiff."):
                r = _resolve(t, known)
                if r and r != mod and r != "minidiff":
                    out.add(r)
    return out


def import_graph() -> dict[str, set[str]]:
    known = _modules()
    return {m: _imports(m, p, known) for m, p in known.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = import_graph()
    cycles = _cycles(graph)
    detail = [" <-> ".join(c) + "  (edges: " + "; ".join(f"{a} -> {b}" for a in c for b in sorted(graph[a])
                                                     if b in c) + ")" for c in cycles]
    assert not cycles, "import cycles in python/minidiff:\n" + "\n".join(detail)


def test_public_namespace_is_only_the_api():
    names = dir(minidiff)
    leaked = [n for n in names if n in ("Any", "importlib", "annotations", "typing")]
    assert not leaked, leaked
    for n in names:
        if n == "__version__":
            continue
        assert getattr(minidiff, n) is not None, n  # every listed name resolves


@pytest.mark.parametrize("pattern", [r"DESIGN\.md", r"\.\./shared", r"shared/"])
def test_nothing_refers_outside_the_repository(pattern):
    rx = re.compile(pattern)
    hits = []
    for p in ROOT.rglob("*"):
        if any(part in (".git", "build", "__pycache__", ".pytest_cache") for part in p.parts) or not p.is_file():
            continue
        if p.suffix not in (".py", ".md", ".toml", ".txt", ".cpp", ".h", ".cu", ".cfg", ".sh", "") or \
                p.name == "test_architecture.py":
            continue
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        hits += [f"{p.relative_to(ROOT)}:{i + 1}" for i, line in enumerate(text.splitlines()) if rx.search(line)]
    assert not hits, f"references to {pattern!r} (a file outside the repository): {hits[:20]}"
