"""`TolerantSpeculative`: speculative decoding that also keeps drafted tokens the context tower
finds nearly as likely as its own choice. Faster than `Speculative`, no longer lossless.

The loop is `Speculative`'s (a denoiser draft per iteration, one provisional extend of the context
tower, `accept` of a per-row prefix); only the rule for how much of the draft a row keeps differs.
With p = softmax(logits[i - 1]), the context tower's untempered next-token distribution after the
draft's first i tokens, drafted token x_i (i >= 1) passes when

    x_i == a_{i-1}   (the context tower's own token, as in `Speculative`)
    or  p(x_i) >= tolerance * max_v p(v)

and a row keeps 1 + the number of leading passing positions; the context tower's token follows the
kept prefix, as in `Speculative`. `tolerance=1` keeps only tokens that tie the context tower's top
probability, i.e. `Speculative`'s output apart from exact ties. A smaller tolerance keeps longer
prefixes (more tokens per iteration) and lets through tokens the context tower ranks second-best
but still plausible; every kept token still has at least `tolerance` times the top probability.

This is not mask diffusion: the context tower checks every drafted token before it is kept, and
rejected positions are rolled back (the draft's denoising steps are `Speculative`'s
`draft_steps` / `sampler`). It sits between `MaskDiffusion` (the denoiser alone decides) and
`Speculative` (the context tower decides every token).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from ..samplers import Sampler
from ..validation import check_float
from .logits import LogitsProcessor
from .speculative import Speculative

__all__ = ["TolerantSpeculative"]


class TolerantSpeculative(Speculative):
    """`Speculative` that also keeps drafted tokens with at least `tolerance` times the context
    tower's top next-token probability.

    Args:
        tolerance: in (0, 1]; a drafted token passes when the context tower gives it at least
            `tolerance` times the probability of its most likely token (or picks it itself).
            1 = `Speculative` (up to exact ties).
        block_size / draft_steps / sampler / temperature / top_k / top_p / logits_processors: as in
            `Speculative`. The probabilities of the rule are always the untempered softmax.
    """

    def __init__(self, tolerance: float = 0.2, block_size: int | None = None, draft_steps: int = 1,
                 sampler: Sampler | None = None, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, logits_processors: Sequence[LogitsProcessor] | None = None):
        super().__init__(block_size=block_size, draft_steps=draft_steps, sampler=sampler, temperature=temperature,
                         top_k=top_k, top_p=top_p, logits_processors=logits_processors)
        self.tolerance = check_float("tolerance", tolerance, low=0.0, high=1.0, low_open=True)

    def extra_repr(self) -> str:
        return f"tolerance={self.tolerance}, {super().extra_repr()}"

    def rule_key(self) -> tuple:
        return super().rule_key() + (self.tolerance,)

    def kept(self, logits: Tensor, ar: Tensor, x: Tensor) -> Tensor:
        # float: a bf16 softmax could round a drafted token's share across the tolerance line.
        probs = logits[:, :-1].float().softmax(-1)  # (R, n - 1, V): the distributions of x[:, 1:]
        drafted = probs.gather(-1, x[:, 1:, None]).squeeze(-1)
        # The exact match stays an alternative: every token `Speculative` keeps is kept, the tolerance
        # only adds to that rule (with sampling the chosen token need not be the most likely one).
        passes = (x[:, 1:] == ar[:, :-1]) | (drafted >= self.tolerance * probs.amax(-1))
        # cumprod: only the leading run of passes counts; + 1 for x[:, 0], the context tower's own token.
        return passes.long().cumprod(-1).sum(-1) + 1
