"""Rewrites the bad-input table of docs/reference/bad-inputs.md from
`tests/bad_input_cases.py` (run from the repository root with the test extra installed:
python scripts/bad_input_table.py)."""

from __future__ import annotations

import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join("docs", "reference", "bad-inputs.md")
sys.path.insert(0, ROOT)

# The tests' XLA flags (8 CPU host devices), so that the table is what the tests print.
import tests.conftest  # noqa: E402, F401
from tests.bad_input_cases import CASES, TABLE_END, TABLE_START, make_fixtures, render_table  # noqa: E402


def main() -> None:
    page_path = os.path.join(ROOT, PAGE)
    with open(page_path, encoding="utf-8") as f:
        page = f.read()
    if page.count(TABLE_START) != 1 or page.count(TABLE_END) != 1:
        raise SystemExit(f"{PAGE} needs exactly one {TABLE_START} ... {TABLE_END} block")
    with tempfile.TemporaryDirectory() as scratch:
        table = render_table(CASES, make_fixtures(scratch))
    start, end = page.index(TABLE_START), page.index(TABLE_END) + len(TABLE_END)
    with open(page_path, "w", encoding="utf-8") as f:
        f.write(page[:start] + table + page[end:])
    print(f"{PAGE}: bad-input table rewritten ({len(CASES)} rows)")


if __name__ == "__main__":
    main()
