"""Griffe extensions for the API reference (mkdocs.yml: the python handler's `extensions`).

* `MappedPackages`: `pyproject.toml` maps `models/`, `conversion/` and `pallas_kernels/` (at
  the top of the repository) to `gkv_jax.models`, `gkv_jax.conversion` and
  `gkv_jax.pallas_kernels`. Griffe reads `gkv_jax/` from the source without importing it, so
  it would not find them; this visits those folders as members of `gkv_jax` while the package
  is visited, so that `::: gkv_jax.models` and the aliases to them resolve.
* `FencedDoctests`: the docstrings' doctest examples (`>>>` lines and their output, run by
  `pytest --doctest-modules`) are shown as code blocks, not read as markdown (where
  `[[1.0, 0.0]]` would be a link).
"""

from __future__ import annotations

from pathlib import Path

import griffe

REPO = Path(__file__).resolve().parents[2]
MAPPED = {"models": REPO / "models", "conversion": REPO / "conversion",
          "pallas_kernels": REPO / "pallas_kernels"}


def _visit(name: str, path: Path, parent: griffe.Module, agent: griffe.Visitor) -> griffe.Module:
    """Visits one module file, or a package folder and every module below it."""
    filepath = path / "__init__.py" if path.is_dir() else path
    module = griffe.visit(name, filepath, filepath.read_text(encoding="utf-8"),
                          extensions=agent.extensions, parent=parent,
                          docstring_parser=agent.docstring_parser,
                          docstring_options=agent.docstring_options,
                          lines_collection=agent.lines_collection,
                          modules_collection=agent.modules_collection)
    if path.is_dir():
        for child in sorted(path.iterdir()):
            if child.name == "__init__.py":
                continue
            if child.suffix == ".py" or (child.is_dir() and (child / "__init__.py").is_file()):
                module.set_member(child.stem, _visit(child.stem, child, module, agent))
    return module


class MappedPackages(griffe.Extension):
    """Adds the mapped folders to `gkv_jax` while it is visited."""

    def on_module_members(self, *, mod: griffe.Module, agent: griffe.Visitor, **kwargs) -> None:
        if mod.path != "gkv_jax":
            return
        for name, path in MAPPED.items():
            mod.set_member(name, _visit(name, path, mod, agent))


def fence_doctests(text: str) -> str:
    """Wraps every run of doctest lines (`>>>`, `...` and the output up to a blank line) that
    is not already in a code block in a ```` ```pycon ```` fence, at the run's indentation."""
    out: list[str] = []
    lines = text.split("\n")
    fenced = False
    i = 0
    while i < len(lines):
        line = lines[i]
        stripped = line.lstrip()
        if stripped.startswith("```"):
            fenced = not fenced
        if fenced or not stripped.startswith(">>>"):
            out.append(line)
            i += 1
            continue
        indent = line[:len(line) - len(stripped)]
        out.append(f"{indent}```pycon")
        while i < len(lines) and lines[i].strip():
            out.append(lines[i])
            i += 1
        out.append(f"{indent}```")
    return "\n".join(out)


class FencedDoctests(griffe.Extension):
    """Shows doctest examples as code."""

    def on_instance(self, *, obj: griffe.Object, **kwargs) -> None:
        if obj.docstring is not None and ">>>" in obj.docstring.value:
            obj.docstring.value = fence_doctests(obj.docstring.value)
