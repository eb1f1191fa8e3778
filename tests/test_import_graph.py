"""The package's import graph has no cycle (a walk of the sources with `ast`, no JAX).

Module-level and function-level imports both count: a lazy import inside a function hides a
cycle from Python, not from the design. Layers: `gkv_jax.pallas_kernels` (the ops) imports
nothing above it; `gkv_jax.policies` builds on the ops; `gkv_jax.eviction` on both.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def package_dirs() -> dict[str, Path]:
    """Top-level package name -> folder, as pyproject.toml maps them (`gkv_jax.models` lives
    in models/ and so on)."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {name: REPO / folder for name, folder in setuptools["package-dir"].items()}


def module_files() -> dict[str, Path]:
    """Every module of the installed package: dotted name -> source file."""
    modules = {}
    dirs = package_dirs()
    for package, folder in dirs.items():
        for path in folder.rglob("*.py"):
            relative = path.relative_to(folder).with_suffix("")
            parts = list(relative.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            name = ".".join([package, *parts])
            # A mapped sub-package (gkv_jax.models) is listed under its own mapping.
            if not any(other != package and other.startswith(package + ".")
                       and name.startswith(other) for other in dirs):
                modules[name] = path
    return modules


def imported_modules(path: Path, module: str, modules: set[str]) -> set[str]:
    """The package's modules that `module` imports anywhere in its file: `import a.b` and
    `from a import b` count a.b when it is a module, else a (relative imports resolved).
    Importing a submodule also runs its parents' __init__, but a parent is already being
    imported then (that is how Python reaches the submodule), so that implicit edge is left
    out."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:
                    found.add(f"{base}.{alias.name}")
                elif base in modules:
                    found.add(base)
    found.discard(module)
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports."""
    modules = module_files()
    return {module: imported_modules(path, module, set(modules))
            for module, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None (iterative depth-first search)."""
    state = {}  # module -> "open" while on the path, "done" once explored
    for root in sorted(graph):
        if root in state:
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = "open"
        while stack:
            child = next(stack[-1], None)
            if child is None:
                state[path.pop()] = "done"
                stack.pop()
            elif state.get(child) == "open":
                return path[path.index(child):] + [child]
            elif child not in state:
                state[child] = "open"
                path.append(child)
                stack.append(iter(sorted(graph[child])))
    return None


def test_the_graph_covers_the_mapped_folders():
    graph = import_graph()
    for module in ("gkv_jax.eviction", "gkv_jax.models.transformer", "gkv_jax.conversion",
                   "gkv_jax.pallas_kernels.score_update.reference", "gkv_jax.policies.builtin"):
        assert module in graph, module
    assert "gkv_jax.pallas_kernels.ops" in graph["gkv_jax.eviction"]


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_kernels_import_nothing_above_them():
    above = [(module, name) for module, edges in import_graph().items()
             if module.startswith("gkv_jax.pallas_kernels")
             for name in edges if not name.startswith("gkv_jax.pallas_kernels")]
    assert above == []
