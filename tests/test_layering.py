"""The layering of ARCHITECTURE.md, checked on the source: ``zoo`` is a plain PyTorch library (no ``tasks``,
``bench``, Lightning or Hydra imports, at module level or inside functions), ``tasks`` does not import
``bench``, and the project's modules import each other without a cycle."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("zoo", "tasks", "bench")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _imports(path: Path, module: str, top_level_only: bool = False) -> set[str]:
    """Absolute names of every module ``path`` imports (``from a import b`` counts as ``a`` and ``a.b``)."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = tree.body if top_level_only else ast.walk(tree)
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_pkg else 0)]
                base = ".".join(anchor + ([base] if base else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module ``name`` refers to (a submodule, or the module that defines an imported symbol)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


@pytest.mark.parametrize("pkg,forbidden", [
    ("zoo", ("tasks", "bench", "lightning", "pytorch_lightning", "hydra", "omegaconf")),
    ("tasks", ("bench",)),
])
def test_package_does_not_import_upper_layers(pkg, forbidden):
    bad = []
    for mod, path in _modules().items():
        if mod.split(".")[0] != pkg:
            continue
        for name in _imports(path, mod):
            if name.split(".")[0] in forbidden:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "layering broken (see ARCHITECTURE in docs/architecture.md):\n" + "\n".join(sorted(set(bad)))


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each a cycle of imports."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
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

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def _edges(modules: dict[str, Path], top_level_only: bool) -> dict[str, set[str]]:
    edges = {}
    for mod, path in modules.items():
        targets = {_resolve(n, modules) for n in _imports(path, mod, top_level_only)}
        # a package's __init__ re-exporting its submodules, and a submodule importing its own package's
        # siblings through it, is the package's public face, not a cycle between layers
        edges[mod] = {t for t in targets if t and t != mod and not mod.startswith(t + ".")}
    return edges


def test_no_import_cycles_between_modules():
    """No cycle among module-level imports, and none through imports deferred into functions either
    (a deferred import that closes a cycle hides the same tangle)."""
    modules = _modules()
    cycles = _cycles(_edges(modules, top_level_only=False))
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_cycle_detector_finds_a_planted_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
