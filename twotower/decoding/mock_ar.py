"""`MockAR`: the released model's mock-AR mode, exactly (docs/design.md, section 2).

Not a masked block committed left to right (that is the `samplers.MockAR` commit policy, used
with `MaskDiffusion`). Each step feeds the denoiser ONE clean token, the last committed one, at
its position p, over a cache that holds everything before p: the context tower's attention K,V
of positions < p and its Mamba conv / SSM states after position p - 1. The denoiser runs with no
time conditioning (t = None: plain norm -> mixer -> residual, no modulation, no gate), and its
logits at that one position choose the next token. The context tower then appends the fed token,
so the cache always trails the newest token by one:

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

import torch

from .base import DecodeCall, Decoder
from .logits import LogitsProcessor
from .tracker import GenerationOutput

__all__ = ["MockAR"]


class MockAR(Decoder):
    """The two towers stepping autoregressively, one token per denoiser forward (released mock-AR).

    Args: see `Decoder` (temperature, top_k, top_p, logits_processors).
    """

    def __init__(self, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 logits_processors: Sequence[LogitsProcessor] | None = None):
        super().__init__(temperature=temperature, top_k=top_k, top_p=top_p, logits_processors=logits_processors)

    def _decode(self, call: DecodeCall) -> GenerationOutput:
        context, denoiser = call.context, call.denoiser
        ctx_device, den_device = call.ctx_device, call.den_device
        B, T = call.input_ids.shape
        capacity = T + call.max_new_tokens
        if T > 1:  # everything before the last prompt token
            head_valid = None if call.valid is None else call.valid[:, :-1]
            _, cache = context.prefill(call.input_ids[:, :-1], head_valid, logits="none", capacity=capacity)
        else:
            cache = context.empty_cache(B, capacity=capacity, device=ctx_device)
        den_cache = cache.mirror_to(den_device) if call.use_mirror else cache
        tracker = call.tracker(spare=1)
        rows = torch.arange(B, device=ctx_device)  # the working batch: the rows still running
        last = call.input_ids[:, -1:]  # (R, 1): the newest token, not yet in the cache
        for i in range(call.max_new_tokens):
            logits = denoiser.forward_block(last.to(den_device), den_cache, None)  # (R, 1, V)
            tracker.count_forward(rows)
            nxt = self.chooser(logits[:, -1], call.generator).to(ctx_device)[:, None]  # (R, 1)
            if call.step_callback is not None:
                call.step_callback(i, 0, None, logits, nxt)
            done = tracker.commit(nxt, rows=rows if tracker.can_finish_early else None)
            if i == call.max_new_tokens - 1 or (done is not None and bool(done.all())):
                break
            context.extend(cache, last, logits="none")
            fresh = False
            if done is not None and bool(done.any()):
                stay = (~done).nonzero().squeeze(1).to(ctx_device)
                cache, rows, nxt = cache.select(stay), rows[stay], nxt[stay]
                fresh = True
            if call.use_mirror:
                den_cache = cache.mirror_to(den_device) if fresh else cache.mirror_to(den_device, den_cache)
            else:
                den_cache = cache
            last = nxt
        return tracker.output(call.input_ids, blocks=0)
