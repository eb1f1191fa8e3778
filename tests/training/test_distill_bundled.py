"""A shortened distillation demo on the bundled model (slow): a few steps at gkv budget 68
lift its held-out accuracy there by at least 15 points, the full cache stays above 95%;
and the shipped distilled checkpoint is what docs/results/post-training.md reports."""

from __future__ import annotations

import os

import pytest

import gkv_jax
from gkv_jax import training
from gkv_jax.cli.post_train_data import synthetic_pairs
from gkv_jax.evaluation import evaluate
from gkv_jax.eviction import EvictionConfig
from gkv_jax.loading import bundled_model_dir

GKV68 = EvictionConfig(policy="gkv", budget=68, window=16, divide_length=16)


def _accuracy(model, tokenizer, policies, budgets, problems, directory):
    report = evaluate(model, tokenizer, "synthetic", policies=policies, budgets=budgets,
                      window=16, divide_length=16, num_problems=problems, batch_size=problems,
                      output_dir=directory, progress=False)
    return {entry["name"]: entry["pass@1"] for entry in report.summary}


@pytest.mark.slow
def test_short_distillation_lifts_gkv_at_budget_68(tmp_path):
    model, tokenizer = gkv_jax.load(bundled_model_dir(), dtype="float32")
    data = synthetic_pairs(tokenizer, 128)
    config = training.DistillConfig(eviction=GKV68, steps=12, batch_size=8,
                                    learning_rate=1e-4, checkpoint_every=0)
    trained, history = training.distill(model, model, data, config,
                                        run_dir=str(tmp_path / "run"), progress=False)
    assert history[-1]["loss"] < history[0]["loss"]
    before = _accuracy(model, tokenizer, ("gkv",), (68,), 40, str(tmp_path / "before"))
    after = _accuracy(trained, tokenizer, ("full", "gkv"), (68,), 40, str(tmp_path / "after"))
    assert after["gkv@68"] >= before["gkv@68"] + 0.15, (before, after)
    assert after["full"] >= 0.95, after


def test_the_distilled_checkpoint_ships_and_loads():
    directory = bundled_model_dir("distilled")
    size = sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))
    assert size < 20 * 2**20
    distilled, tokenizer = gkv_jax.load(directory, dtype="float32")
    base, _ = gkv_jax.load(bundled_model_dir(), dtype="float32")
    assert distilled.config == base.config and len(tokenizer) == base.config.vocab_size
    with pytest.raises(ValueError, match="variant must be one of"):
        bundled_model_dir("other")


def test_the_chain_model_ships_beside_the_bundled_one():
    """The second model: the bundled architecture and tokenizer, other weights."""
    from gkv_jax.models import ModelConfig

    chain, base = bundled_model_dir("chain"), bundled_model_dir()
    size = sum(os.path.getsize(os.path.join(chain, f)) for f in os.listdir(chain))
    assert size < 20 * 2**20
    assert ModelConfig.from_hf_config(os.path.join(chain, "config.json")) == \
        ModelConfig.from_hf_config(os.path.join(base, "config.json"))
    with open(os.path.join(chain, "model.safetensors"), "rb") as a, \
            open(os.path.join(base, "model.safetensors"), "rb") as b:
        assert a.read() != b.read()


@pytest.mark.slow
def test_the_chain_model_solves_its_task_with_a_full_cache(tmp_path):
    model, tokenizer = gkv_jax.load(bundled_model_dir("chain"), dtype="float32")
    report = evaluate(model, tokenizer, "synthetic-chain", policies=("full",), num_problems=20,
                      batch_size=20, output_dir=str(tmp_path), progress=False)
    assert report.summary[0]["pass@1"] >= 0.95, report.summary
