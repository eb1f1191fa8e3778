"""The command line's bad-input paths: every one is decided before any compilation (most
before any model loads), exits 2 with one `error:` line naming the flag or file, never
deletes a user's files, and Ctrl-C exits 130 saying where the results are."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import types

import pytest

import gkv_jax
from gkv_jax import cli
from gkv_jax.cli import args as cli_args
from gkv_jax.cli import build_parser, demo, main, post_train_data, smoke
from gkv_jax.loading import bundled_model_dir

COMMANDS = ("generate", "eval", "demo", "smoke", "post-train")


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if a command loads a model (its flags must be refused first)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")
    monkeypatch.setattr(gkv_jax, "load", refuse)


@pytest.fixture
def load_interrupted(monkeypatch):
    """Ctrl-C while the model loads."""
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(gkv_jax, "load", interrupt)


def _error_line(capsys, command: str) -> str:
    """The one line a failed command printed to stderr."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"gkv-jax {command}: error: "), lines[0]
    return lines[0]


# --------------------------------------------------------------------------------------------
# demo --output-dir: nothing of the user's is deleted (case 138).


def _user_dir(tmp_path):
    directory = tmp_path / "d"
    (directory / "sub").mkdir(parents=True)
    (directory / "keep.txt").write_text("x")
    (directory / "sub" / "data.csv").write_text("a,b\n")
    return directory


def test_demo_refuses_a_non_empty_directory_it_did_not_write(tmp_path, capsys, no_model_load):
    directory = _user_dir(tmp_path)
    assert main(["demo", "--output-dir", str(directory)]) == 2
    line = _error_line(capsys, "demo")
    assert "--output-dir" in line and str(directory) in line and "not empty" in line
    assert "new or empty directory" in line
    assert (directory / "keep.txt").read_text() == "x"
    assert (directory / "sub" / "data.csv").exists()


def test_demo_checks_its_flags_before_touching_the_directory(tmp_path, capsys, no_model_load):
    directory = tmp_path / "demo"
    directory.mkdir()
    (directory / demo.DEMO_MARKER).write_text("")
    (directory / "results.jsonl").write_text("{}\n")
    assert main(["demo", "--budget", "8", "--output-dir", str(directory)]) == 2
    line = _error_line(capsys, "demo")
    assert "--budget: budget must be > window (=16), got 8" in line
    assert (directory / "results.jsonl").exists()


def test_demo_refuses_a_file_as_output_dir(tmp_path, capsys, no_model_load):
    path = tmp_path / "notes.txt"
    path.write_text("x")
    assert main(["demo", "--output-dir", str(path)]) == 2
    assert "--output-dir" in _error_line(capsys, "demo") and path.read_text() == "x"


def test_demo_over_its_own_output_removes_only_its_files(tmp_path, capsys, load_interrupted):
    directory = tmp_path / "demo"
    (directory / "distilled").mkdir(parents=True)
    (directory / demo.DEMO_MARKER).write_text("")
    demo_files = [directory / "results.jsonl", directory / "summary.csv",
                  directory / "settings.json", directory / "distilled" / "results.jsonl"]
    for path in demo_files:
        path.write_text("old")
    (directory / "my_notes.txt").write_text("mine")
    # Ctrl-C while the model loads: the directory has been prepared by then.
    assert main(["demo", "--output-dir", str(directory)]) == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and str(directory) in err and "Traceback" not in err
    assert not any(path.exists() for path in demo_files)
    assert not (directory / "distilled").exists()  # emptied, so removed
    assert (directory / "my_notes.txt").read_text() == "mine"
    assert (directory / demo.DEMO_MARKER).exists() and (directory / ".gkv-jax-eval").exists()


def test_demo_marks_a_new_directory_as_its_own(tmp_path, load_interrupted):
    directory = tmp_path / "new" / "demo"
    assert main(["demo", "--output-dir", str(directory)]) == 130
    assert sorted(os.listdir(directory)) == [demo.DEMO_MARKER, ".gkv-jax-eval"]


def test_demo_policies_default_to_every_registered_policy():
    parse = build_parser().parse_args
    assert demo.demo_policies(parse(["demo"])) == list(gkv_jax.eviction.POLICIES)
    assert {"tova", "l2norm"} <= set(demo.demo_policies(parse(["demo"])))
    assert demo.demo_policies(parse(["demo", "--policies", "full, tova,l2norm"])) == [
        "full", "tova", "l2norm"]


def test_demo_refuses_an_unknown_policy_before_touching_the_directory(tmp_path, capsys,
                                                                       no_model_load):
    directory = tmp_path / "demo"
    assert main(["demo", "--policies", "gkv,nope", "--output-dir", str(directory)]) == 2
    line = _error_line(capsys, "demo")
    assert "--policies" in line and "'nope'" in line and "tova" in line
    assert not directory.exists()


# --------------------------------------------------------------------------------------------
# Unreadable checkpoints and datasets, seeds, missing packages: exit 2, one line.


@pytest.fixture
def broken_checkpoint(tmp_path):
    """A copy of the bundled model's small files; tests break one of them."""
    directory = tmp_path / "ckpt"
    directory.mkdir()
    for name in os.listdir(bundled_model_dir()):
        if name != "model.safetensors":
            shutil.copy(os.path.join(bundled_model_dir(), name), directory)
    with open(os.path.join(bundled_model_dir(), "model.safetensors"), "rb") as f:
        head = f.read(4096)
    (directory / "model.safetensors").write_bytes(head)  # truncated (case 119)
    return directory


def test_truncated_safetensors_is_one_error_line(broken_checkpoint, capsys):
    assert main(["generate", "--model", str(broken_checkpoint), "--prompt", "x",
                 "--policy", "full", "--dtype", "float32"]) == 2
    line = _error_line(capsys, "generate")
    assert f"--model {broken_checkpoint}" in line and "safetensors" in line.lower()


def test_config_missing_a_field_is_one_error_line(broken_checkpoint, capsys):
    config = json.loads((broken_checkpoint / "config.json").read_text())
    del config["num_attention_heads"]
    (broken_checkpoint / "config.json").write_text(json.dumps(config))
    assert main(["eval", "--model", str(broken_checkpoint), "--policies", "full",
                 "--output-dir", str(broken_checkpoint / "out")]) == 2
    line = _error_line(capsys, "eval")
    assert f"--model {broken_checkpoint}" in line and "num_attention_heads" in line


def test_config_cut_mid_object_is_one_error_line(broken_checkpoint, capsys):
    text = (broken_checkpoint / "config.json").read_text()
    (broken_checkpoint / "config.json").write_text(text[:30])
    assert main(["generate", "--model", str(broken_checkpoint), "--prompt", "x",
                 "--policy", "full"]) == 2
    assert f"--model {broken_checkpoint}" in _error_line(capsys, "generate")


def test_bad_utf8_dataset_names_the_flag_and_file(tmp_path, capsys, no_model_load):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\xff\xfe{\"question\": \"q\", \"answer\": \"1\"}\n")
    assert main(["eval", "--model", "unused", "--dataset", str(path)]) == 2
    line = _error_line(capsys, "eval")
    assert str(path) in line and "utf-8" in line.lower()


def test_post_train_jsonl_with_bad_utf8_names_file_and_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b'{"prompt_ids": [1], "completion_ids": [2]}\n\xff\xfe\n')
    with pytest.raises(cli.CommandError, match=r"--dataset: .*pairs\.jsonl line 2 is not UTF-8"):
        post_train_data._jsonl_pairs(str(path), None, None)


@pytest.mark.parametrize("argv", [
    ["generate", "--model", "m", "--prompt", "x", "--seed"],
    ["eval", "--model", "m", "--seed"],
    ["smoke", "--seed"],
    ["post-train", "grpo", "--model", "m", "--output-dir", "o", "--budget", "64",
     "--steps", "1", "--seed"],
])
@pytest.mark.parametrize("seed", ["4294967296", "-1", "1.5"])
def test_seed_outside_uint32_is_refused_by_argparse(argv, seed, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*argv, seed])
    assert exit_.value.code == 2
    assert f"argument --seed: must be an integer in [0, 4294967295], got '{seed}'" in (
        capsys.readouterr().err)


def test_seeds_up_to_2_to_the_32_are_accepted():
    args = build_parser().parse_args(["generate", "--model", "m", "--prompt", "x",
                                      "--seed", "4294967295"])
    assert args.seed == 2**32 - 1


def test_eval_seed_plus_samples_past_2_to_the_32(capsys, no_model_load):
    assert main(["eval", "--model", "m", "--seed", "4294967295", "--samples", "2",
                 "--temperature", "0.5"]) == 2
    assert "--seed: --seed + --samples - 1 must be below 4294967296" in _error_line(
        capsys, "eval")


def test_missing_package_is_one_error_line(monkeypatch, capsys):
    def missing(*args, **kwargs):
        raise ImportError("apply_chat_template requires jinja2")
    monkeypatch.setattr(gkv_jax, "load", missing)
    assert main(["generate", "--model", "m", "--prompt", "x", "--policy", "full"]) == 2
    assert "a package this command needs is missing: apply_chat_template requires jinja2" in (
        _error_line(capsys, "generate"))


def test_unexpected_errors_are_not_swallowed(monkeypatch):
    def bug(*args, **kwargs):
        raise TypeError("a genuine bug")
    monkeypatch.setattr(gkv_jax, "load", bug)
    with pytest.raises(TypeError, match="a genuine bug"):
        main(["generate", "--model", "m", "--prompt", "x", "--policy", "full"])


# --------------------------------------------------------------------------------------------
# Order of checks: everything that needs no model is refused before it loads (case F).


@pytest.mark.parametrize("command, flags, message", [
    ("eval", ["--dataset", "aime2024"], "--dataset: dataset must be one of"),
    ("eval", ["--dataset", "missing.jsonl"], "missing.jsonl does not exist"),
    ("eval", ["--dataset", "aime24", "--num-problems", "31"], "--num-problems: num_problems"),
    ("eval", ["--temperature", "-1"], "--temperature: temperature must be"),
    ("eval", ["--top-p", "0"], "--top-p: top_p must be"),
    ("eval", ["--top-k", "-1"], "--top-k: top_k must be"),
    ("eval", ["--policies", "gkv", "--budgets", "8", "--window", "16"],
     "--budgets: budget must be > window"),
    ("eval", ["--policies", "gkv,nope"], "--policies: policies: unknown policy 'nope'"),
    ("generate", ["--prompt", "x", "--policy", "full", "--temperature", "inf"],
     "--temperature: temperature must"),
    ("generate", ["--prompt", "x", "--policy", "full", "--top-p", "1.5"],
     "--top-p: top_p must be"),
    ("generate", ["--prompt", "x", "--budget", "4"], "--budget: budget must be > window"),
    ("generate", ["--prompt", "x"], "--budget: budget is required"),
    ("generate", ["--prompt", "x", "--policy", "full", "--budget", "64"],
     "--budget: budget is not used by policy 'full', which never evicts"),
    ("generate", ["--prompt", "x", "--policy", "full", "--window", "8"],
     "--window: window is not used by policy 'full'"),
])
def test_flags_are_checked_before_the_model_loads(command, flags, message, capsys,
                                                  no_model_load):
    assert main([command, "--model", "never/loaded", *flags]) == 2
    assert message in _error_line(capsys, command)


@pytest.mark.parametrize("argv, flag", [
    (["eval", "--model", "m", "--batch-size", "0"], "--batch-size"),
    (["eval", "--model", "m", "--samples", "0"], "--samples"),
    (["eval", "--model", "m", "--num-problems", "-1"], "--num-problems"),
    (["eval", "--model", "m", "--pass-k", "1,0"], "--pass-k"),
    (["generate", "--model", "m", "--prompt", "x", "--max-new-tokens", "0"],
     "--max-new-tokens"),
    (["demo", "--batch-size", "0"], "--batch-size"),
    (["smoke", "--max-new-tokens", "0"], "--max-new-tokens"),
])
def test_counts_below_one_are_refused_by_argparse(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert f"argument {flag}:" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Ctrl-C: exit 130, where the results are and how to go on.


def test_ctrl_c_during_eval_says_how_to_resume(tmp_path, capsys, load_interrupted):
    out = tmp_path / "run"
    assert main(["eval", "--model", "m", "--policies", "full", "--output-dir", str(out)]) == 130
    err = capsys.readouterr().err
    assert str(out / "results.jsonl") in err and "same command again to resume" in err


def test_ctrl_c_during_post_train_says_how_to_resume(tmp_path, capsys, load_interrupted):
    out = tmp_path / "pt"
    assert main(["post-train", "distill", "--model", "m", "--output-dir", str(out),
                 "--budget", "64", "--steps", "1"]) == 130
    err = capsys.readouterr().err
    assert str(out / "run") in err and "same command again to resume" in err


def test_ctrl_c_during_generate(capsys, load_interrupted):
    assert main(["generate", "--model", "m", "--prompt", "x", "--policy", "full"]) == 130
    assert "interrupted; nothing was saved" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Help: every command listed, every flag explained with its default.


def _subparsers(parser: argparse.ArgumentParser):
    """(name, parser) of every command and post-train method, recursively."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                yield from _subparsers(sub)


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    description = build_parser().description
    for command in COMMANDS:
        assert f"{command} (" in description
    printed = capsys.readouterr().out
    assert all(command in printed for command in COMMANDS)


def test_every_flag_has_help_and_shows_its_default(capsys):
    commands = dict(_subparsers(build_parser()))
    assert set(COMMANDS) | {"distill", "grpo"} <= set(commands)
    for name, parser in commands.items():
        with pytest.raises(SystemExit) as exit_:
            parser.parse_args(["--help"])
        assert exit_.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help, f"{name} {action.option_strings}: no help"
            default = action.default
            if action.required or default is None or isinstance(default, bool) or (
                    default is argparse.SUPPRESS):
                continue
            if isinstance(default, list):
                default = ",".join(map(str, default))
            assert f"(default: {default})" in text, f"{name} {action.option_strings}"


def test_dtype_defaults_to_the_checkpoints_own():
    for argv in (["generate", "--model", "m", "--prompt", "x"], ["eval", "--model", "m"]):
        assert build_parser().parse_args(argv).dtype is None


def test_bos_flag():
    parse = build_parser().parse_args
    base = ["generate", "--model", "m", "--prompt", "x"]
    assert [parse(base + flag).bos for flag in ([], ["--bos"], ["--no-bos"])] == [
        None, True, False]


# --------------------------------------------------------------------------------------------
# Pure helpers: flag names in library messages, stats printing, smoke's checks.


@pytest.mark.parametrize("argv, message, expected", [
    (["generate", "--model", "m", "--prompt", "x"], "top_p must be in (0, 1], got 2",
     "--top-p: top_p must be in (0, 1], got 2"),
    (["eval", "--model", "m"], "budget must be > window (=16), got 8",
     "--budgets: budget must be > window (=16), got 8"),
    (["generate", "--model", "m", "--prompt", "x"], "prompts[0] is empty",
     "--prompt: prompts[0] is empty"),
    (["generate", "--model", "m", "--prompt", "x"], "something else went wrong",
     "something else went wrong"),
    (["demo"], "command is not a flag", "command is not a flag"),
    (["post-train", "distill", "--model", "m", "--output-dir", "o", "--budget", "8",
      "--steps", "1"], "DistillConfig.steps must be an integer in [1, 2147483647], got -3",
     "--steps must be an integer in [1, 2147483647], got -3"),
    (["post-train", "grpo", "--model", "m", "--output-dir", "o", "--budget", "8", "--steps",
      "1"], "GRPOConfig.prompt_width must be", "GRPOConfig.prompt_width must be"),
])
def test_name_flag_puts_the_flag_before_library_messages(argv, message, expected):
    assert cli.name_flag(message, build_parser().parse_args(argv)) == expected


def test_format_stats_copes_with_any_keys():
    text = cli_args.format_stats({"cache_bytes": 2**20, "tokens_per_second": 12.3456,
                                  "idle_steps": 3, "eos_token_ids": [1, 2], "odd_bytes": None,
                                  "note": "x"})
    assert text.splitlines() == ["  cache_bytes: 1.00 MiB", "  tokens_per_second: 12.346",
                                 "  idle_steps: 3", "  eos_token_ids: [1, 2]",
                                 "  odd_bytes: None", "  note: x"]


def _fake_output(tokens, **stats):
    return types.SimpleNamespace(tokens=tokens, stats={"capacity": 0, "compressions": 0} | stats)


def test_smoke_checks_report_each_mismatch():
    from gkv_jax.eviction import EvictionConfig

    configs = {"full": EvictionConfig(policy="full"),
               "gkv@64": EvictionConfig(policy="gkv", budget=64, window=8, divide_length=32),
               "gkv-roomy": EvictionConfig(policy="gkv", budget=200, divide_length=32)}
    tokens = [[5] * 100, [6] * 100]
    good = {"full": _fake_output(tokens, capacity=139),
            "gkv@64": _fake_output(tokens, capacity=96, compressions=2),
            "gkv-roomy": _fake_output(tokens, capacity=232)}
    assert all(held for _, held in smoke.smoke_checks(good, configs, 100, 40))
    bad = dict(good, **{"gkv-roomy": _fake_output([[5] * 100, [6] * 99 + [7]], capacity=232),
                        "gkv@64": _fake_output(tokens, capacity=97, compressions=0)})
    failed = [text for text, held in smoke.smoke_checks(bad, configs, 100, 40) if not held]
    assert len(failed) == 3
    assert any("gkv-roomy" in text and "exactly the full cache's tokens" in text
               for text in failed)
    assert any("capacity budget + divide_length = 96, got 97" in text for text in failed)
    assert any("compresses" in text for text in failed)


@pytest.mark.parametrize("make", ["user files", "a file"])
def test_eval_refuses_an_output_dir_it_does_not_own_before_the_model_loads(
        make, tmp_path, capsys, no_model_load):
    target = tmp_path / "out"
    if make == "a file":
        target.write_text("mine")
    else:
        target.mkdir()
        (target / "settings.json").write_text('{"editor.fontSize": 14}')
        (target / "summary.csv").write_text("my,data\n")
    before = {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert main(["eval", "--model", "never/loaded", "--output-dir", str(target)]) == 2
    line = _error_line(capsys, "eval")
    assert "--output-dir: output_dir: " in line
    assert ("is a file" if make == "a file" else "is not an evaluation's output") in line
    assert {p.name: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
