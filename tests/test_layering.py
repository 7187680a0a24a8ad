"""The import rule the README states (Layout): imports point down

    edge_ds.cli  ->  converters  ->  the runtime (edge_ds)  ->  the base (MLX-free)

the runtime never imports the converters or the CLI, the base never imports MLX or the rest of
the runtime, apps import only the public `edge_ds` package, and no module imports itself back
through others.
Imports inside functions count like any other (they may delay an import, never hide an arrow).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BASE = {"edge_ds", "edge_ds.errors", "edge_ds.config", "edge_ds.layout", "edge_ds.checkpoint", "edge_ds.options",
        "edge_ds._blas"}
RANK = {"base": 0, "runtime": 1, "converters": 2, "cli": 3}


def layer(module: str) -> str:
    if module in BASE:
        return "base"
    if module == "edge_ds.cli":
        return "cli"
    return "converters" if module.split(".")[0] == "converters" else "runtime"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module `path` imports, at any depth, relative imports resolved."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
    return out


def graph() -> dict[str, set[str]]:
    files = [p for d in ("edge_ds", "converters") for p in (ROOT / d).rglob("*.py")]
    ours = {module_name(p) for p in files}
    return {module_name(p): {m for m in imports(p) if m in ours and m != module_name(p)} for p in files}


def test_imports_point_down():
    upward = [f"{a} ({layer(a)}) -> {b} ({layer(b)})" for a, deps in graph().items() for b in deps
              if RANK[layer(b)] > RANK[layer(a)]]
    assert upward == []


def test_no_import_cycles():
    g = graph()
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(g[m]):
            if state.get(d) == 1:
                cycles.append(path[path.index(d):] + [d])
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_base_and_apps_stay_light():
    for m, _ in graph().items():
        if layer(m) == "base":
            path = ROOT / (m.replace(".", "/") + ("/__init__.py" if m == "edge_ds" else ".py"))
            assert not any(i == "mlx" or i.startswith("mlx.") for i in imports(path)), m
    for app in (ROOT / "apps").glob("*.py"):  # apps use the public face only
        ours = {i for i in imports(app) if i.split(".")[0] in ("edge_ds", "converters")}
        assert ours <= {"edge_ds"}, (app, ours)


@pytest.mark.parametrize("module", ["converters.fp8", "edge_ds.config", "edge_ds.checkpoint", "edge_ds.layout",
                                    "edge_ds.cli"])
def test_light_modules_do_not_load_mlx(module):
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m == 'mlx' or m.startswith('mlx.')))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
