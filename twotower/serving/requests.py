"""Server settings (`recipes/serve.yaml`), the decoder table, and completion / chat request validation.

A request body is checked field by field before anything reaches the scheduler; a bad field raises
`RequestError(param, message)`, which the HTTP layer turns into HTTP 400 with OpenAI's error shape
(`{"error": {"message", "type": "invalid_request_error", "param"}}`), so a client sees which
field to fix. The decoder a request names is looked up in the one decoder registry
(`decoding.register_decoder`: speculative, diffusion, ar, mock_ar, tolerant, their aliases, and any
name the user registered) and built with the settings its constructor takes.

Every per-request setting has a range, and the message of a value outside it names the field, the
value and the range: `max_tokens` in [1, max_tokens_limit] and prompt + max_tokens within the
model's context, `block_size` up to `max_block_size` (the model's trained block size by default),
`steps_per_block` / `draft_steps` up to `max_steps_per_block`, `temperature` in [0, 2], `top_p` in
(0, 1], `top_k` in [0, vocabulary size] (0: off), `threshold` in (0, 1], `seed` a signed 64-bit
integer, `stop` at most 16 strings of at most 256 characters. Fields an endpoint does not know are
refused, and OpenAI's fields this server does not implement (`best_of`, `logprobs`, `echo`, `n`,
`suffix`, penalties, `logit_bias`, ...) are accepted only with the value that asks for nothing
(`NEUTRAL`: n = 1, echo false, penalties 0, ...), so a client never silently gets less than it
asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..decoding import Decoder, NgramLookup, decoder_class, registered_decoders
from ..decoding import build_decoder as registry_build_decoder
from ..prompting import Prompt, check_messages, encode_prompt
from ..tokenizers import Tokenizer
from ..validation import check_positive

__all__ = ["ServeSettings", "Limits", "CompletionRequest", "RequestError", "build_decoder",
           "parse_completion", "parse_chat", "COMPLETION_FIELDS", "CHAT_FIELDS"]


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
        decoder: the default decoder: a registered name (speculative, diffusion, ar, mock_ar, tolerant,
            or one registered with `decoding.register_decoder`) or a Decoder class_path.
        block_size: default block size (None = the model's).
        threshold: the ConfidenceThreshold of diffusion commits and of multi-step speculative drafts.
        draft_steps / steps_per_block: speculative draft forwards / diffusion forwards per block.
        batch_block_size: speculative drafts this long (at most the request's block_size) while more
            than one row shares a working batch, full-length ones when a row runs alone; None = always
            full length. A server setting, not a request field: it trades tokens per iteration for
            cheaper batched forwards, which pays on a CPU (SmolLM2 at batch 8: 4 gave 1.00x AR where
            16 gave 0.64x, README "Draft quality and iteration cost"); the output is unchanged.
        lookup: speculative decoding also drafts from each row's own earlier n-grams of this size
            (`Speculative(lookup=n)`, prompt-lookup drafts; a row that finds one skips the denoiser's
            draft; with `decoder: two_branch` the lookup is verified beside the denoiser's draft, greedy
            only); None = denoiser drafts only. A server setting, like batch_block_size; the output
            is unchanged.
        lookup_max_tokens: with lookup, greedy lookup drafts of up to this many tokens, past the
            request's block_size (`NgramLookup.max_tokens`); None = block_size - 1.
        forks / alternatives / branch_len: with `decoder: two_branch`, runner-up branches per verify,
            runner-ups a position may fork with, and the positions each branch verifies
            (`TwoBranchSpeculative(forks=..., alternatives=..., branch_len=...)`: more tokens per
            iteration for more verify positions, greedy only); None = the decoder's defaults (1, 1,
            to the block's end). Server settings; decoders without them ignore them.
        lookup_alone: with `decoder: two_branch` and lookup, a row whose lookup has at least this many
            tokens verifies it alone, with no denoiser draft (`TwoBranchSpeculative(lookup_alone=...)`;
            8 on the embedded default: 6.71 tokens / iteration at 1.63x AR); None = never.
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
        host / port: where to listen (127.0.0.1 unless told otherwise). Binding another address
            without an API key logs a warning.
        max_requests: stop after serving this many requests (bounded runs); None = serve until stopped.
        max_block_size: the largest `block_size` a request may ask for; None = the model's trained
            block size (`model.block_size`, 64 if the model has none).
        max_steps_per_block: the most `steps_per_block` / `draft_steps` a request may ask for;
            None = the larger of the block-size limit and this server's own settings.
        max_tokens_limit: the most `max_tokens` a request may ask for (the prompt plus max_tokens
            must also fit the model's context: max_position_embeddings, or a shorter sliding window).
        max_rows: rows running at once over all working batches (requests with different decoder
            settings run in different batches); None = 2 * max_batch. Further requests wait.
        max_waiting: requests that may wait for a row; one more gets 503 (with Retry-After) at once;
            None = no bound.
        api_key: clients must send `Authorization: Bearer <api_key>` on /v1/* (401 otherwise);
            None = the environment variable TWOTOWER_API_KEY, if set; else no authentication.
        cors_origins: origins allowed to call the server from a browser (CORS); None = none
            (no CORS headers at all).
        max_body_bytes: the largest request body (413 above it).
        body_timeout_s: seconds a client has to send the whole body once its headers are in (408
            after it): a client that trickles its body (slow-loris) holds a connection no longer.
        header_timeout_s: seconds a client has to send a request's headers, from connecting (or from
            the first byte of a later request on a kept-alive connection); 408 and the connection is
            closed after it (`serving.connections`), so clients that send headers slowly, or
            never, cannot hold their connections.
        max_connections: open connections at once (uvicorn's `limit_concurrency`); a request on
            one more gets 503 at once. None = no bound.
        docs: serve /docs, /redoc and /openapi.json.
        merge_adapters: make the denoiser's inference copies at load (`TwoTowerLM.merge_adapters()`:
            LoRA merged, projections fused, weights pre-packed for oneDNN on a CPU): cheaper speculative
            drafts for about one more backbone of memory; the context tower is untouched.
        int8_draft: make those copies, and a copy of the denoiser's head, in dynamic int8
            (`TwoTowerLM.merge_adapters(int8_draft=True)`; implies merge_adapters): a draft about 3x
            cheaper in float32 on a CPU, for a quarter of the memory; the output stays AR's.
        pack_context: pre-pack the context tower's products for oneDNN too
            (`TwoTowerLM.merge_adapters(pack_context=True)`; implies merge_adapters; one more context
            tower of memory): cheaper AR steps and verifies (up to 16 rows in bf16, 128 in float32), on a CPU.
        draft_vocab: the denoiser's head over these tokens only (`TwoTowerLM.merge_adapters(draft_vocab=...)`;
            implies merge_adapters): a JSON file of ids, a folder holding draft_vocab.json, or a built-in
            model that ships one ("smollm2-135m"; `tokenizers.load_draft_vocab`). A cheaper draft; the
            speculative output stays AR's, a diffusion decoder samples only these tokens.
    """

    model: str = "embedded"
    model_name: str = "twotower"
    tokenizer: Tokenizer | None = None
    decoder: str = "speculative"
    block_size: int | None = None
    threshold: float = 0.8
    draft_steps: int = 1
    batch_block_size: int | None = None
    lookup: int | None = None
    lookup_max_tokens: int | None = None
    forks: int | None = None
    alternatives: int | None = None
    branch_len: int | None = None
    lookup_alone: int | None = None
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
    max_block_size: int | None = None
    max_steps_per_block: int | None = None
    max_tokens_limit: int = 4096
    max_rows: int | None = None
    max_waiting: int | None = 256
    api_key: str | None = field(default=None, repr=False)  # never printed with the settings
    cors_origins: list[str] | None = None
    max_body_bytes: int = 4 * 1024 * 1024
    body_timeout_s: float = 30.0
    header_timeout_s: float = 10.0
    max_connections: int | None = 1024
    docs: bool = False
    merge_adapters: bool = False
    int8_draft: bool = False
    pack_context: bool = False
    draft_vocab: str | None = None

    def limits(self, model_block_size: int | None) -> "Limits":
        """The per-request ranges this server enforces, for a model trained with `model_block_size`."""
        block = self.max_block_size if self.max_block_size is not None else (model_block_size or 64)
        steps = self.max_steps_per_block
        if steps is None:
            steps = max(block, self.steps_per_block, self.draft_steps)
        return Limits(block_size=block, steps=steps, max_tokens=self.max_tokens_limit)

    def check(self, model_block_size: int | None) -> None:
        """Refuse settings that are out of range or that their own limits would refuse (ValueError
        naming the setting); `create_app` calls it before serving."""
        def need_int(name, low=1):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")

        for name in ("max_batch", "max_tokens", "max_tokens_limit", "steps_per_block", "draft_steps",
                     "max_body_bytes"):
            need_int(name)
        for name in ("max_block_size", "max_steps_per_block", "max_rows", "block_size"):
            if getattr(self, name) is not None:
                need_int(name)
        if self.batch_block_size is not None:
            need_int("batch_block_size", 2)  # position 0 of a draft is the context tower's own token
        for name in ("lookup", "lookup_max_tokens", "forks", "alternatives", "branch_len", "lookup_alone"):
            if getattr(self, name) is not None:
                need_int(name)
        for name in ("lookup_max_tokens", "lookup_alone"):
            if getattr(self, name) is not None and self.lookup is None:
                raise ValueError(f"{name}={getattr(self, name)} needs lookup (the n-gram size of prompt-lookup "
                                 "drafts), e.g. lookup: 3")
        if self.max_waiting is not None:
            need_int("max_waiting", 0)
        if self.max_connections is not None:
            need_int("max_connections", 2)  # uvicorn counts the connection asking, so 1 would refuse all
        for name in ("body_timeout_s", "header_timeout_s"):
            check_positive(name, getattr(self, name), unit="seconds")
        if not decoder_class(self.decoder).steps_implemented():  # decoder_class: a ValueError listing the names
            raise ValueError(f"decoder {self.decoder!r} cannot be served: {_not_servable(decoder_class(self.decoder))}")
        lim = self.limits(model_block_size)
        if self.block_size is not None and self.block_size > lim.block_size:
            raise ValueError(f"block_size {self.block_size} is above max_block_size {lim.block_size}")
        if self.max_tokens > lim.max_tokens:
            raise ValueError(f"max_tokens {self.max_tokens} is above max_tokens_limit {lim.max_tokens}")
        if not TEMPERATURE[0] <= self.temperature <= TEMPERATURE[1]:
            raise ValueError(f"temperature must be in [{TEMPERATURE[0]}, {TEMPERATURE[1]}], got {self.temperature}")
        if not 0 < self.threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key):
            raise ValueError("api_key must be a non-empty string (or null for none)")
        if self.cors_origins is not None and (not isinstance(self.cors_origins, list)
                                              or not all(isinstance(o, str) for o in self.cors_origins)):
            raise ValueError(f"cors_origins must be a list of origins, got {self.cors_origins!r}")


@dataclass(frozen=True)
class Limits:
    """Per-request upper bounds (`ServeSettings.limits`): block_size, steps_per_block / draft_steps,
    max_tokens."""

    block_size: int
    steps: int
    max_tokens: int


# The documented ranges of the per-request fields that do not depend on the server's settings.
TEMPERATURE = (0.0, 2.0)
SEED = (-(2 ** 63), 2 ** 63 - 1)  # a signed 64-bit integer, as OpenAI's API defines `seed`
MAX_STOP = 16  # stop strings per request
MAX_STOP_CHARS = 256  # characters per stop string

# The fields each endpoint accepts. OpenAI's fields this server does not implement are accepted only
# with the value that asks for nothing (NEUTRAL); anything else, and every other field, is a 400.
COMMON_FIELDS = frozenset({"model", "stream", "stream_options", "user", "max_tokens", "stop", "seed", "temperature",
                           "top_p", "n", "presence_penalty", "frequency_penalty", "logit_bias",
                           # extensions
                           "decoder", "threshold", "block_size", "top_k", "steps_per_block", "draft_steps"})
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "best_of", "echo", "logprobs", "suffix"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "response_format"}
NEUTRAL: dict[str, tuple[object, str]] = {  # field -> (test of the neutral value, what is accepted)
    "n": (lambda v: v == 1 and not isinstance(v, bool), "only n = 1"),
    "best_of": (lambda v: v == 1 and not isinstance(v, bool), "only best_of = 1 (one completion per request)"),
    "echo": (lambda v: v is False, "echo is not supported (only false)"),
    "logprobs": (lambda v: v is False, "logprobs are not supported (only null or false)"),
    "top_logprobs": (lambda v: v == 0 and not isinstance(v, bool), "top_logprobs are not supported (only null or 0)"),
    "suffix": (lambda v: v == "", "suffix (insertion) is not supported (only null or \"\")"),
    "presence_penalty": (lambda v: v == 0 and not isinstance(v, bool), "only presence_penalty = 0 (no penalties)"),
    "frequency_penalty": (lambda v: v == 0 and not isinstance(v, bool), "only frequency_penalty = 0 (no penalties)"),
    "logit_bias": (lambda v: v == {}, "logit_bias is not supported (only null or {})"),
    "response_format": (lambda v: v == {"type": "text"}, "only response_format {\"type\": \"text\"}"),
}


def build_decoder(name: str, **settings) -> Decoder:
    """The decoder `name` (a name of the one registry, `decoding.register_decoder`, or a class_path)
    built with the request's resolved settings; each decoder takes the settings its constructor names."""
    try:
        decoder_class(name)
    except ValueError as e:
        raise RequestError("decoder", str(e)) from None
    return registry_build_decoder(name, strict=False, **settings)


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


def _requested_decoder(name) -> type[Decoder]:
    """The class a request's `decoder` field names: a registered name (not a class_path: a client
    must not make the server import modules)."""
    known = registered_decoders()
    if not isinstance(name, str) or name not in known:
        raise RequestError("decoder", f"unknown decoder {name!r:.60}; choose one of {sorted(known)}")
    return known[name]


def _not_servable(cls: type[Decoder]) -> str:
    """Why a decoder class cannot be stepped by the scheduler, and what to implement."""
    return (f"{cls.__name__} is not a step-wise decoder; it must implement prefill(state) and advance(state, "
            "drafted) (see twotower.decoding.base), not only _decode")


def _int(body, name, default, low, high=None):
    """body[name] as an int in [low, high] (high None: no upper bound), or `default` when absent / null."""
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or v < low or (high is not None and v > high):
        allowed = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise RequestError(name, f"{name} must be an integer {allowed}, got {v!r:.60}")
    return v


def _number(body, name, default, low, high, low_open=False):
    v = body.get(name)
    if v is None:
        return default
    # `not (low <= v)` rather than `v < low`: Python's json accepts NaN, and NaN fails every comparison.
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (low < v if low_open else low <= v) or v > high:
        lo = "(" if low_open else "["
        raise RequestError(name, f"{name} must be a number in {lo}{low}, {high}], got {v!r:.60}")
    return float(v)


def _check_body(body, settings: ServeSettings, allowed: frozenset, other: frozenset, other_path: str) -> dict:
    """The body's shape, its fields (every one known to this endpoint; OpenAI's unimplemented ones only
    with their neutral value), the model name, `user` and `stream_options`."""
    if not isinstance(body, dict):
        raise RequestError("body", f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(k for k in body if k not in allowed)
    if unknown:
        name = unknown[0]
        hint = f" (it belongs to {other_path})" if name in other else ""
        more = f" (also unknown: {', '.join(repr(k[:40]) for k in unknown[1:6])})" if len(unknown) > 1 else ""
        raise RequestError(name[:80], f"unknown field {name[:80]!r}{hint}{more}; this endpoint accepts "
                                      f"{', '.join(sorted(allowed))}")
    for name, (neutral, what) in NEUTRAL.items():
        if name in allowed and body.get(name) is not None and not neutral(body[name]):
            raise RequestError(name, f"{name}: {what}; got {body[name]!r:.60}")
    model = body.get("model")
    if model is not None and model != settings.model_name:
        raise RequestError("model", f"unknown model {model!r:.80}; this server serves {settings.model_name!r}")
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise RequestError("user", f"user must be a string, got {body['user']!r:.60}")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict) or not set(options) <= {"include_usage", "include_obfuscation"} \
                or not all(isinstance(v, bool) for v in options.values()):
            raise RequestError("stream_options", "stream_options must be an object with the booleans include_usage "
                                                 f"and include_obfuscation, got {options!r:.80}")
    return body


def parse_completion(body, settings: ServeSettings, tokenizer: Tokenizer, *, context_limit: int | None,
                     model_block_size: int, limit_name: str = "max_position_embeddings") -> CompletionRequest:
    """Validate a decoded `/v1/completions` JSON body against the server's settings; raise RequestError
    naming the field. context_limit: the most positions a request may use (prompt + max_tokens), named
    `limit_name` in messages (`decoding.length_limit`: max_position_embeddings or a sliding window)."""
    body = _check_body(body, settings, COMPLETION_FIELDS, CHAT_FIELDS, "/v1/chat/completions")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise RequestError("prompt", f"prompt must be a non-empty string, got {type(prompt).__name__} {prompt!r:.40}")
    lim = settings.limits(model_block_size)
    max_tokens = _int(body, "max_tokens", settings.max_tokens, 1, lim.max_tokens)
    return _request(body, prompt, "prompt", "max_tokens", max_tokens, settings, lim, tokenizer, context_limit,
                    limit_name)


def parse_chat(body, settings: ServeSettings, tokenizer: Tokenizer, *, context_limit: int | None,
               model_block_size: int, limit_name: str = "max_position_embeddings") -> CompletionRequest:
    """Validate a decoded `/v1/chat/completions` JSON body: `messages` go through the model's chat
    template (`prompting.encode_prompt`); the other fields are those of a completion request
    (`max_completion_tokens`, OpenAI's newer name, wins over `max_tokens`)."""
    body = _check_body(body, settings, CHAT_FIELDS, COMPLETION_FIELDS, "/v1/completions")
    try:
        messages = check_messages(body.get("messages"))
    except ValueError as e:
        raise RequestError("messages", str(e)) from None
    lim = settings.limits(model_block_size)
    max_tokens = _int(body, "max_tokens", settings.max_tokens, 1, lim.max_tokens)
    param = "max_tokens"
    if body.get("max_completion_tokens") is not None:
        param, max_tokens = "max_completion_tokens", _int(body, "max_completion_tokens", None, 1, lim.max_tokens)
    return _request(body, messages, "messages", param, max_tokens, settings, lim, tokenizer, context_limit,
                    limit_name)


def _request(body: dict, prompt: Prompt, param: str, tokens_param: str, max_tokens: int, settings: ServeSettings,
             lim: Limits, tokenizer: Tokenizer, context_limit: int | None,
             limit_name: str = "max_position_embeddings") -> CompletionRequest:
    """The fields every request shares (decoder and its settings, stop, seed, stream), and the prompt
    encoded by `prompting.encode_prompt` (errors name `param`, the prompt's field; `tokens_param`
    names the field max_tokens came from)."""
    name = body.get("decoder", settings.decoder)
    # The server's own default may be a class_path (trusted configuration); a request names a registered one.
    cls = decoder_class(name) if name == settings.decoder else _requested_decoder(name)
    if not cls.steps_implemented():
        raise RequestError("decoder", f"decoder {name!r} cannot be served: {_not_servable(cls)}")
    minimum_block = cls.min_block_size
    default_block = min(settings.block_size or lim.block_size, lim.block_size)
    # Bounded by the vocabulary: a larger k filters nothing, and an unbounded int would reach topk.
    top_k = _int(body, "top_k", 0, 0, max(1, getattr(tokenizer, "vocab_size", 1)))
    resolved = dict(
        temperature=_number(body, "temperature", settings.temperature, *TEMPERATURE),
        top_p=_number(body, "top_p", None, 0.0, 1.0, low_open=True),
        top_k=top_k or None,  # 0: no top-k filter
        threshold=_number(body, "threshold", settings.threshold, 0.0, 1.0, low_open=True),
        block_size=_int(body, "block_size", default_block, minimum_block, lim.block_size),
        draft_steps=_int(body, "draft_steps", settings.draft_steps, 1, lim.steps),
        batch_block_size=settings.batch_block_size,  # decoders without it ignore it (build_decoder)
        lookup=None if settings.lookup is None else NgramLookup(settings.lookup, settings.lookup_max_tokens),
        forks=settings.forks,  # None: left out by build_decoder, so the class default applies
        alternatives=settings.alternatives,
        branch_len=settings.branch_len,
        lookup_alone=settings.lookup_alone,
        steps_per_block=_int(body, "steps_per_block", settings.steps_per_block, 1, lim.steps),
    )
    # top_p = 1 filters nothing: the same request as one without top_p.
    if resolved["top_p"] == 1.0:
        resolved["top_p"] = None
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise RequestError("stop", f"stop must be a string or a list of strings, got {stop!r:.80}")
    if len(stop) > MAX_STOP or any(len(s) > MAX_STOP_CHARS for s in stop):
        raise RequestError("stop", f"stop takes at most {MAX_STOP} strings of at most {MAX_STOP_CHARS} characters, "
                                   f"got {len(stop)} strings, the longest {max(map(len, stop))} characters")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not SEED[0] <= seed <= SEED[1]):
        raise RequestError("seed", f"seed must be an integer in [{SEED[0]}, {SEED[1]}] (64-bit), got {seed!r:.60}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError("stream", f"stream must be true or false, got {stream!r:.60}")
    try:
        ids = encode_prompt(tokenizer, prompt)
    except Exception as e:  # noqa: BLE001 - e.g. chat messages without a chat template, text UTF-8 cannot encode
        raise RequestError(param, f"{param} cannot be encoded: {e}") from None
    if context_limit is not None:
        # >=: a prompt that fills the context leaves no position to generate into.
        if len(ids) >= context_limit:
            raise RequestError(param, f"the prompt is {len(ids)} tokens; the model's context limit "
                                      f"({limit_name}) is {context_limit}: shorten the prompt")
        if len(ids) + max_tokens > context_limit:
            room = context_limit - len(ids)
            raise RequestError(tokens_param, f"{tokens_param} must be an integer in [1, {min(room, lim.max_tokens)}] "
                                             f"for this prompt: prompt ({len(ids)} tokens) + {tokens_param} "
                                             f"({max_tokens}) exceeds the context limit ({limit_name}) "
                                             f"{context_limit}; lower {tokens_param} to at most {room}")
    try:
        decoder = build_decoder(name, **resolved)
    except ValueError as e:  # a setting the decoder itself refuses
        raise RequestError("decoder", f"decoder {name!r} refused its settings: {e}") from e
    return CompletionRequest(prompt=prompt, prompt_ids=ids, max_tokens=max_tokens, decoder=decoder, decoder_name=name,
                             stream=stream, stop=[s for s in stop if s], seed=seed)
