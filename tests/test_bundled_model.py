"""The bundled reasoning model, loaded through the Hugging Face path as users load it."""

from __future__ import annotations

import os

import pytest

import gkv_jax
from gkv_jax import synthetic
from gkv_jax.evaluation import evaluate
from gkv_jax.generation import generate
from gkv_jax.loading import bundled_model_dir

DEMO_BUDGET = 136  # gkv-jax demo's default


def test_bundled_checkpoint_is_small_and_complete():
    directory = bundled_model_dir()
    files = set(os.listdir(directory))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    assert sum(os.path.getsize(os.path.join(directory, f)) for f in files) < 20 * 2**20
    model, tokenizer = gkv_jax.load(directory, dtype="float32")
    assert model.config.family == "qwen2" and model.config.group_size > 1
    assert len(tokenizer) == model.config.vocab_size
    problem = synthetic.problems(0, 1)[0]
    ids = tokenizer(problem.prompt)["input_ids"]  # BOS, as in training, then the characters
    assert ids[0] == tokenizer.bos_token_id == model.config.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == problem.prompt


# Slow (the fast suite's cold time): the bundled model's generation is in the fast suite through
# test_cli and the exact-mask tests.
@pytest.mark.slow
def test_full_cache_solves_held_out_problems_and_eviction_policies_differ(tmp_path):
    """Six held-out problems end to end (load -> evaluate -> grade): the full cache solves
    them, and at a quarter of the sequence (budget 136 of 544 tokens) the policies differ:
    gkv's historical score keeps the prompt's table, which the trace re-reads every 30
    tokens (88.5% on the 200 of docs/results/accuracy.md), rkv's cache loses it (1%). Every
    policy runs in the demo test (slow)."""
    model, tokenizer = gkv_jax.load(bundled_model_dir(), dtype="float32")
    report = evaluate(model, tokenizer, "synthetic", policies=("full", "rkv", "gkv"),
                      budgets=(DEMO_BUDGET,), window=16, divide_length=16, num_problems=6,
                      batch_size=6, output_dir=str(tmp_path), progress=False)
    accuracy = {entry["policy"]: entry["pass@1"] for entry in report.summary}
    assert accuracy["full"] == 1.0 and accuracy["gkv"] >= 0.8
    assert accuracy["rkv"] <= 0.3
    rows = [row for row in report.rows if row["policy"] == "full"]
    assert len(rows) == 6 and all(row["generated_tokens"] == 508 for row in rows)


@pytest.mark.slow
def test_demo_command_prints_every_policy_and_writes_the_plot(tmp_path, capsys):
    from gkv_jax.cli import main
    from gkv_jax.eviction import POLICIES

    output_dir = tmp_path / "demo"
    assert main(["demo", "--num-problems", "2", "--batch-size", "2",
                 "--output-dir", str(output_dir)]) == 0
    printed = capsys.readouterr().out
    for policy in POLICIES:
        if policy != "full":
            assert f"{policy}@{DEMO_BUDGET}" in printed
    assert "full cache: 100.0% exact answers" in printed
    # Beside it, the bundled model distilled for gkv@68 (both on the same problems).
    assert "distilled for gkv@68" in printed
    for name in ("full", "gkv@68", f"gkv@{DEMO_BUDGET}"):
        assert any(line.split()[:1] == [name] and line.count("%") == 2
                   for line in printed.splitlines()), name
    assert (output_dir / "accuracy_vs_budget.png").stat().st_size > 0


def _held_out_example():
    from gkv_jax.datasets import load_dataset

    return load_dataset("synthetic", 1)[0]


def test_string_prompts_get_the_bos_the_model_was_trained_with():
    """A string prompt through `generate` is tokenized as evaluation formats it (BOS + the
    characters, as in training); add_special_tokens=False drops the BOS; the chat template
    writes its own BOS and nothing is added on top."""
    from gkv_jax.evaluation import format_prompt
    from gkv_jax.generation_inputs import _tokenize
    from gkv_jax.loading import load_tokenizer

    example = _held_out_example()
    for variant in ("base", "distilled"):
        tokenizer = load_tokenizer(bundled_model_dir(variant))
        (ids,) = _tokenize([example.question], tokenizer, False, None)
        assert ids == format_prompt(example, tokenizer)
        assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id
        (bare,) = _tokenize([example.question], tokenizer, False, None,
                            add_special_tokens=False)
        assert bare == ids[1:]
        (templated,) = _tokenize([example.question], tokenizer, True, None)
        assert templated == ids
    assert synthetic.build_tokenizer()(example.question)["input_ids"] == ids


@pytest.mark.slow
def test_generate_with_a_string_prompt_answers_like_evaluation():
    model, tokenizer = gkv_jax.load(bundled_model_dir(), dtype="float32")
    example = _held_out_example()
    out = generate(model, [example.question], tokenizer=tokenizer, max_new_tokens=520)
    assert out.prompt_ids[0][0] == tokenizer.bos_token_id
    assert synthetic.grade(out.texts[0], example.answer)
    # the answer's EOS came at forward 507: the rest of that 128-step cycle ran idle
    assert out.stats["generated_tokens"] == 508 == out.stats["forwards"] - out.stats[
        "idle_steps"] and out.stats["idle_steps"] > 0


@pytest.mark.slow
def test_evaluate_on_the_engine_gives_the_static_batches_rows(tmp_path):
    """The bundled model's rows and pass@k through the slot engine (what `evaluate` runs)
    equal the static path it replaced: fixed `generate` batches of one prompt bucket, every
    row drawn with seed + sample. Sampled, two samples per problem, two configs."""
    from gkv_jax import evaluation
    from gkv_jax.datasets import load_dataset

    model, tokenizer = gkv_jax.load(bundled_model_dir(), dtype="float32")
    run = dict(policies=("full", "gkv"), budgets=(68,), window=16, divide_length=16,
               num_problems=8, samples=2, pass_k=(1, 2), temperature=0.7, seed=5,
               batch_size=6)
    report = evaluate(model, tokenizer, "synthetic", output_dir=str(tmp_path), progress=False,
                      **run)
    examples = load_dataset("synthetic", run["num_problems"])
    prompts = [evaluation.format_prompt(e, tokenizer) for e in examples]
    configs = evaluation.eviction_configs(run["policies"], run["budgets"], run["window"],
                                          run["divide_length"])
    static = []
    for batch in evaluation.plan_batches([len(p) for p in prompts], configs, run["samples"],
                                         run["batch_size"]):
        out = generate(model, evaluation.batch_prompts(batch, prompts), tokenizer=tokenizer,
                       eviction=batch.config, max_new_tokens=520,
                       temperature=run["temperature"],
                       seed=[run["seed"] + batch.sample] * batch.size)
        static += evaluation.batch_rows(batch, out, examples)
    engine_rows = {evaluation.row_key(r): r for r in report.rows}
    compared = ("prediction", "correct", "generated_tokens", "text")
    assert len(static) == len(engine_rows) == 32
    for row in static:
        assert {k: engine_rows[evaluation.row_key(row)][k] for k in compared} == {
            k: row[k] for k in compared}
    summary = evaluation.summarize(static, configs, run["samples"], run["pass_k"])
    for want, got in zip(summary, report.summary, strict=True):
        assert (want["pass@1"], want["pass@2"]) == (got["pass@1"], got["pass@2"])
