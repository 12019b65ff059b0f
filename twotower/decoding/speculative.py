"""`Speculative`: lossless two-tower decoding. The denoiser drafts, the context tower verifies.

Per iteration, for every unfinished row:

    d_0          = the context tower's own next token (known from the previous forward)
    d_1..d_{n-1} = the denoiser's draft: `draft_steps` denoising steps from an all-[MASK] block
                   whose position 0 holds d_0 (the last step fills every position left)
    logits       = context.extend(cache, d, provisional=True)     # one chunked forward
    a_i          = the context tower's token after d_0..d_i (argmax of logits[i], or a sample)
    keep         = 1 + the number of leading i >= 1 with d_i == a_{i-1}
    accept(cache, keep); the next d_0 = a_{keep-1}

Every kept token is the context tower's own choice given the tokens before it, so greedy output
equals `Autoregressive` token for token (up to float rounding between a chunked and a one-token
forward) and sampled output is distributed as AR sampling with the same temperature and filters.
The denoiser only decides how many tokens an iteration yields (1 to n). Rows advance
independently: a row that keeps fewer than another leaves masked-out holes in the shared cache
(squeezed out by `HybridCache.compact` once they add up), and a finished row leaves the working
batch. Host syncs: two per iteration (the new cache length in `accept`, the finished rows).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..samplers import ConfidenceThreshold, Sampler
from .base import DecodeCall, Decoder, Towers, check_int
from .diffusion import denoise_block
from .logits import LogitsProcessor, TokenChooser
from .tracker import GenerationOutput

__all__ = ["Speculative"]

_GREEDY = TokenChooser()


class Speculative(Decoder):
    """Draft a block with the denoiser, keep the prefix the context tower agrees with.

    Args:
        block_size: positions per draft, including the context tower's own first token (>= 2;
            None = the model's).
        draft_steps: denoiser forwards per draft. With the default 1 the draft is the denoiser's
            argmax; with more, `sampler` picks the commits of all but the last step.
        sampler: the commit policy of the draft steps before the last (default ConfidenceThreshold(0.8)).
        temperature / top_k / top_p / logits_processors: how the context tower's tokens, i.e. the
            output, are chosen. Drafts are always greedy.

    `nfe` counts denoiser forwards (one per iteration by default), so tokens per NFE is tokens per
    iteration; `blocks` counts iterations. The step callback sees the draft steps.
    """

    uses_mask_token = True

    def __init__(self, block_size: int | None = None, draft_steps: int = 1, sampler: Sampler | None = None,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 logits_processors: Sequence[LogitsProcessor] | None = None):
        super().__init__(temperature=temperature, top_k=top_k, top_p=top_p, logits_processors=logits_processors)
        if block_size is not None and not (isinstance(block_size, int) and not isinstance(block_size, bool)
                                           and block_size >= 2):
            raise ValueError(f"speculative decoding needs block_size >= 2 (position 0 is the context tower's own "
                             f"token), got {block_size!r}")
        self.block_size = block_size
        self.draft_steps = check_int("draft_steps", draft_steps)
        self.sampler = ConfidenceThreshold(0.8) if sampler is None else sampler
        if not callable(self.sampler):
            raise ValueError(f"sampler must be a Sampler (or a callable with its signature), got {sampler!r}")

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}, draft_steps={self.draft_steps}, temperature={self.temperature}"

    def block_size_for(self, towers: Towers) -> int:
        return towers.block_size if self.block_size is None else self.block_size

    def check_call(self, call: DecodeCall) -> None:
        if call.block_size < 2:
            raise ValueError(f"speculative decoding needs block_size >= 2 (position 0 is the context tower's own "
                             f"token), got the model's block_size {call.block_size}; pass Speculative(block_size=16)")

    def _kept(self, logits: Tensor, ar: Tensor, x: Tensor) -> Tensor:
        """(R,) long: how many tokens of the draft x (R, n) each row keeps, 1 to n.

        1 (the context tower's own first token) + the leading i >= 1 with x[:, i] == ar[:, i - 1],
        the context tower's token after x[:, :i]. logits (R, n, V): the verifying extend's (unused
        here; a subclass may relax the rule, e.g. `TolerantSpeculative`).
        """
        return (ar[:, :-1] == x[:, 1:]).long().cumprod(-1).sum(-1) + 1

    def _decode(self, call: DecodeCall) -> GenerationOutput:
        context, denoiser, n = call.context, call.denoiser, call.block_size
        ctx_device, den_device = call.ctx_device, call.den_device
        B, T = call.input_ids.shape
        logits, cache = context.prefill(call.input_ids, call.valid, logits="last",
                                        capacity=T + call.max_new_tokens + n)
        den_cache = cache.mirror_to(den_device) if call.use_mirror else cache
        tracker = call.tracker(spare=n)
        nxt = self.chooser(logits[:, -1], call.generator)  # (B,) the context tower's next token
        rows = torch.arange(B, device=ctx_device)  # the working batch: the rows still running
        iterations = 0
        while True:
            x = denoise_block(denoiser, den_cache, n, sampler=self.sampler, steps=self.draft_steps,
                              mask_token_id=call.mask_token_id, chooser=_GREEDY, generator=None, tracker=tracker,
                              rows=rows, block_index=iterations, step_callback=call.step_callback,
                              first=nxt.to(den_device), shift=call.shifted, fill_last=True)
            x = x.to(ctx_device)
            logits = context.extend(cache, x, logits="all", provisional=True)  # (R, n, V)
            ar = self.chooser(logits, call.generator)  # ar[:, i]: the context tower's token after x[:, :i + 1]
            keep = self._kept(logits, ar, x)
            context.accept(cache, keep)
            nxt = ar.gather(1, (keep - 1)[:, None]).squeeze(1)
            iterations += 1
            done = tracker.commit(x, keep, rows)
            if bool(done.all()):
                break
            fresh = False
            if bool(done.any()):  # drop finished rows: later forwards only pay for the rows still running
                stay = (~done).nonzero().squeeze(1).to(ctx_device)
                cache, rows, nxt = cache.select(stay), rows[stay], nxt[stay]
                fresh = True
            if rows.numel() > 1:
                # Rows keep different prefixes, so the others leave holes: squeeze them out once they
                # add up to a block and an eighth of the cache (bounds memory and attention width).
                fresh = cache.compact(min_gain=max(n, cache.length // 8)) > 0 or fresh
            if call.use_mirror:
                den_cache = cache.mirror_to(den_device) if fresh else cache.mirror_to(den_device, den_cache)
            else:
                den_cache = cache
        return tracker.output(call.input_ids, iterations)
