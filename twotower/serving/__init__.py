"""An OpenAI-compatible HTTP server with continuous batching at block boundaries.

    python -m twotower.cli serve --config recipes/serve.yaml [--port 8000] [--host 127.0.0.1]

Layout: `requests.py` (settings, completion and chat request validation; decoders come from the one
registry, `decoding.register_decoder`), `stepper.py` (working batches: requests joining and leaving a
decoder's own state machine between its steps; no decoding loop), `scheduler.py` (the
batching thread and per-request `Job`), `app.py` (the FastAPI endpoints and `serve`),
`connections.py` (the header deadline uvicorn lacks). Needs the
`serve` extra (fastapi, uvicorn); importing this package does not import them.
"""

from .requests import (CompletionRequest, RequestError, ServeSettings, build_decoder, parse_chat,
                       parse_completion)
from .scheduler import Job, Scheduler
from .stepper import JobRows, RowChoice, Stepper

__all__ = ["ServeSettings", "CompletionRequest", "RequestError", "build_decoder", "parse_completion",
           "parse_chat", "Job", "Scheduler", "Stepper", "JobRows", "RowChoice"]
