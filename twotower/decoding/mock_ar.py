"""`MockAR`: the released model's mock-AR mode, exactly (docs/design.md, section 2).

Not a masked block committed left to right (that is the `samplers.MockAR` commit policy, used
with `MaskDiffusion`). Each step feeds the denoiser ONE clean token, the last committed one, at
its position p, over a cache that holds everything before p: the context tower's attention K,V
of positions < p (and, in a hybrid family such as NemotronH, its Mamba conv / SSM states after
position p - 1). The denoiser runs with no time conditioning (t = None: plain norm -> mixer ->
residual, no modulation, no gate), and its logits at that one position choose the next token. The
context tower then appends the fed token, so the cache always trails the newest token by one:

    cache = context.prefill(prompt[:, :-1]);  last = prompt[:, -1]
    repeat:  logits = denoiser.forward_block(last, cache, t=None)     # (R, 1, V)
             nxt    = choose(logits)
             context.extend(cache, last);  last = nxt

With an identity-initialised denoiser (a copy of the AR layers) the greedy output equals
`Autoregressive`'s. Per token: one denoiser forward (NFE) and one one-token context extend.
Finished rows leave the working batch at the next step.
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import Decoder, Towers
from .logits import LogitsProcessor
from .state import DecodeState

__all__ = ["MockAR"]


class MockAR(Decoder):
    """The two towers stepping autoregressively, one token per denoiser forward (released mock-AR).

    Args: see `Decoder` (temperature, top_k, top_p, logits_processors).
    """

    counts_blocks = False

    def __init__(self, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 logits_processors: Sequence[LogitsProcessor] | None = None):
        super().__init__(temperature=temperature, top_k=top_k, top_p=top_p, logits_processors=logits_processors)

    def batch_key(self, towers: Towers) -> tuple:
        return (type(self),)  # the chooser is applied per row (state.choose)

    def prefill(self, state: DecodeState) -> None:
        call = state.call
        B, T = call.input_ids.shape
        capacity = T + call.max_new_tokens
        if T > 1:  # everything before the last prompt token
            head_valid = None if call.valid is None else call.valid[:, :-1]
            _, state.cache = call.context.prefill(call.input_ids[:, :-1], head_valid, logits="none", capacity=capacity)
        else:
            state.cache = call.context.empty_cache(B, capacity=capacity, device=call.ctx_device)
        state.carry["last"] = call.input_ids[:, -1:]  # (R, 1): the newest token, not yet in the cache

    def advance(self, state: DecodeState, drafted) -> None:
        call, last = state.call, state.carry["last"]
        logits = call.denoiser.forward_block(last.to(call.den_device), state.den_cache(), None)  # (R, 1, V)
        state.count_forward()
        nxt = state.choose(logits[:, -1]).to(call.ctx_device)[:, None]  # (R, 1)
        if state.step_callback is not None:
            state.step_callback(state.iterations, 0, None, logits, nxt)
        state.commit(nxt)
        if state.done:
            return  # the context never needs the last token
        call.context.extend(state.cache, last, logits="none")
        state.carry["last"] = nxt
        state.drop_finished()
