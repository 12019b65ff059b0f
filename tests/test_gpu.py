"""GPU checks (marker `gpu`; skipped without CUDA; the bf16 check also runs on CPU): CUDA parity of the towers in float32, bf16
generation with float32 SSM states, and the embedded default on the GPU. The mamba-ssm kernel
parity tests live in test_ssd.py and the two-device test in test_model.py.

    python -m pytest -m gpu -q     # on a CUDA machine
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import make_model

from twotower.model import TwoTowerLM

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, gpu])]
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.gpu
@gpu
def test_cuda_float32_context_and_denoiser_match_cpu():
    cpu = make_model(seed=0, block_size=16, time_seed=1)
    gpu = make_model(seed=0, block_size=16, identity=True)
    gpu.load_state_dict(cpu.state_dict())
    gpu.cuda()
    x = torch.randint(4, 64, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(gpu.context(x.cuda()).cpu(), cpu.context(x), rtol=1e-4, atol=1e-4)
        _, states_c = cpu.context.forward_train(x[:, :32], 8)
        _, states_g = gpu.context.forward_train(x[:, :32].cuda(), 8)
        t = torch.rand(2, 4)
        a = cpu.denoiser.forward_train(x[:, :32], states_c, t)
        b = gpu.denoiser.forward_train(x[:, :32].cuda(), states_g, t.cuda()).cpu()
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    ids = torch.randint(4, 64, (2, 9))
    assert torch.equal(cpu.generate(ids, max_new_tokens=16).sequences,
                       gpu.generate(ids.cuda(), max_new_tokens=16).sequences.cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_generation_keeps_fp32_ssm_states_and_finishes(device):
    model = make_model(seed=2, block_size=16, identity=True)
    model = model.to(device=device, dtype=torch.bfloat16).eval()
    model.context.keep_router_fp32()
    ids = torch.randint(4, 64, (3, 200), device=device)  # a long context: seeded states must not overflow
    with torch.no_grad():
        _, cache = model.context.prefill(ids)
    assert all(s.dtype == torch.float32 for s in cache.ssm if s is not None)
    assert all(torch.isfinite(s).all() for s in cache.ssm if s is not None)
    out = model.generate(ids, max_new_tokens=32)
    assert out.new_tokens.shape == (3, 32) and (out.new_tokens != model.mask_token_id).all()


@pytest.mark.gpu
@gpu
def test_embedded_default_generates_on_gpu():
    path = ROOT / "twotower" / "assets" / "twotower"
    if not (path / "config.json").exists():
        pytest.skip("embedded default not present")
    model = TwoTowerLM.from_pretrained(path).cuda().eval()
    ids = torch.tensor([[1] + list(b + 4 for b in b"def main():\n    ")], device="cuda")
    ar = model.generate_ar(ids, max_new_tokens=32, return_dict=True)
    diff = model.generate(ids, max_new_tokens=32)
    assert ar.new_tokens.shape == diff.new_tokens.shape == (1, 32)
    assert float(diff.tokens_per_nfe[0]) >= 1.0


@pytest.mark.parametrize("device", DEVICES)
def test_speculative_decoding_is_the_ar_output_on_each_device(device):
    """On CUDA the provisional extend's scan runs on mamba-ssm's kernel when installed; the closed-form
    rollback must land on the same states, so the output stays the AR output, in float32 and bf16."""
    model = make_model(seed=4, block_size=16, identity=True).to(device).eval()
    ids = torch.randint(4, 64, (3, 40), device=device)
    ar = model.generate_ar(ids, max_new_tokens=40, return_dict=True)
    spec = model.generate_speculative(ids, max_new_tokens=40, block_size=8, return_dict=True)
    assert torch.equal(spec.new_tokens, ar.new_tokens)
    half = model.to(torch.bfloat16)
    half.context.keep_router_fp32()
    out = half.generate_speculative(ids, max_new_tokens=40, block_size=8, return_dict=True)
    assert out.new_tokens.shape == (3, 40) and int(out.num_generated.min()) == 40
