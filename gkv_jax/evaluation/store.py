"""An evaluation's results store in its output directory: `results.jsonl`, one row per (config,
problem, sample), appended and flushed after each batch, and `settings.json`, the settings,
weights fingerprint and problem fingerprints a resumed run must match.

The directory is an evaluation's own: it is new or empty when an evaluation first writes
there and gets a marker file (`EVAL_MARKER`); a directory holding anything else is refused
before anything is written, so no file of the user's is ever replaced.

In a multi-process job (`gkv_jax.distributed`) only process 0 touches the directory: it
reads the files and every process gets their contents from it (`broadcast_bytes`), and it
alone writes. Every process thus sees the same rows and settings and makes the same
decisions, whether or not the directory is on a filesystem the hosts share; the reading
functions are collectives then (every process calls them, in the same order).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from gkv_jax.datasets import Example
from gkv_jax.distributed import broadcast_bytes, is_main_process

RESULTS_FILE = "results.jsonl"
SETTINGS_FILE = "settings.json"
EVAL_MARKER = ".gkv-jax-eval"  # marks a directory whose evaluation files evaluate may replace
# Settings every evaluation's settings.json holds: how a directory written before the marker
# existed is still recognised (and resumed).
_SETTINGS_KEYS = ("dataset", "max_new_tokens", "weights", "problems")


def output_dir_problem(output_dir: str) -> str | None:
    """Why `output_dir` cannot take an evaluation's files, or None: it must be new, empty,
    or an evaluation's own (its `EVAL_MARKER`, or a `settings.json` that an evaluation wrote
    before markers existed). Reads only."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        return f"output_dir: {output_dir} is a file; give a directory"
    if not os.path.isdir(output_dir) or not os.listdir(output_dir):
        return None
    if os.path.isfile(os.path.join(output_dir, EVAL_MARKER)) or _has_evaluation_settings(
            output_dir):
        return None
    return (f"output_dir: {output_dir} is not empty and is not an evaluation's output (no "
            f"{EVAL_MARKER} file); evaluate never replaces files it did not write: give a "
            f"new or empty directory, or a previous evaluation's")


def claim_output_dir(output_dir: str) -> None:
    """Makes `output_dir` an evaluation's (created, marked) after `output_dir_problem` found
    nothing against it; process 0 checks and writes, every process raises alike.

    Raises:
      ValueError: `output_dir_problem`'s reason.
    """
    problem = output_dir_problem(output_dir) if is_main_process() else None
    problem = broadcast_bytes(None if problem is None else problem.encode("utf-8"))
    if problem is not None:
        raise ValueError(problem.decode("utf-8"))
    if is_main_process():
        mark_evaluation_dir(output_dir)


def mark_evaluation_dir(output_dir: str) -> None:
    """Creates `output_dir` if needed and writes its `EVAL_MARKER` (process 0 only)."""
    if not is_main_process():
        return
    os.makedirs(output_dir, exist_ok=True)
    marker = os.path.join(output_dir, EVAL_MARKER)
    if not os.path.isfile(marker):
        with open(marker, "w", encoding="utf-8") as f:
            f.write("Written by gkv_jax.evaluate: an evaluation run into this directory "
                    "resumes from results.jsonl and replaces its own files here (summary.csv, "
                    "settings.json, the plot) and nothing else.\n")


def _has_evaluation_settings(output_dir: str) -> bool:
    try:
        with open(os.path.join(output_dir, SETTINGS_FILE), encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and all(key in saved for key in _SETTINGS_KEYS)


def row_key(row: dict[str, Any]) -> tuple[str, str, int]:
    """A results row's identity: (config description, problem id, sample)."""
    return row["config"], row["problem"], row["sample"]


def read_results(path: str) -> list[dict[str, Any]]:
    """The rows of a results file (none if it does not exist), process 0's file on every
    process.

    A last line without its newline (a write cut off by an interruption) is dropped from
    the file; any other line that is not JSON raises ValueError naming the line.
    """
    complete = None
    if is_main_process() and os.path.exists(path):
        with open(path, "rb") as f:
            data = f.read()
        complete = data[:data.rfind(b"\n") + 1]
        if len(complete) != len(data):
            with open(path, "r+b") as f:
                f.truncate(len(complete))
    complete = broadcast_bytes(complete)
    if complete is None:
        return []
    rows = []
    for line_number, line in enumerate(complete.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            reason = getattr(err, "msg", None) or f"not UTF-8: {err.reason}"
            raise ValueError(f"{path}, line {line_number}: not a results row ({reason})"
                             ) from None
    return rows


def append_results(path: str, rows: Sequence[dict[str, Any]]) -> None:
    """Appends rows as JSON lines and flushes them to disk (process 0 only)."""
    if not rows or not is_main_process():
        return
    with open(path, "a", encoding="utf-8") as f:
        f.write("".join(json.dumps(row) + "\n" for row in rows))
        f.flush()
        os.fsync(f.fileno())


def shared_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Process 0's `rows` on every process: the rows it writes, with its own timings, so
    that every process reports what the results file holds. One process: `rows`."""
    if jax.process_count() == 1:
        return rows
    return json.loads(broadcast_bytes(json.dumps(rows).encode("utf-8")).decode("utf-8"))


def check_settings(output_dir: str, settings: dict[str, Any], has_results: bool) -> None:
    """Checks that a resumed run is the run whose rows are already in `output_dir`.

    Compared with `settings.json`: every setting (dataset, max_new_tokens, sampling, prompt
    formatting, model config and dtype, weights fingerprint), and `settings["problems"]`
    (id -> fingerprint) on the problems both runs share, so an edited, reordered or
    extended dataset file cannot pass its old rows off as answers to the new problems. A
    settings.json written before fingerprints existed is refused too: its rows cannot be
    checked. Without results yet, (re)writes `settings.json`; on a resume, adds the
    fingerprints of problems it did not have (a larger num_problems). Process 0's
    `settings.json` is the one compared; process 0 alone writes.

    Raises:
      ValueError: what differs, and how to start fresh (another output_dir, or delete it).
    """
    path = os.path.join(output_dir, SETTINGS_FILE)
    settings = json.loads(json.dumps(settings))
    data = None
    if is_main_process() and os.path.exists(path):
        with open(path, "rb") as f:
            data = f.read()
    data = broadcast_bytes(data)
    if not has_results or data is None:
        _write_json(path, settings)
        return
    saved = _parse_settings(path, data)
    differing = [f"{key}: {saved[key]!r} there, {value!r} now"
                 + (" (another checkpoint, or changed weights)" if key == "weights" else "")
                 for key, value in settings.items()
                 if key != "problems" and key in saved and saved[key] != value]
    missing = [key for key in ("weights", "problems") if key in settings and key not in saved]
    if missing:
        differing.append(f"{SETTINGS_FILE} has no {' or '.join(missing)} fingerprint "
                         "(written by an older gkv-jax), so its rows cannot be checked")
    saved_problems = saved.get("problems") or {}
    problems = settings.get("problems") or {}
    changed = [pid for pid, h in problems.items() if pid in saved_problems
               and saved_problems[pid] != h]
    if changed:
        differing.append(
            f"{len(changed)} problem(s) differ from the ones answered there, first "
            f"{changed[0]!r} (an edited, reordered or replaced dataset file, or another "
            "tokenizer or prompt format)")
    if differing:
        raise ValueError(
            f"output_dir: {output_dir} holds results of another run "
            f"({'; '.join(differing)}); to start fresh, use another output_dir "
            f"(--output-dir) or delete {output_dir} yourself")
    if any(pid not in saved_problems for pid in problems):
        _write_json(path, {**saved, "problems": {**saved_problems, **problems}})


def weights_fingerprint(model) -> str:
    """A short hash of a model's parameters: each weight's name, shape, dtype and two
    checksums of its bits (a plain and a position-weighted sum, modulo 2**32).

    Integer sums of the bits are exact and order-free, so the fingerprint is the same on
    every backend and sharding; they are computed where the weights live, and only two
    numbers per weight come back to the host.
    """
    params = model.params()
    checksums = jax.device_get(_bit_checksums(params))
    parts = [f"{jax.tree_util.keystr(path)} {tuple(leaf.shape)} {jnp.dtype(leaf.dtype).name} "
             f"{' '.join(str(int(c)) for c in sums)}"
             for (path, leaf), sums in zip(jax.tree_util.tree_leaves_with_path(params),
                                           jax.tree.leaves(checksums, is_leaf=_is_pair),
                                           strict=True)]
    return _hash("\n".join(sorted(parts)))


def problem_fingerprints(examples: Sequence[Example],
                         prompts: Sequence[Sequence[int]]) -> dict[str, str]:
    """id -> short hash of the problem's kind, question, answer and prompt token ids."""
    return {e.id: _hash(json.dumps([e.kind, e.question, e.answer, [int(t) for t in p]]))
            for e, p in zip(examples, prompts, strict=True)}


_POSITION_MODULUS = 65521  # position weights 1..65521: a moved value changes the sum


@jax.jit
def _bit_checksums(params):
    def checksums(x):
        width = min(jnp.dtype(x.dtype).itemsize, 4)
        bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * width}"))
        bits = bits.reshape(-1).astype(jnp.uint32)
        weights = jnp.arange(bits.size, dtype=jnp.uint32) % _POSITION_MODULUS + 1
        return bits.sum(dtype=jnp.uint32), (bits * weights).sum(dtype=jnp.uint32)
    return jax.tree.map(checksums, params)


def _is_pair(x) -> bool:
    return isinstance(x, tuple)


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _parse_settings(path: str, data: bytes) -> dict[str, Any]:
    try:
        saved = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a settings file ({err}); delete the output "
                         "directory or use another output_dir") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: not a settings file (expected a JSON object)")
    return saved


def _write_json(path: str, data: Any) -> None:
    if not is_main_process():
        return
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
