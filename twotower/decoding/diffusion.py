"""`MaskDiffusion`: block-wise mask diffusion (docs/design.md, section 2), and the block denoiser
it shares with speculative decoding.

    cache = context.prefill(prompt)                                   # clean prompt, once
    for each block of n = min(S, what is left) positions:
        x = [MASK] * n
        for s in 0 .. steps_per_block - 1, while x has a [MASK]:
            t       = (#[MASK] in x) / n                              # (R,), per row
            logits  = denoiser.forward_block(x, cache, t)             # (R, n, V); [MASK] logit -> -inf
            cand    = the chooser's token (argmax, or a seeded sample)
            conf    = softmax(logits)[cand]                           # untempered
            commit  = sampler(conf, cand, masked, step=s, ...)        # which masks to fill now
            x[commit] = cand[commit]
        a row's first EOS in the block ends it (pad after it)
        context.extend(cache, x)                                      # one chunked forward

Host syncs: one per step ("is anything still masked"), plus one per block when an EOS id is
given. Rows that finish leave the working batch at the next block boundary (`cache.select`), so
later forwards only pay for the rows still running; within a block, a row whose positions are
all filled takes no part in the forward's NFE count.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..samplers import ConfidenceThreshold, Sampler
from ..validation import check_int
from .base import Decoder, Towers
from .logits import LogitsProcessor, TokenChooser, confidence_of
from .state import DecodeState
from .tracker import RowTracker

__all__ = ["MaskDiffusion", "denoise_block"]


def denoise_block(denoiser, cache, n: int, *, sampler, steps: int, mask_token_id: int, chooser: TokenChooser,
                  generator, tracker: RowTracker, rows: Tensor, block_index: int, step_callback=None,
                  first: Tensor | None = None, shift: bool = False, fill_last: bool = False) -> Tensor:
    """Fill one block of n positions for every working row; returns x (R, n) with no [MASK] left.

    rows (R,): the tracker rows of the working batch (None: all of a `DecodeState`, passed as the
    tracker); a row counts an NFE for each forward in which it still had a [MASK]. generator: passed
    to `chooser` and, for a `Sampler`, to its `select` (random commit orders). first (R,): the block
    opens with these tokens (the context tower's next-token prediction), never masked. shift: the
    denoiser output at position i is the prediction for position i + 1 (a shifted model; needs
    `first`). fill_last: the last allowed step fills every masked position without consulting the
    sampler (a one-step draft is then the plain choice, no confidences computed).
    """
    R, device = cache.batch_size, cache.device  # x goes where the denoiser's cache is (a mirror, on two devices)
    masked = torch.ones(R, n, dtype=torch.bool, device=device)
    x = torch.full((R, n), mask_token_id, dtype=torch.long, device=device)
    if first is not None:
        masked[:, 0] = False
        x[:, 0] = first
    for step in range(steps):
        if not bool(masked.any()):  # the one host sync per step
            break
        # Per row, over all n positions (a shifted block's open position 0 included): t as training measures it.
        t = masked.sum(-1, dtype=torch.float32) / n
        logits = denoiser.forward_block(x, cache, t)  # (R, n, V) float32, freshly allocated
        if shift:  # output i predicts position i + 1; position 0 is never masked
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        logits[..., mask_token_id] = float("-inf")  # [MASK] is neither a candidate nor in the confidences' softmax
        cand = torch.where(masked, chooser(logits, generator), x)
        if fill_last and step == steps - 1:  # all commit, as the sampler's last-step rule would: no confidences needed
            commit = masked
        else:
            extra = {"generator": generator} if isinstance(sampler, Sampler) else {}  # plain callables: as before
            commit = sampler(confidence_of(logits, cand), cand, masked, step=step, steps_per_block=steps,
                             logits=logits, **extra)
            commit = commit & masked  # a plain-callable sampler gets no contract enforcement otherwise
        tracker.count_forward(rows, masked.any(-1))  # before `masked` updates: rows that entered with a [MASK]
        before, x = x, torch.where(commit, cand, x)  # a new x: `before` stays this step's input for the callback
        masked &= ~commit
        if step_callback is not None:
            step_callback(block_index, step, before, logits, x)
    if bool(masked.any()):
        raise RuntimeError(f"sampler {sampler!r} left masked positions after steps_per_block={steps} "
                           "steps; a sampler must commit every masked position at the last step "
                           "(subclass twotower.samplers.Sampler to get this guaranteed)")
    return x


class MaskDiffusion(Decoder):
    """Block mask diffusion: the denoiser fills each block of [MASK] over a few steps; the sampler
    decides which confident positions commit at each step.

    Args:
        sampler: the commit policy (default `ConfidenceThreshold(0.8)`); any `Sampler`, the
            user's own included.
        block_size: positions per block (None = the model's); the last block is shorter when
            max_new_tokens is not a multiple of it.
        steps_per_block: the most denoiser forwards a block may take (the sampler's contract
            finishes every block in time).
        temperature / top_k / top_p / logits_processors: how candidates are chosen (see
            `Decoder`). Confidence always uses the untempered, unfiltered softmax.

    With a shifted model each block's first token is the context tower's own next-token choice
    (from the prefill / the previous extend: no extra forward), and denoiser output i is read as
    the prediction for position i + 1.
    """

    uses_mask_token = True

    def __init__(self, sampler: Sampler | None = None, block_size: int | None = None, steps_per_block: int = 16,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 logits_processors: Sequence[LogitsProcessor] | None = None):
        super().__init__(temperature=temperature, top_k=top_k, top_p=top_p, logits_processors=logits_processors)
        self.sampler = ConfidenceThreshold(0.8) if sampler is None else sampler
        if not callable(self.sampler):
            raise ValueError(f"sampler must be a Sampler (or a callable with its signature), got {sampler!r}")
        self.block_size = None if block_size is None else check_int("block_size", block_size)
        self.steps_per_block = check_int("steps_per_block", steps_per_block)

    def extra_repr(self) -> str:
        return (f"sampler={self.sampler!r}, block_size={self.block_size}, steps_per_block={self.steps_per_block}, "
                f"temperature={self.temperature}")

    def block_size_for(self, towers: Towers) -> int:
        return towers.block_size if self.block_size is None else self.block_size

    def batch_key(self, towers: Towers) -> tuple:
        # The chooser is applied per row (state.choose); the rest is shared by the batch.
        return (type(self), self.block_size_for(towers), self.steps_per_block, repr(self.sampler))

    def prefill(self, state: DecodeState) -> None:
        call = state.call
        T = call.input_ids.shape[1]
        # Capacity for everything this call will append: no cache growth (reallocation) mid-generation.
        logits, state.cache = call.context.prefill(call.input_ids, call.valid, logits=self._wanted(call),
                                                   capacity=T + call.max_new_tokens)
        if call.shifted:  # the context tower's next-token logits open each block
            state.carry["last"] = logits[:, -1]

    @staticmethod
    def _wanted(call) -> str:
        # An unshifted model never reads the context's logits: skip its head, the vocabulary-wide product.
        return "last" if call.shifted else "none"

    def draft(self, state: DecodeState) -> list[tuple[list[int] | None, Tensor]]:
        """Denoise every row's next block: [(rows, x (r, n))]. A row's last block is shorter when its
        cap is not a multiple of the block size; rows of another width denoise in a group of their
        own (a sub-batch of the cache). Rows of one `generate` call always form one group (None)."""
        widths = [min(state.call.block_size, left) for left in state.rows.left()]
        if len(set(widths)) == 1:
            return [(None, self._denoise(state, None, widths[0]))]
        return [(idx, self._denoise(state, idx, n)) for n in sorted(set(widths))
                for idx in [[r for r, w in enumerate(widths) if w == n]]]

    def _denoise(self, state: DecodeState, idx: list[int] | None, n: int) -> Tensor:
        call = state.call
        den = state.den_cache(idx)
        first = None
        if call.shifted:  # [MASK] is never produced, as in the denoiser's steps
            last = state.carry["last"] if idx is None else state.carry["last"][idx]
            last = last.float().clone()  # a copy: the carried logits stay as the context tower gave them
            last[:, call.mask_token_id] = float("-inf")
            first = state.choose(last, idx).to(den.device)  # chosen on the context's device, used on the denoiser's
        return denoise_block(call.denoiser, den, n, sampler=self.sampler, steps=self.steps_per_block,
                             mask_token_id=call.mask_token_id, chooser=state.chooser(idx),
                             generator=state.rows.generator, tracker=state, rows=idx, block_index=state.iterations,
                             step_callback=state.step_callback, first=first, shift=call.shifted)

    def advance(self, state: DecodeState, drafted: list[tuple[list[int] | None, Tensor]]) -> None:
        call = state.call
        if len(drafted) == 1 and drafted[0][0] is None:
            x, count = drafted[0][1], None
        else:  # groups of different widths: one (R, widest) block, each row keeping its own width
            widest = max(b.shape[1] for _, b in drafted)
            x = torch.full((len(state), widest), call.mask_token_id, dtype=torch.long, device=drafted[0][1].device)
            count = torch.zeros(len(state), dtype=torch.long)  # each row commits its own width, never the filler
            for idx, block in drafted:
                where = torch.tensor(idx, dtype=torch.long)
                x[where.to(x.device), : block.shape[1]] = block
                count[where] = block.shape[1]
        state.commit(x, count)  # first: it finds the rows that finished (EOS, cap), which then skip the extend
        x, = state.drop_finished(x)
        if state.done:
            return  # the context never needs the last block
        # A row still running had a full block (a shorter one is a row's last), so the rows stack.
        logits = call.context.extend(state.cache, x.to(call.ctx_device), logits=self._wanted(call))
        if call.shifted:
            state.carry["last"] = logits[:, -1]
