"""Every bad input of `tests/bad_input_cases.py` gets its clear error, and the documented
bad-input table (docs/reference/bad-inputs.md) is exactly what these cases print
(regenerate: scripts/bad_input_table.py)."""

from __future__ import annotations

import os

import pytest

from tests.bad_input_cases import (
    CASES,
    TABLE_END,
    TABLE_START,
    make_fixtures,
    observe,
    render_table,
)

PAGE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "docs", "reference",
                    "bad-inputs.md")


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    return make_fixtures(str(tmp_path_factory.mktemp("bad_inputs")))


@pytest.mark.parametrize("case", CASES, ids=[f"{c.area}:{c.shown}" for c in CASES])
def test_bad_input_gets_a_clear_error(case, fixtures):
    what, message = observe(case, fixtures)
    if case.expected is None:  # accepted, with the documented answer
        assert what == "no error", (what, message)
    elif isinstance(case.expected, int):
        assert what == f"exit {case.expected}", (what, message)
        assert message.startswith(("error:", "gkv-jax")), message
    else:
        assert what == case.expected.__name__, (what, message)
    assert case.names in message, (case.names, message)
    assert "Traceback" not in message


def test_documented_table_is_generated_from_the_cases(fixtures):
    with open(PAGE, encoding="utf-8") as f:
        page = f.read()
    assert page.count(TABLE_START) == 1 and page.count(TABLE_END) == 1
    start = page.index(TABLE_START)
    in_page = page[start:page.index(TABLE_END) + len(TABLE_END)]
    assert len(CASES) >= 25
    assert in_page == render_table(CASES, fixtures), (
        "docs/reference/bad-inputs.md's bad-input table is stale: run "
        "python scripts/bad_input_table.py")
