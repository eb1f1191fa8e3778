"""The `gkv-jax` command line on a tiny saved checkpoint, the bundled model and `smoke`
(bad input: tests/test_cli_errors.py)."""

from __future__ import annotations

import json

import pytest

from gkv_jax import generation
from gkv_jax.cli import main
from tests.helpers import SPEC_BY_NAME, tiny_hf_model
from tests.test_generate import _word_tokenizer


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_ckpt")
    tiny_hf_model(SPEC_BY_NAME["qwen2-h32-g2-untied"]).save_pretrained(directory)
    _word_tokenizer().save_pretrained(directory)
    return directory


def test_generate_prints_text_and_stats(checkpoint, capsys):
    code = main(["generate", "--model", str(checkpoint), "--prompt", "w4 w5 w6", "--prompt",
                 "w9", "--policy", "gkv", "--budget", "8", "--window", "2",
                 "--divide-length", "4", "--max-new-tokens", "20", "--dtype", "float32",
                 "--json"])
    assert code == 0
    printed = capsys.readouterr().out
    result = json.loads(printed.strip().splitlines()[-1])
    assert len(result["texts"]) == 2 and result["stats"]["compressions"] > 0
    assert [len(ids) for ids in result["prompt_ids"]] == [3, 1]
    assert "cache_bytes" in printed and "tokens_per_second" in printed


def test_bad_budget_is_a_clear_error(checkpoint, capsys):
    code = main(["generate", "--model", str(checkpoint), "--prompt", "w1", "--budget", "4"])
    assert code == 2
    assert "budget must be > window" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# The bundled model from the command line: the prompt the demo feeds, and its answer.

HELD_OUT = 0  # the held-out problem the CLI is checked on


def _bundled_problem():
    from gkv_jax import datasets, evaluation, synthetic
    from gkv_jax.loading import bundled_model_dir, load_tokenizer

    example = datasets.synthetic_examples(HELD_OUT + 1)[HELD_OUT]
    tokenizer = load_tokenizer(bundled_model_dir())
    problem = synthetic.problems(datasets.HELD_OUT_SEED, HELD_OUT + 1)[HELD_OUT]
    return problem, evaluation.format_prompt(example, tokenizer)


def _generate_json(capsys, *flags) -> dict:
    from gkv_jax.loading import bundled_model_dir

    problem, _ = _bundled_problem()
    assert main(["generate", "--model", bundled_model_dir(), "--prompt", problem.prompt,
                 "--dtype", "float32", "--json", *flags]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_generate_feeds_the_bundled_model_the_demos_prompt_ids(capsys):
    _, demo_ids = _bundled_problem()
    common = ["--policy", "full", "--max-new-tokens", "1"]
    assert _generate_json(capsys, *common)["prompt_ids"] == [demo_ids]  # BOS by convention
    assert _generate_json(capsys, *common, "--bos")["prompt_ids"] == [demo_ids]
    assert _generate_json(capsys, *common, "--no-bos")["prompt_ids"] == [demo_ids[1:]]


@pytest.mark.slow
def test_generate_reproduces_the_demos_answer_on_a_held_out_problem(capsys):
    import gkv_jax
    from gkv_jax.eviction import EvictionConfig
    from gkv_jax.generation import generate
    from gkv_jax.loading import bundled_model_dir
    from gkv_jax.synthetic import extract_answer

    problem, demo_ids = _bundled_problem()
    result = _generate_json(capsys, "--policy", "gkv", "--budget", "136", "--window", "16",
                            "--divide-length", "16", "--max-new-tokens", "520")
    model, tokenizer = gkv_jax.load(bundled_model_dir(), dtype="float32")
    demo = generate(model, [demo_ids], tokenizer=tokenizer, max_new_tokens=520,
                    eviction=EvictionConfig(policy="gkv", budget=136, window=16,
                                            divide_length=16))
    assert result["tokens"] == demo.tokens
    assert extract_answer(result["texts"][0]) == problem.answer


# --------------------------------------------------------------------------------------------
# smoke: passes, and says what failed (64 new tokens: gkv@64 compresses once).


# Slow: `gkv-jax smoke` end to end (its failure path stays fast below).
@pytest.mark.slow
def test_smoke_passes_its_checks(capsys):
    assert main(["smoke", "--max-new-tokens", "64"]) == 0
    printed = capsys.readouterr().out
    assert "FAIL" not in printed and "smoke: all" in printed and "checks passed" in printed
    assert "ok   gkv@64: compresses" in printed
    assert "ok   gkv-roomy: budget 104 >= prompt + generated tokens" in printed


# Slow (the fast suite's cold time): the smoke command's passing run stays fast.
@pytest.mark.slow
def test_smoke_exits_1_naming_a_mismatch(monkeypatch, capsys):
    real_generate = generation.generate

    def wrong_when_roomy(model, prompts, eviction=None, **kwargs):
        out = real_generate(model, prompts, eviction=eviction, **kwargs)
        if eviction.evicts and eviction.budget == 104:  # the never-evicting config
            out.tokens[0][-1] = (out.tokens[0][-1] + 1) % model.config.vocab_size
        return out

    monkeypatch.setattr(generation, "generate", wrong_when_roomy)
    assert main(["smoke", "--max-new-tokens", "64"]) == 1
    captured = capsys.readouterr()
    assert "FAIL gkv-roomy: budget 104" in captured.out
    assert "gkv-jax smoke: error: 1 of" in captured.err
    assert "exactly the full cache's tokens" in captured.err
