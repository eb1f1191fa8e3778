"""mkdocs hook: the command-line reference, generated from the argparse parsers at build time.

`docs/reference/cli.md` holds the placeholder `<!-- cli-reference -->`; this hook replaces it
with every command's `--help` (usage, description, every flag and its default), walking
`gkv_jax.cli.build_parser()` and its sub-commands at every depth (`post-train distill`), so the
page cannot drift from the parsers. Registered under `hooks:` in mkdocs.yml.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator

PLACEHOLDER = "<!-- cli-reference -->"
HELP_WIDTH = "100"  # argparse wraps to $COLUMNS - 2: a fixed width, whatever the terminal


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
             ) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """Every (command path, parser) below `parser`, depth first, the parser itself first."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen = set()
            for name, sub in action.choices.items():
                if id(sub) not in seen:  # an alias names the same parser again
                    seen.add(id(sub))
                    yield from commands(sub, (*path, name))


def render() -> str:
    """The reference's markdown: one section per command, its help in a code block."""
    # The parsers never need an accelerator: keep JAX from probing for one (CI's environment
    # has the TPU and CUDA plugins installed by then).
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from gkv_jax.cli import build_parser  # lazily: the parsers import the library

    before = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = HELP_WIDTH
    try:
        sections = []
        for path, parser in commands(build_parser()):
            title = " ".join(("gkv-jax", *path))
            sections.append(f"## `{title}`\n\n```text\n{parser.format_help().rstrip()}\n```\n")
    finally:
        if before is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = before
    return "\n".join(sections)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if PLACEHOLDER not in markdown:
        return markdown
    return markdown.replace(PLACEHOLDER, render())
