"""The engine's own thread: the one place `Engine` methods run while a server is up.

`Engine` is single-threaded (its host loop owns the slots, the queue and the device
buffers), while HTTP handlers run on an event loop. Handlers hand the worker commands
(submit, cancel) through a queue and get each request's events back through a callback;
the worker runs the engine's cycles whenever requests are waiting or running, and takes
new commands at every cycle boundary, so requests join the running batch without waiting
for it to drain.
"""

from __future__ import annotations

import collections
import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from gkv_jax.engine import Engine, TokenEvent


@dataclasses.dataclass(frozen=True)
class Update:
    """New tokens of one request (with their log-probs), or its end: `finished`, with the
    engine's finish reason ("eos", "length", "cancelled"), or "error" if the engine failed."""

    request_id: int
    tokens: list[int]
    logprobs: list[float]
    finished: bool = False
    finish_reason: str | None = None


# A request's updates go to its sink (called on the worker thread; it must not block).
Sink = Callable[[Update], None]


@dataclasses.dataclass(frozen=True)
class Submission:
    """One prompt's samples, as `Engine.submit_group` takes them."""

    prompt_ids: list[int]
    seeds: list[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    eos_token_id: list[int] | None = None


class EngineWorker:
    """Runs `engine` on a daemon thread; `submit` and `cancel` may be called from any
    thread. `stats()` is a consistent snapshot for /metrics.

    Args:
      engine: the `gkv_jax.Engine` to serve (used by no one else while the worker runs).
      idle_wait: seconds the thread sleeps on an empty queue before it checks for stop.
    """

    def __init__(self, engine: Engine, idle_wait: float = 0.05):
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._sinks: dict[int, Sink] = {}
        self._idle_wait = idle_wait
        self._stop = threading.Event()
        self._lock = threading.Lock()  # guards the counters read by stats()
        self._running = 0  # requests submitted and not finished
        self._finished_by_reason: collections.Counter = collections.Counter()
        self._generated = 0
        self._recent: collections.deque = collections.deque()  # (time, tokens) over 10 s
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="gkv-engine", daemon=True)

    # ------------------------------------------------------------------ any thread
    def start(self) -> EngineWorker:
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def submit(self, submission: Submission, sink: Sink) -> Future:
        """Queues a prompt's samples; the future gives their request ids (or the
        engine's ValueError, naming the parameter, with nothing queued)."""
        future: Future = Future()
        self._commands.put(("submit", submission, sink, future))
        return future

    def cancel(self, request_ids: Sequence[int]) -> None:
        """Cancels requests that have not finished (their slots free at the next cycle
        boundary; their sinks still get a finished event, reason "cancelled")."""
        self._commands.put(("cancel", list(request_ids), None, None))

    def stop(self, timeout: float = 30.0) -> None:
        """Cancels every request, lets the engine free their slots, and ends the thread."""
        self._stop.set()
        self._thread.join(timeout)

    def stats(self) -> dict[str, Any]:
        engine_stats = self.engine.stats
        with self._lock:
            now = time.monotonic()
            while self._recent and self._recent[0][0] < now - 10.0:
                self._recent.popleft()
            recent = sum(tokens for _, tokens in self._recent)
            return {"running": self._running, "finished": dict(self._finished_by_reason),
                    "generated_tokens": self._generated,
                    "tokens_per_second": recent / 10.0,
                    "slots": self.engine.num_slots,
                    "busy_slots": self.engine.busy_slots,
                    "occupancy": engine_stats.get("occupancy", 0.0),
                    "cycles": engine_stats.get("cycles", 0)}

    # ------------------------------------------------------------------ the thread
    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._take_commands(wait=not self._has_work())
                if self._has_work():
                    for event in self.engine.stream():
                        self._dispatch(event)
                        self._take_commands(wait=False)
                        if self._stop.is_set():
                            break
            self._shut_down()
        except BaseException as err:  # noqa: BLE001 (reported by /health, then re-raised)
            self.error = err
            self._fail_all(err)
            raise

    def _has_work(self) -> bool:
        return self._running > 0

    def _take_commands(self, wait: bool) -> None:
        while True:
            try:
                command = self._commands.get(timeout=self._idle_wait) if wait \
                    else self._commands.get_nowait()
            except queue.Empty:
                return
            wait = False
            kind, payload, sink, future = command
            if kind == "submit":
                self._submit(payload, sink, future)
            else:
                for request_id in payload:
                    self.engine.cancel(request_id)

    def _submit(self, submission: Submission, sink: Sink, future: Future) -> None:
        try:
            ids = self.engine.submit_group(
                submission.prompt_ids, submission.seeds,
                max_new_tokens=submission.max_new_tokens,
                temperature=submission.temperature, top_p=submission.top_p,
                eos_token_id=submission.eos_token_id)
        except (ValueError, TypeError) as err:
            future.set_exception(err)
            return
        for request_id in ids:
            self._sinks[request_id] = sink
        with self._lock:
            self._running += len(ids)
        future.set_result(ids)

    def _dispatch(self, event: TokenEvent) -> None:
        sink = self._sinks.get(event.request_id)
        if sink is not None:
            if event.finished:
                update = Update(event.request_id, [], [], True, event.output.finish_reason)
            else:
                logprobs = self.engine.output(event.request_id).logprobs
                start = len(logprobs) - len(event.tokens)  # its tokens are the last ones yet
                update = Update(event.request_id, list(event.tokens),
                                logprobs[start:start + len(event.tokens)])
        if event.finished:
            self._sinks.pop(event.request_id, None)
            with self._lock:
                self._running -= 1
                self._finished_by_reason[event.output.finish_reason] += 1
        elif event.tokens:
            with self._lock:
                self._generated += len(event.tokens)
                self._recent.append((time.monotonic(), len(event.tokens)))
        if sink is not None:
            sink(update)

    def _shut_down(self) -> None:
        """Cancels what is left and serves the cancellations (each sink hears its end)."""
        self._take_commands(wait=False)
        for request_id in list(self._sinks):
            self.engine.cancel(request_id)
        for event in self.engine.stream():
            self._dispatch(event)

    def _fail_all(self, err: BaseException) -> None:
        for request_id, sink in list(self._sinks.items()):
            sink(Update(request_id, [], [], True, "error"))
        self._sinks.clear()
