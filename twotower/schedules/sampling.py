"""Sampling the training noise: diffusion times and the masks they imply.

Training draws one time per block, ``t ~ U[eps, 1)``, masks the block's positions
with probability ``mask_prob(t)``, and weights the masked cross-entropy by
``loss_weight(t)`` (docs/design.md, section 3). Two pieces live here:

- :class:`TimeSampler` and its implementations draw the times. ``UniformTime`` is
  i.i.d.; ``StratifiedTime`` and ``AntitheticTime`` spread one batch's times over
  [eps, 1) so the batch-mean loss has lower variance (the NELBO weight ``1/t`` makes
  the estimator very sensitive to which times a batch happens to draw).
- :func:`mask_blocks` turns clean tokens and per-block times into a noisy batch.

Every random operation takes the caller's ``torch.Generator``: the same seed gives
the same times and masks.
"""

from __future__ import annotations

import abc

import torch
from torch import Tensor

from twotower.schedules.base import NoiseSchedule
from twotower.validation import check_float, check_int

__all__ = ["TimeSampler", "UniformTime", "StratifiedTime", "AntitheticTime", "FullMaskMix", "mask_blocks"]


class TimeSampler(abc.ABC):
    """Draws diffusion times in ``[eps, 1)``.

    Args:
        eps: lower end of the range, in [0, 1). It keeps ``t`` (and with it the mask
            rate) away from 0, where the ``1/t`` loss weight blows up.
    """

    def __init__(self, eps: float = 1e-3) -> None:
        self.eps = check_float("eps", eps, low=0.0, high=1.0, high_open=True)

    def sample(
        self,
        shape: tuple[int, ...],
        *,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Return float32 times of ``shape`` in ``[eps, 1)``.

        ``device`` defaults to the generator's device (CPU without one).
        """
        shape = tuple(shape)
        if any(d < 0 for d in shape):
            raise ValueError(f"shape must have non-negative sizes, got {shape}")
        if device is None and generator is not None:
            device = generator.device
        n = 1
        for d in shape:
            n *= d
        u = self._unit(n, generator=generator, device=device)  # (n,) in [0, 1)
        return self._to_interval(u).reshape(shape)

    @abc.abstractmethod
    def _unit(
        self, n: int, *, generator: torch.Generator | None, device: torch.device | str | None
    ) -> Tensor:
        """Return ``n`` float64 values in [0, 1), flat."""

    def _to_interval(self, u: Tensor) -> Tensor:
        """Map [0, 1) affinely onto [eps, 1), in float32."""
        t = (self.eps + (1.0 - self.eps) * u).float()
        # A float64 value just below 1 can round up to 1.0 in float32; keep [eps, 1).
        below_one = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)).item()
        return t.clamp(max=below_one)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eps={self.eps})"


class UniformTime(TimeSampler):
    """Independent ``t ~ U[eps, 1)``."""

    def _unit(self, n, *, generator, device):
        return torch.rand(n, generator=generator, device=device, dtype=torch.float64)


class StratifiedTime(TimeSampler):
    """One time per stratum: for ``n`` values, ``u_i = (i + U_i) / n``, randomly permuted.

    The ``n = prod(shape)`` values cover ``[0, 1)`` evenly (exactly one in each
    ``[i/n, (i+1)/n)``) before the affine map onto ``[eps, 1)``; the permutation
    spreads the strata over batch rows and blocks at random. Each value is still
    marginally ``U[eps, 1)``.
    """

    def _unit(self, n, *, generator, device):
        jitter = torch.rand(n, generator=generator, device=device, dtype=torch.float64)
        # float64: with many strata, (i + U) / n in float32 could round into a neighbouring stratum.
        strata = (torch.arange(n, device=device, dtype=torch.float64) + jitter) / n
        perm = torch.randperm(n, generator=generator, device=device)
        return strata[perm]


class AntitheticTime(TimeSampler):
    """Antithetic pairs: flat values ``h = ceil(n/2)`` apart are ``u`` and ``1 - u``.

    For ``n = prod(shape)`` values, ``u_0 .. u_{h-1} ~ U[0, 1)`` fill the first half
    of the flattened output and ``1 - u_0 .. 1 - u_{n-h-1}`` the second (with odd
    ``n`` the middle value has no partner). After the map onto ``[eps, 1)`` each pair
    sums to ``1 + eps``. For shape (B, nB) with even B, row ``b`` pairs with row
    ``b + B/2``, block by block.
    """

    def _unit(self, n, *, generator, device):
        h = (n + 1) // 2
        u = torch.rand(h, generator=generator, device=device, dtype=torch.float64)
        return torch.cat([u, 1.0 - u[: n - h]])


class FullMaskMix(TimeSampler):
    """A share ``p_full`` of the blocks at ``t = 1`` exactly (every maskable position masked), the rest
    from ``base``.

    A fully masked block is what the denoiser sees when it drafts a block in one forward (the
    default of :class:`twotower.decoding.Speculative`); a uniform ``t`` gives it that case
    only rarely. The only sampler here that returns ``t = 1`` (outside ``[eps, 1)``): pair it with a
    schedule whose ``mask_prob(1) = 1`` and whose loss weight is finite at 1 (linear, log-linear).

    Args:
        p_full: probability in [0, 1] that a block is fully masked.
        base: the sampler for the other blocks (default ``StratifiedTime(eps)``).
    """

    def __init__(self, p_full: float = 0.5, base: TimeSampler | None = None, eps: float = 1e-3) -> None:
        super().__init__(eps)
        self.p_full = check_float("p_full", p_full, low=0.0, high=1.0)
        self.base = base if base is not None else StratifiedTime(eps)

    def sample(self, shape, *, generator=None, device=None) -> Tensor:
        t = self.base.sample(shape, generator=generator, device=device)
        full = torch.rand(t.shape, generator=generator, device=t.device) < self.p_full
        return t.masked_fill(full, 1.0)

    def _unit(self, n, *, generator, device):  # not used: `sample` delegates to `base`
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"FullMaskMix(p_full={self.p_full}, base={self.base!r})"


def mask_blocks(
    x: Tensor,
    block_size: int,
    t: Tensor,
    mask_token_id: int,
    *,
    schedule: NoiseSchedule,
    exact: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Mask each block of ``x`` at its own time.

    Block ``k`` covers positions ``[k S, (k+1) S)`` with ``S = block_size``. Each of
    its positions is masked independently with probability
    ``schedule.mask_prob(t[:, k])``; with ``exact=True`` exactly
    ``clamp(round(mask_prob * S), 1, S)`` positions are masked, chosen uniformly
    (``round`` is torch's round-half-to-even). Every block has at least one masked
    position in both modes (a block that drew none gets one uniformly random
    position), since the training loss is an average over masked positions.

    Args:
        x: (B, L) long clean tokens, ``L`` a multiple of ``block_size``. They should
            not contain ``mask_token_id`` (not checked, to avoid a device sync).
        block_size: ``S``, positions per block.
        t: (B, nB) float times, ``nB = L / S``.
        mask_token_id: id written at masked positions.
        schedule: maps times to mask probabilities.
        exact: mask an exact count per block instead of i.i.d. positions.
        generator: the source of randomness (on ``x``'s device).

    Returns:
        noisy: (B, L) long, ``x`` with masked positions set to ``mask_token_id``.
        masked: (B, L) bool, which positions were masked.
        t_actual: (B, nB) float, the fraction of each block actually masked: what
            the denoiser is conditioned on, as at inference.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be (B, L), got shape {tuple(x.shape)}")
    check_int("block_size", block_size)
    B, L = x.shape
    if L % block_size != 0:
        raise ValueError(
            f"sequence length L={L} is not a multiple of block_size={block_size}; "
            f"pad or crop x to a multiple of {block_size}"
        )
    nB, S = L // block_size, block_size
    if t.shape != (B, nB):
        raise ValueError(
            f"t must be (B, nB) = ({B}, {nB}) for x of shape {tuple(x.shape)} and "
            f"block_size={block_size}, got {tuple(t.shape)}"
        )

    p = schedule.mask_prob(t).clamp(0.0, 1.0).to(x.device)  # (B, nB)
    # One uniform key per position decides everything: i.i.d. masking compares it
    # with p; exact masking and the at-least-one fix-up take the smallest keys, which
    # are a uniformly random subset of the block.
    keys = torch.rand((B, nB, S), generator=generator, device=x.device)
    rank = keys.argsort(dim=-1).argsort(dim=-1)  # (B, nB, S): 0 = smallest key
    # At least one masked position per block, both ways: a block with none adds no loss, and its
    # realised t of 0 would make the NELBO weight 1 / t infinite.
    if exact:
        count = torch.round(p * S).long().clamp(1, S)
        masked = rank < count[..., None]
    else:
        masked = keys < p[..., None]
        masked |= (rank == 0) & ~masked.any(dim=-1, keepdim=True)

    t_dtype = t.dtype if t.is_floating_point() else torch.float32
    t_actual = masked.to(t_dtype).mean(dim=-1)
    masked = masked.reshape(B, L)
    noisy = x.masked_fill(masked, mask_token_id)
    return noisy, masked, t_actual
