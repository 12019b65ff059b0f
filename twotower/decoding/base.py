"""The `Decoder` interface: how a prompt batch becomes generated tokens.

A decoder holds its hyperparameters (block size, sampler, temperature, ...) from its constructor,
so a recipe can pick one by `class_path`, and is called with the per-call things:

    out = decoder.generate(model, input_ids, attention_mask, max_new_tokens=64,
                           eos_token_id=2, generator=g, step_callback=cb)   # -> GenerationOutput

`model` is a `TwoTowerLM` (any `TowerPair`, which hands out its `Towers`), a `Towers` (the two
towers and the token ids they need), or, for decoders that use the context tower alone, a bare
context tower (`Towers.of`). `Decoder.generate` checks every
argument once (prompt shape, left padding, lengths against the model's limit, EOS / pad ids,
devices), runs the decoder under `torch.inference_mode`, and checks what it returned, so a decoder
written in research code gets the same guarantees as the built-in ones.

The protocol: each decoder is written once, as a state machine over a batch of rows.

    state = decoder.start(model, input_ids, attention_mask, max_new_tokens=64)  # check + prefill
    while not state.done:                        # True once no row is left running
        decoder.step(state)                      # one iteration for every row
    out = state.output()                         # the GenerationOutput generate returns

`generate` is exactly this loop; the server's scheduler runs the same steps one at a time over a
working batch that requests join (`state.join`, between steps) and leave (`state.keep`). One
iteration is a block (`MaskDiffusion`), a draft-and-verify round (`Speculative`) or a token
(`Autoregressive`, `MockAR`). A subclass implements

* `prefill(state)`: run the prompts of `state.call` (a checked `DecodeCall`: input_ids, valid,
  the towers, devices, token ids, block size); set `state.cache` and the per-row tensors the
  first step starts from in `state.carry` (a dict; joining and leaving rows carry them along);
* `advance(state, drafted)`: one iteration. Choose tokens with `state.choose(logits)` (each row's
  own temperature / top-k / top-p / generator), count each network forward with
  `state.count_forward()`, call `state.step_callback` (when set) after each forward, hand the new
  tokens to `state.commit(block, count)` (EOS, stop strings, caps, counts), and let finished
  rows leave (`x, = state.drop_finished(x)` cuts the step's own per-row tensors too) or keep
  them until `state.done`;
* optionally `draft(state)`: the denoiser's half of an iteration (its result is `advance`'s
  `drafted`; default None), so the server can overlap one batch's draft with another's advance
  when the towers live on two devices;
* optionally `batch_key(towers)`: which decoders' rows may share one batch (default: same class
  and attributes).

Such a decoder is servable with no extra code. A decoder that implements only the older
`_decode(call) -> GenerationOutput` (a whole loop) still runs in `generate`; the server (and
`start`) refuse it with a TypeError naming `prefill` / `advance`.

The base class enforces the result: the shapes, 0 <= num_generated <= max_new_tokens,
num_generated <= new_tokens.shape[1], and at least one token per row (an EOS is counted, and a
stop criterion fires on committed tokens, so a row that ended either way has one).

The step callback is called after every network forward as
`step_callback(block_index, step_index, tokens_before, logits, tokens_after)`:
(R, n) tokens of the working rows before and after the step (`tokens_before` is None for
decoders that write one token per forward), and their (R, n, V) logits. Treat them as read-only.
Calling it is the decoder's job (only it has the tensors); the base class checks that it did: a
step that counted a forward without calling a given callback raises, as does an older `_decode`
loop that ran forwards without ever calling it.
"""

from __future__ import annotations

import abc
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..towers.base import ContextTowerBase
from .checks import check_prompt, default_pad_id, denoiser_placement, describe_rows, eos_ids, length_limit
from .logits import LogitsProcessor, TokenChooser
from .stopping import StopCriterion
from .state import DecodeState, Rows, TrackedRows
from .tracker import GenerationOutput, RowTracker
from ..tokenizers import DEFAULT_MASK_TOKEN_ID
from ..validation import check_int, check_token, device_of

__all__ = ["Decoder", "DecodeCall", "DecodeState", "Rows", "TrackedRows", "Towers", "StepCallback", "GenerationOutput",
           "RowTracker", "default_pad_id", "length_limit"]

StepCallback = Callable[[int, int, "Tensor | None", Tensor, Tensor], None]


# ---- what a decoder runs on ---------------------------------------------------------------------


@dataclass
class Towers:
    """The two towers and the token ids a decoder needs, for callers without a `TwoTowerLM`.

    Args:
        context: the context tower (prefill / extend / accept).
        denoiser: the denoiser tower, or None for decoders that use the context alone.
        mask_token_id: the [MASK] id the denoiser was trained with.
        pad_token_id: written after a row's end; None = config.pad_token_id, else the EOS id, else 0.
        shifted: the denoiser was trained AR-aligned (output i predicts position i + 1).
        block_size: the default block size of decoders that leave theirs unset.
        denoiser_device: None = the denoiser's own device, with the context cache mirrored to it
            only when it differs from the context's; given explicitly, the mirror is always used.
    """

    context: torch.nn.Module
    denoiser: torch.nn.Module | None = None
    mask_token_id: int = DEFAULT_MASK_TOKEN_ID
    pad_token_id: int | None = None
    shifted: bool = False
    block_size: int = 16
    denoiser_device: object = None

    @classmethod
    def of(cls, model: "Towers | TowerPair | ContextTowerBase") -> "Towers":
        """The towers a decoder runs on: a `Towers` as it is, a `TowerPair` (a `TwoTowerLM`) through its
        `towers()`, or a context tower alone (for the decoders that need no denoiser)."""
        if isinstance(model, Towers):
            return model
        if isinstance(model, TowerPair):
            return model.towers()
        if isinstance(model, ContextTowerBase):
            return cls(model)
        raise ValueError(f"a decoder runs on a TwoTowerLM (any twotower.decoding.TowerPair), a "
                         f"twotower.decoding.Towers or a twotower.towers.base.ContextTowerBase, got "
                         f"{type(model).__name__}; wrap your towers as Towers(context, denoiser, ...)")


class TowerPair(abc.ABC):
    """A model holding both towers, which a decoder runs on through `towers()` (`TwoTowerLM` is one).

    The pair's decoding facts (mask id, `shifted`, default block size) live in one place, the
    model; `towers()` hands them over with the towers themselves, so no caller assembles them.
    """

    @abc.abstractmethod
    def towers(self) -> Towers:
        """This model's towers and decoding facts, as the decoders take them."""


@dataclass
class DecodeCall:
    """One checked decoding call, as a decoder's `_decode` receives it.

    input_ids (B, T) long on the context device; valid (B, T) bool (left padding) or None when no
    position is padding; eos (k,) long on the context device or None; den_device / use_mirror:
    where the denoiser runs and whether it reads a mirror of the context cache.
    """

    context: torch.nn.Module
    denoiser: torch.nn.Module | None
    input_ids: Tensor
    valid: Tensor | None
    max_new_tokens: int
    eos: Tensor | None
    pad_token_id: int
    mask_token_id: int
    shifted: bool
    block_size: int
    generator: torch.Generator | None
    step_callback: StepCallback | None
    ctx_device: torch.device
    den_device: torch.device | None
    use_mirror: bool
    stop: StopCriterion | None = None
    start: float = field(default_factory=time.perf_counter)

    def tracker(self, spare: int, device=None) -> RowTracker:
        """A fresh RowTracker for this call's batch (on `device`, default the context's)."""
        eos = self.eos if device is None else (None if self.eos is None else self.eos.to(device))
        return RowTracker(self.input_ids.shape[0], self.max_new_tokens, spare=spare, pad_token_id=self.pad_token_id,
                          eos=eos, device=device or self.ctx_device, start=self.start, stop=self.stop)


_DRAFT = object()  # `Decoder.step`'s default: draft first


class Decoder(abc.ABC):
    """Base class of every decoding strategy: a step-wise state machine over a batch of rows.

    A subclass implements `prefill(state)` and `advance(state, drafted)`, and optionally
    `draft(state)` (see the module docstring); a subclass that implements only the older
    `_decode(call)` still runs in `generate`, and the server refuses it naming what to implement.

    Args (shared by the built-in decoders):
        temperature: 0 = greedy; > 0 samples (seeded by the call's generator).
        top_k / top_p: filters applied wherever the decoder samples (`logits.TopK` / `TopP`).
        logits_processors: further `LogitsProcessor`s, applied after top-k / top-p.

    Class attributes a subclass sets:
        uses_denoiser: False for decoders that run the context tower alone.
        uses_mask_token: the [MASK] id is reserved (refused in prompts).
        counts_blocks: `GenerationOutput.blocks` reports the steps taken (False: 0, one-token decoders).
        min_block_size: the smallest block size the decoder runs with (requests asking less are refused).
    """

    uses_denoiser: bool = True
    uses_mask_token: bool = False
    counts_blocks: bool = True
    min_block_size: int = 1

    def __init__(self, *, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 logits_processors: Sequence[LogitsProcessor] | None = None):
        self.chooser = TokenChooser(temperature, top_k, top_p, logits_processors or ())

    @property
    def temperature(self) -> float:
        return self.chooser.temperature

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"

    # ---- the public entry points ----------------------------------------------------------------
    def generate(self, model, input_ids: Tensor, attention_mask: Tensor | None = None, *, max_new_tokens: int,
                 eos_token_id: int | Sequence[int] | None = None, generator: torch.Generator | None = None,
                 step_callback: StepCallback | None = None, stop: StopCriterion | None = None) -> GenerationOutput:
        """Generate up to `max_new_tokens` per row after a left-padded prompt batch.

        model: a TwoTowerLM, a `Towers`, or a context tower (for context-only decoders).
        input_ids / attention_mask: (B, T); 1 = real token, padding on the left. Moved to the
            context tower's device; outputs come back there.
        eos_token_id: an id (or ids) that ends a row; None = every row makes max_new_tokens.
        generator: seeds sampling (temperature > 0) and any randomness of the decoder's sampler.
        step_callback: see the module docstring.
        stop: ends a row early once it fires (e.g. `decoding.StopStrings`); checked where the loop
            commits tokens, for the rows still running. The tokens are kept whole.
        """
        call = self.prepare(model, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                            eos_token_id=eos_token_id, generator=generator, step_callback=step_callback, stop=stop)
        if step_callback is not None and not self.steps_implemented():
            call.step_callback = _CountedCallback(step_callback)  # an older `_decode` loop: checked after it
        with torch.inference_mode():
            out = self._decode(call)
        # The output checks read the device: once, after the loop, not in every iteration.
        self._check_output(out, call)
        self._check_loop_callback(out, call)
        return out

    __call__ = generate

    def prepare(self, model, input_ids: Tensor, attention_mask: Tensor | None = None, *, max_new_tokens: int,
                eos_token_id: int | Sequence[int] | None = None, generator: torch.Generator | None = None,
                step_callback: StepCallback | None = None, stop: StopCriterion | None = None) -> DecodeCall:
        """Check a call's arguments (as `generate` does) and return them as a `DecodeCall`."""
        return self._prepare(Towers.of(model), input_ids, attention_mask, max_new_tokens, eos_token_id, generator,
                             step_callback, stop)

    def start(self, model, input_ids: Tensor, attention_mask: Tensor | None = None, **call) -> DecodeState:
        """Check the arguments (those of `generate`) and prefill the rows: the state before the first step.

        Drive it with `while not state.done: decoder.step(state)`, then `state.output()`."""
        return self.begin(self.prepare(model, input_ids, attention_mask, **call))

    def begin(self, call: DecodeCall, rows: Rows | None = None) -> DecodeState:
        """The prefilled state of a checked call; `rows` (default: a `TrackedRows` for the call) keeps
        the per-row bookkeeping (the server passes its own, one request per row)."""
        self.require_steps()
        if rows is None:
            # spare: a block of columns past max_new_tokens takes the tokens a row cannot keep, so a
            # commit is one scatter with no per-row trimming.
            rows = TrackedRows(call.tracker(spare=call.block_size), self.chooser, call.generator)
        state = DecodeState(self, call, rows)
        with torch.inference_mode():
            self.prefill(state)
        return state

    def step(self, state: DecodeState, drafted=_DRAFT) -> None:
        """One iteration for every row of `state`. `drafted`: the result of `self.draft(state)`, when
        the caller drafted already (the server overlaps one batch's draft with another's advance)."""
        if state.done:
            raise RuntimeError(f"{type(self).__name__}.step on a finished state (state.done); start a new one")
        with torch.inference_mode():
            if drafted is _DRAFT:
                drafted = self.draft(state)
            self.advance(state, drafted)
        state.iterations += 1
        self._check_callback(state)

    # ---- what a decoder implements ----------------------------------------------------------------
    def prefill(self, state: DecodeState) -> None:
        """Run the prompts of `state.call` (input_ids, valid): set `state.cache` and the `state.carry`
        tensors the first step starts from."""
        raise NotImplementedError(f"{type(self).__name__} implements no prefill(state); see twotower.decoding.base")

    def draft(self, state: DecodeState):
        """The denoiser half of an iteration, returning what `advance` needs (default: nothing). It must
        not write what the context tower's half of another batch reads (they may run at once)."""
        return None

    def advance(self, state: DecodeState, drafted) -> None:
        """The rest of one iteration: commit every row's new tokens (`state.commit`), let finished rows
        leave (`state.drop_finished`, or keep them until `state.done`), and extend the cache."""
        raise NotImplementedError(f"{type(self).__name__} implements no advance(state, drafted); "
                                  "see twotower.decoding.base")

    def _decode(self, call: DecodeCall) -> GenerationOutput:
        """The whole run of a checked call: the state machine, driven to completion. Older decoders
        override this with a loop of their own (they then run in `generate` only)."""
        state = self.begin(call)
        while not state.done:
            self.step(state)
        return state.output()

    @classmethod
    def steps_implemented(cls) -> bool:
        """Whether the decoder is a state machine (`prefill` and `advance`), i.e. servable step by step."""
        return cls.prefill is not Decoder.prefill and cls.advance is not Decoder.advance

    def require_steps(self) -> None:
        """Refuse, naming what to implement, a decoder that is not a state machine."""
        if self.steps_implemented():
            return
        old = type(self)._decode is not Decoder._decode
        raise TypeError(f"{type(self).__name__} {'implements only _decode' if old else 'implements no decoding'}; "
                        "to be driven step by step (the server, Decoder.start / step) it must implement "
                        "prefill(state) and advance(state, drafted) (and optionally draft(state)): see the "
                        "twotower.decoding.base docstring")

    def batch_key(self, towers: Towers) -> tuple:
        """Rows of decoders with equal keys may share one working batch (driven by the first one's
        settings). Default: the class and every attribute; the built-in decoders leave out the token
        chooser (temperature, top-k / top-p), which `state.choose` applies per row."""
        return (type(self), repr(sorted(vars(self).items())))

    def block_size_for(self, towers: Towers) -> int:
        """The block size this decoder uses with these towers (decoders with a block size override)."""
        return towers.block_size

    def check_call(self, call: DecodeCall) -> None:
        """Checks that depend on the towers (override to add; raise ValueError naming the value)."""

    def _check_loop_callback(self, out: GenerationOutput, call: DecodeCall) -> None:
        """An older `_decode` loop given a step callback called it at least once if it ran a forward."""
        counted = call.step_callback
        if isinstance(counted, _CountedCallback) and counted.calls == 0 and int(out.nfe.sum()) > 0:
            raise RuntimeError(f"{type(self).__name__} was given a step_callback and ran {int(out.nfe.max())} "
                               "network forward(s) without calling it; call call.step_callback(block_index, step, "
                               "before, logits, after) after every forward (or implement prefill / advance and call "
                               "state.step_callback)")

    def _check_callback(self, state: DecodeState) -> None:
        """A decoder given a step callback calls it in every step that ran a network forward."""
        seen, state.callback_seen = state.callback_seen, (state.forwards, state.callbacks)
        if state.step_callback is not None and state.forwards > seen[0] and state.callbacks == seen[1]:
            raise RuntimeError(f"{type(self).__name__} was given a step_callback but step {state.iterations - 1} "
                               "ran a network forward without calling it; call state.step_callback(block_index, "
                               "step, before, logits, after) after every forward it counts")

    # ---- checks ------------------------------------------------------------------------------
    def _prepare(self, towers: Towers, input_ids, attention_mask, max_new_tokens, eos_token_id, generator,
                 step_callback, stop=None) -> DecodeCall:
        context, denoiser = towers.context, towers.denoiser
        cfg = context.config
        if self.uses_denoiser and denoiser is None:
            raise ValueError(f"{type(self).__name__} needs the denoiser tower; pass a TwoTowerLM or "
                             "Towers(context, denoiser)")
        check_int("max_new_tokens", max_new_tokens)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if step_callback is not None and not callable(step_callback):
            raise ValueError(f"step_callback must be callable, got {step_callback!r}")
        if stop is not None and not callable(stop):
            raise ValueError(f"stop must be a stop criterion (e.g. twotower.decoding.StopStrings), got {stop!r}")
        if self.uses_denoiser or self.uses_mask_token:
            check_token("mask_token_id", towers.mask_token_id, cfg.vocab_size)
        pad = towers.pad_token_id
        if pad is None:
            first_eos = eos_token_id if isinstance(eos_token_id, int) or eos_token_id is None else \
                (list(eos_token_id) or [None])[0]
            # No pad id in the config: pad with the EOS, so a finished row still reads as ended to
            # anyone who ignores num_generated.
            pad = default_pad_id(cfg, first_eos)
        check_token("pad_token_id", pad, cfg.vocab_size)
        ctx_device = device_of(context)
        input_ids, valid = check_prompt(length_limit(context), input_ids, attention_mask, max_new_tokens,
                                        ctx_device, towers.mask_token_id if self.uses_mask_token else None)
        den_device, use_mirror = None, False
        if self.uses_denoiser:
            den_device, use_mirror = denoiser_placement(denoiser, ctx_device, towers.denoiser_device)
        call = DecodeCall(context=context, denoiser=denoiser if self.uses_denoiser else None, input_ids=input_ids,
                          valid=valid, max_new_tokens=max_new_tokens,
                          eos=eos_ids(eos_token_id, cfg.vocab_size, ctx_device), pad_token_id=pad,
                          mask_token_id=towers.mask_token_id, shifted=towers.shifted,
                          block_size=check_int("block_size", self.block_size_for(towers)), generator=generator,
                          step_callback=step_callback, ctx_device=ctx_device, den_device=den_device,
                          use_mirror=use_mirror, stop=stop or None)
        self.check_call(call)
        return call

    def _check_output(self, out, call: DecodeCall) -> None:
        """The contract every decoder's result honours (one host read, after the loop)."""
        name = type(self).__name__
        if not isinstance(out, GenerationOutput):
            raise RuntimeError(f"{name}._decode must return a GenerationOutput, got {type(out).__name__}")
        B, T = call.input_ids.shape
        N = out.new_tokens.shape[1] if out.new_tokens.dim() == 2 else -1
        if out.new_tokens.shape[0] != B or not 0 <= N <= call.max_new_tokens:
            raise RuntimeError(f"{name} returned new_tokens of shape {tuple(out.new_tokens.shape)}; expected "
                               f"({B}, at most {call.max_new_tokens})")
        if tuple(out.sequences.shape) != (B, T + N) or tuple(out.num_generated.shape) != (B,):
            raise RuntimeError(f"{name} returned sequences {tuple(out.sequences.shape)} / num_generated "
                               f"{tuple(out.num_generated.shape)}; expected {(B, T + N)} / {(B,)}")
        # One reduction on the device, then host reads of two scalars.
        lo, hi = torch.aminmax(out.num_generated)
        if int(lo) < 0 or int(hi) > call.max_new_tokens:
            raise RuntimeError(f"{name} generated between {int(lo)} and {int(hi)} tokens per row; each row must "
                               f"have 0 .. max_new_tokens = {call.max_new_tokens}")
        if int(hi) > N:
            raise RuntimeError(f"{name} reports num_generated up to {int(hi)} but returned only {N} new token "
                               f"columns; num_generated[r] must be <= new_tokens.shape[1]")
        if int(lo) == 0:
            # An EOS is itself counted and a stop criterion fires on committed tokens, so a row that
            # ended either way has at least one token: a row with none was never given any.
            empty = out.num_generated == 0
            raise RuntimeError(f"{name} generated no token for row(s) {describe_rows(empty)} (max_new_tokens = "
                               f"{call.max_new_tokens}); every row makes at least one token before it ends")


class _CountedCallback:
    """A step callback that counts its calls (to check an older `_decode` loop honoured it)."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.fn(*args, **kwargs)
