"""``EntropyBounded``: commit as many positions as a total-entropy budget allows.

After the entropy-bounded (EB) sampler of Ben-Hamu et al., "Accelerated Sampling from
Masked Diffusion Models via Entropy Bounded Unmasking" (2025): committing several
positions at once from their independent marginals is safe when those marginals are
nearly deterministic, and the sum of their entropies bounds the error this causes.

Each step sorts the masked positions by increasing entropy ``H_i`` of
``softmax(logits_i)`` and commits the longest prefix whose summed entropy is at most
``max_entropy`` (nats), and always at least one (the lowest-entropy position). Easy
stretches commit many tokens in one step; hard ones go one at a time.

Without logits the entropy is unknown; the binary entropy of the confidence,
``h(p) = -p log p - (1 - p) log(1 - p)``, stands in (it is the entropy of the event
"the candidate is drawn", a lower bound on the true entropy, so this fallback is
more permissive than the logits path). The engine passes logits.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from twotower.samplers.base import Sampler, commit_top_n
from twotower.validation import check_float

__all__ = ["EntropyBounded", "token_entropy"]


def token_entropy(logits: Tensor) -> Tensor:
    """(B, S, V) logits -> (B, S) float32 entropy (nats) of ``softmax(logits)``.

    Tokens with probability 0 (e.g. an excluded ``[MASK]`` logit of -inf) contribute 0.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.special.entr(probs).sum(-1)


class EntropyBounded(Sampler):
    """Commit the lowest-entropy masked positions while their entropies sum to at most
    ``max_entropy`` (at least one).

    Args:
        max_entropy: the per-step entropy budget in nats, a finite float >= 0.
            ``0`` commits one position per step (plus any others of exactly zero
            entropy).
    """

    def __init__(self, max_entropy: float = 0.5) -> None:
        self.max_entropy = check_float("max_entropy", max_entropy, low=0.0, high=math.inf, high_open=True)

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
        """(B, S) bool: the longest low-entropy prefix within the budget, per row."""
        if logits is not None:
            entropy = token_entropy(logits)
        else:
            p = confidence.float()
            entropy = torch.special.entr(p) + torch.special.entr(1.0 - p)
        # Unmasked positions go last (+inf) so the prefix sums see masked ones only.
        entropy = entropy.masked_fill(~masked, math.inf)
        sorted_entropy = torch.sort(entropy, dim=-1, stable=True).values
        n = (sorted_entropy.cumsum(-1) <= self.max_entropy).sum(-1).clamp(min=1)
        # Same order as the sort above: ascending entropy, lower index on ties.
        return commit_top_n(-entropy, masked, n)

