"""Prompt-lookup drafts: a free draft source `Speculative` tries before the denoiser.

Text repeats itself: code calls the names it defined, prose quotes its prompt, a chat answer reuses
the question's words. Where the row's last n tokens (the context tower's next token included) also
occur earlier in the row, the tokens that followed that earlier occurrence are a draft that costs no
forward at all (prompt lookup decoding, Saxena 2023; "Inference with Reference", Yang et al. 2023).
`Speculative(lookup=NgramLookup(3))` drafts such rows from the lookup and skips the denoiser
for an iteration in which every row found one; the context tower verifies either draft the same way,
so the output is unchanged (`Autoregressive`'s under greedy decoding).

    from twotower.decoding import NgramLookup, Speculative
    out = Speculative(lookup=NgramLookup(3)).generate(model, ids, mask, max_new_tokens=64)

`NgramLookup` is the setting (which n-gram sizes to try); `RowIndex` is one row's index over its
tokens so far, which the decoder extends with every row's kept tokens. Both are host-side Python:
an index holds one dict entry per distinct n-gram, and a lookup or an extension costs O(n) per
token, not a scan of the row.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..validation import check_int

__all__ = ["NgramLookup", "RowIndex"]


class RowIndex:
    """One row's n-gram index: for each n-gram size, the most recent occurrence of every n-gram.

    An entry maps an n-gram to the position just after its most recent occurrence whose continuation
    is known: every n-gram that ends inside the row's tokens (`tokens[e - n:e]` for e <= len(tokens)),
    so the one that ends at the very end is found too (its continuation is the token being drafted
    from, then what follows it).
    """

    def __init__(self, ngrams: tuple[int, ...], tokens: Sequence[int]):
        self.ngrams = ngrams
        self.tokens: list[int] = []
        self.last: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in ngrams}
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        """Append the row's next tokens (the ones it kept) and index the n-grams that now end in it."""
        start = len(self.tokens)
        self.tokens.extend(int(t) for t in tokens)
        for n, table in self.last.items():
            # The n-grams ending at start + 1 .. len: a later occurrence overwrites an earlier one.
            for end in range(max(start + 1, n), len(self.tokens) + 1):
                table[tuple(self.tokens[end - n:end])] = end

    def propose(self, first: int, width: int) -> list[int]:
        """The draft after `first` (the context tower's next token): at most `width` tokens that
        followed the most recent earlier occurrence of the row's last n tokens, `first` included,
        trying the longest n first; [] when none occurs."""
        tokens, first = self.tokens, int(first)
        for n in self.ngrams:  # longest first: a longer match predicts further
            if len(tokens) < n:  # the row plus `first` is no longer than n: nothing earlier to match
                continue
            # The key is the row's last n - 1 tokens and `first`, built without copying the row (a hot path).
            end = self.last[n].get((*tokens[len(tokens) - n + 1:], first))
            if end is not None:
                draft = tokens[end:end + width]
                # A continuation that reaches the row's end runs on into `first`.
                return draft + [first] if end + width > len(tokens) else draft
        return []


class NgramLookup:
    """Which earlier n-grams `Speculative` looks up for a free draft (see the module docstring).

    Args:
        ngram: the n-gram size, or several (tried longest first). Byte-level models want longer
            ones (a byte trigram matches almost anywhere in code) than BPE models, where 3 tokens
            already name a phrase. Measured in benchmarks/README.md ("Prompt-lookup drafts").
        max_tokens: the longest lookup draft, in tokens after the context tower's own (None: the
            decoder's block size - 1). Longer than the denoiser's block pays where lookups run long
            and verifying a position is cheap; greedy decoding only (sampled rows verify one block),
            and with `Speculative(batch_block_size=...)` only while a row runs alone.
    """

    def __init__(self, ngram: int | Sequence[int] = 3, max_tokens: int | None = None):
        sizes = [ngram] if isinstance(ngram, int) else list(ngram) if isinstance(ngram, (list, tuple)) else None
        if not sizes or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in sizes):
            raise ValueError(f"ngram must be an int >= 1 or a non-empty list of them (the n-gram sizes to look up, "
                             f"e.g. 3 or [4, 3, 2]), got {ngram!r}")
        self.ngrams = tuple(sorted(set(sizes), reverse=True))
        self.max_tokens = check_int("max_tokens", max_tokens, optional=True)

    def __repr__(self) -> str:
        return f"NgramLookup(ngram={list(self.ngrams)}, max_tokens={self.max_tokens})"

    def index(self, tokens: Sequence[int]) -> RowIndex:
        """A fresh index over one row's tokens (its prompt, without padding)."""
        return RowIndex(self.ngrams, tokens)
