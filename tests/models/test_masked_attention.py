"""The masked teacher-forced forward: `"segments"` equals `"dense"` (logits and gradients),
including a final partial segment; the mask is built from `visible_until` alone."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gkv_jax.eviction_record import NEVER
from gkv_jax.models import SegmentLayout, forward, forward_visible, lm_logits
from gkv_jax.models.masked_attention import segment_attention, visible_mask
from gkv_jax.training import token_log_probs_from_params
from tests.training.test_record import recorded, tiny_model


def _batch():
    from gkv_jax.training import batch_from_generation
    return batch_from_generation(recorded("gkv-long-prompt"))


def test_segments_equal_dense_logits_with_a_final_partial_segment():
    model = tiny_model()
    batch = _batch()
    layout = batch.segment_layout
    T = batch.tokens.shape[1]
    assert (T - layout.prompt_width) % layout.segment_length != 0, "a partial last segment"
    logits = {}
    for impl in ("dense", "segments"):
        hidden, used = forward_visible(model.config, model.params(), batch.tokens,
                                       batch.positions, batch.visible_until,
                                       attention_impl=impl, segments=layout)
        np.testing.assert_array_equal(np.asarray(used), np.asarray(batch.visible_until))
        logits[impl] = np.asarray(lm_logits(model.config, model.params(), hidden))
    real = np.asarray(batch.positions) >= 0
    np.testing.assert_allclose(logits["segments"][real], logits["dense"][real], atol=1e-5,
                               rtol=0)
    called = model(batch.tokens, batch.positions, visible_until=batch.visible_until,
                   attention_impl="segments", segments=layout)
    np.testing.assert_allclose(np.asarray(called)[real], logits["segments"][real], atol=1e-6,
                               rtol=0)


def test_dense_masked_forward_equals_the_boolean_mask_forward():
    """`forward_visible` builds per layer the mask `kv_mask` spells out as [L, B, K, T, T]."""
    model = tiny_model()
    batch = _batch()
    positions = batch.positions
    L = model.config.num_layers
    masks = jnp.stack([visible_mask(positions, positions, batch.visible_until[l])
                       for l in range(L)])
    hidden, _ = forward_visible(model.config, model.params(), batch.tokens, positions,
                                batch.visible_until)
    dense = lm_logits(model.config, model.params(), hidden)
    reference = forward(model.config, model.params(), batch.tokens, positions, kv_mask=masks)
    real = np.asarray(positions) >= 0
    np.testing.assert_allclose(np.asarray(dense)[real], np.asarray(reference)[real],
                               atol=1e-5, rtol=0)


# Slow: the forward values of the two implementations stay in the fast suite.
@pytest.mark.slow
def test_segments_gradients_equal_dense():
    model = tiny_model()
    batch = _batch()

    def loss(params, impl):
        log_probs = token_log_probs_from_params(model.config, params, batch,
                                                attention_impl=impl, chunk_rows=16)
        return -jnp.sum(log_probs)

    grads = {impl: jax.grad(loss)(model.params(), impl) for impl in ("dense", "segments")}
    for (path, dense), segments in zip(jax.tree_util.tree_leaves_with_path(grads["dense"]),
                                       jax.tree.leaves(grads["segments"]), strict=True):
        assert np.isfinite(np.asarray(dense)).all()
        scale = float(jnp.max(jnp.abs(dense))) + 1e-6
        np.testing.assert_allclose(np.asarray(segments), np.asarray(dense),
                                   atol=1e-4 * scale, rtol=0, err_msg=str(path))


def test_segment_attention_on_random_schedules_and_errors():
    """Keys expiring only at segment starts with at most `max_visible` alive: segments ==
    dense on random inputs, pads and ended rows included."""
    rng = np.random.default_rng(0)
    B, K, G, H, Wp, D, A = 2, 2, 2, 8, 5, 4, 6
    T = Wp + 3 * D + 2
    positions = np.tile(np.arange(T), (B, 1)) - 2
    positions[0, :2] = -1  # left pads
    positions[1] = np.arange(T) - 1
    positions[1, 0] = -1
    positions[1, T - 3:] = -1  # row 1 ended early
    until = np.full((B, K, T), NEVER, np.int64)
    for b in range(B):
        P = positions[b, Wp - 1] + 1
        for k in range(K):
            for e, start in enumerate(range(Wp, T, D)):
                alive = np.flatnonzero((positions[b] >= 0) & (np.arange(T) < start)
                                       & (until[b, k] == NEVER))
                if len(alive) > A:  # evict random keys down to A at this segment start
                    gone = rng.choice(alive, len(alive) - A, replace=False)
                    until[b, k, gone] = P + e * D
    until = np.where(positions[:, None, :] >= 0, until, 0)
    q = jnp.asarray(rng.normal(size=(B, T, K * G, H)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, K, T, H)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, K, T, H)), jnp.float32)
    layout = SegmentLayout(prompt_width=Wp, segment_length=D, max_visible=A)
    args = (q, k, v, jnp.asarray(positions, jnp.int32), jnp.asarray(until, jnp.int32))
    from gkv_jax.models.masked_attention import dense_visible_attention
    np.testing.assert_allclose(np.asarray(segment_attention(*args, layout)),
                               np.asarray(dense_visible_attention(*args)), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="max_visible must be an integer >= 1"):
        SegmentLayout(prompt_width=4, segment_length=2, max_visible=0)
    with pytest.raises(ValueError, match="exactly one of visible_until and visibility_fn"):
        forward_visible(tiny_model().config, tiny_model().params(), args[3], args[3])
    with pytest.raises(ValueError, match="needs segments="):
        forward_visible(tiny_model().config, tiny_model().params(), args[3], args[3],
                        jnp.zeros((2, B, 2, T), jnp.int32), attention_impl="segments")
