"""Stop strings: end a row once its decoded text contains one of them.

Decoders take a `stop` criterion (any callable with `StopStrings`' signature) next to the EOS ids.
The row tracker asks it after each commit that it reads back anyway (block boundaries for the
block decoders, each token for the one-token ones), only for rows still running; a row it flags
finishes there and leaves the working batch like a row that hit EOS. The generated tokens are kept
whole: cut the text at the stop string afterwards with `StopStrings.truncate` (the stop string may
span two blocks, or end mid-block).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["StopStrings", "StopCriterion"]

# (tokens (k, N) long on the host, counts (k,) long: how many of each row are real) -> (k,) bool
StopCriterion = Callable[[Tensor, Tensor], Tensor]


class StopStrings:
    """Stop a row when its generated text contains any of `strings`.

    Args:
        decode: token ids -> text (e.g. a tokenizer's `decode`).
        strings: the stop strings; empty strings are ignored.
    """

    def __init__(self, decode: Callable[[list[int]], str], strings: Sequence[str]):
        # One bare string is one stop string, not a sequence of one-character stops.
        if isinstance(strings, str):
            strings = [strings]
        bad = [s for s in strings if not isinstance(s, str)]
        if bad:
            raise ValueError(f"stop strings must be str, got {bad!r}")
        self.decode = decode
        self.strings = tuple(s for s in strings if s)

    def __bool__(self) -> bool:
        return bool(self.strings)

    def __call__(self, tokens: Tensor, counts: Tensor) -> Tensor:
        # The whole row is decoded each time, not the new tokens alone: a stop string may span a token
        # boundary, and a token's text can depend on its neighbours (merged bytes, leading spaces).
        hit = [any(s in self.decode(row[:n].tolist()) for s in self.strings) for row, n in zip(tokens, counts.tolist())]
        return torch.tensor(hit, dtype=torch.bool)

    def truncate(self, text: str) -> str:
        """`text` up to (not including) the earliest stop string."""
        # The earliest of all matches, not the first string's: stop strings may overlap in the text.
        cut = min((i for i in (text.find(s) for s in self.strings) if i >= 0), default=len(text))
        return text[:cut]
