"""Inference copies that make a speculative iteration cheaper (`TwoTowerLM.merge_adapters`,
`twotower.towers.adapters.merge_adapters` / `fuse_projections`): against independent references.

* a merged LoRA denoiser's logits equal the unmerged adapter's (float32 within rounding; bf16 within
  bf16 rounding, and its argmax drafts mostly agree);
* a fused context tower's logits equal transformers' LlamaForCausalLM in float32 and the unfused
  tower's bit for bit (float32 and bf16), prefill and extends alike, every Llama-like family;
* speculative decoding with the merged, fused pair still equals AR token for token;
* a packed draft (bf16 on a CPU) is the unpacked merged draft up to bf16 rounding;
* an int8 draft (`merge_adapters(int8_draft=True)`) is the float draft up to int8 rounding, and
  speculative decoding through it still equals AR token for token;
* a draft head over part of the vocabulary (`merge_adapters(draft_vocab=...)`) is the full head on its
  tokens and never drafts another; speculative decoding through it still equals AR token for token;
* the copies are inference-only: the state dict is unchanged, `.train()`, moving / casting and
  `unmerge_adapters` drop them, gradients never go through them, and a stale copy is refused.
"""

from __future__ import annotations

import pytest
import torch
from conftest import (FAMILY_CONFIGS, MASK, autoregressive, left_pad, random_prompts, randomize_, randomize_time_,
                      run_decoder, speculative)
from transformers import LlamaForCausalLM

from twotower.decoding import Speculative, TwoBranchSpeculative
from twotower.model import TwoTowerLM
from twotower.towers.adapters import LoRA, LoRALinear, fuse_projections, merge_adapters, unmerge_adapters
from twotower.towers.base import family_for
from twotower.towers import inference_linear
from twotower.towers.inference_linear import HEAD_COPY, InferenceLinear, can_pack, can_quantize
from twotower.towers.llama import LlamaContextTower
from twotower.towers.llama.layers import Fusable

LLAMA_LIKE = ["llama", "mistral", "qwen2"]


def _packable(dtype):
    return pytest.param(dtype, id=str(dtype).removeprefix("torch."), marks=pytest.mark.skipif(
        not can_pack(torch.zeros(1, dtype=dtype)), reason=f"this torch or this CPU cannot pre-pack {dtype} weights"))


# Pre-packed for oneDNN: bf16 where the CPU has its bf16 path, float32 wherever oneDNN packs it. A packed
# product sums in oneDNN's order, not MKL's: within the dtype's rounding of `F.linear`, not its bits.
PACK_DTYPES = [_packable(torch.bfloat16), _packable(torch.float32)]
PACK_TOL = {torch.bfloat16: 0.02, torch.float32: 1e-4}


def lora_pair(model_type: str = "llama", seed: int = 0, dtype=torch.float32, **overrides):
    """(context, LoRA denoiser) with a random context, random adapters (B != 0) and random time modules."""
    ctx = randomize_(family_for(model_type).context(FAMILY_CONFIGS[model_type](**overrides)), seed=seed).eval()
    den = LoRA(rank=4, alpha=8.0).build(ctx).eval()
    randomize_time_(den, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for m in den.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(0.3 * torch.randn(m.lora_B.shape, generator=g))
    return ctx.to(dtype), den.to(dtype)


def lora_model(seed: int, dtype=torch.float32) -> TwoTowerLM:
    """A block-6 TwoTowerLM whose LoRA denoiser is `lora_pair(seed=seed)`'s (random adapters, B != 0)."""
    ctx, den = lora_pair(seed=seed, dtype=dtype)
    model = TwoTowerLM.from_backbone(ctx, block_size=6, denoiser=LoRA(rank=4, alpha=8.0))
    model.denoiser.load_state_dict(den.state_dict())
    return model


# Both lossless decoders: the two-branch tree verify runs through every inference copy too.
LOSSLESS_DECODERS = pytest.mark.parametrize("decoder", [Speculative(block_size=6), TwoBranchSpeculative(block_size=6)],
                                            ids=["speculative", "two_branch"])


def lossless_case(seed: int):
    """(`lora_model(seed)`, ids, mask, its float32 AR output): three left-padded prompts, 20 new tokens."""
    model = lora_model(seed)
    ids, mask = left_pad(random_prompts([6, 11, 3], seed=seed))
    return model, ids, mask, autoregressive(model.context, ids, mask, max_new_tokens=20)


def draft_logits(ctx, den, seed: int = 0, S: int = 6):
    """forward_block logits (2, S, V) of a half-masked block after a left-padded prompt batch."""
    ids, mask = left_pad(random_prompts([9, 5], seed=seed))
    g = torch.Generator().manual_seed(seed)
    block = torch.randint(4, 64, (2, S), generator=g)
    block[:, 1::2] = MASK
    with torch.inference_mode():
        _, cache = ctx.prefill(ids, mask)
        return den.forward_block(block, cache, torch.tensor([0.5, 0.9]))


def context_logits(ctx, seed: int = 0):
    """A prefill of a left-padded batch, then extends of 7, 1, 1 and 16 tokens: all logits (2, T, V)."""
    ids, mask = left_pad(random_prompts([12, 7], seed=seed))
    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        out, cache = ctx.prefill(ids, mask, capacity=13)  # the cache grows on the way
        parts = [out] + [ctx.extend(cache, torch.randint(4, 64, (2, n), generator=g)) for n in (7, 1, 1, 16)]
    return torch.cat(parts, 1)


# ---- merged adapters: the same draft ---------------------------------------------------------------


@pytest.mark.parametrize("fuse", [False, True])
@pytest.mark.parametrize("model_type", LLAMA_LIKE)
def test_merged_lora_denoiser_equals_the_adapter_in_float32(model_type, fuse):
    ctx, den = lora_pair(model_type, seed=1)
    want = draft_logits(ctx, den)
    made = merge_adapters(den, fuse=fuse, pack=False)  # merging alone (packing: the tests below)
    adapters = [m for m in den.modules() if isinstance(m, LoRALinear)]
    # every projection's weight once (a fused copy holds its projections' biases too; a merged one
    # applies the base's own bias)
    fusable = [f for f in den.modules() if isinstance(f, Fusable)]
    fused = {id(getattr(f, n)) for f in fusable for n in f.FUSED_PROJECTIONS} if fuse else set()
    assert made == sum(m.weight.nbytes + (m.bias.nbytes if m.bias is not None and id(m) in fused else 0)
                       for m in adapters)
    unfused = 2 * FAMILY_CONFIGS[model_type]().num_hidden_layers  # o_proj and down_proj of every layer
    assert sum(m.merged for m in adapters) == (unfused if fuse else len(adapters))
    got = draft_logits(ctx, den)
    assert not torch.equal(got, want)  # really another path (the merged weight is rounded once)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    unmerge_adapters(den)
    assert not any(m.merged for m in adapters) and not any(f.fused_nbytes for f in fusable)
    assert torch.equal(draft_logits(ctx, den), want)


def test_merged_lora_denoiser_in_bf16_is_the_adapter_up_to_rounding():
    ctx, den = lora_pair(seed=2, dtype=torch.bfloat16)
    want = draft_logits(ctx, den)
    merge_adapters(den)
    got = draft_logits(ctx, den)
    scale = want.abs().amax()
    assert (got - want).abs().amax() <= 0.05 * scale  # bf16 keeps ~3 significant digits per step
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.75


def test_merge_adapters_on_a_full_copy_fuses_only():
    ctx, den = lora_pair(seed=3)
    full = family_for(ctx.config).denoiser.from_context(ctx).eval()
    randomize_time_(full, 4)
    want = draft_logits(ctx, full)
    made = merge_adapters(full, pack=False)  # fusing alone (packing: the tests below)
    layer, n_layers = full.backbone.layers[0], len(full.backbone.layers)
    fused = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.gate_proj, layer.mlp.up_proj]
    assert made == n_layers * sum(p.weight.nbytes for p in fused)
    # fused matmuls: the same dot products (float32 BLAS may sum them in another order for another width)
    torch.testing.assert_close(draft_logits(ctx, full), want, rtol=1e-5, atol=1e-5)


# ---- fused context: the same numbers --------------------------------------------------------------


def test_fused_context_equals_transformers_in_float32():
    hf = randomize_(LlamaForCausalLM(FAMILY_CONFIGS["llama"](attention_bias=True)), seed=5).eval()
    ctx = LlamaContextTower(hf.config).eval()
    ctx.load_state_dict({("backbone." + k.removeprefix("model.")) if k.startswith("model.") else k: v
                         for k, v in hf.state_dict().items()})
    assert fuse_projections(ctx) > 0
    ids = torch.randint(4, 64, (2, 30))
    with torch.inference_mode():
        torch.testing.assert_close(ctx(ids), hf(ids).logits.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("model_type", LLAMA_LIKE)
def test_fused_context_equals_unfused(model_type, dtype):
    """bf16: every logit bit for bit (oneDNN's bf16 kernels reduce each output column alike whatever the
    width; on this CPU). float32: MKL may order a column's sums differently for a wider matrix, so
    the same dot products agree to float32 rounding (bit-identical at SmolLM2's widths here, not a
    guarantee; speculative == AR holds either way, since AR and the verifier run the same tower)."""
    ctx, _ = lora_pair(model_type, seed=6, dtype=dtype)
    want = context_logits(ctx)
    fuse_projections(ctx)
    got = context_logits(ctx)
    if dtype == torch.bfloat16:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ---- decoding: still lossless ----------------------------------------------------------------------


@LOSSLESS_DECODERS
def test_speculative_with_merged_and_fused_towers_equals_ar(decoder):
    """Both lossless decoders: the two-branch tree verify runs through the fused context projections too."""
    model, ids, mask, want = lossless_case(7)
    before = run_decoder(decoder, model.context, model.denoiser, ids, mask, max_new_tokens=20)
    assert model.merge_adapters(fuse_context=True) > 0
    after = run_decoder(decoder, model.context, model.denoiser, ids, mask, max_new_tokens=20)
    for got in (before, after):
        assert torch.equal(got.new_tokens, want.new_tokens)
    assert after.blocks >= 1


# ---- inference only ----------------------------------------------------------------------------------


def test_copies_leave_the_state_dict_and_training_alone():
    ctx, den = lora_pair(seed=8)
    keys = set(den.state_dict()) | set(ctx.state_dict())
    merge_adapters(den)
    fuse_projections(ctx)
    assert set(den.state_dict()) | set(ctx.state_dict()) == keys
    # A gradient recorded through a merged / fused module reaches the adapters (the copies are skipped).
    ids = torch.randint(4, 64, (1, 8))
    with torch.no_grad():
        _, cache = ctx.prefill(ids)
    x = torch.full((1, 4), MASK)
    den.forward_block(x, cache, torch.tensor([1.0])).sum().backward()
    assert all(m.lora_B.grad is not None and m.lora_B.grad.abs().sum() > 0
               for m in den.modules() if isinstance(m, LoRALinear))
    den.train()
    ctx.train()
    assert not any(m.merged for m in den.modules() if isinstance(m, LoRALinear))
    assert not any(m.fused_nbytes for tower in (den, ctx) for m in tower.modules() if isinstance(m, Fusable))


def test_moving_drops_the_copies_and_a_stale_one_is_refused():
    ctx, den = lora_pair(seed=9)
    merge_adapters(den)
    den.to(torch.float64)  # the adapters and time modules move; the borrowed base does not
    assert not any(m.merged for m in den.modules() if isinstance(m, LoRALinear))
    ctx, den = lora_pair(seed=9)
    merge_adapters(den)
    ctx.to(torch.bfloat16)  # the borrowed weights were cast under the denoiser's merged copies
    den.time.to(torch.bfloat16)
    with pytest.raises(RuntimeError, match="merge_adapters"):
        draft_logits(ctx, den)


def test_merge_adapters_refuses_a_quantized_model():
    ctx, den = lora_pair(seed=10)
    model = TwoTowerLM.from_backbone(ctx, block_size=6, denoiser=LoRA(rank=4, alpha=8.0))
    model.quantization = "int8"
    with pytest.raises(ValueError, match="quantized"):
        model.merge_adapters()


# ---- packed (oneDNN, bf16 on a CPU): the draft only ------------------------------------------------


@pytest.mark.parametrize("dtype", PACK_DTYPES)
def test_packed_draft_equals_the_unpacked_merged_draft_up_to_rounding(dtype):
    ctx, den = lora_pair(seed=11, dtype=dtype)
    adapter = draft_logits(ctx, den)
    merge_adapters(den, pack=False)
    want = draft_logits(ctx, den)
    made_plain = merge_adapters(den, pack=False)
    made = merge_adapters(den, pack=True)
    assert den.__dict__.get(HEAD_COPY) is not None and made == made_plain + den.lm_head.weight.nbytes
    assert all(m.__dict__["_twotower_fused"].packed for m in den.modules() if isinstance(m, Fusable))
    got = draft_logits(ctx, den)
    assert (got - want).abs().amax() <= PACK_TOL[dtype] * want.abs().amax()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
    den.train()
    assert den.__dict__.get(HEAD_COPY) is None
    den.eval()
    assert torch.equal(draft_logits(ctx, den), adapter)  # every copy gone: the adapter itself again


def test_where_the_cpu_cannot_pack_bf16_pack_falls_back_to_the_unpacked_draft_bit_for_bit(monkeypatch):
    """An AVX2-only CPU: oneDNN has no bf16 reorder there, so pack=True must give pack=False's copies."""
    ctx, den = lora_pair(seed=16, dtype=torch.bfloat16)
    merge_adapters(den, pack=False)
    want = draft_logits(ctx, den)
    monkeypatch.setattr(inference_linear, "cpu_has_bf16_path", lambda: False)
    assert not can_pack(den.lm_head.weight)
    merge_adapters(den, pack=True)
    assert not any(m.__dict__["_twotower_fused"].packed for m in den.modules() if isinstance(m, Fusable))
    assert den.__dict__.get(HEAD_COPY) is None  # the head has nothing to gain unpacked: no copy
    assert torch.equal(draft_logits(ctx, den), want)


def test_inference_linear_unpacked_is_f_linear_and_packing_falls_back_in_float64():
    w, b, x = torch.randn(24, 16).double(), torch.randn(24).double(), torch.randn(2, 5, 16).double()
    plain = InferenceLinear(w, b, pack=True)  # float64: nothing to pack
    assert not plain.packed and torch.equal(plain(x), torch.nn.functional.linear(x, w, b))
    with pytest.raises(RuntimeError, match="merge_adapters"):
        plain.check(x.float(), "test copy")


@pytest.mark.parametrize("dtype", PACK_DTYPES)
@pytest.mark.parametrize("model_type", LLAMA_LIKE)
def test_packed_context_steps_are_the_unpacked_ones_and_prefills_stay_unpacked(model_type, dtype):
    """pack_context packs only inputs of <= 16 rows (AR steps, verifies of one row), equal to the unpacked
    tower within rounding; a longer prefill runs the modules themselves, bit for bit."""
    ctx, _ = lora_pair(model_type, seed=12, dtype=dtype)
    want = context_logits(ctx)  # a 2-row prefill of 12 (24 rows: unpacked), extends of 14, 2, 2 and 32 rows
    ids = torch.randint(4, 64, (1, 40), generator=torch.Generator().manual_seed(12))

    def one_row():
        with torch.inference_mode():
            out, cache = ctx.prefill(ids[:, :20])
            return torch.cat([out] + [ctx.extend(cache, ids[:, a:b]) for a, b in ((20, 21), (21, 37), (37, 38))], 1)

    alone = one_row()
    assert fuse_projections(ctx, pack=True, max_rows=16) > 0 and ctx.__dict__.get(HEAD_COPY) is not None
    tol = PACK_TOL[dtype]
    torch.testing.assert_close(context_logits(ctx), want, rtol=tol, atol=tol)
    got = one_row()
    assert torch.equal(got[:, :20], alone[:, :20])  # 20 rows: the unpacked modules ran
    torch.testing.assert_close(got, alone, rtol=tol, atol=tol)
    fuse_projections(ctx, fuse=False)
    assert ctx.__dict__.get(HEAD_COPY) is None and torch.equal(one_row(), alone)


@pytest.mark.parametrize("dtype", PACK_DTYPES)
def test_speculative_with_packed_towers_equals_ar_with_the_same_towers(dtype):
    model = lora_model(13, dtype=dtype)
    model.merge_adapters(pack_context=True)
    ids, mask = left_pad(random_prompts([6, 11, 3], seed=13))
    for r in range(3):  # batch 1: every step and verify is packed
        row = ids[r: r + 1, mask[r].bool()]
        want = autoregressive(model.context, row, max_new_tokens=20)
        got = speculative(model.context, model.denoiser, row, max_new_tokens=20)
        assert torch.equal(got.new_tokens, want.new_tokens)


@pytest.mark.parametrize("dtype", PACK_DTYPES)
def test_a_packed_context_serves_its_dtypes_rows_unless_pack_rows_says_otherwise(dtype):
    """merge_adapters(pack_context=True) packs inputs of up to 16 rows in bf16 (where larger ones were not the
    unpacked tower's bits) and 128 in float32 (batch-8 verifies too); pack_rows overrides it."""
    model = lora_model(16, dtype=dtype)
    H = model.context.lm_head.weight.shape[1]
    model.merge_adapters(pack_context=True)
    head = model.context.__dict__[HEAD_COPY]
    assert head.max_rows == inference_linear.context_pack_rows(dtype) == (16 if dtype == torch.bfloat16 else 128)
    assert head.applies(torch.zeros(3, 6, H, dtype=dtype)) == (dtype == torch.float32)
    assert not head.applies(torch.zeros(8, 17, H, dtype=dtype))
    model.merge_adapters(pack_context=True, pack_rows=4)
    assert model.context.__dict__[HEAD_COPY].max_rows == 4


@pytest.mark.parametrize("dtype", [PACK_DTYPES[1]])  # float32: bf16's batched verifies are not packed (16 rows)
def test_batched_speculative_on_a_packed_float32_context_equals_ar_on_it_row_for_row(dtype):
    """At batch 3 a 6-position verify is 18 rows, packed in float32 like the 3-row AR steps: speculative
    still writes AR's tokens on the same packed towers, every row."""
    model = lora_model(18, dtype=dtype)
    model.merge_adapters(pack_context=True)
    ids, mask = left_pad(random_prompts([6, 11, 3], seed=18))
    want = autoregressive(model.context, ids, mask, max_new_tokens=20)
    got = speculative(model.context, model.denoiser, ids, mask, max_new_tokens=20)
    assert torch.equal(got.new_tokens, want.new_tokens)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "16"])
def test_merge_adapters_refuses_a_bad_pack_rows_by_name(bad):
    with pytest.raises(ValueError, match="pack_rows must be a positive int"):
        lora_model(17).merge_adapters(pack_context=True, pack_rows=bad)


@pytest.mark.parametrize("dtype", PACK_DTYPES)
def test_a_packed_copy_refuses_to_be_copied_and_an_unmerged_model_copies(dtype):
    import copy

    ctx, den = lora_pair(seed=14, dtype=dtype)
    merge_adapters(den)
    with pytest.raises(TypeError, match="unmerge_adapters"):
        copy.deepcopy(den)
    unmerge_adapters(den)
    assert torch.equal(draft_logits(ctx, copy.deepcopy(den)), draft_logits(ctx, den))


@pytest.mark.parametrize("dtype", PACK_DTYPES)
def test_a_packed_full_copy_packs_every_product_and_drafts_alike(dtype):
    ctx, _ = lora_pair(seed=15, dtype=dtype)
    full = family_for(ctx.config).denoiser.from_context(ctx).eval()
    want = draft_logits(ctx, full)
    made = merge_adapters(full)
    projections = [m for m in full.backbone.modules() if isinstance(m, torch.nn.Linear)] + [full.lm_head]
    assert made == sum(p.weight.nbytes for p in projections)  # every projection and the head, once
    got = draft_logits(ctx, full)
    assert (got - want).abs().amax() <= PACK_TOL[dtype] * want.abs().amax()


# ---- int8 (fbgemm's dynamic int8 kernels): the draft only -------------------------------------------

needs_int8 = pytest.mark.skipif(not can_quantize(torch.zeros(1)), reason="this torch has no quantized int8 linear")


def int8_copies(den) -> list[InferenceLinear]:
    fused = [m.__dict__[k] for m in den.modules() if isinstance(m, Fusable)
             for k in ("_twotower_fused", "_twotower_packed_out") if k in m.__dict__]
    merged = [m.__dict__["_twotower_merged"] for m in den.modules()
              if isinstance(m, LoRALinear) and "_twotower_merged" in m.__dict__]
    return fused + merged + [c for c in [den.__dict__.get(HEAD_COPY)] if c is not None]


@needs_int8
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_inference_linear_is_f_linear_up_to_int8_rounding(dtype):
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(48, 32, generator=g).to(dtype), torch.randn(48, generator=g).to(dtype)
    x = torch.randn(2, 5, 32, generator=g).to(dtype)
    copy = InferenceLinear(w, b, pack="int8")
    got, want = copy(x), torch.nn.functional.linear(x.float(), w.float(), b.float())
    assert copy.int8 and got.dtype == dtype and got.shape == (2, 5, 48)
    # 7-bit inputs, 8-bit weights: a few percent of the output's scale, far from the float result's bits
    err = (got.float() - want).abs().amax() / want.abs().amax()
    assert 0 < err <= 0.05
    assert copy.nbytes == 48 * 32 + 2 * 4 * 48  # int8 weight, float32 scales and bias
    zero = InferenceLinear(torch.zeros(4, 32), pack="int8")  # an all-zero row must not divide by zero
    assert torch.equal(zero(x.float()), torch.zeros(2, 5, 4))


def test_a_bad_pack_value_is_refused_by_name():
    ctx, den = lora_pair(seed=17)
    with pytest.raises(ValueError, match="pack='int4'.*'int8'"):
        InferenceLinear(torch.zeros(4, 4), pack="int4")
    with pytest.raises(ValueError, match="pack='fast'"):
        merge_adapters(den, pack="fast")


@needs_int8
@pytest.mark.parametrize("full_copy", [False, True], ids=["lora", "full_copy"])
def test_int8_draft_is_the_float_draft_up_to_int8_rounding(full_copy):
    ctx, den = lora_pair(seed=18)
    if full_copy:
        den = family_for(ctx.config).denoiser.from_context(ctx).eval()
        randomize_time_(den, 19)
    made_float = merge_adapters(den, pack=False)  # float32 has nothing to pack: no head copy
    want = draft_logits(ctx, den)
    made = merge_adapters(den, pack="int8")
    copies = int8_copies(den)
    assert copies and all(c.int8 for c in copies) and den.__dict__.get(HEAD_COPY) is not None
    assert made == sum(c.weight_nbytes for c in copies)
    if not full_copy:  # a full copy's float merge fuses only; its int8 one holds every projection
        assert made < 0.3 * (made_float + den.lm_head.weight.nbytes)  # a quarter of float32, plus scales
    got = draft_logits(ctx, den)
    assert not torch.equal(got, want)
    # Rounding compounds over the layers of this random tower (about 5% here, relative): bounded, not exact.
    assert (got - want).norm() <= 0.1 * want.norm()
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.75
    den.train()
    assert not int8_copies(den)  # inference copies: dropped by .train() as the float ones are


@needs_int8
@LOSSLESS_DECODERS
def test_speculative_with_an_int8_draft_equals_ar(decoder):
    model, ids, mask, want = lossless_case(20)
    assert model.merge_adapters(int8_draft=True) > 0
    assert all(c.int8 for c in int8_copies(model.denoiser))
    got = run_decoder(decoder, model.context, model.denoiser, ids, mask, max_new_tokens=20)
    assert torch.equal(got.new_tokens, want.new_tokens) and got.blocks >= 1


@needs_int8
def test_a_nemotron_h_draft_applies_its_int8_head_copy_and_speculative_still_equals_ar():
    """NemotronH has no fusable projections: int8_draft makes only the head's copy, which its head must use."""
    ctx = randomize_(family_for("nemotron_h").context(FAMILY_CONFIGS["nemotron_h"]()), seed=23).eval()
    model = TwoTowerLM.from_backbone(ctx, block_size=6)
    randomize_time_(model.denoiser, 24)
    want_draft = draft_logits(model.context, model.denoiser)
    made = model.merge_adapters(int8_draft=True)
    head = model.denoiser.__dict__[HEAD_COPY]
    assert head.int8 and made == head.weight_nbytes
    got_draft = draft_logits(model.context, model.denoiser)
    assert not torch.equal(got_draft, want_draft) and (got_draft - want_draft).norm() <= 0.1 * want_draft.norm()
    ids, mask = left_pad(random_prompts([6, 11], seed=23))
    want = autoregressive(model.context, ids, mask, max_new_tokens=16)
    assert torch.equal(run_decoder(Speculative(block_size=6), model.context, model.denoiser, ids, mask,
                                   max_new_tokens=16).new_tokens, want.new_tokens)
    model.denoiser.float()  # moved or cast: the copy is dropped
    assert HEAD_COPY not in model.denoiser.__dict__


def test_where_torch_has_no_int8_kernels_int8_falls_back_to_the_float_draft_bit_for_bit(monkeypatch):
    ctx, den = lora_pair(seed=21)
    merge_adapters(den, pack=False)
    want = draft_logits(ctx, den)
    monkeypatch.setattr(inference_linear, "has_int8_linear", lambda: False)
    assert not can_quantize(den.lm_head.weight)
    merge_adapters(den, pack="int8")
    assert not any(c.int8 for c in int8_copies(den))
    assert den.__dict__.get(HEAD_COPY) is None  # an unquantized head copy would only cost memory
    assert torch.equal(draft_logits(ctx, den), want)


def test_int8_draft_without_the_kernels_warns_that_the_draft_stays_float(monkeypatch):
    ctx, den = lora_pair(seed=25)
    model = TwoTowerLM.from_backbone(ctx, block_size=6, denoiser=LoRA(rank=4, alpha=8.0))
    monkeypatch.setattr(inference_linear, "has_int8_linear", lambda: False)
    with pytest.warns(UserWarning, match="int8_draft=True: the draft's copies stay torch.float32"):
        assert model.merge_adapters(int8_draft=True) > 0  # merged and fused all the same
    assert not any(c.int8 for c in int8_copies(model.denoiser))


@needs_int8
def test_an_int8_copy_refuses_to_be_copied():
    import copy

    ctx, den = lora_pair(seed=22)
    merge_adapters(den, pack="int8")
    with pytest.raises(TypeError, match="unmerge_adapters"):
        copy.deepcopy(den)


# ---- the option in predict and serve -----------------------------------------------------------------


def saved_lora_model(tmp_path, seed: int = 11):
    """A LoRA two-tower model over a tiny saved Llama backbone, its adapters random (B != 0), saved
    to tmp_path/lora; (path, the model)."""
    from conftest import save_chat_llama

    model = TwoTowerLM.from_backbone(save_chat_llama(tmp_path / "backbone", seed=seed), block_size=6,
                                     denoiser=LoRA(rank=4, alpha=8.0)).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.denoiser.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.copy_(0.3 * torch.randn(m.lora_B.shape, generator=g))
    model.save_pretrained(tmp_path / "lora")
    return tmp_path / "lora", model


def merged(model) -> bool:
    return any(m.merged for m in model.denoiser.modules() if isinstance(m, LoRALinear))


def test_serve_settings_merge_adapters_makes_the_copies_at_load(tmp_path):
    from twotower.serving.app import load_model
    from twotower.serving.requests import ServeSettings

    path, _ = saved_lora_model(tmp_path)
    assert not merged(load_model(ServeSettings(model=str(path))))
    model = load_model(ServeSettings(model=str(path), merge_adapters=True))
    assert merged(model)
    ids, mask = left_pad(random_prompts([5, 8], seed=3))
    want = autoregressive(model.context, ids, mask, max_new_tokens=12)
    assert torch.equal(speculative(model.context, model.denoiser, ids, mask, max_new_tokens=12).new_tokens,
                       want.new_tokens)


def test_predict_merge_adapters_makes_the_copies_when_prediction_starts(tmp_path):
    from twotower.inference import GenerationModule

    path, _ = saved_lora_model(tmp_path)
    plain = GenerationModule(str(path), decoder="speculative")
    module = GenerationModule(str(path), decoder="speculative", merge_adapters=True)
    assert not merged(module.model)  # not at construction: Lightning moves the module before predicting
    module.on_predict_start()
    assert merged(module.model)
    # Recorded with the predictions (a resumed file must use the same setting), absent when off.
    assert module.prediction_settings()["merge_adapters"] is True
    assert "merge_adapters" not in plain.prediction_settings()


def test_int8_draft_in_serve_and_predict_makes_int8_copies_and_is_recorded(tmp_path):
    from twotower.inference import GenerationModule
    from twotower.serving.app import load_model
    from twotower.serving.requests import ServeSettings

    path, _ = saved_lora_model(tmp_path)
    served = load_model(ServeSettings(model=str(path), int8_draft=True))  # implies merge_adapters
    assert merged(served) or int8_copies(served.denoiser)
    assert all(c.int8 for c in int8_copies(served.denoiser)) == can_quantize(torch.zeros(1))
    assert not any(m.fused_nbytes for m in served.context.modules() if isinstance(m, Fusable))
    module = GenerationModule(str(path), decoder="speculative", int8_draft=True)
    module.on_predict_start()
    assert int8_copies(module.model.denoiser)
    settings = module.prediction_settings()
    assert settings["int8_draft"] is True and settings["merge_adapters"] is True and "pack_context" not in settings


def test_pack_context_in_serve_and_predict_fuses_the_context_and_is_recorded(tmp_path):
    from twotower.inference import GenerationModule
    from twotower.serving.app import load_model
    from twotower.serving.requests import ServeSettings

    path, _ = saved_lora_model(tmp_path)
    served = load_model(ServeSettings(model=str(path), pack_context=True))  # implies merge_adapters
    assert merged(served) or int8_copies(served.denoiser)
    assert all(m.fused_nbytes for m in served.context.modules() if isinstance(m, Fusable))
    ids, mask = left_pad(random_prompts([5, 8], seed=4))
    want = autoregressive(served.context, ids, mask, max_new_tokens=12)
    assert torch.equal(speculative(served.context, served.denoiser, ids, mask, max_new_tokens=12).new_tokens,
                       want.new_tokens)
    module = GenerationModule(str(path), decoder="speculative", pack_context=True)
    module.on_predict_start()
    assert all(m.fused_nbytes for m in module.model.context.modules() if isinstance(m, Fusable))
    settings = module.prediction_settings()
    assert settings["pack_context"] is True and settings["merge_adapters"] is True


# ---- a draft head over part of the vocabulary (merge_adapters(draft_vocab=...)) ------------------------------


def test_a_vocab_subset_head_is_the_full_head_on_its_tokens_and_outside_everywhere_else():
    g = torch.Generator().manual_seed(30)
    weight, bias, x = torch.randn(40, 8, generator=g), torch.randn(40, generator=g), torch.randn(2, 3, 8, generator=g)
    vocab = torch.tensor([0, 5, 6, 17, 39])
    got = inference_linear.VocabSubsetHead(weight, bias, vocab)(x)
    want = torch.nn.functional.linear(x, weight, bias)
    assert got.shape == want.shape
    assert torch.allclose(got[..., vocab], want[..., vocab], atol=1e-6)
    outside = torch.ones(40, dtype=torch.bool)
    outside[vocab] = False
    assert (got[..., outside] == inference_linear.OUTSIDE_VOCAB).all()
    assert torch.isin(got.argmax(-1), vocab).all()
    probs = got.softmax(-1)  # a distribution over the full vocabulary, exactly 0 outside the subset
    assert torch.isfinite(probs).all() and (probs[..., outside] == 0).all()


@LOSSLESS_DECODERS
def test_speculative_with_a_draft_vocab_equals_ar_and_drafts_only_its_tokens(decoder):
    """A subset that leaves out most of the vocabulary: drafts stay inside it, the output stays AR's."""
    model, ids, mask, want = lossless_case(31)
    vocab = torch.arange(0, model.config.vocab_size, 3)
    made = model.merge_adapters(draft_vocab=vocab.flip(0).tolist() + [0])  # any order, repeats: sorted, distinct
    head = model.denoiser.__dict__[HEAD_COPY]
    assert torch.equal(head.vocab, vocab) and made >= head.nbytes
    logits = draft_logits(model.context, model.denoiser)
    assert torch.isin(logits.argmax(-1), vocab).all()
    got = run_decoder(decoder, model.context, model.denoiser, ids, mask, max_new_tokens=20)
    assert torch.equal(got.new_tokens, want.new_tokens) and got.blocks >= 1
    model.unmerge_adapters()
    assert HEAD_COPY not in model.denoiser.__dict__


def test_a_full_draft_vocab_drafts_as_the_full_head():
    model = lora_model(32)
    model.merge_adapters(pack=False)
    want = draft_logits(model.context, model.denoiser)
    model.merge_adapters(pack=False, draft_vocab=range(model.config.vocab_size))
    assert torch.allclose(draft_logits(model.context, model.denoiser), want, atol=1e-5)


@pytest.mark.parametrize("bad, match", [([], "non-empty"), ([[1, 2]], "1-D"), ([1.5, 2.0], "integer"),
                                        ([3, 10_000], r"\[10000\]"), ([-1], r"\[-1\]"), ("abc", "token ids")])
def test_merge_adapters_refuses_a_bad_draft_vocab_by_value(bad, match):
    with pytest.raises(ValueError, match=match):
        lora_model(33).merge_adapters(draft_vocab=bad)


def test_draft_vocab_in_serve_and_predict_restricts_the_draft_keeps_ar_and_is_recorded(tmp_path):
    """predict / serve take `draft_vocab` as a file or a folder of ids (`save_draft_vocab`); the merged head is
    over exactly those ids, speculative output stays AR's, and predictions record which list they used."""
    from twotower.inference import GenerationModule
    from twotower.serving.app import load_model
    from twotower.serving.requests import ServeSettings
    from twotower.tokenizers import DRAFT_VOCAB_FILE, load_draft_vocab, save_draft_vocab

    path, _ = saved_lora_model(tmp_path)
    vocab = list(range(0, 64, 2))
    assert save_draft_vocab(vocab, path) == path / DRAFT_VOCAB_FILE  # a folder: the model's own file
    assert load_draft_vocab(path) == vocab and load_draft_vocab(path / DRAFT_VOCAB_FILE) == vocab
    served = load_model(ServeSettings(model=str(path), draft_vocab=str(path)))  # implies merge_adapters
    assert served.denoiser.__dict__[HEAD_COPY].vocab.tolist() == vocab
    ids, mask = left_pad(random_prompts([5, 8], seed=4))
    want = autoregressive(served.context, ids, mask, max_new_tokens=12)
    assert torch.equal(speculative(served.context, served.denoiser, ids, mask, max_new_tokens=12).new_tokens,
                       want.new_tokens)
    module = GenerationModule(str(path), decoder="speculative", draft_vocab=str(path / DRAFT_VOCAB_FILE))
    module.on_predict_start()
    assert module.model.denoiser.__dict__[HEAD_COPY].vocab.tolist() == vocab
    settings = module.prediction_settings()
    assert settings["merge_adapters"] is True and settings["draft_vocab"].startswith("32 ids ")
    other = save_draft_vocab(vocab[:-1], tmp_path / "other.json")
    assert GenerationModule(str(path), draft_vocab=str(other)).prediction_settings()["draft_vocab"] != settings["draft_vocab"]
    assert "draft_vocab" not in GenerationModule(str(path)).prediction_settings()


@pytest.mark.parametrize("content, error, match", [
    (None, FileNotFoundError, "no file .*save_draft_vocab"), ("[1, 2", ValueError, "not a JSON list"),
    ('{"a": 1}', ValueError, "non-empty JSON list of integer token ids, got 'dict'"),
    ("[]", ValueError, "non-empty JSON list"), ("[1, 2.5]", ValueError, r"integer token ids, got \[1, 2.5\]"),
    ("[1, 1000000]", ValueError, r"token ids in \[0, \d+\), got \[1000000\]"),
])
def test_a_bad_draft_vocab_file_is_refused_before_predicting(tmp_path, content, error, match):
    from twotower.inference import GenerationModule

    path, _ = saved_lora_model(tmp_path)
    file = tmp_path / "vocab.json"
    if content is not None:
        file.write_text(content)
    with pytest.raises(error, match=match):
        GenerationModule(str(path), draft_vocab=str(file))


def test_the_smollm2_asset_ships_a_draft_vocab_with_the_chat_markers_and_eos():
    from twotower.hub import resolve_model
    from twotower.tokenizers import find_tokenizer, load_draft_vocab

    ids = load_draft_vocab("smollm2-135m")
    tok = find_tokenizer(resolve_model("smollm2-135m-backbone"))
    assert len(ids) == len(set(ids)) == 24160 and ids == sorted(ids) and max(ids) < tok.vocab_size
    markers = set(tok.hf.all_special_ids) | {tok.eos_token_id}
    assert markers <= set(ids)
    assert set(range(16384)) <= set(ids)  # every id below 16384 (frequent_tokens' first_ids)
