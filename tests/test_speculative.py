"""Speculative (lossless) two-tower decoding: state rollback in closed form, provisional extends with
per-row acceptance (holes in the cache), and `generate_speculative` == `generate_ar` token for token."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import (MASK, PAD, assert_first_two_tokens_follow_ar, autoregressive, dt_regimes, left_pad, make_towers,
                      random_prompts, run_decoder, speculative)

from twotower.decoding import RowTracker, Speculative, TokenChooser, Towers, denoise_block, draft_one_step
from twotower.schedules import FullMaskMix, LinearSchedule, StratifiedTime, mask_blocks
from twotower.testing import check_rows_independent
from twotower.towers.nemotron_h.ssd import conv_state_at, ssd_state_at


# ---- closed-form states vs the plain recurrence ------------------------------------------------


def recurrence_states(x, dt, A, B, init):
    """Every state of the plain per-step recurrence: (b, L + 1, h, p, n), index 0 = init."""
    b, L, h, p = x.shape
    g = B.shape[2]
    Bh = B.repeat_interleave(h // g, dim=2)
    state = init.clone()
    out = [state]
    for t in range(L):
        decay = torch.exp(dt[:, t] * A)[..., None, None]  # (b, h, 1, 1)
        state = decay * state + (dt[:, t, :, None] * x[:, t])[..., None] * Bh[:, t, :, None, :]
        out.append(state)
    return torch.stack(out, 1)


@pytest.mark.parametrize("with_init", [True, False])
def test_ssd_state_at_equals_the_recurrence_at_every_position(with_init):
    g = torch.Generator().manual_seed(0)
    b, L, h, p, n, groups = 3, 11, 4, 5, 6, 2
    x = torch.randn(b, L, h, p, generator=g)
    dt = torch.rand(b, L, h, generator=g) * 0.5 + 0.01
    A = -torch.rand(h, generator=g) * 2
    B = torch.randn(b, L, groups, n, generator=g)
    init = torch.randn(b, h, p, n, generator=g) if with_init else torch.zeros(b, h, p, n)
    ref = recurrence_states(x, dt, A, B, init)
    for last in ([-1, 0, L - 1], [4, L - 1, -1], [2, 7, 9]):
        last = torch.tensor(last)
        got = ssd_state_at(x, dt, A, B, initial_state=init if with_init else None, last=last)
        want = ref[torch.arange(b), last + 1]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_conv_state_at_is_the_last_inputs_before_the_kept_prefix():
    g = torch.Generator().manual_seed(1)
    b, c, k, L = 3, 5, 4, 7
    init = torch.randn(b, c, k - 1, generator=g)
    x = torch.randn(b, L, c, generator=g)
    keep = torch.tensor([0, 2, L])
    got = conv_state_at(init, x, keep)
    for r in range(b):
        history = torch.cat([init[r], x[r, : keep[r]].T], dim=1)  # (c, k - 1 + keep)
        torch.testing.assert_close(got[r], history[:, -(k - 1):])


# ---- provisional extend + accept ----------------------------------------------------------------


@dt_regimes
def test_accept_equals_appending_only_the_kept_tokens_per_row(regime):
    """Row r keeps keep[r] of a provisional block; afterwards the cache behaves, for the context
    (next extend) and for the denoiser (forward_block), as if only those tokens had been appended.
    In the low-dt regimes the closed-form rollback must use the clamped time steps."""
    ctx, den = make_towers(seed=3, **regime)
    ids, mask = left_pad(random_prompts([5, 9, 7, 6], seed=3))
    block = torch.randint(4, 64, (4, 6))
    after = torch.randint(4, 64, (4, 3))
    nxt_block = torch.randint(4, 64, (4, 6))
    keep = torch.tensor([2, 6, 0, 1])
    t = torch.full((4,), 0.5)
    with torch.inference_mode():
        _, cache = ctx.prefill(ids, mask, logits="none")
        ctx.extend(cache, block, provisional=True)
        ctx.accept(cache, keep)
        assert cache.length == ids.shape[1] + 6 and cache.padded
        den_out = den.forward_block(nxt_block, cache, t)
        out = ctx.extend(cache, after)
        for r in range(4):
            real = mask[r].bool()
            _, ref_cache = ctx.prefill(ids[r:r + 1, real], logits="none")
            if keep[r] > 0:
                ctx.extend(ref_cache, block[r:r + 1, : keep[r]])
            ref_den = den.forward_block(nxt_block[r:r + 1], ref_cache, t[r:r + 1])
            ref = ctx.extend(ref_cache, after[r:r + 1])
            torch.testing.assert_close(out[r], ref[0], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(den_out[r], ref_den[0], rtol=1e-4, atol=1e-4)


@dt_regimes
def test_full_accept_equals_a_normal_extend(regime):
    ctx, _ = make_towers(seed=4, **regime)
    ids = torch.randint(4, 64, (2, 9))
    block = torch.randint(4, 64, (2, 5))
    with torch.inference_mode():
        _, a = ctx.prefill(ids, logits="none")
        _, b = ctx.prefill(ids, logits="none")
        la = ctx.extend(a, block, provisional=True)
        ctx.accept(a, torch.tensor([5, 5]))
        lb = ctx.extend(b, block)
        torch.testing.assert_close(la, lb)
        assert a.length == b.length and not a.padded
        for sa, sb in zip(a.ssm + a.conv, b.ssm + b.conv):
            if sa is not None:
                torch.testing.assert_close(sa, sb, rtol=1e-5, atol=1e-6)


def test_a_pending_block_must_be_accepted_before_anything_else():
    ctx, den = make_towers(seed=5)
    ids = torch.randint(4, 64, (2, 6))
    with torch.inference_mode():
        _, cache = ctx.prefill(ids, logits="none")
        with pytest.raises(RuntimeError, match="no provisional block"):
            ctx.accept(cache, torch.tensor([1, 1]))
        ctx.extend(cache, torch.randint(4, 64, (2, 4)), provisional=True)
        for action in (lambda: ctx.extend(cache, ids[:, :1]), lambda: den.forward_block(ids[:, :4], cache),
                       cache.clone, lambda: cache.mirror_to("cpu")):
            with pytest.raises(RuntimeError, match="accept"):
                action()
        with pytest.raises(ValueError, match="keep must be"):
            ctx.accept(cache, torch.tensor([1, 1, 1]))
        with pytest.raises(ValueError, match=r"keep must lie in \[0, 4\]"):
            ctx.accept(cache, torch.tensor([5, 1]))
        ctx.accept(cache, torch.tensor([4, 3]))  # the failed calls left it usable
        assert cache.pending is None and cache.length == 10


# ---- generate_speculative -------------------------------------------------------------------------


class PerfectDrafter(torch.nn.Module):
    """A denoiser stand-in whose draft is the context tower's own greedy continuation (computed by
    stepping the context tower on a copy of the cache), so every drafted token is accepted."""

    def __init__(self, ctx, shifted: bool, vocab: int):
        super().__init__()
        self.ctx, self.shifted, self.vocab = ctx, shifted, vocab
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the stand-in a device
        self.calls = 0

    def forward_block(self, x, cache, t=None):
        self.calls += 1
        work = cache.clone()
        tok, seq = x[:, :1], [x[:, 0]]
        for _ in range(x.shape[1] - 1):
            tok = self.ctx.extend(work, tok, logits="last")[:, -1].argmax(-1, keepdim=True)
            seq.append(tok[:, 0])
        seq = torch.stack(seq, 1)  # (b, n): the AR continuation starting with x[:, 0]
        want = torch.cat([seq[:, 1:], seq[:, -1:]], 1) if self.shifted else seq
        return torch.nn.functional.one_hot(want, self.vocab).float() * 10


@dt_regimes
@pytest.mark.parametrize("shifted", [True, False])
@pytest.mark.parametrize("draft_steps", [1, 3])
def test_speculative_output_is_the_ar_output(shifted, draft_steps, regime):
    ctx, den = make_towers(seed=6, **regime)
    ids, mask = left_pad(random_prompts([4, 9, 6], seed=6))
    ar = autoregressive(ctx, ids, mask, max_new_tokens=21, pad_token_id=PAD)
    out = speculative(ctx, den, ids, mask, shifted=shifted, draft_steps=draft_steps)
    assert torch.equal(out.new_tokens, ar.new_tokens)
    assert out.num_generated.tolist() == [21, 21, 21]
    assert torch.all(out.nfe <= out.blocks * draft_steps) and out.blocks >= math.ceil(21 / 6)


@pytest.mark.parametrize("shifted", [True, False])
def test_a_perfect_draft_is_accepted_whole(shifted):
    ctx, _ = make_towers(seed=9)
    ids, mask = left_pad(random_prompts([5, 8], seed=9))
    drafter = PerfectDrafter(ctx, shifted, 64)
    ar = autoregressive(ctx, ids, mask, max_new_tokens=24, pad_token_id=PAD)
    # A draft never holds [MASK]; this seed's AR output has none (a random model can emit it).
    assert not (ar.new_tokens == MASK).any()
    out = speculative(ctx, drafter, ids, mask, shifted=shifted, max_new_tokens=24, block_size=6)
    assert torch.equal(out.new_tokens, ar.new_tokens)
    assert out.blocks == 4 and drafter.calls == 4  # 6 tokens per iteration
    assert out.tokens_per_nfe.tolist() == [6.0, 6.0]


def test_rows_that_accept_different_lengths_stay_independent():
    """Batch output equals each prompt run alone (holes from other rows' rejections are invisible)."""
    ctx, den = make_towers(seed=9)
    ids, mask = left_pad(random_prompts([3, 10, 6, 8], seed=9))
    batch = speculative(ctx, den, ids, mask, max_new_tokens=30, shifted=True)
    towers = Towers(ctx, den, mask_token_id=MASK, pad_token_id=PAD, shifted=True)
    check_rows_independent(Speculative(block_size=6), towers, ids, mask, batch, 30, None)


def test_eos_and_max_new_tokens_end_rows_like_ar():
    ctx, den = make_towers(seed=10)
    ids, mask = left_pad(random_prompts([4, 7], seed=10))
    free = autoregressive(ctx, ids, mask, max_new_tokens=19, pad_token_id=PAD)
    eos = int(free.new_tokens[0, 5])
    ar = autoregressive(ctx, ids, mask, max_new_tokens=19, pad_token_id=PAD, eos_token_id=eos)
    out = speculative(ctx, den, ids, mask, max_new_tokens=19, eos_token_id=eos, shifted=True)
    assert torch.equal(out.num_generated, ar.num_generated)
    assert torch.equal(out.sequences, ar.sequences)


def test_two_device_mirror_path_gives_the_same_output():
    ctx, den = make_towers(seed=11)
    ids, mask = left_pad(random_prompts([5, 3], seed=11))
    shared = speculative(ctx, den, ids, mask, shifted=True)
    mirrored = speculative(ctx, den, ids, mask, shifted=True, denoiser_device="cpu")
    assert torch.equal(shared.new_tokens, mirrored.new_tokens) and torch.equal(shared.nfe, mirrored.nfe)


def test_sampling_is_seeded_and_a_cold_temperature_is_greedy():
    ctx, den = make_towers(seed=12)
    ids = torch.randint(4, 64, (2, 6))
    run = lambda seed, temp: speculative(ctx, den, ids, temperature=temp,  # noqa: E731
                                         generator=torch.Generator().manual_seed(seed)).new_tokens
    assert torch.equal(run(0, 1.0), run(0, 1.0))
    assert not torch.equal(run(0, 1.0), run(1, 1.0))
    greedy = autoregressive(ctx, ids, max_new_tokens=21, pad_token_id=PAD).new_tokens
    assert torch.equal(run(0, 1e-4), greedy)


def test_speculative_sampling_follows_the_ar_distribution():
    """With temperature 1 every kept token is the context tower's own sample: the first generated
    token's frequencies match softmax(prefill logits) (a chi-square-style bound over 2000 draws)."""
    ctx, den = make_towers(seed=13, vocab_size=8)
    ids = torch.randint(4, 8, (1, 5)).expand(2000, 5).contiguous()
    out = speculative(ctx, den, ids, max_new_tokens=2, block_size=2, temperature=1.0, shifted=True,
                      generator=torch.Generator().manual_seed(0))
    # the second token, drawn after an accepted or a corrected first one, is AR's conditional too
    assert_first_two_tokens_follow_ar(ctx, ids, out)


def test_bad_speculative_arguments_raise_clear_errors():
    ctx, den = make_towers(seed=14)
    ids = torch.randint(4, 64, (1, 4))
    with pytest.raises(ValueError, match="draft_steps"):
        speculative(ctx, den, ids, draft_steps=0)
    with pytest.raises(ValueError, match="block_size >= 2"):
        speculative(ctx, den, ids, block_size=1)


# ---- the one-step draft path and the draft cut ---------------------------------------------------


def one_step_setup(seed):
    ctx, den = make_towers(seed=seed)
    ids, mask = left_pad(random_prompts([5, 8, 3], seed=seed))
    with torch.inference_mode():
        _, cache = ctx.prefill(ids, mask, logits="none")
    first = torch.randint(4, 64, (3,), generator=torch.Generator().manual_seed(seed))
    return den, cache, first, torch.tensor([0, 2, 3])  # rows: the working rows of a 4-row tracker


def tracker4():
    return RowTracker(4, 10, spare=6, pad_token_id=PAD, eos=None, device="cpu", start=0.0)


@pytest.mark.parametrize("shifted", [True, False])
def test_one_step_draft_equals_denoise_block(shifted):
    """draft_one_step gives the reference's tokens, NFE counts and step-callback arguments."""
    den, cache, first, rows = one_step_setup(15)
    seen, trackers = {}, (tracker4(), tracker4())
    with torch.inference_mode():
        ref = denoise_block(den, cache, 6, sampler=None, steps=1, mask_token_id=MASK, chooser=TokenChooser(),
                            generator=None, tracker=trackers[0], rows=rows, block_index=2,
                            step_callback=lambda *a: seen.setdefault("ref", a), first=first, shift=shifted,
                            fill_last=True)
        got, width = draft_one_step(den, cache, 6, first=first, shift=shifted, mask_token_id=MASK,
                                    tracker=trackers[1], rows=rows, block_index=2,
                                    step_callback=lambda *a: seen.setdefault("got", a))
    assert width is None and torch.equal(got, ref) and torch.equal(trackers[0].nfe, trackers[1].nfe)
    assert trackers[1].nfe.tolist() == [1, 0, 1, 1]
    for a, b in zip(seen["ref"], seen["got"], strict=True):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


@pytest.mark.parametrize("shifted", [True, False])
def test_draft_cut_width_is_the_confident_prefix(shifted):
    """width[r] = 1 + the leading drafted positions whose running product of probabilities >= cut."""
    den, cache, first, rows = one_step_setup(16)
    n, cut = 6, 0.02
    with torch.inference_mode():
        x, width = draft_one_step(den, cache, n, first=first, shift=shifted, mask_token_id=MASK,
                                  tracker=tracker4(), rows=rows, block_index=0, cut=cut)
        block = torch.full((3, n), MASK)
        block[:, 0] = first
        logits = den.forward_block(block, cache, torch.full((3,), (n - 1) / n))
    for r in range(3):
        want, running = 1, 1.0
        for i in range(1, n):
            row = logits[r, i - 1 if shifted else i].double()
            row[MASK] = float("-inf")
            assert int(x[r, i]) == int(row.argmax())
            running *= float(row.softmax(-1).max())
            if running < cut:
                break
            want += 1
        assert int(width[r]) == want
    assert 1 <= int(width.min()) and int(width.max()) <= n


def test_draft_cut_keeps_the_ar_output_and_shortens_the_verify(monkeypatch):
    ctx, den = make_towers(seed=6)
    prompts = random_prompts([4, 9, 6], seed=6)
    ids, mask = left_pad(prompts)
    ar = autoregressive(ctx, ids, mask, max_new_tokens=21, pad_token_id=PAD)
    widths, real = [], ctx.extend

    def spy(cache, tokens, **kw):
        widths.append(tokens.shape[1])
        return real(cache, tokens, **kw)

    monkeypatch.setattr(ctx, "extend", spy)
    cut = Speculative(block_size=6, draft_cut=0.5)
    out = run_decoder(cut, ctx, den, ids, mask, max_new_tokens=21, shifted=True)
    assert torch.equal(out.new_tokens, ar.new_tokens)
    assert min(widths) < 6  # this random denoiser is unsure: some verifies were cut short
    for r, p in enumerate(prompts):  # a row's draft length is its own: alone it takes the same iterations
        alone = run_decoder(cut, ctx, den, p[None], max_new_tokens=21, shifted=True)
        assert torch.equal(out.new_tokens[r], alone.new_tokens[0]) and int(out.nfe[r]) == int(alone.nfe[0])


def test_draft_cut_leaves_sampling_alone_and_checks_its_value():
    ctx, den = make_towers(seed=12)
    ids = torch.randint(4, 64, (2, 6))
    runs = [run_decoder(Speculative(block_size=6, draft_cut=c, temperature=1.0), ctx, den, ids, max_new_tokens=15,
                        shifted=True, generator=torch.Generator().manual_seed(0)) for c in (0.0, 0.9)]
    assert torch.equal(runs[0].new_tokens, runs[1].new_tokens) and torch.equal(runs[0].nfe, runs[1].nfe)
    for bad in (1.0, -0.1, True, "0.1"):
        with pytest.raises(ValueError, match="draft_cut"):
            Speculative(draft_cut=bad)


def test_batch_block_size_drafts_shorter_while_rows_share_the_batch(monkeypatch):
    """batch_block_size: 4-position drafts while more than one row runs, block_size (6) for a lone
    row; the output is AR's either way."""
    ctx, den = make_towers(seed=10)
    ids, mask = left_pad(random_prompts([4, 7, 5], seed=10))
    free = autoregressive(ctx, ids, mask, max_new_tokens=30, pad_token_id=PAD)
    eos = int(free.new_tokens[1, 3])  # row 1 stops early, so the working batch shrinks
    ar = autoregressive(ctx, ids, mask, max_new_tokens=30, pad_token_id=PAD, eos_token_id=eos)
    shapes, real = [], ctx.extend

    def spy(cache, tokens, **kw):
        shapes.append(tuple(tokens.shape))
        return real(cache, tokens, **kw)

    monkeypatch.setattr(ctx, "extend", spy)
    dec = Speculative(block_size=6, batch_block_size=4)
    out = run_decoder(dec, ctx, den, ids, mask, max_new_tokens=30, eos_token_id=eos, shifted=True)
    assert torch.equal(out.sequences, ar.sequences) and torch.equal(out.num_generated, ar.num_generated)
    assert shapes[0] == (3, 4) and all(m == (4 if r > 1 else 6) for r, m in shapes)
    shapes.clear()
    alone = run_decoder(dec, ctx, den, ids[:1], mask[:1], max_new_tokens=30, eos_token_id=eos, shifted=True)
    assert torch.equal(alone.new_tokens[0, : int(alone.num_generated[0])],
                       ar.new_tokens[0, : int(ar.num_generated[0])])
    assert {m for _, m in shapes} == {6}
    with pytest.raises(ValueError, match="batch_block_size >= 2"):
        Speculative(batch_block_size=1)


# ---- training for one-step drafts ------------------------------------------------------------------


def test_full_mask_mix_masks_a_share_of_blocks_completely():
    g = torch.Generator().manual_seed(0)
    t = FullMaskMix(p_full=0.3).sample((400, 10), generator=g)
    full = t == 1.0
    assert 0.25 < float(full.float().mean()) < 0.35
    assert torch.all((t[~full] >= 1e-3) & (t[~full] < 1.0))
    x = torch.randint(4, 64, (400, 160))
    _, masked, t_act = mask_blocks(x, 16, t, MASK, schedule=LinearSchedule(), generator=g)
    assert torch.all(t_act[full] == 1.0)
    assert torch.all(FullMaskMix(p_full=0.0, base=StratifiedTime()).sample((5, 3), generator=g) < 1.0)
    with pytest.raises(ValueError, match="p_full"):
        FullMaskMix(p_full=1.5)


def test_finished_rows_leave_the_working_batch(monkeypatch):
    """Once a row finishes (EOS here), later forwards run without it; outputs are unchanged."""
    ctx, den = make_towers(seed=10)
    ids, mask = left_pad(random_prompts([4, 7, 5], seed=10))
    free = autoregressive(ctx, ids, mask, max_new_tokens=30, pad_token_id=PAD)
    eos = int(free.new_tokens[1, 3])  # row 1 stops early (others may too)
    ar = autoregressive(ctx, ids, mask, max_new_tokens=30, pad_token_id=PAD, eos_token_id=eos)
    sizes, real = [], ctx.extend

    def spy(cache, tokens, **kw):
        sizes.append(tokens.shape[0])
        return real(cache, tokens, **kw)

    monkeypatch.setattr(ctx, "extend", spy)
    out = speculative(ctx, den, ids, mask, max_new_tokens=30, eos_token_id=eos, shifted=True)
    assert torch.equal(out.sequences, ar.sequences) and torch.equal(out.num_generated, ar.num_generated)
    assert sizes == sorted(sizes, reverse=True) and sizes[0] == 3
    assert sizes[-1] < 3  # the last iterations ran without the rows that had finished


# ---- hole compaction ------------------------------------------------------------------------------


def holey_cache(ctx, seed=3):
    """A batch cache with holes from left padding and from per-row acceptance."""
    ids, mask = left_pad(random_prompts([5, 9, 7, 6], seed=seed))
    with torch.inference_mode():
        _, cache = ctx.prefill(ids, mask, logits="none")
        ctx.extend(cache, torch.randint(4, 64, (4, 6)), provisional=True)
        ctx.accept(cache, torch.tensor([2, 6, 0, 1]))
        ctx.extend(cache, torch.randint(4, 64, (4, 5)), provisional=True)
        ctx.accept(cache, torch.tensor([5, 1, 3, 0]))
    return cache, mask


def test_compact_moves_real_positions_to_the_front_and_changes_no_output():
    ctx, den = make_towers(seed=3)
    cache, mask = holey_cache(ctx)
    counts = cache.valid_mask().sum(1)
    assert cache.length == 9 + 6 + 5 and counts.tolist() == [5 + 2 + 5, 9 + 6 + 1, 7 + 0 + 3, 6 + 1 + 0]
    assert cache.hole_bound >= cache.length - int(counts.max())  # the host-side bound holds
    block, after, t = torch.randint(4, 64, (4, 6)), torch.randint(4, 64, (4, 3)), torch.full((4,), 0.5)
    before = cache.clone()
    with torch.inference_mode():
        removed = cache.compact()
    assert removed == 20 - 16 and cache.length == 16 and cache.padded and cache.hole_bound == 0
    expected = torch.arange(16)[None, :] < counts[:, None]
    assert torch.equal(cache.valid_mask(), expected)
    for i, k in enumerate(before.keys):  # each row's real keys / values, in their order
        if k is None:
            continue
        for r in range(4):
            real = before.valid_mask()[r]
            torch.testing.assert_close(cache.keys[i][r, :, : counts[r]], k[r, :, : before.length][:, real])
            torch.testing.assert_close(cache.values[i][r, :, : counts[r]], before.values[i][r, :, : before.length][:, real])
    with torch.inference_mode():
        torch.testing.assert_close(den.forward_block(block, cache, t), den.forward_block(block, before, t),
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ctx.extend(cache, after), ctx.extend(before, after), rtol=1e-5, atol=1e-5)
        assert cache.length == 16 + 3 and before.length == 20 + 3


def test_compact_respects_min_gain_and_refuses_a_pending_cache():
    ctx, _ = make_towers(seed=4)
    cache, _ = holey_cache(ctx, seed=4)
    snapshot = cache.clone()
    with torch.inference_mode():
        assert cache.compact(min_gain=5) == 0  # only 4 positions to gain: nothing moves
        assert cache.length == snapshot.length and torch.equal(cache.key_mask, snapshot.key_mask)
        assert cache.hole_bound == 4  # made exact by the look
        # Dropping the fullest row (row 1) can only raise the gain: the bound turns conservative.
        rest = cache.select(torch.tensor([0, 2, 3]))
        assert rest.hole_bound >= rest.length - int(rest.valid_mask().sum(1).max()) == 20 - 12
        assert rest.compact() == 8 and rest.length == 12
        # While the bound rules a gain out, compact declines without looking at the mask.
        snapshot.hole_bound = 0
        assert snapshot.compact() == 0 and snapshot.length == 20
        _, full = ctx.prefill(torch.randint(4, 64, (2, 7)), logits="none")
        assert full.compact() == 0 and full.length == 7 and not full.padded
        ctx.extend(full, torch.randint(4, 64, (2, 3)), provisional=True)
        with pytest.raises(RuntimeError, match="accept"):
            full.compact()


@pytest.mark.parametrize("mirror", [False, True])
def test_speculative_decoding_compacts_holes_and_still_gives_the_ar_output(monkeypatch, mirror):
    from twotower.caches import HybridCache

    ctx, den = make_towers(seed=9)
    ids, mask = left_pad(random_prompts([3, 10, 6, 8], seed=9))
    ar = autoregressive(ctx, ids, mask, max_new_tokens=60, pad_token_id=PAD)
    gains, packed, real = [], [], HybridCache.compact

    def spy(self, **kw):
        gains.append(real(self, **kw))
        if gains[-1]:  # every column left holds some row's real key: no all-hole column remains
            packed.append(bool(self.valid_mask().any(0).all()))
        return gains[-1]

    monkeypatch.setattr(HybridCache, "compact", spy)
    out = speculative(ctx, den, ids, mask, max_new_tokens=60, shifted=True,
                      denoiser_device="cpu" if mirror else None)
    assert torch.equal(out.new_tokens, ar.new_tokens)
    assert packed and all(packed)
