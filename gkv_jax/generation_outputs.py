"""The results of `generate`: `GenerateOutput`, and what fills it from the program's outputs.

Each row trimmed after its first EOS (`_trim`), the statistics (`_stats`,
`_bytes_per_device`), the host `EvictionRecord` (`_eviction_record`), and `to_host`, which
brings a (possibly sharded, possibly multi-process) array back to this host.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gkv_jax.eviction_record import NEVER, EvictionRecord


@dataclasses.dataclass
class GenerateOutput:
    """What `generate` returns.

    Attributes:
      tokens: per prompt, the generated ids up to and including the first EOS.
      texts: the decoded `tokens` (None without a tokenizer).
      logprobs: per prompt, the log-probability of each generated token under the
        distribution it was sampled from (None unless `return_logprobs`).
      kept_positions: [L, B, K, C] int32 true positions held in the cache after the forward
        that produced each sequence's last token; -1 marks an empty slot (None unless
        `return_kept_positions`).
      stats: cache_bytes (of the prompts' rows), cache_bytes_per_device (what one device
        holds, padding rows included), devices, full_cache_bytes, tokens_per_second
        (generated tokens per second of the forwards that served some sequence, see
        `_stats`), compile_seconds,
        run_seconds, compressions, forwards (model forwards run, prefill included),
        idle_steps (forwards run after every sequence had finished: the rest of the last
        `divide_length` cycle), prompt_bucket, capacity, generated_tokens, eos_token_ids.
      eviction_record: the `EvictionRecord` (which keys every query attended to, per layer
        and KV head), None unless `return_eviction_record`.
      prompt_ids: per prompt, the token ids that were fed (after tokenization).
    """

    tokens: list[list[int]]
    texts: list[str] | None
    logprobs: list[list[float]] | None
    kept_positions: np.ndarray | None
    stats: dict[str, Any]
    eviction_record: EvictionRecord | None = None
    prompt_ids: list[list[int]] | None = None


def _trim(tokens: np.ndarray, log_probs: np.ndarray, eos: np.ndarray):
    """Each row up to and including its first EOS."""
    out_tokens, out_log_probs = [], []
    for row, lp in zip(tokens, log_probs, strict=True):
        hits = np.flatnonzero(np.isin(row, eos))
        end = int(hits[0]) + 1 if hits.size else len(row)
        out_tokens.append(row[:end].tolist())
        out_log_probs.append(lp[:end].tolist())
    return out_tokens, out_log_probs


def _stats(model, state, ids, generated, capacity, width, compile_s, run_s, compressions):
    """The run's statistics.

    Forward i (the prefill is forward 0) produces token i of every unfinished sequence, so
    the longest answer took `max(len(g))` forwards and the rest of the last cycle ran idle
    (`idle_steps`). The program is one device call and cannot time its steps separately:
    `tokens_per_second` divides the generated tokens by run_seconds scaled by the share of
    active forwards, which assumes every forward costs the same (the prefill of a long
    prompt costs more, so short answers to long prompts read a little low).
    """
    config = model.config
    itemsize = jnp.dtype(model.dtype).itemsize
    final_length = max(len(p) + len(g) for p, g in zip(ids, generated, strict=True))
    per_slot = config.num_layers * len(ids) * config.num_kv_heads * 2 * config.head_dim * itemsize
    total = sum(len(g) for g in generated)
    forwards = int(state.step)
    active = min(forwards, max(len(g) for g in generated))
    active_s = run_s * active / forwards if forwards else run_s
    return {
        # The caller's rows only: rows a mesh padded the batch with are not theirs.
        "cache_bytes": state.cache.num_bytes() * len(ids) // state.cache.lengths.shape[0],
        "full_cache_bytes": per_slot * final_length,
        "tokens_per_second": total / active_s if active_s > 0 else float("inf"),
        "compile_seconds": compile_s,
        "run_seconds": run_s,
        "compressions": compressions,
        "forwards": forwards,
        "idle_steps": forwards - active,
        "prompt_bucket": width,
        "capacity": capacity,
        "generated_tokens": total,
    }


def to_host(array) -> np.ndarray:
    """A (possibly sharded, possibly multi-process) array as one numpy array on this host:
    every process gets the whole value. An array split over several processes is gathered
    by a collective: every process must call this, in the same order."""
    if getattr(array, "is_fully_addressable", True):
        return np.asarray(array)
    if array.is_fully_replicated:  # every process already holds all of it
        return np.asarray(array.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def _bytes_per_device(cache) -> int:
    """Bytes of the cache held by one device (the first): its shard of every buffer."""
    total = 0
    for leaf in jax.tree.leaves(cache):
        shards = getattr(leaf, "addressable_shards", None)
        shape = shards[0].data.shape if shards else leaf.shape
        total += int(np.prod(shape)) * leaf.dtype.itemsize
    return total


def _eviction_record(config, eviction, outputs, ids, generated, max_new_tokens):
    """The host `EvictionRecord`, cut to [L, B, K, P_max + max_new_tokens]."""
    width = max(len(p) for p in ids) + max_new_tokens
    if outputs.visible_until is None:  # "full" never evicts
        visible_until = np.full((config.num_layers, len(ids), config.num_kv_heads, width),
                                NEVER, np.int32)
    else:
        visible_until = to_host(outputs.visible_until)[:, :len(ids), :, :width]
    return EvictionRecord(
        visible_until=visible_until,
        prompt_lengths=np.asarray([len(p) for p in ids], np.int32),
        lengths=np.asarray([len(g) for g in generated], np.int32), eviction=eviction)
