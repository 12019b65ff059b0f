"""The ``NoiseSchedule`` interface of masked (absorbing-state) diffusion.

Time ``t`` runs from 0 (clean) to 1 (fully masked). A schedule gives:

- ``alpha(t)``: the probability that a token is still clean at time ``t``
  (``alpha(0) = 1``, decreasing, ``alpha(1) ~ 0``);
- ``mask_prob(t) = 1 - alpha(t)``: the probability it is ``[MASK]``;
- ``loss_weight(t) = -alpha'(t) / (1 - alpha(t))``: the weight of the masked-token
  cross-entropy in the continuous-time NELBO of MDLM / BD3-LM,
  ``E_t E_{x_t} [ w(t) * sum_{masked i} -log p_theta(x_i | x_t) ]``.

All methods take a tensor (or a Python float) of any shape and return a float tensor
of the same shape, on the same device.
"""

from __future__ import annotations

import abc

import torch
from torch import Tensor

__all__ = ["NoiseSchedule"]


def as_time(t: Tensor | float) -> Tensor:
    """``t`` as a floating tensor (integers and Python numbers become float32)."""
    t = torch.as_tensor(t)
    return t if t.is_floating_point() else t.to(torch.get_default_dtype())


class NoiseSchedule(abc.ABC):
    """A masking schedule ``alpha(t)`` with its NELBO loss weight."""

    @abc.abstractmethod
    def alpha(self, t: Tensor | float) -> Tensor:
        """Probability a token is clean at time ``t``. Shape of ``t``."""

    @abc.abstractmethod
    def alpha_prime(self, t: Tensor | float) -> Tensor:
        """``d alpha / dt`` at ``t`` (<= 0). Shape of ``t``."""

    def mask_prob(self, t: Tensor | float) -> Tensor:
        """Probability a token is ``[MASK]`` at time ``t``: ``1 - alpha(t)``. Shape of ``t``."""
        return 1.0 - self.alpha(t)

    def loss_weight(self, t: Tensor | float) -> Tensor:
        """NELBO weight ``-alpha'(t) / (1 - alpha(t))``. Shape of ``t``; +inf at t = 0.

        Subclasses override this with a closed form where the quotient loses
        precision for small ``t`` (``1 - alpha`` cancels).
        """
        return -self.alpha_prime(t) / (1.0 - self.alpha(t))

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
