"""Mamba-2 time steps in the regime of trained checkpoints, against transformers' NemotronH.

Trained heads take time steps dt = softplus(dt_raw + dt_bias) below `time_step_min`, where the clamp
rule decides the numbers: dt is clamped to the config's `time_step_limit` (default (0, inf), no
clamp), as transformers' NemotronH and mamba-ssm's chunked-scan kernels do
(`twotower.towers.nemotron_h.layers.dt_limit`, docs/design.md section 1.1). The test models here come from
`trained_time_steps_` (conftest): some heads' dt far below 1e-3, larger B and C, chunk_size 4 so
that every sequence spans many scan chunks. Each rule is checked with the default limit, with a
recorded floor and with a floor and a ceiling, on the full forward and on a prefill followed by
1-token and multi-token extends.

transformers' one-token recurrent step (`selective_state_update`, as in mamba-ssm) applies no limit,
so with a non-default limit its own cached 1-token decoding drifts from its full forward; there we
compare against transformers' full forward and its chunked (multi-token) cached path only.
"""

from __future__ import annotations

import inspect
import json
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import INF, hf_backbone_state, make_hf_pair, save_backbone, tiny_config

from twotower.towers.nemotron_h.context import ContextTower
from twotower.towers.nemotron_h.layers import NO_DT_LIMIT, dt_limit

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "twotower" / "assets"
PATTERN = "M*-EM*E"
LIMITS = {"default": None, "floor": [0.001, INF], "floor_and_ceiling": [0.0005, 0.05]}
limits = pytest.mark.parametrize("limit", list(LIMITS.values()), ids=list(LIMITS))
PREFILL = 13
ONE_AND_MANY = (1, 9, 1, 1, 6, 1, 9)  # extends after the prefill: 41 tokens, 11 chunks of 4
MANY = (9, 2, 6, 11)  # multi-token extends only (transformers' chunked cached path): 41 tokens


def low_dt_pair(limit, seed: int = 11, chunk_size: int = 4):
    """(transformers model, our tower) with the same trained-regime weights and this time_step_limit."""
    kwargs = {} if limit is None else {"time_step_limit": limit}
    return make_hf_pair(PATTERN, seed=seed, low_dt=True, chunk_size=chunk_size, **kwargs)


def tokens(n: int = PREFILL + sum(ONE_AND_MANY), batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 64, (batch, n), generator=torch.Generator().manual_seed(seed))


def assert_close(a, b, tol=1e-5):
    """Max abs error within tol of the reference's scale (float32 runs, docs/design.md section 4)."""
    scale = max(float(b.abs().max()), 1.0)
    err = float((a - b).abs().max())
    assert err <= 2 * tol * scale, f"max abs error {err:.3g} at scale {scale:.3g}"


def ours_in_steps(tower, x, extends):
    """Our logits for x: prefill PREFILL tokens, then one extend per entry of `extends`."""
    logits, cache = tower.prefill(x[:, :PREFILL])
    parts, pos = [logits], PREFILL
    for n in extends:
        parts.append(tower.extend(cache, x[:, pos:pos + n]))
        pos += n
    assert pos == x.shape[1] and cache.length == pos
    return torch.cat(parts, 1)


def transformers_in_steps(ref, x, extends):
    """transformers' logits for x through its own cache: the same prefill and extends."""
    out = ref(x[:, :PREFILL], use_cache=True)
    cache, parts, pos = out.past_key_values, [out.logits], PREFILL
    for n in extends:
        out = ref(x[:, pos:pos + n], cache=cache, use_cache=True)
        cache = out.past_key_values
        parts.append(out.logits)
        pos += n
    return torch.cat(parts, 1)


def layer0_time_steps(tower, x) -> torch.Tensor:
    """dt = softplus(dt_raw + dt_bias) of the first (Mamba-2) layer before any clamp, (b, L, heads)."""
    blk = tower.backbone.layers[0]
    h = blk.pre(tower.backbone.embeddings(x))
    return torch.nn.functional.softplus(blk.mixer.in_proj(h)[..., -blk.mixer.num_heads:] + blk.mixer.dt_bias)


# ---- the regime is reached and the rule matters ---------------------------------------------------


def test_trained_regime_goes_below_time_step_min_and_the_limit_decides_the_logits():
    ref, tower = low_dt_pair(None)
    x = tokens()
    with torch.no_grad():
        dt = layer0_time_steps(tower, x)
        below = (dt < ref.config.time_step_min).float().mean((0, 1))
        assert (below > 0.5).any() and (below < 0.5).any(), below  # some heads mostly below, some not
        floored = ContextTower(tiny_config(PATTERN, chunk_size=4, time_step_limit=[0.001, INF])).eval()
        floored.load_backbone_state(hf_backbone_state(ref))
        # A floor at time_step_min moves the logits far beyond the parity tolerance (about 1e-4 here):
        # the parity tests below would notice the wrong rule.
        assert float((floored(x) - tower(x)).abs().max()) > 0.05


# ---- parity with transformers -------------------------------------------------------------------


@limits
def test_full_forward_matches_transformers(limit):
    ref, tower = low_dt_pair(limit)
    assert tower.backbone.layers[0].mixer.dt_limit == (NO_DT_LIMIT if limit is None else tuple(limit))
    x = tokens()
    with torch.no_grad():
        assert_close(tower(x), ref(x, use_cache=False).logits)


@limits
def test_prefill_and_extends_match_transformers(limit):
    """Prefill, then 1-token and multi-token extends: against transformers' full forward, and
    against transformers' own prefill + extends where its cached path follows the limit."""
    ref, tower = low_dt_pair(limit)
    x = tokens()
    with torch.no_grad():
        full = ref(x, use_cache=False).logits
        ours = ours_in_steps(tower, x, ONE_AND_MANY)
        assert_close(ours, full)
        assert_close(ours_in_steps(tower, x, MANY), transformers_in_steps(ref, x, MANY))
        if limit is None:  # with no limit transformers' 1-token step agrees with its chunked scan
            assert_close(ours, transformers_in_steps(ref, x, ONE_AND_MANY))


def test_left_padded_rows_with_a_floor_match_transformers_alone():
    """A padded position keeps dt = 0 (no step) under a floor; real positions match transformers."""
    ref, tower = low_dt_pair(LIMITS["floor"])
    x = tokens(30, batch=2, seed=3)
    mask = torch.ones_like(x)
    mask[0, :7] = 0
    x[0, :7] = 0
    with torch.no_grad():
        ours = tower(x, mask)
        logits, cache = tower.prefill(x[:, :20], mask[:, :20])
        ext = tower.extend(cache, x[:, 20:])
        for r, start in ((0, 7), (1, 0)):
            alone = ref(x[r:r + 1, start:], use_cache=False).logits[0]
            assert_close(ours[r, start:], alone)
            assert_close(torch.cat([logits[r, start:], ext[r]]), alone)


# ---- the rule: reading and checking time_step_limit ----------------------------------------------


def test_dt_limit_reads_time_step_limit_and_names_bad_values():
    assert dt_limit(tiny_config()) == NO_DT_LIMIT == (0.0, INF)
    assert dt_limit(tiny_config(time_step_limit=[0.001, INF])) == (0.001, INF)
    assert dt_limit(tiny_config(mamba_dt_limit=[0.0, 5.0])) == (0.0, 5.0)  # the remote-code spelling
    # Values NemotronHConfig itself accepts (a list of floats) but that are no clamp range.
    cfg = tiny_config()
    for bad, match in (([0.1, 0.01], r"0 <= min <= max.*\[0\.1, 0\.01\]"),
                       ([-1.0, INF], r"0 <= min <= max.*\[-1\.0, inf\]"),
                       ([float("nan"), INF], "0 <= min <= max"),
                       ([0.0, 1.0, 2.0], r"two numbers, got \[0\.0, 1\.0, 2\.0\].*Infinity")):
        cfg.time_step_limit = bad
        with pytest.raises(ValueError, match=match):
            dt_limit(cfg)
        with pytest.raises(ValueError, match="time_step_limit"):
            ContextTower(cfg)
    # Values only a config object without transformers' type checks would let through.
    for bad in (None, "12", [True, 1.0]):
        with pytest.raises(ValueError, match="two numbers, got"):
            dt_limit(SimpleNamespace(time_step_limit=bad))


def test_a_recorded_limit_survives_saving_and_transformers_reads_it(tmp_path):
    from transformers import NemotronHForCausalLM

    _, tower = low_dt_pair(LIMITS["floor"])
    save_backbone(tower, tmp_path / "bb")
    raw = json.loads((tmp_path / "bb" / "config.json").read_text())
    assert raw["time_step_limit"] == [0.001, {"__float__": "Infinity"}]  # transformers' spelling of inf
    loaded = ContextTower.from_pretrained(tmp_path / "bb").eval()
    theirs = NemotronHForCausalLM.from_pretrained(tmp_path / "bb").eval()
    assert loaded.backbone.layers[0].mixer.dt_limit == (0.001, INF)
    assert list(theirs.config.time_step_limit) == [0.001, INF]
    x = tokens()
    with torch.no_grad():
        assert_close(loaded(x), theirs(x, use_cache=False).logits)


def test_ar_pretraining_records_its_limit(tmp_path):
    from twotower.training import ARPretraining

    sizes = dict(pattern="M*E", hidden_size=32, head_dim=8, intermediate_size=48, mamba_num_heads=4, mamba_head_dim=8,
                 ssm_state_size=8, moe_intermediate_size=24, moe_shared_expert_intermediate_size=16)
    assert ARPretraining(**sizes).tower.backbone.layers[0].mixer.dt_limit == NO_DT_LIMIT
    module = ARPretraining(**sizes, time_step_limit=(0.001, INF))
    assert module.tower.backbone.layers[0].mixer.dt_limit == (0.001, INF)
    module.save_backbone(tmp_path / "bb")
    raw = json.loads((tmp_path / "bb" / "config.json").read_text())
    assert raw["time_step_limit"] == [0.001, {"__float__": "Infinity"}]


# ---- the shipped checkpoints ----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["backbone", "twotower"])
def test_shipped_checkpoints_record_the_floor_they_were_trained_with(name):
    """Both were trained with every time step floored at 1e-3 (and some trained heads sit below
    it); their config.json says so, so that transformers computes what we compute."""
    raw = json.loads((ASSETS / name / "config.json").read_text())
    assert raw["time_step_limit"] == [0.001, {"__float__": "Infinity"}]


def test_shipped_backbone_matches_transformers_over_250_tokens():
    """Measured at the fix: 1.3e-5 with the recorded floor; 2.2e-2 when transformers ran the same
    weights with no floor (the failure this guards)."""
    from transformers import NemotronHForCausalLM

    text = inspect.getsource(textwrap)[:250]
    x = torch.tensor([[b + 4 for b in text.encode()]])  # the byte tokenizer: id = byte + 4
    ref = NemotronHForCausalLM.from_pretrained(ASSETS / "backbone", dtype=torch.float32).eval()
    tower = ContextTower.from_pretrained(ASSETS / "backbone").eval()
    with torch.no_grad():
        want = ref(x, use_cache=False).logits
        ours = tower(x)
        assert float((ours - want).abs().max()) < 1e-4
        dt = layer0_time_steps(tower, x)
        assert float(dt.min()) < 1e-3  # the trained regime: the floor is what makes them agree
        _, cache = tower.prefill(x[:, :200])
        steps = torch.cat([tower.extend(cache, x[:, t:t + 1]) for t in range(200, 250)], 1)
        assert float((steps - want[:, 200:]).abs().max()) < 1e-4


# ---- CUDA: the kernel path under the same rule ----------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@limits
def test_cuda_scan_follows_the_limit_with_padding(limit):
    """On CUDA (mamba-ssm's kernel when installed, short seeded scans included) the same dt reaches
    the scan: a left-padded long prefill and 1-token and multi-token extends equal the CPU run."""
    from twotower.towers.nemotron_h.ssd import trust_short_seeded

    _, cpu = low_dt_pair(limit, chunk_size=32)  # the Triton kernels want chunks of 16 or more
    gpu = low_dt_pair(limit, chunk_size=32)[1].cuda()
    gpu.load_state_dict(cpu.state_dict())
    x = tokens(200, batch=2)
    mask = torch.ones_like(x)
    mask[0, :9] = 0
    with torch.no_grad(), trust_short_seeded(True):
        want = cpu(x, mask)
        torch.testing.assert_close(gpu(x.cuda(), mask.cuda()).cpu(), want, rtol=1e-4, atol=1e-4)
        logits, cache = gpu.prefill(x[:, :150].cuda(), mask[:, :150].cuda())
        parts, pos = [logits.cpu()], 150
        for n in (1, 9, 1, 39):
            parts.append(gpu.extend(cache, x[:, pos:pos + n].cuda()).cpu())
            pos += n
        torch.testing.assert_close(torch.cat(parts, 1), want, rtol=1e-4, atol=1e-4)
