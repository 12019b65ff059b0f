"""The chunked SSD scan and causal conv against naive per-step loops; mamba-ssm parity on GPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from twotower.towers.nemotron_h.ssd import (
    causal_conv1d,
    conv_boundary_states,
    kernel_backend,
    scan_path,
    ssd_scan,
    ssd_scan_reference,
    ssd_step,
    trust_short_seeded,
)


def naive_scan(x, dt, A, B, C, D, state):
    """Sequential recurrence in float64: the definition the chunked scan must reproduce."""
    x, dt, A, B, C, D, state = (t.double() for t in (x, dt, A, B, C, D, state))
    h, g = x.shape[2], B.shape[2]
    B = B.repeat_interleave(h // g, dim=2)
    C = C.repeat_interleave(h // g, dim=2)
    ys, starts = [], []
    for t in range(x.shape[1]):
        starts.append(state)
        state = state * torch.exp(dt[:, t] * A)[..., None, None] + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        ys.append((state @ C[:, t, :, :, None]).squeeze(-1) + x[:, t] * D[:, None])
    return torch.stack(ys, 1), state, torch.stack(starts, 1)


def random_inputs(b=2, L=37, h=4, p=3, g=2, n=5, seed=0, strong_decay=False):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b, L, h, p, generator=gen)
    dt = torch.rand(b, L, h, generator=gen) * (3.0 if strong_decay else 0.5)
    A = -torch.rand(h, generator=gen) * (4.0 if strong_decay else 1.5)
    B = torch.randn(b, L, g, n, generator=gen)
    C = torch.randn(b, L, g, n, generator=gen)
    D = torch.randn(h, generator=gen)
    s0 = torch.randn(b, h, p, n, generator=gen)
    return x, dt, A, B, C, D, s0


@pytest.mark.parametrize("chunk", [1, 4, 8, 16, 64])
@pytest.mark.parametrize("strong_decay", [False, True])
def test_chunked_scan_matches_naive_recurrence(chunk, strong_decay):
    x, dt, A, B, C, D, s0 = random_inputs(strong_decay=strong_decay)
    y, final = ssd_scan_reference(x, dt, A, B, C, chunk_size=chunk, D=D, initial_state=s0)
    y_ref, final_ref, _ = naive_scan(x, dt, A, B, C, D, s0)
    assert torch.allclose(y.double(), y_ref, atol=2e-5, rtol=1e-5)
    assert torch.allclose(final.double(), final_ref, atol=2e-5, rtol=1e-5)
    assert y.dtype == torch.float32 and final.dtype == torch.float32


def test_chunk_states_are_states_entering_each_chunk():
    x, dt, A, B, C, D, s0 = random_inputs(L=32)
    _, _, starts = naive_scan(x, dt, A, B, C, D, s0)
    _, _, chunk_states = ssd_scan_reference(x, dt, A, B, C, chunk_size=8, D=D, initial_state=s0, return_chunk_states=True)
    assert chunk_states.shape == (2, 4, 4, 3, 5)
    assert torch.allclose(chunk_states.double(), starts[:, ::8], atol=2e-5)
    assert torch.equal(chunk_states[:, 0], s0)


def test_zero_dt_positions_leave_state_unchanged():
    x, dt, A, B, C, D, s0 = random_inputs(L=12)
    dt[:, :5] = 0.0
    _, final = ssd_scan_reference(x, dt, A, B, C, chunk_size=4, D=D, initial_state=s0)
    _, final_tail = ssd_scan_reference(x[:, 5:], dt[:, 5:], A, B[:, 5:], C[:, 5:], chunk_size=4, D=D, initial_state=s0)
    assert torch.allclose(final, final_tail, atol=1e-5)


def test_single_step_matches_scan_of_length_one():
    x, dt, A, B, C, D, s0 = random_inputs(L=1)
    y, final = ssd_scan_reference(x, dt, A, B, C, chunk_size=8, D=D, initial_state=s0)
    y1, final1 = ssd_step(x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D=D, state=s0)
    assert torch.allclose(y[:, 0], y1, atol=1e-5) and torch.allclose(final, final1, atol=1e-5)


@pytest.mark.parametrize("L", [20, 100])  # the shifted multiply-add path and the conv1d path
def test_causal_conv_with_state_matches_unsplit_conv(L):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, L, 6, generator=gen)
    w, bias = torch.randn(6, 4, generator=gen), torch.randn(6, generator=gen)
    full, state_full = causal_conv1d(x, w, bias)
    # Reference: torch's conv with left padding, as a plain Conv1d would run it.
    ref = F.conv1d(x.transpose(1, 2), w[:, None], bias, padding=3, groups=6)[:, :, :L].transpose(1, 2)
    assert torch.allclose(full, ref, atol=1e-6)
    a, st = causal_conv1d(x[:, :7], w, bias)
    b, st2 = causal_conv1d(x[:, 7:], w, bias, initial_state=st)
    assert torch.allclose(torch.cat([a, b], 1), full, atol=1e-6)
    assert torch.equal(st2, state_full) and torch.equal(st2, x[:, -3:].transpose(1, 2))


def test_conv_boundary_states():
    x = torch.arange(2 * 16 * 3, dtype=torch.float32).view(2, 16, 3)
    states = conv_boundary_states(x, kernel_size=4, block_size=4)
    assert states.shape == (2, 4, 3, 3)
    assert torch.equal(states[:, 0], torch.zeros(2, 3, 3))
    for k in range(1, 4):
        assert torch.equal(states[:, k], x[:, 4 * k - 3: 4 * k].transpose(1, 2))


def test_dispatcher_uses_reference_on_cpu_and_rejects_forced_kernel():
    x, dt, A, B, C, D, s0 = random_inputs(L=9)
    y, final = ssd_scan(x, dt, A, B, C, chunk_size=4, D=D, initial_state=s0)
    y_ref, final_ref = ssd_scan_reference(x, dt, A, B, C, chunk_size=4, D=D, initial_state=s0)
    assert torch.equal(y, y_ref) and torch.equal(final, final_ref)
    with kernel_backend("mamba_ssm"), pytest.raises(RuntimeError, match="CUDA"):
        ssd_scan(x, dt, A, B, C, chunk_size=4, D=D, initial_state=s0)
    with pytest.raises(ValueError):
        kernel_backend("triton")


gpu = pytest.mark.gpu


@gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("L,chunk", [(1, 128), (7, 256), (16, 128), (16, 256), (100, 64), (300, 128)])
def test_mamba_ssm_kernel_matches_reference(L, chunk):
    """Includes seeded scans shorter than the kernel's chunk size (reported elsewhere to go wrong)."""
    pytest.importorskip("mamba_ssm")
    x, dt, A, B, C, D, s0 = (t.cuda() for t in random_inputs(b=2, L=L, h=8, p=16, g=2, n=16))
    with kernel_backend("mamba_ssm"):
        y, final = ssd_scan(x, dt, A, B, C, chunk_size=chunk, D=D, initial_state=s0)
    y_ref, final_ref = ssd_scan_reference(x, dt, A, B, C, chunk_size=chunk, D=D, initial_state=s0)
    assert torch.allclose(y, y_ref, atol=1e-3, rtol=1e-3)
    assert torch.allclose(final, final_ref, atol=1e-3, rtol=1e-3)


class _FakeCuda:
    """Stands for a CUDA tensor in the dispatch rule only (shape + is_cuda)."""

    def __init__(self, L: int):
        self.shape = (1, L, 4, 8)
        self.is_cuda = True


@pytest.mark.parametrize("version", ["2.2.4", None])
def test_short_seeded_scans_take_the_reference_until_the_kernel_is_verified(monkeypatch, version):
    """The dispatch rule with mamba-ssm mocked as installed: short seeded scans (decode blocks,
    short extends) go to the reference unless the version is verified or trust is forced; long or
    unseeded scans, and forced kernel runs (the parity test), go to the kernel."""
    import sys
    import types

    from twotower.towers.nemotron_h import ssd

    fake = types.ModuleType("mamba_ssm.ops.triton.ssd_combined")
    for name in ("mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.triton"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "mamba_ssm.ops.triton.ssd_combined", fake)
    monkeypatch.setattr(ssd, "_kernel_version", lambda: version)
    s0 = torch.zeros(1)
    short, long_ = _FakeCuda(16), _FakeCuda(300)
    with kernel_backend("auto"), trust_short_seeded(False):
        assert scan_path(short, chunk_size=128, initial_state=s0) == "reference"        # denoiser block
        assert scan_path(_FakeCuda(1), chunk_size=128, initial_state=s0) == "reference"  # AR step as a scan
        assert scan_path(short, chunk_size=128, initial_state=None) == "mamba_ssm"     # unseeded
        assert scan_path(long_, chunk_size=128, initial_state=s0) == "mamba_ssm"       # long seeded
        assert scan_path(long_, chunk_size=128, initial_state=s0, return_chunk_states=True) == "reference"
        with trust_short_seeded(True):
            assert scan_path(short, chunk_size=128, initial_state=s0) == "mamba_ssm"
        with kernel_backend("mamba_ssm"):
            assert scan_path(short, chunk_size=128, initial_state=s0) == "mamba_ssm"
        monkeypatch.setattr(ssd, "VERIFIED_KERNEL_VERSIONS", frozenset({"2.2.4"}))
        assert scan_path(short, chunk_size=128, initial_state=s0) == ("mamba_ssm" if version else "reference")
        with kernel_backend("torch"):
            assert scan_path(long_, chunk_size=128, initial_state=s0) == "reference"


def test_no_kernel_version_is_verified_by_default():
    from twotower.towers.nemotron_h import ssd

    assert ssd.VERIFIED_KERNEL_VERSIONS == frozenset()


def test_masks_cached_during_inference_still_train():
    x, dt, A, B, C, D, s0 = random_inputs(L=13)
    with torch.inference_mode():
        ssd_scan_reference(x, dt, A, B, C, chunk_size=13, D=D)
    x = x.clone().requires_grad_(True)
    y, _ = ssd_scan_reference(x, dt, A, B, C, chunk_size=13, D=D)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_single_chunk_without_final_state_gives_the_same_outputs():
    g = torch.Generator().manual_seed(11)
    b, L, h, p, n = 2, 16, 4, 8, 6
    x = torch.randn(b, L, h, p, generator=g)
    dt = torch.rand(b, L, h, generator=g) * 0.5
    A = -torch.rand(h, generator=g) - 0.1
    B, C = torch.randn(b, L, 2, n, generator=g), torch.randn(b, L, 2, n, generator=g)
    init = torch.randn(b, h, p, n, generator=g)
    y, final = ssd_scan_reference(x, dt, A, B, C, chunk_size=16, D=torch.ones(h), initial_state=init)
    y2, none = ssd_scan_reference(x, dt, A, B, C, chunk_size=16, D=torch.ones(h), initial_state=init, final_state=False)
    assert none is None and torch.equal(y, y2) and final is not None


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("seeded", [False, True])
def test_single_chunk_with_grouped_b_c_matches_naive_recurrence(groups, seeded):
    # One chunk (a decode block): the C.B products are formed per group and shared by its heads.
    x, dt, A, B, C, D, s0 = random_inputs(b=3, L=16, h=4, p=3, g=groups, n=5, seed=groups)
    init = s0 if seeded else None
    y, final = ssd_scan_reference(x, dt, A, B, C, chunk_size=64, D=D, initial_state=init)
    y_ref, final_ref, _ = naive_scan(x, dt, A, B, C, D, s0 if seeded else torch.zeros_like(s0))
    assert torch.allclose(y.double(), y_ref, atol=2e-5, rtol=1e-5)
    assert torch.allclose(final.double(), final_ref, atol=2e-5, rtol=1e-5)
