"""Citations: every `docs/*.md` the README, docstrings and pages cite exists, and nothing
cites the algorithm page by its old name (a file walk, no JAX)."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SKIPPED_DIRS = {".git", "__pycache__", ".pytest_cache", ".ruff_cache", "build", "dist", "runs",
                ".venv", ".whl", ".gl"}
TEXT_SUFFIXES = {".py", ".md", ".toml", ".sh", ".ipynb", ".txt", ".cfg"}
OLD_NAME = "gkv-" + "algorithm.md"  # split so that this file does not cite it
DOCS_PATH = re.compile(r"docs/[A-Za-z0-9_.-]+\.md")


def text_files():
    for path in REPO.rglob("*"):
        parts = set(path.relative_to(REPO).parts)
        if (path.is_file() and path.suffix in TEXT_SUFFIXES and not parts & SKIPPED_DIRS
                and not any(p.endswith(".egg-info") for p in parts)):
            yield path


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
