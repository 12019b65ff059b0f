"""Issue 23's draft objectives (`twotower.objectives`): each against a naive per-block loop or a hand-worked
case, and through `DenoiserFineTuning.forward_loss` (blocks passed in training order)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from twotower.objectives import (AcceptanceLK, ExpectedAcceptedLength, FirstErrorFocal, HardLabelCE, ObjectiveSum,
                                 block_ranks, prefix_products)
from twotower.training import DenoiserFineTuning


def _case(seed=0, n_blocks=5, V=7):
    """Random logits / targets for blocks of 1-6 positions, and their block ids (non-decreasing)."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 7, (n_blocks,), generator=g).tolist()
    ids = [b * 3 + 1 for b in range(n_blocks)]  # ids need not be consecutive, only grouped and in order
    blocks = torch.tensor([i for i, n in zip(ids, sizes) for _ in range(n)])
    N = blocks.numel()
    logits = torch.randn(N, V, generator=g) * 2
    target = torch.randint(0, V, (N,), generator=g)
    # Make some positions right, so that blocks have a correct prefix before their first error.
    right = torch.rand(N, generator=g) < 0.5
    target[right] = logits[right].argmax(-1)
    return logits, target, blocks


def _groups(blocks):
    """Naive: lists of the indices of each block, in order."""
    out, last = [], None
    for i, b in enumerate(blocks.tolist()):
        if b != last:
            out.append([])
            last = b
        out[-1].append(i)
    return out


def test_block_ranks_and_prefix_products_match_a_naive_loop():
    logits, target, blocks = _case()
    segment, rank = block_ranks(blocks)
    p = torch.softmax(logits, -1).gather(1, target[:, None]).squeeze(1)
    got = prefix_products(p.log(), blocks)
    for s, idx in enumerate(_groups(blocks)):
        run = 1.0
        for r, i in enumerate(idx):
            run *= float(p[i])
            assert (int(segment[i]), int(rank[i])) == (s, r)
            assert math.isclose(float(got[i]), run, rel_tol=1e-5)
    with pytest.raises(ValueError, match="non-decreasing"):
        block_ranks(torch.tensor([2, 1]))


def test_expected_accepted_length_hand_worked_and_naive():
    # One block of 3 positions with p(target) = 0.5, 0.5, 1.0 (V = 2 logits chosen to give exactly those).
    big = 30.0
    logits = torch.tensor([[0.0, 0.0], [0.0, 0.0], [big, -big]])
    target = torch.tensor([1, 0, 0])
    blocks = torch.zeros(3, dtype=torch.long)
    chain = ExpectedAcceptedLength(ce_weight=0.0).loss(logits, target, blocks=blocks)
    # prefix products 0.5, 0.25, 0.25: expected accepted length 1.0 of 3 positions
    torch.testing.assert_close(chain, torch.tensor([0.5, 0.75, 0.75]))
    assert math.isclose(float(3 - chain.sum()), 1.0, rel_tol=1e-6)
    logits, target, blocks = _case(1)
    ce = F.cross_entropy(logits, target, reduction="none")
    got = ExpectedAcceptedLength(ce_weight=0.3).loss(logits, target, blocks=blocks)
    for idx in _groups(blocks):
        run = 1.0
        for i in idx:
            run *= math.exp(-float(ce[i]))
            assert math.isclose(float(got[i]), 1 - run + 0.3 * float(ce[i]), rel_tol=1e-5, abs_tol=1e-6)
    # The gradient favours early positions: d(sum)/d log p_i = sum_{k >= i} prefix_k.
    lp = torch.tensor([-0.1, -0.2, -0.3], requires_grad=True)
    (1 - prefix_products(lp, torch.zeros(3, dtype=torch.long))).sum().backward()
    pre = torch.tensor([-0.1, -0.3, -0.6]).exp()
    torch.testing.assert_close(-lp.grad, torch.stack([pre.sum(), pre[1:].sum(), pre[2]]))


def test_first_error_focal_weights_only_each_blocks_first_wrong_position():
    logits, target, blocks = _case(2)
    ce = F.cross_entropy(logits, target, reduction="none")
    got = FirstErrorFocal(focal_weight=3.0).loss(logits, target, blocks=blocks)
    seen_first = 0
    for idx in _groups(blocks):
        first = next((i for i in idx if int(logits[i].argmax()) != int(target[i])), None)
        for i in idx:
            w = 4.0 if i == first else 1.0
            assert math.isclose(float(got[i]), w * float(ce[i]), rel_tol=1e-6)
        seen_first += first is not None
    assert seen_first >= 2  # the case really exercises the focal weight
    torch.testing.assert_close(FirstErrorFocal(0.0).loss(logits, target, blocks=blocks), ce)
    with pytest.raises(ValueError, match="blocks="):
        FirstErrorFocal().loss(logits, target)
    with pytest.raises(ValueError, match="focal_weight"):
        FirstErrorFocal(-1.0)


def test_acceptance_lk_is_one_minus_shared_mass_or_the_ar_argmax_probability():
    g = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(4, 6, generator=g) * 2, torch.randn(4, 6, generator=g) * 2
    target = teacher.argmax(-1)
    ce = F.cross_entropy(student, target, reduction="none")
    p, q = torch.softmax(student, -1), torch.softmax(teacher, -1)
    for i in range(4):
        shared = sum(min(float(p[i, v]), float(q[i, v])) for v in range(6))
        tv = 0.5 * sum(abs(float(p[i, v]) - float(q[i, v])) for v in range(6))
        assert math.isclose(1 - shared, tv, rel_tol=1e-5, abs_tol=1e-6)  # 1 - alpha is the total variation
        got = AcceptanceLK(hard_weight=0.25).loss(student, target, teacher)
        assert math.isclose(float(got[i]), 0.75 * (1 - shared) + 0.25 * float(ce[i]), rel_tol=1e-5)
        greedy = AcceptanceLK(hard_weight=0.0, greedy=True).loss(student, target, teacher)
        assert math.isclose(float(greedy[i]), 1 - float(p[i, int(teacher[i].argmax())]), rel_tol=1e-5)
    # Zero where the distributions agree.
    assert float(AcceptanceLK(hard_weight=0.0).loss(teacher + 1.0, target, teacher).abs().max()) < 1e-6
    with pytest.raises(ValueError, match="AR model's logits"):
        AcceptanceLK().loss(student, target, None)


def test_objective_sum_adds_terms_and_asks_for_what_they_need():
    logits, target, blocks = _case(4)
    focal, chain = FirstErrorFocal(2.0), ExpectedAcceptedLength(ce_weight=0.0)
    both = ObjectiveSum([focal, chain], weights=[1.0, 0.5])
    assert both.needs_blocks and not both.needs_teacher
    expected = focal.loss(logits, target, blocks=blocks) + 0.5 * chain.loss(logits, target, blocks=blocks)
    torch.testing.assert_close(both.loss(logits, target, blocks=blocks), expected)
    assert ObjectiveSum([HardLabelCE(), AcceptanceLK()]).needs_teacher
    with pytest.raises(ValueError, match="2 terms but 1 weights"):
        ObjectiveSum([focal, chain], weights=[1.0])


class _Seen(ExpectedAcceptedLength):
    """Keeps the blocks the training step gave."""

    def loss(self, logits, target, teacher=None, *, blocks=None):
        self.blocks = blocks
        return super().loss(logits, target, teacher, blocks=blocks)


def test_training_step_passes_each_masked_positions_block(backbone_dir):
    module = DenoiserFineTuning(str(backbone_dir), block_size=8, shifted=True, objective=_Seen(),
                                loss_weighting="none")
    x = torch.randint(4, 260, (3, 32), generator=torch.Generator().manual_seed(5))
    out = module.forward_loss(x, generator=torch.Generator().manual_seed(0))
    _, _, masked, _ = module._noise(x, torch.Generator().manual_seed(0))
    rows, cols = masked.nonzero(as_tuple=True)
    assert torch.equal(module.objective.blocks, rows * 4 + cols // 8)
    assert torch.isfinite(out["loss"]) and float(out["loss"].detach()) > 0
    out["loss"].backward()
    assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in module.denoiser.parameters())
