"""Answer extraction and grading: exact synthetic answers, math-verify equivalence."""

from __future__ import annotations

import threading

import pytest

from gkv_jax import grading, synthetic

PROBLEM = synthetic.problems(0, 1)[0]


def test_synthetic_exact_match():
    assert grading.grade("synthetic", PROBLEM.completion, PROBLEM.answer)
    assert grading.extract("synthetic", PROBLEM.completion) == PROBLEM.answer
    wrong = f"{(int(PROBLEM.answer) + 1) % 100:02d}"
    assert not grading.grade("synthetic", f"ans {wrong}\n", PROBLEM.answer)


@pytest.mark.parametrize("text", ["", "no answer here", "ans 1", "ans 1a", "ans 123", "ans ", None,
                                  "\x00\xff garbage ans"])
def test_synthetic_empty_or_garbage_is_wrong(text):
    assert grading.extract("synthetic", text) is None
    assert not grading.grade("synthetic", text, PROBLEM.answer)


def test_synthetic_last_answer_wins():
    assert grading.extract("synthetic", "ans 11\n... ans 22\n") == "22"


@pytest.mark.parametrize("prediction, gold", [
    ("\\boxed{\\frac{1}{2}}", "0.5"),
    ("\\boxed{0.5}", "\\frac{1}{2}"),
    ("so the answer is $\\boxed{\\dfrac{14}{3}}$.", "\\frac{14}{3}"),
    ("\\boxed{204}", "204"),
    ("\\boxed{x = 5}", "5"),
    ("\\boxed{(3, \\pi/2)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("\\boxed{\\{2, 1\\}}", "\\{1,2\\}"),
    ("\\boxed {1+x^2}", "x^2+1"),
])
def test_math_equivalent_forms_are_right(prediction, gold):
    assert grading.grade("math", prediction, gold)


@pytest.mark.parametrize("prediction", [
    "\\boxed{205}",              # wrong
    "204",                       # right number, but not boxed
    "",                          # empty
    None,
    "\\boxed{}",                 # empty box
    "\\boxed{}{}\\frac{",        # unparseable
    "\\boxed{204",               # never closed
    "\\boxed{\\frac{1}{2}} \\boxed{7}",  # the last box is the answer
])
def test_math_wrong_unparseable_and_empty_are_wrong(prediction):
    assert grading.grade("math", prediction, "204") is False


def test_math_nested_braces_and_last_box():
    text = "first \\boxed{1} then \\boxed{\\frac{\\sqrt{3}}{2}} and \\boxed{"
    assert grading.extract("math", text) == "\\frac{\\sqrt{3}}{2}"
    assert grading.grade("math", text, "\\frac{\\sqrt 3}{2}")
    assert not grading.grade("math", text, "1")
    assert grading.extract("math", "\\boxed{\\{1, \\}2\\}}") == "\\{1, \\}2\\}"
    assert grading.extract("math", "no box") is None


def test_math_bad_gold_never_raises():
    assert grading.grade("math", "\\boxed{3}", "") is False
    assert grading.grade("math", "\\boxed{3}", "}{") is False


def test_math_grading_works_off_the_main_thread():
    results = []
    worker = threading.Thread(
        target=lambda: results.append(grading.grade("math", "\\boxed{0.5}", "\\frac12")))
    worker.start()
    worker.join()
    assert results == [True]


def test_unknown_kind_raises():
    with pytest.raises(ValueError, match="kind must be one of"):
        grading.grade("chess", "e4", "e4")
