"""twotower.evaluation.quality: agreement, distinct-n, continuation NLL and the combined score, on
hand-built inputs and against independent computations."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import randomize_, tiny_config

from twotower.evaluation import agreement, continuation_nll, distinct_n, score_continuations, token_match
from twotower.towers.nemotron_h.context import ContextTower


@pytest.fixture(scope="module")
def ctx():
    return randomize_(ContextTower(tiny_config()), seed=3).eval()


def _ids(seed: int, *shape: int) -> torch.Tensor:
    return torch.randint(4, 64, shape, generator=torch.Generator().manual_seed(seed))


# ---- agreement / token_match --------------------------------------------------------------------


def test_agreement_counts_equal_positions_over_the_first_n():
    gen = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    truth = torch.tensor([[1, 0, 3, 0], [5, 6, 7, 9]])
    assert agreement(gen, truth).tolist() == [0.5, 0.75]
    assert agreement(gen, truth, first=2).tolist() == [0.5, 1.0]
    assert agreement(gen, truth[:, :1]).tolist() == [1.0, 1.0]  # only the positions both have


def test_agreement_refuses_what_it_cannot_score():
    gen = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="at least one position"):
        agreement(gen, gen, first=0)
    with pytest.raises(ValueError, match="1 rows but truth has 2"):
        agreement(gen, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(batch, length\)"):
        agreement(gen[0], gen)


def test_token_match_is_the_fraction_of_equal_tokens():
    a = torch.tensor([[1, 2], [3, 4]])
    assert token_match(a, a) == 1.0
    assert token_match(a, torch.tensor([[1, 0], [0, 0]])) == 0.25
    with pytest.raises(ValueError, match="same shape"):
        token_match(a, a[:, :1])


# ---- distinct_n ---------------------------------------------------------------------------------


def test_distinct_n_by_hand():
    seq = [1, 2, 1, 2, 1]
    assert distinct_n(seq, 1) == 2 / 5
    assert distinct_n(seq, 2) == 2 / 4  # (1,2) (2,1) (1,2) (2,1)
    assert distinct_n(torch.tensor(seq), 4) == 1.0  # (1,2,1,2) (2,1,2,1)
    assert distinct_n([7] * 6, 4) == 1 / 3
    assert math.isnan(distinct_n(seq, 6))  # no 6-gram: undefined, not perfect


def test_distinct_n_refuses_a_batch_and_a_bad_n():
    with pytest.raises(ValueError, match="one sequence"):
        distinct_n(torch.ones(2, 3, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        distinct_n([1, 2], 0)


# ---- continuation_nll ---------------------------------------------------------------------------


def test_continuation_nll_equals_a_teacher_forced_log_softmax_gather(ctx):
    """Independent reference: one plain forward over prompt + continuation, the log-probability of
    each continuation token read at the position before it, averaged per row."""
    prompts, cont = _ids(0, 3, 5), _ids(1, 3, 4)
    got = continuation_nll(ctx, prompts, cont, batch_size=2)  # two chunks: 2 rows + 1 row
    assert got.shape == (3,) and got.dtype == torch.float64
    with torch.no_grad():
        logp = torch.log_softmax(ctx(torch.cat([prompts, cont], 1)).double(), dim=-1)  # (3, 9, V)
    expected = torch.stack([
        -torch.stack([logp[r, 5 + j - 1, cont[r, j]] for j in range(4)]).mean() for r in range(3)])
    # float32 forwards of 2 + 1 rows vs all 3 at once round differently in the last bits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_continuation_nll_equals_a_prefix_by_prefix_hand_computation(ctx):
    """Each token scored by a separate forward over only the tokens before it (no chunked causal forward)."""
    prompts, cont = _ids(2, 2, 5), _ids(3, 2, 3)
    got = continuation_nll(ctx, prompts, cont)
    full = torch.cat([prompts, cont], 1)
    with torch.no_grad():
        for r in range(2):
            nll = [-ctx(full[r: r + 1, : 5 + j])[0, -1].double().log_softmax(-1)[cont[r, j]] for j in range(3)]
            assert got[r].item() == pytest.approx(torch.stack(nll).mean().item(), abs=1e-5)


def test_continuation_nll_with_left_padded_prompts_matches_the_unpadded_rows(ctx):
    prompts, cont = _ids(4, 2, 6), _ids(5, 2, 3)
    padded = prompts.clone()
    padded[1, :2] = 0  # row 1 is a 4-token prompt, left-padded to 6
    mask = torch.ones_like(padded)
    mask[1, :2] = 0
    got = continuation_nll(ctx, padded, cont, attention_mask=mask)
    alone = continuation_nll(ctx, prompts[1:, 2:], cont[1:])
    assert got[0].item() == pytest.approx(continuation_nll(ctx, prompts[:1], cont[:1]).item(), abs=1e-5)
    assert got[1].item() == pytest.approx(alone.item(), abs=1e-5)


def test_continuation_nll_refuses_mismatched_batches(ctx):
    with pytest.raises(ValueError, match="same number of rows"):
        continuation_nll(ctx, _ids(0, 2, 3), _ids(1, 3, 2))
    with pytest.raises(ValueError, match="attention_mask has shape"):
        continuation_nll(ctx, _ids(0, 2, 3), _ids(1, 2, 2), attention_mask=torch.ones(2, 4))


# ---- score_continuations ------------------------------------------------------------------------


def test_score_continuations_combines_the_measures(ctx):
    prompts, gen = _ids(6, 2, 4), _ids(7, 2, 6)
    truth = gen.clone()
    truth[0, :3] = 1  # row 0 agrees on 3 of 6 positions, row 1 on all
    s = score_continuations(ctx, prompts, gen, truth, reference=gen)
    assert s["agreement_per_prompt"] == [0.5, 1.0] and s["agreement"] == 0.75
    assert s["nll_per_prompt"] == pytest.approx(continuation_nll(ctx, prompts, gen).tolist())
    assert s["nll"] == pytest.approx(sum(s["nll_per_prompt"]) / 2)
    assert s["distinct_2"] == pytest.approx((distinct_n(gen[0], 2) + distinct_n(gen[1], 2)) / 2)
    assert s["match_reference"] == 1.0
    assert "match_reference" not in score_continuations(ctx, prompts, gen, truth)
