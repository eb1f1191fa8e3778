"""`gkv_jax.evaluate` on a tiny random model and the synthetic task: rows, grading, summary,
resume after an interruption, pass@k, batching, errors, and `gkv-jax eval`."""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
import types

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gkv_jax import evaluation, grading, synthetic
from gkv_jax.cli import main
from gkv_jax.conversion import to_hf
from gkv_jax.datasets import Example, load_dataset
from gkv_jax.evaluation import (
    Batch,
    evaluate,
    eviction_configs,
    format_prompt,
    pass_at_k,
    plan_batches,
)
from gkv_jax.evaluation import rows as evaluation_rows
from gkv_jax.evaluation import run as evaluation_run
from gkv_jax.eviction import EvictionConfig
from gkv_jax.generation import generate
from gkv_jax.generation_inputs import bucket_length
from gkv_jax.models import ModelConfig, Transformer

NUM_PROBLEMS, SAMPLES = 10, 2
# Sampled (temperature 1), so resuming must reproduce each row's random stream exactly.
RUN = dict(policies=("full", "gkv"), budgets=(32,), window=8, divide_length=8,
           num_problems=NUM_PROBLEMS, samples=SAMPLES, pass_k=(1, 2, 4), max_new_tokens=16,
           temperature=1.0, seed=3, batch_size=4, progress=False)
NUM_CONFIGS = 2
TIMING_FIELDS = ("decode_seconds",)


@functools.cache
def tiny():
    """A random 2-layer Qwen2 model over the synthetic task's character vocabulary."""
    tokenizer = synthetic.build_tokenizer()
    config = ModelConfig(family="qwen2", vocab_size=len(tokenizer), hidden_size=64,
                         intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                         head_dim=16, qkv_bias=True, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id,
                         eos_token_ids=(tokenizer.eos_token_id,),
                         pad_token_id=tokenizer.pad_token_id)
    return Transformer(config, dtype=jnp.float32, rngs=nnx.Rngs(0)), tokenizer


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run the other tests compare with."""
    model, tokenizer = tiny()
    directory = str(tmp_path_factory.mktemp("eval_reference"))
    return evaluate(model, tokenizer, "synthetic", output_dir=directory, **RUN)


def _file_rows(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _without_timing(rows):
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]


def test_rows_grading_and_summary_are_consistent(reference):
    rows = reference.rows
    assert len(rows) == NUM_CONFIGS * NUM_PROBLEMS * SAMPLES
    keys = {(r["config"], r["problem"], r["sample"]) for r in rows}
    assert len(keys) == len(rows)
    file_rows = _file_rows(reference.results_path)  # in batch order
    assert sorted(map(json.dumps, file_rows)) == sorted(map(json.dumps, rows))
    answers = {e.id: e.answer for e in load_dataset("synthetic", NUM_PROBLEMS)}
    for r in rows:
        assert r["answer"] == answers[r["problem"]]
        assert r["correct"] == grading.grade("synthetic", r["text"], r["answer"])
        assert r["prediction"] == grading.extract("synthetic", r["text"])
        assert 1 <= r["generated_tokens"] <= RUN["max_new_tokens"]
    assert [s["name"] for s in reference.summary] == ["full", "gkv@32"]
    for entry in reference.summary:
        own = [r for r in rows if r["name"] == entry["name"]]
        assert entry["pass@1"] == pytest.approx(sum(r["correct"] for r in own) / len(own))
        assert "pass@2" in entry and "pass@4" not in entry  # 4 > samples
        assert entry["problems"] == NUM_PROBLEMS and entry["samples"] == SAMPLES
        assert entry["mean_generated_tokens"] == pytest.approx(
            sum(r["generated_tokens"] for r in own) / len(own))
        assert entry["tokens_per_second"] > 0 and entry["cache_bytes"] > 0
    full, gkv = reference.summary
    assert (gkv["window"], gkv["divide_length"], gkv["budget"]) == (8, 8, 32)
    assert full["budget"] is None and full["divide_length"] == 8
    assert gkv["cache_bytes"] < full["cache_bytes"]


def test_outputs_are_written(reference):
    with open(reference.summary_path, newline="") as f:
        table = list(csv.DictReader(f))
    assert [row["name"] for row in table] == ["full", "gkv@32"]
    assert float(table[1]["pass@1"]) == pytest.approx(reference.summary[1]["pass@1"])
    with open(reference.plot_path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    text = reference.table()
    assert "pass@1" in text and "gkv@32" in text and "full" in text


def test_resume_after_interruption_loses_and_duplicates_nothing(reference, tmp_path,
                                                                monkeypatch):
    model, tokenizer = tiny()
    real = evaluation_rows.engine_rows
    calls = []

    def interrupted(*args, on_rows, **kwargs):
        calls.append(1)

        def store_then_stop(rows):
            on_rows(rows)
            raise RuntimeError("interrupted")
        return real(*args, on_rows=store_then_stop, **kwargs)

    monkeypatch.setattr(evaluation_run, "engine_rows", interrupted)
    with pytest.raises(RuntimeError, match="interrupted"):
        evaluate(model, tokenizer, "synthetic", output_dir=str(tmp_path), **RUN)
    results = tmp_path / "results.jsonl"
    first_chunk = _file_rows(results)
    assert len(first_chunk) == RUN["batch_size"]  # one chunk: as many rows as slots
    with open(results, "a") as f:  # a row cut off in the middle of its write
        f.write('{"config": "full(divide_len')

    wanted = []
    monkeypatch.setattr(evaluation_run, "engine_rows",
                        lambda *a, **k: wanted.append(len(a[5])) or real(*a, **k))
    resumed = evaluate(model, tokenizer, "synthetic", output_dir=str(tmp_path), **RUN)
    per_config = NUM_PROBLEMS * SAMPLES
    assert wanted == [per_config - len(first_chunk), per_config]  # only the missing rows
    on_disk = _file_rows(results)
    assert on_disk[:len(first_chunk)] == first_chunk
    assert len(on_disk) == len({(r["config"], r["problem"], r["sample"]) for r in on_disk})
    assert _without_timing(resumed.rows) == _without_timing(reference.rows)
    assert sorted(map(json.dumps, _without_timing(on_disk))) == sorted(
        map(json.dumps, _without_timing(reference.rows)))

    wanted.clear()
    again = evaluate(model, tokenizer, "synthetic", output_dir=str(tmp_path), **RUN)
    assert wanted == [] and again.rows == resumed.rows and again.summary == resumed.summary


# Slow: the bundled model's version (tests/test_bundled_model.py) is slow too; the engine's
# exactness against generate alone (tests/test_engine.py) is the fast sibling.
@pytest.mark.slow
def test_engine_rows_equal_the_static_batches(reference):
    """The rows `evaluate` now makes through the engine are the rows of the static path it
    replaced (fixed `generate` batches of one bucket, every row with seed + sample)."""
    model, tokenizer = tiny()
    examples = load_dataset("synthetic", NUM_PROBLEMS)
    prompts = [format_prompt(e, tokenizer) for e in examples]
    configs = eviction_configs(RUN["policies"], RUN["budgets"], RUN["window"],
                               RUN["divide_length"])
    static = []
    for batch in plan_batches([len(p) for p in prompts], configs, SAMPLES, RUN["batch_size"]):
        out = generate(model, evaluation.batch_prompts(batch, prompts), tokenizer=tokenizer,
                       eviction=batch.config, max_new_tokens=RUN["max_new_tokens"],
                       temperature=RUN["temperature"],
                       seed=[RUN["seed"] + batch.sample] * batch.size)
        static += evaluation.batch_rows(batch, out, examples)
    engine_rows = {(r["config"], r["problem"], r["sample"]): r for r in reference.rows}
    assert len(static) == len(engine_rows)
    compared = ("prediction", "correct", "generated_tokens", "text", "answer", "name")
    for row in static:
        got = engine_rows[(row["config"], row["problem"], row["sample"])]
        assert {k: got[k] for k in compared} == {k: row[k] for k in compared}


def test_package_reexports_its_modules_public_names():
    """`from gkv_jax.evaluation import ...` reaches every public name of its modules, and
    `engine_rows` is not one of them: a patch of `gkv_jax.evaluation.engine_rows` would not
    reach `evaluate` (it looks it up in `gkv_jax.evaluation.run`), so it fails instead."""
    modules = ("configs", "prompts", "rows", "run", "store", "summary")
    for name in evaluation.__all__:
        assert any(getattr(getattr(evaluation, m), name, None) is getattr(evaluation, name)
                   for m in modules), name
    assert not hasattr(evaluation, "engine_rows")
    assert evaluation_run.engine_rows is evaluation_rows.engine_rows


def test_pass_at_k_hand_computed():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)
    assert pass_at_k(10, 3, 4) == pytest.approx(1 - 35 / 210)
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(4, 3, 2) == 1.0
    assert pass_at_k(4, 4, 4) == 1.0
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def _scripted_rows(tokenizer, examples):
    """Fake `engine_rows`: problem i is answered right on sample s iff s < i % 5 (seed 100);
    2 seconds, 1000 cache bytes (3000 for a full cache) per row; nothing compiled."""
    index = {e.question: i for i, e in enumerate(examples)}

    def fake(model, tokenizer_, config, examples_, prompts, wanted, samples, *, seed,
             on_rows, on_request=lambda: None, **kwargs):
        rows = []
        for j, example in enumerate(examples_):
            for s in range(samples):
                if (j, s) not in wanted:
                    continue
                answer = example.answer
                if seed + s - 100 >= index[example.question] % 5:
                    answer = f"{(int(answer) + 1) % 100:02d}"
                text = f"00 A4 93\nans {answer}\n"
                rows.append(evaluation.make_row(config, example, s, text,
                                                list(range(len(text))), 2.0, 1000, 3000))
                on_request()
        if rows:
            on_rows(rows)
    return fake


def test_summary_pass_at_k_on_scripted_answers(tmp_path, monkeypatch):
    model, tokenizer = tiny()
    examples = load_dataset("synthetic", NUM_PROBLEMS)
    monkeypatch.setattr(evaluation_run, "engine_rows", _scripted_rows(tokenizer, examples))
    report = evaluate(model, tokenizer, examples, policies="full,gkv,h2o", budgets=(32, 64),
                      samples=4, pass_k=(1, 2, 4, 8), temperature=0.6, seed=100,
                      batch_size=3, output_dir=str(tmp_path), progress=False)
    assert [s["name"] for s in report.summary] == ["full", "gkv@32", "gkv@64", "h2o@32",
                                                   "h2o@64"]
    per_problem = [min(i % 5, 4) for i in range(NUM_PROBLEMS)]  # correct samples of 4
    for entry in report.summary:
        assert entry["pass@1"] == pytest.approx(sum(c / 4 for c in per_problem) / NUM_PROBLEMS)
        assert entry["pass@2"] == pytest.approx(
            sum(pass_at_k(4, c, 2) for c in per_problem) / NUM_PROBLEMS)
        assert entry["pass@4"] == pytest.approx(0.8)
        assert "pass@8" not in entry
        assert entry["cache_bytes"] == 1000 and entry["full_cache_bytes"] == 3000
    assert sum(r["correct"] for r in report.rows) == 4 * report.summary[0]["pass@1"] * 10 * 5
    assert os.path.exists(report.plot_path)


def test_eviction_configs_apply_knobs_where_used():
    configs = eviction_configs(("full", "gkv", "h2o", "streaming", "snapkv", "gkv"),
                               (32, 64), window=8, divide_length=16)
    names = [evaluation.config_name(c) for c in configs]
    assert names == ["full", "gkv@32", "gkv@64", "h2o@32", "h2o@64", "streaming@32",
                     "streaming@64", "snapkv@32", "snapkv@64"]
    assert all(c.divide_length == 16 for c in configs)
    by_name = dict(zip(names, configs, strict=True))
    assert by_name["gkv@32"].window == 8 and by_name["snapkv@64"].window == 8
    assert by_name["h2o@32"].window == 1
    assert (by_name["streaming@64"].sink, by_name["streaming@64"].recent) == (4, 60)
    assert eviction_configs("full", ()) == [EvictionConfig(policy="full")]


@pytest.mark.parametrize("kwargs, message", [
    (dict(policies=("full", "nope")), "valid policies are full, streaming"),
    (dict(policies=("gkv",), budgets=(8,), window=8), "budget must be > window"),
    (dict(policies=("gkv",), budgets=()), "budgets: policy 'gkv' needs"),
    (dict(samples=0), "samples must be"),
    (dict(pass_k=(0,)), "pass_k must be"),
    (dict(batch_size=0), "batch_size must be"),
    (dict(top_p=0.0), "top_p must be"),
    (dict(max_new_tokens=250), "max_new_tokens"),
    (dict(dataset="nope"), "aime24"),
    # Math text through a 28-symbol tokenizer: mostly its unknown token (ran silently).
    (dict(dataset="aime24", max_new_tokens=8),
     r"dataset: the tokenizer cannot encode these problems: \d+ of their \d+ prompt tokens "
     r"\(\d+%\) are its unknown token '<pad>' \(first in problem 'aime24-"),
])
def test_bad_arguments_fail_before_any_generation(tmp_path, monkeypatch, kwargs, message):
    model, tokenizer = tiny()
    monkeypatch.setattr(evaluation_run, "engine_rows", lambda *a, **k: pytest.fail("generated"))
    kwargs = dict(dict(dataset="synthetic", num_problems=2, progress=False,
                       output_dir=str(tmp_path)), **kwargs)
    with pytest.raises(ValueError, match=message):
        evaluate(model, tokenizer, **kwargs)


def test_output_dir_of_another_run_is_refused(tmp_path, monkeypatch):
    model, tokenizer = tiny()
    examples = load_dataset("synthetic", 2)
    monkeypatch.setattr(evaluation_run, "engine_rows", _scripted_rows(tokenizer, examples))
    common = dict(policies="full", num_problems=2, seed=100, output_dir=str(tmp_path),
                  progress=False)
    evaluate(model, tokenizer, **common)
    with pytest.raises(ValueError, match="temperature: 0.0 there, 0.5 now"):
        evaluate(model, tokenizer, temperature=0.5, **common)


def _files(directory):
    return {p.name: p.read_bytes() for p in directory.iterdir()}


@pytest.mark.parametrize("users_files", [
    {"summary.csv": b"my,data\n", "accuracy_vs_budget.png": b"my plot", "notes.txt": b"n"},
    {"settings.json": b'{"editor.fontSize": 14}'},
    {"results.jsonl": b'{"my": "rows"}\n'},
])
def test_a_directory_of_the_users_files_is_refused_and_left_as_it_was(tmp_path, monkeypatch,
                                                                       users_files):
    # These files were replaced (summary, plot, settings) before: data loss.
    model, tokenizer = tiny()
    monkeypatch.setattr(evaluation_run, "engine_rows", lambda *a, **k: pytest.fail("generated"))
    for name, content in users_files.items():
        (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match=r"is not empty and is not an evaluation's output "
                                         r"\(no .gkv-jax-eval file\); evaluate never replaces"):
        evaluate(model, tokenizer, policies="full", num_problems=2, output_dir=str(tmp_path),
                 progress=False)
    assert _files(tmp_path) == users_files
    afile = tmp_path / "notes.txt"
    afile.write_bytes(b"n")
    with pytest.raises(ValueError, match="is a file; give a directory"):
        evaluate(model, tokenizer, policies="full", num_problems=2, output_dir=str(afile),
                 progress=False)


def test_an_evaluations_directory_is_marked_and_resumed(tmp_path, monkeypatch):
    model, tokenizer = tiny()
    examples = load_dataset("synthetic", 2)
    monkeypatch.setattr(evaluation_run, "engine_rows", _scripted_rows(tokenizer, examples))
    common = dict(policies="full", num_problems=2, seed=100, progress=False)
    new = tmp_path / "new"
    first = evaluate(model, tokenizer, output_dir=str(new), **common)
    assert (new / evaluation.EVAL_MARKER).is_file()
    monkeypatch.setattr(evaluation_run, "engine_rows", lambda *a, **k: pytest.fail("generated"))
    assert evaluate(model, tokenizer, output_dir=str(new), **common).rows == first.rows
    # A directory written before the marker existed: its settings.json is an evaluation's,
    # so it resumes (and is marked now).
    (new / evaluation.EVAL_MARKER).unlink()
    assert evaluate(model, tokenizer, output_dir=str(new), **common).rows == first.rows
    assert (new / evaluation.EVAL_MARKER).is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert evaluation.output_dir_problem(str(empty)) is None


def test_plan_batches_one_bucket_per_batch_and_padded_shapes():
    lengths = [5, 40, 20, 3, 17, 33, 60]
    configs = [EvictionConfig(policy="full"), EvictionConfig(policy="gkv", budget=32)]
    batches = plan_batches(lengths, configs, samples=2, batch_size=2)
    assert {b.size for b in batches} == {2}
    seen = []
    for b in batches:
        assert 1 <= len(b.indices) <= b.size
        assert all(bucket_length(lengths[i], None) == b.bucket for i in b.indices)
        assert [lengths[i] for i in b.indices] == sorted(lengths[i] for i in b.indices)
        seen += [(b.config, b.sample, i) for i in b.indices]
    assert sorted(seen, key=str) == sorted(
        [(c, s, i) for c in configs for s in range(2) for i in range(7)], key=str)
    assert batches[0] == Batch(configs[0], 0, 16, (3, 0), 2)
    # Fewer problems than batch_size: batches shrink to the number of problems.
    assert {b.size for b in plan_batches([5, 6], configs, 1, 16)} == {2}


def test_prompts_match_the_training_format():
    _, tokenizer = tiny()
    problem = synthetic.problems(0, 1)[0]
    example = load_dataset("synthetic", 1)[0]
    # The bundled tokenizer adds the BOS the model was trained with, as format_prompt does.
    training = tokenizer(problem.prompt)["input_ids"]
    assert training[0] == tokenizer.bos_token_id
    assert format_prompt(example, tokenizer) == training
    math = Example(id="m-0", question="1+1=", answer="2", kind="math")
    bos = [tokenizer.bos_token_id]
    assert format_prompt(math, tokenizer, chat_template=False, system_prompt="") == (
        bos + tokenizer("1+1=", add_special_tokens=False)["input_ids"])
    # Math defaults: the chat template (here BOS + the turns' contents) and the R1 prompt.
    assert format_prompt(math, tokenizer) == (
        bos + tokenizer(evaluation.R1_SYSTEM_PROMPT + "1+1=",
                        add_special_tokens=False)["input_ids"])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny_synthetic_ckpt")
    model, tokenizer = tiny()
    to_hf(model, str(directory))
    tokenizer.save_pretrained(str(directory))
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(config))
    return directory


def test_cli_eval_prints_table_and_paths(checkpoint, reference, tmp_path, capsys):
    # The reference run's shapes and sampling (so its compiled programs are reused).
    code = main(["eval", "--model", str(checkpoint), "--num-problems", str(NUM_PROBLEMS),
                 "--policies", "full,gkv", "--budgets", "32", "--window", "8",
                 "--divide-length", "8", "--max-new-tokens", "16", "--temperature", "1",
                 "--seed", "3", "--batch-size", "4", "--pass-k", "1",
                 "--output-dir", str(tmp_path), "--dtype", "float32"])
    assert code == 0
    out = capsys.readouterr().out
    assert "gkv@32" in out and "pass@1" in out and str(tmp_path / "summary.csv") in out
    rows = _file_rows(tmp_path / "results.jsonl")
    assert len(rows) == NUM_CONFIGS * NUM_PROBLEMS
    # Same weights (float32 round trip through the checkpoint), seeds and batches.
    first_samples = [r for r in reference.rows if r["sample"] == 0]
    assert sorted(map(json.dumps, _without_timing(rows))) == sorted(
        map(json.dumps, _without_timing(first_samples)))


def test_cli_eval_bad_input_exits_2(checkpoint, tmp_path, capsys):
    code = main(["eval", "--model", str(checkpoint), "--policies", "full,nope",
                 "--output-dir", str(tmp_path)])
    assert code == 2
    assert "valid policies are" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        main(["eval", "--model", str(checkpoint), "--budgets", "64,lots"])
    assert exit_.value.code == 2
    assert "--budgets" in capsys.readouterr().err


# ------------------------------------------------------------------ resume safety, plot


def _params_model(params):
    """Just what `weights_fingerprint` reads of a model."""
    return types.SimpleNamespace(params=lambda: params)


def test_weights_fingerprint_sees_any_changed_or_moved_value():
    model, _ = tiny()
    params = model.params()
    base = evaluation.weights_fingerprint(model)
    assert base == evaluation.weights_fingerprint(_params_model(params))
    q = params["layers"]["q_proj"]
    changed = dict(params, layers=dict(params["layers"], q_proj=q.at[1, 5, 2, 3].add(1e-6)))
    swapped = dict(params, layers=dict(params["layers"], q_proj=q.at[0, 0, 0, :2].set(
        q[0, 0, 0, 1::-1])))
    as_bf16 = dict(params, final_norm=params["final_norm"].astype(jnp.bfloat16))
    prints = {evaluation.weights_fingerprint(_params_model(p))
              for p in (changed, swapped, as_bf16)}
    assert len(prints | {base}) == 4


def _settings(weights="w1", problems=None):
    return {"dataset": "mine.jsonl", "temperature": 0.0, "weights": weights,
            "problems": problems if problems is not None else {"p-0": "a", "p-1": "b"}}


def test_resume_with_other_weights_is_refused_saying_how_to_start_fresh(tmp_path):
    evaluation.check_settings(str(tmp_path), _settings(), has_results=False)
    evaluation.check_settings(str(tmp_path), _settings(), has_results=True)
    with pytest.raises(ValueError) as err:
        evaluation.check_settings(str(tmp_path), _settings(weights="w2"), has_results=True)
    message = str(err.value)
    assert "weights: 'w1' there, 'w2' now (another checkpoint" in message
    assert "use another output_dir (--output-dir) or delete" in message


def test_resume_with_edited_problems_is_refused_and_new_ones_are_recorded(tmp_path):
    evaluation.check_settings(str(tmp_path), _settings(), has_results=False)
    # A line inserted at the top of the file: every id now names another problem.
    with pytest.raises(ValueError, match="2 problem.s. differ .* first 'p-0'"):
        evaluation.check_settings(str(tmp_path), _settings(
            problems={"p-0": "new", "p-1": "a", "p-2": "b"}), has_results=True)
    # More problems of the same file (a larger num_problems): accepted and recorded.
    grown = {"p-0": "a", "p-1": "b", "p-2": "c"}
    evaluation.check_settings(str(tmp_path), _settings(problems=grown), has_results=True)
    saved = json.loads((tmp_path / evaluation.SETTINGS_FILE).read_text())
    assert saved["problems"] == grown
    evaluation.check_settings(str(tmp_path), _settings(problems={"p-1": "b"}),
                              has_results=True)


def test_settings_without_fingerprints_are_refused(tmp_path):
    old = {k: v for k, v in _settings().items() if k not in ("weights", "problems")}
    (tmp_path / evaluation.SETTINGS_FILE).write_text(json.dumps(old))
    with pytest.raises(ValueError, match="no weights or problems fingerprint"):
        evaluation.check_settings(str(tmp_path), _settings(), has_results=True)


def test_evaluate_refuses_stale_rows_of_other_weights_or_problems(tmp_path, monkeypatch):
    model, tokenizer = tiny()
    examples = load_dataset("synthetic", 3)
    monkeypatch.setattr(evaluation_run, "engine_rows", _scripted_rows(tokenizer, examples))
    common = dict(policies="full", seed=100, output_dir=str(tmp_path), progress=False)

    def numbered(problems):  # ids by position, as for the lines of a .jsonl file
        return [dataclasses.replace(e, id=f"line-{i}") for i, e in enumerate(problems)]

    evaluate(model, tokenizer, numbered(examples[1:]), **common)
    other = Transformer(model.config, dtype=jnp.float32, rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="weights: .* there"):
        evaluate(other, tokenizer, numbered(examples[1:]), **common)
    with pytest.raises(ValueError, match="2 problem.s. differ .* first 'line-0'"):
        evaluate(model, tokenizer, numbered(examples), **common)  # a line inserted on top


def test_numpy_budgets_int_pass_k_and_plot_title(tmp_path, monkeypatch):
    model, tokenizer = tiny()
    examples = load_dataset("synthetic", 2)
    monkeypatch.setattr(evaluation_run, "engine_rows", _scripted_rows(tokenizer, examples))
    titles = []
    monkeypatch.setattr(evaluation_run, "plot_accuracy",
                        lambda summary, path, title: titles.append(title))
    report = evaluate(model, tokenizer, examples, policies="full,gkv",
                      budgets=np.array([32]), pass_k=1, seed=100, max_new_tokens=16,
                      output_dir=str(tmp_path), progress=False, model_name="tiny-qwen2")
    assert [s["name"] for s in report.summary] == ["full", "gkv@32"]
    assert type(report.summary[1]["budget"]) is int and "pass@1" in report.summary[1]
    longest = max(len(format_prompt(e, tokenizer)) for e in examples)
    assert titles == [f"tiny-qwen2 on custom: 2 problems, sequences up to {longest + 16} "
                      "tokens"]


def _summary(*entries):
    return [{"name": n, "policy": n.split("@")[0], "budget": b, "pass@1": a}
            for n, b, a in entries]


def test_single_budget_plot_draws_labelled_bars():
    summary = _summary(("full", None, 1.0), ("gkv@136", 136, 0.922), ("h2o@136", 136, 0.0),
                       ("snapkv@136", 136, 0.0))
    axes = evaluation.accuracy_figure(summary, "bundled on synthetic").axes[0]
    heights = [bar.get_height() for bar in axes.patches]
    assert heights == [1.0, 0.922, 0.0, 0.0]
    assert [t.get_text() for t in axes.texts] == ["100.0%", "92.2%", "0.0%", "0.0%"]
    # The budget is on the axis label; the ticks name the policies.
    assert [t.get_text() for t in axes.get_xticklabels()] == ["full", "gkv", "h2o", "snapkv"]
    assert "budget 136" in axes.get_xlabel()
    assert not axes.lines and axes.get_title() == "bundled on synthetic"


def test_multi_budget_plot_keeps_legend_off_the_data_and_lines_apart():
    summary = _summary(("full", None, 1.0), ("gkv@64", 64, 0.0), ("gkv@128", 128, 0.5),
                       ("h2o@64", 64, 0.0), ("h2o@128", 128, 0.0))
    figure = evaluation.accuracy_figure(summary)
    axes = figure.axes[0]
    renderer = figure.canvas.get_renderer()
    legend = axes.get_legend().get_window_extent(renderer)
    assert legend.y1 < axes.get_window_extent(renderer).y0  # below the axes
    gkv, h2o = (line for line in axes.lines if line.get_label() in ("gkv", "h2o"))
    assert gkv.get_marker() != h2o.get_marker()
    assert list(gkv.get_xdata()) != list(h2o.get_xdata())  # nudged apart at equal budgets
