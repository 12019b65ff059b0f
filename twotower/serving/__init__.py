"""An OpenAI-compatible HTTP server with continuous batching at block boundaries.

    python -m twotower.cli serve --config recipes/serve.yaml [--port 8000] [--host 127.0.0.1]

Layout: `requests.py` (settings, the decoder table, completion and chat request validation), `stepper.py` (step-wise
decoders: a working batch that rows join and leave between iterations), `scheduler.py` (the
batching thread and per-request `Job`), `app.py` (the FastAPI endpoints and `serve`). Needs the
`serve` extra (fastapi, uvicorn); importing this package does not import them.
"""

from .requests import (DECODERS, CompletionRequest, RequestError, ServeSettings, build_decoder, parse_chat,
                       parse_completion)
from .scheduler import Job, Scheduler
from .stepper import ARStepper, DiffusionStepper, SpeculativeStepper, Stepper, stepper_for

__all__ = ["ServeSettings", "CompletionRequest", "RequestError", "DECODERS", "build_decoder", "parse_completion",
           "parse_chat", "Job", "Scheduler", "Stepper", "ARStepper", "SpeculativeStepper", "DiffusionStepper",
           "stepper_for"]
