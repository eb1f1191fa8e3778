"""Evaluation datasets: the held-out synthetic problems and the shipped math benchmarks.

    >>> examples = load_dataset("aime24", num_problems=2)
    >>> [e.id for e in examples], examples[0].answer, examples[0].kind
    (['aime24-0', 'aime24-1'], '204', 'math')

Names: "synthetic" (held-out table-walk problems, `gkv_jax.synthetic.problems(seed, n)`,
200 by default), "synthetic-chain" (the chained walk of the second bundled model,
`synthetic.problems(seed, n, lookup="chained")`, 200 by default), and the math sets
shipped in `gkv_jax/assets/data/math/`: "aime24" (30), "aime25" (30), "amc23" (40),
"math500" (500). Any other path to a JSON-lines file with a `question` and an `answer`
string per line is loaded as a math set.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os

from gkv_jax import synthetic

SYNTHETIC = "synthetic"
SYNTHETIC_CHAIN = "synthetic-chain"
# synthetic dataset name -> the walk's `lookup`
SYNTHETIC_LOOKUPS = {SYNTHETIC: "periodic", SYNTHETIC_CHAIN: "chained"}
MATH_DATASETS = ("aime24", "aime25", "amc23", "math500")
DATASETS = (SYNTHETIC, SYNTHETIC_CHAIN, *MATH_DATASETS)
DEFAULT_SYNTHETIC_PROBLEMS = 200
HELD_OUT_SEED = 0  # the training script never trains on synthetic.problems(0, n)


@dataclasses.dataclass(frozen=True)
class Example:
    """One evaluation problem.

    Attributes:
      id: unique within its dataset, e.g. "aime24-0" or "synthetic-17".
      question: the problem statement (the synthetic prompt, or the math question).
      answer: the gold answer (2 digits, or LaTeX).
      kind: "synthetic" (graded exactly) or "math" (graded with math-verify).
    """

    id: str
    question: str
    answer: str
    kind: str


def dataset_path(name: str) -> str:
    """The shipped JSON-lines file of a math dataset name."""
    if name not in MATH_DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    resource = importlib.resources.files("gkv_jax") / "assets" / "data" / "math" / f"{name}.jsonl"
    return str(resource)


def load_dataset(name_or_path: str, num_problems: int | None = None,
                 seed: int = HELD_OUT_SEED) -> list[Example]:
    """The first `num_problems` examples of a named dataset or a JSON-lines file.

    Args:
      name_or_path: "synthetic", "synthetic-chain", "aime24", "aime25", "amc23",
        "math500", or a path to a `.jsonl` file with a `question` and an `answer` per line.
      num_problems: how many (None = all; synthetic: 200). For a file, at most its size.
      seed: synthetic only, the problem generator's seed (0 = the held-out problems).

    Raises:
      ValueError: an unknown name (listing the valid ones), num_problems < 1 or above the
        file's size, or a malformed or non-UTF-8 line (naming the file and its 1-based line
        number).
      FileNotFoundError: a `.jsonl` path that does not exist.
    """
    if num_problems is not None and (isinstance(num_problems, bool)
                                     or not isinstance(num_problems, int) or num_problems < 1):
        raise ValueError(f"num_problems must be an integer >= 1 or None, got {num_problems!r}")
    if name_or_path in SYNTHETIC_LOOKUPS:
        return synthetic_examples(num_problems or DEFAULT_SYNTHETIC_PROBLEMS, seed,
                                  name=name_or_path)
    if name_or_path in MATH_DATASETS:
        path, prefix = dataset_path(name_or_path), name_or_path
    elif os.path.isfile(name_or_path):
        path, prefix = name_or_path, _stem(name_or_path)
    elif str(name_or_path).endswith(".jsonl"):
        raise FileNotFoundError(f"dataset file {name_or_path} does not exist")
    else:
        raise ValueError(f"dataset must be one of {DATASETS} or a path to a .jsonl file, "
                         f"got {name_or_path!r}")
    examples = read_jsonl(path, prefix)
    if num_problems is None:
        return examples
    if num_problems > len(examples):
        raise ValueError(f"num_problems: {path} has {len(examples)} problems, "
                         f"{num_problems} asked")
    return examples[:num_problems]


def synthetic_examples(count: int, seed: int = HELD_OUT_SEED, name: str = SYNTHETIC
                       ) -> list[Example]:
    """`count` table-walk problems of the synthetic dataset `name` as examples (the first n
    of any count agree)."""
    problems = synthetic.problems(seed, count, lookup=SYNTHETIC_LOOKUPS[name])
    return [Example(id=f"{name}-{i}", question=p.prompt, answer=p.answer, kind=SYNTHETIC)
            for i, p in enumerate(problems)]


def read_jsonl(path: str, prefix: str) -> list[Example]:
    """Math examples from a JSON-lines file; blank lines are skipped.

    Ids are `{prefix}-{index}` (0-based, in file order). The file must be UTF-8 (a
    leading byte-order mark is allowed); other bytes raise ValueError naming the line.
    """
    examples = []
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, start=1):
            line = _decode_line(raw, path, line_number)
            if not line.strip():
                continue
            question, answer = _parse_line(line, path, line_number)
            examples.append(Example(id=f"{prefix}-{len(examples)}", question=question,
                                    answer=answer, kind="math"))
    if not examples:
        raise ValueError(f"{path}: no problems in the file")
    return examples


# Byte-order marks of the encodings a text editor may have saved the file in instead.
_OTHER_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
               (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"))


def _decode_line(raw: bytes, path: str, line_number: int) -> str:
    if line_number == 1:
        for bom, encoding in _OTHER_BOMS:
            if raw.startswith(bom):
                raise ValueError(f"{path}, line 1: the file is {encoding}, not UTF-8; "
                                 "save it as UTF-8")
    try:
        return raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}, line {line_number}: not valid UTF-8 (byte "
                         f"0x{raw[err.start]:02x} at column {err.start + 1}); save the file "
                         "as UTF-8") from None


def _parse_line(line: str, path: str, line_number: int) -> tuple[str, str]:
    where = f"{path}, line {line_number}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: invalid JSON ({err.msg})") from None
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object with 'question' and 'answer'")
    for key in ("question", "answer"):
        if key not in row:
            raise ValueError(f"{where}: missing key {key!r}")
    question, answer = row["question"], row["answer"]
    if not isinstance(question, str) or not question.strip():
        raise ValueError(f"{where}: 'question' must be a non-empty string, got {question!r:.40}")
    if isinstance(answer, int | float) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str):
        raise ValueError(f"{where}: 'answer' must be a string or a number, got {answer!r:.40}")
    return question, answer


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0]
