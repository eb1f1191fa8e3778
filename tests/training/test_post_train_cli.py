"""`gkv-jax post-train distill|grpo` end to end on a tiny random model with the table-walk
tokenizer: an HF checkpoint that gkv_jax and transformers load, the run's history, resume
protection, and clear errors for bad flags."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

import gkv_jax
from gkv_jax import synthetic
from gkv_jax.cli import main
from gkv_jax.conversion import to_hf
from gkv_jax.models import ModelConfig, Transformer


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny")
    tokenizer = synthetic.build_tokenizer()
    config = ModelConfig(family="qwen2", vocab_size=len(tokenizer), hidden_size=32,
                         intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                         head_dim=16, qkv_bias=True, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id,
                         eos_token_ids=(tokenizer.eos_token_id,))
    to_hf(Transformer(config, dtype=jnp.float32, rngs=nnx.Rngs(0)), str(directory))
    tokenizer.save_pretrained(str(directory))
    return str(directory)


COMMON = ["--policy", "gkv", "--budget", "40", "--window", "8", "--divide-length", "16",
          "--steps", "2", "--learning-rate", "1e-3", "--checkpoint-every", "1",
          "--select-problems", "0"]  # the guard's 100 validation problems: tested below


# Slow (the fast suite's cold time): the distill loop itself is fast in test_post_training.
@pytest.mark.slow
def test_distill_cli_writes_a_loadable_model_and_its_history(tiny_checkpoint, tmp_path,
                                                             capsys):
    out = tmp_path / "out"
    args = ["post-train", "distill", "--model", tiny_checkpoint, "--output-dir", str(out),
            "--num-examples", "4", "--batch-size", "2", *COMMON]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "model:" in printed and "history:" in printed
    history = [json.loads(line) for line in (out / "run" / "history.jsonl").open()]
    assert [e["step"] for e in history] == [1, 2]
    model, tokenizer = gkv_jax.load(str(out / "model"), dtype="float32")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out / "model"))
    assert sum(p.numel() for p in hf.parameters()) == model.config.num_parameters()
    assert len(tokenizer) == model.config.vocab_size
    # The same command again: the run is complete, nothing is trained or written again.
    weights = (out / "model" / "model.safetensors").read_bytes()
    assert main(args) == 0
    assert f"this run is already complete (2 steps); its model is in {out / 'model'}" in (
        capsys.readouterr().out)
    # Another setting into the same directory: refused, naming the flags and both values.
    assert main([*args, "--budget", "32"]) == 2
    err = capsys.readouterr().err
    assert "holds a different run (--budget: 40 there, 32 now)" in err, err
    assert (out / "model" / "model.safetensors").read_bytes() == weights


# Slow: the distill command covers the CLI path in the fast suite; GRPO's steps are
# tested in test_post_training.
@pytest.mark.slow
def test_grpo_cli_runs_and_reports_the_guard(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "grpo"
    assert main(["post-train", "grpo", "--model", tiny_checkpoint, "--output-dir", str(out),
                 "--num-problems", "4", "--prompts-per-step", "1", "--group-size", "2",
                 "--max-new-tokens", "24", *COMMON]) == 0
    printed = capsys.readouterr().out
    assert "log-prob guard max" in printed
    history = [json.loads(line) for line in (out / "run" / "history.jsonl").open()]
    assert len(history) == 2 and all(np.isfinite(e["guard"]) for e in history)
    assert max(e["guard"] for e in history) < 1e-4


@pytest.mark.slow
def test_distill_cli_selects_on_validation_problems_with_the_size_rule(tiny_checkpoint,
                                                                       tmp_path, capsys):
    out = tmp_path / "select"
    common = [f for f in COMMON if f not in ("--learning-rate", "1e-3")]
    assert main(["post-train", "distill", "--model", tiny_checkpoint, "--output-dir", str(out),
                 "--dataset", "synthetic-chain", "--num-examples", "4", "--batch-size", "2",
                 *common, "--select-problems", "2", "--eval-every", "1"]) == 0
    printed = capsys.readouterr().out
    assert "(from the model's size)" in printed and "selected step " in printed
    history = [json.loads(line) for line in (out / "run" / "history.jsonl").open()]
    assert history[0]["recipe"]["learning_rate"]["value"] == 1e-4  # held below 3.16M
    evaluations = {e["step"]: e["eval"] for e in history if "eval" in e}
    assert sorted(evaluations) == [0, 1, 2] and set(evaluations[0]) == {"full", "gkv@40"}
    assert history[-1]["selection"]["selected_step"] in (0, 1, 2)
    assert (out / "run" / "validation" / "step_0").is_dir()


@pytest.mark.parametrize("flags, guard", [
    ([], (100, 10)),  # a synthetic task has validation problems of its own: on
    (["--dataset", "synthetic-chain", "--steps", "7"], (100, 1)),
    (["--dataset", "data.jsonl"], (0, 0)),  # none to validate on: off, said so
    (["--dataset", "data.jsonl", "--validation-dataset", "aime24"], (100, 10)),
    (["--select-problems", "0"], (0, 0)),
    (["--select-problems", "30", "--eval-every", "5"], (30, 5)),
    (["--eval-problems", "20"], (100, 10)),
])
def test_the_full_cache_guard_is_on_by_default_where_there_are_validation_problems(
        flags, guard):
    from gkv_jax.cli import build_parser
    from gkv_jax.cli.post_train_guard import _guard_line, _resolve_guard
    args = build_parser().parse_args(["post-train", "distill", "--model", "m", "--budget", "68",
                                      "--steps", "40", "--output-dir", "o", *flags])
    _resolve_guard(args)
    assert (args.select_problems, args.eval_every) == guard
    line = _guard_line(args)
    assert ("full-cache guard: 100 validation problems" in line) == (guard[0] == 100)
    assert ("no full-cache guard" in line) == (guard[0] == 0)
    assert ("--validation-dataset NAME_OR_JSONL turns it on" in line) == (
        guard[0] == 0 and "data.jsonl" in flags)


@pytest.mark.parametrize("flags, message", [
    (["--learning-rate", "0"], "--learning-rate must be a number in (0.0, 1.0]"),
    (["--select-problems", "2", "--dataset", "aime24", "--group-size", "2"],
     "--select-problems: give --validation-dataset"),
    (["--select-problems", "2", "--validation-dataset", "aime26"],
     "--validation-dataset: dataset must be one of"),
    (["--group-size", "1"], "--group-size must be an integer >= 2"),
    (["--budget", "4"], "budget must be > window"),
    (["--steps", "99999999999999999999"], "--steps must be an integer in [1, 2147483647]"),
    (["--budget", "2000"], "--budget: budget 2000 never evicts"),
])
def test_post_train_cli_bad_flags_exit_2_naming_the_parameter(tiny_checkpoint, tmp_path,
                                                               capsys, flags, message):
    method = "grpo" if "--group-size" in flags else "distill"
    assert main(["post-train", method, "--model", tiny_checkpoint, "--output-dir",
                 str(tmp_path / "x"), *COMMON, *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before anything is written
    with pytest.raises(SystemExit):
        main(["post-train", "distill", "--model", tiny_checkpoint, "--output-dir",
              str(tmp_path / "y"), *COMMON, "--policy", "full"])


def test_bad_dataset_lines_and_output_files_are_named_before_anything_is_written(
        tiny_checkpoint, tmp_path, capsys):
    good = {"prompt_ids": [1, 25, 8, 16, 17], "completion_ids": [3, 3, 16, 4, 2] * 6}
    dataset = tmp_path / "oov.jsonl"
    rows = [good, good, {**good, "completion_ids": [3, 3, 16, 99, 4, 2] * 5}, good]
    dataset.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    out = tmp_path / "oov_out"
    base = ["post-train", "distill", "--model", tiny_checkpoint, "--num-examples", "4",
            "--batch-size", "2", *COMMON]
    # Ids outside the vocabulary trained an all-NaN model and exited 0.
    assert main([*base, "--dataset", str(dataset), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert (f"--dataset: {dataset} line 3: data[2] completion_ids has token ids outside "
            f"[0, 28): 99 at index 3") in err, err
    assert not out.exists()
    # --output-dir naming a regular file: a clear line before the model loads.
    afile = tmp_path / "afile.txt"
    afile.write_text("mine")
    assert main([*base, "--output-dir", str(afile)]) == 2
    assert f"--output-dir: {afile} is a file; give a directory" in capsys.readouterr().err
    assert afile.read_text() == "mine"


def test_a_refused_start_leaves_the_output_dir_usable(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "g"
    base = ["post-train", "grpo", "--model", tiny_checkpoint, "--output-dir", str(out),
            "--num-problems", "4", "--prompts-per-step", "1", "--group-size", "2", *COMMON]
    assert main([*base, "--max-new-tokens", "5000"]) == 2
    assert "--max-new-tokens: max_new_tokens: prompts[0]: prompt length" in (
        capsys.readouterr().err)
    assert not (out / "run" / "run.json").exists()
