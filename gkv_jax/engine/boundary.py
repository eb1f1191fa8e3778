"""The engine's cycle boundary: the jit-compiled programs it runs (prefill, insert, cycle,
release; `compiled_programs` counts them) and `CycleBoundary`, the base of `Engine` that
harvests finished slots, releases cancelled ones, admits waiting prompts (prefill, insert),
dispatches the next cycle, and collects the last one's tokens and finished outputs into the
requests and the event queue.
"""

from __future__ import annotations

import contextlib
import dataclasses

import jax
import numpy as np

from gkv_jax.engine import core
from gkv_jax.engine.requests import Request, TokenEvent
from gkv_jax.eviction_record import NEVER, EvictionRecord
from gkv_jax.generation_outputs import to_host
from gkv_jax.sampling import SamplingParams

_prefill = jax.jit(core.prefill_group, static_argnums=(0, 1, 2, 3))
_insert = jax.jit(core.insert, donate_argnums=(0,))
_cycle = jax.jit(core.run_cycle, static_argnums=(0, 1), donate_argnums=(3,))
_release = jax.jit(core.release, donate_argnums=(0,))
PROGRAMS = (_prefill, _insert, _cycle, _release)


def compiled_programs() -> int:
    """Programs the engine's functions have compiled in this process (tests count them)."""
    return sum(fn._cache_size() for fn in PROGRAMS)


@dataclasses.dataclass
class _Pending:
    """A dispatched cycle: its outputs, and which request each slot served."""

    slot_requests: list[Request | None]
    tokens: jax.Array
    log_probs: jax.Array


class CycleBoundary:
    """The cycle boundary of `Engine` (its base): reads and updates the engine's slots,
    queues, requests, events and stats, which `Engine.__init__` sets up."""

    # ---------------------------------------------------------------------------- harvest
    def _has_work(self) -> bool:
        return (any(g.members for g in self._waiting) or any(m for _, m in self._held)
                or any(r is not None for r in self._slot_request))

    def _boundary(self) -> None:
        """One cycle boundary: harvest, admit, dispatch the next cycle, then read back the
        previous cycle's tokens (while the device runs the next) into the event queue."""
        pending, self._pending = self._pending, None
        finished, records = [], {}
        if pending is not None:
            done, token_index = (to_host(self._slots.state.done),
                                 to_host(self._slots.state.token_index))
            for s, request in enumerate(pending.slot_requests):
                if request is not None and self._slot_request[s] is request and done[s]:
                    finished.append(request)
                    self._slot_request[s] = None
                    records[request.request_id] = self._record_slice(s)
        self._release_cancelled()
        inserted = self._admit()
        if any(r is not None for r in self._slot_request):
            self._slots, tokens, log_probs = self._run(
                ("cycle",), _cycle, self.model.config, self.eviction, self._step_params,
                self._slots)
            self._pending = _Pending(list(self._slot_request), tokens, log_probs)
            self._stats["cycles"] += 1
        for requests, first, first_log_prob in inserted:
            first, first_log_prob = to_host(first), to_host(first_log_prob)
            for i, request in enumerate(requests):
                request.append(first[i:i + 1], first_log_prob[i:i + 1])
                self._events.append(TokenEvent(request.request_id, [int(first[i])], False))
        if pending is not None:
            self._collect(pending, token_index, finished, records)

    def _collect(self, pending: _Pending, token_index, finished, records) -> None:
        tokens, log_probs = to_host(pending.tokens), to_host(pending.log_probs)
        for s, request in enumerate(pending.slot_requests):
            if request is None or request.output.finished:
                continue
            new = int(token_index[s]) - len(request.output.tokens)
            if new > 0:
                request.append(tokens[s, :new], log_probs[s, :new])
                self._stats["decode_tokens"] += new
                self._events.append(TokenEvent(request.request_id, tokens[s, :new].tolist(),
                                               False))
        for request in finished:
            reason = "cancelled" if request.cancelled else (
                "eos" if request.output.tokens and request.output.tokens[-1]
                in request.eos_ids else "length")
            self._finish(request, reason, records.get(request.request_id))

    def _finish(self, request: Request, reason: str, record=None) -> None:
        output = request.output
        output.finish_reason = reason
        if self.tokenizer is not None:
            output.text = self.tokenizer.decode(output.tokens, skip_special_tokens=True)
        if self.record_width is not None:
            output.eviction_record = self._eviction_record(request, record)
        request.slot = None
        self._stats["finished"] += 1
        self._stats["useful_tokens"] += len(output.tokens)
        self._events.append(TokenEvent(request.request_id, [], True, output))

    def _record_slice(self, s: int):
        """The device slice of slot s's record (dispatched before the slot is reused)."""
        if self._slots.visible_until is None:
            return None
        return self._slots.visible_until[:, s]

    def _eviction_record(self, request: Request, record) -> EvictionRecord:
        config = self.model.config
        width = len(request.prompt_ids) + request.max_new_tokens
        if record is None:
            visible_until = np.full((config.num_layers, 1, config.num_kv_heads, width), NEVER,
                                    np.int32)
        else:
            visible_until = to_host(record)[:, None, :, :width]
        return EvictionRecord(visible_until=visible_until,
                              prompt_lengths=np.asarray([len(request.prompt_ids)], np.int32),
                              lengths=np.asarray([len(request.output.tokens)], np.int32),
                              eviction=self.eviction)

    # ---------------------------------------------------------------------------- admit
    def _release_cancelled(self) -> None:
        mask = np.zeros((self.num_slots,), bool)
        for s, request in enumerate(self._slot_request):
            if request is not None and request.cancelled:
                mask[s] = True
                self._slot_request[s] = None
                self._finish(request, "cancelled")
        if mask.any():
            self._slots = self._run(("release",), _release, self._slots, mask)

    def _admit(self) -> list[tuple[list[Request], jax.Array, jax.Array]]:
        """Fills free slots: members of held prefixes first, then new prefill groups."""
        inserted = []
        while True:
            free = [s for s, r in enumerate(self._slot_request) if r is None]
            self._held = [(p, m) for p, m in self._held if m]
            if not free:
                break
            if not self._held:
                if not self._prefill_next(len(free)):
                    break
            prefix, members = self._held[0]
            batch = members[:len(free)]
            del members[:len(batch)]
            inserted.append(self._insert(prefix, batch, free[:len(batch)]))
        return inserted

    def _prefill_next(self, free: int) -> bool:
        """Prefills the next waiting prompts of one bucket (FIFO), enough to fill `free`
        slots, at most `prefill_batch`; False when nothing waits."""
        while self._waiting and not self._waiting[0].members:
            self._waiting.popleft()
        if not self._waiting:
            return False
        bucket = self._waiting[0].bucket
        groups, wanted = [], 0
        for group in list(self._waiting):
            if len(groups) == self.prefill_batch or wanted >= free:
                break
            if group.bucket == bucket and group.members:
                groups.append(group)
                wanted += len(group.members)
        for group in groups:
            self._waiting.remove(group)
        rows = [g.prompt_ids for g in groups]
        rows += [rows[0]] * (self._group_size(len(rows)) - len(rows))  # padding rows
        tokens = np.zeros((len(rows), bucket), np.int32)
        positions = np.full((len(rows), bucket), -1, np.int32)
        for b, ids in enumerate(rows):
            tokens[b, bucket - len(ids):] = ids
            positions[b, bucket - len(ids):] = np.arange(len(ids))
        prefix = self._run(("prefill", bucket, len(rows)), _prefill, self.model.config,
                           self.eviction, self.capacity, self.record_width, self._params,
                           tokens, positions)
        self._held.append((prefix, [(row, r) for row, g in enumerate(groups)
                                    for r in g.members]))
        self._stats["prefills"] += len(groups)
        self._stats["prefill_calls"] += 1
        return True

    def _group_size(self, prompts: int) -> int:
        """The rows of a prefill of `prompts` prompts: the smallest power of two that holds
        them (a multiple of the mesh's data size), at most `prefill_batch`, so that a refill
        of one slot does not pay for a full group and the programs stay a small fixed set."""
        size = self._data
        while size < prompts:
            size *= 2
        return min(size, self.prefill_batch)

    def _insert(self, prefix: core.Prefix, batch: list[tuple[int, Request]],
                slot_ids: list[int]):
        S = self.num_slots
        rows = np.zeros((S,), np.int32)
        targets = np.full((S,), S, np.int32)  # S: unused entry, dropped
        seeds = np.zeros((S,), np.uint32)
        knobs = np.zeros((S, 3), np.float64)
        knobs[:, 1] = 1.0
        max_tokens = np.ones((S,), np.int32)
        eos = np.full((S, self.eos_width), -1, np.int32)
        requests = []
        for i, ((row, request), slot) in enumerate(zip(batch, slot_ids, strict=True)):
            rows[i], targets[i], seeds[i] = row, slot, request.seed
            knobs[i] = (request.temperature, request.top_p, request.top_k)
            max_tokens[i], eos[i] = request.max_new_tokens, request.eos_ids
            request.slot = slot
            self._slot_request[slot] = request
            requests.append(request)
        sampling = SamplingParams(temperature=knobs[:, 0].astype(np.float32),
                                  top_p=knobs[:, 1].astype(np.float32),
                                  top_k=knobs[:, 2].astype(np.int32))
        self._slots, first, first_log_prob = self._run(
            ("insert",), _insert, self._slots, prefix, rows, targets, seeds.view(np.int32),
            sampling, max_tokens, eos)
        self._stats["inserted"] += len(requests)
        return requests, first[:len(requests)], first_log_prob[:len(requests)]

    # ---------------------------------------------------------------------------- dispatch
    def _run(self, signature, fn, *args):
        self._signatures.add(signature)
        with self._on_mesh():
            return fn(*args)

    def _on_mesh(self):
        return contextlib.nullcontext() if self.mesh is None else jax.set_mesh(self.mesh)
