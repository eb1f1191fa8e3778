"""The default post-training recipe, shortened, on the second bundled model (slow): the one
it was not chosen on. `gkv-jax post-train distill` with no tuning flags trains under gkv at
1/8 of the sequence with the learning rate of the model's size and the full-cache guard on
its validation problems; what it returns never loses the full cache, and never lowers the
compressed cache it was trained for."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

import gkv_jax
from gkv_jax import training
from gkv_jax.cli import main
from gkv_jax.loading import bundled_model_dir


def _held_out(model, tokenizer, directory):
    score = training.evaluation_callback(tokenizer, "synthetic-chain", policies=("full", "gkv"),
                                         budgets=(68,), window=16, divide_length=16,
                                         num_problems=20, batch_size=20, output_dir=directory)
    return score(model, 0)


@pytest.mark.slow
def test_the_default_recipe_does_no_harm_on_the_chain_model(tmp_path, capsys):
    chain = bundled_model_dir("chain")
    out = tmp_path / "out"
    assert main(["post-train", "distill", "--model", chain, "--dataset", "synthetic-chain",
                 "--policy", "gkv", "--budget", "68", "--window", "16", "--divide-length",
                 "16", "--steps", "8", "--num-examples", "64", "--select-problems", "20",
                 "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "full-cache guard: 20 validation problems every 2 steps" in printed
    history = [json.loads(line) for line in (out / "run" / "history.jsonl").open()]
    assert history[0]["recipe"]["learning_rate"]["value"] == 1e-4  # the size rule
    evaluations = {e["step"]: e["eval"] for e in history if "eval" in e}
    assert sorted(evaluations) == [0, 2, 4, 6, 8]
    selection = history[-1]["selection"]
    chosen = evaluations[selection["selected_step"]]
    # The guard's rule on what it saw: the full cache within a point of before, the policy's
    # accuracy the best of those steps (so never below the untrained model's).
    assert chosen["full"] >= evaluations[0]["full"] - 0.01
    assert chosen["gkv@68"] >= evaluations[0]["gkv@68"]
    eligible = [s for s, e in evaluations.items() if e["full"] >= evaluations[0]["full"] - 0.01]
    assert chosen["gkv@68"] == max(evaluations[s]["gkv@68"] for s in eligible)

    before, tokenizer = gkv_jax.load(chain, dtype="float32")
    after, _ = gkv_jax.load(str(out / "model"), dtype="float32")
    if selection["selected_step"] == 0:  # the model it returns is the untrained one, exactly
        for a, b in zip(jax.tree.leaves(before.params()), jax.tree.leaves(after.params()),
                        strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Held-out problems (never validated on): the full cache holds, gkv@68 does not fall.
    scores_before = _held_out(before, tokenizer, str(tmp_path / "before"))
    scores_after = _held_out(after, tokenizer, str(tmp_path / "after"))
    assert scores_after["full"] >= scores_before["full"] - 0.05, (scores_before, scores_after)
    assert scores_after["gkv@68"] >= scores_before["gkv@68"] - 0.05, (
        scores_before, scores_after)
