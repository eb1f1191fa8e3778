"""The documentation: the README and the site built from `docs/` (mkdocs.yml).

Fast (a file walk, no JAX): every `docs/*.md` that a file cites exists; nothing cites the
algorithm page by its old name; the README stays a short front door whose first code block is
the two set-up commands `.ci/run` reads; every name of `gkv_jax.__all__` and every public
sub-package has its `::: gkv_jax...` block in the API reference; no page cites a path outside
the repository; every Python block parses and every skipped one says why.

Slow: every Python block of the README and of `docs/` runs (the blocks of one page in order,
sharing a namespace, in a scratch directory); `mkdocs build --strict` builds the site (a
broken link or anchor, or an API symbol that does not exist, fails it); headless Chromium
renders the home page and the API page of `generate`.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
SKIPPED_DIRS = {".git", "__pycache__", ".pytest_cache", ".ruff_cache", "build", "dist", "runs",
                ".venv", ".whl", ".gl", "site"}
TEXT_SUFFIXES = {".py", ".md", ".toml", ".sh", ".ipynb", ".txt", ".cfg", ".yml"}
OLD_NAME = "gkv-" + "algorithm.md"  # split so that this file does not cite it
DOCS_PATH = re.compile(r"docs/[A-Za-z0-9_./-]+\.md")
README_MAX_LINES = 200
SETUP_COMMANDS = ['pip install -e . && gkv-jax demo',
                  'pip install -e ".[test]" && pytest -m "not slow" -q -n 2']


def text_files():
    for path in REPO.rglob("*"):
        parts = set(path.relative_to(REPO).parts)
        if (path.is_file() and path.suffix in TEXT_SUFFIXES and not parts & SKIPPED_DIRS
                and not any(p.endswith(".egg-info") for p in parts)):
            yield path


def pages() -> list[Path]:
    """What users read: the README, benchmarks/RESULTS.md and every page of the site."""
    return [REPO / "README.md", REPO / "benchmarks" / "RESULTS.md",
            *sorted(DOCS.rglob("*.md"))]


def test_no_file_cites_the_old_algorithm_page():
    citing = [str(p.relative_to(REPO)) for p in text_files()
              if OLD_NAME in p.read_text(errors="replace")]
    assert citing == [], f"cite docs/algorithm.md instead of {OLD_NAME} in {citing}"


def test_every_cited_docs_page_exists():
    missing = {}
    for path in text_files():
        for cited in set(DOCS_PATH.findall(path.read_text(errors="replace"))):
            if not (REPO / cited).is_file():
                missing.setdefault(cited, []).append(str(path.relative_to(REPO)))
    assert missing == {}
    assert (REPO / "docs" / "algorithm.md").is_file()


# --------------------------------------------------------------------------------- README


def test_readme_is_a_short_front_door():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= README_MAX_LINES
    # .ci/run reads the two set-up commands from the first lines of the first ```bash block.
    first_block = readme.split("```bash\n", 1)[1].split("\n```", 1)[0].splitlines()
    assert first_block[:2] == SETUP_COMMANDS
    assert readme.index("```bash") < readme.index("```python")


# ------------------------------------------------------------------------ links and paths

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
OUTSIDE = re.compile(r"(?<![\w.~-])(?:/(?:work|home|Users|root|mnt|shared|srv|opt|scratch)/"
                     r"|\.\./shared\b|file://)")


def test_no_page_cites_a_path_outside_the_repository():
    """Links resolve inside the repository (and, outside the site, to a file that exists:
    mkdocs checks the site's own links), and no page names a machine's own directories
    (`/work/...`, `/home/...`, `../shared`). Scratch directories in recorded commands
    (`--output-dir /tmp/...`) are the commands as they ran, not citations."""
    generated = {DOCS / uri for uri in load_hook("repo_assets").ASSETS}  # added at build time
    problems = []
    for page in pages():
        text = page.read_text()
        name = str(page.relative_to(REPO))
        problems += [f"{name}: {m.group(0)!r}" for m in OUTSIDE.finditer(text)]
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            if target.startswith("/"):
                problems.append(f"{name}: absolute link {target}")
                continue
            resolved = (page.parent / target.split("#", 1)[0]).resolve()
            if not resolved.is_relative_to(REPO):
                problems.append(f"{name}: {target} leaves the repository")
            elif not resolved.exists() and resolved not in generated:
                problems.append(f"{name}: {target} does not exist")
    assert problems == []


# ------------------------------------------------------------------------- API reference

API_BLOCK = re.compile(r"^::: (gkv_jax(?:\.\w+)*)\s*$", re.MULTILINE)


def reference_blocks() -> set[str]:
    return {name for page in (DOCS / "reference").glob("*.md")
            for name in API_BLOCK.findall(page.read_text())}


def public_names() -> list[str]:
    """`gkv_jax.__all__`, read from the source (no import)."""
    tree = ast.parse((REPO / "gkv_jax" / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__"
                                                for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("gkv_jax/__init__.py has no __all__")


def public_subpackages() -> list[str]:
    """Every sub-package installed under gkv_jax: the folders of gkv_jax/ with an __init__.py
    (not the CLI, whose reference is generated from its parsers) and the folders that
    pyproject.toml maps into the namespace (models/, conversion/, pallas_kernels/)."""
    found = {f"gkv_jax.{p.parent.name}" for p in (REPO / "gkv_jax").glob("*/__init__.py")
             if p.parent.name != "cli"}
    mapped = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found |= {name for name in mapped["package-dir"] if name.count(".") == 1}
    return sorted(found)


def test_every_public_name_is_in_the_api_reference():
    blocks = reference_blocks()
    missing = [name for name in public_names() if f"gkv_jax.{name}" not in blocks]
    assert missing == [], f"add `::: gkv_jax.NAME` blocks to docs/reference/ for {missing}"
    assert len(public_names()) >= 20


def test_every_public_subpackage_is_in_the_api_reference():
    blocks = reference_blocks()
    packages = public_subpackages()
    assert {"gkv_jax.targets", "gkv_jax.models", "gkv_jax.pallas_kernels"} <= set(packages)
    assert [p for p in packages if p not in blocks] == []


def test_every_reference_page_is_in_the_nav():
    config = (REPO / "mkdocs.yml").read_text()
    for page in DOCS.rglob("*.md"):
        assert str(page.relative_to(DOCS)) in config, f"{page} is not in mkdocs.yml's nav"


# ------------------------------------------------------------------- the CLI reference hook


def load_hook(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, DOCS / "hooks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_cli_hook_walks_nested_subcommands():
    """`commands` finds every parser below the top one, sub-sub-commands included, once
    each (a toy parser: no JAX)."""
    import argparse

    hook = load_hook("cli_reference")
    parser = argparse.ArgumentParser(prog="tool")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("run", aliases=["r"])
    post = commands.add_parser("post")
    methods = post.add_subparsers(dest="method")
    methods.add_parser("distill")
    methods.add_parser("grpo")
    paths = [path for path, _ in hook.commands(parser)]
    assert paths == [(), ("run",), ("post",), ("post", "distill"), ("post", "grpo")]
    assert "<!-- cli-reference -->" in (DOCS / "reference" / "cli.md").read_text()
    assert hook.on_page_markdown("no placeholder", None, None, None) == "no placeholder"


# ---------------------------------------------------------------------------- the snippets

FENCE = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
MARKER = re.compile(r"<!-- snippet: (skip|requires [\w.]+) \((.+)\) -->\s*$")
MAX_SKIPPED = 3  # a block that cannot run is the rare exception, each with its reason


def snippets(page: Path) -> list[tuple[int, str, str | None]]:
    """(line, code, marker) of every ```python block of `page`; the marker is the HTML
    comment on the line right above the fence (`skip` or `requires MODULE`), if any."""
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        above = text[:match.start()].rstrip("\n").rsplit("\n", 1)[-1]
        marker = MARKER.match(above.strip())
        if "<!-- snippet" in above:
            assert marker, f"{page.name}:{line - 1}: a malformed snippet marker: {above!r}"
        found.append((line, match.group(1), marker.group(1) if marker else None))
    return found


def snippet_pages() -> list[Path]:
    return [page for page in pages() if snippets(page)]


def test_every_python_block_parses():
    skipped = []
    for page in snippet_pages():
        for line, code, marker in snippets(page):
            compile(code, f"{page.relative_to(REPO)}:{line}", "exec")
            if marker == "skip":
                skipped.append(f"{page.relative_to(REPO)}:{line}")
    assert len(snippet_pages()) >= 10
    assert len(skipped) <= MAX_SKIPPED, skipped


@pytest.mark.slow
@pytest.mark.parametrize("page", snippet_pages(), ids=lambda p: str(p.relative_to(REPO)))
def test_the_python_blocks_run(page, tmp_path, monkeypatch):
    """A page's blocks run in order in one namespace, as a reader runs them, in a scratch
    directory (they write `runs/...`); policies they register are unregistered after."""
    import importlib

    from gkv_jax.policies import POLICIES, unregister_policy

    monkeypatch.chdir(tmp_path)
    before = set(POLICIES)
    namespace: dict = {"__name__": "__docs__"}
    ran = 0
    try:
        for line, code, marker in snippets(page):
            if marker == "skip":
                continue
            if marker is not None:  # requires MODULE
                try:
                    importlib.import_module(marker.split()[1])
                except ImportError:
                    continue
            exec(compile(code, f"{page.relative_to(REPO)}:{line}", "exec"), namespace)
            ran += 1
    finally:
        for name in set(POLICIES) - before:
            unregister_policy(name)
    assert ran >= 1


# ----------------------------------------------------------------------------- the site


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The site, built with `mkdocs build --strict` (fails on any warning)."""
    pytest.importorskip("mkdocs", reason="the docs extra is not installed: "
                                         "pip install -e \".[docs]\"")
    pytest.importorskip("mkdocstrings")
    site_dir = tmp_path_factory.mktemp("site")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict",
                             "--site-dir", str(site_dir)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return site_dir


@pytest.mark.slow
def test_the_site_builds_strictly(site):
    assert (site / "index.html").is_file()
    api = (site / "reference" / "api" / "index.html").read_text()
    for name in public_names():
        assert f'id="gkv_jax.{name}"' in api or f"gkv_jax.{name}" in api, name
    cli = (site / "reference" / "cli" / "index.html").read_text()
    for command in ("gkv-jax generate", "gkv-jax eval", "gkv-jax demo", "gkv-jax smoke",
                    "gkv-jax plan", "gkv-jax post-train distill", "gkv-jax post-train grpo"):
        assert f"usage: {command}" in cli, command
    assert (site / "assets" / "reasoner_accuracy_vs_budget.png").is_file()


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(chromium() is None,
                    reason="headless Chromium is not installed (Debian: apt-get install chromium)")
@pytest.mark.parametrize("page, headings", [
    ("index.html", [r'<h1 id="gkv-jax"[^>]*>gkv-jax', r'<h2 id="the-pages"']),
    ("reference/api/index.html", [
        r'<h1 id="the-gkv_jax-namespace"',
        r'<h3 id="gkv_jax\.generate"[^>]*>(?:(?!</h3>).)*gkv_jax\.generate',
        r'<h3 id="gkv_jax\.GenerateOutput"']),
])
def test_chromium_renders_the_pages(site, page, headings, tmp_path):
    """The DOM headless Chromium builds from the page (after its scripts ran) shows the
    expected headings."""
    command = [chromium(), "--headless", "--no-sandbox", "--disable-gpu",
               "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}",
               "--dump-dom", (site / page).as_uri()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    dom = result.stdout
    for heading in headings:
        assert re.search(heading, dom, re.DOTALL), (heading, dom[:2000])
