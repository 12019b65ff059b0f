"""`Autoregressive`: the context tower alone, one token per cached forward (the baseline).

Greedy decoding takes the argmax over the whole vocabulary, so it matches transformers' greedy
`generate` on the same weights. NFE counts context forwards: the prefill (first token) plus one
`extend` per later token. Rows that finished keep stepping (on pad) until the whole batch has:
one-token forwards cost about the same at any batch size, so shrinking the batch would not pay for
the cache copies. Host syncs: one per token when an EOS id or a stop criterion is given ("has every row finished"),
none otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import Decoder, Towers
from .logits import LogitsProcessor
from .state import DecodeState

__all__ = ["Autoregressive"]


class Autoregressive(Decoder):
    """AR decoding with the context tower. Args: see `Decoder` (temperature, top_k, top_p, processors)."""

    uses_denoiser = False
    counts_blocks = False

    def __init__(self, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 logits_processors: Sequence[LogitsProcessor] | None = None):
        super().__init__(temperature=temperature, top_k=top_k, top_p=top_p, logits_processors=logits_processors)

    def batch_key(self, towers: Towers) -> tuple:
        return (type(self),)  # the chooser is applied per row (state.choose)

    def prefill(self, state: DecodeState) -> None:
        call = state.call
        T = call.input_ids.shape[1]
        logits, state.cache = call.context.prefill(call.input_ids, call.valid, logits="last",
                                                   capacity=T + call.max_new_tokens)
        state.carry["logits"] = logits[:, -1]  # (R, V): each row's next-token logits

    def advance(self, state: DecodeState, drafted) -> None:
        # The forward that made these logits (the prefill, or the previous step's extend) counts for
        # the rows still running; finished rows stay in the batch (see the module docstring).
        state.count_forward(None, ~state.finished if state.rows.can_finish_early else None)
        logits = state.carry["logits"]
        token = state.choose(logits)[:, None]  # (R, 1)
        if state.step_callback is not None:
            state.step_callback(state.iterations, 0, None, logits[:, None], token)
        state.commit(token)
        if not state.done:  # the last token needs no forward
            state.carry["logits"] = state.call.context.extend(state.cache, token, logits="last")[:, -1]
