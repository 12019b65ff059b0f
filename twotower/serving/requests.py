"""Server settings (`recipes/serve.yaml`), the decoder table, and completion / chat request validation.

A request body is checked field by field before anything reaches the scheduler; a bad field raises
`RequestError(param, message)`, which the HTTP layer turns into HTTP 400 with OpenAI's error shape
(`{"error": {"message", "type": "invalid_request_error", "param"}}`), so a client sees which
field to fix. The decoder a request names is built from the library's own decoder classes through
one small table (`DECODERS`): name -> (Decoder subclass, the settings it takes).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..decoding import Autoregressive, Decoder, MaskDiffusion, Speculative
from ..samplers import ConfidenceThreshold
from ..prompting import Prompt, check_messages, encode_prompt
from ..tokenizers import Tokenizer

__all__ = ["ServeSettings", "CompletionRequest", "RequestError", "DECODERS", "build_decoder", "parse_completion",
           "parse_chat"]


@dataclass
class ServeSettings:
    """What `recipes/serve.yaml` sets: the model, the default decoder and its settings, the limits.

    Args:
        model: a two-tower checkpoint directory (released layout) or a built-in model name
            (`twotower.hub`; "embedded", the default, is the embedded default model).
        model_name: the id `/v1/models` lists and requests may name.
        tokenizer: text <-> ids, chosen by class_path; None (the default) uses the checkpoint's own
            (`tokenizers.tokenizer_for`). Prompts are encoded by `prompting.encode_prompt`, as in
            `predict`; chat requests use the tokenizer's chat template.
        decoder: the default decoder name (a key of `DECODERS`: speculative, diffusion, ar).
        block_size: default block size (None = the model's).
        threshold: the ConfidenceThreshold of diffusion commits and of multi-step speculative drafts.
        draft_steps / steps_per_block: speculative draft forwards / diffusion forwards per block.
        temperature / max_tokens: request defaults.
        max_batch: rows per working batch; further requests wait for a row to leave.
        stop_at_eos: a row ends at the tokenizer's EOS.
        dtype: float32 / bfloat16 / float16, or None to keep the checkpoint's.
        device: where the towers run (the context tower, when denoiser_device is set).
        denoiser_device: put the denoiser on another device (e.g. "cuda:1"); it then reads a mirror
            of the context cache.
        overlap: run the two towers at once across request groups (the denoiser drafts one group
            while the context tower verifies another); None = on exactly when the towers are on two
            devices. See `Scheduler`.
        host / port: where to listen (127.0.0.1 unless told otherwise).
        max_requests: stop after serving this many requests (bounded runs); None = serve until stopped.
    """

    model: str = "embedded"
    model_name: str = "twotower"
    tokenizer: Tokenizer | None = None
    decoder: str = "speculative"
    block_size: int | None = None
    threshold: float = 0.8
    draft_steps: int = 1
    steps_per_block: int = 16
    temperature: float = 0.0
    max_tokens: int = 16
    max_batch: int = 8
    stop_at_eos: bool = True
    dtype: str | None = None
    device: str = "cpu"
    denoiser_device: str | None = None
    overlap: bool | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_requests: int | None = None


# name -> (decoder class, its constructor arguments from the request's resolved settings)
DECODERS: dict[str, tuple[type[Decoder], object]] = {
    "speculative": (Speculative, lambda s: dict(block_size=s["block_size"], draft_steps=s["draft_steps"],
                                                sampler=ConfidenceThreshold(s["threshold"]),
                                                temperature=s["temperature"], top_p=s["top_p"])),
    "diffusion": (MaskDiffusion, lambda s: dict(sampler=ConfidenceThreshold(s["threshold"]),
                                                block_size=s["block_size"], steps_per_block=s["steps_per_block"],
                                                temperature=s["temperature"], top_p=s["top_p"])),
    "ar": (Autoregressive, lambda s: dict(temperature=s["temperature"], top_p=s["top_p"])),
}


def build_decoder(name: str, **settings) -> Decoder:
    """The library decoder `name` (a key of DECODERS) built with `settings`."""
    if name not in DECODERS:
        raise RequestError("decoder", f"unknown decoder {name!r}; choose one of {sorted(DECODERS)}")
    cls, kwargs = DECODERS[name]
    return cls(**kwargs(settings))


class RequestError(ValueError):
    """A bad request field: `param` names it, the message says what is wrong and what is allowed."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": "invalid_request_error", "param": self.param, "code": None}}


@dataclass
class CompletionRequest:
    """One validated `/v1/completions` or `/v1/chat/completions` request; `prompt` is the text or the
    chat messages, `prompt_ids` their ids (`prompting.encode_prompt`)."""

    prompt: Prompt
    prompt_ids: list[int]
    max_tokens: int
    decoder: Decoder
    decoder_name: str
    stream: bool = False
    stop: list[str] = field(default_factory=list)
    seed: int | None = None

    def generator(self) -> torch.Generator | None:
        """The request's sampling generator (seeded when `seed` is given; None when greedy)."""
        if self.decoder.temperature <= 0:
            return None
        g = torch.Generator()
        if self.seed is None:
            g.seed()  # a fresh non-deterministic seed for this generator only (global RNG untouched)
            return g
        return g.manual_seed(self.seed)


def _int(body, name, default, minimum):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise RequestError(name, f"{name} must be an integer >= {minimum}, got {v!r}")
    return v


def _number(body, name, default, low, high, low_open=False):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (low < v if low_open else low <= v) or v > high:
        lo = "(" if low_open else "["
        raise RequestError(name, f"{name} must be a number in {lo}{low}, {high}], got {v!r}")
    return float(v)


def _check_body(body, settings: ServeSettings) -> dict:
    if not isinstance(body, dict):
        raise RequestError("body", f"the request body must be a JSON object, got {type(body).__name__}")
    model = body.get("model")
    if model is not None and model != settings.model_name:
        raise RequestError("model", f"unknown model {model!r}; this server serves {settings.model_name!r}")
    if body.get("n") not in (None, 1):
        raise RequestError("n", f"only n = 1 is supported, got {body.get('n')!r}")
    return body


def parse_completion(body, settings: ServeSettings, tokenizer: Tokenizer, *, context_limit: int | None,
                     model_block_size: int) -> CompletionRequest:
    """Validate a decoded `/v1/completions` JSON body against the server's settings; raise RequestError
    naming the field."""
    body = _check_body(body, settings)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise RequestError("prompt", f"prompt must be a non-empty string, got {type(prompt).__name__} {prompt!r:.40}")
    max_tokens = _int(body, "max_tokens", settings.max_tokens, 1)
    return _request(body, prompt, "prompt", max_tokens, settings, tokenizer, context_limit, model_block_size)


def parse_chat(body, settings: ServeSettings, tokenizer: Tokenizer, *, context_limit: int | None,
               model_block_size: int) -> CompletionRequest:
    """Validate a decoded `/v1/chat/completions` JSON body: `messages` go through the model's chat
    template (`prompting.encode_prompt`); the other fields are those of a completion request
    (`max_completion_tokens`, OpenAI's newer name, wins over `max_tokens`)."""
    body = _check_body(body, settings)
    try:
        messages = check_messages(body.get("messages"))
    except ValueError as e:
        raise RequestError("messages", str(e)) from None
    max_tokens = _int(body, "max_completion_tokens", _int(body, "max_tokens", settings.max_tokens, 1), 1)
    return _request(body, messages, "messages", max_tokens, settings, tokenizer, context_limit, model_block_size)


def _request(body: dict, prompt: Prompt, param: str, max_tokens: int, settings: ServeSettings, tokenizer: Tokenizer,
             context_limit: int | None, model_block_size: int) -> CompletionRequest:
    """The fields every request shares (decoder and its settings, stop, seed, stream), and the prompt
    encoded by `prompting.encode_prompt` (errors name `param`, the prompt's field)."""
    name = body.get("decoder", settings.decoder)
    if not isinstance(name, str) or name not in DECODERS:
        raise RequestError("decoder", f"unknown decoder {name!r}; choose one of {sorted(DECODERS)}")
    minimum_block = 2 if DECODERS[name][0] is Speculative else 1
    block_size = _int(body, "block_size", settings.block_size or model_block_size, minimum_block)
    resolved = dict(
        temperature=_number(body, "temperature", settings.temperature, 0.0, 2.0),
        top_p=_number(body, "top_p", None, 0.0, 1.0, low_open=True),
        threshold=_number(body, "threshold", settings.threshold, 0.0, 1.0, low_open=True),
        block_size=block_size, draft_steps=settings.draft_steps, steps_per_block=settings.steps_per_block,
    )
    if resolved["top_p"] == 1.0:
        resolved["top_p"] = None
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise RequestError("stop", f"stop must be a string or a list of strings, got {stop!r}")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError("seed", f"seed must be an integer, got {seed!r}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("stream", f"stream must be true or false, got {stream!r}")
    try:
        ids = encode_prompt(tokenizer, prompt)
    except ValueError as e:  # e.g. chat messages for a tokenizer without a chat template
        raise RequestError(param, str(e)) from None
    if context_limit is not None:
        if len(ids) >= context_limit:
            raise RequestError(param, f"the prompt is {len(ids)} tokens; the model's context limit "
                                      f"(max_position_embeddings) is {context_limit}: shorten the prompt")
        if len(ids) + max_tokens > context_limit:
            raise RequestError("max_tokens", f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                                             f"context limit {context_limit}: lower max_tokens to at most "
                                             f"{context_limit - len(ids)}")
    try:
        decoder = build_decoder(name, **resolved)
    except ValueError as e:  # a setting the decoder itself refuses
        raise RequestError("decoder", f"decoder {name!r} refused its settings: {e}") from e
    return CompletionRequest(prompt=prompt, prompt_ids=ids, max_tokens=max_tokens, decoder=decoder, decoder_name=name,
                             stream=stream, stop=[s for s in stop if s], seed=seed)
