"""Prompt-lookup drafts (`twotower.decoding.lookup`, `Speculative(lookup=...)`).

* `RowIndex.propose` equals a plain backwards scan of the row (the independent reference), on
  repetitive random rows extended piece by piece, for every n-gram setting;
* `Speculative(lookup=...)` gives `Autoregressive`'s output (greedy), follows AR's distribution
  (sampled), skips the denoiser where every row found a draft, and passes the decoder contract,
  the server's joining and leaving rows included;
* bad settings are refused by name.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import (PAD, assert_first_two_tokens_follow_ar, assert_lookup_decoder_keeps_ar_output, autoregressive,
                      make_towers, run_decoder)

from twotower.decoding import NgramLookup, Speculative
from twotower.testing import check_decoder


def naive_propose(tokens: list[int], first: int, width: int, ngrams: tuple[int, ...]) -> list[int]:
    """The reference: scan the row backwards for the latest earlier occurrence of its last n tokens."""
    seq = tokens + [first]
    for n in sorted(ngrams, reverse=True):
        key = seq[-n:]
        for start in range(len(seq) - n - 1, -1, -1):
            if len(seq) > n and seq[start:start + n] == key:
                return seq[start + n:start + n + width]
    return []


@pytest.mark.parametrize("ngram", [1, 2, 3, [4, 2], [3, 2, 1]])
def test_propose_equals_a_backwards_scan_as_the_row_grows(ngram):
    rng = random.Random(str(ngram))
    lookup = NgramLookup(ngram)
    for _ in range(20):
        tokens = [rng.randrange(4) for _ in range(rng.randrange(0, 6))]
        index = lookup.index(tokens)
        for _ in range(12):
            first, width = rng.randrange(4), rng.randrange(1, 7)
            assert index.propose(first, width) == naive_propose(tokens, first, width, lookup.ngrams)
            piece = [rng.randrange(4) for _ in range(rng.randrange(0, 4))]
            index.extend(piece)
            tokens = tokens + piece
        assert index.tokens == tokens


def test_propose_finds_the_latest_occurrence_and_nothing_in_a_fresh_row():
    index = NgramLookup(2).index([5, 6, 7, 5, 6, 8, 9])
    assert index.propose(6, 3) == []  # (9, 6) never occurred
    index.extend([5])
    assert index.propose(6, 3) == [8, 9, 5]  # (5, 6) last occurred before 8, not before 7
    assert index.propose(6, 10) == [8, 9, 5, 6]  # the continuation runs into the drafted-from token
    assert NgramLookup(3).index([]).propose(1, 4) == []


@pytest.mark.parametrize("lookup", [1, [3, 2]])
def test_lookup_drafts_keep_the_ar_output(lookup):
    ctx, den = make_towers(seed=6)
    assert_lookup_decoder_keeps_ar_output(Speculative(block_size=6, lookup=lookup), ctx, den, 21)


def test_an_iteration_where_every_row_found_a_draft_runs_no_denoiser_forward():
    ctx, den = make_towers(seed=7)
    ids = torch.tensor([[4, 5, 6, 7] * 4])
    calls = []
    den.forward_block = (lambda f: lambda *a, **k: calls.append(1) or f(*a, **k))(den.forward_block)
    plain = run_decoder(Speculative(block_size=6), ctx, den, ids, max_new_tokens=24)
    plain_calls, calls[:] = len(calls), []
    out = run_decoder(Speculative(block_size=6, lookup=1), ctx, den, ids, max_new_tokens=24)
    assert torch.equal(out.new_tokens, plain.new_tokens)
    assert plain_calls == plain.blocks == int(plain.nfe[0])  # without lookups: one draft per iteration
    # With them, some iterations draft from the row alone, and `nfe` counts only the denoiser's forwards.
    assert len(calls) < out.blocks and int(out.nfe[0]) == len(calls)


def test_lookup_sampling_follows_the_ar_distribution():
    """A lookup draft is as deterministic as a denoiser draft: the kept tokens are still the context
    tower's own samples (prompts over a vocabulary of 4, so a unigram lookup always drafts)."""
    ctx, den = make_towers(seed=13, vocab_size=8)
    ids = torch.randint(4, 8, (1, 5)).expand(2000, 5).contiguous()
    out = run_decoder(Speculative(block_size=3, temperature=1.0, lookup=1), ctx, den, ids, max_new_tokens=2,
                      generator=torch.Generator().manual_seed(0))
    assert_first_two_tokens_follow_ar(ctx, ids, out)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_lookup_decoder_passes_the_decoder_contract(temperature):
    # n-grams of 1 and 2 over the tiny model's random prompts: rows with and without a draft mix.
    check_decoder(Speculative(lookup=[2, 1], temperature=temperature))


@pytest.mark.parametrize("bad", [0, True, [], [3, 0], "3", 2.0])
def test_bad_lookup_settings_are_refused(bad):
    with pytest.raises(ValueError, match="ngram must be|lookup must be"):
        Speculative(lookup=bad)


def test_lookup_changes_the_batch_key_and_shows_in_repr():
    towers_like = type("T", (), {"block_size": 8})()
    assert Speculative(lookup=3).batch_key(towers_like) != Speculative().batch_key(towers_like)
    assert "NgramLookup(ngram=[3], max_tokens=None)" in repr(Speculative(lookup=3))


@pytest.mark.parametrize("bad", [0, True, 2.0])
def test_bad_max_tokens_are_refused(bad):
    with pytest.raises(ValueError, match="max_tokens must be an int >= 1"):
        NgramLookup(3, max_tokens=bad)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_lookups_longer_than_the_block_keep_the_output(temperature):
    """max_tokens past the denoiser's block: greedy iterations verify up to 1 + max_tokens positions,
    sampled ones one block; the output is AR's (greedy) or the same seeded sample as with block-long
    lookups. A vocabulary of 4 real tokens and a long prompt: a unigram lookup always finds a draft."""
    ctx, den = make_towers(seed=8, vocab_size=8)
    ids = torch.randint(4, 8, (2, 40), generator=torch.Generator().manual_seed(8))
    widths = []
    extend = ctx.extend
    ctx.extend = lambda cache, tokens, **k: widths.append(tokens.shape[1]) or extend(cache, tokens, **k)
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    long = run_decoder(Speculative(block_size=4, lookup=NgramLookup(1, max_tokens=12), temperature=temperature),
                       ctx, den, ids, max_new_tokens=30, generator=gen())
    assert max(widths) == (13 if temperature == 0 else 4)
    short = run_decoder(Speculative(block_size=4, lookup=1, temperature=temperature), ctx, den, ids,
                        max_new_tokens=30, generator=gen())
    assert torch.equal(long.new_tokens, short.new_tokens)
    if temperature == 0:
        ar = autoregressive(ctx, ids, max_new_tokens=30, pad_token_id=PAD)
        assert torch.equal(long.new_tokens, ar.new_tokens)
    check_decoder(Speculative(lookup=NgramLookup([2, 1], max_tokens=7), temperature=temperature))


def test_lookups_stay_within_batch_block_size_while_rows_share_the_batch():
    ctx, den = make_towers(seed=8, vocab_size=8)
    ids = torch.randint(4, 8, (2, 40), generator=torch.Generator().manual_seed(8))
    widths = []
    extend = ctx.extend
    ctx.extend = lambda cache, tokens, **k: widths.append((cache.batch_size, tokens.shape[1])) or extend(cache, tokens, **k)
    dec = Speculative(block_size=6, batch_block_size=3, lookup=NgramLookup(1, max_tokens=12))
    out = run_decoder(dec, ctx, den, ids, max_new_tokens=30)
    ar = autoregressive(ctx, ids, max_new_tokens=30, pad_token_id=PAD)
    assert torch.equal(out.new_tokens, ar.new_tokens)
    shared = [w for rows, w in widths if rows == 2 and w > 1]  # the verifies while both rows run
    assert shared and max(shared) <= 3
