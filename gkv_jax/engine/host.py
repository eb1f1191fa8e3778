"""`gkv_jax.Engine`: continuous batching over fixed-size evicted caches (the host loop).

The engine holds S slots (`core.Slots`), each one batch row of a cache that never grows. At
every cycle boundary it harvests the slots whose requests finished (EOS, their own
`max_new_tokens`, or cancelled), prefills waiting prompts in groups of one prompt bucket,
inserts them into the free slots, dispatches the next cycle, and only then reads the last
cycle's tokens back and hands them to their requests: device work overlaps the host's
bookkeeping. A request's tokens depend only on the model, its prompt, the eviction, its
sampling values and its seed, so they equal `generate([prompt], seed=seed)` alone.

This module holds `Engine` itself: its construction, the requests (submit, cancel, outputs),
`run` / `stream` and `stats`. What happens at a boundary (the programs it runs, admitting,
harvesting, collecting) is its base, `boundary.CycleBoundary`.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator, Sequence

import jax
import numpy as np

from gkv_jax.decode import decode_params
from gkv_jax.engine import core
from gkv_jax.engine.boundary import CycleBoundary, _Pending
from gkv_jax.engine.requests import PromptGroup, Request, RequestOutput, TokenEvent
from gkv_jax.eviction import EvictionConfig
from gkv_jax.generation import resolve_mesh
from gkv_jax.generation_inputs import _encode, _eos_ids, bucket_length, row_seeds
from gkv_jax.sampling import SamplingParams
from gkv_jax.sharding import mesh as mesh_lib
from gkv_jax.token_ids import check_vocabulary, is_int, token_ids

MIN_EOS_WIDTH = 8  # EOS ids a request may give (more if the engine's default has more)

_init = jax.jit(core.init_slots, static_argnums=(0, 1, 2, 3, 4, 5, 6))
_decode_params = jax.jit(decode_params)


class Engine(CycleBoundary):
    """Continuous batching: requests come and go, slots are refilled as they finish.

    Args:
      model: a `gkv_jax.Transformer`.
      tokenizer: its tokenizer, for string prompts and `RequestOutput.text`.
      eviction: the `EvictionConfig` of every slot (None: the full cache, whose slots hold
        `max_prompt_length` (bucketed) + `max_new_tokens` - 1 tokens each).
      slots: S, sequences decoded together (a multiple of the mesh's `data` size).
      max_new_tokens: the most tokens a request may ask for (its default).
      max_prompt_length: the longest prompt accepted (default: the context minus
        `max_new_tokens`); it sizes the full cache's slots and the eviction record.
      prefill_batch: the most prompts prefilled together (default min(slots, 8)); a prefill
        takes the smallest power of two (times the mesh's data size) that holds the prompts
        waiting for free slots, so one program per (prompt bucket, group size).
      prompt_buckets: padded prompt lengths, as in `generate` (one prefill program each).
      eos_token_id: the default EOS ids of requests, as in `generate`.
      record: keep each request's eviction record (`RequestOutput.eviction_record`).
      mesh: a ("data", "model") mesh: slots over `data`, heads over `model`, as `generate`.

    Raises:
      ValueError / TypeError: naming the parameter, for values out of range.

    >>> # engine = gkv_jax.Engine(model, tokenizer, EvictionConfig("gkv", budget=2048))
    >>> # ids = [engine.submit(p, seed=i) for i, p in enumerate(prompts)]
    >>> # outputs = engine.run()   # {request_id: RequestOutput}
    """

    def __init__(self, model, tokenizer=None, eviction: EvictionConfig | None = None,
                 slots: int = 16, max_new_tokens: int = 256, *,
                 max_prompt_length: int | None = None, prefill_batch: int | None = None,
                 prompt_buckets: Sequence[int] | None = None, eos_token_id=None,
                 record: bool = False, mesh=None):
        config = model.config
        eviction = EvictionConfig(policy="full") if eviction is None else eviction
        if not isinstance(eviction, EvictionConfig):
            raise TypeError(f"eviction must be an EvictionConfig or None, got "
                            f"{type(eviction).__name__}")
        context = config.max_position_embeddings
        _check_count("slots", slots)
        _check_count("max_new_tokens", max_new_tokens, context - 1)
        if max_prompt_length is None:
            max_prompt_length = context - max_new_tokens
        _check_count("max_prompt_length", max_prompt_length, context - max_new_tokens)
        self.model, self.tokenizer, self.eviction = model, tokenizer, eviction
        self.mesh = resolve_mesh(model, mesh)
        data = 1 if self.mesh is None else mesh_lib.axis_size(self.mesh, mesh_lib.DATA)
        if slots % data:
            raise ValueError(f"slots must be a multiple of the mesh's data size ({data}), "
                             f"got {slots}")
        if prefill_batch is None:
            prefill_batch = min(slots, 8)
        _check_count("prefill_batch", prefill_batch)
        self.prefill_batch = -(-prefill_batch // data) * data
        self._data = data
        self.num_slots, self.max_new_tokens = int(slots), int(max_new_tokens)
        self.max_prompt_length, self.prompt_buckets = int(max_prompt_length), prompt_buckets
        widest = bucket_length(self.max_prompt_length, prompt_buckets)
        self.capacity = eviction.capacity if eviction.evicts else widest + max_new_tokens - 1
        self.record_width = widest + max_new_tokens if record else None
        self.default_eos = np.asarray(_eos_ids(eos_token_id, tokenizer, config), np.int32)
        self.eos_width = max(MIN_EOS_WIDTH, len(self.default_eos))
        with self._on_mesh():
            self._slots = _init(config, eviction, self.num_slots, self.capacity,
                                self.eos_width, self.record_width, model.dtype)
        self.load_params(model.params())
        self._next_id = 0
        self._waiting: collections.deque[PromptGroup] = collections.deque()
        self._held: list[tuple[core.Prefix, list[tuple[int, Request]]]] = []
        self._slot_request: list[Request | None] = [None] * self.num_slots
        self._pending: _Pending | None = None
        self._requests: dict[int, Request] = {}
        self._events: collections.deque[TokenEvent] = collections.deque()  # not yet yielded
        self._signatures: set = set()
        self._stats = collections.Counter()
        self._seconds = 0.0

    # ---------------------------------------------------------------------------- requests
    def load_params(self, params: dict) -> None:
        """Serves `params` (the model's parameter tree, same shapes) from the next cycle
        on: a post-training loop points the engine at its updated weights."""
        self._params = params
        with self._on_mesh():
            self._step_params = _decode_params(params)

    def submit(self, prompt, max_new_tokens: int | None = None, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, seed: int = 0, eos_token_id=None) -> int:
        """Queues one request; returns its id.

        Args:
          prompt: a string (needs the engine's tokenizer, whose convention adds BOS) or
            token ids.
          max_new_tokens: its limit, EOS included (None: the engine's).
          temperature, top_p, top_k: its sampler, as in `generate`.
          seed: an integer in [0, 2**32): its token j is drawn with
            `fold_in(PRNGKey(seed), j)`, so it equals `generate([prompt], seed=seed)`.
          eos_token_id: its EOS ids, as in `generate` (None: the engine's).

        Raises:
          ValueError: naming the parameter; nothing is queued and no other request changes.
        """
        return self.submit_group(prompt, [seed], max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_p=top_p, top_k=top_k,
                                 eos_token_id=eos_token_id)[0]

    def submit_group(self, prompt, seeds: Sequence[int], *, max_new_tokens: int | None = None,
                     temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                     eos_token_id=None) -> list[int]:
        """Queues one request per seed, all sharing one prefill of `prompt` (the samples of
        a pass@k problem, or a GRPO group); returns their ids. Arguments as in `submit`."""
        ids = self._prompt_ids(prompt)
        if max_new_tokens is None:
            max_new_tokens = self.max_new_tokens
        _check_count("max_new_tokens", max_new_tokens, self.max_new_tokens)
        SamplingParams.create(temperature, top_p, top_k)
        if isinstance(seeds, str) or not isinstance(seeds, Sequence) or not seeds:
            raise ValueError(f"seeds must be a non-empty list of seeds, got {seeds!r}")
        seeds = row_seeds(list(seeds), len(seeds)).view(np.uint32)
        eos = self.default_eos if eos_token_id is None else np.asarray(
            _eos_ids(eos_token_id, self.tokenizer, self.model.config), np.int32)
        if len(eos) > self.eos_width:
            raise ValueError(f"eos_token_id: at most {self.eos_width} ids per request, got "
                             f"{len(eos)}")
        padded = np.full((self.eos_width,), -1, np.int32)
        padded[:len(eos)] = eos
        bucket = bucket_length(len(ids), self.prompt_buckets)
        members = []
        for seed in seeds:
            request_id, self._next_id = self._next_id, self._next_id + 1
            output = RequestOutput(request_id=request_id, prompt_ids=ids, seed=int(seed))
            request = Request(request_id, ids, bucket, int(max_new_tokens), float(temperature),
                              float(top_p), int(top_k), int(seed), padded, output)
            self._requests[request_id] = request
            members.append(request)
        self._waiting.append(PromptGroup(ids, bucket, members))
        self._stats["submitted"] += len(members)
        return [r.request_id for r in members]

    def _prompt_ids(self, prompt) -> list[int]:
        config = self.model.config
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt is a string: give the Engine a tokenizer (or pass "
                                 "token ids)")
            ids = list(_encode(self.tokenizer, prompt, False, None))
        else:
            ids = token_ids("prompt", prompt)
        if not ids:
            raise ValueError("prompt is empty: a prompt needs at least one token")
        check_vocabulary("prompt", ids, config.vocab_size)
        if len(ids) > self.max_prompt_length:
            raise ValueError(f"prompt: {len(ids)} tokens, but the engine takes prompts of at "
                             f"most max_prompt_length={self.max_prompt_length} tokens")
        return ids

    def output(self, request_id: int) -> RequestOutput:
        """A request's output so far (it grows as cycles complete; final once finished).

        Raises:
          KeyError: no request has that id.
        """
        if request_id not in self._requests:
            raise KeyError(f"request_id: no request {request_id}")
        return self._requests[request_id].output

    @property
    def busy_slots(self) -> int:
        """Slots holding a request now (the rest take waiting requests at the next boundary)."""
        return sum(r is not None for r in self._slot_request)

    def cancel(self, request_id: int) -> bool:
        """Cancels a request that has not finished: a waiting one never starts, a running
        one stops at the next cycle boundary and frees its slot; its output keeps the tokens
        so far, with finish_reason "cancelled". False if it had already finished."""
        request = self._requests.get(request_id)
        if request is None or request.output.finished or request.cancelled:
            return False
        request.cancelled = True
        if request.slot is None:  # waiting, or in a held prefix: drop it there
            for group in self._waiting:
                if request in group.members:
                    group.members.remove(request)
            for _, members in self._held:
                members[:] = [(row, r) for row, r in members if r is not request]
            self._finish(request, "cancelled")
        return True

    # ---------------------------------------------------------------------------- the loop
    def run(self) -> dict[int, RequestOutput]:
        """Serves every queued request; returns {request_id: RequestOutput} of those that
        finished during this call (in finishing order)."""
        return {event.request_id: event.output for event in self.stream() if event.finished}

    def stream(self) -> Iterator[TokenEvent]:
        """Serves the queue, yielding each request's new tokens as cycles complete, and a
        finished event (with its `RequestOutput`) when it ends."""
        started = time.perf_counter()
        try:
            while True:
                while self._events:  # a consumer that stops early leaves the rest queued
                    yield self._events.popleft()
                if not self._has_work() and self._pending is None:
                    return
                self._boundary()
        finally:
            self._seconds += time.perf_counter() - started

    # ---------------------------------------------------------------------------- stats
    @property
    def stats(self) -> dict:
        """Counters of the engine so far: submitted / finished requests, useful_tokens
        (generated tokens of finished requests), slot_steps (cycles x slots x
        divide_length), occupancy (decode steps that produced a request's token / slot
        steps), tokens_per_second (useful tokens per second of `run` / `stream`), prefills
        (prompts prefilled: one per group of samples), prefill_calls, cycles, inserted
        (requests placed in slots), compiled_programs (distinct programs run: one prefill per
        prompt bucket and group size, insert, cycle, release), cache_bytes (all slots) and
        cache_bytes_per_slot."""
        counts = dict(self._stats)
        slot_steps = counts.get("cycles", 0) * self.num_slots * self.eviction.divide_length
        cache_bytes = self._slots.state.cache.num_bytes()
        return {
            "submitted": counts.get("submitted", 0), "finished": counts.get("finished", 0),
            "useful_tokens": counts.get("useful_tokens", 0), "slot_steps": slot_steps,
            "occupancy": counts.get("decode_tokens", 0) / slot_steps if slot_steps else 0.0,
            "tokens_per_second": (counts.get("useful_tokens", 0) / self._seconds
                                  if self._seconds else 0.0),
            "seconds": self._seconds, "prefills": counts.get("prefills", 0),
            "prefill_calls": counts.get("prefill_calls", 0), "cycles": counts.get("cycles", 0),
            "inserted": counts.get("inserted", 0),
            "compiled_programs": len(self._signatures),
            "cache_bytes": cache_bytes, "cache_bytes_per_slot": cache_bytes // self.num_slots,
        }


def _check_count(name: str, value, high: int | None = None) -> None:
    """An integer in [1, high]."""
    if not is_int(value) or value < 1 or (high is not None and value > high):
        bound = f"in [1, {high}]" if high is not None else ">= 1"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")


__all__ = ["Engine", "RequestOutput", "TokenEvent"]
