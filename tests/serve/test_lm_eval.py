"""lm-evaluation-harness against `gkv-jax serve` (slow): its `local-completions` model over
a local task file of the bundled model's problems (no hub download) reports the same
accuracy as `gkv-jax eval` on the same problems with the same eviction, greedy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import lm_eval_serve  # noqa: E402

pytestmark = pytest.mark.slow


def test_lm_eval_local_completions_matches_gkv_jax_eval(tmp_path):
    pytest.importorskip("lm_eval")  # here, not at collection: it is slow to import
    harness = lm_eval_serve.harness_accuracy(tmp_path, num_problems=24)
    ours = lm_eval_serve.eval_accuracy(tmp_path, num_problems=24)
    assert harness["answered"] == 24
    assert lm_eval_serve.agreement(harness, ours) == {"problems": 24, "same_text": 24,
                                                      "same_answer": 24}
    assert harness["exact_match"] == pytest.approx(ours["accuracy"], abs=1e-9)


def test_the_task_file_holds_the_eval_problems(tmp_path):
    pytest.importorskip("lm_eval")
    from gkv_jax.datasets import synthetic_examples

    task_dir = lm_eval_serve.write_task(tmp_path, num_problems=5)
    rows = [json.loads(line) for line in (task_dir / lm_eval_serve.DATA_FILE).open()]
    assert [(r["question"], r["answer"]) for r in rows] == [
        (e.question, e.answer) for e in synthetic_examples(5)]
    result = subprocess.run([sys.executable, "-m", "lm_eval", "validate", "--tasks",
                             lm_eval_serve.TASK, "--include_path", str(task_dir)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
