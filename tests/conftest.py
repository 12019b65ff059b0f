"""Shared fixtures: tiny NemotronH configs with every block type, built in memory (no downloads)."""

from __future__ import annotations

import pytest
import torch
from transformers import NemotronHConfig


def tiny_config(pattern: str = "M*-EM*E", **overrides) -> NemotronHConfig:
    """A NemotronH config small enough for exact float32 tests on CPU.

    `pattern` uses the hybrid_override_pattern letters: M Mamba-2, * attention, - MLP, E MoE.
    """
    kwargs = dict(
        vocab_size=64,
        hidden_size=32,
        hybrid_override_pattern=pattern,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=48,
        mamba_num_heads=4,
        mamba_head_dim=8,
        ssm_state_size=8,
        n_groups=2,
        conv_kernel=4,
        chunk_size=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=24,
        moe_shared_expert_intermediate_size=16,
        routed_scaling_factor=1.5,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        use_conv_bias=True,
        mamba_proj_bias=False,
        use_bias=False,
    )
    kwargs.update(overrides)
    return NemotronHConfig(**kwargs)


def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.2) -> torch.nn.Module:
    """Give every parameter and buffer random values so parity tests exercise all weights.

    Mamba's A_log / dt_bias get values in a realistic range; the MoE correction bias is made
    non-zero so that its choose-only role is tested.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(module.named_parameters()) + list(module.named_buffers()):
            if not p.is_floating_point() or "inv_freq" in name:  # transformers' RoPE tables are not weights
                continue
            if name.endswith("A_log"):
                p.copy_(torch.rand(p.shape, generator=g) * 1.5)
            elif name.endswith("dt_bias"):
                p.copy_(torch.rand(p.shape, generator=g) * 2 - 3)
            elif name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("e_score_correction_bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(scale * torch.randn(p.shape, generator=g))
    return module


@pytest.fixture
def config() -> NemotronHConfig:
    return tiny_config()


@pytest.fixture(autouse=True)
def _deterministic_single_thread():
    """Seeded, and one intra-op thread: the models here are tiny, so extra threads only add
    synchronisation overhead (and heavy contention on a busy 2-core machine)."""
    torch.manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- shared builders: towers, prompts, and decoder calls on bare towers -------------------------

MASK, PAD = 3, 0  # the tiny configs' [MASK] and pad ids (ids 0-3 are pad / bos / eos / mask)


def randomize_time_(denoiser, seed: int) -> None:
    """Random adaLN modules (gates around 1) and a sharper head, so that t matters and the
    confidence threshold sees a spread of confidences."""
    randomize_(denoiser.time, seed=seed, scale=0.05)
    with torch.no_grad():
        for table in denoiser.time.scale_shift_tables:
            table[2] += 1.0
        denoiser.lm_head.weight.mul_(3.0)


def make_towers(pattern: str = "M*-EM*E", seed: int = 0, **overrides):
    """(context, denoiser): a random tiny context tower and its copy with random time modules."""
    from twotower.towers.context import ContextTower
    from twotower.towers.denoiser import DenoiserTower

    ctx = randomize_(ContextTower(tiny_config(pattern, **overrides)), seed=seed).eval()
    den = DenoiserTower.from_context(ctx).eval()
    randomize_time_(den, seed + 1000)
    return ctx, den


def make_model(seed: int = 0, block_size: int = 8, pattern: str = "M*-EM*E"):
    """A TwoTowerLM over a random tiny backbone, with random time modules."""
    from twotower.model import TwoTowerLM
    from twotower.towers.context import ContextTower

    ctx = randomize_(ContextTower(tiny_config(pattern)), seed=seed).eval()
    model = TwoTowerLM.from_backbone(ctx, block_size=block_size)
    randomize_time_(model.denoiser, seed + 1000)
    return model.eval()


def left_pad(prompts: list[torch.Tensor], pad: int = PAD) -> tuple[torch.Tensor, torch.Tensor]:
    """A list of 1-D prompts -> (ids, attention_mask) (B, T), padded on the left."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, T - len(p):] = p
        mask[r, T - len(p):] = 1
    return ids, mask


def random_prompts(lengths, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 64, (n,), generator=g) for n in lengths]  # ids 0-3 are special


def run_decoder(decoder, ctx, den, ids, mask=None, *, max_new_tokens: int, eos_token_id=None, generator=None,
                step_callback=None, pad_token_id: int = PAD, mask_token_id: int = MASK, shifted: bool = False,
                denoiser_device=None):
    """Run `decoder` on bare towers with the tiny configs' token ids."""
    from twotower.decoding import Towers

    towers = Towers(ctx, den, mask_token_id=mask_token_id, pad_token_id=pad_token_id, shifted=shifted,
                    denoiser_device=denoiser_device)
    return decoder.generate(towers, ids, mask, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                            generator=generator, step_callback=step_callback)


def diffusion(ctx, den, ids, mask=None, *, sampler=None, block_size: int = 8, steps_per_block: int = 8,
              temperature: float = 0.0, max_new_tokens: int = 20, **call):
    """MaskDiffusion (default ConfidenceThreshold(0.5), block 8, 8 steps) on bare towers."""
    from twotower.decoding import MaskDiffusion
    from twotower.samplers import ConfidenceThreshold

    decoder = MaskDiffusion(ConfidenceThreshold(0.5) if sampler is None else sampler, block_size=block_size,
                            steps_per_block=steps_per_block, temperature=temperature)
    return run_decoder(decoder, ctx, den, ids, mask, max_new_tokens=max_new_tokens, **call)


def speculative(ctx, den, ids, mask=None, *, sampler=None, block_size: int = 6, draft_steps: int = 1,
                temperature: float = 0.0, max_new_tokens: int = 21, **call):
    """Speculative decoding (block 6, one draft step) on bare towers."""
    from twotower.decoding import Speculative

    decoder = Speculative(block_size=block_size, draft_steps=draft_steps, sampler=sampler, temperature=temperature)
    return run_decoder(decoder, ctx, den, ids, mask, max_new_tokens=max_new_tokens, **call)


def autoregressive(ctx, ids, mask=None, *, temperature: float = 0.0, max_new_tokens: int, **call):
    """The context tower alone (Autoregressive) on a bare context tower."""
    from twotower.decoding import Autoregressive

    return run_decoder(Autoregressive(temperature), ctx, None, ids, mask, max_new_tokens=max_new_tokens, **call)


# ----------------------------------------------------------------------------- training scaffolding


def save_tiny_backbone(path, seed: int = 0):
    """Write a tiny random AR NemotronH checkpoint (byte-tokenizer vocabulary, 260) to `path`.

    Used by the fine-tuning and self-distillation tests as the frozen backbone; another seed
    gives a checkpoint with other weights (what invalidates caches and init_from checks).
    """
    from twotower.towers.context import ContextTower
    from twotower.towers.loading import save_backbone_hf

    cfg = tiny_config("M*-EM*E", vocab_size=260)
    tower = randomize_(ContextTower(cfg), seed=seed, scale=0.1)
    state = {k.removeprefix("backbone."): v for k, v in tower.state_dict().items()}
    save_backbone_hf(state, path, config=cfg)
    return path


@pytest.fixture
def backbone_dir(tmp_path):
    """`save_tiny_backbone` at tmp_path/backbone, seed 0."""
    return save_tiny_backbone(tmp_path / "backbone", seed=0)


@pytest.fixture
def code_corpus(tmp_path):
    """A folder of 8 small Python-like `.txt` documents (about 300-450 bytes each) at tmp_path/corpus."""
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(8):
        (root / f"doc{i}.txt").write_text(("def g%d(y):\n    return y * %d  # %s\n" % (i, i, "ab" * i)) * 10)
    return root


# ----------------------------------------------------------------------------- other tower families


def tiny_llama_config(**overrides):
    """A transformers LlamaConfig small enough for exact float32 tests (ids 0-3 special, as above)."""
    from transformers import LlamaConfig

    kwargs = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
                  eos_token_id=2, tie_word_embeddings=False)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


# model_type -> a tiny config builder (**overrides). The family contract test (test_families.py)
# runs over every registered family and needs one here: a new family adds its builder.
FAMILY_CONFIGS = {"nemotron_h": tiny_config, "llama": tiny_llama_config}


def make_family_towers(model_type: str, seed: int = 0, **overrides):
    """(context, denoiser) of any registered family: random context, copy with random time modules."""
    from twotower.towers.base import family_for

    family = family_for(model_type)
    ctx = randomize_(family.context(FAMILY_CONFIGS[model_type](**overrides)), seed=seed).eval()
    den = family.denoiser.from_context(ctx).eval()
    randomize_time_(den, seed + 1000)
    return ctx, den


def save_tiny_llama(path, seed: int = 0, **overrides):
    """Write a random transformers LlamaForCausalLM (its own save_pretrained) to `path`; returns the model."""
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM(tiny_llama_config(**overrides))
    randomize_(hf, seed=seed, scale=0.2)
    hf.save_pretrained(path)
    return hf.eval()
