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
(squeezed out by the cache's `Cache.compact` once they add up), and a finished row leaves the working
batch. Host syncs: two per iteration (the new cache length in `accept`, the finished rows), plus
the verify width with `draft_cut`; with `lookup`, the next tokens and the kept tokens too (the n-gram
indexes live on the host). A one-step draft (the default) runs `draft_one_step`: the
reference `denoise_block`'s tokens without its per-step bookkeeping and host syncs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..samplers import ConfidenceThreshold, Sampler
from ..validation import check_int
from .base import DecodeCall, Decoder, Towers, length_limit
from .diffusion import denoise_block
from .logits import LogitsProcessor, TokenChooser
from .lookup import NgramLookup
from .state import DecodeState
from .tracker import RowTracker

__all__ = ["Speculative", "draft_one_step"]

_GREEDY = TokenChooser()


def _as_lookup(lookup) -> NgramLookup | None:
    """`Speculative`'s `lookup` argument as an `NgramLookup` (or None), refusing anything else by name."""
    if lookup is None or isinstance(lookup, NgramLookup):
        return lookup
    if isinstance(lookup, (int, list, tuple)) and not isinstance(lookup, bool):
        return NgramLookup(lookup)
    if isinstance(lookup, dict) and set(lookup) <= {"ngram", "max_tokens"}:
        return NgramLookup(**lookup)
    raise ValueError(f"lookup must be an NgramLookup, its n-gram size(s) (an int or a list of ints), a dict of its "
                     f"arguments (keys 'ngram', 'max_tokens') or None, got {lookup!r}")


def room_left(state: DecodeState) -> int:
    """Cache positions the context tower may still take before its sliding window (a large number
    when its limit is max_position_embeddings, which no tower enforces: behaviour there is unchanged)."""
    limit, name = length_limit(state.call.context)
    return limit - state.cache.length if name == "sliding_window" else 1 << 62


def draft_one_step(denoiser, cache, n: int, *, first: Tensor, shift: bool, mask_token_id: int, tracker: RowTracker,
                   rows: Tensor, block_index: int, step_callback=None, cut: float = 0.0
                   ) -> tuple[Tensor, Tensor | None]:
    """A one-forward greedy draft: x (R, n) with x[:, 0] = first, and each row's draft length.

    The same tokens, NFE count and step callback as `denoise_block(..., steps=1, fill_last=True,
    chooser=TokenChooser())` (the reference, tests/test_speculative.py holds the parity test),
    without its host syncs and per-step bookkeeping: one forward, one argmax.

    cut > 0: also returns width (R,) long, 1 + the number of leading drafted positions whose
    running product of confidences (the softmax probability of the drafted token, [MASK] excluded)
    stays >= cut; else width is None (every position counts).
    """
    R, device = first.shape[0], first.device
    x = torch.full((R, n), mask_token_id, dtype=torch.long, device=device)
    x[:, 0] = first
    t = torch.full((R,), n - 1, dtype=torch.float32, device=device) / n  # as denoise_block: masked count / n
    logits = denoiser.forward_block(x, cache, t)  # (R, n, V) float32, freshly allocated
    logits[..., mask_token_id] = float("-inf")
    pred = logits[:, :-1] if shift else logits[:, 1:]  # the predictions for positions 1 .. n - 1
    before = x.clone() if step_callback is not None else None
    x[:, 1:] = pred.argmax(-1)
    tracker.count_forward(rows)  # every row had n - 1 >= 1 masked positions
    if step_callback is not None:
        shown = torch.cat([logits[:, :1], logits[:, :-1]], dim=1) if shift else logits
        step_callback(block_index, 0, before, shown, x)
    if cut <= 0:
        return x, None
    conf = (pred.amax(-1) - pred.logsumexp(-1)).exp_()  # (R, n - 1): the drafted tokens' probabilities
    return x, (conf.cumprod_(-1) >= cut).sum(-1) + 1


class PartialTracker:
    """A `DecodeState` seen by a draft: its denoiser forwards count only for the rows in `uses` (R,) bool."""

    def __init__(self, state: DecodeState, uses: Tensor):
        self.state, self.uses = state, uses

    def count_forward(self, idx=None, took_part: Tensor | None = None) -> None:
        took = self.uses if took_part is None else took_part.cpu() & self.uses
        self.state.count_forward(idx, took)


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

        batch_block_size: positions per draft while more than one row runs (at most block_size;
            None = block_size): where a forward's cost grows with rows x positions (batches on CPU),
            shorter drafts while the batch is full and full-length ones once one row is left.
        draft_cut: greedy one-step drafts only: a row's draft ends before the first position where the
            product of the denoiser's confidences so far (its softmax probability of each drafted token)
            falls below `draft_cut`, and the verifying extend covers the longest row's draft only. It
            trades a few accepted tokens for a shorter verify, which pays where a forward's cost grows
            with its positions (batches on CPU; benchmarks/spec_cost.py). 0 (default): every position.
            Output is unchanged either way.
        lookup: an `NgramLookup`, its n-gram size(s) (an int or a list of ints) or its arguments as a dict
            (`{"ngram": 4, "max_tokens": 32}`, as JSON or YAML give them): a row whose last n tokens occurred
            earlier in it drafts what followed them there instead of the denoiser's draft, and an
            iteration in which every row found one runs no denoiser forward (prompt-lookup drafts,
            `lookup.py`). None (default): denoiser drafts only. Output is unchanged either way.

    `nfe` counts denoiser forwards (one per iteration by default), so tokens per NFE is tokens per
    iteration; `blocks` counts iterations. The step callback sees the draft steps.
    """

    uses_mask_token = True
    min_block_size = 2  # position 0 is the context tower's own token

    def __init__(self, block_size: int | None = None, draft_steps: int = 1, sampler: Sampler | None = None,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 logits_processors: Sequence[LogitsProcessor] | None = None, draft_cut: float = 0.0,
                 batch_block_size: int | None = None,
                 lookup: NgramLookup | int | list[int] | None = None):
        super().__init__(temperature=temperature, top_k=top_k, top_p=top_p, logits_processors=logits_processors)
        self.lookup = _as_lookup(lookup)
        if isinstance(draft_cut, bool) or not isinstance(draft_cut, (int, float)) or not 0 <= draft_cut < 1:
            raise ValueError(f"draft_cut must be a number in [0, 1) (0 = verify every drafted position), "
                             f"got {draft_cut!r}")
        self.draft_cut = float(draft_cut)
        for name, value in (("block_size", block_size), ("batch_block_size", batch_block_size)):
            if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 2):
                raise ValueError(f"speculative decoding needs {name} >= 2 (position 0 is the context tower's own "
                                 f"token), got {value!r}")
        self.block_size = block_size
        self.batch_block_size = batch_block_size
        self.draft_steps = check_int("draft_steps", draft_steps)
        self.sampler = ConfidenceThreshold(0.8) if sampler is None else sampler
        if not callable(self.sampler):
            raise ValueError(f"sampler must be a Sampler (or a callable with its signature), got {sampler!r}")

    def extra_repr(self) -> str:
        return (f"block_size={self.block_size}, draft_steps={self.draft_steps}, temperature={self.temperature}, "
                f"draft_cut={self.draft_cut}, batch_block_size={self.batch_block_size}, lookup={self.lookup}")

    def block_size_for(self, towers: Towers) -> int:
        return towers.block_size if self.block_size is None else self.block_size

    def check_call(self, call: DecodeCall) -> None:
        if call.block_size < 2:
            raise ValueError(f"speculative decoding needs block_size >= 2 (position 0 is the context tower's own "
                             f"token), got the model's block_size {call.block_size}; pass Speculative(block_size=16)")

    def draft_block(self, denoiser, cache, n: int, *, first: Tensor, shift: bool, mask_token_id: int, tracker,
                    rows: Tensor | None, block_index: int, step_callback=None, cut: float = 0.0
                    ) -> tuple[Tensor, Tensor | None]:
        """The denoiser's draft x (R, n), x[:, 0] = first, and each row's draft length (None: all n).

        One greedy step (`draft_one_step`, which alone honours `cut`) or `draft_steps` steps of
        `denoise_block` with this decoder's sampler. tracker: a `RowTracker` or a `DecodeState`
        (anything with `count_forward(rows, took_part)`).
        """
        if self.draft_steps == 1:
            return draft_one_step(denoiser, cache, n, first=first, shift=shift, mask_token_id=mask_token_id,
                                  tracker=tracker, rows=rows, block_index=block_index, step_callback=step_callback,
                                  cut=cut)
        x = denoise_block(denoiser, cache, n, sampler=self.sampler, steps=self.draft_steps,
                          mask_token_id=mask_token_id, chooser=_GREEDY, generator=None, tracker=tracker, rows=rows,
                          block_index=block_index, step_callback=step_callback, first=first, shift=shift,
                          fill_last=True)
        return x, None

    def rule_key(self) -> tuple:
        """What, besides the draft settings, must agree among rows verified together (the keep rule)."""
        return (type(self).__qualname__,)

    def kept(self, logits: Tensor, ar: Tensor, x: Tensor) -> Tensor:
        """(R,) long: how many tokens of the draft x (R, n) each row keeps, 1 to n.

        1 (the context tower's own first token) + the leading i >= 1 with x[:, i] == ar[:, i - 1],
        the context tower's token after x[:, :i]. logits (R, n, V): the verifying extend's (unused
        here; a subclass may relax the rule, e.g. `TolerantSpeculative`).
        """
        return (ar[:, :-1] == x[:, 1:]).long().cumprod(-1).sum(-1) + 1

    def batch_key(self, towers: Towers) -> tuple:
        # The chooser is applied per row (state.choose); the draft and the keep rule are shared.
        return (type(self), self.block_size_for(towers), self.draft_steps, repr(self.sampler), self.draft_cut,
                self.batch_block_size, repr(self.lookup), self.rule_key())

    def prefill(self, state: DecodeState) -> None:
        call = state.call
        T = call.input_ids.shape[1]
        logits, state.cache = call.context.prefill(call.input_ids, call.valid, logits="last",
                                                   capacity=T + call.max_new_tokens + call.block_size)
        state.carry["next"] = state.choose(logits[:, -1])  # (R,) the context tower's next token
        if self.lookup is not None:
            ids = call.input_ids.tolist()
            valid = [[True] * T] * len(ids) if call.valid is None else call.valid.tolist()
            state.carry["lookup"] = [self.lookup.index([t for t, v in zip(row, ok) if v]) for row, ok in zip(ids, valid)]

    def _width(self, state: DecodeState) -> int:
        """Positions the next iteration drafts and verifies (before `room_left` narrows it)."""
        n_full = state.call.block_size
        return n_full if len(state) == 1 or self.batch_block_size is None else min(n_full, self.batch_block_size)

    def draft(self, state: DecodeState) -> tuple[Tensor, Tensor | None]:
        # Narrowed only where a whole block would run past a sliding window (where the towers refuse):
        # a request that ends at the window then fits; everywhere else the width is unchanged.
        n = min(self._width(state), room_left(state))
        cut = self.draft_cut if (state.rows.greedy and self.draft_steps == 1) else 0.0
        found = None if self.lookup is None else self.looked_up(state, n)
        if found is not None and all(found):  # every row has a free draft: no denoiser forward this iteration
            return self.lookup_draft(state, found, n, None, None)
        # Rows drafted by lookup ride along in the denoiser's forward (no cache copy for a sub-batch) but
        # do not count it: each row's `nfe` is what it would be alone.
        tracker = state if found is None else PartialTracker(state, torch.tensor([not f for f in found]))
        x, width = self.denoiser_draft(state, n, tracker, cut)
        return (x, width) if found is None or not any(found) else self.lookup_draft(state, found, n, x, width)

    def denoiser_draft(self, state: DecodeState, n: int, tracker, cut: float = 0.0) -> tuple[Tensor, Tensor | None]:
        """The denoiser's n-position draft of every row after its next token (`draft_block`), its
        forwards counted on `tracker` (the state, or only some of its rows)."""
        call, den = state.call, state.den_cache()
        return self.draft_block(call.denoiser, den, n, first=state.carry["next"].to(den.device), shift=call.shifted,
                                mask_token_id=call.mask_token_id, tracker=tracker, rows=None,
                                block_index=state.iterations, step_callback=state.step_callback, cut=cut)

    def looked_up(self, state: DecodeState, n: int) -> list[list[int]]:
        """Each row's prompt-lookup draft after its next token ([] where none): at most n - 1 tokens, or
        the lookup's `max_tokens` (greedy only: sampled rows verify n positions, see `lookup_draft`)."""
        most = self.lookup.max_tokens
        # Longer lookups only where the block is full-length anyway: with batch_block_size set, rows that
        # share the batch keep their verify short (the reason it was set) and draft n - 1 at most.
        longer = most is not None and state.rows.greedy and (len(state) == 1 or self.batch_block_size is None)
        most = min(most, room_left(state) - 1) if longer else n - 1
        return [index.propose(first, most) for index, first in zip(state.carry["lookup"], state.carry["next"].tolist())]

    def lookup_draft(self, state: DecodeState, found: list[list[int]], n: int, x: Tensor | None,
                     width: Tensor | None) -> tuple[Tensor, Tensor]:
        """The draft with the rows that found a lookup draft replaced by it: x (R, m) and each row's
        draft length (1 + the lookup's length; the denoiser's, or n, elsewhere), m = n or 1 + the longest
        lookup if longer. x None: no denoiser draft was made (here every row found one; a row without one
        would verify its next token alone), and, greedy, the block is only as wide as the longest lookup."""
        call, first = state.call, state.carry["next"]
        longest = 1 + max(len(f) for f in found)
        if width is None:  # with no denoiser draft, a row without a lookup has its next token alone
            width = torch.full((len(found),), n if x is not None else 1, dtype=torch.long)
        else:
            width = width.to("cpu", copy=True)
        if x is None:
            # Sampling verifies every position: a row draws as many tokens per iteration as it would in
            # any batch (or alone), so its seeded output does not depend on the other rows' lookups.
            n = longest if state.rows.greedy else n
            x = torch.full((len(found), n), call.mask_token_id, dtype=torch.long)
        else:
            x = x.to("cpu", copy=True)
        if longest > x.shape[1]:  # a lookup longer than the denoiser's block (`NgramLookup.max_tokens`)
            x = torch.cat([x, x.new_full((x.shape[0], longest - x.shape[1]), call.mask_token_id)], 1)
        x[:, 0] = first.cpu()
        for r, tokens in enumerate(found):
            if tokens:  # positions past a short lookup keep whatever they hold: `width` stops the row there
                x[r, 1:1 + len(tokens)] = torch.tensor(tokens)
                width[r] = 1 + len(tokens)
        return x.to(first.device), width.to(first.device)

    def advance(self, state: DecodeState, drafted: tuple[Tensor, Tensor | None]) -> None:
        call, context = state.call, state.call.context
        x, width = drafted
        x = x.to(call.ctx_device)
        if width is not None:  # row r drafted width[r] positions; verify the longest of them (greedy only, see
            width = width.to(call.ctx_device)  # `lookup_draft`: sampled rows draw at every position)
            if state.rows.greedy:
                x = x[:, : int(width.max())]
        logits = context.extend(state.cache, x, logits="all", provisional=True)  # (R, m, V)
        ar = state.choose(logits)  # ar[:, i]: the context tower's token after x[:, :i + 1]
        keep = self.kept(logits, ar, x)
        if width is not None:
            keep = torch.minimum(keep, width)  # a row keeps nothing past its own draft
        context.accept(state.cache, keep)
        state.carry["next"] = ar.gather(1, (keep - 1)[:, None]).squeeze(1)
        if self.lookup is not None:  # before commit: finished rows leave with their index
            for index, row, k in zip(state.carry["lookup"], x.tolist(), keep.tolist()):
                index.extend(row[:k])
        state.commit(x, keep)
        self.finish_iteration(state)

    def finish_iteration(self, state: DecodeState) -> None:
        """After an iteration's tokens are committed: finished rows leave, holes are squeezed out
        once they add up (shared with decoders that verify differently, e.g. `TwoBranchSpeculative`)."""
        call = state.call
        state.drop_finished()  # later forwards only pay for the rows still running
        if not len(state):
            return
        if room_left(state) < self._width(state):
            # Next to a sliding window, holes (from rows that left or kept less) would narrow the
            # next block, or leave no room at all: squeeze out every one of them now.
            gain = 1
        elif len(state) > 1:
            # Rows keep different prefixes, so the others leave holes: squeeze them out once they
            # add up to a block and an eighth of the cache (bounds memory and attention width).
            gain = max(call.block_size, state.cache.length // 8)
        else:
            return
        if state.cache.compact(min_gain=gain) > 0:
            state.reshaped()
