"""Rewrites the README's bad-input table from `tests/bad_input_cases.py` (run from the
repository root with the test extra installed: python scripts/bad_input_table.py)."""

from __future__ import annotations

import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The tests' XLA flags (8 CPU host devices), so that the table is what the tests print.
import tests.conftest  # noqa: E402, F401
from tests.bad_input_cases import CASES, TABLE_END, TABLE_START, make_fixtures, render_table  # noqa: E402


def main() -> None:
    readme_path = os.path.join(ROOT, "README.md")
    with open(readme_path, encoding="utf-8") as f:
        readme = f.read()
    if readme.count(TABLE_START) != 1 or readme.count(TABLE_END) != 1:
        raise SystemExit(f"README.md needs exactly one {TABLE_START} ... {TABLE_END} block")
    with tempfile.TemporaryDirectory() as scratch:
        table = render_table(CASES, make_fixtures(scratch))
    start, end = readme.index(TABLE_START), readme.index(TABLE_END) + len(TABLE_END)
    with open(readme_path, "w", encoding="utf-8") as f:
        f.write(readme[:start] + table + readme[end:])
    print(f"README.md: bad-input table rewritten ({len(CASES)} rows)")


if __name__ == "__main__":
    main()
