"""The HTTP app: OpenAI's completions and chat completions over one `EngineWorker`.

    app = create_app(EngineWorker(engine).start(), tokenizer, ServerConfig(...))

Each request is checked (`protocol`), counted against the slots plus a bounded queue (429
beyond), submitted as one engine request per prompt and sample, and answered whole or as
server-sent events. A client that goes away cancels its requests, which frees their slots
at the next cycle boundary; a stop string cancels its sample the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from gkv_jax.serve import protocol
from gkv_jax.serve.choices import Choice, chunk_object, logprobs_object, response_object
from gkv_jax.serve.metrics import CONTENT_TYPE_LATEST, ServerMetrics
from gkv_jax.serve.protocol import BadRequest, ParsedRequest
from gkv_jax.serve.worker import EngineWorker, Submission, Update

DISCONNECT_POLL_SECONDS = 0.25  # how often a waiting non-streamed request checks its client


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """What the server was started with (shown by /v1/models).

    model_name: the id clients send as `model`; max_tokens: the most tokens a request may
    ask for (the engine's max_new_tokens); max_prompt_length: the longest prompt in tokens;
    max_queue: samples that may wait for a slot beyond those decoding (then 429);
    eviction: the engine's eviction config as a dict; slots: the engine's slots.
    """

    model_name: str
    max_tokens: int
    max_prompt_length: int
    max_queue: int
    eviction: dict[str, Any]
    slots: int
    vocab_size: int
    default_eos: tuple[int, ...] = ()


@dataclasses.dataclass
class _Load:
    outstanding: int = 0  # samples accepted and not answered


def create_app(worker: EngineWorker, tokenizer, config: ServerConfig) -> FastAPI:
    """The FastAPI app serving `worker`'s engine; stopping the app stops the worker."""
    metrics = ServerMetrics(config.slots)
    load = _Load()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await asyncio.get_running_loop().run_in_executor(None, worker.stop)

    app = FastAPI(title="gkv-jax", lifespan=lifespan)

    def record(endpoint: str, started: float, status: int) -> None:
        metrics.requests.labels(endpoint, str(status)).inc()
        metrics.latency.labels(endpoint).observe(time.monotonic() - started)

    def answer(endpoint: str, started: float, response: Response) -> Response:
        record(endpoint, started, response.status_code)
        return response

    def refuse(endpoint: str, started: float, err: BadRequest) -> Response:
        return answer(endpoint, started, JSONResponse(err.body(), status_code=err.status))

    async def serve(request: Request, chat: bool) -> Response:
        endpoint = "chat" if chat else "completions"
        started = time.monotonic()
        try:
            body = await _json_body(request)
            parse = protocol.parse_chat if chat else protocol.parse_completion
            parsed = parse(body, tokenizer, config.model_name, config.max_tokens,
                           config.max_prompt_length, config.vocab_size)
        except BadRequest as err:
            return refuse(endpoint, started, err)
        if not worker.alive:
            return refuse(endpoint, started, BadRequest(
                None, "the engine has stopped; see the server's log", 503, "server_error"))
        samples = len(parsed.prompts) * parsed.sampling.n
        if load.outstanding + samples > config.slots + config.max_queue:
            return refuse(endpoint, started, BadRequest(
                None, f"the server is full: {load.outstanding} samples are running or "
                f"queued ({config.slots} slots + a queue of {config.max_queue}); retry later",
                429, "rate_limit_error"))
        load.outstanding += samples
        run = _Run(worker, tokenizer, parsed, config)
        try:
            await run.submit()
        except BadRequest as err:
            load.outstanding -= samples
            run.cancel_all()
            return refuse(endpoint, started, err)
        if parsed.sampling.stream:
            async def events():
                try:
                    async for chunk in run.chunks():
                        yield chunk
                finally:  # finished, or the client went away (the generator is closed)
                    run.cancel_all()
                    load.outstanding -= samples
                    record(endpoint, started, 200)
            return StreamingResponse(events(), media_type="text/event-stream")
        try:
            result = await run.whole(request)
        finally:
            run.cancel_all()
            load.outstanding -= samples
        if result is None:  # the client disconnected: nobody reads this
            return answer(endpoint, started, Response(status_code=499))
        return answer(endpoint, started, JSONResponse(result))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await serve(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await serve(request, chat=True)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{
            "id": config.model_name, "object": "model", "created": 0, "owned_by": "gkv-jax",
            "eviction": config.eviction, "slots": config.slots, "max_queue": config.max_queue,
            "max_tokens": config.max_tokens, "max_prompt_length": config.max_prompt_length}]}

    @app.get("/health")
    async def health() -> Response:
        if worker.alive:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "error", "error": repr(worker.error)}, status_code=503)

    @app.get("/metrics")
    async def metrics_text() -> Response:
        return Response(metrics.render(worker.stats()), media_type=CONTENT_TYPE_LATEST)

    return app


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadRequest(None, f"the request body is not valid JSON: {err}") from None


class _Run:
    """One HTTP request's engine requests: submitted, followed, answered or cancelled."""

    def __init__(self, worker: EngineWorker, tokenizer, parsed: ParsedRequest,
                 config: ServerConfig):
        self.worker, self.parsed, self.config = worker, parsed, config
        self.id = ("chatcmpl-" if parsed.chat else "cmpl-") + uuid.uuid4().hex
        sampling = parsed.sampling
        self.choices = [Choice(i, sampling.stop, tokenizer)
                        for i in range(len(parsed.prompts) * sampling.n)]
        self.by_request: dict[int, Choice] = {}
        self.updates: asyncio.Queue[Update] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()

    def _sink(self, update: Update) -> None:  # on the worker thread
        self._loop.call_soon_threadsafe(self.updates.put_nowait, update)

    async def submit(self) -> None:
        sampling, n = self.parsed.sampling, self.parsed.sampling.n
        eos = None
        if sampling.stop_token_ids:
            eos = list(dict.fromkeys([*self.config.default_eos, *sampling.stop_token_ids]))
        for p, ids in enumerate(self.parsed.prompts):
            seeds = [(sampling.seed + p * n + j) % 2**32 for j in range(n)]
            submission = Submission(ids, seeds, sampling.max_tokens, sampling.temperature,
                                    sampling.top_p, eos)
            try:
                request_ids = await asyncio.wrap_future(self.worker.submit(submission,
                                                                           self._sink))
            except (ValueError, TypeError) as err:
                field = "stop_token_ids" if "eos_token_id" in str(err) else None
                raise BadRequest(field, str(err)) from None
            for j, request_id in enumerate(request_ids):
                choice = self.choices[p * n + j]
                choice.request_id = request_id
                self.by_request[request_id] = choice

    def _apply(self, update: Update) -> Choice:
        choice = self.by_request[update.request_id]
        if update.finished:
            if update.finish_reason == "error":
                raise RuntimeError("the engine failed while serving this request")
            choice.finish(update.finish_reason)
        elif choice.add(update.tokens, update.logprobs):
            self.worker.cancel([update.request_id])  # a stop string: free the slot
        return choice

    async def whole(self, request: Request) -> dict | None:
        """The complete response, or None if the client disconnected first."""
        while not all(c.finished for c in self.choices):
            try:
                update = await asyncio.wait_for(self.updates.get(), DISCONNECT_POLL_SECONDS)
            except TimeoutError:
                if await request.is_disconnected():
                    return None
                continue
            self._apply(update)
        sampling = self.parsed.sampling
        prompt_tokens = sum(len(p) for p in self.parsed.prompts) * sampling.n
        return response_object(self.id, self.config.model_name, self.parsed.chat,
                               self.choices, prompt_tokens, sampling.logprobs,
                               sampling.return_token_ids)

    async def chunks(self):
        """Server-sent events: a chunk per choice per update, then `[DONE]`."""
        sampling, chat = self.parsed.sampling, self.parsed.chat
        first = {c.index: True for c in self.choices}
        ended: set[int] = set()  # choices whose last chunk is sent
        while len(ended) < len(self.choices):
            update = await self.updates.get()
            choice = self.by_request[update.request_id]
            if choice.index in ended:
                continue  # e.g. the engine's end of a sample a stop string ended
            before = len(choice.tokens)
            self._apply(update)
            delta = choice.unsent_text()
            new_tokens = choice.tokens[before:]
            if not delta and not new_tokens and not choice.finished:
                continue
            logprobs = (logprobs_object(choice, chat, new_tokens, choice.logprobs[before:])
                        if sampling.logprobs else None)
            chunk = chunk_object(self.id, self.config.model_name, chat, choice, delta,
                                 first[choice.index], logprobs,
                                 new_tokens if sampling.return_token_ids else None,
                                 choice.finish_reason if choice.finished else None)
            first[choice.index] = False
            if choice.finished:
                ended.add(choice.index)
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"

    def cancel_all(self) -> None:
        """Cancels this request's samples that have not finished (a no-op for the rest)."""
        unfinished = [c.request_id for c in self.choices
                      if c.request_id is not None and not c.finished]
        if unfinished:
            self.worker.cancel(unfinished)
