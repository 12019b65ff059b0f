"""The Llama-like families beyond Llama (Qwen2, Mistral) against transformers, on what they change:
Qwen2's biases (q/k/v, none on o_proj) and the sliding attention window (Mistral on every layer,
Qwen2 on the layers `layer_types` marks), exact up to the window and refused past it. The contract
shared with every family (logits, generate, speculative) is tests/test_families.py's."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_, tiny_mistral_config, tiny_qwen2_config
from transformers import MistralForCausalLM, Qwen2ForCausalLM

from twotower.towers.mistral import MistralContextTower, MistralDenoiserTower
from twotower.towers.qwen2 import Qwen2ContextTower

TOL = dict(rtol=1e-5, atol=1e-5)
WINDOW = 12


def pair(hf_class, tower_class, config, seed=0):
    """A random transformers model and our context tower holding its weights (strict names)."""
    hf = randomize_(hf_class(config), seed=seed).eval()
    ctx = tower_class(hf.config).eval()
    ctx.load_backbone_state({k.removeprefix("model."): v for k, v in hf.state_dict().items()})
    return hf, ctx


def test_qwen2_has_qkv_biases_and_no_o_proj_bias():
    hf, ctx = pair(Qwen2ForCausalLM, Qwen2ContextTower, tiny_qwen2_config(), seed=1)
    attn = ctx.backbone.layers[0].self_attn
    assert all(p.bias is not None for p in (attn.q_proj, attn.k_proj, attn.v_proj)) and attn.o_proj.bias is None
    ids = torch.randint(4, 64, (2, 20))
    with torch.inference_mode():
        torch.testing.assert_close(ctx(ids), hf(ids).logits.float(), **TOL)


@pytest.mark.parametrize("hf_class,tower_class,config", [
    (MistralForCausalLM, MistralContextTower, tiny_mistral_config(sliding_window=WINDOW)),
    (Qwen2ForCausalLM, Qwen2ContextTower,
     tiny_qwen2_config(use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)),
], ids=["mistral", "qwen2"])
def test_sliding_window_is_exact_up_to_the_window_and_refused_past_it(hf_class, tower_class, config):
    hf, ctx = pair(hf_class, tower_class, config, seed=2)
    assert ctx.backbone.window == WINDOW and ctx.max_length == WINDOW
    ids = torch.randint(4, 64, (2, WINDOW + 8))
    with torch.inference_mode():
        want = hf(ids[:, :WINDOW]).logits.float()
        torch.testing.assert_close(ctx(ids[:, :WINDOW]), want, **TOL)
        got, cache = ctx.prefill(ids[:, :5])
        parts = [got, ctx.extend(cache, ids[:, 5:6]), ctx.extend(cache, ids[:, 6:WINDOW])]
        torch.testing.assert_close(torch.cat(parts, 1), want, **TOL)
        # Past the window transformers drops the oldest keys: the towers refuse instead.
        with pytest.raises(ValueError, match=f"sliding_window = {WINDOW}"):
            ctx.extend(cache, ids[:, WINDOW:WINDOW + 1])
        with pytest.raises(ValueError, match="sliding_window"):
            ctx(ids)
        with pytest.raises(ValueError, match="sliding_window"):
            ctx.forward_train(ids[:, :16], 4)


def test_the_denoiser_refuses_a_block_past_the_window():
    _, ctx = pair(MistralForCausalLM, MistralContextTower, tiny_mistral_config(sliding_window=WINDOW), seed=3)
    den = MistralDenoiserTower.from_context(ctx).eval()
    with torch.inference_mode():
        _, cache = ctx.prefill(torch.randint(4, 64, (1, 8)))
        den.forward_block(torch.full((1, 4), 3), cache)  # 8 + 4 = the window: fine
        with pytest.raises(ValueError, match="sliding_window"):
            den.forward_block(torch.full((1, 5), 3), cache)


def test_without_a_window_any_length_runs():
    hf, ctx = pair(Qwen2ForCausalLM, Qwen2ContextTower, tiny_qwen2_config(sliding_window=WINDOW), seed=4)
    assert ctx.backbone.window is None  # use_sliding_window is off: transformers ignores sliding_window
    assert ctx.max_length == ctx.config.max_position_embeddings
    ids = torch.randint(4, 64, (1, 3 * WINDOW))
    with torch.inference_mode():
        torch.testing.assert_close(ctx(ids), hf(ids).logits.float(), **TOL)
