"""`TwoBranchSpeculative(lookup=...)`: the prompt-lookup draft as the second verified candidate.

* the per-row tree (`_lookup_tree`) puts the longer candidate in the main block and the other from
  their first difference, per row, and keeps the runner-up branch where a lookup adds nothing new;
* greedy output is `Autoregressive`'s, batched with left padding and alone, on a hybrid and a Llama;
* where the denoiser's draft is always wrong, every multi-token iteration comes from the lookup branch;
* `lookup_alone`: iterations whose lookups are all long enough run no denoiser forward, output AR's;
* sampled decoding ignores lookups (its draws must not depend on other rows), and the decoder contract holds;
* per-row branch lengths in `tree_layout`, `lookup` given as a dict, and lookup trees cut to fit a sliding window.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (MASK, PAD, ar_continuation, assert_lookup_decoder_keeps_ar_output, autoregressive, left_pad,
                      make_family_towers, make_towers, random_prompts, run_decoder)

from twotower.decoding import NgramLookup, Speculative, TwoBranchSpeculative
from twotower.decoding.tree_verify import tree_layout
from twotower.testing import check_decoder


def test_the_per_row_tree_puts_the_longer_candidate_first():
    d = [9, 1, 2, 3, 4]
    x = torch.tensor([d] * 4)
    alt = torch.tensor([[11, 12, 13, 14]] * 4)  # runner-ups of positions 1 .. 4
    j = torch.tensor([3, 2, 3, 3])
    found = [[],  # no lookup: d and the runner-up at 3
             [1, 2, 3, 4, 5, 6],  # d's continuation, longer: the main block, runner-up branch kept (at 2)
             [1, 7],  # differs at 2, shorter: d stays main, the lookup branches at 2
             [1, 7, 7, 7, 7, 7]]  # differs at 2, longer: the lookup is main, d branches at 2
    firsts = alt.gather(1, j[:, None] - 1)  # the runner-up at each fork
    main, branch, width, layout = TwoBranchSpeculative()._lookup_tree(x, firsts, j[:, None], found, MASK)
    assert main.tolist() == [d + [MASK] * 2, [9, 1, 2, 3, 4, 5, 6], d + [MASK] * 2, [9, 1, 7, 7, 7, 7, 7]]
    assert width.tolist() == [5, 7, 5, 7] and layout.j.tolist() == [3, 2, 2, 2]
    assert branch.tolist() == [[13, 4, MASK], [12, 3, 4], [7, MASK, MASK], [2, 3, 4]]
    assert layout.n == 7 and layout.m == 3
    assert layout.branch_valid.tolist() == [[True, True, False], [True] * 3, [True, False, False], [True] * 3]


def test_the_per_row_tree_with_two_forks():
    """The lookup takes the last fork's place where it differs from d; d's forks past that difference
    go where the lookup is the main block; a prefix lookup keeps both forks."""
    d = [9, 1, 2, 3, 4]
    x = torch.tensor([d] * 4)
    alt = torch.tensor([[11, 12, 13, 14]] * 4)
    forks = torch.tensor([[3, 1], [2, 4], [1, 3], [3, 4]])
    found = [[], [1, 2, 3, 4, 5, 6], [1, 7], [1, 7, 7, 7, 7, 7]]
    firsts = alt.gather(1, forks - 1)
    main, branch, width, layout = TwoBranchSpeculative(forks=2)._lookup_tree(x, firsts, forks, found, MASK)
    assert width.tolist() == [5, 7, 5, 7] and layout.widths == (4, 4)
    # Row 3: the lookup is main and differs at 2, so d's fork at 3 goes (an empty branch at 1).
    assert layout.forks.tolist() == [[3, 1], [2, 4], [1, 2], [1, 2]]
    assert layout.branch_valid.sum(-1).tolist() == [2 + 4, 3 + 1, 4 + 1, 0 + 3]  # row 1: d (a prefix) ends at 4
    assert branch[:, :4].tolist() == [[13, 4, MASK, MASK], [12, 3, 4, MASK], [11, 2, 3, 4], [MASK] * 4]
    assert branch[:, 4:].tolist() == [[11, 2, 3, 4], [14, MASK, MASK, MASK], [7, MASK, MASK, MASK], [2, 3, 4, MASK]]


def test_the_per_row_tree_with_lookups_alone():
    """`lookup_alone=3`: a row whose lookup has 3 tokens or more verifies it alone (its forks go, even
    where the lookup is d's own continuation); shorter lookups keep the tree."""
    d = [9, 1, 2, 3, 4]
    x = torch.tensor([d] * 3)
    forks = torch.tensor([[3, 1]] * 3)
    found = [[1, 7], [1, 2, 3], [7, 7, 7, 7, 7, 7]]
    firsts = torch.tensor([[13, 11]] * 3)
    decoder = TwoBranchSpeculative(forks=2, lookup=4, lookup_alone=3)
    main, branch, width, layout = decoder._lookup_tree(x, firsts, forks, found, MASK)
    assert main.tolist() == [d + [MASK] * 2, [9, 1, 2, 3] + [MASK] * 3, [9, 7, 7, 7, 7, 7, 7]]
    assert width.tolist() == [5, 4, 7]
    assert layout.branch_valid.sum(-1).tolist() == [2 + 1, 0, 0]  # row 0: d's fork at 3 and the lookup at 2


def test_tree_layout_takes_per_row_branch_lengths():
    layout = tree_layout(torch.tensor([1, 4, 2]), 6, torch.tensor([2, 1, 4]))
    assert layout.m == 4
    assert layout.branch_valid.sum(-1).tolist() == [2, 1, 4]
    with pytest.raises(ValueError, match="0 <= length <= n - j"):
        tree_layout(torch.tensor([1, 4]), 6, torch.tensor([2, 3]))  # row 1 has only positions 4, 5
    with pytest.raises(ValueError, match="per-row branch lengths"):
        tree_layout(torch.tensor([1, 4]), 6, torch.tensor([2.0, 1.0]))


@pytest.mark.parametrize("family", ["nemotron_h", "llama"])
@pytest.mark.parametrize("lookup", [1, NgramLookup([3, 2], max_tokens=12)])
@pytest.mark.parametrize("forks,alternatives", [(1, 1), (3, 1), (3, 2)])
def test_lookup_branches_keep_the_ar_output(family, lookup, forks, alternatives):
    ctx, den = make_towers(seed=6) if family == "nemotron_h" else make_family_towers(family, seed=6)
    # Repetitive prompts (a short vocabulary) so that lookups hit; left padding in the batch.
    decoder = TwoBranchSpeculative(block_size=6, lookup=lookup, forks=forks, alternatives=alternatives)
    assert_lookup_decoder_keeps_ar_output(decoder, ctx, den, 25)


class WrongDrafter(torch.nn.Module):
    """A denoiser stand-in whose draft and runner-up are never the context tower's tokens: each
    drafted position favours AR's token + 1, then + 2 (AR's own token gets the lowest logit)."""

    def __init__(self, ctx, vocab: int):
        super().__init__()
        self.ctx, self.vocab = ctx, vocab
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the stand-in a device

    def forward_block(self, x, cache, t=None):
        seq = ar_continuation(self.ctx, x, cache)
        logits = torch.zeros(*seq.shape, self.vocab)
        for shift, value in ((1, 6.0), (2, 5.0)):
            wrong = (seq + shift) % self.vocab
            wrong = torch.where(wrong == MASK, (wrong + 3) % self.vocab, wrong)
            logits.scatter_(2, wrong[..., None], value)
        logits.scatter_(2, seq[..., None], -5.0)
        return logits  # unshifted: output i predicts position i


class OracleLookup(NgramLookup):
    """A lookup that always proposes the row's true continuation (`truth`, AR's new tokens): it isolates
    the decoder's use of lookups from how often real n-grams recur."""

    def __init__(self, truth: list[int], max_tokens: int):
        super().__init__(1, max_tokens=max_tokens)
        self.truth = truth

    def index(self, tokens):
        return OracleIndex(list(tokens), self.truth)


class OracleIndex:
    """`RowIndex`'s interface over a known continuation."""

    def __init__(self, tokens: list[int], truth: list[int]):
        self.tokens, self.start, self.truth = tokens, len(tokens), truth

    def extend(self, tokens) -> None:
        self.tokens.extend(int(t) for t in tokens)

    def propose(self, first: int, width: int) -> list[int]:
        done = len(self.tokens) - self.start
        assert first == self.truth[done]  # the decoder asks after the token the context tower chose
        return self.truth[done + 1:done + 1 + width]


def test_with_a_draft_that_is_always_wrong_the_lookup_branch_gives_every_extra_token():
    ctx, _ = make_towers(seed=11)
    drafter = WrongDrafter(ctx, ctx.config.vocab_size)
    ids = torch.tensor([[5, 6, 7, 8] * 4])
    ar = autoregressive(ctx, ids, None, max_new_tokens=40, pad_token_id=PAD)
    plain = run_decoder(TwoBranchSpeculative(block_size=6), ctx, drafter, ids, max_new_tokens=40)
    assert torch.equal(plain.new_tokens, ar.new_tokens) and plain.blocks == 40  # one token per iteration
    # Lookups of 9 tokens, longer than the 6-position block: the lookup is the main block, the wrong
    # draft the branch, and each iteration keeps 1 + 9 tokens.
    lookup = OracleLookup(ar.new_tokens[0].tolist(), max_tokens=9)
    out = run_decoder(TwoBranchSpeculative(block_size=6, lookup=lookup), ctx, drafter, ids, max_new_tokens=40)
    assert torch.equal(out.new_tokens, ar.new_tokens) and out.blocks == 4
    # Lookups of 3: shorter than the wrong draft, so they are the branch (from position 1): 4 a time.
    lookup = OracleLookup(ar.new_tokens[0].tolist(), max_tokens=3)
    out = run_decoder(TwoBranchSpeculative(block_size=6, lookup=lookup), ctx, drafter, ids, max_new_tokens=40)
    assert torch.equal(out.new_tokens, ar.new_tokens) and out.blocks == 10


def test_long_lookups_alone_skip_the_denoiser():
    """`lookup_alone=k`: an iteration where every row's lookup has k tokens or more verifies the lookups
    alone (no denoiser forward, no tree); shorter ones keep the tree. The output is AR's either way."""
    ctx, _ = make_towers(seed=11)
    drafter = WrongDrafter(ctx, ctx.config.vocab_size)
    ids = torch.tensor([[5, 6, 7, 8] * 4])
    ar = autoregressive(ctx, ids, None, max_new_tokens=40, pad_token_id=PAD)
    truth = ar.new_tokens[0].tolist()
    for lookup_alone, forwards in ((9, 0), (10, 4)):  # the oracle's lookups have 9 tokens, the last one 3
        decoder = TwoBranchSpeculative(block_size=6, lookup=OracleLookup(truth, max_tokens=9), forks=2,
                                       lookup_alone=lookup_alone)
        out = run_decoder(decoder, ctx, drafter, ids, max_new_tokens=40)
        assert torch.equal(out.new_tokens, ar.new_tokens) and out.blocks == 4
        assert out.nfe.tolist() == [forwards], lookup_alone


@pytest.mark.parametrize("family", ["nemotron_h", "llama"])
@pytest.mark.parametrize("lookup_alone", [1, 3])
def test_lookup_alone_keeps_the_ar_output(family, lookup_alone):
    ctx, den = make_towers(seed=6) if family == "nemotron_h" else make_family_towers(family, seed=6)
    decoder = TwoBranchSpeculative(block_size=6, lookup=NgramLookup([3, 2], max_tokens=12), forks=3, alternatives=2,
                                   lookup_alone=lookup_alone)
    assert_lookup_decoder_keeps_ar_output(decoder, ctx, den, 25)


def test_lookup_alone_needs_a_lookup_and_a_positive_length():
    with pytest.raises(ValueError, match=r"lookup_alone=8 needs lookup .*lookup=4, lookup_alone=8"):
        TwoBranchSpeculative(lookup_alone=8)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="lookup_alone"):
            TwoBranchSpeculative(lookup=4, lookup_alone=bad)
    towers_key = TwoBranchSpeculative(lookup=4).rule_key()
    assert TwoBranchSpeculative(lookup=4, lookup_alone=8).rule_key() != towers_key  # not verified together


def test_sampled_rows_ignore_lookups():
    ctx, den = make_towers(seed=8)
    ids, mask = left_pad(random_prompts([5, 9], seed=8))
    runs = [run_decoder(TwoBranchSpeculative(block_size=6, temperature=0.8, lookup=lookup), ctx, den, ids, mask,
                        max_new_tokens=20, generator=torch.Generator().manual_seed(4)) for lookup in (None, 1)]
    assert torch.equal(runs[0].new_tokens, runs[1].new_tokens) and runs[0].blocks == runs[1].blocks


@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("forks,alternatives", [(1, 1), (2, 2)])
def test_two_branch_lookup_passes_the_decoder_contract(temperature, forks, alternatives):
    check_decoder(TwoBranchSpeculative(lookup=[2, 1], temperature=temperature, forks=forks, alternatives=alternatives))
    check_decoder(TwoBranchSpeculative(lookup=[2, 1], temperature=temperature, forks=forks, alternatives=alternatives,
                                       lookup_alone=2))


def test_lookup_as_a_dict_and_bad_dicts():
    assert repr(Speculative(lookup={"ngram": 4, "max_tokens": 32}).lookup) == "NgramLookup(ngram=[4], max_tokens=32)"
    assert TwoBranchSpeculative(lookup={"ngram": [3, 2]}).lookup.ngrams == (3, 2)
    with pytest.raises(ValueError, match="keys 'ngram', 'max_tokens'"):
        Speculative(lookup={"n": 3})


@pytest.mark.parametrize("prompt_len", [5, 9, 13])
def test_lookup_trees_fit_a_request_that_ends_at_a_sliding_window(prompt_len):
    """Lookups longer than the block would widen the tree past Mistral's window: they are cut so that
    the main block and its branch fit, and greedy output stays AR's up to the window's last position."""
    from conftest import tiny_mistral_config

    from twotower.decoding import Autoregressive
    from twotower.model import TwoTowerLM
    from twotower.tokenizers import BYTE_TOKENIZER, ByteTokenizer

    torch.manual_seed(0)
    config = tiny_mistral_config(vocab_size=ByteTokenizer().vocab_size, sliding_window=24, tokenizer=BYTE_TOKENIZER)
    model = TwoTowerLM(config, block_size=4).eval()
    ids = torch.tensor([[7, 8, 9] * (prompt_len // 3) + [7] * (prompt_len % 3)])  # repeats: lookups hit
    with torch.inference_mode():
        want = model.generate(ids, decoder=Autoregressive(), max_new_tokens=24 - prompt_len)
        truth = OracleLookup(want.new_tokens[0].tolist(), max_tokens=12)  # always right, 12 tokens where room
        for lookup in (NgramLookup(1, max_tokens=12), truth):
            for forks, alone in ((1, None), (2, None), (2, 3)):  # 3: lookups cut to fit may fall short of it
                decoder = TwoBranchSpeculative(block_size=4, lookup=lookup, forks=forks, lookup_alone=alone)
                got = model.generate(ids, decoder=decoder, max_new_tokens=24 - prompt_len)
                assert torch.equal(got.new_tokens, want.new_tokens), (lookup, forks, alone)
