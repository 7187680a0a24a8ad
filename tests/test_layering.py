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
    if module in ("edge_ds.cli", "edge_ds.__main__"):  # `python -m edge_ds` is the CLI's entry
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
                                    "edge_ds.cli", "edge_ds.api", "edge_ds.generate", "edge_ds.perplexity",
                                    "edge_ds.parity", "edge_ds.bench", "edge_ds.info"])
def test_light_modules_do_not_load_mlx(module):
    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m == 'mlx' or m.startswith('mlx.')))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


# The datacenter leg (issue 17): a CUDA server has no MLX, an edge device has no torch.
TORCH_SIDE = ("edge_ds.datacenter", "edge_ds.backends.torch")
HEAVY = {"mlx": ("mlx",), "torch": ("torch", "transformers", "triton")}


def _is_torch_side(module: str) -> bool:
    return any(module == m or module.startswith(m + ".") for m in TORCH_SIDE)


def _path(module: str) -> Path:
    p = ROOT / module.replace(".", "/")
    return p / "__init__.py" if p.is_dir() else p.with_suffix(".py")


def _closure(start: set[str], g: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), list(start)
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(g[m])
    return seen


def _imports_any(module: str, roots: tuple[str, ...]) -> list[str]:
    return sorted(i for i in imports(_path(module)) if i.split(".")[0] in roots)


def test_torch_side_never_imports_mlx():
    """edge_ds.datacenter and the torch backend, and everything of ours they import at any depth."""
    g = graph()
    start = {m for m in g if _is_torch_side(m)}
    assert start >= {"edge_ds.datacenter", "edge_ds.datacenter.fp8", "edge_ds.backends.torch"}
    found = {m: _imports_any(m, HEAVY["mlx"]) for m in _closure(start, g)}
    assert {m: v for m, v in found.items() if v} == {}


def test_mlx_side_never_imports_torch():
    """Only the torch side names torch/transformers, and nothing else of ours imports the torch side
    (the backend registry reaches backends.torch by name through importlib, which imports no torch)."""
    g = graph()
    others = {m for m in g if not _is_torch_side(m)}
    assert {m: _imports_any(m, HEAVY["torch"]) for m in others if _imports_any(m, HEAVY["torch"])} == {}
    assert {m: sorted(d for d in g[m] if _is_torch_side(d)) for m in others
            if any(_is_torch_side(d) for d in g[m])} == {}


@pytest.mark.parametrize("module", ["edge_ds.datacenter", "edge_ds.backends.torch", "edge_ds"])
def test_torch_side_loads_no_mlx(module):
    code = (f"import sys, {module}; import torch; print(sorted(m for m in sys.modules "
            "if m == 'mlx' or m.startswith('mlx.')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    if r.returncode and "No module named 'torch'" in r.stderr:
        pytest.skip("torch is not installed")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
