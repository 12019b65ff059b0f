"""``TopKCommit``: a fixed number of commits per step.

Each step commits the ``k`` most confident masked positions (fewer if fewer remain).
With ``k * steps_per_block < S`` the budget runs out first and the base class commits
everything left at the last step; pick ``k >= ceil(S / steps_per_block)`` to avoid that.
"""

from __future__ import annotations

import torch
from torch import Tensor

from twotower.samplers.base import Sampler, commit_top_n
from twotower.validation import check_int

__all__ = ["TopKCommit"]


class TopKCommit(Sampler):
    """Commit the ``k`` most confident masked positions each step.

    Args:
        k: commits per step, an int >= 1.
    """

    def __init__(self, k: int = 2) -> None:
        self.k = check_int("k", k)

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
        """(B, S) bool: the ``min(k, m)`` most confident masked positions per row."""
        return commit_top_n(confidence, masked, self.k)

