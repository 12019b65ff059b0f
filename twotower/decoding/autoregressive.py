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

from .base import DecodeCall, Decoder
from .logits import LogitsProcessor
from .tracker import GenerationOutput

__all__ = ["Autoregressive"]


class Autoregressive(Decoder):
    """AR decoding with the context tower. Args: see `Decoder` (temperature, top_k, top_p, processors)."""

    uses_denoiser = False

    def __init__(self, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 logits_processors: Sequence[LogitsProcessor] | None = None):
        super().__init__(temperature=temperature, top_k=top_k, top_p=top_p, logits_processors=logits_processors)

    def _decode(self, call: DecodeCall) -> GenerationOutput:
        context = call.context
        B, T = call.input_ids.shape
        logits, cache = context.prefill(call.input_ids, call.valid, logits="last", capacity=T + call.max_new_tokens)
        tracker = call.tracker(spare=1)
        for i in range(call.max_new_tokens):
            tracker.count_forward(None, ~tracker.finished if tracker.can_finish_early else None)
            token = self.chooser(logits[:, -1], call.generator)[:, None]  # (B, 1)
            if call.step_callback is not None:
                call.step_callback(i, 0, None, logits, token)
            done = tracker.commit(token)
            if i == call.max_new_tokens - 1 or (done is not None and bool(done.all())):
                break
            logits = context.extend(cache, token, logits="last")
        return tracker.output(call.input_ids, blocks=0)
