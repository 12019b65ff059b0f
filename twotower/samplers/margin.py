"""``MarginThreshold``: commit where the top-1 token clearly beats the runner-up.

The probability margin ``p(1) - p(2)`` between the two most likely tokens is a
confidence score that also sees ambiguity between two good candidates (a position
split 0.45 / 0.45 has low margin, even though its top-1 probability is not tiny);
margin-based unmasking orders are studied for masked diffusion models, e.g. Kim et
al., "Train for the Worst, Plan for the Best" (2025).

Each step commits every masked position whose margin exceeds ``margin`` (at least
one: the largest margin). Margins come from ``softmax(logits)`` when the engine passes
the block's logits (``[MASK]`` already excluded). Without logits, the conservative
bound ``2 * confidence - 1`` stands in: when the candidate is the argmax with
probability ``p``, the runner-up has at most ``1 - p``, so the true margin is at least
``2p - 1``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from twotower.samplers.base import Sampler, commit_top_n
from twotower.validation import check_float

__all__ = ["MarginThreshold", "probability_margin"]


def probability_margin(logits: Tensor) -> Tensor:
    """(B, S, V) logits -> (B, S) float32 top-1 minus top-2 softmax probability.

    A vocabulary of one token has margin 1.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    if probs.shape[-1] < 2:
        return torch.ones(probs.shape[:-1], device=probs.device)
    top2 = probs.topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


class MarginThreshold(Sampler):
    """Commit masked positions with ``p(top-1) - p(top-2) > margin`` (at least one).

    Args:
        margin: in [0, 1). Higher is stricter; ``0`` commits every position without
            an exact tie.
    """

    def __init__(self, margin: float = 0.5) -> None:
        self.margin = check_float("margin", margin, low=0.0, high=1.0, high_open=True)

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
        """(B, S) bool: masked positions over the margin, largest margins first."""
        if logits is not None:
            score = probability_margin(logits)
        else:
            score = 2.0 * confidence.float() - 1.0
        n = ((score > self.margin) & masked).sum(-1).clamp(min=1)
        return commit_top_n(score, masked, n)

