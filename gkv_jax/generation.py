"""`gkv_jax.generate`: prompts in, tokens out, through one compiled decode program.

The host side only tokenizes, pads to a prompt-length bucket, and trims the results; the
whole generation (prefill, decode cycles, evictions, sampling) is one XLA program compiled
once per (model config, eviction config, batch size, bucket, max_new_tokens, number of EOS
ids). Sampling parameters, the seed and the EOS id values are traced, so changing them never
recompiles.

This module holds `generate`, the cache of compiled programs and the placement of the
program's arguments on a mesh; the arguments are checked and the prompts prepared in
`gkv_jax.generation_inputs`, the output assembled in `gkv_jax.generation_outputs`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from gkv_jax.decode import generate_tokens
from gkv_jax.distributed import global_array
from gkv_jax.eviction import EvictionConfig
from gkv_jax.generation_inputs import (
    _eos_ids,
    _left_pad,
    _tokenize,
    bucket_length,
    row_seeds,
)
from gkv_jax.generation_outputs import (
    GenerateOutput,
    _bytes_per_device,
    _eviction_record,
    _stats,
    _trim,
    to_host,
)
from gkv_jax.sampling import SamplingParams
from gkv_jax.sharding import mesh as mesh_lib
from gkv_jax.sharding.placement import placed_mesh, shard_model
from gkv_jax.sharding.rules import batch_spec
from gkv_jax.token_ids import check_vocabulary
from gkv_jax.token_ids import is_int as _is_int

# One compiled executable per static signature; the number of entries is the number of
# compilations this process has done (tests count them).
_COMPILED: dict[tuple, Any] = {}


def compiled_programs() -> int:
    """How many distinct generation programs have been compiled in this process."""
    return len(_COMPILED)


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
