"""Answer extraction and grading: exact for the synthetic task, `math-verify` for math.

    >>> grade("synthetic", "00 A4 56\\nans 56\\n", "56")
    True
    >>> extract("math", "so x = \\\\boxed{\\\\frac{1}{2}} ... no, \\\\boxed{3}")
    '3'

A math prediction is the content of the LAST `\\boxed{...}` of the generated text (braces
balanced, escaped braces `\\{`, `\\}` skipped); it is checked against the gold answer with
`math_verify.verify`, both sides parsed by `math_verify.parse` from `\\boxed{...}` (the gold
falls back to `$...$`). Wrong, unparseable and empty answers grade False; grading never
raises on a prediction or a gold answer.
"""

from __future__ import annotations

import logging
import re
import threading

from gkv_jax import synthetic

KINDS = ("synthetic", "math")
# `\boxed{` and `\fbox{` openings (a space before the brace is allowed).
_BOX_OPENING = re.compile(r"\\(?:boxed|fbox)\s*\{")
# math-verify's parse and verify time out through signal.alarm, which only the main thread
# may use; elsewhere they run without a timeout.
MATH_VERIFY_TIMEOUT_SECONDS = 5

logger = logging.getLogger(__name__)


def extract(kind: str, text: str | None) -> str | None:
    """The answer a prediction gives, or None if it gives none.

    Args:
      kind: "synthetic" (the 2 digits after the last `ans `) or "math" (the content of the
        last complete `\\boxed{...}`).
      text: the generated text.
    """
    _check_kind(kind)
    if not isinstance(text, str):
        return None
    if kind == "synthetic":
        return synthetic.extract_answer(text)
    return last_boxed(text)


def grade(kind: str, prediction_text: str | None, answer: str) -> bool:
    """Whether the generated text answers `answer`; False for a missing or unparseable answer.

    Args:
      kind: "synthetic" (exact match of the extracted digits) or "math" (`math-verify`
        equivalence of the last `\\boxed{}` with the gold answer).
      prediction_text: the generated text (the whole completion, not the extracted answer).
      answer: the gold answer.
    """
    prediction = extract(kind, prediction_text)
    if prediction is None or not isinstance(answer, str):
        return False
    if kind == "synthetic":
        return prediction == answer
    return math_equal(answer, prediction)


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`) whose braces close.

    An unclosed last box (a generation cut off inside it) is skipped in favour of the
    previous complete one.

        >>> last_boxed("\\\\boxed{\\\\frac{1}{\\\\sqrt{2}}}")
        '\\\\frac{1}{\\\\sqrt{2}}'
        >>> last_boxed("\\\\boxed{1} then \\\\boxed{2")
        '1'
    """
    for match in reversed(list(_BOX_OPENING.finditer(text))):
        end = _closing_brace(text, match.end())
        if end is not None:
            return text[match.end():end]
    return None


def _closing_brace(text: str, start: int) -> int | None:
    """Index of the `}` closing the group opened just before `start`, or None."""
    depth, i = 1, start
    while i < len(text):
        character = text[i]
        if character == "\\":
            i += 2  # an escaped character, e.g. \{ or \}, never opens or closes a group
            continue
        if character == "{":
            depth += 1
        elif character == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def math_equal(gold: str, prediction: str) -> bool:
    """`math-verify` equivalence of a gold answer and an extracted prediction (LaTeX)."""
    if not gold.strip() or not prediction.strip():
        return False
    from math_verify import parse, verify
    from math_verify.errors import TimeoutException  # a BaseException

    timeout = _timeout_seconds()
    try:
        gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=timeout)
        if not gold_parsed:
            gold_parsed = parse(f"${gold}$", parsing_timeout=timeout)
        predicted = parse(f"\\boxed{{{prediction}}}", parsing_timeout=timeout)
        if not gold_parsed or not predicted:
            return False
        return bool(verify(gold_parsed, predicted, timeout_seconds=timeout))
    except (Exception, TimeoutException):  # a prediction must never crash an evaluation
        logger.debug("math-verify failed on gold %r, prediction %r", gold, prediction,
                     exc_info=True)
        return False


def _timeout_seconds() -> int | None:
    if threading.current_thread() is threading.main_thread():
        return MATH_VERIFY_TIMEOUT_SECONDS
    return None


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
