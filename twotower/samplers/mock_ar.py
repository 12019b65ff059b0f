"""``MockAR``: autoregressive stepping through the two towers.

Exactly one token per step, the leftmost masked position, whatever the confidence.
With ``steps_per_block == S`` this decodes each block left to right, one denoiser
forward per token: the two-tower analogue of AR decoding, useful as a quality
reference for the diffusion samplers (and to check the denoiser against the AR model).
"""

from __future__ import annotations

import torch
from torch import Tensor

from twotower.samplers.base import Sampler

__all__ = ["MockAR"]


class MockAR(Sampler):
    """Commit the leftmost masked position of every row that has one."""

    def select(
        self,
        confidence: Tensor,
        candidates: Tensor,
        masked: Tensor,
        *,
        step: int,
        steps_per_block: int,
        logits: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """(B, S) bool with one True per row that still has a mask: its first one."""
        # The running count of masks reaches 1 exactly at the first masked position.
        return masked & (masked.long().cumsum(-1) == 1)

