"""MaskDiffusion and Autoregressive on bare towers: batch invariance, AR parity with transformers,
EOS / NFE accounting, step callbacks, seeded sampling, the two-device mirror path, and input
validation."""

from __future__ import annotations

import pytest
import torch
from conftest import MASK, PAD, autoregressive, diffusion, left_pad, make_hf_pair, make_towers, random_prompts

from twotower.caches import HybridCache
from twotower.decoding import GenerationOutput
from twotower.samplers import ConfidenceThreshold, EntropyBounded, FrontierRun, MarginThreshold, MockAR, TopKCommit


MODES = {
    "confidence": dict(sampler=ConfidenceThreshold(0.5)),
    "topk": dict(sampler=TopKCommit(3), steps_per_block=4),
    "mock_ar": dict(sampler=MockAR()),
    "margin": dict(sampler=MarginThreshold(0.3)),
    "entropy": dict(sampler=EntropyBounded(2.0)),
    "frontier": dict(sampler=FrontierRun(0.3)),
}


# ---- batch invariance ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [*MODES, "ar"])
def test_padded_batch_gives_each_prompt_its_own_result(mode):
    ctx, den = make_towers(seed=1)
    prompts = random_prompts([7, 3, 12, 5], seed=1)
    ids, mask = left_pad(prompts)

    def run(i, m):
        if mode == "ar":
            return autoregressive(ctx, i, m, max_new_tokens=13, pad_token_id=PAD)
        return diffusion(ctx, den, i, m, max_new_tokens=19, **MODES[mode])

    batch = run(ids, mask)
    assert torch.equal(batch.sequences[:, : ids.shape[1]], ids)  # the prompt comes back as given
    for r, p in enumerate(prompts):
        alone = run(p[None], None)
        assert torch.equal(batch.new_tokens[r], alone.new_tokens[0]), f"row {r}"
        assert int(batch.nfe[r]) == int(alone.nfe[0]), f"row {r}: NFE depends on the batch"


def test_batch_rows_finish_independently_with_eos():
    # Rows that stop early (EOS) must not change what the other rows generate.
    ctx, den = make_towers(seed=2)
    prompts = random_prompts([6, 9, 4], seed=2)
    ids, mask = left_pad(prompts)
    free = diffusion(ctx, den, ids, mask, max_new_tokens=24)
    eos = int(free.new_tokens[0, 3])
    batch = diffusion(ctx, den, ids, mask, max_new_tokens=24, eos_token_id=eos)
    for r, p in enumerate(prompts):
        alone = diffusion(ctx, den, p[None], max_new_tokens=24, eos_token_id=eos)
        n = int(alone.num_generated[0])
        assert int(batch.num_generated[r]) == n
        assert torch.equal(batch.new_tokens[r, :n], alone.new_tokens[0, :n])
        assert torch.all(batch.new_tokens[r, n:] == PAD)


# ---- AR parity with transformers ----------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_generate_ar_equals_transformers_greedy_generate(seed):
    ref, ctx = make_hf_pair("M*-EM*E", seed=seed, vocab_size=512)  # a large vocab keeps EOS (id 2) unlikely
    ref.generation_config.eos_token_id = None
    ref.generation_config.pad_token_id = PAD
    ids = torch.randint(4, 512, (2, 6 + seed), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False)
    ours = autoregressive(ctx, ids, max_new_tokens=12, pad_token_id=PAD)
    assert expected.shape == ours.sequences.shape
    assert torch.equal(ours.sequences, expected)
    assert torch.equal(ours.nfe, torch.full((2,), 12)) and torch.all(ours.tokens_per_nfe == 1)


# ---- EOS, counts, lengths -----------------------------------------------------------------------


def test_eos_ends_rows_with_padding_and_ends_the_loop():
    ctx, den = make_towers(seed=3)
    ids, mask = left_pad(random_prompts([5, 8], seed=3))
    free = diffusion(ctx, den, ids, mask, max_new_tokens=40, block_size=4, steps_per_block=4)
    # An EOS id that both rows produce early: the loop must stop long before 40 tokens.
    eos = int(free.new_tokens[0, 1])
    firsts = [(free.new_tokens[r] == eos).nonzero() for r in range(2)]
    if any(len(f) == 0 for f in firsts):
        eos = int(free.new_tokens[1, 1])
        firsts = [(free.new_tokens[r] == eos).nonzero() for r in range(2)]
    assert all(len(f) for f in firsts), "test setup: expected a token shared by both rows"
    ends = [int(f[0]) + 1 for f in firsts]
    out = diffusion(ctx, den, ids, mask, max_new_tokens=40, block_size=4, steps_per_block=4, eos_token_id=eos)
    assert out.num_generated.tolist() == ends
    assert out.new_tokens.shape[1] == max(ends)
    assert out.blocks == (max(ends) + 3) // 4 < 10
    for r, end in enumerate(ends):
        assert torch.equal(out.new_tokens[r, :end], free.new_tokens[r, :end])  # same tokens up to EOS
        assert int(out.new_tokens[r, end - 1]) == eos
        assert torch.all(out.new_tokens[r, end:] == PAD)
    assert torch.all(out.seconds <= out.total_seconds + 1e-9)
    # NFE counts only the blocks a row was still running in.
    assert torch.all(out.nfe <= torch.tensor([(e + 3) // 4 * 4 for e in ends]))
    # Tokenizers often use EOS as the pad id: a finished row's padding must not read as a new EOS.
    same = diffusion(ctx, den, ids.masked_fill(mask == 0, eos), mask, sampler=ConfidenceThreshold(0.5),
                     max_new_tokens=40, block_size=4, steps_per_block=4, pad_token_id=eos, eos_token_id=eos)
    assert same.num_generated.tolist() == ends
    assert torch.equal(same.new_tokens.masked_fill(same.new_tokens == eos, PAD),
                       out.new_tokens.masked_fill(out.new_tokens == eos, PAD))


def test_mock_ar_commits_one_token_per_nfe():
    ctx, den = make_towers(seed=4)
    ids, mask = left_pad(random_prompts([4, 7], seed=4))
    out = diffusion(ctx, den, ids, mask, sampler=MockAR(), max_new_tokens=16, block_size=8, steps_per_block=8)
    assert out.num_generated.tolist() == [16, 16]
    assert out.nfe.tolist() == [16, 16]
    assert torch.all(out.tokens_per_nfe == 1.0)


def test_confidence_threshold_nfe_is_bounded_by_the_step_budget():
    ctx, den = make_towers(seed=5)
    ids, mask = left_pad(random_prompts([4, 7, 10], seed=5))
    out = diffusion(ctx, den, ids, mask, sampler=ConfidenceThreshold(0.5), max_new_tokens=32, block_size=16,
                    steps_per_block=4)
    assert out.blocks == 2
    assert torch.all(out.nfe <= 4 * out.blocks)
    assert torch.all(out.tokens_per_nfe >= 4.0)  # 16 positions in at most 4 steps
    assert torch.allclose(out.tokens_per_nfe, out.num_generated.float() / out.nfe.float())
    # A low threshold commits more per step than the pace alone would.
    fast = diffusion(ctx, den, ids, mask, sampler=ConfidenceThreshold(0.05), max_new_tokens=32, block_size=16,
                     steps_per_block=16)
    slow = diffusion(ctx, den, ids, mask, sampler=ConfidenceThreshold(1.0), max_new_tokens=32, block_size=16,
                     steps_per_block=16)
    assert torch.all(slow.nfe == 32)  # threshold 1 never fires: one commit per step
    assert torch.all(fast.nfe < slow.nfe)


def test_max_new_tokens_not_a_multiple_of_block_size():
    ctx, den = make_towers(seed=6)
    ids = torch.randint(4, 64, (2, 5))
    widths = []
    out = diffusion(ctx, den, ids, max_new_tokens=11, block_size=4, steps_per_block=4,
                    step_callback=lambda b, s, before, logits, after: widths.append((b, before.shape[1])))
    assert out.new_tokens.shape == (2, 11) and out.sequences.shape == (2, 16)
    assert out.num_generated.tolist() == [11, 11] and out.blocks == 3
    assert {b: w for b, w in widths} == {0: 4, 1: 4, 2: 3}
    assert not torch.any(out.new_tokens == MASK)


# ---- step callback ------------------------------------------------------------------------------


class Recording:
    """Wraps a sampler and keeps every commit decision it returns."""

    def __init__(self, inner):
        self.inner, self.commits, self.steps, self.inputs = inner, [], [], []

    def __call__(self, confidence, candidates, masked, *, step, steps_per_block, logits=None):
        out = self.inner(confidence, candidates, masked, step=step, steps_per_block=steps_per_block, logits=logits)
        self.commits.append(out.clone())
        self.steps.append(step)
        self.inputs.append((confidence.clone(), candidates.clone(), masked.clone(), logits.clone()))
        return out


@pytest.mark.parametrize("sampler", [ConfidenceThreshold(0.5), TopKCommit(2), MockAR(), FrontierRun(0.5)])
def test_step_callback_sees_exactly_the_sampler_commits(sampler):
    ctx, den = make_towers(seed=7)
    ids, mask = left_pad(random_prompts([3, 6], seed=7))
    rec, seen = Recording(sampler), []
    out = diffusion(ctx, den, ids, mask, sampler=rec, max_new_tokens=16, block_size=8, steps_per_block=8,
                    step_callback=lambda b, s, before, logits, after: seen.append(
                        (b, s, before.clone(), logits.clone(), after.clone())))
    assert len(seen) == len(rec.commits) == int(out.nfe.max())
    assert [s for _, s, *_ in seen] == rec.steps
    total = torch.zeros(2, dtype=torch.long)
    for (b, s, before, logits, after), commit in zip(seen, rec.commits):
        changed = before != after
        assert torch.equal(changed, commit), f"block {b} step {s}"
        assert torch.all(before[commit] == MASK) and torch.all(after[commit] != MASK)
        assert torch.all(logits[..., MASK] == float("-inf"))
        total += commit.sum(-1)
    assert total.tolist() == [16, 16]


def test_sampler_sees_untempered_confidence_and_kept_tokens():
    ctx, den = make_towers(seed=13)
    ids = torch.randint(4, 64, (2, 6))
    rec, seen = Recording(ConfidenceThreshold(0.5)), []
    diffusion(ctx, den, ids, sampler=rec, max_new_tokens=8, temperature=2.0, generator=torch.Generator().manual_seed(0),
              step_callback=lambda b, s, before, logits, after: seen.append(before.clone()))
    for (conf, cand, masked, logits), before in zip(rec.inputs, seen):
        assert torch.equal(masked, before == MASK)
        assert torch.equal(cand[~masked], before[~masked])  # committed positions keep their token
        assert not torch.any(cand == MASK)
        assert torch.all(logits[..., MASK] == float("-inf"))
        expected = logits.softmax(-1).gather(-1, cand[..., None]).squeeze(-1)  # untempered
        assert torch.allclose(conf, expected, atol=1e-6)


def test_denoiser_sees_t_as_the_masked_fraction_and_finished_rows_leave_the_batch(monkeypatch):
    ctx, den = make_towers(seed=14)
    ids, mask = left_pad(random_prompts([4, 6], seed=14))
    free = diffusion(ctx, den, ids, mask, max_new_tokens=24, block_size=6, steps_per_block=6)
    eos = int(free.new_tokens[0, 2])
    calls, real = [], den.forward_block

    def spy(x, cache, t=None, **kw):
        calls.append((x.clone(), t.clone()))
        return real(x, cache, t, **kw)

    monkeypatch.setattr(den, "forward_block", spy)
    blocks = []
    out = diffusion(ctx, den, ids, mask, max_new_tokens=24, block_size=6, steps_per_block=6, eos_token_id=eos,
                    step_callback=lambda b, s, before, logits, after: blocks.append(b))
    assert len(blocks) == len(calls)  # one callback per denoiser forward
    assert int(out.num_generated[0]) <= 3 and out.blocks >= 2
    for (x, t), b in zip(calls, blocks):
        assert torch.allclose(t, (x == MASK).float().mean(-1))
        assert x.shape[0] == (2 if b == 0 else 1)  # row 0 ended in block 0 and left the working batch
    assert any(b > 0 for b in blocks)
    assert 1 <= int(out.nfe[0]) <= blocks.count(0)  # only the steps in which row 0 had masks
    # t matters: the same block at another t gives other logits.
    _, cache = ctx.prefill(ids, mask)
    x0 = torch.full((2, 6), MASK)
    assert not torch.allclose(real(x0, cache, torch.ones(2)), real(x0, cache, torch.full((2,), 0.5)))


# ---- sampling -----------------------------------------------------------------------------------


def test_temperature_sampling_is_reproducible_and_seed_dependent():
    ctx, den = make_towers(seed=8)
    ids = torch.randint(4, 64, (2, 6))

    def run(seed, use_ar=False):
        g = torch.Generator().manual_seed(seed)
        if use_ar:
            return autoregressive(ctx, ids, max_new_tokens=16, pad_token_id=PAD, temperature=1.0, generator=g).new_tokens
        return diffusion(ctx, den, ids, max_new_tokens=16, temperature=1.0, generator=g).new_tokens

    for use_ar in (False, True):
        a, b, c = run(0, use_ar), run(0, use_ar), run(1, use_ar)
        assert torch.equal(a, b)
        assert not torch.equal(a, c)
    greedy = diffusion(ctx, den, ids, max_new_tokens=16).new_tokens
    assert not torch.equal(run(0), greedy)


def test_low_temperature_sampling_equals_greedy():
    ctx, den = make_towers(seed=9)
    ids = torch.randint(4, 64, (2, 6))
    g = torch.Generator().manual_seed(0)
    cold = diffusion(ctx, den, ids, max_new_tokens=16, temperature=1e-6, generator=g).new_tokens
    assert torch.equal(cold, diffusion(ctx, den, ids, max_new_tokens=16).new_tokens)


# ---- two devices --------------------------------------------------------------------------------


def test_mirror_path_equals_shared_cache_and_sends_only_new_positions(monkeypatch):
    ctx, den = make_towers(seed=10)
    ids, mask = left_pad(random_prompts([5, 9], seed=10))
    shared = diffusion(ctx, den, ids, mask, max_new_tokens=20, block_size=6, steps_per_block=6)

    calls, fresh = [], []
    real_mirror, real_empty_like = HybridCache.mirror_to, HybridCache.empty_like

    def spy_mirror(self, device, mirror=None):
        calls.append((mirror is None, self.length - (0 if mirror is None else mirror.length)))
        return real_mirror(self, device, mirror)

    def spy_empty_like(cache, device):
        fresh.append(cache.length)
        return real_empty_like(cache, device)

    monkeypatch.setattr(HybridCache, "mirror_to", spy_mirror)
    monkeypatch.setattr(HybridCache, "empty_like", staticmethod(spy_empty_like))
    mirrored = diffusion(ctx, den, ids, mask, max_new_tokens=20, block_size=6, steps_per_block=6,
                         denoiser_device="cpu")
    assert torch.equal(mirrored.sequences, shared.sequences)
    assert torch.equal(mirrored.nfe, shared.nfe)
    # One mirror update per block: the full copy once (after the prefill), then one block each.
    assert mirrored.blocks == 4
    assert calls == [(True, ids.shape[1]), (False, 6), (False, 6), (False, 6)]
    assert len(fresh) == 1

    calls.clear()
    diffusion(ctx, den, ids, mask, max_new_tokens=20, block_size=6, steps_per_block=6)
    assert calls == []  # same device, no explicit denoiser_device: the cache itself is read

    # With an EOS that ends a row early, the mirror follows the working batch when it shrinks.
    eos = int(shared.new_tokens[0, 7])
    monkeypatch.undo()
    kw = dict(max_new_tokens=20, block_size=6, steps_per_block=6, eos_token_id=eos)
    shared_eos = diffusion(ctx, den, ids, mask, **kw)
    mirrored_eos = diffusion(ctx, den, ids, mask, denoiser_device="cpu", **kw)
    assert int(shared_eos.num_generated.min()) < 20  # some row did stop early
    assert torch.equal(mirrored_eos.sequences, shared_eos.sequences)
    assert torch.equal(mirrored_eos.nfe, shared_eos.nfe)


def test_denoiser_device_must_match_the_denoiser_weights():
    ctx, den = make_towers(seed=11)
    with pytest.raises(ValueError, match="denoiser_device=meta"):
        diffusion(ctx, den, torch.randint(4, 64, (1, 4)), denoiser_device="meta")


# ---- validation ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def towers():
    return make_towers(seed=12)


@pytest.mark.parametrize("kwargs, match", [
    (dict(block_size=0), "block_size must be an int >= 1, got 0"),
    (dict(steps_per_block=0), "steps_per_block must be an int >= 1, got 0"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(temperature=float("nan")), "temperature must be >= 0"),
    (dict(max_new_tokens=0), "max_new_tokens must be an int >= 1, got 0"),
    (dict(max_new_tokens=600), "max_position_embeddings = 512"),
    (dict(eos_token_id=64), "eos_token_id must be a token id in \\[0, 64\\)"),
    (dict(mask_token_id=99), "mask_token_id must be a token id"),
    (dict(pad_token_id=-1), "pad_token_id must be a token id"),
    (dict(generator=0), "generator must be a torch.Generator"),
    (dict(step_callback=5), "step_callback must be callable"),
])
def test_bad_arguments_raise_clear_errors(towers, kwargs, match):
    ctx, den = towers
    ids = torch.randint(4, 64, (2, 5))
    with pytest.raises(ValueError, match=match):
        diffusion(ctx, den, ids, **{"max_new_tokens": 4, **kwargs})


def test_bad_prompts_raise_clear_errors(towers):
    ctx, den = towers
    with pytest.raises(ValueError, match="empty prompt"):
        diffusion(ctx, den, torch.zeros(2, 0, dtype=torch.long))
    ids, mask = left_pad(random_prompts([4, 6]))
    mask[0] = 0
    with pytest.raises(ValueError, match=r"empty prompt: row\(s\) \[0\]"):
        diffusion(ctx, den, ids, mask)
    with pytest.raises(ValueError, match=r"empty prompt: row\(s\) \[0\]"):
        autoregressive(ctx, ids, mask, max_new_tokens=4, pad_token_id=PAD)
    ids, mask = left_pad(random_prompts([4, 6]))
    ids[1, 3] = MASK
    with pytest.raises(ValueError, match=r"row\(s\) \[1\] contains the \[MASK\] token id 3"):
        diffusion(ctx, den, ids, mask)
    ids[1, 3], ids[0, 0] = 5, MASK  # [MASK] in a padded position is fine: it is not part of the prompt
    mask[0, 0] = 0
    assert diffusion(ctx, den, ids, mask, max_new_tokens=3).new_tokens.shape == (2, 3)
    right = torch.ones(2, 6, dtype=torch.long)
    right[0, -1] = 0
    with pytest.raises(ValueError, match="left padding"):
        diffusion(ctx, den, torch.randint(4, 64, (2, 6)), right)
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings = 512"):
        autoregressive(ctx, torch.randint(4, 64, (1, 500)), max_new_tokens=13, pad_token_id=PAD)


def test_output_is_a_generation_output_with_consistent_shapes(towers):
    ctx, den = towers
    ids = torch.randint(4, 64, (3, 5))
    out = diffusion(ctx, den, ids, max_new_tokens=10)
    assert isinstance(out, GenerationOutput)
    assert out.sequences.dtype == out.new_tokens.dtype == torch.long
    assert torch.equal(out.sequences, torch.cat([ids, out.new_tokens], 1))
    assert out.nfe.dtype == torch.long and out.tokens_per_nfe.dtype == torch.float32
    assert out.seconds.shape == (3,) and out.total_seconds > 0
