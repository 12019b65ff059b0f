"""``LinearSchedule``: ``alpha(t) = 1 - t``, the MDLM / BD3-LM default.

The mask probability equals ``t`` and the NELBO weight is ``1 / t``: the training
loss is the masked cross-entropy divided by the mask rate.
"""

from __future__ import annotations

import torch
from torch import Tensor

from twotower.schedules.base import NoiseSchedule, as_time

__all__ = ["LinearSchedule"]


class LinearSchedule(NoiseSchedule):
    """``alpha(t) = 1 - t``; ``mask_prob(t) = t``; ``loss_weight(t) = 1 / t``."""

    def alpha(self, t: Tensor | float) -> Tensor:
        return 1.0 - as_time(t)

    def alpha_prime(self, t: Tensor | float) -> Tensor:
        return torch.full_like(as_time(t), -1.0)

    def mask_prob(self, t: Tensor | float) -> Tensor:
        # Exactly t (no 1 - (1 - t) round-off).
        return as_time(t).clone()

    def loss_weight(self, t: Tensor | float) -> Tensor:
        return 1.0 / as_time(t)
