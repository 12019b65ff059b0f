"""TolerantSpeculative: the keep rule on hand-made distributions, tolerance 1 == Speculative == AR,
and every generated token passing the rule under an independent teacher-forced forward."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import autoregressive, left_pad, make_towers, random_prompts, run_decoder, speculative

from twotower.decoding import TolerantSpeculative


def logits_of(rows):
    """(R, n, V) logits whose softmax is the given probabilities (0 -> -inf)."""
    return torch.tensor(rows, dtype=torch.float32).log()


def test_kept_prefix_on_hand_made_distributions():
    dec = TolerantSpeculative(tolerance=0.5)
    # Row 0: x1 = 1 has 0.3 >= 0.5 * 0.5 (passes); x2 = 0 has 0.1 < 0.5 * 0.6 (fails): keeps 2, even
    # though x3 would pass. Row 1: x1 is the context tower's own token (argmax), x2 = 2 has
    # exactly 0.5 * 0.8 = 0.4 (passes, the bound is inclusive), x3 = 3 has 0.25 >= 0.5 * 0.5:
    # the whole draft, 4. Row 2: x1 = 4 has 0.05 < 0.45: only the first token, 1.
    probs = [
        [[0.5, 0.3, 0.2, 0.0, 0.0], [0.1, 0.6, 0.3, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5, 0.0], [0.2] * 5],
        [[0.1, 0.7, 0.1, 0.1, 0.0], [0.0, 0.0, 0.4, 0.0, 0.6], [0.25, 0.0, 0.0, 0.25, 0.5], [0.2] * 5],
        [[0.9, 0.05, 0.0, 0.0, 0.05], [0.2] * 5, [0.2] * 5, [0.2] * 5],
    ]
    x = torch.tensor([[7, 1, 0, 2], [7, 1, 2, 3], [7, 4, 0, 0]])
    logits = logits_of(probs)
    ar = logits.argmax(-1)
    assert dec.kept(logits, ar, x).tolist() == [2, 4, 1]
    # Tolerance 1: only the context tower's own tokens pass (Speculative's rule).
    assert TolerantSpeculative(tolerance=1.0).kept(logits, ar, x).tolist() == [1, 2, 1]


@pytest.mark.parametrize("shifted", [False, True])
@pytest.mark.parametrize("draft_steps", [1, 3])
def test_tolerance_one_is_the_speculative_and_ar_output(shifted, draft_steps):
    ctx, den = make_towers(seed=4)
    ids, mask = left_pad(random_prompts([6, 3, 9], seed=4))
    tol = run_decoder(TolerantSpeculative(1.0, block_size=6, draft_steps=draft_steps), ctx, den, ids, mask,
                      max_new_tokens=21, shifted=shifted)
    spec = speculative(ctx, den, ids, mask, draft_steps=draft_steps, shifted=shifted)
    ar = autoregressive(ctx, ids, mask, max_new_tokens=21)
    assert torch.equal(tol.new_tokens, spec.new_tokens) and torch.equal(tol.nfe, spec.nfe)
    assert torch.equal(tol.new_tokens, ar.new_tokens)


@pytest.mark.parametrize("tolerance", [0.5, 0.2])
def test_every_generated_token_passes_the_rule_teacher_forced(tolerance):
    """An independent check: one causal forward over prompt + output; every generated token is the
    context tower's top choice or has at least `tolerance` times its probability."""
    ctx, den = make_towers(seed=5)
    prompts = random_prompts([7, 7, 7, 7], seed=5)
    ids = torch.stack(prompts)
    out = run_decoder(TolerantSpeculative(tolerance, block_size=6), ctx, den, ids, max_new_tokens=24)
    with torch.inference_mode():
        logits = ctx.prefill(out.sequences, None, logits="all")[0].float()
    probs = logits[:, ids.shape[1] - 1: -1].softmax(-1)  # (B, 24, V): the distributions of the new tokens
    got = probs.gather(-1, out.new_tokens[..., None]).squeeze(-1)
    top = probs.amax(-1)
    assert torch.all(got >= tolerance * top * (1 - 1e-4)), "a kept token below the tolerance"
    # The rule was exercised: some kept tokens are not the context tower's own choice ...
    assert bool((got < top * (1 - 1e-4)).any())
    # ... so the output differs from AR, which a lossless decoder's would not.
    assert not torch.equal(out.new_tokens, autoregressive(ctx, ids, max_new_tokens=24).new_tokens)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, math.nan, "0.5", True])
def test_bad_tolerance_raises(bad):
    with pytest.raises(ValueError, match="tolerance"):
        TolerantSpeculative(bad)
