"""Tiny random models and the comparisons the checks share (no pytest, no download).

The tiny models use ids 0-3 as specials: 0 pad, 1 bos, 2 eos, 3 [MASK] (`PAD`, `MASK`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..model import TwoTowerLM
from ..towers.base import TowerFamily, family_for

MASK, PAD = 3, 0  # the tiny configs' [MASK] and pad ids (ids 0-3 are pad / bos / eos / mask)
TOL = 1e-5  # float32 sums in another order, relative to the logits' scale

# ---- tiny configs -------------------------------------------------------------------------------

_IDS = dict(vocab_size=64, max_position_embeddings=512, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_LLAMA_LIKE = dict(_IDS, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8, tie_word_embeddings=False)
_NEMOTRON_H = dict(_IDS, hidden_size=32, hybrid_override_pattern="M*-EM*E", num_attention_heads=4,
                   num_key_value_heads=2, head_dim=8, intermediate_size=48, mamba_num_heads=4, mamba_head_dim=8,
                   ssm_state_size=8, n_groups=2, conv_kernel=4, chunk_size=16, n_routed_experts=4,
                   num_experts_per_tok=2, moe_intermediate_size=24, moe_shared_expert_intermediate_size=16,
                   routed_scaling_factor=1.5, use_conv_bias=True, mamba_proj_bias=False, use_bias=False)
# model_type -> the keyword arguments of its tiny config. A family not listed gets the Llama-like
# ones (what most attention-only configs take); pass `config=` when yours needs others.
TINY_CONFIGS = {
    "nemotron_h": _NEMOTRON_H,
    "llama": _LLAMA_LIKE,
    # Qwen2's head_dim is derived (hidden / heads), so it takes none.
    "qwen2": {k: v for k, v in _LLAMA_LIKE.items() if k != "head_dim"},
    # Mistral's window (64) is longer than every sequence the checks run: it never drops a key.
    "mistral": dict(_LLAMA_LIKE, sliding_window=64),
}


def family_of(family_or_model_type):
    """A TowerFamily from itself or its registered model_type."""
    return family_or_model_type if isinstance(family_or_model_type, TowerFamily) else family_for(family_or_model_type)


def tiny_config(family_or_model_type, **overrides):
    """A config of the family small enough for exact float32 checks on CPU (vocabulary 64, ids 0-3
    special): `TINY_CONFIGS[model_type]` (Llama-like keyword arguments for other families) + overrides."""
    family = family_of(family_or_model_type)
    kwargs = dict(TINY_CONFIGS.get(family.model_type, _LLAMA_LIKE), **overrides)
    try:
        return family.config_class(**kwargs)
    except Exception as e:  # a config class that takes other arguments: the user passes config=
        raise ValueError(f"cannot build a tiny {family.config_class.__name__} for {family.model_type!r} from "
                         f"{sorted(kwargs)} ({type(e).__name__}: {e}); pass config= a small config") from e


# ---- tiny random models -------------------------------------------------------------------------


def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Give every parameter and buffer random values so that parity checks exercise all weights.

    Mamba's A_log / dt_bias get values in a realistic range; norms stay near 1; the MoE correction
    bias is made non-zero so that its choose-only role is tested. RoPE tables are left alone.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(module.named_parameters()) + list(module.named_buffers()):
            if not p.is_floating_point() or "inv_freq" in name:  # transformers' RoPE tables are not weights
                continue
            p.copy_(_random_like(name, p, g, scale))
    return module


def _random_like(name: str, p: Tensor, g: torch.Generator, scale: float) -> Tensor:
    """A random value for the weight `name`, in the range its role needs."""
    if name.endswith("A_log"):
        return torch.rand(p.shape, generator=g) * 1.5
    if name.endswith("dt_bias"):
        return torch.rand(p.shape, generator=g) * 2 - 3
    if name.endswith("norm.weight") or name.endswith("norm_f.weight"):
        return 1 + 0.1 * torch.randn(p.shape, generator=g)
    if name.endswith("e_score_correction_bias"):
        return 0.1 * torch.randn(p.shape, generator=g)
    return scale * torch.randn(p.shape, generator=g)


def randomize_time_(denoiser, seed: int) -> None:
    """Random adaLN modules (gates around 1) and a sharper head, so that t matters and confidence
    thresholds see a spread of confidences."""
    randomize_(denoiser.time, seed=seed, scale=0.05)
    with torch.no_grad():
        for table in getattr(denoiser.time, "scale_shift_tables", ()):
            table[2] += 1.0
        denoiser.lm_head.weight.mul_(3.0)


def never_predict_mask_(*towers) -> None:
    """Zero the [MASK] row of every head: its logit is then 0, below the best of 63 random logits.
    A random AR model may rank [MASK] first (and AR-exact decoders then rightly emit it); a trained
    one never does, and the checks are about decoders, not about the random model."""
    with torch.no_grad():
        for tower in towers:
            tower.lm_head.weight[MASK] = 0


def tiny_towers(family_or_model_type="llama", config=None, *, seed: int = 0):
    """(context, denoiser) of a family, eval mode: a random context tower on `config` (default
    `tiny_config`) and its denoiser copy with random time modules."""
    family = family_of(family_or_model_type)
    config = tiny_config(family) if config is None else config
    ctx = randomize_(family.context(config), seed=seed).eval()
    den = family.denoiser.from_context(ctx).eval()
    randomize_time_(den, seed + 1000)
    return ctx, den


def tiny_model(family_or_model_type="llama", config=None, *, seed: int = 0, block_size: int = 4):
    """A random `TwoTowerLM` (eval mode) of a family on `config` (default `tiny_config`): random
    context, random time modules, [MASK] (id 3) never predicted."""
    family = family_of(family_or_model_type)
    config = tiny_config(family) if config is None else config
    ctx = randomize_(family.context(config), seed=seed).eval()
    model = TwoTowerLM.from_backbone(ctx, block_size=block_size, mask_token_id=MASK)
    randomize_time_(model.denoiser, seed + 1000)
    never_predict_mask_(model.context, model.denoiser)
    return model.eval()


# ---- prompts and comparisons --------------------------------------------------------------------


def left_pad(prompts: list[Tensor], pad: int = PAD) -> tuple[Tensor, Tensor]:
    """A list of 1-D prompts -> (ids, attention_mask) (B, T), padded on the left."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, T - len(p):] = p
        mask[r, T - len(p):] = 1
    return ids, mask


def random_prompts(lengths, seed: int = 0, vocab_size: int = 64) -> list[Tensor]:
    """Random 1-D prompts of the given lengths over the non-special ids 4 .. vocab_size - 1."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab_size, (n,), generator=g) for n in lengths]


def assert_close(got: Tensor, want: Tensor, what: str, tol: float = TOL) -> None:
    """Max abs error within tol relative to `want`'s scale; the message names `what` and the error."""
    if got.shape != want.shape:
        raise AssertionError(f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    scale = max(1.0, float(want.abs().max()))
    err = float((got.float() - want.float()).abs().max())
    if not err <= tol * scale:  # `not <=`: a NaN fails too
        raise AssertionError(f"{what}: max abs error {err:.3g} at logit scale {scale:.3g} (tolerance {tol:g})")


def assert_equal(got: Tensor, want: Tensor, what: str) -> None:
    """Exact equality of token tensors; the message names `what` and the first differing row."""
    if got.shape != want.shape:
        raise AssertionError(f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    if not torch.equal(got, want):
        r = int((got != want).reshape(got.shape[0], -1).any(-1).nonzero()[0, 0]) if got.dim() else 0
        raise AssertionError(f"{what}: row {r} is {got[r].tolist()}, expected {want[r].tolist()}")


def expect(ok: bool, message: str) -> None:
    """Raise AssertionError(message) unless ok (a check that survives `python -O`, unlike `assert`)."""
    if not ok:
        raise AssertionError(message)
