"""int8 weight-only towers (`twotower.quantization`, `from_pretrained(quantize="int8")`)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from conftest import left_pad, make_model, random_prompts
from twotower.decoding import Autoregressive, MaskDiffusion, MockAR, Speculative
from twotower.inference import GenerationModule
from twotower.model import TwoTowerLM
from twotower.quantization import Int8Experts, Int8Linear, dequantize, quantize_int8, stored_bytes
from twotower.samplers import TopKCommit


@pytest.fixture
def quantized(twotower_dir):
    return TwoTowerLM.from_pretrained(twotower_dir, quantize="int8").eval()


def test_projections_are_int8_and_the_rest_is_not(quantized):
    kinds = {name: type(m) for name, m in quantized.named_modules()}
    q = [n for n, t in kinds.items() if t in (Int8Linear, Int8Experts)]
    # every projection of both stacks: per tower 2 Mamba x 2, 2 attention x 4, 1 MLP x 2, 2 MoE x (2 shared + experts)
    assert len(q) == 2 * (2 * 2 + 2 * 4 + 2 + 2 * 3)
    assert all(".backbone.layers." in n for n in q)
    assert not [n for n, t in kinds.items() if t is nn.Linear and ".backbone.layers." in n]
    for name in ("context.lm_head", "denoiser.lm_head", "denoiser.time.t_embedder.mlp.0", "denoiser.time.t_block.1"):
        assert kinds[name] is nn.Linear, name
    float_params = {n: p.dtype for n, p in quantized.named_parameters()}
    assert float_params["context.backbone.embeddings.weight"] == torch.float32
    assert float_params["denoiser.backbone.embeddings.weight"] == torch.float32
    assert all(p == torch.float32 for n, p in float_params.items() if n.startswith("denoiser.time."))
    assert all(float_params[n] == torch.float32 for n in float_params if ".gate.weight" in n)  # routers
    assert quantized.quantization == "int8"


def test_int8_rounding_is_per_output_channel():
    w = torch.randn(5, 7, 9)
    w[0, 1] = 0
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (5, 7, 1)
    assert (q.abs().amax(-1) == 127).sum() == 5 * 7 - 1  # every non-zero row uses the full range
    assert (dequantize(q, scale, torch.float32) - w).abs().le(scale / 2 + 1e-7).all()


@pytest.mark.parametrize("decoder", [Autoregressive(), MockAR(), MaskDiffusion(), Speculative(),
                                     MaskDiffusion(TopKCommit(3), steps_per_block=4)], ids=repr)
def test_quantized_model_runs_every_decoder(quantized, decoder):
    ids, mask = left_pad(random_prompts([5, 9, 3], seed=1))
    ids = ids + 4 * mask  # byte-tokenizer ids past the special ones
    out = quantized.generate(ids, mask, decoder, max_new_tokens=12)
    assert out.new_tokens.shape == (3, 12) and (out.num_generated >= 1).all()


def test_chunked_rounding_equals_the_whole_tensor_at_once(monkeypatch):
    """quantize_int8 rounds a few rows at a time (bounded temporaries); the result is the one-shot
    per-row formula's, bit for bit."""
    from twotower import quantization

    torch.manual_seed(5)
    w = torch.randn(3, 10, 7).bfloat16()
    w[1, 4] = 0
    ref = w.float()
    ref_scale = ref.abs().amax(-1, keepdim=True) / 127.0
    ref_scale = torch.where(ref_scale > 0, ref_scale, torch.ones_like(ref_scale))
    ref_q = torch.round(ref / ref_scale).clamp(-127, 127).to(torch.int8)
    for chunk in (1, 7 * 4, 7 * 5 + 3, 10 ** 6):  # one row, 4 rows, 5 rows (not dividing 30), all
        monkeypatch.setattr(quantization, "QUANT_CHUNK", chunk)
        q, scale = quantize_int8(w)
        assert torch.equal(q, ref_q) and torch.equal(scale, ref_scale), chunk


def test_int8_layers_match_their_float_originals_closely():
    torch.manual_seed(3)
    lin = nn.Linear(32, 48, bias=True)
    x = torch.randn(4, 32)
    q = Int8Linear(lin)
    torch.testing.assert_close(q(x), lin(x), atol=0.02, rtol=0.02)
    assert q(x.bfloat16()).dtype == torch.bfloat16 and q.weight_int8.dtype == torch.int8


def test_speculative_equals_ar_on_the_quantized_model(quantized):
    ids, mask = left_pad(random_prompts([6, 11, 4, 8], seed=2))
    ids = ids + 4 * mask
    ar = quantized.generate(ids, mask, Autoregressive(), max_new_tokens=24)
    spec = quantized.generate(ids, mask, Speculative(block_size=6), max_new_tokens=24)
    assert torch.equal(spec.new_tokens, ar.new_tokens)


# Wide enough that the projections outweigh the embeddings, heads and time modules kept in bf16
# (the default model's share), still ~100k parameters.
WIDE = dict(hidden_size=96, intermediate_size=384, moe_intermediate_size=192, moe_shared_expert_intermediate_size=192,
            mamba_num_heads=8, head_dim=24, mamba_head_dim=24, n_routed_experts=8)


def test_stored_bytes_at_most_055_of_bf16(tmp_path):
    make_model(**WIDE).save_pretrained(tmp_path / "wide")
    bf16 = TwoTowerLM.from_pretrained(tmp_path / "wide", dtype=torch.bfloat16)
    int8 = TwoTowerLM.from_pretrained(tmp_path / "wide", dtype=torch.bfloat16, quantize="int8")
    ratio = stored_bytes(int8) / stored_bytes(bf16)
    assert ratio <= 0.55, ratio
    projections = sum(b.numel() * b.element_size() for n, b in int8.named_buffers() if n.endswith(("_int8", "_scale")))
    kept = stored_bytes(int8) - projections
    assert projections / (stored_bytes(bf16) - kept) < 0.53  # int8 + one float32 scale per row


def test_generation_module_quantize_and_bad_values(twotower_dir):
    module = GenerationModule(str(twotower_dir), quantize="int8", max_new_tokens=4)
    assert module.model.quantization == "int8" and module.prediction_settings()["quantize"] == "int8"
    with pytest.raises(ValueError, match=r"quantize must be one of \['int8'\] or None .*got 'int4'"):
        TwoTowerLM.from_pretrained(twotower_dir, quantize="int4")
    with pytest.raises(ValueError, match="quantize must be one of"):
        GenerationModule(str(twotower_dir), quantize="fp8")


def test_a_quantized_model_is_not_saved(quantized, tmp_path):
    with pytest.raises(ValueError, match="quantized .* cannot be saved; save the full-precision model"):
        quantized.save_pretrained(tmp_path / "out")


@pytest.mark.parametrize("expert_layout", ["fused", "per_expert"])
def test_quantized_while_loading_equals_quantized_after(twotower_dir, tmp_path, expert_layout):
    """from_pretrained(quantize=...) rounds each projection as it is read (the plan applied on the meta
    model first); the result is exactly quantize_model on the loaded bf16 model, whatever the
    checkpoint's expert layout (per-expert tensors are stacked when read)."""
    from twotower.quantization import quantize_model

    path = tmp_path / expert_layout
    TwoTowerLM.from_pretrained(twotower_dir).save_pretrained(path, expert_layout=expert_layout)
    on_load = TwoTowerLM.from_pretrained(path, dtype=torch.bfloat16, quantize="int8")
    after = quantize_model(TwoTowerLM.from_pretrained(path, dtype=torch.bfloat16), "int8")
    a, b = on_load.state_dict(), after.state_dict()
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert [m.dtype for m in on_load.modules() if isinstance(m, Int8Experts)] == [torch.bfloat16] * 4
    ids, mask = left_pad(random_prompts([5, 9], seed=4))
    ids = ids + 4 * mask
    torch.testing.assert_close(on_load.generate(ids, mask, MaskDiffusion(), max_new_tokens=8).new_tokens,
                               after.generate(ids, mask, MaskDiffusion(), max_new_tokens=8).new_tokens)


def test_loading_quantized_never_holds_the_full_precision_projections(twotower_dir, monkeypatch):
    """Whenever a projection is rounded during from_pretrained(quantize="int8"), the only bf16 matrices
    alive are the ones kept in bf16 (embeddings, heads, time modules) and the one being rounded."""
    import gc

    from twotower import quantization

    def bf16_matrices():
        return [t for t in gc.get_objects() if type(t) in (torch.Tensor, nn.Parameter) and not t.is_meta
                and t.dtype == torch.bfloat16 and t.dim() >= 2]

    real = quantization.quantize_int8
    seen = []

    def spy(weight):
        if not weight.is_meta:
            live = sum(t.numel() for t in bf16_matrices())
            seen.append((live, weight.numel()))
        return real(weight)

    monkeypatch.setattr(quantization, "quantize_int8", spy)
    model = TwoTowerLM.from_pretrained(twotower_dir, dtype=torch.bfloat16, quantize="int8")
    kept = sum(p.numel() for n, p in model.named_parameters() if p.dtype == torch.bfloat16 and p.dim() >= 2)
    full = sum(p.numel() for p in TwoTowerLM.from_pretrained(twotower_dir, dtype=torch.bfloat16).parameters())
    assert len(seen) == 2 * (2 * 2 + 2 * 4 + 2 + 2 * 4)  # every projection, the experts' two stacks each
    assert all(live <= kept + n for live, n in seen), (seen, kept)
    assert kept + max(n for _, n in seen) < full / 2
