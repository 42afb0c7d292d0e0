"""The package's shape (docs/architecture.md): no import cycles, no module over 500 lines, layers that point one way.

Pure source analysis (no JAX), so it runs in well under a second.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "qwenjax"
MAX_LINES = 500

#: what each top-level part may import from qwenjax (docs/architecture.md, "Layers"); a part not listed may
#: import anything below the CLI. Tightening a rule here is how a new boundary is made to hold.
ALLOWED = {
    "errors": set(),
    "jsonl": set(),
    "lock": {"errors"},
    "signals": set(),
    "config": {"errors"},
    "run_sections": {"errors", "run_stages"},
    "run_stages": {"errors"},
    "scaling": {"config", "errors"},
    "rope": {"config"},
    "attention": {"attention_flash", "attention_sparse", "errors", "run_sections"},
    "attention_sparse": {"errors", "run_sections"},
    "attention_flash": set(),
    "context_parallel": {"attention"},
    "dca": {"attention", "config", "errors", "rope"},
    "model": {"attention", "config", "context_parallel", "dca", "rope"},
    "data": {"errors", "jsonl", "run_config", "run_sections", "config"},
    "train": {"attention", "config", "context_parallel", "data", "errors", "jsonl", "lock", "model", "model_io",
              "run_config", "run_sections", "run_stages", "signals"},
    "evals": {"config", "data", "errors", "hf", "model", "model_io", "run_config", "train"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every qwenjax module `path` imports (anywhere in the file), with the packages that import loads."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            if not t.startswith("qwenjax"):
                continue
            parts = t.split(".")
            for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
                prefix = ".".join(parts[:i])
                if prefix in modules and prefix != name:
                    found.add(prefix)
    return found


def _graph() -> dict[str, set[str]]:
    files = sorted(ROOT.rglob("*.py"))
    modules = {_module_name(f) for f in files}
    return {_module_name(f): _imports(f, modules) - {"qwenjax"} for f in files}


def test_no_module_over_500_lines():
    sizes = {str(f.relative_to(ROOT.parent)): len(f.read_text().splitlines()) for f in ROOT.rglob("*.py")}
    long = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_no_import_cycles():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if n.startswith(m + "."):
                continue  # a package importing its own submodules is not a cycle
            if state.get(n) == 1:
                cycle = stack[stack.index(n):] + [n]
                pairs = zip(cycle, cycle[1:], strict=False)
                nested = (b.startswith(a + ".") or a.startswith(b + ".") for a, b in pairs)
                if not all(nested):
                    return cycle
            elif n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_layers_point_one_way(part):
    graph = _graph()
    bad = set()
    for mod, deps in graph.items():
        if mod.split(".")[1:2] != [part]:
            continue
        for d in deps:
            top = d.split(".")[1]
            if top != part and top not in ALLOWED[part]:
                bad.add(f"{mod} -> {d}")
    assert not bad, f"{part} may import only {sorted(ALLOWED[part])}: {sorted(bad)}"


def test_cycle_checker_sees_a_cycle(tmp_path, monkeypatch):
    pkg = tmp_path / "qwenjax"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from qwenjax import b\n")
    (pkg / "b.py").write_text("def f():\n    from qwenjax.a import x\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", pkg)
    with pytest.raises(pytest.fail.Exception, match="import cycle"):
        test_no_import_cycles()
