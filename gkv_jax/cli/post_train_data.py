"""The training examples of `gkv-jax post-train`: synthetic table-walk problems (none of them
held out for evaluation) and JSON-lines files of prompt/completion pairs, every bad line
named by file and line number.
"""

from __future__ import annotations

import json

from gkv_jax.cli.args import CommandError

SYNTHETIC_TRAIN_SEED = 1  # training problems; seed 0 is the held-out set
VALIDATION_SEED = 2       # --select-problems' problems: neither trained on nor held out


def synthetic_pairs(tokenizer, count: int, seed: int = SYNTHETIC_TRAIN_SEED,
                    lookup: str = "periodic") -> list[tuple[list[int], list[int]]]:
    """(BOS + prompt, trace + answer + EOS) token ids of `count` table-walk problems
    (`lookup`: "periodic", the "synthetic" dataset, or "chained", "synthetic-chain") drawn
    from `seed`, none of them among the held-out problems."""
    from gkv_jax import synthetic
    from gkv_jax.datasets import HELD_OUT_SEED

    if seed == HELD_OUT_SEED:
        raise ValueError(f"seed: {HELD_OUT_SEED} draws the held-out problems; train on another")
    held_out = {(p.table, p.order, p.start)
                for p in synthetic.problems(HELD_OUT_SEED, 1000, lookup=lookup)}
    pairs: list[tuple[list[int], list[int]]] = []
    draw = 0
    while len(pairs) < count:
        for problem in synthetic.problems(seed + 7919 * draw, 2 * count, lookup=lookup):
            if (problem.table, problem.order, problem.start) in held_out:
                continue
            # explicit BOS / EOS around the bare characters, whatever the tokenizer adds
            bare = {k: tokenizer(getattr(problem, k), add_special_tokens=False)["input_ids"]
                    for k in ("prompt", "completion")}
            prompt = [tokenizer.bos_token_id] + bare["prompt"]
            completion = bare["completion"] + [tokenizer.eos_token_id]
            pairs.append((prompt, completion))
            if len(pairs) == count:
                break
        draw += 1
    return pairs


def _jsonl_pairs(path: str, tokenizer, count: int | None):
    """(prompt, completion) pairs of a JSON-lines file: `prompt_ids` / `completion_ids`
    lists, or `prompt` / `completion` texts (tokenized with the model's tokenizer), and the
    line number of each."""
    pairs, line_numbers = [], []
    for number, line in _numbered_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"--dataset: {path} line {number} is not JSON ({err})") from None
        if isinstance(row, dict) and "prompt_ids" in row and "completion_ids" in row:
            pairs.append((row["prompt_ids"], row["completion_ids"]))
        elif isinstance(row, dict) and "prompt" in row and "completion" in row:
            # the prompt gets the tokenizer's special tokens (BOS), the continuation none
            pairs.append((tokenizer(row["prompt"])["input_ids"],
                          tokenizer(row["completion"], add_special_tokens=False)["input_ids"]))
        else:
            raise ValueError(f"--dataset: {path} line {number} needs a JSON object with "
                             f"prompt/completion (texts) or prompt_ids/completion_ids")
        line_numbers.append(number)
        if count is not None and len(pairs) == count:
            break
    return pairs, line_numbers


def _numbered_lines(path: str):
    """(1-based number, text) of each line of a UTF-8 file; bad bytes named by file and line
    (decoded line by line: a text stream decodes ahead, in chunks)."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise CommandError(f"--dataset: {path} line {number} is not UTF-8 text "
                                   f"({err})") from None
