"""The HTTP layer: OpenAI-compatible endpoints on FastAPI + uvicorn, and `serve` (the CLI entry).

    POST /v1/completions        {"prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "stream",
                                 extensions: "decoder" (a registered name), "threshold", "block_size",
                                 "top_k", "steps_per_block", "draft_steps"; each within a range (requests.py)}
    POST /v1/chat/completions   the same with "messages" (through the model's chat template) instead of "prompt"
    GET  /v1/models        the one served model
    GET  /health           {"status": "ok", "running", "waiting", "dropped", ...} (no API key needed)

Why FastAPI + uvicorn rather than LitServe: continuous batching at block boundaries needs our own
scheduler loop either way (rows join and leave a working batch between denoiser blocks, which
LitServe's request-level `batch` / `unbatch` cannot express), and LitServe's worker processes and
its own batching window would sit between the HTTP layer and that loop. FastAPI gives plain async
handlers, server-sent events through `StreamingResponse`, and disconnect detection, and runs in a
thread inside tests and benchmarks; the scheduler thread (scheduler.py) owns the model.

Before a request reaches a handler's JSON parsing: the API key (`api_key` / TWOTOWER_API_KEY,
`Authorization: Bearer <key>`, 401), the content type (only application/json: 415, so that a
browser's "simple" cross-origin POST never runs a generation), the body size (`max_body_bytes`:
413, from Content-Length and while reading) and the body's arrival time (`body_timeout_s`: 408).
Headers not complete `header_timeout_s` after they started get 408 and a closed connection
(connections.py), and uvicorn refuses connections beyond `max_connections` with 503. Handlers then validate the body off the event loop
(400 + OpenAI's error object naming `param` and the allowed range), submit a `Job`, and read its
events from an asyncio queue fed thread-safely by the scheduler. A task waits for the client's
disconnect in both modes: a client that goes away (a closed stream, or a non-streaming request whose
client disconnects) cancels its job, whose row leaves the batch at the next block boundary.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request  # module level: FastAPI resolves the handlers' annotations here
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, StreamingResponse

from ..decoding import Towers
from ..decoding.base import length_limit
from ..model import TwoTowerLM
from ..tokenizers import load_draft_vocab, tokenizer_for
from ..validation import parse_dtype
from .connections import header_deadline_protocol
from .requests import RequestError, ServeSettings, parse_chat, parse_completion
from .scheduler import Job, Scheduler

__all__ = ["create_app", "serve", "uvicorn_config", "main", "load_model", "CompletionShape", "ChatShape", "api_key_of",
           "exposure_warning", "ENV_API_KEY"]

ENV_API_KEY = "TWOTOWER_API_KEY"
# Paths served without the API key: liveness probes and (when `docs` is on) the API docs.
OPEN_PATHS = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
log = logging.getLogger("twotower.serving")


def api_key_of(settings: ServeSettings) -> str | None:
    """The key clients must present: `settings.api_key`, else the TWOTOWER_API_KEY environment
    variable, else None (no authentication)."""
    return settings.api_key or os.environ.get(ENV_API_KEY) or None


def exposure_warning(settings: ServeSettings) -> str | None:
    """A warning when the server would listen beyond this machine without an API key (None when it
    listens on loopback only, or has a key)."""
    if api_key_of(settings) is not None:
        return None
    host = settings.host.strip("[]")
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:
        return None
    return (f"serving on {settings.host}, which other machines can reach, without an API key: anyone who can "
            f"connect can run generations. Set --api_key (or {ENV_API_KEY}), or --host 127.0.0.1")


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error",
               code: str | None = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class Guard:
    """Pure ASGI middleware (streaming and disconnects pass straight through): the API key on every
    path but OPEN_PATHS, checked in constant time (`hmac.compare_digest`); 401 otherwise."""

    def __init__(self, app, api_key: str):
        # Bytes: ASGI headers arrive as bytes and are compared as they are, with no decoding step to fail.
        self.app, self.key = app, api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS and not self.allowed(scope):
            response = JSONResponse(error_body("a valid API key is required: send the header 'Authorization: "
                                               "Bearer <key>'", code="invalid_api_key"), status_code=401,
                                    headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def allowed(self, scope) -> bool:
        header = next((v for k, v in scope.get("headers", ()) if k == b"authorization"), b"")
        scheme, _, token = header.strip().partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key)


class BodyError(Exception):
    """A request body refused before JSON parsing: HTTP `status` with OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = "body"):
        super().__init__(message)
        self.status, self.param = status, param

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(str(self), self.param), status_code=self.status)


async def read_json_body(request: Request, limit: int, timeout: float | None = None) -> bytes:
    """The raw body of a JSON request: 415 unless Content-Type is application/json, 413 when it is
    larger than `limit` bytes (by Content-Length, or counted while reading a body sent without one),
    408 when it has not all arrived `timeout` seconds after the headers."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise BodyError(415, f"Content-Type must be application/json, got {media or 'none'!r:.60}", "content-type")
    length = request.headers.get("content-length")
    if length is not None:
        if not length.strip().isdigit():
            raise BodyError(400, f"bad Content-Length {length!r:.40}", "content-length")
        if int(length) > limit:
            raise BodyError(413, f"the body is {int(length)} bytes; this server takes at most {limit} "
                                 "(max_body_bytes)")
    try:
        # One deadline for the whole body, not per chunk: a byte every few seconds would pass any
        # per-read timeout and hold the connection for as long as the client likes.
        return await asyncio.wait_for(_read_limited(request, limit), timeout)
    except asyncio.TimeoutError:
        raise BodyError(408, f"the body did not arrive within {timeout} s (body_timeout_s)") from None


async def _read_limited(request: Request, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        # Counted while reading: a client may lie in Content-Length or send none (chunked), and the
        # limit must hold before the whole body sits in memory.
        if size > limit:
            raise BodyError(413, f"the body is more than {limit} bytes, the most this server takes (max_body_bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


async def wait_for_disconnect(request: Request, on_disconnect) -> None:
    """Wait (as a task) until the client goes away, then call `on_disconnect()`. The body has been
    read, so the next ASGI message is the disconnect (uvicorn also reads the socket again for it)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            on_disconnect()
            return


def load_model(settings: ServeSettings):
    """The two-tower model of `settings.model`, in eval mode on `settings.device`."""
    dtype = None if settings.dtype is None else parse_dtype("dtype", settings.dtype)
    model = TwoTowerLM.from_pretrained(settings.model, dtype=dtype).to(settings.device).eval().requires_grad_(False)
    if settings.denoiser_device is not None:
        model.place_towers_on_devices(settings.device, settings.denoiser_device)
    vocab = None if settings.draft_vocab is None else load_draft_vocab(settings.draft_vocab)
    if settings.merge_adapters or settings.int8_draft or settings.pack_context or vocab is not None:
        # After every move: moving the model drops the copies.
        model.merge_adapters(int8_draft=settings.int8_draft, pack_context=settings.pack_context, draft_vocab=vocab)
    return model


def create_app(settings: ServeSettings, model=None, tokenizer=None, on_limit=None):
    """A FastAPI app serving `model` (default: loaded from settings.model) with `tokenizer` (default
    settings.tokenizer, else the checkpoint's own).

    on_limit: called once `settings.max_requests` completions have been answered (`serve` stops
    uvicorn with it).
    """
    model = load_model(settings) if model is None else model
    tokenizer = tokenizer_for(model, settings.model, tokenizer or settings.tokenizer)
    towers = Towers.of(model)
    settings.check(towers.block_size)
    if settings.denoiser_device is not None:  # explicit: the denoiser reads a mirror of the context cache
        towers.denoiser_device = settings.denoiser_device
    eos = [tokenizer.eos_token_id] if settings.stop_at_eos else []
    # The context tower's own limit (a sliding window may be shorter than max_position_embeddings), so a
    # request past it is refused with a 400 before it takes a row, not failed mid-generation.
    limit, limit_name = length_limit(towers.context)
    # Twice a batch by default: with overlap on, two working batches of one setting can both be full.
    max_rows = settings.max_rows if settings.max_rows is not None else 2 * settings.max_batch
    scheduler = Scheduler(towers, max_batch=settings.max_batch, overlap=settings.overlap, max_rows=max_rows)
    # Requests are decoded and tokenized here, off the event loop; one thread, since tokenizers are not
    # all safe to call from several threads at once (the body size bounds each call).
    parser = ThreadPoolExecutor(max_workers=1, thread_name_prefix="twotower-parse")
    answered = [0]

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()
            parser.shutdown(wait=False, cancel_futures=True)

    docs = settings.docs
    app = FastAPI(title="twotower", lifespan=lifespan, docs_url="/docs" if docs else None,
                  redoc_url="/redoc" if docs else None, openapi_url="/openapi.json" if docs else None)
    key = api_key_of(settings)
    if key is not None:
        app.add_middleware(Guard, api_key=key)
    if settings.cors_origins:  # added last: the outermost layer, so preflights and 401s get CORS headers
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.state.scheduler, app.state.model, app.state.tokenizer = scheduler, model, tokenizer
    app.state.settings = settings

    def finished_one() -> None:
        answered[0] += 1
        if settings.max_requests is not None and answered[0] >= settings.max_requests and on_limit is not None:
            on_limit()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name, **scheduler.stats()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0,
                                            "owned_by": "twotower"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(request, parse_completion, CompletionShape(settings.model_name))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await answer(request, parse_chat, ChatShape(settings.model_name))

    def decode_and_parse(raw: bytes, parse):
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, too deep, an int of too many digits
            raise RequestError("body", f"the body is not valid JSON: {type(e).__name__}: {str(e):.200}") from None
        return parse(body, settings, tokenizer, context_limit=limit, model_block_size=towers.block_size,
                     limit_name=limit_name)

    async def answer(request: Request, parse, shape: "CompletionShape"):
        """Read and validate the body (415 / 413 / 400), run the request as a `Job`, and answer in
        `shape`: server-sent events for `stream: true`, else one JSON object."""
        try:
            raw = await read_json_body(request, settings.max_body_bytes, settings.body_timeout_s)
        except BodyError as e:
            return e.response()
        try:
            req = await asyncio.get_running_loop().run_in_executor(parser, decode_and_parse, raw, parse)
        except RequestError as e:
            return JSONResponse(e.body(), status_code=400)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def sink(ev: dict) -> None:  # scheduler thread; a non-streaming answer needs only the last event
            if req.stream or ev["type"] != "text":
                loop.call_soon_threadsafe(events.put_nowait, ev)

        job = Job(req, tokenizer, eos, sink=sink)

        def gone() -> None:  # the client disconnected: drop the job, wake the handler
            job.cancel()
            events.put_nowait({"type": "gone"})

        # Refused before submitting: the queue stays bounded, and 503 with Retry-After tells a client to
        # back off rather than wait an unbounded time.
        if settings.max_waiting is not None and scheduler.stats()["waiting"] >= settings.max_waiting:
            return JSONResponse(error_body(f"the server is busy: {settings.max_waiting} requests are already waiting "
                                           "(max_waiting); retry later", kind="server_error", code="overloaded"),
                                status_code=503, headers={"Retry-After": "1"})
        # Started before submit: a client that leaves at once still frees its row.
        watcher = asyncio.create_task(wait_for_disconnect(request, gone))
        scheduler.submit(job)
        usage = lambda n: {"prompt_tokens": len(req.prompt_ids), "completion_tokens": n,  # noqa: E731
                           "total_tokens": len(req.prompt_ids) + n}

        if req.stream:
            async def stream():
                try:
                    opening = shape.opening()
                    if opening is not None:
                        yield f"data: {json.dumps(opening)}\n\n"
                    while True:
                        ev = await events.get()
                        if ev["type"] == "text":
                            yield f"data: {json.dumps(shape.piece(ev['text']))}\n\n"
                        elif ev["type"] == "done":
                            last = shape.last(ev["finish_reason"])
                            last["usage"] = usage(ev["completion_tokens"])
                            yield f"data: {json.dumps(last)}\n\n"
                            break
                        elif ev["type"] == "gone":
                            return
                        else:
                            err = error_body(ev["message"], kind="server_error")
                            yield f"data: {json.dumps(err)}\n\n"
                            break
                    yield "data: [DONE]\n\n"
                finally:  # normal end, or the client closed the stream (the generator is cancelled)
                    watcher.cancel()
                    job.cancel()
                    finished_one()

            return StreamingResponse(stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})

        try:
            while True:
                ev = await events.get()
                if ev["type"] == "gone":
                    return JSONResponse(error_body("client disconnected"), status_code=499)
                if ev["type"] == "done":
                    out = shape.whole(ev["text"], ev["finish_reason"])
                    out["usage"] = usage(ev["completion_tokens"])
                    return JSONResponse(out)
                if ev["type"] == "error":
                    return JSONResponse(error_body(ev["message"], kind="server_error"), status_code=500)
        finally:
            watcher.cancel()
            job.cancel()
            finished_one()

    return app


class CompletionShape:
    """OpenAI's `/v1/completions` response objects: streamed pieces, the closing chunk, the whole answer."""

    kind = "text_completion"

    def __init__(self, model_name: str):
        self.model_name, self.created = model_name, int(time.time())
        self.id = f"{self.prefix()}-{uuid.uuid4().hex[:24]}"

    def prefix(self) -> str:
        return "cmpl"

    def wrap(self, kind: str, choice: dict) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_name,
                "choices": [{"index": 0, "logprobs": None, **choice}]}

    def opening(self) -> dict | None:
        """The event sent before any text (None: nothing)."""
        return None

    def piece(self, text: str) -> dict:
        return self.wrap(self.kind, {"text": text, "finish_reason": None})

    def last(self, reason: str) -> dict:
        return self.wrap(self.kind, {"text": "", "finish_reason": reason})

    def whole(self, text: str, reason: str) -> dict:
        return self.wrap(self.kind, {"text": text, "finish_reason": reason})


class ChatShape(CompletionShape):
    """OpenAI's `/v1/chat/completions` objects: `chat.completion.chunk` deltas (the first one opens the
    assistant's turn), and one `chat.completion` with the assistant's message."""

    kind = "chat.completion.chunk"

    def prefix(self) -> str:
        return "chatcmpl"

    def opening(self) -> dict:
        return self.wrap(self.kind, {"delta": {"role": "assistant", "content": ""}, "finish_reason": None})

    def piece(self, text: str) -> dict:
        return self.wrap(self.kind, {"delta": {"content": text}, "finish_reason": None})

    def last(self, reason: str) -> dict:
        return self.wrap(self.kind, {"delta": {}, "finish_reason": reason})

    def whole(self, text: str, reason: str) -> dict:
        message = {"role": "assistant", "content": text}
        return self.wrap("chat.completion", {"message": message, "finish_reason": reason})


def uvicorn_config(app, settings: ServeSettings, port: int | None = None):
    """uvicorn's settings for `app`: the address, the connection bound and the header deadline of
    `settings` (`port` overrides settings.port, e.g. a free port in tests)."""
    import uvicorn

    return uvicorn.Config(app, host=settings.host, port=settings.port if port is None else port,
                          log_level="warning", limit_concurrency=settings.max_connections,
                          http=header_deadline_protocol(settings.header_timeout_s))


def serve(settings: ServeSettings, model=None, tokenizer=None) -> None:
    """Run the server in this thread until stopped (Ctrl-C) or `settings.max_requests` are answered."""
    import uvicorn  # only running the server needs it: create_app alone serves tests and embedding apps

    server: uvicorn.Server | None = None

    def stop() -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(settings, model, tokenizer, on_limit=stop)
    warning = exposure_warning(settings)
    if warning is not None:
        log.warning(warning)
    server = uvicorn.Server(uvicorn_config(app, settings))
    print(f"twotower: serving {settings.model_name} ({settings.model}) on http://{settings.host}:{settings.port}",
          flush=True)
    server.run()


def settings_parser():
    """jsonargparse parser: --config recipes/serve.yaml plus every ServeSettings field as a flag."""
    from jsonargparse import ActionConfigFile, ArgumentParser  # the serve command's parser only

    p = ArgumentParser(prog="python -m twotower.cli serve", description="OpenAI-compatible twotower server")
    p.add_argument("--config", action=ActionConfigFile, help="a YAML file of ServeSettings (recipes/serve.yaml)")
    p.add_class_arguments(ServeSettings, nested_key=None)
    return p


def parse_settings(argv: list[str]) -> ServeSettings:
    p = settings_parser()
    cfg = p.parse_args(argv)
    cfg = p.instantiate_classes(cfg)
    fields = {k: v for k, v in vars(cfg).items() if k != "config" and k in ServeSettings.__dataclass_fields__}
    return ServeSettings(**fields)


def main(argv: list[str]) -> int:
    serve(parse_settings(argv))
    return 0
