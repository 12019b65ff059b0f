"""``CosineSchedule``: ``alpha(t) = cos(pi t / 2)``.

Masks slowly at first (``mask_prob ~ pi^2 t^2 / 8`` near 0) and fast near the end.
The NELBO weight ``-alpha' / (1 - alpha) = (pi/2) sin(pi t/2) / (1 - cos(pi t/2))``
simplifies, with the half-angle identities, to ``(pi/2) / tan(pi t / 4)``, which
avoids the cancellation in ``1 - cos`` for small ``t``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from twotower.schedules.base import NoiseSchedule, as_time

__all__ = ["CosineSchedule"]


class CosineSchedule(NoiseSchedule):
    """``alpha(t) = cos(pi t / 2)``; ``loss_weight(t) = (pi / 2) / tan(pi t / 4)``."""

    def alpha(self, t: Tensor | float) -> Tensor:
        return torch.cos(0.5 * math.pi * as_time(t))

    def alpha_prime(self, t: Tensor | float) -> Tensor:
        return -0.5 * math.pi * torch.sin(0.5 * math.pi * as_time(t))

    def mask_prob(self, t: Tensor | float) -> Tensor:
        # 1 - cos(x) = 2 sin^2(x / 2), exact for small t.
        return 2.0 * torch.sin(0.25 * math.pi * as_time(t)) ** 2

    def loss_weight(self, t: Tensor | float) -> Tensor:
        return 0.5 * math.pi / torch.tan(0.25 * math.pi * as_time(t))
