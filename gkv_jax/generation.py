"""`gkv_jax.generate`: prompts in, tokens out, through one compiled decode program.

The host side only tokenizes, pads to a prompt-length bucket, and trims the results; the
whole generation (prefill, decode cycles, evictions, sampling) is one XLA program compiled
once per (model config, eviction config, batch size, bucket, max_new_tokens, number of EOS
ids). Sampling parameters, the seed and the EOS id values are traced, so changing them never
recompiles.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gkv_jax.decode import generate_tokens
from gkv_jax.distributed import global_array
from gkv_jax.eviction import EvictionConfig
from gkv_jax.eviction_record import NEVER, EvictionRecord
from gkv_jax.sampling import SamplingParams
from gkv_jax.sharding import mesh as mesh_lib
from gkv_jax.sharding.placement import placed_mesh, shard_model
from gkv_jax.sharding.rules import batch_spec
from gkv_jax.token_ids import check_vocabulary, token_ids
from gkv_jax.token_ids import is_int as _is_int

MIN_BUCKET = 16
SEED_LIMIT = 2**32  # seeds are uint32 PRNG seeds


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


# One compiled executable per static signature; the number of entries is the number of
# compilations this process has done (tests count them).
_COMPILED: dict[tuple, Any] = {}


def compiled_programs() -> int:
    """How many distinct generation programs have been compiled in this process."""
    return len(_COMPILED)


def bucket_length(length: int, buckets: Sequence[int] | None) -> int:
    """The padded prompt length: the smallest bucket >= length (powers of two by default)."""
    if buckets is None:
        return max(MIN_BUCKET, 1 << (length - 1).bit_length())
    fitting = [b for b in sorted(buckets) if b >= length]
    if not fitting:
        raise ValueError(
            f"prompt_buckets: the longest prompt has {length} tokens, above the largest "
            f"bucket {max(buckets)}")
    return fitting[0]


def row_seeds(seed, rows: int) -> np.ndarray:
    """[rows] int32 per-row seeds: `seed` + b (mod 2**32) for row b of an int `seed`, or
    the given per-prompt seeds. Seeds in [2**31, 2**32) become the negative int32 values with
    the same 32 bits, which `jax.random.PRNGKey` reads as the same uint32 seed.

    Raises:
      ValueError: naming `seed`: not an integer in [0, 2**32), or a list of the wrong length.
    """
    if isinstance(seed, list | tuple | np.ndarray):
        if len(seed) != rows:
            raise ValueError(f"seed: a list of seeds needs one per prompt ({rows}), got "
                             f"{len(seed)}")
        for i, value in enumerate(seed):
            if not _is_int(value) or not 0 <= value < SEED_LIMIT:
                raise ValueError(f"seed[{i}] must be an integer in [0, 2**32), got {value!r}")
        values = [int(v) for v in seed]
    else:
        if not _is_int(seed) or not 0 <= seed < SEED_LIMIT:
            raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r} (or a "
                             f"list of such seeds, one per prompt)")
        values = [(int(seed) + b) % SEED_LIMIT for b in range(rows)]
    return np.asarray(values, np.uint32).view(np.int32)


def _tokenize(prompts, tokenizer, chat_template: bool, system_prompt: str | None,
              add_special_tokens: bool | None = None):
    if not isinstance(prompts, list | tuple) or len(prompts) == 0:
        raise ValueError("prompts must be a non-empty list of strings or of token-id lists")
    if all(isinstance(p, str) for p in prompts):
        if tokenizer is None:
            raise ValueError("prompts are strings: pass tokenizer= to tokenize them "
                             "(or pass lists of token ids)")
        ids = [_encode(tokenizer, p, chat_template, system_prompt, add_special_tokens)
               for p in prompts]
    elif all(isinstance(p, list | tuple | np.ndarray) for p in prompts):
        if chat_template:
            raise ValueError("chat_template=True needs string prompts")
        if add_special_tokens is not None:
            raise ValueError("add_special_tokens applies to string prompts; token-id "
                             "prompts are fed as given (leave it None)")
        ids = [token_ids(f"prompts[{i}]", p) for i, p in enumerate(prompts)]
    else:
        raise ValueError("prompts must be all strings or all lists of token ids")
    for i, p in enumerate(ids):
        if len(p) == 0:
            raise ValueError(f"prompts[{i}] is empty: every prompt needs at least one token")
    return ids


def _encode(tokenizer, prompt: str, chat_template: bool, system_prompt: str | None,
            add_special_tokens: bool | None = None):
    """Token ids of one string prompt.

    add_special_tokens: None follows the tokenizer's own convention: `tokenizer(text)` adds
    what its post-processor adds (e.g. BOS); with a chat template the template writes the
    special tokens and nothing is added. True / False force the post-processor's tokens on
    or off (with a chat template: on top of the rendered template).
    """
    if not chat_template:
        if system_prompt is not None:
            prompt = system_prompt + prompt
        if add_special_tokens is None:
            return list(tokenizer(prompt)["input_ids"])
        return list(tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"])
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else [])
    messages.append({"role": "user", "content": prompt})
    if add_special_tokens:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                             tokenize=False)
        return list(tokenizer(text, add_special_tokens=True)["input_ids"])
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def _eos_ids(eos_token_id, tokenizer, config) -> np.ndarray:
    if eos_token_id is None:
        if tokenizer is not None and getattr(tokenizer, "eos_token_id", None) is not None:
            eos_token_id = tokenizer.eos_token_id
        else:
            eos_token_id = list(config.eos_token_ids)
    if isinstance(eos_token_id, str) or _is_int(eos_token_id):
        eos_token_id = [eos_token_id]
    if isinstance(eos_token_id, np.ndarray):
        eos_token_id = eos_token_id.tolist()
    if not isinstance(eos_token_id, list | tuple):
        raise ValueError(f"eos_token_id must be a token id, a token string, a list of them or "
                         f"None, got {eos_token_id!r}")
    ids = [_eos_id(e, tokenizer) for e in eos_token_id]
    for i in ids:
        if not 0 <= i < config.vocab_size:
            raise ValueError(f"eos_token_id {i} is outside the vocabulary [0, "
                             f"{config.vocab_size})")
    return np.asarray(ids, np.int32)


def _eos_id(token, tokenizer) -> int:
    """One EOS entry as an id: an integer, or a token string looked up in the vocabulary."""
    if _is_int(token):
        return int(token)
    if not isinstance(token, str):
        raise ValueError(f"eos_token_id entries must be integers or token strings, got "
                         f"{token!r} ({type(token).__name__})")
    vocab = tokenizer.get_vocab() if tokenizer is not None else {}
    if token not in vocab:
        where = "the tokenizer's vocabulary" if tokenizer is not None else "(no tokenizer=)"
        raise ValueError(f"eos_token_id {token!r} is not a token of {where}; pass its id "
                         "or a token string of the vocabulary")
    return int(vocab[token])


def _left_pad(ids: list[list[int]], width: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.zeros((len(ids), width), np.int32)
    positions = np.full((len(ids), width), -1, np.int32)
    for b, p in enumerate(ids):
        tokens[b, width - len(p):] = p
        positions[b, width - len(p):] = np.arange(len(p))
    return tokens, positions


def _trim(tokens: np.ndarray, log_probs: np.ndarray, eos: np.ndarray):
    """Each row up to and including its first EOS."""
    out_tokens, out_log_probs = [], []
    for row, lp in zip(tokens, log_probs, strict=True):
        hits = np.flatnonzero(np.isin(row, eos))
        end = int(hits[0]) + 1 if hits.size else len(row)
        out_tokens.append(row[:end].tolist())
        out_log_probs.append(lp[:end].tolist())
    return out_tokens, out_log_probs


def _compiled(config, eviction, max_new_tokens, record, args, mesh=None):
    signature = (config, eviction, max_new_tokens, record, mesh,
                 tuple((a.shape, str(a.dtype), getattr(a, "sharding", None))
                       for a in jax.tree.leaves(args)),
                 jax.tree.structure(args))
    if signature in _COMPILED:
        return _COMPILED[signature], 0.0
    start = time.perf_counter()
    program = jax.jit(generate_tokens, static_argnums=(0, 1, 2), static_argnames="record")
    if mesh is None:
        compiled = program.lower(config, eviction, max_new_tokens, *args,
                                 record=record).compile()
    else:  # the decode loop reads the mesh while it is traced (cache shardings, eviction)
        with jax.set_mesh(mesh):
            compiled = program.lower(config, eviction, max_new_tokens, *args,
                                     record=record).compile()
    _COMPILED[signature] = compiled
    return compiled, time.perf_counter() - start


def resolve_mesh(model, mesh):
    """The mesh a call runs on: `mesh` (the model's weights moved onto it if they are on
    one device), else the mesh the model was loaded or sharded onto, else None.

    Raises:
      ValueError: the model's weights are already sharded over a different mesh.
    """
    placed = placed_mesh(model)
    if mesh is None:
        return placed
    mesh_lib.check_mesh(mesh)
    if placed is not None and not mesh_lib.same_mesh(placed, mesh):
        raise ValueError(
            f"mesh: the model's weights are sharded over another mesh ({_describe(placed)}) "
            f"than the one passed ({_describe(mesh)}); pass that mesh, or move the model "
            "with gkv_jax.sharding.shard_model(model, mesh)")
    shard_model(model, mesh)
    return mesh


def _describe(mesh) -> str:
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes, strict=True))
    ids = [d.id for d in mesh.devices.flat]
    return f"data={sizes.get('data')} x model={sizes.get('model')} over devices {ids}"


def padded_batch_size(batch_size: int, mesh) -> int:
    """The batch rounded up to a multiple of the mesh's `data` size (1 without a mesh)."""
    data = 1 if mesh is None else mesh_lib.axis_size(mesh, mesh_lib.DATA)
    return -(-batch_size // data) * data


def _program_args(params, tokens, positions, sampling, seeds, eos, mesh):
    """The compiled program's arguments, each placed on the mesh: weights as they are (by the
    rule table), prompts over `data`, the rest replicated.

    On a mesh that spans several processes every process holds the same host values (each
    calls `generate` with the same prompts) and hands JAX only the rows its own devices
    hold (`jax.make_array_from_process_local_data`); the replicated values in full.
    """
    host = (tokens, positions, sampling, np.asarray(seeds, np.int32), eos)
    if mesh is None:
        return (params, *jax.tree.map(jnp.asarray, host))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    rows = jax.sharding.NamedSharding(mesh, batch_spec(2, tokens.shape[0], mesh))
    placed = (global_array(tokens, rows), global_array(positions, rows),
              *jax.tree.map(lambda value: global_array(value, replicated), host[2:]))
    return (params, *placed)


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


def generate(model, prompts, tokenizer=None, eviction: EvictionConfig | None = None,
             max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 1.0,
             top_k: int = 0, seed: int = 0, eos_token_id=None, chat_template: bool = False,
             system_prompt: str | None = None, prompt_buckets: Sequence[int] | None = None,
             return_logprobs: bool = False, return_kept_positions: bool = False,
             return_eviction_record: bool = False,
             add_special_tokens: bool | None = None, mesh=None) -> GenerateOutput:
    """Generates continuations of a batch of prompts with a fixed-size, evicted KV cache.

    Args:
      model: a `gkv_jax.Transformer`.
      prompts: list of strings (needs `tokenizer`) or list of token-id lists, any lengths.
      tokenizer: a `transformers` tokenizer, for string prompts and `texts`.
      eviction: an `EvictionConfig`; None means `EvictionConfig(policy="full")`.
      max_new_tokens: generated tokens per prompt (>= 1), EOS included.
      temperature: 0 for greedy, else sampling temperature.
      top_p: nucleus mass in (0, 1]. top_k: keep the k most likely tokens (0 = all).
      seed: sampler seed, an integer in [0, 2**32), or a list of them, one per prompt.
        Prompt b samples with its own seed, `seed + b` (mod 2**32) for an int, and draws its
        token j with `fold_in(PRNGKey(its seed), j)`: its tokens depend only on the model,
        its prompt, the eviction, the sampling values and its seed, never on the batch, so
        `generate(prompts, seed=s)` row b equals `generate([prompts[b]], seed=s + b)`, and a
        `gkv_jax.Engine` request with that seed.
      eos_token_id: int, token string (looked up in the tokenizer's vocabulary), a list of
        them, or None for the tokenizer's / the model config's EOS.
      chat_template: format each string prompt with the tokenizer's chat template (one user
        turn, generation prompt added), with `system_prompt` as the system turn if given.
      add_special_tokens: for string prompts, None follows the tokenizer's convention
        (`tokenizer(text)` adds what its post-processor adds, e.g. BOS; with a chat
        template only the template's tokens); True / False force the post-processor's
        special tokens on / off. Must be None for token-id prompts (fed as given).
      prompt_buckets: allowed padded prompt lengths (default: powers of two >= 16); prompts
        in the same bucket reuse the compiled program.
      return_logprobs, return_kept_positions: fill those fields of the output.
      return_eviction_record: fill `eviction_record`, built on the device inside the
        compiled loop (a static choice: its own compiled program).
      mesh: a `jax.sharding.Mesh` from `gkv_jax.sharding.make_mesh`: the batch runs over
        `data`, heads / MLP / vocabulary over `model`, in the same single compiled program;
        each sequence's greedy tokens equal a one-device run's. The model's weights are
        moved onto the mesh (in place) if they are on one device; a model loaded or sharded
        with a mesh uses it without this argument. A batch that `data` does not divide is
        padded with copies of the last prompt, whose outputs are dropped.

    Raises:
      ValueError: naming the parameter, for an empty prompt list or prompt, string prompts
        without a tokenizer, non-integer token ids, max_new_tokens < 1, a seed outside
        [0, 2**32) (or a list of seeds of another length than the prompts), sampling values
        out of range, an unknown EOS, a prompt plus max_new_tokens beyond the model's
        context, or a model sharded over another mesh.
    """
    config = model.config
    eviction = EvictionConfig(policy="full") if eviction is None else eviction
    if not isinstance(eviction, EvictionConfig):
        raise TypeError(f"eviction must be an EvictionConfig or None, got {type(eviction)}")
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    max_new_tokens = int(max_new_tokens)
    sampling = SamplingParams.create(temperature, top_p, top_k)
    if add_special_tokens is not None and not isinstance(add_special_tokens, bool):
        raise ValueError(f"add_special_tokens must be True, False or None (the tokenizer's "
                         f"convention), got {add_special_tokens!r}")
    ids = _tokenize(prompts, tokenizer, chat_template, system_prompt, add_special_tokens)
    seeds = row_seeds(seed, len(ids))
    longest = max(len(p) for p in ids)
    if longest + max_new_tokens > config.max_position_embeddings:
        raise ValueError(
            f"max_new_tokens: prompt length {longest} + max_new_tokens {max_new_tokens} = "
            f"{longest + max_new_tokens} exceeds the model's context "
            f"(max_position_embeddings={config.max_position_embeddings})")
    for i, p in enumerate(ids):
        check_vocabulary(f"prompts[{i}]", p, config.vocab_size)
    width = bucket_length(longest, prompt_buckets)
    eos = _eos_ids(eos_token_id, tokenizer, config)
    mesh = resolve_mesh(model, mesh)
    rows = len(ids)
    # Rows are independent: padding rows (copies of the last prompt) change no real row.
    padding = padded_batch_size(rows, mesh) - rows
    tokens, positions = _left_pad(ids + [ids[-1]] * padding, width)
    seeds = np.concatenate([seeds, np.repeat(seeds[-1:], padding)])

    args = _program_args(model.params(), tokens, positions, sampling, seeds, eos, mesh)
    record = bool(return_eviction_record)
    program, compile_s = _compiled(config, eviction, int(max_new_tokens), record, args, mesh)
    start = time.perf_counter()
    outputs, state = jax.block_until_ready(program(*args))
    run_s = time.perf_counter() - start

    generated, log_probs = _trim(to_host(outputs.tokens)[:rows],
                                 to_host(outputs.log_probs)[:rows], eos)
    texts = None
    if tokenizer is not None:
        texts = [tokenizer.decode(g, skip_special_tokens=True) for g in generated]
    stats = _stats(model, state, ids, generated, state.cache.capacity, width, compile_s,
                   run_s, int(to_host(outputs.compressions)))
    stats["eos_token_ids"] = [int(e) for e in eos]
    stats["cache_bytes_per_device"] = _bytes_per_device(state.cache)
    stats["devices"] = 1 if mesh is None else int(mesh.devices.size)
    eviction_record = None
    if record:
        eviction_record = _eviction_record(config, eviction, outputs, ids, generated,
                                           int(max_new_tokens))
    kept_positions = None
    if return_kept_positions:
        kept_positions = to_host(state.cache.positions)[:, :rows]
    return GenerateOutput(
        tokens=generated, texts=texts,
        logprobs=log_probs if return_logprobs else None,
        kept_positions=kept_positions,
        stats=stats, eviction_record=eviction_record, prompt_ids=ids)


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
