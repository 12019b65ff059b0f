"""``LogLinearSchedule``: MDLM's log-linear noise, ``alpha(t) = 1 - (1 - eps) t``.

MDLM writes it as a total noise ``sigma(t) = -log(1 - (1 - eps) t)`` with
``alpha = exp(-sigma)``; ``eps`` keeps ``sigma(1)`` finite, so ``alpha(1) = eps``
(not 0). The NELBO weight is ``(1 - eps) / ((1 - eps) t) = 1 / t``, as for the linear
schedule; only the mask probability is scaled by ``1 - eps``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from twotower.schedules.base import NoiseSchedule, as_time
from twotower.validation import check_float

__all__ = ["LogLinearSchedule"]


class LogLinearSchedule(NoiseSchedule):
    """``alpha(t) = 1 - (1 - eps) t``; ``loss_weight(t) = 1 / t``.

    Args:
        eps: clean probability left at ``t = 1``, in [0, 1).
    """

    def __init__(self, eps: float = 1e-3) -> None:
        self.eps = check_float("eps", eps, low=0.0, high=1.0, high_open=True)

    def alpha(self, t: Tensor | float) -> Tensor:
        return 1.0 - (1.0 - self.eps) * as_time(t)

    def alpha_prime(self, t: Tensor | float) -> Tensor:
        return torch.full_like(as_time(t), -(1.0 - self.eps))

    def mask_prob(self, t: Tensor | float) -> Tensor:
        return (1.0 - self.eps) * as_time(t)

    def sigma(self, t: Tensor | float) -> Tensor:
        """MDLM's total noise ``-log(alpha(t))``. Shape of ``t``."""
        return -torch.log1p(-(1.0 - self.eps) * as_time(t))

    def loss_weight(self, t: Tensor | float) -> Tensor:
        return 1.0 / as_time(t)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(eps={self.eps})"
