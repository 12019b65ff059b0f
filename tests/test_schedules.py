"""Tests for twotower.schedules: schedules and loss weights, time samplers, mask_blocks."""

from __future__ import annotations

import math

import pytest
import torch

from twotower.schedules import (
    AntitheticTime,
    CosineSchedule,
    LinearSchedule,
    LogLinearSchedule,
    NoiseSchedule,
    StratifiedTime,
    TimeSampler,
    UniformTime,
    mask_blocks,
)

SCHEDULES = [
    pytest.param(LinearSchedule(), id="linear"),
    pytest.param(CosineSchedule(), id="cosine"),
    pytest.param(LogLinearSchedule(1e-3), id="loglinear"),
]
TIME_SAMPLERS = [
    pytest.param(UniformTime, id="uniform"),
    pytest.param(StratifiedTime, id="stratified"),
    pytest.param(AntitheticTime, id="antithetic"),
]

# ------------------------------------------------------------------------ schedules


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule_endpoints_and_monotone(schedule):
    assert schedule.alpha(torch.tensor(0.0)).item() == pytest.approx(1.0)
    end = 1e-3 if isinstance(schedule, LogLinearSchedule) else 0.0
    assert schedule.alpha(torch.tensor(1.0)).item() == pytest.approx(end, abs=1e-7)
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert (schedule.alpha(t).diff() < 0).all()
    torch.testing.assert_close(schedule.mask_prob(t), 1 - schedule.alpha(t))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule_shape_dtype_preserving(schedule):
    t = torch.rand(3, 5) * 0.9 + 0.05
    for fn in (schedule.alpha, schedule.alpha_prime, schedule.mask_prob, schedule.loss_weight):
        out = fn(t)
        assert out.shape == (3, 5) and out.dtype == torch.float32
        assert fn(t.double()).dtype == torch.float64
    assert isinstance(schedule.loss_weight(0.5), torch.Tensor)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_alpha_prime_matches_autograd(schedule):
    t = torch.linspace(0.01, 0.99, 50, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(schedule.alpha(t).sum(), t)
    torch.testing.assert_close(schedule.alpha_prime(t.detach()), grad)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_loss_weight_matches_finite_difference(schedule):
    # w(t) = -alpha'(t) / (1 - alpha(t)), alpha' from central differences.
    t = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)
    h = 1e-6
    d_alpha = (schedule.alpha(t + h) - schedule.alpha(t - h)) / (2 * h)
    expected = -d_alpha / (1 - schedule.alpha(t))
    torch.testing.assert_close(schedule.loss_weight(t), expected, rtol=1e-6, atol=0)


def test_known_closed_forms():
    t = torch.tensor([0.1, 0.5, 1.0], dtype=torch.float64)
    torch.testing.assert_close(LinearSchedule().loss_weight(t), 1 / t)
    torch.testing.assert_close(LinearSchedule().mask_prob(t), t)
    torch.testing.assert_close(CosineSchedule().mask_prob(t), 1 - torch.cos(math.pi * t / 2))
    torch.testing.assert_close(LogLinearSchedule(0.01).loss_weight(t), 1 / t)
    torch.testing.assert_close(LogLinearSchedule(0.01).mask_prob(t), 0.99 * t)
    torch.testing.assert_close(
        LogLinearSchedule(0.01).sigma(t), -torch.log(LogLinearSchedule(0.01).alpha(t))
    )
    # At t = 1 the cosine weight is (pi/2) * 1 / (1 - 0).
    assert CosineSchedule().loss_weight(1.0).item() == pytest.approx(math.pi / 2)


def test_cosine_weight_stable_for_small_t():
    # The naive quotient loses all precision in float32 here; the closed form keeps
    # the asymptote w(t) ~ 2 / t.
    t = torch.tensor([1e-6, 1e-5], dtype=torch.float32)
    w = CosineSchedule().loss_weight(t)
    torch.testing.assert_close(w, 2 / t, rtol=1e-4, atol=0)
    torch.testing.assert_close(
        CosineSchedule().mask_prob(t), (math.pi * t) ** 2 / 8, rtol=1e-4, atol=0
    )


def test_custom_schedule_gets_default_weight_and_mask_prob():
    class Quadratic(NoiseSchedule):
        def alpha(self, t):
            return 1 - torch.as_tensor(t) ** 2

        def alpha_prime(self, t):
            return -2 * torch.as_tensor(t)

    t = torch.tensor([0.25, 0.5])
    torch.testing.assert_close(Quadratic().loss_weight(t), 2 / t)  # 2t / t^2
    torch.testing.assert_close(Quadratic().mask_prob(t), t**2)


@pytest.mark.parametrize("eps", [-0.1, 1.0, math.nan, "0.1"])
def test_loglinear_bad_eps(eps):
    with pytest.raises(ValueError, match="eps"):
        LogLinearSchedule(eps)


# -------------------------------------------------------------------- time samplers


@pytest.mark.parametrize("cls", TIME_SAMPLERS)
@pytest.mark.parametrize("shape", [(8, 4), (7,), (3, 1, 5), (1,), (0, 3)])
def test_time_sampler_shape_and_range(cls, shape):
    eps = 0.05
    t = cls(eps).sample(shape, generator=torch.Generator().manual_seed(0))
    assert t.shape == shape and t.dtype == torch.float32
    assert ((t >= eps) & (t < 1)).all()


@pytest.mark.parametrize("cls", TIME_SAMPLERS)
def test_time_sampler_reproducible(cls):
    sampler = cls()
    a = sampler.sample((16, 4), generator=torch.Generator().manual_seed(42))
    b = sampler.sample((16, 4), generator=torch.Generator().manual_seed(42))
    c = sampler.sample((16, 4), generator=torch.Generator().manual_seed(43))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("cls", TIME_SAMPLERS)
def test_time_sampler_marginal_is_uniform(cls):
    eps = 1e-3
    t = cls(eps).sample((20000,), generator=torch.Generator().manual_seed(5))
    u = (t.double() - eps) / (1 - eps)
    assert u.mean().item() == pytest.approx(0.5, abs=0.01)
    assert u.var().item() == pytest.approx(1 / 12, abs=0.005)
    # Ten equal bins each hold about a tenth.
    counts = torch.histc(u, bins=10, min=0, max=1) / u.numel()
    assert (counts - 0.1).abs().max().item() < 0.01


def test_time_sampler_extreme_unit_values_stay_below_one():
    class AlmostOne(TimeSampler):
        def _unit(self, n, *, generator, device):
            return torch.full((n,), 1 - 2.0**-53, dtype=torch.float64)

    t = AlmostOne(0.0).sample((4,))
    assert (t < 1).all()


def test_stratified_one_per_stratum():
    n, eps = 64, 0.01
    t = StratifiedTime(eps).sample((8, 8), generator=torch.Generator().manual_seed(9))
    u = (t.double().flatten() - eps) / (1 - eps)
    strata = torch.floor(u * n).long()
    assert torch.equal(strata.sort().values, torch.arange(n))
    # ... and the strata are shuffled across the batch, not laid out in order.
    assert not torch.equal(strata, torch.arange(n))


def test_stratified_batch_mean_has_low_variance():
    # The point of stratification: the batch mean of t barely moves between batches.
    g = torch.Generator().manual_seed(0)
    strat = torch.stack([StratifiedTime().sample((32,), generator=g).mean() for _ in range(200)])
    unif = torch.stack([UniformTime().sample((32,), generator=g).mean() for _ in range(200)])
    assert strat.std() < 0.2 * unif.std()


@pytest.mark.parametrize("shape", [(8, 3), (5, 3), (7,)])
def test_antithetic_pairs_sum_to_one(shape):
    eps = 0.02
    t = AntitheticTime(eps).sample(shape, generator=torch.Generator().manual_seed(1))
    flat = t.flatten().double()
    n = flat.numel()
    h = (n + 1) // 2
    # In [eps, 1) coordinates, u + (1 - u) = 1 becomes t + t' = 1 + eps.
    torch.testing.assert_close(
        flat[: n - h] + flat[h:], torch.full((n - h,), 1 + eps, dtype=torch.float64),
        rtol=0, atol=1e-6,
    )


@pytest.mark.parametrize("cls", TIME_SAMPLERS)
@pytest.mark.parametrize("eps", [-1e-3, 1.0, math.nan, True])
def test_time_sampler_bad_eps(cls, eps):
    with pytest.raises(ValueError, match="eps"):
        cls(eps)


# --------------------------------------------------------------------- mask_blocks

MASK = 3


def _tokens(b, l, g):
    # Token ids >= 4 so no clean token equals the mask id.
    return torch.randint(4, 100, (b, l), generator=g)


@pytest.mark.parametrize("exact", [False, True])
def test_mask_blocks_shapes_and_values(exact):
    g = torch.Generator().manual_seed(0)
    x = _tokens(4, 24, g)
    t = torch.rand(4, 3, generator=g)
    noisy, masked, t_actual = mask_blocks(
        x, 8, t, MASK, schedule=LinearSchedule(), exact=exact, generator=g
    )
    assert noisy.shape == (4, 24) and noisy.dtype == x.dtype
    assert masked.shape == (4, 24) and masked.dtype == torch.bool
    assert t_actual.shape == (4, 3) and t_actual.dtype == torch.float32
    assert torch.equal(noisy == MASK, masked)
    assert torch.equal(noisy[~masked], x[~masked])
    # t_actual is the measured fraction of each block.
    torch.testing.assert_close(t_actual, masked.view(4, 3, 8).float().mean(-1))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_mask_blocks_rates_match_probabilities(schedule):
    g = torch.Generator().manual_seed(1)
    b, s = 512, 16
    t_cols = torch.tensor([0.05, 0.3, 0.6, 0.95])
    x = _tokens(b, 4 * s, g)
    t = t_cols.expand(b, 4)
    _, masked, t_actual = mask_blocks(x, s, t, MASK, schedule=schedule, generator=g)
    p = schedule.mask_prob(t_cols)
    # The at-least-one fix-up adds one mask to blocks that drew none:
    # E[fraction] = p + (1 - p)^S / S.
    expected = p + (1 - p) ** s / s
    measured = masked.view(b, 4, s).float().mean(dim=(0, 2))
    torch.testing.assert_close(measured, expected, rtol=0, atol=0.02)
    torch.testing.assert_close(t_actual.mean(0), measured)


def test_mask_blocks_independent_positions():
    # i.i.d. mode: each position's marginal rate is p, wherever it sits in the block.
    g = torch.Generator().manual_seed(2)
    b, s = 2000, 8
    x = _tokens(b, s, g)
    t = torch.full((b, 1), 0.5)
    _, masked, _ = mask_blocks(x, s, t, MASK, schedule=LinearSchedule(), generator=g)
    per_position = masked.float().mean(0)
    assert (per_position - (0.5 + 0.5**8 / 8)).abs().max() < 0.04


def test_mask_blocks_exact_counts():
    g = torch.Generator().manual_seed(3)
    b, s = 50, 16
    t_cols = torch.tensor([0.0, 0.01, 0.2, 0.5, 0.77, 1.0])
    x = _tokens(b, 6 * s, g)
    # Linear: round(16 t), floor one: 0 -> 1, 0.16 -> 1, 3.2 -> 3, 8, 12.32 -> 12, 16.
    # Cosine: round((1 - cos(pi t / 2)) * 16) with the same floor.
    cosine_counts = torch.round(CosineSchedule().mask_prob(t_cols) * s).long().clamp(1, s)
    for schedule, want in (
        (LinearSchedule(), torch.tensor([1, 1, 3, 8, 12, 16])),
        (CosineSchedule(), cosine_counts),
    ):
        _, masked, t_actual = mask_blocks(
            x, s, t_cols.expand(b, 6), MASK, schedule=schedule, exact=True, generator=g
        )
        counts = masked.view(b, 6, s).sum(-1)
        assert torch.equal(counts, want.expand(b, 6))
        torch.testing.assert_close(t_actual, want.float().expand(b, 6) / s)
    assert cosine_counts.tolist() == [1, 1, 1, 5, 10, 16]  # 0, 0.002, 0.78, 4.69, 10.34, 16


def test_mask_blocks_exact_positions_uniform():
    g = torch.Generator().manual_seed(4)
    b, s = 4000, 8
    x = _tokens(b, s, g)
    _, masked, _ = mask_blocks(
        x, s, torch.full((b, 1), 0.25), MASK, schedule=LinearSchedule(), exact=True, generator=g
    )
    per_position = masked.float().mean(0)  # 2 of 8 per block
    assert (per_position - 0.25).abs().max() < 0.03


@pytest.mark.parametrize("exact", [False, True])
def test_mask_blocks_at_least_one_per_block(exact):
    g = torch.Generator().manual_seed(5)
    b, nb, s = 64, 5, 8
    x = _tokens(b, nb * s, g)
    t = torch.zeros(b, nb)  # mask_prob 0: nothing would be masked without the floor
    _, masked, t_actual = mask_blocks(
        x, s, t, MASK, schedule=LinearSchedule(), exact=exact, generator=g
    )
    per_block = masked.view(b, nb, s).sum(-1)
    assert torch.equal(per_block, torch.ones(b, nb, dtype=torch.long))
    torch.testing.assert_close(t_actual, torch.full((b, nb), 1 / s))
    # The forced position is spread over the block, not always the same one.
    assert (masked.view(b, nb, s).sum((0, 1)) > 0).all()


def test_mask_blocks_full_mask_at_t_one():
    g = torch.Generator().manual_seed(6)
    x = _tokens(3, 16, g)
    noisy, masked, t_actual = mask_blocks(
        x, 4, torch.ones(3, 4), MASK, schedule=LinearSchedule(), generator=g
    )
    assert masked.all() and (noisy == MASK).all()
    assert torch.equal(t_actual, torch.ones(3, 4))


@pytest.mark.parametrize("exact", [False, True])
def test_mask_blocks_reproducible(exact):
    x = _tokens(4, 32, torch.Generator().manual_seed(0))
    t = torch.rand(4, 4, generator=torch.Generator().manual_seed(1))

    def run(seed):
        g = torch.Generator().manual_seed(seed)
        return mask_blocks(x, 8, t, MASK, schedule=CosineSchedule(), exact=exact, generator=g)

    a, b, c = run(7), run(7), run(8)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert not torch.equal(a[1], c[1])


def test_mask_blocks_bad_arguments():
    x = torch.randint(4, 50, (2, 20))
    sched = LinearSchedule()
    with pytest.raises(ValueError, match=r"L=20.*block_size=8"):
        mask_blocks(x, 8, torch.rand(2, 2), MASK, schedule=sched)
    with pytest.raises(ValueError, match=r"\(2, 5\)"):
        mask_blocks(x, 4, torch.rand(2, 4), MASK, schedule=sched)
    with pytest.raises(ValueError, match="block_size"):
        mask_blocks(x, 0, torch.rand(2, 2), MASK, schedule=sched)
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        mask_blocks(x.flatten(), 4, torch.rand(2, 5), MASK, schedule=sched)
