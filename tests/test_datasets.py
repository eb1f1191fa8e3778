"""Evaluation datasets: shipped files, synthetic held-out problems, malformed input."""

from __future__ import annotations

import json
import os

import pytest

from gkv_jax import synthetic
from gkv_jax.datasets import DATASETS, MATH_DATASETS, dataset_path, load_dataset

ASSETS = os.path.join(os.path.dirname(__file__), "..", "gkv_jax", "assets", "data", "math")


def _line_count(path):
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


@pytest.mark.parametrize("name", MATH_DATASETS)
def test_shipped_math_dataset_loads_every_line(name):
    path = dataset_path(name)
    assert os.path.samefile(path, os.path.join(ASSETS, f"{name}.jsonl"))
    examples = load_dataset(name)
    assert len(examples) == _line_count(path)
    assert len({e.id for e in examples}) == len(examples)
    assert all(e.kind == "math" and e.question and e.answer for e in examples)
    assert len(load_dataset(name, num_problems=3)) == 3


def test_shipped_counts():
    assert {n: len(load_dataset(n)) for n in MATH_DATASETS} == {
        "aime24": 30, "aime25": 30, "amc23": 40, "math500": 500}


def test_synthetic_is_the_held_out_set():
    examples = load_dataset("synthetic")
    assert len(examples) == 200
    problems = synthetic.problems(0, 5)
    first = load_dataset("synthetic", num_problems=5)
    assert [e.question for e in first] == [p.prompt for p in problems]
    assert [e.answer for e in first] == [p.answer for p in problems]
    assert [e.question for e in examples[:5]] == [p.prompt for p in problems]
    assert all(e.kind == "synthetic" for e in first)


def test_synthetic_chain_is_the_chained_held_out_set():
    examples = load_dataset("synthetic-chain", num_problems=5)
    problems = synthetic.problems(0, 5, lookup="chained")
    assert [e.id for e in examples] == [f"synthetic-chain-{i}" for i in range(5)]
    assert [(e.question, e.answer) for e in examples] == [(p.prompt, p.answer)
                                                          for p in problems]
    assert all(e.kind == "synthetic" for e in examples)
    assert [e.question for e in examples] != [p.prompt for p in synthetic.problems(0, 5)]


def test_custom_jsonl(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"question": "1+1?", "answer": "2"}\n\n{"question": "2+2?", "answer": 4}\n')
    examples = load_dataset(str(path))
    assert [(e.id, e.answer, e.kind) for e in examples] == [("mine-0", "2", "math"),
                                                            ("mine-1", "4", "math")]


@pytest.mark.parametrize("line, message", [
    ('{"question": "q", "answer": ', "invalid JSON"),
    ('{"question": "q"}', "missing key 'answer'"),
    ('{"answer": "1"}', "missing key 'question'"),
    ('{"question": 3, "answer": "1"}', "'question' must be a non-empty string"),
    ('{"question": "q", "answer": null}', "'answer' must be a string"),
    ('["q", "a"]', "expected a JSON object"),
])
def test_malformed_line_names_file_and_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"question": "q", "answer": "1"})
    path.write_text(f"{good}\n{good}\n{line}\n{good}\n")
    with pytest.raises(ValueError, match=message) as err:
        load_dataset(str(path))
    assert f"{path}, line 3" in str(err.value)


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as err:
        load_dataset("aime2024")
    assert all(name in str(err.value) for name in DATASETS)


def test_missing_file_and_bad_counts(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_dataset(str(tmp_path / "absent.jsonl"))
    with pytest.raises(ValueError, match="num_problems"):
        load_dataset("aime24", num_problems=31)
    with pytest.raises(ValueError, match="num_problems"):
        load_dataset("synthetic", num_problems=0)


@pytest.mark.parametrize("content, line, message", [
    (b"\xff\xfe{\x00", 1, "UTF-16, not UTF-8"),
    (b'{"question": "q", "answer": "1"}\n{"question": "caf\xe9", "answer": "1"}\n', 2,
     r"not valid UTF-8 \(byte 0xe9 at column 18\)"),
])
def test_non_utf8_file_names_file_and_line(tmp_path, content, line, message):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message) as err:
        load_dataset(str(path))
    assert f"{path}, line {line}" in str(err.value)


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"question": "q", "answer": "1"}).encode())
    assert [e.question for e in load_dataset(str(path))] == ["q"]
