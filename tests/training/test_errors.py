"""Bad input to the post-training pieces: a ValueError/TypeError naming the parameter."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from gkv_jax import training
from gkv_jax.eviction import EvictionConfig
from gkv_jax.generation import GenerateOutput
from tests.training.test_record import tiny_model

GKV = EvictionConfig(policy="gkv", budget=20, window=4, divide_length=6)


def test_batch_from_completions_rejects_bad_ids_and_widths():
    with pytest.raises(ValueError, match="prompt_ids must be a non-empty list"):
        training.batch_from_completions([], [])
    with pytest.raises(ValueError, match="same number of rows"):
        training.batch_from_completions([[1, 2]], [[3], [4]])
    with pytest.raises(ValueError, match=r"completion_ids\[0\] needs at least 1 token"):
        training.batch_from_completions([[1, 2]], [[]])
    with pytest.raises(ValueError, match=r"prompt_ids\[0\] must hold integer token ids"):
        training.batch_from_completions([[1.5, 2.0]], [[3]])
    with pytest.raises(ValueError, match=r"completion_ids\[0\] has a negative token id"):
        training.batch_from_completions([[1]], [[-3]])
    with pytest.raises(ValueError, match=r"prompt_ids\[0\] must be a list of token ids"):
        training.batch_from_completions(["text"], [[3]])
    with pytest.raises(ValueError, match=r"width must be an integer >= the longest prompt \(3\)"):
        training.batch_from_completions([[1, 2, 3]], [[4]], width=2)
    batch = training.batch_from_completions([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], width=4)
    assert batch.tokens.tolist() == [[0, 1, 2, 3, 5, 0], [0, 0, 0, 4, 7, 8]]
    assert batch.positions.tolist() == [[-1, 0, 1, 2, 3, -1], [-1, -1, -1, 0, 1, 2]]
    assert batch.loss_mask.tolist() == [[True, True, False], [True, True, True]]
    with pytest.raises(ValueError, match=r"visible_until must be \[L, B=2, K, T=6\]"):
        batch.with_visible_until(jnp.zeros((2, 2, 2, 5), jnp.int32), GKV)


def test_batch_from_generation_needs_the_record_and_its_prompts():
    out = GenerateOutput(tokens=[[5, 6]], texts=None, logprobs=None, kept_positions=None,
                         stats={"prompt_bucket": 16}, prompt_ids=[[1, 2]])
    with pytest.raises(ValueError, match="return_eviction_record=True"):
        training.batch_from_generation(out)
    from gkv_jax.eviction_record import EvictionRecord
    record = EvictionRecord(visible_until=np.zeros((1, 1, 1, 4), np.int32),
                            prompt_lengths=np.array([2]), lengths=np.array([2]), eviction=GKV)
    out.eviction_record = record
    with pytest.raises(ValueError, match=r"prompts\[0\] is not the prompt this generation fed"):
        training.batch_from_generation(out, [[1, 3]])
    with pytest.raises(ValueError, match="prompts has 2 rows, the generation 1"):
        training.batch_from_generation(out, [[1, 2], [1, 2]])


def test_token_log_probs_and_replay_reject_bad_arguments():
    model = tiny_model()
    batch = training.batch_from_completions([[1, 2, 3]], [[4, 5]])
    for bad in (0, -1.0, float("inf"), float("nan"), True, "1"):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            training.token_log_probs(model, batch, temperature=bad)
    with pytest.raises(ValueError, match="either temperature or sampling"):
        training.token_log_probs(model, batch, temperature=0.5, sampling=dict(temperature=1.0))
    with pytest.raises(ValueError, match="top_p must be in"):
        training.token_log_probs(model, batch, sampling=dict(temperature=1.0, top_p=0.0))
    with pytest.raises(ValueError, match="chunk_rows must be an integer >= 1"):
        training.token_log_probs(model, batch, chunk_rows=0)
    with pytest.raises(ValueError, match="masks of an evicting policy"):
        training.token_log_probs(model, batch, attention_impl="segments")
    with pytest.raises(ValueError, match="attention_impl must be one of"):
        training.token_log_probs(model, batch, attention_impl="flash")
    with pytest.raises(TypeError, match="batch must be a TeacherForcedBatch"):
        training.token_log_probs(model, {"tokens": batch.tokens})
    with pytest.raises(TypeError, match="eviction must be an EvictionConfig"):
        training.replay_evictions(model, "gkv", batch)
    with pytest.raises(ValueError, match='attention_impl must be "dense" or "segments"'):
        training.replay_evictions(model, GKV, batch, attention_impl="flash")
