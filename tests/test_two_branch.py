"""Two-branch (tree) verification: one context forward over a drafted block and a second branch at a
per-row position j gives, at every slot, what a plain forward over prefix + that branch gives, and
accepting either branch leaves the cache as if only the kept tokens had been appended.

NemotronH's Mamba-2 layers cannot read a tree mask: the branch scans from the main block's state
after position j - 1, rebuilt in closed form (`towers/nemotron_h/branch.py`); these tests hold that
against the naive reference on Mamba-only, attention-only and hybrid stacks, in every dt regime.
"""

from __future__ import annotations

import pytest
import torch
from conftest import DT_REGIMES, left_pad, make_family_towers, make_towers, random_prompts

from twotower.decoding.tree_verify import accept_tree, tree_extend, tree_layout
from twotower.towers.branching import tree_mask

N = 6  # block positions
J = torch.tensor([1, 3, 5, 2])  # one branch position per row, 1 .. N-1, unequal on purpose


def towers_for(kind: str, regime: dict | None = None):
    """(context, denoiser) of a NemotronH pattern ('nemotron:<pattern>') or a family name."""
    if kind.startswith("nemotron:"):
        return make_towers(kind.split(":", 1)[1], seed=7, **(regime or {}))
    return make_family_towers(kind, seed=7)


KINDS = ["nemotron:MMM", "nemotron:*-*", "nemotron:M*-EM*E", "llama", "qwen2", "mistral"]


def draw(seed: int = 0):
    """Left-padded prompts, a main block and a second branch (tokens for block positions j.., padded)."""
    ids, mask = left_pad(random_prompts([5, 9, 7, 6], seed=seed))
    g = torch.Generator().manual_seed(seed + 1)
    main = torch.randint(4, 64, (4, N), generator=g)
    layout = tree_layout(J, N)
    branch = torch.randint(4, 64, (4, layout.m), generator=g)
    branch[~layout.branch_valid] = 0  # padding slots: any id
    return ids, mask, main, branch, layout


def reference_cache(ctx, ids, mask, r):
    """A cache of row r's real prompt alone."""
    return ctx.prefill(ids[r:r + 1, mask[r].bool()], logits="none")[1]


def branch_tokens(main, branch, layout, r):
    """Row r's second branch as a plain block: main[:j] then the branch's tokens."""
    j = int(layout.j[r])
    return torch.cat([main[r, :j], branch[r, :N - j]])[None]


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


@pytest.mark.parametrize("kind", KINDS)
def test_tree_verify_equals_plain_forwards_of_each_branch(kind):
    ctx, _ = towers_for(kind)
    ids, mask, main, branch, layout = draw()
    with torch.inference_mode():
        _, cache = ctx.prefill(ids, mask, logits="none")
        logits = tree_extend(ctx, cache, main, branch, layout)
        for r in range(4):
            j = int(layout.j[r])
            ref_main = ctx.extend(reference_cache(ctx, ids, mask, r), main[r:r + 1])[0]
            ref_branch = ctx.extend(reference_cache(ctx, ids, mask, r), branch_tokens(main, branch, layout, r))[0]
            torch.testing.assert_close(logits[r, :N], ref_main, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(logits[r, N:N + N - j], ref_branch[j:], rtol=1e-4, atol=1e-4)


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


@pytest.mark.parametrize("kind", KINDS)
def test_accepting_either_branch_equals_appending_only_the_kept_tokens(kind):
    """Rows take the main block or the second branch and keep different lengths (0 .. N); then the
    context tower's next extend and the denoiser's next block equal a cache of the kept tokens."""
    ctx, den = towers_for(kind)
    ids, mask, main, branch, layout = draw(seed=5)
    take = torch.tensor([True, False, True, True])
    keep = torch.tensor([4, 2, 6, 2])  # a taken branch keeps past its j (1, 5, 2); row 1 keeps the main block
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
            kept = (branch_tokens(main, branch, layout, r) if take[r] else main[r:r + 1])[:, :keep[r]]
            ref_cache = reference_cache(ctx, ids, mask, r)
            ctx.extend(ref_cache, kept)
            ref_den = den.forward_block(nxt[r:r + 1], ref_cache, t[r:r + 1])
            ref = ctx.extend(ref_cache, after[r:r + 1])
            torch.testing.assert_close(out[r], ref[0], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(den_out[r], ref_den[0], rtol=1e-4, atol=1e-4)


def test_accept_tree_needs_a_tree_block():
    ctx, _ = towers_for("nemotron:M*-EM*E")
    ids, mask, main, branch, layout = draw()
    with torch.inference_mode():
        _, cache = ctx.prefill(ids, mask, logits="none")
        ctx.extend(cache, main, provisional=True)
        with pytest.raises(RuntimeError, match="tree_forward first"):
            accept_tree(ctx, cache, layout, torch.full((4,), 2), torch.zeros(4, dtype=torch.bool))
