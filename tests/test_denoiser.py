"""The denoiser's training forward against the naive per-block inference loop; identity init; adaLN."""

from __future__ import annotations

import pytest
import torch
from conftest import dt_regimes, make_towers, randomize_

from twotower.caches import HybridCache
from twotower.time_embedding import AdaLNSingle, sinusoidal_features
from twotower.towers.common import block_attention_mask

# PixArt time init, and every denoiser weight random so that neither it nor its time modules equal
# the context tower.
PERTURBED = dict(seed=0, time_init="pixart", denoiser_seed=100)


@dt_regimes
@pytest.mark.parametrize("pattern", ["M*-EM*E", "*M", "EM-*"])
@pytest.mark.parametrize("S", [4, 8])
def test_training_forward_equals_per_block_inference(pattern, S, regime):
    ctx, den = make_towers(pattern, **PERTURBED, **regime)
    b, L = 2, 4 * S
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(4, 64, (b, L), generator=gen)
    masked = torch.rand(b, L, generator=gen) < 0.5
    noisy = x.masked_fill(masked, 3)
    t = torch.rand(b, L // S, generator=gen)
    with torch.no_grad():
        _, states = ctx.forward_train(x, S)
        train_logits = den.forward_train(noisy, states, t)
        for k in range(L // S):
            if k == 0:
                cache = HybridCache.empty(ctx.backbone, b)
            else:
                _, cache = ctx.prefill(x[:, : k * S])
            block = den.forward_block(noisy[:, k * S:(k + 1) * S], cache, t[:, k])
            ref = train_logits[:, k * S:(k + 1) * S]
            scale = float(block.abs().max())
            assert float((block - ref).abs().max()) <= 1e-5 * max(scale, 1.0), f"block {k}"


def test_time_conditioning_changes_the_output():
    ctx, den = make_towers(**PERTURBED)
    x = torch.randint(4, 64, (1, 8))
    with torch.no_grad():
        _, cache = ctx.prefill(x)
        a = den.forward_block(torch.full((1, 8), 3), cache, torch.tensor([0.2]))
        b = den.forward_block(torch.full((1, 8), 3), cache, torch.tensor([0.9]))
    assert not torch.allclose(a, b)


@dt_regimes
def test_identity_init_one_token_block_gives_context_next_token_logits(regime):
    ctx, den = make_towers(seed=4, identity=True, **regime)
    x = torch.randint(4, 64, (3, 14))
    with torch.no_grad():
        _, cache = ctx.prefill(x[:, :13])
        one = den.forward_block(x[:, 13:14], cache, torch.rand(3))
        full = ctx(x)
    assert torch.allclose(one[:, 0], full[:, 13], atol=1e-5)
    # Without t the layers are the plain AR layers too.
    with torch.no_grad():
        plain = den.forward_block(x[:, 13:14], cache, None)
    assert torch.allclose(plain, one, atol=1e-6)


@dt_regimes
def test_identity_init_training_forward_of_clean_sequence_equals_context_for_one_token_blocks(regime):
    ctx, den = make_towers(seed=5, identity=True, **regime)
    x = torch.randint(4, 64, (2, 12))
    with torch.no_grad():
        logits, states = ctx.forward_train(x, 1, return_logits=True)
        den_logits = den.forward_train(x, states, torch.rand(2, 12))
    assert torch.allclose(den_logits, logits, atol=1e-5)


def test_block_attention_mask_structure():
    m = block_attention_mask(6, 2)
    assert m.shape == (6, 12)
    assert m[0, :6].sum() == 0 and m[0, 6:8].all() and m[0, 8:].sum() == 0
    assert m[5, :4].all() and not m[5, 4:6].any() and m[5, 10:12].all() and not m[5, 6:10].any()


def test_adaln_single_shapes_identity_and_features():
    ada = AdaLNSingle(16, 3)
    shared = ada.shared(torch.rand(2, 5))
    assert shared.shape == (2, 5, 3, 16)
    shift, scale, gate = ada.layer(shared, 1)
    assert torch.equal(shift, torch.zeros_like(shift)) and torch.equal(gate, torch.ones_like(gate))
    feats = sinusoidal_features(torch.tensor([0.0, 0.5]))
    assert feats.shape == (2, 256)
    assert torch.allclose(feats[0, :128], torch.ones(128)) and torch.allclose(feats[0, 128:], torch.zeros(128))
    # Highest frequency is 1: cos(1000 t).
    assert torch.isclose(feats[1, 0], torch.cos(torch.tensor(500.0)))
    names = {k for k, _ in ada.named_parameters()}
    assert {"t_embedder.mlp.0.weight", "t_embedder.mlp.2.bias", "t_block.1.weight", "scale_shift_tables.2"} <= names
    with pytest.raises(ValueError, match="identity"):
        AdaLNSingle(16, 3, init="zeros")
    pix = AdaLNSingle(16, 3, init="pixart")
    assert not torch.equal(pix.scale_shift_tables[0], ada.scale_shift_tables[0])


def test_stacked_modulations_equal_the_per_layer_ones():
    torch.manual_seed(0)
    ada = AdaLNSingle(16, 3, init="pixart")
    randomize_(ada, seed=1, scale=0.3)
    shared = ada.shared(torch.rand(2, 5))  # (2, 5, 3, 16)
    mods = ada.modulations(shared)
    assert len(mods) == 3
    for i, (shift, scale1, gate) in enumerate(mods):
        s, sc, gt = ada.layer(shared, i)
        assert torch.allclose(shift, s) and torch.allclose(scale1, 1 + sc) and torch.allclose(gate, gt)
