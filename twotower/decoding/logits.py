"""How a token is chosen from logits: temperature, composable logits processors, confidence.

Every decoder picks tokens through one `TokenChooser`, so top-k, top-p (nucleus) and any
user-written `LogitsProcessor` work in every decoding loop without a copy of the code in each:

    chooser = TokenChooser(temperature=0.7, top_k=50, top_p=0.9)
    tokens = chooser(logits, generator)          # (..., V) -> (...) long

At temperature 0 the choice is the argmax of the raw logits. Processors only reshape a
distribution that is sampled from, and the argmax survives top-k / top-p filtering, so greedy
decoding skips them (no cost on the greedy hot path). At temperature T > 0 the token is a
Gumbel-max sample: argmax(processors(logits / T) + g), g ~ Gumbel(0, 1), drawn from `generator`.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import torch
from torch import Tensor

from ..validation import check_int

__all__ = ["LogitsProcessor", "TopK", "TopP", "TokenChooser", "confidence_of", "check_temperature"]


def check_temperature(temperature) -> float:
    """A temperature as a float >= 0 (0 = greedy), or a ValueError naming the bad value."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    temperature = float(temperature)
    if not temperature >= 0:  # also rejects NaN
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    return temperature


class LogitsProcessor(abc.ABC):
    """Maps (..., V) float logits to (..., V) logits before sampling; -inf removes a token.

    Subclass and implement `__call__`; pass instances to a decoder's `logits_processors`. A
    processor must keep at least one finite logit per row and must not change shapes.
    """

    @abc.abstractmethod
    def __call__(self, logits: Tensor) -> Tensor:
        """(..., V) -> (..., V)."""


class TopK(LogitsProcessor):
    """Keep the k largest logits of each row (ties at the k-th value are all kept)."""

    def __init__(self, k: int):
        self.k = check_int("top_k", k)

    def __call__(self, logits: Tensor) -> Tensor:
        # Nothing to drop; also keeps topk from failing when k exceeds the vocabulary.
        if self.k >= logits.shape[-1]:
            return logits
        # `<`, not a top-k index mask: every logit tied with the k-th survives, independent of topk's tie order.
        kth = logits.topk(self.k, dim=-1).values[..., -1:]
        return logits.masked_fill(logits < kth, float("-inf"))

    def __repr__(self) -> str:
        return f"TopK({self.k})"


class TopP(LogitsProcessor):
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability reaches p.

    A token is dropped when the tokens ranked above it already hold at least p of the mass, so
    the most likely token always stays.
    """

    def __init__(self, p: float):
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1], got {p!r}")
        self.p = float(p)

    def __call__(self, logits: Tensor) -> Tensor:
        if self.p >= 1:
            return logits
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # mass of the tokens ranked above each one
        drop_sorted = mass_before >= self.p
        # Back from sorted order to vocabulary order: drop[order[j]] = drop_sorted[j].
        drop = torch.zeros_like(drop_sorted).scatter_(-1, order, drop_sorted)
        return logits.masked_fill(drop, float("-inf"))

    def __repr__(self) -> str:
        return f"TopP({self.p})"


class TokenChooser:
    """Greedy argmax, or a seeded Gumbel-max sample of softmax(processors(logits / temperature)).

    Args:
        temperature: 0 = greedy; > 0 samples.
        top_k / top_p: shorthands for `TopK(top_k)` / `TopP(top_p)`, applied after the
            temperature, before any `processors` (the usual order).
        processors: further `LogitsProcessor`s, applied in order.
    """

    def __init__(self, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 processors: Sequence[LogitsProcessor] = ()):
        self.temperature = check_temperature(temperature)
        chain: list[LogitsProcessor] = []
        if top_k is not None:
            chain.append(TopK(top_k))
        if top_p is not None:
            chain.append(TopP(top_p))
        for p in processors or ():
            if not isinstance(p, LogitsProcessor):
                raise ValueError(f"logits_processors must be LogitsProcessor instances, got {p!r}")
            chain.append(p)
        self.processors = tuple(chain)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def __call__(self, logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(..., V) logits -> (...) token ids.

        The Gumbel noise is -log E with E ~ Exp(1), drawn from `generator` so seeded runs repeat.
        A generator on another device draws there and the noise is moved (correct, slower).
        """
        if self.greedy:
            return logits.argmax(-1)
        gen_device = generator.device if generator is not None else logits.device
        # float32 noise in any model dtype: a seed draws the same noise, and bf16 noise is coarse enough to tie.
        noise = torch.empty(logits.shape, device=gen_device, dtype=torch.float32).exponential_(generator=generator)
        noise = noise.to(logits.device).log_().neg_()
        if not self.processors:
            # Fused scale-and-add, in place on the noise: no (..., V) temporary for the scaled logits.
            return noise.add_(logits.float(), alpha=1.0 / self.temperature).argmax(-1)
        scaled = logits.float() * (1.0 / self.temperature)
        for p in self.processors:
            scaled = p(scaled)
        return noise.add_(scaled).argmax(-1)

    def __repr__(self) -> str:
        return f"TokenChooser(temperature={self.temperature}, processors={list(self.processors)})"


def confidence_of(logits: Tensor, tokens: Tensor) -> Tensor:
    """softmax(logits)[tokens], untempered: (B, n, V), (B, n) -> (B, n), via logsumexp (no probs tensor)."""
    chosen = logits.gather(-1, tokens[..., None]).squeeze(-1)
    return (chosen - torch.logsumexp(logits, -1)).exp()
