"""Building and running the server: an engine, its worker and the app under uvicorn.

    app = build_app(model, tokenizer, EvictionConfig("gkv", budget=2048), slots=64)
    serve(app, host="127.0.0.1", port=8000)          # blocks; SIGINT / SIGTERM stop it

`BackgroundServer` runs the same on a thread (tests, notebooks) and gives its URL.
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
import time

import uvicorn

from gkv_jax.engine import Engine
from gkv_jax.eviction import EvictionConfig
from gkv_jax.serve.app import ServerConfig, create_app
from gkv_jax.serve.worker import EngineWorker

DEFAULT_MAX_TOKENS = 1024
DEFAULT_SHUTDOWN_SECONDS = 30.0


def build_app(model, tokenizer, eviction: EvictionConfig | None, slots: int = 16,
              max_tokens: int = DEFAULT_MAX_TOKENS, max_queue: int | None = None,
              model_name: str = "gkv-jax", max_prompt_length: int | None = None,
              mesh=None):
    """The app serving `model` with `slots` slots of `eviction` (None: the full cache).

    Args:
      max_tokens: the most tokens a request may generate (the engine's max_new_tokens).
      max_queue: samples that may wait for a slot (default 4 x slots); more get 429.
      model_name: the id of the model in requests and /v1/models.
      max_prompt_length, mesh: as in `gkv_jax.Engine`.

    Raises:
      ValueError: naming the parameter (from `Engine`, or `max_queue` below 0).
    """
    if max_queue is None:
        max_queue = 4 * slots
    if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
        raise ValueError(f"max_queue must be an integer >= 0, got {max_queue!r}")
    engine = Engine(model, tokenizer, eviction, slots=slots, max_new_tokens=max_tokens,
                    max_prompt_length=max_prompt_length, mesh=mesh)
    config = ServerConfig(
        model_name=model_name, max_tokens=engine.max_new_tokens,
        max_prompt_length=engine.max_prompt_length, max_queue=max_queue,
        eviction=dataclasses.asdict(engine.eviction), slots=engine.num_slots,
        vocab_size=model.config.vocab_size,
        default_eos=tuple(int(t) for t in engine.default_eos))
    return create_app(EngineWorker(engine).start(), tokenizer, config)


def uvicorn_config(app, host: str = "127.0.0.1", port: int = 8000,
                   shutdown_seconds: float = DEFAULT_SHUTDOWN_SECONDS,
                   log_level: str = "info") -> uvicorn.Config:
    """uvicorn's settings: on SIGINT / SIGTERM it stops accepting, gives open requests
    `shutdown_seconds` to finish, then closes them (their samples are cancelled)."""
    return uvicorn.Config(app, host=host, port=port, log_level=log_level,
                          timeout_graceful_shutdown=shutdown_seconds, lifespan="on")


class _Server(uvicorn.Server):
    """uvicorn's server, except that a shutdown asked for by SIGINT / SIGTERM returns
    normally once it is done (uvicorn raises the signal again afterwards, which ends the
    process with the signal's status although every request was dealt with)."""

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit)
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def serve(app, host: str = "127.0.0.1", port: int = 8000,
          shutdown_seconds: float = DEFAULT_SHUTDOWN_SECONDS) -> None:
    """Runs the app until SIGINT or SIGTERM (blocks), then shuts down cleanly: open
    requests get `shutdown_seconds` to finish, the rest are cancelled, and it returns."""
    _Server(uvicorn_config(app, host, port, shutdown_seconds)).run()


class BackgroundServer:
    """The app under uvicorn on a thread, on 127.0.0.1 and a free port (port 0).

    >>> # with BackgroundServer(app) as server: OpenAI(base_url=server.url + "/v1", ...)
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0,
                 shutdown_seconds: float = 5.0, start_timeout: float = 60.0):
        self.server = uvicorn.Server(uvicorn_config(app, host, port, shutdown_seconds,
                                                    log_level="warning"))
        self._thread = threading.Thread(target=self.server.run, name="gkv-serve",
                                        daemon=True)
        self._start_timeout = start_timeout

    def __enter__(self) -> BackgroundServer:
        self._thread.start()
        deadline = time.monotonic() + self._start_timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    @property
    def url(self) -> str:
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(30)

    def __exit__(self, *exc) -> None:
        self.stop()
