"""``ConfidenceThreshold``: commit every masked position the model is sure enough of.

The default policy of two-tower block diffusion. At step ``s`` of a block, with
``m`` positions still masked in a row and ``r = steps_per_block - s`` steps left::

    n = min(m, max(#{masked i : confidence_i > threshold}, 1, ceil(m / r)))

and the ``n`` most confident masked positions commit. The ceiling term is the pace
needed to empty the block in the steps left, so the block always finishes within
``steps_per_block``; the threshold term lets easy blocks go faster. A lower threshold
commits more tokens per step (fewer NFEs, lower quality): a tunable operating point.
"""

from __future__ import annotations

import torch
from torch import Tensor

from twotower.samplers.base import Sampler, commit_top_n, pace
from twotower.validation import check_float

__all__ = ["ConfidenceThreshold"]


class ConfidenceThreshold(Sampler):
    """Commit the masked positions whose confidence exceeds ``threshold`` (at least one,
    and at least the pace ``ceil(m / steps_left)``).

    Args:
        threshold: gamma in (0, 1]; a position counts when ``confidence > threshold``
            (strictly). ``threshold=1`` never counts, leaving only the fixed pace.
    """

    def __init__(self, threshold: float = 0.8) -> None:
        self.threshold = check_float("threshold", threshold, low=0.0, high=1.0, low_open=True)

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
        """(B, S) bool: the ``n[b]`` most confident masked positions of each row."""
        above = ((confidence > self.threshold) & masked).sum(-1)
        n = above.clamp(min=1).maximum(pace(masked, step, steps_per_block))
        return commit_top_n(confidence, masked, n)  # caps n at m

