"""`TwoBranchSpeculative`: lossless speculative decoding that verifies two candidates per iteration.

The D²SD idea (arXiv 2606.04446) on a one-forward mask draft. Per iteration, for every running row:

    d            = the draft, as `Speculative`'s: d_0 the context tower's token, d_1..d_{n-1} the
                   denoiser's argmax (one forward)
    j            = where the draft is likeliest to be rejected (`branch_at`, from the denoiser's
                   confidences c_i and runner-up probabilities q_i), 1 <= j <= n-1
    e            = d_0..d_{j-1}, r_j, d_{j+1}..d_{n-1}: the runner-up r_j at j. Positions after j of a
                   one-forward draft do not condition on the token at j, so the continuation is d's.
    logits       = one context forward over d and e_j..e_{n-1} with a tree mask (`tree_verify`);
                   NemotronH's Mamba-2 layers scan every slot along its own path, in one pass
    keep_1       = `Speculative`'s rule on d
    take         = keep_1 == j (d fails exactly at j) and r_j is the context tower's token there
    keep         = take ? j + 1 + the leading branch positions > j that agree : keep_1

Every kept token is the context tower's own choice given the tokens before it (the token at j is
checked against the same choice that rejected d_j), so greedy output equals `Autoregressive` token
for token and sampled output follows AR sampling. The second branch adds n - j verify positions (at
most `branch_len`); it pays where a forward's cost grows slowly with its positions (accelerators at
small batch, and a small model's single row on a CPU: README, "Choosing a sampler").
`benchmarks/two_branch_potential.py` measures what it can gain.

With `forks=K` the same forward verifies K such branches (a tree of K + 1 candidates), at the K best
positions, or with `alternatives` at the K best (position, runner-up) pairs, so that two may share a
position. Only a branch forking exactly where d fails, with the context tower's token there, can be
taken, so the keep rule above is unchanged; where two qualify (a lookup and a runner-up with the same
token), the longer agreeing run wins. A prompt lookup takes the last fork's place. `benchmarks/lookup_potential.py` counts what more forks keep.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..towers.branching import source_slots
from .logits import LogitsProcessor
from .lookup import NgramLookup
from .speculative import PartialTracker, Speculative, room_left
from .state import DecodeState
from ..validation import check_int
from .tree_verify import TreeLayout, accept_tree, supports_tree, tree_extend, tree_layout

__all__ = ["TwoBranchSpeculative", "draft_with_runner_up", "branch_position", "branch_scores", "pair_scores",
           "BRANCH_RULES"]

BRANCH_RULES = ("likeliest", "lowest", "expected")


def _reach(c: Tensor) -> Tensor:
    """(R, n-1): prod_{k<i} c_k for positions i = 1 .. n-1, the chance d is still accepted before i."""
    # Position 1 is always reached: d_0 is the context tower's own token, so it is always kept.
    return torch.cat([c.new_ones(c.shape[0], 1), c[:, :-1].cumprod(-1)], dim=1)


def branch_scores(rule: str, c: Tensor, q: Tensor) -> Tensor:
    """(R, n-1) scores of positions 1 .. n-1 under a named rule (higher: fork there first), from
    confidences c (R, n-1) and runner-up probabilities q (R, n-1) (softmax probabilities, read as the
    chance a token is right).

    "likeliest": P(first rejection at j) = prod_{k<j} c_k (1 - c_j);
    "lowest": -c_j, the least confident position first;
    "expected": prod_{k<j} c_k q_j (1 + sum_{m>j} prod_{j<k<=m} c_k), the expected extra tokens.
    """
    if rule == "lowest":
        return -c
    if rule == "likeliest":
        return _reach(c) * (1 - c)
    if rule == "expected":
        # Log space: a ratio of float32 running products would be 0 / 0 once they underflow; the clamp keeps a
        # zero confidence from giving -inf - -inf = nan below.
        logc = c.clamp_min(1e-30).log().cumsum(-1)  # (R, n-1)
        i = torch.arange(c.shape[1], device=c.device)
        # runs[r, j, m] = prod_{j<k<=m} c_k for m > j, else 0
        runs = (logc[:, None, :] - logc[:, :, None]).exp() * (i[None, :] > i[:, None])
        return _reach(c) * q * (1 + runs.sum(-1))
    raise ValueError(f"no scores for branch rule {rule!r}; the named rules are {', '.join(map(repr, BRANCH_RULES))}")


def pair_scores(rule: str, c: Tensor, q: Tensor) -> Tensor:
    """(R, n-1, A) scores of forking at position j (1 .. n-1) with its a-th runner-up, from confidences
    c (R, n-1) and the runner-ups' probabilities q (R, n-1, A): the chance the branch is taken,
    prod_{k<j} c_k q_{j,a} ("likeliest"), times 1 + the expected run after it ("expected")."""
    if rule == "likeliest":
        return _reach(c)[..., None] * q
    if rule == "expected":
        # branch_scores("expected", c, 1) is reach * (1 + expected run): the q-free part, shared by every token.
        return branch_scores("expected", c, torch.ones_like(c))[..., None] * q
    raise ValueError(f"forking at several runner-ups per position needs branch_at 'likeliest' or 'expected', "
                     f"got {rule!r}")


def branch_position(rule: str | float, c: Tensor, q: Tensor) -> Tensor:
    """(R,) long branch positions in [1, n-1] from confidences c (R, n-1) and runner-up probabilities
    q (R, n-1) of positions 1 .. n-1: the best position under a named rule (`branch_scores`), or, for a
    float t, the first position whose confidence is below t (else the least confident one)."""
    if isinstance(rule, str):
        return branch_scores(rule, c, q).argmax(-1) + 1  # + 1: column i of c is block position i + 1
    low = c < rule
    first = low.long().argmax(-1)  # 0 where none is low: then fall back to the least confident
    return torch.where(low.any(-1), first, c.argmin(-1)) + 1


def draft_with_runner_up(denoiser, cache, n: int, *, first: Tensor, shift: bool, mask_token_id: int, tracker,
                         block_index: int, step_callback=None, alternatives: int = 1
                         ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`draft_one_step`'s draft x (R, n) and, for positions 1 .. n-1, the runner-up tokens (R, n-1),
    the drafted tokens' probabilities c and the runner-ups' q (R, n-1) (float32, [MASK] excluded).
    alternatives > 1: the runner-ups and q are (R, n-1, alternatives), the next likeliest tokens in turn."""
    R, device = first.shape[0], first.device
    x = torch.full((R, n), mask_token_id, dtype=torch.long, device=device)
    x[:, 0] = first
    t = torch.full((R,), n - 1, dtype=torch.float32, device=device) / n  # as draft_one_step
    logits = denoiser.forward_block(x, cache, t)  # (R, n, V) float32, freshly allocated
    logits[..., mask_token_id] = float("-inf")  # before topk: neither the draft nor its runner-up may be [MASK]
    pred = logits[:, :-1] if shift else logits[:, 1:]  # the predictions for positions 1 .. n - 1
    top = pred.topk(1 + alternatives, dim=-1)
    # Cloned because x is filled in place next: the callback's tokens_before is the all-[MASK] block.
    before = x.clone() if step_callback is not None else None
    x[:, 1:] = top.indices[..., 0]
    tracker.count_forward(None)
    if step_callback is not None:
        shown = torch.cat([logits[:, :1], logits[:, :-1]], dim=1) if shift else logits
        step_callback(block_index, 0, before, shown, x)
    prob = (top.values - pred.logsumexp(-1, keepdim=True)).exp_()  # (R, n - 1, 1 + alternatives)
    if alternatives == 1:
        return x, top.indices[..., 1], prob[..., 0], prob[..., 1]
    return x, top.indices[..., 1:], prob[..., 0], prob[..., 1:]


class TwoBranchSpeculative(Speculative):
    """`Speculative` that also verifies the draft's runner-up at one position, in the same forward.

    Args:
        branch_at: where the second branch forks: "likeliest" (default; where the draft's first
            rejection is likeliest), "lowest" (the least confident position), "expected" (the most
            expected extra tokens) or a float in (0, 1): the first position less confident than it.
        branch_len: verify only the second branch's first `branch_len` positions (j .. j+branch_len-1;
            None: to the block's end). The branch rarely runs long, so a short one keeps most of the
            gain for a fraction of the extra verify positions (benchmarks/two_branch_potential.py).
        block_size / temperature / top_k / top_p / logits_processors / batch_block_size: as `Speculative`.
        forks: how many runner-up branches to verify, at the `forks` best positions under `branch_at`
            (a named rule): a tree of forks + 1 candidates. More forks catch more first rejections
            for more verify positions (benchmarks/lookup_potential.py measures the ceiling). Greedy
            decoding only past 1; sampled batches fork once (a row's draws would otherwise depend on
            the other rows' branch widths).
        alternatives: the runner-ups each position may fork with (its 2nd .. (1 + alternatives)-th
            likeliest tokens). Past 1, the forks are the best (position, token) pairs by the chance
            the branch is taken (`pair_scores`; branch_at "likeliest" or "expected"), so two forks
            may share a position. Greedy only, as `forks`.
        lookup: as `Speculative`'s (an `NgramLookup` or its n-gram size(s)), but the lookup becomes a
            candidate instead of replacing the draft: a row that found one verifies the lookup and the
            denoiser's draft side by side, the longer as the main block and the other from their first
            difference (in the place of the last fork), and keeps whichever the context tower accepts
            further. Rows without one fork at their runner-ups as usual. Greedy decoding only; sampled
            batches branch at the runner-up (their draws would otherwise depend on the other rows' lookups).
        lookup_alone: with `lookup`, greedy: a row that found a lookup of at least this many tokens
            verifies that lookup alone, with no denoiser draft and no branches; an iteration in which
            every row does runs no denoiser forward, as `Speculative(lookup=...)`. Skipping the draft
            saves about half an iteration's cost, for some of the tokens the tree would have kept
            (even long lookups are often wrong early). In a batch with other rows the row rides along
            in their draft forward without using or counting it, so it runs as it would alone. None
            (default): the denoiser drafts every iteration. On the embedded default (forks 6,
            alternatives 3, branch_len 4), 8 kept 6.71 tokens per iteration at 1.63x AR, against the
            full tree's 7.15 at 1.52x and `Speculative(lookup=4)`'s 5.01 at 1.70x (README, levers table).

    One-step greedy drafts only (no `draft_steps` > 1, no `draft_cut`). The context tower's family
    needs a tree verify (NemotronH, Llama, Qwen2, Mistral). Output: `Autoregressive`'s.
    """

    def __init__(self, branch_at: str | float = "likeliest", branch_len: int | None = None,
                 block_size: int | None = None, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, logits_processors: Sequence[LogitsProcessor] | None = None,
                 batch_block_size: int | None = None, lookup: NgramLookup | int | list[int] | None = None,
                 forks: int = 1, alternatives: int = 1, lookup_alone: int | None = None):
        super().__init__(block_size=block_size, temperature=temperature, top_k=top_k, top_p=top_p,
                         logits_processors=logits_processors, batch_block_size=batch_block_size, lookup=lookup)
        threshold = isinstance(branch_at, float) and 0 < branch_at < 1
        if not threshold and branch_at not in BRANCH_RULES:
            raise ValueError(f"branch_at must be one of {', '.join(map(repr, BRANCH_RULES))} or a float in (0, 1) "
                             f"(a confidence threshold), got {branch_at!r}")
        self.branch_at = branch_at
        if branch_len is not None and (isinstance(branch_len, bool) or not isinstance(branch_len, int)
                                       or branch_len < 1):
            raise ValueError(f"branch_len must be an int >= 1 (positions of the second branch to verify) or None "
                             f"(to the block's end), got {branch_len!r}")
        self.branch_len = branch_len
        check_int("forks", forks, 1)
        if forks > 1 and threshold:
            raise ValueError(f"forks > 1 needs a named branch_at rule ({', '.join(map(repr, BRANCH_RULES))}) to rank "
                             f"the positions, got branch_at={branch_at!r}")
        self.forks = forks
        check_int("alternatives", alternatives, 1)
        if alternatives > 1 and branch_at not in ("likeliest", "expected"):
            raise ValueError(f"alternatives > 1 ranks (position, token) pairs by the chance they are taken: it needs "
                             f"branch_at 'likeliest' or 'expected', got branch_at={branch_at!r}")
        self.alternatives = alternatives
        if lookup_alone is not None:
            check_int("lookup_alone", lookup_alone, 1)
            if self.lookup is None:
                raise ValueError(f"lookup_alone={lookup_alone} needs lookup (the n-gram size of prompt-lookup "
                                 f"drafts), e.g. TwoBranchSpeculative(lookup=4, lookup_alone={lookup_alone})")
        self.lookup_alone = lookup_alone

    def extra_repr(self) -> str:
        return (f"branch_at={self.branch_at!r}, branch_len={self.branch_len}, forks={self.forks}, "
                f"alternatives={self.alternatives}, lookup_alone={self.lookup_alone}, " + super().extra_repr())

    def rule_key(self) -> tuple:
        return (type(self).__qualname__, self.branch_at, self.branch_len, self.forks, self.alternatives,
                self.lookup_alone)

    def check_call(self, call) -> None:
        super().check_call(call)
        if call.block_size < 3:
            raise ValueError(f"two-branch decoding needs block_size >= 3 (position 0 is the context tower's token, "
                             f"and the branch forks at a later drafted one), got {call.block_size}; pass "
                             f"TwoBranchSpeculative(block_size=16)")
        if not supports_tree(call.context):
            raise ValueError(f"{type(call.context).__qualname__} has no tree verify; use Speculative")

    def draft(self, state: DecodeState):
        call = state.call
        width, room = self._width(state), room_left(state)
        # The tree takes up to n + K (n - 1) cache slots (K branches): next to a sliding window, a shorter block.
        K = self._branches(state)
        n = min(width, (room + K) // (K + 1))
        if n < 3:  # no room for a tree: this iteration verifies one plain draft
            return super().draft(state)
        found = self.looked_up(state, n) if self.lookup is not None and state.rows.greedy else None
        # A main block of N positions and K branches take up to N + K (N - 1) cache slots: cap the lookups to fit.
        # Whether a row goes alone is read off the capped lookup, the one `_lookup_tree` sees.
        cap = (room + K) // (K + 1) - 1
        capped = None if found is None else [f[:cap] for f in found]
        alone = [self._alone(f) for f in capped] if capped is not None else [False] * len(state)
        if all(alone):  # every row verifies its lookup alone: a plain verify (`advance` sees two parts)
            return self.lookup_draft(state, found, n, None, None)
        # Rows whose lookup goes alone ride along in the denoiser's forward without counting it (and
        # without using it: `_lookup_tree`), so each row's iterations and `nfe` are what they are alone.
        tracker = PartialTracker(state, torch.tensor([not a for a in alone])) if any(alone) else state
        den = state.den_cache()
        drafted = draft_with_runner_up(call.denoiser, den, n, first=state.carry["next"].to(den.device),
                                       shift=call.shifted, mask_token_id=call.mask_token_id, tracker=tracker,
                                       block_index=state.iterations, step_callback=state.step_callback,
                                       alternatives=self.alternatives if state.rows.greedy else 1)
        return drafted if capped is None else (*drafted, capped)

    def _alone(self, found: list[int]) -> bool:
        """Whether a row's lookup (its tokens after the next one) is verified alone (`lookup_alone`)."""
        return self.lookup_alone is not None and len(found) >= self.lookup_alone

    def _choose(self, state: DecodeState, logits: Tensor, n: int) -> Tensor:
        """The context tower's tokens for every tree slot, (R, n + m).

        The branch width m is the batch's (its earliest fork), so when sampling, the slots are padded
        to the widest branch an n-position block can have before choosing: each row's generator then
        makes the same draws whatever rows share its batch (a served request samples what it would
        alone). The padding slots' tokens are never read."""
        widest = n - 1 if self.branch_len is None else min(n - 1, self.branch_len)
        pad = n + widest - logits.shape[1]
        if state.rows.greedy or pad <= 0:
            return state.choose(logits)  # argmax draws no noise; pad <= 0: already the widest branch
        padded = torch.cat([logits, logits.new_zeros(logits.shape[0], pad, logits.shape[2])], dim=1)
        return state.choose(padded)[:, : logits.shape[1]]

    def _branches(self, state: DecodeState) -> int:
        """Branches per tree this iteration: `forks` when greedy, one when sampling (see `forks`)."""
        return self.forks if state.rows.greedy else 1

    def _forks(self, c: Tensor, q: Tensor, alt: Tensor, K: int) -> tuple[Tensor, Tensor]:
        """(R, K) long fork positions (best first) and the token each branch starts with: the runner-up
        there, or with several runner-ups per position (alt, q (R, n-1, A)), the best K pairs."""
        if alt.dim() == 3:
            scores = pair_scores(self.branch_at, c, q).flatten(1)  # column i: position i // A + 1, token i % A
            best = scores.topk(K, dim=-1).indices
            return best // alt.shape[2] + 1, alt.flatten(1).gather(1, best)
        forks = branch_position(self.branch_at, c, q)[:, None] if K == 1 else \
            branch_scores(self.branch_at, c, q).topk(K, dim=-1).indices + 1
        return forks, alt.gather(1, forks - 1)  # alt starts at position 1

    def _runner_up_tree(self, x: Tensor, firsts: Tensor, forks: Tensor) -> tuple[Tensor, TreeLayout]:
        """The branch tokens (R, m) and layout of a fork at every column of forks (R, K): each branch is
        d's tokens from its fork on with firsts[:, b] (a runner-up) at the fork."""
        n = x.shape[1]
        layout = tree_layout(forks if forks.shape[1] > 1 else forks[:, 0], n, self.branch_len)  # a host read each
        e = x.gather(1, layout.block_pos[:, n:])  # d's tokens at every branch slot ...
        for b, start in enumerate(layout.starts()):  # ... and the runner-up at each fork
            e[:, start - n] = firsts[:, b]
        return e, layout

    def _lookup_tree(self, x: Tensor, firsts: Tensor, forks: Tensor, found: list[list[int]], mask_token_id: int):
        """Each row's main block and branches where some rows found a lookup draft.

        A row with a lookup l (after its first token) compares it with the denoiser's draft d: where they
        first differ (position k), the longer of the two is the main block and the other a branch from k,
        in the place of the last runner-up fork; where one is a prefix of the other, the longer is the
        main block and the runner-up forks stay (they fork inside d, whose prefix the main block then
        shares). Forks of d past k cannot hang from a longer lookup's main block: those rows go without
        them. Other rows keep d and its forks. firsts (R, K): each fork's runner-up token. Returns main
        (R, N), branch (R, m), each row's main length (R,) and the layout."""
        fork_rows = forks.tolist()
        mains, trees = [], []
        for d, row_firsts, row_forks, look in zip(x.tolist(), firsts.tolist(), fork_rows, found):
            branches = []
            for fork, first in zip(row_forks, row_firsts):
                branch = [first] + d[fork + 1:]
                branches.append((fork, branch if self.branch_len is None else branch[: self.branch_len]))
            main = d
            if self._alone(look):  # the lookup alone, as in an iteration with no denoiser draft
                main, branches = d[:1] + look, [(1, [])] * len(branches)
            elif look:
                lk = d[:1] + look
                k = next((i for i in range(1, min(len(lk), len(d))) if lk[i] != d[i]), None)
                longer, shorter = (lk, d) if len(lk) > len(d) else (d, lk)
                main = longer
                if k is not None:
                    branches[-1] = (k, shorter[k:])
                    if longer is lk:  # d's forks past k would branch off d, not off the main block
                        branches[:-1] = [(f, b) if f <= k else (1, []) for f, b in branches[:-1]]
            mains.append(main)
            trees.append(branches)
        N, K, dev = max(map(len, mains)), len(fork_rows[0]), x.device
        per_branch = [[tree[b] for tree in trees] for b in range(K)]
        fork = torch.tensor([[f for f, _ in col] for col in per_branch], dtype=torch.long, device=dev).T
        lengths = [torch.tensor([len(t) for _, t in col], dtype=torch.long, device=dev) for col in per_branch]
        layout = tree_layout(fork if K > 1 else fork[:, 0], N, lengths if K > 1 else lengths[0])

        def padded(rows: list[list[int]], size: int) -> Tensor:
            return torch.tensor([r + [mask_token_id] * (size - len(r)) for r in rows], dtype=torch.long, device=dev)

        e = torch.cat([padded([t for _, t in col], w) for col, w in zip(per_branch, layout.widths)], dim=1)
        width = torch.tensor([len(r) for r in mains], dtype=torch.long, device=dev)
        return padded(mains, N), e, width, layout

    def advance(self, state: DecodeState, drafted) -> None:
        if len(drafted) == 2:  # a plain draft (`draft` ran out of room for a tree)
            return super().advance(state, drafted)
        call, context = state.call, state.call.context
        # The draft comes from the denoiser's device, which may differ (docs/design.md, section 2.7).
        x, alt, c, q = (t.to(call.ctx_device) for t in drafted[:4])
        n = x.shape[1]
        pairs = (n - 1) * (alt.shape[2] if alt.dim() == 3 else 1)
        forks, firsts = self._forks(c, q, alt, min(self._branches(state), pairs))
        width = None
        if len(drafted) == 5 and any(drafted[4]):  # some rows found a lookup: a per-row tree
            x, e, width, layout = self._lookup_tree(x, firsts, forks, drafted[4], call.mask_token_id)
            n = x.shape[1]
        else:
            e, layout = self._runner_up_tree(x, firsts, forks)
        logits = tree_extend(context, state.cache, x, e, layout)  # (R, n + m, V)
        ar = self._choose(state, logits, n)  # ar[:, s]: the context tower's token after slot s (in its branch)
        # Main slots never see a branch slot, so their logits are a plain extend's and Speculative's rule holds.
        keep = self.kept(logits[:, :n], ar[:, :n], x)
        if width is not None:
            keep = torch.minimum(keep, width)  # a row keeps nothing past its own main block
        keep, take = self._best_branch(layout, e, ar, keep)
        accept_tree(context, state.cache, layout, keep, take)
        src = source_slots(layout, take)  # (R, n): the slot of each kept position
        # The slot of the last kept token (a branch slot where taken): AR's token after it opens the next block.
        last = src.gather(1, (keep - 1)[:, None])
        state.carry["next"] = ar.gather(1, last).squeeze(1)
        kept = torch.cat([x, e], dim=1).gather(1, src)
        if self.lookup is not None:  # before commit: finished rows leave with their index
            for index, row, k in zip(state.carry["lookup"], kept.tolist(), keep.tolist()):
                index.extend(row[:k])
        state.commit(kept, keep)
        self.finish_iteration(state)

    @staticmethod
    def _best_branch(layout: TreeLayout, e: Tensor, ar: Tensor, keep1: Tensor) -> tuple[Tensor, Tensor]:
        """Each row's kept length and winner (take (R,) long: 0 the main block, b + 1 branch b), given
        the main block's kept length keep1.

        A branch is taken only where the main block fails exactly at its fork j and its first token is
        the context tower's token there. keep1 < j: the shared prefix failed; keep1 > j: d_j was right,
        so the branch's token (!= d_j) is not. ar[:, j - 1] comes from a main slot before the fork, one
        choice for every candidate: taking a branch never changes j's token. Branches that fork at the
        same position with the same first token (a lookup and a runner-up) both count: the longer wins."""
        n, keep, take = layout.n, keep1, torch.zeros_like(keep1)
        for b, start in enumerate(layout.starts()):
            w, j = layout.widths[b], layout.forks[:, b]
            tokens, valid = e[:, start - n:start - n + w], layout.branch_valid[:, start - n:start - n + w]
            first = valid[:, 0] & (keep1 == j) & (tokens[:, 0] == ar.gather(1, (j - 1)[:, None]).squeeze(1))
            # ar at branch slot start + k is AR's token after the branch's position j + k, so it checks
            # tokens[:, k + 1]; padding never agrees, so the run stops at the branch's end.
            agree = (tokens[:, 1:] == ar[:, start:start + w - 1]) & valid[:, 1:]
            reach = j + 1 + agree.long().cumprod(-1).sum(-1)
            longer = first & (reach > keep)
            keep = torch.where(longer, reach, keep)
            take = torch.where(longer, b + 1, take)
        return keep, take
