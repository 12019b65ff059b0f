"""Two-branch (tree) verification: one context forward over a drafted block and a second branch at a
per-row position j gives, at every slot, what a plain forward over prefix + that branch gives, and
accepting either branch leaves the cache as if only the kept tokens had been appended.

NemotronH's Mamba-2 layers cannot read a tree mask: the branch scans from the main block's state
after position j - 1, rebuilt in closed form (`towers/nemotron_h/branch.py`); these tests hold that
against the naive reference on Mamba-only, attention-only and hybrid stacks, in every dt regime.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (DT_REGIMES, MASK, PAD, ar_continuation, assert_first_two_tokens_follow_ar, autoregressive,
                      dt_regimes, left_pad, make_family_towers, make_towers, random_prompts, run_decoder)

from twotower.decoding import Speculative, Towers, TwoBranchSpeculative, build_decoder, draft_one_step
from twotower.decoding.tree_verify import accept_tree, tree_extend, tree_layout
from twotower.decoding.two_branch import branch_position, draft_with_runner_up, pair_scores
from twotower.testing import check_rows_independent
from twotower.towers.branching import tree_mask

N = 6  # block positions
J = torch.tensor([1, 3, 5, 2])  # one branch position per row, 1 .. N-1, unequal on purpose


def towers_for(kind: str, regime: dict | None = None):
    """(context, denoiser) of a NemotronH pattern ('nemotron:<pattern>') or a family name."""
    if kind.startswith("nemotron:"):
        return make_towers(kind.split(":", 1)[1], seed=7, **(regime or {}))
    return make_family_towers(kind, seed=7)


KINDS = ["nemotron:MMM", "nemotron:*-*", "nemotron:M*-EM*E", "llama", "qwen2", "mistral"]


def draw(seed: int = 0, length: int | None = None):
    """Left-padded prompts, a main block and a second branch (tokens for block positions j.., padded;
    at most `length` of them)."""
    ids, mask = left_pad(random_prompts([5, 9, 7, 6], seed=seed))
    g = torch.Generator().manual_seed(seed + 1)
    main = torch.randint(4, 64, (4, N), generator=g)
    layout = tree_layout(J, N, length)
    branch = torch.randint(4, 64, (4, layout.m), generator=g)
    branch[~layout.branch_valid] = 0  # padding slots: any id
    return ids, mask, main, branch, layout


def reference_cache(ctx, ids, mask, r):
    """A cache of row r's real prompt alone."""
    return ctx.prefill(ids[r:r + 1, mask[r].bool()], logits="none")[1]


def branch_tokens(main, branch, layout, r):
    """Row r's second branch as a plain block: main[:j] then the branch's tokens."""
    j = int(layout.j[r])
    return torch.cat([main[r, :j], branch[r, :int(layout.branch_valid[r].sum())]])[None]


def test_tree_mask_separates_the_branches():
    layout = tree_layout(torch.tensor([2]), 4)  # main 0..3, branch slots for positions 2, 3
    m = tree_mask(layout, torch.ones(1, 1, dtype=torch.bool))[0, 0, :, 1:]  # drop the one prefix key
    want = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0],
                         [1, 1, 0, 0, 1, 0], [1, 1, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(m, want)


def test_tree_layout_refuses_bad_positions():
    with pytest.raises(ValueError, match=r"\[1, 5\]"):
        tree_layout(torch.tensor([0, 2]), 6)
    with pytest.raises(ValueError, match="long"):
        tree_layout(torch.tensor([1.0]), 6)
    layout = tree_layout(torch.tensor([1, 4]), 6, 3)
    assert layout.m == 3 and layout.branch_valid.tolist() == [[True] * 3, [True, True, False]]


@pytest.mark.parametrize("length", [None, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_tree_verify_equals_plain_forwards_of_each_branch(kind, length):
    ctx, _ = towers_for(kind)
    ids, mask, main, branch, layout = draw(length=length)
    with torch.inference_mode():
        _, cache = ctx.prefill(ids, mask, logits="none")
        logits = tree_extend(ctx, cache, main, branch, layout)
        for r in range(4):
            j = int(layout.j[r])
            ref_main = ctx.extend(reference_cache(ctx, ids, mask, r), main[r:r + 1])[0]
            ref_branch = ctx.extend(reference_cache(ctx, ids, mask, r), branch_tokens(main, branch, layout, r))[0]
            torch.testing.assert_close(logits[r, :N], ref_main, rtol=1e-4, atol=1e-4)
            size = int(layout.branch_valid[r].sum())
            torch.testing.assert_close(logits[r, N:N + size], ref_branch[j:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("regime", list(DT_REGIMES), ids=list(DT_REGIMES))
def test_mamba_branch_state_in_every_dt_regime(regime):
    """The branch's seed state is the main block's after j - 1 under the clamped time steps too."""
    ctx, _ = towers_for("nemotron:M*-EM*E", DT_REGIMES[regime])
    ids, mask, main, branch, layout = draw(seed=3)
    with torch.inference_mode():
        _, cache = ctx.prefill(ids, mask, logits="none")
        logits = tree_extend(ctx, cache, main, branch, layout)
        for r in range(4):
            j = int(layout.j[r])
            ref = ctx.extend(reference_cache(ctx, ids, mask, r), branch_tokens(main, branch, layout, r))[0]
            torch.testing.assert_close(logits[r, N:N + N - j], ref[j:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("length,keep", [(None, [4, 2, 6, 2]), (2, [3, 5, 6, 4])])
@pytest.mark.parametrize("kind", KINDS)
def test_accepting_either_branch_equals_appending_only_the_kept_tokens(kind, length, keep):
    """Rows take the main block or the second branch and keep different lengths (up to j + the
    branch's length); then the context tower's next extend and the denoiser's next block equal a
    cache of the kept tokens."""
    ctx, den = towers_for(kind)
    ids, mask, main, branch, layout = draw(seed=5, length=length)
    take = torch.tensor([True, False, True, True])  # rows 0, 2, 3 take the branch at j = 1, 5, 2
    check_accept(ctx, den, ids, mask, main, branch, layout, take, torch.tensor(keep),
                 lambda r: branch_tokens(main, branch, layout, r) if take[r] else main[r:r + 1])


def check_accept(ctx, den, ids, mask, main, branch, layout, take, keep, candidate):
    """Settle a tree verify with (take, keep); then the context tower's next extend and the denoiser's
    next block equal, row by row, those of a cache of the kept tokens (candidate(r): row r's winning
    candidate as a plain block)."""
    after = torch.randint(4, 64, (4, 3))
    nxt = torch.randint(4, 64, (4, N))
    t = torch.full((4,), 0.5)
    with torch.inference_mode():
        _, cache = ctx.prefill(ids, mask, logits="none")
        tree_extend(ctx, cache, main, branch, layout)
        accept_tree(ctx, cache, layout, keep, take)
        assert cache.pending is None and cache.length == ids.shape[1] + int(keep.max())
        den_out = den.forward_block(nxt, cache, t)
        out = ctx.extend(cache, after)
        for r in range(4):
            ref_cache = reference_cache(ctx, ids, mask, r)
            ctx.extend(ref_cache, candidate(r)[:, :keep[r]])
            ref_den = den.forward_block(nxt[r:r + 1], ref_cache, t[r:r + 1])
            torch.testing.assert_close(out[r], ctx.extend(ref_cache, after[r:r + 1])[0], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(den_out[r], ref_den[0], rtol=1e-4, atol=1e-4)


def test_accept_tree_needs_a_tree_block():
    ctx, _ = towers_for("nemotron:M*-EM*E")
    ids, mask, main, branch, layout = draw()
    with torch.inference_mode():
        _, cache = ctx.prefill(ids, mask, logits="none")
        ctx.extend(cache, main, provisional=True)
        with pytest.raises(RuntimeError, match="tree_forward first"):
            accept_tree(ctx, cache, layout, torch.full((4,), 2), torch.zeros(4, dtype=torch.bool))


# ---- several branches in one tree -------------------------------------------------------------------

FORKS = torch.tensor([[1, 3, 2], [3, 1, 4], [5, 2, 1], [2, 2, 3]])  # (R, K): three branches per row
LENGTHS = [None, torch.tensor([2, 0, 3, 1]), 2]  # the second branch: row 1 has none


def draw_forks(seed: int = 0):
    """Left-padded prompts, a main block and three branches per row (`FORKS`, `LENGTHS`)."""
    ids, mask = left_pad(random_prompts([5, 9, 7, 6], seed=seed))
    g = torch.Generator().manual_seed(seed + 1)
    main = torch.randint(4, 64, (4, N), generator=g)
    layout = tree_layout(FORKS, N, LENGTHS)
    branch = torch.randint(4, 64, (4, layout.m), generator=g)
    branch[~layout.branch_valid] = 0
    return ids, mask, main, branch, layout


def fork_tokens(main, branch, layout, r, b):
    """Row r's branch b as a plain block (main[:j] then its tokens), its first slot in the block and size."""
    start = layout.starts()[b]
    size = int(layout.branch_valid[r, start - N:start - N + layout.widths[b]].sum())
    j = int(layout.forks[r, b])
    return torch.cat([main[r, :j], branch[r, start - N:start - N + size]])[None], start, size


def test_tree_mask_of_two_branches():
    layout = tree_layout(torch.tensor([[2, 1]]), 4)  # branch 0: positions 2, 3; branch 1: positions 1 .. 3
    assert layout.widths == (2, 3) and layout.starts() == [4, 6]
    m = tree_mask(layout, torch.ones(1, 1, dtype=torch.bool))[0, 0, :, 1:]
    want = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0, 0],
                         [1, 1, 1, 1, 0, 0, 0, 0, 0],
                         [1, 1, 0, 0, 1, 0, 0, 0, 0], [1, 1, 0, 0, 1, 1, 0, 0, 0],
                         [1, 0, 0, 0, 0, 0, 1, 0, 0], [1, 0, 0, 0, 0, 0, 1, 1, 0], [1, 0, 0, 0, 0, 0, 1, 1, 1]],
                        dtype=torch.bool)
    assert torch.equal(m, want)
    with pytest.raises(ValueError, match="3 branches need 3 lengths"):
        tree_layout(FORKS, N, [None, 2])
    with pytest.raises(ValueError, match="no single fork"):
        layout.j


@pytest.mark.parametrize("kind,regime", [(k, None) for k in KINDS]
                         + [("nemotron:M*-EM*E", r) for r in DT_REGIMES if r != "random"])
def test_a_tree_of_three_branches_equals_plain_forwards_of_each(kind, regime):
    """Three branches per row (one row without the second), on every family and, on a hybrid, in every
    dt regime: the branches' Mamba scans run as rows of one batched scan, each from its own fork."""
    ctx, _ = towers_for(kind, DT_REGIMES[regime] if regime else None)
    ids, mask, main, branch, layout = draw_forks()
    with torch.inference_mode():
        _, cache = ctx.prefill(ids, mask, logits="none")
        logits = tree_extend(ctx, cache, main, branch, layout)
        for r in range(4):
            ref_main = ctx.extend(reference_cache(ctx, ids, mask, r), main[r:r + 1])[0]
            torch.testing.assert_close(logits[r, :N], ref_main, rtol=1e-4, atol=1e-4)
            for b in range(3):
                tokens, start, size = fork_tokens(main, branch, layout, r, b)
                if size:
                    ref = ctx.extend(reference_cache(ctx, ids, mask, r), tokens)[0]
                    torch.testing.assert_close(logits[r, start:start + size], ref[-size:], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_accepting_any_of_three_branches_equals_appending_only_the_kept_tokens(kind):
    ctx, den = towers_for(kind)
    ids, mask, main, branch, layout = draw_forks(seed=5)
    # Row 0 takes branch 0 (fork 1), row 1 the main block, row 2 branch 2 (fork 1, 2 long), row 3 branch 1.
    take = torch.tensor([1, 0, 3, 2])
    check_accept(ctx, den, ids, mask, main, branch, layout, take, torch.tensor([5, 4, 3, 3]),
                 lambda r: fork_tokens(main, branch, layout, r, int(take[r]) - 1)[0] if take[r] else main[r:r + 1])


# ---- the decoder --------------------------------------------------------------------------------



def two_branch(ctx, den, ids, mask=None, *, block_size: int = 6, max_new_tokens: int = 21, branch_at="likeliest",
               branch_len: int | None = None, temperature: float = 0.0, **call):
    """TwoBranchSpeculative (block 6) on bare towers."""
    decoder = TwoBranchSpeculative(branch_at, branch_len, block_size=block_size, temperature=temperature)
    return run_decoder(decoder, ctx, den, ids, mask, max_new_tokens=max_new_tokens, **call)


class SwappedDrafter(torch.nn.Module):
    """A denoiser stand-in that drafts the context tower's own greedy continuation except at block
    position `at`, where a wrong token wins narrowly and AR's token is the runner-up: every draft is
    rejected at `at` and every second branch there is right, so a two-branch iteration keeps it all."""

    def __init__(self, ctx, shifted: bool, vocab: int, at: int):
        super().__init__()
        self.ctx, self.shifted, self.vocab, self.at = ctx, shifted, vocab, at
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the stand-in a device

    def forward_block(self, x, cache, t=None):
        seq = ar_continuation(self.ctx, x, cache)
        logits = torch.nn.functional.one_hot(seq, self.vocab).float() * 10
        right = seq[:, self.at]
        wrong = (right + 1) % self.vocab
        wrong = torch.where(wrong == MASK, (wrong + 1) % self.vocab, wrong)
        rows = torch.arange(seq.shape[0])
        logits[rows, self.at] = 0.0
        logits[rows, self.at, right] = 5.0
        logits[rows, self.at, wrong] = 6.0
        # output i predicts position i + 1 when shifted
        return torch.cat([logits[:, 1:], logits[:, -1:]], 1) if self.shifted else logits


FAMILIES = ["nemotron_h", "llama", "qwen2", "mistral"]


@pytest.mark.parametrize("family", FAMILIES)
def test_two_branch_output_is_the_ar_output_in_every_family(family):
    ctx, den = make_family_towers(family, seed=6)
    ids, mask = left_pad(random_prompts([4, 9, 6], seed=6))
    ar = autoregressive(ctx, ids, mask, max_new_tokens=21, pad_token_id=PAD)
    for rule, length in (("likeliest", None), ("expected", 3), (0.6, None)):
        out = two_branch(ctx, den, ids, mask, branch_at=rule, branch_len=length)
        assert torch.equal(out.new_tokens, ar.new_tokens), (rule, length)
        assert out.blocks >= math.ceil(21 / 6)


@dt_regimes
@pytest.mark.parametrize("shifted", [True, False])
def test_two_branch_output_is_the_ar_output_on_hybrids(shifted, regime):
    ctx, den = make_towers(seed=6, **regime)
    ids, mask = left_pad(random_prompts([4, 9, 6], seed=6))
    ar = autoregressive(ctx, ids, mask, max_new_tokens=21, pad_token_id=PAD)
    out = two_branch(ctx, den, ids, mask, shifted=shifted)
    assert torch.equal(out.new_tokens, ar.new_tokens)


@pytest.mark.parametrize("kind,shifted,seed", [("nemotron:M*-EM*E", True, 9), ("nemotron:MMM", False, 12),
                                               ("llama", False, 9)])
def test_a_right_second_branch_is_kept_whole(kind, shifted, seed):
    """Every draft fails at position 2 and its runner-up is right there: Speculative keeps 2 tokens
    per iteration, the two-branch decoder all 6, and both give AR's output."""
    ctx, _ = towers_for(kind)
    ids, mask = left_pad(random_prompts([5, 8], seed=seed))
    ar = autoregressive(ctx, ids, mask, max_new_tokens=24, pad_token_id=PAD)
    # A draft never holds [MASK]; these seeds' AR outputs have none (a random model can emit it).
    assert not (ar.new_tokens == MASK).any()
    drafter = SwappedDrafter(ctx, shifted, ctx.config.vocab_size, at=2)
    out = two_branch(ctx, drafter, ids, mask, shifted=shifted, max_new_tokens=24, branch_at="lowest")
    assert torch.equal(out.new_tokens, ar.new_tokens)
    assert out.blocks == 4  # 6 tokens per iteration
    short = run_decoder(TwoBranchSpeculative("lowest", branch_len=2, block_size=6), ctx, drafter, ids, mask,
                        max_new_tokens=24, shifted=shifted)
    assert torch.equal(short.new_tokens, ar.new_tokens) and short.blocks == 6  # positions 0 .. 3: 4 per iteration
    spec = run_decoder(Speculative(block_size=6), ctx, drafter, ids, mask, max_new_tokens=24, shifted=shifted)
    assert torch.equal(spec.new_tokens, ar.new_tokens) and spec.blocks == 12


class AlternatingDrafter(SwappedDrafter):
    """`SwappedDrafter` whose wrong token sits at `at` on odd forwards and at `other` on even ones; the
    other position is just as unsure but right. One fork at the first unsure position catches only
    half the rejections; a fork at each catches all."""

    def __init__(self, ctx, shifted: bool, vocab: int, at: int, other: int):
        super().__init__(ctx, shifted, vocab, at)
        self.positions, self.calls = (at, other), 0

    def forward_block(self, x, cache, t=None):
        self.calls += 1
        wrong_at, right_at = self.positions if self.calls % 2 else self.positions[::-1]
        self.at = wrong_at
        logits = super().forward_block(x, cache, t)
        # At right_at, AR's token wins as narrowly as the wrong one does at wrong_at: the same confidence.
        i = right_at - 1 if self.shifted else right_at
        top = logits[:, i].argmax(-1)
        wrong = (top + 1) % self.vocab
        wrong = torch.where(wrong == MASK, (wrong + 1) % self.vocab, wrong)
        rows = torch.arange(x.shape[0])
        logits[rows, i] = 0.0
        logits[rows, i, top] = 6.0
        logits[rows, i, wrong] = 5.0
        return logits


@pytest.mark.parametrize("kind,shifted", [("nemotron:M*-EM*E", True), ("llama", False)])
def test_two_forks_catch_what_one_misses(kind, shifted):
    """Drafts fail at position 2 or 4 in turn, both equally unsure: two forks keep every iteration
    whole (6 tokens), one fork (at 2, the first of the two) only the iterations that fail there."""
    ctx, _ = towers_for(kind)
    ids, mask = left_pad(random_prompts([5, 8], seed=9))
    ar = autoregressive(ctx, ids, mask, max_new_tokens=24, pad_token_id=PAD)
    assert not (ar.new_tokens == MASK).any()
    blocks = {}
    for forks in (1, 2):
        drafter = AlternatingDrafter(ctx, shifted, ctx.config.vocab_size, at=2, other=4)
        out = run_decoder(TwoBranchSpeculative("lowest", block_size=6, forks=forks), ctx, drafter, ids, mask,
                          max_new_tokens=24, shifted=shifted)
        assert torch.equal(out.new_tokens, ar.new_tokens), forks
        blocks[forks] = out.blocks
    # One fork sits at 2 (a tie with 4: the first wins): 6, 4, 6, 4, then 4 tokens left in a fifth iteration.
    assert blocks[2] == 4 and blocks[1] == 5


class ThirdChoiceDrafter(SwappedDrafter):
    """`SwappedDrafter` whose AR token at `at` is only the third choice, behind two wrong ones."""

    def forward_block(self, x, cache, t=None):
        logits = super().forward_block(x, cache, t)
        i = self.at - 1 if self.shifted else self.at
        right = logits[:, i].topk(2).indices[:, 1]  # SwappedDrafter's runner-up there is AR's token
        other = (right + 2) % self.vocab
        other = torch.where(other == MASK, (other + 1) % self.vocab, other)
        logits[torch.arange(x.shape[0]), i, other] = 5.5
        return logits


@pytest.mark.parametrize("kind,shifted", [("nemotron:M*-EM*E", True), ("qwen2", False)])
def test_two_runner_ups_at_one_position(kind, shifted):
    """AR's token at position 2 is the draft's third choice: two forks there (alternatives=2) keep
    every iteration whole, two forks at different positions keep 2 tokens an iteration."""
    ctx, _ = towers_for(kind)
    ids, mask = left_pad(random_prompts([5, 8], seed=9))
    ar = autoregressive(ctx, ids, mask, max_new_tokens=24, pad_token_id=PAD)
    assert not (ar.new_tokens == MASK).any()
    drafter = ThirdChoiceDrafter(ctx, shifted, ctx.config.vocab_size, at=2)
    blocks = {}
    for alternatives in (1, 2):
        out = run_decoder(TwoBranchSpeculative(block_size=6, forks=2, alternatives=alternatives), ctx, drafter, ids,
                          mask, max_new_tokens=24, shifted=shifted)
        assert torch.equal(out.new_tokens, ar.new_tokens), alternatives
        blocks[alternatives] = out.blocks
    assert blocks == {1: 12, 2: 4}


def test_pair_scores():
    c = torch.tensor([[0.9, 0.5, 0.8]])
    q = torch.tensor([[[0.05, 0.03], [0.3, 0.1], [0.1, 0.05]]])
    reach = torch.tensor([1.0, 0.9, 0.45])
    torch.testing.assert_close(pair_scores("likeliest", c, q)[0], reach[:, None] * q[0])
    expected = pair_scores("expected", c, q)[0]
    # The q-free factor: reach * (1 + the expected run after the fork), shared by both tokens of a position.
    torch.testing.assert_close(expected[:, 0] / q[0, :, 0], expected[:, 1] / q[0, :, 1])
    torch.testing.assert_close(expected[:, 0] / q[0, :, 0], reach * torch.tensor([1 + 0.5 + 0.4, 1 + 0.8, 1.0]))
    with pytest.raises(ValueError, match="'likeliest' or 'expected', got 'lowest'"):
        pair_scores("lowest", c, q)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("forks,length,alternatives", [(2, None, 1), (3, 2, 1), (3, None, 3)])
def test_forked_trees_keep_the_ar_output(family, forks, length, alternatives):
    ctx, den = make_family_towers(family, seed=6)
    ids, mask = left_pad(random_prompts([4, 9, 6], seed=6))
    ar = autoregressive(ctx, ids, mask, max_new_tokens=21, pad_token_id=PAD)
    decoder = TwoBranchSpeculative(branch_len=length, block_size=6, forks=forks, alternatives=alternatives)
    out = run_decoder(decoder, ctx, den, ids, mask, max_new_tokens=21)
    assert torch.equal(out.new_tokens, ar.new_tokens)


def test_rows_stay_independent_and_the_mirror_changes_nothing():
    ctx, den = make_towers(seed=9)
    ids, mask = left_pad(random_prompts([3, 10, 6, 8], seed=9))
    batch = two_branch(ctx, den, ids, mask, max_new_tokens=30, shifted=True)
    towers = Towers(ctx, den, mask_token_id=MASK, pad_token_id=PAD, shifted=True)
    check_rows_independent(TwoBranchSpeculative(block_size=6), towers, ids, mask, batch, 30, None)
    mirrored = two_branch(ctx, den, ids, mask, max_new_tokens=30, shifted=True, denoiser_device="cpu")
    assert torch.equal(batch.new_tokens, mirrored.new_tokens)


def test_eos_ends_rows_like_ar():
    ctx, den = make_towers(seed=10)
    ids, mask = left_pad(random_prompts([4, 7], seed=10))
    free = autoregressive(ctx, ids, mask, max_new_tokens=19, pad_token_id=PAD)
    eos = int(free.new_tokens[0, 5])
    ar = autoregressive(ctx, ids, mask, max_new_tokens=19, pad_token_id=PAD, eos_token_id=eos)
    out = two_branch(ctx, den, ids, mask, max_new_tokens=19, eos_token_id=eos, shifted=True)
    assert torch.equal(out.num_generated, ar.num_generated) and torch.equal(out.sequences, ar.sequences)


def test_two_branch_sampling_follows_the_ar_distribution():
    """Temperature 1, block 3: the branch forks at position 1 or 2, and the first two tokens are AR's
    samples: the first's frequencies match softmax(prefill logits), the second's AR's conditional."""
    ctx, den = make_towers(seed=13, vocab_size=8)
    ids = torch.randint(4, 8, (1, 5)).expand(2000, 5).contiguous()
    out = two_branch(ctx, den, ids, block_size=3, max_new_tokens=3, temperature=1.0, shifted=True,
                     generator=torch.Generator().manual_seed(0))
    assert_first_two_tokens_follow_ar(ctx, ids, out)


class Counter:
    """A tracker stand-in that counts forwards."""

    def __init__(self):
        self.calls = 0

    def count_forward(self, *args):
        self.calls += 1


@pytest.mark.parametrize("shifted", [True, False])
def test_the_draft_is_speculatives_with_its_runner_ups(shifted):
    """draft_with_runner_up gives draft_one_step's tokens, forward count and step-callback arguments."""
    ctx, den = make_towers(seed=4)
    ids = torch.randint(4, 64, (3, 7))
    first = torch.randint(4, 64, (3,))
    seen, counters = {}, (Counter(), Counter())
    with torch.inference_mode():
        _, cache = ctx.prefill(ids, logits="none")
        ref, _ = draft_one_step(den, cache, 6, first=first, shift=shifted, mask_token_id=MASK, tracker=counters[0],
                                rows=None, block_index=2, step_callback=lambda *a: seen.setdefault("ref", a))
        x, alt, c, q = draft_with_runner_up(den, cache, 6, first=first, shift=shifted, mask_token_id=MASK,
                                            tracker=counters[1], block_index=2,
                                            step_callback=lambda *a: seen.setdefault("got", a))
    assert torch.equal(x, ref) and counters[0].calls == counters[1].calls == 1
    for a, b in zip(seen["ref"], seen["got"], strict=True):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
    assert alt.shape == c.shape == q.shape == (3, 5)
    assert torch.all(alt != x[:, 1:]) and torch.all(q <= c) and torch.all(c + q <= 1 + 1e-6)


def test_branch_rules():
    c = torch.tensor([[0.99, 0.95, 0.4, 0.3, 0.9], [0.5, 0.99, 0.99, 0.99, 0.2]])
    q = torch.tensor([[0.005, 0.04, 0.5, 0.1, 0.05], [0.45, 0.0, 0.0, 0.0, 0.7]])
    assert branch_position("lowest", c, q).tolist() == [4, 5]
    assert branch_position("likeliest", c, q).tolist() == [3, 1]
    assert branch_position(0.45, c, q).tolist() == [3, 5]
    assert branch_position(0.1, c, q).tolist() == [4, 5]  # none below: the least confident
    assert branch_position("expected", c, q).tolist() == [3, 1]


def test_bad_arguments_and_registry():
    with pytest.raises(ValueError, match=r"branch_at must be one of .*got 'middle'"):
        TwoBranchSpeculative("middle")
    with pytest.raises(ValueError, match="got 1.5"):
        TwoBranchSpeculative(1.5)
    with pytest.raises(ValueError, match="branch_len must be an int >= 1 .*got 0"):
        TwoBranchSpeculative(branch_len=0)
    with pytest.raises(ValueError, match="forks must be an int >= 1, got 0"):
        TwoBranchSpeculative(forks=0)
    with pytest.raises(ValueError, match="forks > 1 needs a named branch_at rule"):
        TwoBranchSpeculative(0.5, forks=2)
    with pytest.raises(ValueError, match="alternatives must be an int >= 1, got 0"):
        TwoBranchSpeculative(alternatives=0)
    with pytest.raises(ValueError, match="alternatives > 1 .* got branch_at='lowest'"):
        TwoBranchSpeculative("lowest", forks=2, alternatives=2)
    assert isinstance(build_decoder("two_branch"), TwoBranchSpeculative)
    ctx, den = make_towers(seed=1)
    with pytest.raises(ValueError, match="block_size >= 3"):
        two_branch(ctx, den, torch.randint(4, 64, (1, 4)), block_size=2)


@pytest.mark.parametrize("prompt_len", [5, 9, 13, 15])
def test_two_branch_fits_a_request_that_ends_at_a_sliding_window(prompt_len):
    """The tree takes up to 2n - 1 slots: next to Mistral's window the block shrinks, then the last
    iterations verify plain drafts; greedy output stays AR's up to the window's last position."""
    from conftest import tiny_mistral_config

    from twotower.decoding import Autoregressive
    from twotower.model import TwoTowerLM
    from twotower.tokenizers import BYTE_TOKENIZER, ByteTokenizer

    torch.manual_seed(0)
    config = tiny_mistral_config(vocab_size=ByteTokenizer().vocab_size, sliding_window=16, tokenizer=BYTE_TOKENIZER)
    model = TwoTowerLM(config, block_size=4).eval()
    ids = torch.randint(4, 200, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    with torch.inference_mode():
        got = model.generate(ids, decoder=TwoBranchSpeculative(block_size=4), max_new_tokens=16 - prompt_len)
        want = model.generate(ids, decoder=Autoregressive(), max_new_tokens=16 - prompt_len)
    assert torch.equal(got.new_tokens, want.new_tokens)
