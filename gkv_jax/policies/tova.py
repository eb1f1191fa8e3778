"""TOVA (Token Omission Via Attention; Oren et al., 2024): keep the rows the current token's
query attends to most. Only the last query scores (no window mean), with no pooling and no
history; per KV head, the maximum over its query heads, as every policy here."""

from __future__ import annotations

from gkv_jax.policies.registry import Policy, register_policy


def tova_score(cfg, ops, queries, keys, valid, global_score):
    """F = the attention probability of the last query on each candidate row.

    The last query sits at row S - 1 and sees every valid row; scored as a window of one
    query, its S - 1 older rows come back, of which the S - W oldest are the candidates.
    """
    last_query = queries[:, :, -1:]
    attention = ops.score_update(last_query, keys, valid, normalise=False)
    return attention[..., : keys.shape[2] - cfg.window], None


TOVA = register_policy(Policy(
    "tova", tova_score, knobs={"window": 1}, window_role="current_query",
    about="TOVA: attention of the current query only (no pooling, no history)"))
