"""The `gkv-jax` command line on a tiny saved checkpoint."""

from __future__ import annotations

import json

import pytest

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
    assert "cache_bytes" in printed and "tokens_per_second" in printed


def test_bad_budget_is_a_clear_error(checkpoint, capsys):
    code = main(["generate", "--model", str(checkpoint), "--prompt", "w1", "--budget", "4"])
    assert code == 2
    assert "budget must be > window" in capsys.readouterr().err


def test_smoke_runs(capsys):
    assert main(["smoke", "--max-new-tokens", "40"]) == 0
    assert "gkv" in capsys.readouterr().out
