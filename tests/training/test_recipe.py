"""The default recipe's learning rate: derived from the model's size by a documented rule
that gives the bundled model's and the G-KV paper's values at their sizes."""

from __future__ import annotations

import os

import pytest

from gkv_jax import training
from gkv_jax.eviction import EvictionConfig
from gkv_jax.loading import bundled_model_dir
from gkv_jax.models import ModelConfig
from gkv_jax.training import recipe

GKV = EvictionConfig(policy="gkv", budget=68, window=16, divide_length=16)


def test_rule_gives_the_measured_values_at_the_anchor_sizes():
    assert recipe.learning_rate_for(3_164_416) == pytest.approx(1e-4)
    for size in (1_500_000_000, 1_777_088_000, 7_615_616_512, 70_000_000_000):  # 1.5B, 7B ...
        assert recipe.learning_rate_for(size) == pytest.approx(1e-6)
    assert recipe.learning_rate_for(10_000) == pytest.approx(1e-4)  # held below the anchor
    sizes = [3e6, 1e7, 3e7, 1e8, 3e8, 1e9]
    rates = [recipe.learning_rate_for(int(n)) for n in sizes]
    assert all(a > b for a, b in zip(rates, rates[1:], strict=False))  # smaller, larger
    with pytest.raises(ValueError, match="num_parameters must be >= 1"):
        recipe.learning_rate_for(0)


def test_unset_learning_rate_is_chosen_for_the_model_and_a_set_one_kept():
    bundled = ModelConfig.from_hf_config(os.path.join(bundled_model_dir(), "config.json"))
    config, chosen = recipe.resolve(training.DistillConfig(eviction=GKV, steps=10), bundled)
    assert config.learning_rate == pytest.approx(1e-4)
    assert chosen["learning_rate"]["value"] == config.learning_rate
    assert "3,164,416 parameters" in chosen["learning_rate"]["rule"]
    qwen_1p5b = ModelConfig(family="qwen2", vocab_size=151936, hidden_size=1536,
                            intermediate_size=8960, num_layers=28, num_heads=12,
                            num_kv_heads=2, head_dim=128, qkv_bias=True)
    grpo, _ = recipe.resolve(training.GRPOConfig(eviction=GKV, steps=1), qwen_1p5b)
    assert grpo.learning_rate == pytest.approx(1e-6)
    fixed, chosen = recipe.resolve(
        training.DistillConfig(eviction=GKV, steps=10, learning_rate=3e-5), bundled)
    assert fixed.learning_rate == 3e-5 and chosen == {}
    with pytest.raises(ValueError, match="resolve the config for its model"):
        training.make_optimizer(training.configs.optimizer_config(
            training.DistillConfig(eviction=GKV, steps=10)), 10)


@pytest.mark.slow
def test_a_run_records_the_learning_rate_it_chose(tmp_path):
    import json

    from tests.training.test_post_training import distill_config, distill_data
    from tests.training.test_record import tiny_model

    model = tiny_model()
    config = distill_config(steps=1, learning_rate=None, checkpoint_every=0)
    _, history = training.distill(model, model, distill_data(), config,
                                  run_dir=str(tmp_path / "run"), progress=False)
    expected = float(f"{recipe.learning_rate_for(model.config.num_parameters()):.3g}")
    assert history[0] == {"step": 0, "recipe": {"learning_rate": {
        "value": expected, "rule": history[0]["recipe"]["learning_rate"]["rule"]}}}
    assert f"{model.config.num_parameters():,} parameters" in \
        history[0]["recipe"]["learning_rate"]["rule"]
    saved = json.loads((tmp_path / "run" / "run.json").read_text())
    assert saved["config"]["learning_rate"] == expected
    # the same call resumes the finished run without logging the recipe twice
    _, again = training.distill(model, model, distill_data(), config,
                                run_dir=str(tmp_path / "run"), progress=False)
    assert sum("recipe" in e for e in again) == 1
