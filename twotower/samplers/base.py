"""The ``Sampler`` interface: one commit decision per denoising step of a block.

A block of ``S`` positions starts as all ``[MASK]``. At each step ``s`` of
``0 .. steps_per_block - 1`` the generation engine computes, per sequence ``b`` and
position ``i`` of the block:

- ``candidates[b, i]``: the predicted token (argmax, or a Gumbel-max sample);
- ``confidence[b, i]``: the probability of that token under the *untempered*
  softmax, with the ``[MASK]`` logit excluded;
- ``masked[b, i]``: whether the position is still ``[MASK]``.

It then asks the sampler which masked positions to commit this step. A sampler
implements :meth:`Sampler.select`; the engine calls the sampler object itself
(:meth:`Sampler.__call__`), which runs ``select`` and then enforces the contract every
policy must honour, so that a research sampler cannot stall or overrun a block:

1. the commit is a subset of ``masked``;
2. every row that still has a masked position commits at least one (the most
   confident one, if ``select`` chose none);
3. at the last step (``step == steps_per_block - 1``) every masked position commits.

Together, 2 and 3 mean a block always finishes within ``steps_per_block`` steps.

:func:`commit_top_n` is the vectorised building block most policies reduce to:
"commit, per row, the ``n[b]`` most confident masked positions".
"""

from __future__ import annotations

import abc
import functools
import inspect

import torch
from torch import Tensor

__all__ = ["Sampler", "commit_top_n", "pace"]


def pace(masked: Tensor, step: int, steps_per_block: int) -> Tensor:
    """(B,) long: ceil(m / steps_left), the fewest commits per row that still empty the block's m
    masked positions within the steps left (step is 0-based)."""
    steps_left = steps_per_block - step
    return (masked.sum(-1) + steps_left - 1) // steps_left  # ceil on integers


def commit_top_n(confidence: Tensor, masked: Tensor, n: Tensor | int) -> Tensor:
    """Commit, per row, the ``n[b]`` most confident masked positions.

    Args:
        confidence: (B, S) float scores; higher commits first. NaN counts as lowest.
        masked: (B, S) bool, the positions still ``[MASK]`` (the only ones eligible).
        n: (B,) long (or a Python int for every row): how many to commit per row.
            Capped at the row's number of masked positions; negative counts as 0.

    Returns:
        (B, S) bool, a subset of ``masked`` with ``min(n[b], masked[b].sum())`` True
        entries in row ``b``. Ties in confidence go to the lower position index, so
        the result is deterministic. Rows whose ``masked`` is all False commit nothing.
    """
    if confidence.dim() != 2 or confidence.shape != masked.shape:
        raise ValueError(
            f"commit_top_n expects confidence and masked of the same (B, S) shape, got "
            f"{tuple(confidence.shape)} and {tuple(masked.shape)}"
        )
    if masked.dtype != torch.bool:
        raise TypeError(f"masked must be a bool tensor, got {masked.dtype}")
    B, S = masked.shape
    n = torch.as_tensor(n, device=masked.device).long().expand(B)

    # NaN would sort unpredictably; treat it as the least confident value.
    score = confidence.float().nan_to_num(nan=float("-inf"))
    # Two stable sorts give a lexicographic order: masked first, then by descending
    # confidence, then by ascending index (stability keeps the original order on ties).
    # Sorting on ``masked`` explicitly (instead of pushing unmasked scores to -inf)
    # keeps a masked position with score -inf ahead of every unmasked one.
    by_conf = torch.sort(score, dim=-1, descending=True, stable=True).indices
    masked_in_order = masked.gather(-1, by_conf).to(torch.uint8)
    by_masked = torch.sort(masked_in_order, dim=-1, descending=True, stable=True).indices
    order = by_conf.gather(-1, by_masked)  # (B, S): position ids, best first

    # rank[b, order[b, j]] = j: the commit position of each slot.
    ranks = torch.arange(S, device=masked.device).expand(B, S)
    rank = torch.empty_like(order).scatter_(-1, order, ranks)

    count = torch.minimum(n.clamp(min=0), masked.sum(-1))
    return (rank < count[:, None]) & masked


class Sampler(abc.ABC):
    """A commit policy: which masked positions of a block to commit at one step.

    Subclasses implement :meth:`select`; callers use the object itself
    (``sampler(confidence, candidates, masked, step=..., steps_per_block=...)``), which
    enforces the contract described in this module's docstring. Hyperparameters go to
    the constructor (typed, validated) so that a YAML recipe can pick a policy by
    ``class_path`` / ``init_args``.
    """

    @abc.abstractmethod
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
        """Return commit (B, S) bool: which positions to commit this step.

        Args:
            confidence: (B, S) float, probability of ``candidates`` under the
                untempered, ``[MASK]``-excluded softmax.
            candidates: (B, S) long, the token each position would commit.
            masked: (B, S) bool, positions still ``[MASK]``.
            step: 0-based index of this step within the block.
            steps_per_block: the step budget of the block.
            logits: optional (B, S, V) float, the block's logits with the ``[MASK]``
                logit excluded (e.g. set to -inf), for policies that need the whole
                distribution.
            generator: the decoding call's generator (``generate(generator=...)``), for
                policies that draw at random; None = the global RNG. Draw from it, never
                from the global RNG, so that a seeded call repeats.

        Must be a subset of ``masked``; :meth:`__call__` trims and completes it anyway.
        """

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"

    def __call__(
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
        """Run :meth:`select` and enforce the commit contract. Returns (B, S) bool."""
        _check_inputs(confidence, candidates, masked, step, steps_per_block, logits)
        # A sampler written before `select` took a generator still works: it is given none.
        extra = {"generator": generator} if _takes_generator(type(self)) else {}
        commit = self.select(
            confidence,
            candidates,
            masked,
            step=step,
            steps_per_block=steps_per_block,
            logits=logits,
            **extra,
        )
        if not isinstance(commit, Tensor) or commit.dtype != torch.bool:
            got = commit.dtype if isinstance(commit, Tensor) else type(commit).__name__
            raise TypeError(f"{type(self).__name__}.select must return a bool tensor, got {got}")
        if commit.shape != masked.shape:
            raise ValueError(
                f"{type(self).__name__}.select returned shape {tuple(commit.shape)}, "
                f"expected {tuple(masked.shape)} (the shape of `masked`)"
            )

        if step == steps_per_block - 1:
            # Last step of the budget: whatever is left must commit now.
            return masked.clone()
        commit = commit & masked
        # A row with masks left but no commit would waste an NFE and could overrun
        # the budget; give it its single most confident masked position.
        stalled = masked.any(-1) & ~commit.any(-1)
        fallback = commit_top_n(confidence, masked, stalled.long())
        return commit | fallback


@functools.lru_cache(maxsize=None)
def _takes_generator(cls: type) -> bool:
    """Whether cls.select accepts `generator` (by name or through **kwargs)."""
    params = inspect.signature(cls.select).parameters.values()
    return any(p.name == "generator" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _check_inputs(
    confidence: Tensor,
    candidates: Tensor,
    masked: Tensor,
    step: int,
    steps_per_block: int,
    logits: Tensor | None,
) -> None:
    """Raise a clear error for inputs that would give a silently wrong commit."""
    if masked.dim() != 2 or masked.dtype != torch.bool:
        raise ValueError(
            f"masked must be a (B, S) bool tensor, got shape {tuple(masked.shape)} "
            f"and dtype {masked.dtype}"
        )
    for name, value in (("confidence", confidence), ("candidates", candidates)):
        if value.shape != masked.shape:
            raise ValueError(
                f"{name} has shape {tuple(value.shape)}, expected {tuple(masked.shape)} "
                "(the shape of `masked`)"
            )
    if logits is not None and (logits.dim() != 3 or logits.shape[:2] != masked.shape):
        raise ValueError(
            f"logits must be (B, S, V) with (B, S) = {tuple(masked.shape)}, "
            f"got {tuple(logits.shape)}"
        )
    if steps_per_block < 1:
        raise ValueError(f"steps_per_block must be >= 1, got {steps_per_block}")
    if not 0 <= step < steps_per_block:
        raise ValueError(
            f"step must be in [0, steps_per_block - 1] = [0, {steps_per_block - 1}], got {step}"
        )
