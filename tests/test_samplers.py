"""Tests for twotower.samplers: commit policies on hand-built confidences and logits.

Concrete cases assert the exact boolean commit; contract tests run every sampler
(including a user-defined subclass) through simulated blocks.
"""

from __future__ import annotations

import math

import pytest
import torch

from twotower.samplers import (
    ConfidenceThreshold,
    EntropyBounded,
    FrontierRun,
    MarginThreshold,
    MockAR,
    Sampler,
    TopKCommit,
    commit_top_n,
)


def B(*rows):
    """Bool (B, S) tensor from rows of 0/1."""
    return torch.tensor(rows, dtype=torch.bool)


def call(sampler, confidence, masked, *, step=0, steps=8, logits=None):
    confidence = torch.as_tensor(confidence, dtype=torch.float32)
    if confidence.dim() == 1:
        confidence = confidence[None]
    if masked.dim() == 1:
        masked = masked[None]
    candidates = torch.zeros_like(confidence, dtype=torch.long)
    return sampler(
        confidence, candidates, masked, step=step, steps_per_block=steps, logits=logits
    )


def all_masked(s, b=1):
    return torch.ones(b, s, dtype=torch.bool)


class CommitAboveHalfOnlyEven(Sampler):
    """A user-defined policy: confident positions at even indices only.

    Often selects nothing, and sometimes returns unmasked positions: it leans on the
    base class's contract (trim to masked, at least one, finish at the last step).
    """

    def select(self, confidence, candidates, masked, *, step, steps_per_block, logits=None):
        even = torch.arange(confidence.shape[-1]) % 2 == 0
        return (confidence > 0.5) & even


ALL_SAMPLERS = [
    pytest.param(ConfidenceThreshold(), id="threshold-0.8"),
    pytest.param(ConfidenceThreshold(0.3), id="threshold-0.3"),
    pytest.param(ConfidenceThreshold(1.0), id="threshold-1.0"),
    pytest.param(TopKCommit(1), id="topk-1"),
    pytest.param(TopKCommit(3), id="topk-3"),
    pytest.param(MockAR(), id="mock-ar"),
    pytest.param(MarginThreshold(0.2), id="margin-0.2"),
    pytest.param(EntropyBounded(0.5), id="entropy-0.5"),
    pytest.param(FrontierRun(0.7), id="frontier-0.7"),
    pytest.param(FrontierRun(1.0), id="frontier-1.0"),
    pytest.param(CommitAboveHalfOnlyEven(), id="user-subclass"),
]


def random_block(b, s, v, generator):
    """Logits (B, S, V), argmax candidates and their softmax probability."""
    # Random temperatures per position give a spread from flat to peaked.
    scale = torch.rand(b, s, 1, generator=generator) * 8
    logits = torch.randn(b, s, v, generator=generator) * scale
    probs = logits.softmax(-1)
    confidence, candidates = probs.max(-1)
    return logits, candidates, confidence


# --------------------------------------------------------------------- commit_top_n


def test_commit_top_n_picks_most_confident_masked():
    conf = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.99], [0.3, 0.2, 0.8, 0.6, 0.4]])
    masked = B([1, 1, 1, 1, 0], [1, 1, 1, 1, 1])
    got = commit_top_n(conf, masked, torch.tensor([2, 3]))
    # Row 0: 0.99 is not masked, so 0.9 and 0.7. Row 1: 0.8, 0.6, 0.4.
    assert torch.equal(got, B([0, 1, 0, 1, 0], [0, 0, 1, 1, 1]))


def test_commit_top_n_ties_go_to_lower_index():
    conf = torch.tensor([[0.5, 0.7, 0.5, 0.7, 0.5]])
    got = commit_top_n(conf, all_masked(5), torch.tensor([3]))
    assert torch.equal(got, B([1, 1, 0, 1, 0]))


def test_commit_top_n_caps_at_masked_and_empty_rows_commit_nothing():
    conf = torch.tensor([[0.1, 0.2, 0.3], [0.9, 0.8, 0.7], [0.5, 0.5, 0.5]])
    masked = B([1, 0, 1], [0, 0, 0], [1, 1, 1])
    got = commit_top_n(conf, masked, torch.tensor([10, 2, 0]))
    assert torch.equal(got, B([1, 0, 1], [0, 0, 0], [0, 0, 0]))


def test_commit_top_n_masked_minus_inf_beats_unmasked():
    # An unmasked position must never be picked, even over a -inf masked score.
    conf = torch.tensor([[float("-inf"), 0.9, float("nan")]])
    got = commit_top_n(conf, B([1, 0, 1]), torch.tensor([1]))
    assert torch.equal(got, B([1, 0, 0]))
    got = commit_top_n(conf, B([1, 0, 1]), torch.tensor([2]))
    assert torch.equal(got, B([1, 0, 1]))


def test_commit_top_n_int_n_broadcasts():
    conf = torch.tensor([[0.1, 0.9, 0.5], [0.6, 0.2, 0.3]])
    got = commit_top_n(conf, all_masked(3, 2), 1)
    assert torch.equal(got, B([0, 1, 0], [1, 0, 0]))


# --------------------------------------------------------------- ConfidenceThreshold


def test_threshold_term_binds():
    # m = 8, 8 steps left: pace ceil(8/8) = 1; three positions exceed 0.8.
    conf = [0.95, 0.1, 0.9, 0.3, 0.2, 0.85, 0.5, 0.05]
    got = call(ConfidenceThreshold(0.8), conf, all_masked(8), step=0, steps=8)
    assert torch.equal(got, B([1, 0, 1, 0, 0, 1, 0, 0]))


def test_threshold_at_least_one_term_binds():
    # Nothing exceeds the threshold; pace is 1: the single most confident commits.
    conf = [0.2, 0.1, 0.7, 0.3, 0.2, 0.6, 0.5, 0.05]
    got = call(ConfidenceThreshold(0.8), conf, all_masked(8), step=0, steps=16)
    assert torch.equal(got, B([0, 0, 1, 0, 0, 0, 0, 0]))


def test_threshold_ceil_term_binds():
    # Step 6 of 8: two steps left for 7 masks, so ceil(7/2) = 4 must commit even
    # though only one position exceeds the threshold.
    conf = [0.95, 0.1, 0.7, 0.3, 0.2, 0.6, 0.5, 0.99]
    masked = B([1, 1, 1, 1, 1, 1, 1, 0])
    got = call(ConfidenceThreshold(0.8), conf, masked, step=6, steps=8)
    assert torch.equal(got, B([1, 0, 1, 0, 0, 1, 1, 0]))


def test_threshold_is_strict_and_counts_masked_only():
    # 0.5 is not > 0.5; the unmasked 0.9s neither count nor commit.
    conf = [0.5, 0.9, 0.6, 0.9, 0.7]
    masked = B([1, 0, 1, 0, 1])
    got = call(ConfidenceThreshold(0.5), conf, masked, step=0, steps=100)
    assert torch.equal(got, B([0, 0, 1, 0, 1]))


def test_threshold_rows_use_their_own_terms():
    conf = torch.tensor(
        [
            [0.9, 0.9, 0.9, 0.9],  # threshold term: all four
            [0.1, 0.4, 0.3, 0.2],  # at-least-one: index 1
            [0.1, 0.4, 0.3, 0.2],  # part-way done: only masked 0 and 2 compete
        ]
    )
    masked = B([1, 1, 1, 1], [1, 1, 1, 1], [1, 0, 1, 0])
    got = call(ConfidenceThreshold(0.8), conf, masked, step=0, steps=4)
    assert torch.equal(got, B([1, 1, 1, 1], [0, 1, 0, 0], [0, 0, 1, 0]))


# ----------------------------------------------------------------- TopK, MockAR, ...


def test_topk_commits_k_most_confident():
    conf = [0.3, 0.8, 0.1, 0.9, 0.5, 0.85]
    masked = B([1, 1, 1, 0, 1, 1])
    got = call(TopKCommit(2), conf, masked, step=0, steps=4)
    assert torch.equal(got, B([0, 1, 0, 0, 0, 1]))
    # Capped at the number of masked positions.
    got = call(TopKCommit(5), conf, B([0, 0, 1, 0, 1, 0]), step=0, steps=4)
    assert torch.equal(got, B([0, 0, 1, 0, 1, 0]))


def test_topk_rest_forced_at_last_step():
    conf = [0.3, 0.8, 0.1, 0.9]
    got = call(TopKCommit(1), conf, all_masked(4), step=1, steps=2)
    assert torch.equal(got, B([1, 1, 1, 1]))


def test_mock_ar_commits_left_to_right_ignoring_confidence():
    s = 6
    conf = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.99]])
    masked = all_masked(s)
    order = []
    for step in range(s):
        commit = call(MockAR(), conf, masked, step=step, steps=s)
        assert commit.sum() == 1
        order.append(int(commit[0].nonzero()))
        masked = masked & ~commit
    assert order == list(range(s))
    assert not masked.any()


def test_mock_ar_leftmost_per_row():
    masked = B([0, 0, 1, 1], [1, 0, 1, 0], [0, 0, 0, 0])
    got = call(MockAR(), torch.rand(3, 4), masked, step=0, steps=4)
    assert torch.equal(got, B([0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]))


def _logits_from_probs(probs):
    """(B, S, V) logits whose softmax is ``probs``."""
    return torch.tensor(probs, dtype=torch.float32).log()


def test_margin_threshold_uses_top1_minus_top2():
    # Margins: 0.9-0.05=0.85, 0.45-0.45=0.0, 0.7-0.2=0.5, 0.6-0.3=0.3
    probs = [[[0.9, 0.05, 0.05], [0.45, 0.45, 0.1], [0.7, 0.2, 0.1], [0.6, 0.3, 0.1]]]
    logits = _logits_from_probs(probs)
    conf = logits.softmax(-1).max(-1).values
    got = call(MarginThreshold(0.4), conf, all_masked(4), logits=logits)
    assert torch.equal(got, B([1, 0, 1, 0]))
    # Nothing over 0.9: the largest margin (position 0) still commits.
    got = call(MarginThreshold(0.9), conf, all_masked(4), logits=logits)
    assert torch.equal(got, B([1, 0, 0, 0]))
    # An already-committed position over the margin neither commits nor counts.
    got = call(MarginThreshold(0.4), conf, B([0, 1, 1, 1]), logits=logits)
    assert torch.equal(got, B([0, 0, 1, 0]))


def test_margin_ambiguous_top_two_is_not_confident():
    # Position 1 has the higher top-1 probability but a near tie with the runner-up.
    probs = [[[0.40, 0.05, 0.55], [0.50, 0.48, 0.02]]]
    logits = _logits_from_probs(probs)
    conf = logits.softmax(-1).max(-1).values
    assert conf[0, 0] > conf[0, 1]  # higher confidence...
    got = call(MarginThreshold(0.9), conf, all_masked(2), logits=logits)
    assert torch.equal(got, B([1, 0]))  # ...but position 0 wins on margin (0.15 vs 0.02)


def test_margin_without_logits_uses_conservative_bound():
    # 2p - 1: 0.9 -> 0.8, 0.7 -> 0.4, 0.6 -> 0.2
    got = call(MarginThreshold(0.3), [0.9, 0.7, 0.6], all_masked(3))
    assert torch.equal(got, B([1, 1, 0]))


def test_entropy_bounded_takes_longest_low_entropy_prefix():
    probs = [
        [
            [0.98, 0.01, 0.01],  # H ~ 0.112
            [1 / 3, 1 / 3, 1 / 3],  # H = log 3 ~ 1.099
            [0.9, 0.05, 0.05],  # H ~ 0.394
            [0.999, 0.0005, 0.0005],  # H ~ 0.0086
        ]
    ]
    logits = _logits_from_probs(probs)
    h = torch.special.entr(torch.tensor(probs)).sum(-1)[0]
    assert h[3] < h[0] < h[2] < h[1]
    conf = logits.softmax(-1).max(-1).values
    # Budget 0.2: 0.0086 + 0.112 fits, adding 0.394 does not.
    got = call(EntropyBounded(0.2), conf, all_masked(4), logits=logits)
    assert torch.equal(got, B([1, 0, 0, 1]))
    # Budget 0.6: the three low-entropy positions fit.
    got = call(EntropyBounded(0.6), conf, all_masked(4), logits=logits)
    assert torch.equal(got, B([1, 0, 1, 1]))
    # Budget 0: still the single lowest-entropy masked position.
    got = call(EntropyBounded(0.0), conf, B([1, 1, 1, 0]), logits=logits)
    assert torch.equal(got, B([1, 0, 0, 0]))
    # Already-committed positions spend no budget and add no commits: with position 3
    # (H ~ 0.009) unmasked, 0.2 only covers position 0 (adding 0.394 would exceed it).
    got = call(EntropyBounded(0.2), conf, B([1, 1, 1, 0]), logits=logits)
    assert torch.equal(got, B([1, 0, 0, 0]))


def test_entropy_ignores_excluded_mask_logit():
    # A -inf logit (the excluded [MASK]) must contribute zero entropy, not NaN.
    logits = torch.tensor([[[0.0, 0.0, float("-inf")], [5.0, -5.0, float("-inf")]]])
    conf = logits.softmax(-1).max(-1).values
    got = call(EntropyBounded(0.1), conf, all_masked(2), logits=logits)
    assert torch.equal(got, B([0, 1]))


def test_frontier_run_grows_while_the_product_stays_above():
    # 0.9, 0.9 * 0.9 = 0.81 > 0.7, then 0.81 * 0.5 = 0.405: a run of two, although the
    # last position (0.99) is more confident than either.
    got = call(FrontierRun(0.7), [0.9, 0.9, 0.5, 0.99], all_masked(4), step=0, steps=8)
    assert torch.equal(got, B([1, 1, 0, 0]))
    # Every single position above 0.7, but not their product: 0.8 * 0.8 = 0.64.
    got = call(FrontierRun(0.7), [0.8, 0.8, 0.8, 0.8], all_masked(4), step=0, steps=8)
    assert torch.equal(got, B([1, 0, 0, 0]))


def test_frontier_run_is_strict_and_always_commits_the_frontier():
    # The leftmost masked position commits even when unsure, and nothing to its right then.
    got = call(FrontierRun(0.5), [0.1, 0.99, 0.99, 0.99], all_masked(4), step=0, steps=8)
    assert torch.equal(got, B([1, 0, 0, 0]))
    # 0.5 is not > 0.5: the run stops before the second position.
    got = call(FrontierRun(0.5), [1.0, 0.5, 1.0, 1.0], all_masked(4), step=0, steps=8)
    assert torch.equal(got, B([1, 0, 0, 0]))
    # min_joint = 1 never grows a run: one token per step, left to right (like MockAR).
    got = call(FrontierRun(1.0), [1.0, 1.0, 1.0, 1.0], all_masked(4), step=0, steps=8)
    assert torch.equal(got, B([1, 0, 0, 0]))


def test_frontier_run_starts_at_the_leftmost_mask_and_skips_committed_positions():
    # Position 0 is committed (the context tower's token in a shifted model), position 2 too:
    # neither ends the run nor counts; the run is 1, 3 (0.9 * 0.9 = 0.81 > 0.75), then 4 stops it
    # (0.81 * 0.9 = 0.729). Their own confidences are ignored.
    conf = [0.0, 0.9, 0.0, 0.9, 0.9, 0.9]
    masked = B([0, 1, 0, 1, 1, 1])
    got = call(FrontierRun(0.75), conf, masked, step=0, steps=8)
    assert torch.equal(got, B([0, 1, 0, 1, 0, 0]))


def test_frontier_run_nan_and_zero_confidence_end_the_run():
    got = call(FrontierRun(0.1), [0.9, math.nan, 0.9], all_masked(3), step=0, steps=8)
    assert torch.equal(got, B([1, 0, 0]))
    got = call(FrontierRun(0.1), [0.9, 0.0, 0.9], all_masked(3), step=0, steps=8)
    assert torch.equal(got, B([1, 0, 0]))


def test_frontier_run_pace_term_binds():
    # 6 masked, 2 steps left: ceil(6 / 2) = 3 leftmost masked positions, whatever the confidence.
    masked = B([1, 0, 1, 1, 1, 1, 1, 0])
    got = call(FrontierRun(0.9), [0.1] * 8, masked, step=2, steps=4)
    assert torch.equal(got, B([1, 0, 1, 1, 0, 0, 0, 0]))


def test_frontier_run_rows_use_their_own_runs():
    conf = torch.tensor([[0.95, 0.95, 0.95, 0.1], [0.2, 0.95, 0.95, 0.95], [0.99, 0.99, 0.99, 0.99]])
    masked = B([1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 1, 1])
    got = call(FrontierRun(0.8), conf, masked, step=0, steps=8)
    # Row 0: 0.95^3 = 0.857 > 0.8, then 0.1 ends it. Row 1: the frontier only. Row 2: both left.
    assert torch.equal(got, B([1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 1, 1]))


def test_frontier_run_matches_a_naive_loop():
    """The vectorised run equals a plain per-row loop over positions (random cases)."""
    g = torch.Generator().manual_seed(11)
    sampler = FrontierRun(0.6)
    for _ in range(20):
        b, s, steps = 4, 10, 6
        step = int(torch.randint(0, steps - 1, (1,), generator=g))
        confidence = torch.rand(b, s, generator=g) ** 0.3
        masked = torch.rand(b, s, generator=g) < 0.7
        got = call(sampler, confidence, masked, step=step, steps=steps)
        for r in range(b):
            idx = [i for i in range(s) if masked[r, i]]
            joint, run = 1.0, 0
            for i in idx:
                joint *= float(confidence[r, i])
                if joint <= 0.6:
                    break
                run += 1
            pace = -(-len(idx) // (steps - step))
            n = min(len(idx), max(run, 1, pace))
            want = torch.zeros(s, dtype=torch.bool)
            want[idx[:n]] = True
            if not idx:
                want[:] = False
            assert torch.equal(got[r], want), (r, confidence[r], masked[r])


# ------------------------------------------------------------ the contract, for all


@pytest.mark.parametrize("sampler", ALL_SAMPLERS)
@pytest.mark.parametrize("s, steps", [(16, 16), (16, 4), (16, 1), (8, 20), (5, 3)])
def test_block_always_finishes_within_budget(sampler, s, steps):
    g = torch.Generator().manual_seed(1234 + s * 31 + steps)
    b = 6
    for trial in range(3):
        masked = torch.ones(b, s, dtype=torch.bool)
        if trial == 2:
            # Some rows start part-way done, one row is already finished.
            masked = torch.rand(b, s, generator=g) < 0.6
            masked[0] = False
        for step in range(steps):
            if not masked.any():
                break
            logits, candidates, confidence = random_block(b, s, 11, g)
            commit = sampler(
                confidence, candidates, masked, step=step, steps_per_block=steps, logits=logits
            )
            assert commit.dtype == torch.bool and commit.shape == (b, s)
            assert not (commit & ~masked).any(), "committed a position that was not masked"
            has_masks = masked.any(-1)
            assert torch.equal(commit.any(-1), has_masks), "a row with masks committed none"
            masked = masked & ~commit
        assert not masked.any(), f"block not finished within {steps} steps"


@pytest.mark.parametrize("sampler", ALL_SAMPLERS)
def test_batch_rows_are_independent(sampler):
    g = torch.Generator().manual_seed(7)
    b, s, steps = 5, 12, 6
    logits, candidates, confidence = random_block(b, s, 9, g)
    masked = torch.rand(b, s, generator=g) < 0.7
    masked[2] = False
    for step in (0, 3, steps - 1):
        batch = sampler(
            confidence, candidates, masked, step=step, steps_per_block=steps, logits=logits
        )
        for i in range(b):
            row = sampler(
                confidence[i : i + 1],
                candidates[i : i + 1],
                masked[i : i + 1],
                step=step,
                steps_per_block=steps,
                logits=logits[i : i + 1],
            )
            assert torch.equal(batch[i : i + 1], row), f"row {i} depends on other rows"


@pytest.mark.parametrize("sampler", ALL_SAMPLERS)
def test_last_step_commits_every_mask(sampler):
    g = torch.Generator().manual_seed(3)
    logits, candidates, confidence = random_block(3, 8, 5, g)
    masked = B([1, 1, 1, 1, 1, 1, 1, 1], [0, 1, 0, 1, 0, 0, 0, 0], [0] * 8)
    got = sampler(confidence, candidates, masked, step=3, steps_per_block=4, logits=logits)
    assert torch.equal(got, masked)


def test_base_trims_to_masked_and_adds_fallback():
    sampler = CommitAboveHalfOnlyEven()
    conf = torch.tensor([[0.9, 0.9, 0.9, 0.2], [0.1, 0.3, 0.2, 0.4]])
    masked = B([0, 1, 1, 1], [1, 1, 1, 1])
    got = call(sampler, conf, masked, step=0, steps=4)
    # Row 0: select picks 0 (unmasked, trimmed) and 2. Row 1: selects nothing, so the
    # most confident masked position (3) commits.
    assert torch.equal(got, B([0, 0, 1, 0], [0, 0, 0, 1]))


def test_user_subclass_must_implement_select():
    class NoSelect(Sampler):
        pass

    with pytest.raises(TypeError):
        NoSelect()


def test_bad_select_output_is_rejected():
    class ReturnsLong(Sampler):
        def select(self, confidence, candidates, masked, *, step, steps_per_block, logits=None):
            return masked.long()

    class WrongShape(Sampler):
        def select(self, confidence, candidates, masked, *, step, steps_per_block, logits=None):
            return masked[:, :1]

    with pytest.raises(TypeError, match="bool"):
        call(ReturnsLong(), [0.5, 0.5], all_masked(2))
    with pytest.raises(ValueError, match="shape"):
        call(WrongShape(), [0.5, 0.5], all_masked(2))


def test_bad_call_arguments_raise():
    s = ConfidenceThreshold()
    conf, masked = torch.rand(2, 4), all_masked(4, 2)
    cand = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="step"):
        s(conf, cand, masked, step=4, steps_per_block=4)
    with pytest.raises(ValueError, match="step"):
        s(conf, cand, masked, step=-1, steps_per_block=4)
    with pytest.raises(ValueError, match="steps_per_block"):
        s(conf, cand, masked, step=0, steps_per_block=0)
    with pytest.raises(ValueError, match="confidence"):
        s(conf[:, :3], cand, masked, step=0, steps_per_block=4)
    with pytest.raises(ValueError, match="masked"):
        s(conf, cand, masked.long(), step=0, steps_per_block=4)
    with pytest.raises(ValueError, match="logits"):
        s(conf, cand, masked, step=0, steps_per_block=4, logits=torch.zeros(2, 3, 7))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: ConfidenceThreshold(0.0), "threshold"),
        (lambda: ConfidenceThreshold(1.5), "threshold"),
        (lambda: ConfidenceThreshold(-0.2), "threshold"),
        (lambda: ConfidenceThreshold(math.nan), "threshold"),
        (lambda: ConfidenceThreshold("0.8"), "threshold"),
        (lambda: TopKCommit(0), "k"),
        (lambda: TopKCommit(-3), "k"),
        (lambda: TopKCommit(2.5), "k"),
        (lambda: MarginThreshold(1.0), "margin"),
        (lambda: MarginThreshold(-0.1), "margin"),
        (lambda: MarginThreshold(math.nan), "margin"),
        (lambda: EntropyBounded(-1.0), "max_entropy"),
        (lambda: EntropyBounded(math.inf), "max_entropy"),
        (lambda: EntropyBounded(math.nan), "max_entropy"),
        (lambda: FrontierRun(0.0), "min_joint"),
        (lambda: FrontierRun(1.5), "min_joint"),
        (lambda: FrontierRun(math.nan), "min_joint"),
        (lambda: FrontierRun(True), "min_joint"),
    ],
)
def test_bad_constructor_values_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_valid_constructor_edges_accepted():
    assert ConfidenceThreshold(1.0).threshold == 1.0
    assert ConfidenceThreshold(1).threshold == 1.0
    assert TopKCommit(1).k == 1
    assert MarginThreshold(0.0).margin == 0.0
    assert EntropyBounded(0).max_entropy == 0.0
    assert FrontierRun(1).min_joint == 1.0
