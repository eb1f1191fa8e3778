"""The table-walk task: the rule, line by line, and the properties the task promises."""

from __future__ import annotations

import random
import re

import pytest

from gkv_jax import synthetic

PROBLEMS = synthetic.problems(11, 100)
LINE = re.compile(r"(\d\d) ([A-J]) (\d) (\d)(\d)")


def parse_table(prompt: str) -> dict[str, int]:
    entries = prompt.split("\n")[0].split(" ")
    assert sorted(e[0] for e in entries) == list(synthetic.KEYS)
    return {e[0]: int(e[1]) for e in entries}


@pytest.mark.parametrize("problem", PROBLEMS[:20])
def test_every_line_follows_the_rule(problem):
    table = parse_table(problem.prompt)
    start = problem.prompt.split("\n")[1]
    assert re.fullmatch(r"s \d\d", start)
    state = (int(start[2]), int(start[3]))
    lines = problem.completion.split("\n")
    assert len(lines) == synthetic.NUM_STEPS + 2 and lines[-1] == ""
    for i, line in enumerate(lines[:synthetic.NUM_STEPS]):
        step, key, value, a, b = LINE.fullmatch(line).groups()
        assert int(step) == i and key == "ABC"[i % 3] and int(value) == table[key]
        state = (state[1], (state[0] + table[key]) % 10)
        assert (int(a), int(b)) == state
    assert lines[synthetic.NUM_STEPS] == f"ans {state[0]}{state[1]}" == f"ans {problem.answer}"


def test_walks_never_repeat_a_state_at_the_same_phase_so_traces_are_not_periodic():
    for problem in PROBLEMS:
        lines = problem.completion.split("\n")[:synthetic.NUM_STEPS]
        phases = [(int(line[:2]) % 3, line[7:9]) for line in lines]  # (step mod 3, state)
        assert len(set(phases)) == len(phases)
    assert synthetic.walk_repeats((0,) * 10, (0, 0), 4)  # 00 forever: repeats at step 3
    assert not synthetic.walk_repeats((0,) * 10, (0, 0), 3)
    assert not synthetic.walk_repeats((0,) * 10, (0, 0), 10, period=10)
    assert sum(synthetic.walk_repeats((1,) * 10, (0, 0), n) for n in range(1, 100)) > 0


def test_sizes_and_prompt_share():
    tokenizer = synthetic.build_tokenizer()
    for problem in PROBLEMS[:10]:
        prompt = len(tokenizer(problem.prompt)["input_ids"])  # the tokenizer adds BOS
        completion = len(tokenizer(problem.completion, add_special_tokens=False)[
            "input_ids"]) + 1  # with EOS
        assert (prompt, completion) == (36, 508)
        assert prompt <= (prompt + completion) / 4
        trace = problem.completion[:problem.completion.rindex("ans")]
        assert 300 <= len(tokenizer(trace, add_special_tokens=False)["input_ids"]) <= 600


def test_three_entries_are_re_read_periodically_and_long_after_the_prompt():
    """Entry K of A-C is read at lines K, K + 3, ...: every 30 tokens, the last time 470+
    tokens after the prompt; D-J never. The answer depends on every read entry."""
    for problem in PROBLEMS[:10]:
        lines = problem.completion.split("\n")[:synthetic.NUM_STEPS]
        reads = {key: [i for i, line in enumerate(lines) if line[3] == key]
                 for key in synthetic.KEYS}
        assert [reads[key] for key in "ABC"] == [list(range(k, synthetic.NUM_STEPS, 3))
                                                 for k in range(3)]
        assert not any(reads[key] for key in "DEFGHIJ")
        assert min(reads[key][-1] + 1 for key in "ABC") * 10 >= 470
    problem = PROBLEMS[0]
    for digit in range(10):  # changing a read entry changes the answer, an unread one not
        table = list(problem.table)
        table[digit] = (table[digit] + 1) % 10
        changed = synthetic.Problem(tuple(table), problem.order, problem.start)
        assert (changed.answer != problem.answer) == (digit < 3)


def test_period_and_num_steps_are_checked():
    with pytest.raises(ValueError, match=r"period must be in \[1, 10\]"):
        synthetic.sample_problem(random.Random(0), period=11)
    assert all(p.period == 10 for p in synthetic.problems(1, 3, period=10))


def test_compact_lines_write_the_entry_as_in_the_prompt():
    """The earlier training phases' layout: "ii Kv ab" (the task writes "ii K v ab")."""
    spaced, compact = synthetic.problems(2, 1)[0], synthetic.problems(2, 1, compact=True)[0]
    assert compact.answer == spaced.answer
    assert compact.completion == re.sub(r"^(\d\d [A-J]) ", r"\1", spaced.completion,
                                        flags=re.M)
    assert re.match(r"00 A\d \d\d\n", compact.completion)


def test_seeds_are_deterministic_and_differ():
    assert synthetic.problems(5, 3) == synthetic.problems(5, 3)
    assert synthetic.problems(5, 3) != synthetic.problems(6, 3)
    assert len({p.answer for p in PROBLEMS}) > 30
    with pytest.raises(ValueError, match=r"num_steps must be in \[1, 99\]"):
        synthetic.sample_problem(random.Random(0), num_steps=0)


def test_tokenizer_is_one_token_per_character():
    tokenizer = synthetic.build_tokenizer()
    text = PROBLEMS[0].prompt + PROBLEMS[0].completion
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tokenizer.decode(ids) == text
    assert tokenizer(text)["input_ids"] == [tokenizer.bos_token_id] + ids
    assert tokenizer.unk_token_id not in ids


def test_grade():
    problem = PROBLEMS[0]
    assert synthetic.grade(problem.completion, problem.answer)
    assert not synthetic.grade(problem.completion[:-3], problem.answer)
    assert synthetic.extract_answer("ans 123\n") is None


CHAINED = synthetic.problems(13, 60, lookup="chained")


@pytest.mark.parametrize("problem", CHAINED[:10])
def test_chained_lines_read_the_entry_the_previous_state_names(problem):
    table = parse_table(problem.prompt)
    start = problem.prompt.split("\n")[1]
    state = (int(start[2]), int(start[3]))
    lines = problem.completion.split("\n")
    for i, line in enumerate(lines[:synthetic.NUM_STEPS]):
        step, key, value, a, b = LINE.fullmatch(line).groups()
        assert int(step) == i and key == synthetic.KEYS[state[1]]
        assert int(value) == table[key]
        state = (state[1], (state[0] + table[key]) % 10)
        assert (int(a), int(b)) == state
    assert lines[synthetic.NUM_STEPS] == f"ans {problem.answer}"


def test_chained_walks_need_the_whole_table_and_never_revisit_a_state():
    """A chained walk's 50 lines start from 50 distinct states (its step is a bijection of
    the 100 states, so a revisit would make the rest periodic), reads all ten entries, and
    its answer depends on each of them."""
    for problem in CHAINED:
        states = problem.states()[:-1]
        assert len(set(states)) == len(states) == synthetic.NUM_STEPS
        lines = problem.completion.split("\n")[:synthetic.NUM_STEPS]
        assert {line[3] for line in lines} == set(synthetic.KEYS)
    problem = CHAINED[0]
    changed = 0
    for digit in range(10):
        table = list(problem.table)
        table[digit] = (table[digit] + 1) % 10
        other = synthetic.Problem(tuple(table), problem.order, problem.start, lookup="chained")
        changed += other.answer != problem.answer
    assert changed == 10
    assert synthetic.walk_repeats((0,) * 10, (0, 0), 2, lookup="chained")  # 00 -> 00
    with pytest.raises(ValueError, match="lookup must be one of"):
        synthetic.sample_problem(random.Random(0), lookup="random")
