"""The HTTP layer: OpenAI-compatible endpoints on FastAPI + uvicorn, and `serve` (the CLI entry).

    POST /v1/completions        {"prompt", "max_tokens", "temperature", "top_p", "stop", "seed", "stream",
                                 extensions: "decoder" (speculative | diffusion | ar), "threshold", "block_size"}
    POST /v1/chat/completions   the same with "messages" (through the model's chat template) instead of "prompt"
    GET  /v1/models        the one served model
    GET  /health           {"status": "ok", "running", "waiting", ...}

Why FastAPI + uvicorn rather than LitServe: continuous batching at block boundaries needs our own
scheduler loop either way (rows join and leave a working batch between denoiser blocks, which
LitServe's request-level `batch` / `unbatch` cannot express), and LitServe's worker processes and
its own batching window would sit between the HTTP layer and that loop. FastAPI gives plain async
handlers, server-sent events through `StreamingResponse`, and disconnect detection, and runs in a
thread inside tests and benchmarks; the scheduler thread (scheduler.py) owns the model.

Handlers validate the body (400 + OpenAI's error object naming `param`), submit a `Job`, and read
its events from an asyncio queue fed thread-safely by the scheduler. A stream that the client
closes, or a non-streaming request whose client disconnects, cancels its job; the row leaves the
batch at the next boundary and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager

import torch
from fastapi import FastAPI, Request  # module level: FastAPI resolves the handlers' annotations here
from fastapi.responses import JSONResponse, StreamingResponse

from ..decoding import Towers
from ..tokenizers import tokenizer_for
from .requests import RequestError, ServeSettings, parse_chat, parse_completion
from .scheduler import Job, Scheduler

__all__ = ["create_app", "serve", "main", "load_model", "CompletionShape", "ChatShape"]


def load_model(settings: ServeSettings):
    """The two-tower model of `settings.model`, in eval mode on `settings.device`."""
    from ..model import TwoTowerLM

    dtype = None
    if settings.dtype is not None:
        if settings.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {settings.dtype!r}")
        dtype = getattr(torch, settings.dtype)
    model = TwoTowerLM.from_pretrained(settings.model, dtype=dtype).to(settings.device).eval().requires_grad_(False)
    if settings.denoiser_device is not None:
        model.place_towers_on_devices(settings.device, settings.denoiser_device)
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
    if settings.denoiser_device is not None:  # explicit: the denoiser reads a mirror of the context cache
        towers.denoiser_device = settings.denoiser_device
    eos = [tokenizer.eos_token_id] if settings.stop_at_eos else []
    limit = getattr(towers.context.config, "max_position_embeddings", None)
    scheduler = Scheduler(towers, max_batch=settings.max_batch, overlap=settings.overlap)
    answered = [0]

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="twotower", lifespan=lifespan)
    app.state.scheduler, app.state.model, app.state.tokenizer = scheduler, model, tokenizer

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

    async def answer(request: Request, parse, shape: "CompletionShape"):
        """Validate the body with `parse`, run the request as a `Job`, and answer in `shape`:
        server-sent events for `stream: true`, else one JSON object."""
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return JSONResponse(RequestError("body", f"the body is not valid JSON: {e}").body(), status_code=400)
        try:
            req = parse(body, settings, tokenizer, context_limit=limit, model_block_size=towers.block_size)
        except RequestError as e:
            return JSONResponse(e.body(), status_code=400)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        job = Job(req, tokenizer, eos, sink=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
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
                        else:
                            err = {"error": {"message": ev["message"], "type": "server_error", "param": None}}
                            yield f"data: {json.dumps(err)}\n\n"
                            break
                    yield "data: [DONE]\n\n"
                finally:  # normal end, or the client closed the stream (the generator is cancelled)
                    job.cancel()
                    finished_one()

            return StreamingResponse(stream(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})

        try:
            while True:
                try:
                    ev = await asyncio.wait_for(events.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        job.cancel()
                        return JSONResponse({"error": {"message": "client disconnected"}}, status_code=499)
                    continue
                if ev["type"] == "done":
                    out = shape.whole(ev["text"], ev["finish_reason"])
                    out["usage"] = usage(ev["completion_tokens"])
                    return JSONResponse(out)
                if ev["type"] == "error":
                    return JSONResponse({"error": {"message": ev["message"], "type": "server_error", "param": None}},
                                        status_code=500)
        finally:
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


def serve(settings: ServeSettings, model=None, tokenizer=None) -> None:
    """Run the server in this thread until stopped (Ctrl-C) or `settings.max_requests` are answered."""
    import uvicorn

    server: uvicorn.Server | None = None

    def stop() -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(settings, model, tokenizer, on_limit=stop)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning"))
    print(f"twotower: serving {settings.model_name} ({settings.model}) on http://{settings.host}:{settings.port}",
          flush=True)
    server.run()


def settings_parser():
    """jsonargparse parser: --config recipes/serve.yaml plus every ServeSettings field as a flag."""
    from jsonargparse import ActionConfigFile, ArgumentParser

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
