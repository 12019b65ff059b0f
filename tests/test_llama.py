"""The Llama tower family against transformers' LlamaForCausalLM: logits (full, prefill + extends, RoPE
variants, attention bias), logical positions under left padding and speculative holes, the
training forward vs per-block inference, identity init == AR, greedy decoding == `generate`, and
checkpoints written by transformers."""

from __future__ import annotations

import pytest
import torch
from conftest import (PAD, autoregressive, left_pad, random_prompts, randomize_, randomize_time_, save_tiny_llama,
                      speculative, tiny_llama_config)
from transformers import LlamaForCausalLM

from twotower.caches import KVCache
from twotower.model import TwoTowerLM
from twotower.towers.llama import LlamaContextTower, LlamaDenoiserTower

TOL = dict(rtol=1e-5, atol=1e-5)

ROPE = {
    "default": {},
    "linear": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "llama3": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "yarn+bias": dict(attention_bias=True, rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                         "original_max_position_embeddings": 32}),
}


def hf_and_tower(seed=0, **overrides):
    """A random transformers Llama and our context tower with its weights."""
    hf = LlamaForCausalLM(tiny_llama_config(**overrides))
    randomize_(hf, seed=seed)
    hf.eval()
    ctx = LlamaContextTower(hf.config).eval()
    state = {("backbone." + k.removeprefix("model.")) if k.startswith("model.") else k: v
             for k, v in hf.state_dict().items()}
    ctx.load_state_dict(state)
    return hf, ctx


def towers(seed=0, **overrides):
    _, ctx = hf_and_tower(seed, **overrides)
    den = LlamaDenoiserTower.from_context(ctx).eval()
    randomize_time_(den, seed + 1000)
    return ctx, den


@pytest.mark.parametrize("variant", sorted(ROPE))
def test_context_logits_equal_transformers(variant):
    hf, ctx = hf_and_tower(seed=1, **ROPE[variant])
    ids = torch.randint(4, 64, (2, 40))
    with torch.inference_mode():
        want = hf(ids).logits.float()
        torch.testing.assert_close(ctx(ids), want, **TOL)
        # prefill, then blocks of 7 and single tokens
        got, cache = ctx.prefill(ids[:, :10], capacity=12)  # the cache has to grow on the way
        parts = [got]
        for lo, hi in ((10, 17), (17, 18), (18, 19), (19, 33), (33, 40)):
            parts.append(ctx.extend(cache, ids[:, lo:hi]))
        torch.testing.assert_close(torch.cat(parts, 1), want, **TOL)
        assert isinstance(cache, KVCache) and cache.length == 40


def test_left_padded_batch_equals_rows_run_alone():
    ctx, den = towers(seed=2, **ROPE["llama3"])
    prompts = random_prompts([5, 11, 8], seed=2)
    ids, mask = left_pad(prompts)
    ext = torch.randint(4, 64, (3, 4))
    block = torch.randint(4, 64, (3, 6))
    t = torch.tensor([0.3, 0.7, 1.0])
    with torch.inference_mode():
        logits, cache = ctx.prefill(ids, mask)
        ext_logits = ctx.extend(cache, ext)
        den_logits = den.forward_block(block, cache, t)
        for r, p in enumerate(prompts):
            alone, c1 = ctx.prefill(p[None])
            torch.testing.assert_close(logits[r, -len(p):], alone[0], **TOL)
            torch.testing.assert_close(ext_logits[r], ctx.extend(c1, ext[r: r + 1])[0], **TOL)
            torch.testing.assert_close(den_logits[r], den.forward_block(block[r: r + 1], c1, t[r: r + 1])[0], **TOL)


def test_training_forward_equals_per_block_inference():
    ctx, den = towers(seed=3, attention_bias=True)
    S, nB = 4, 3
    x = torch.randint(4, 64, (2, S * nB))
    noisy = x.clone()
    noisy[torch.rand(x.shape) < 0.5] = 3
    t = torch.rand(2, nB)
    with torch.inference_mode():
        _, states = ctx.forward_train(x, S)
        all_blocks = den.forward_train(noisy, states, t)
        for k in range(nB):
            if k == 0:
                cache = ctx.empty_cache(2)
            else:
                _, cache = ctx.prefill(x[:, : k * S])
            one = den.forward_block(noisy[:, k * S: (k + 1) * S], cache, t[:, k])
            torch.testing.assert_close(all_blocks[:, k * S: (k + 1) * S], one, **TOL)


def test_identity_initialised_denoiser_is_the_ar_model():
    """A fresh denoiser (identity time init) reading one token at position p over the cache of
    x[:p] gives the AR logits at p, with t=None and with any t."""
    _, ctx = hf_and_tower(seed=4, **ROPE["linear"])
    den = LlamaDenoiserTower.from_context(ctx).eval()
    x = torch.randint(4, 64, (2, 9))
    with torch.inference_mode():
        ar = ctx(x)
        for p in range(1, 9):
            _, cache = ctx.prefill(x[:, :p])
            for t in (None, torch.full((2,), 0.6)):
                torch.testing.assert_close(den.forward_block(x[:, p: p + 1], cache, t)[:, 0], ar[:, p], **TOL)


def test_greedy_autoregressive_equals_transformers_generate():
    hf, ctx = hf_and_tower(seed=5, **ROPE["llama3"])
    hf.generation_config.eos_token_id = None
    prompt = torch.randint(4, 64, (1, 7))
    with torch.inference_mode():
        want = hf.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=PAD)
    got = autoregressive(ctx, prompt, max_new_tokens=12)
    assert torch.equal(got.sequences, want)


def test_speculative_equals_autoregressive_and_compacts(monkeypatch):
    ctx, den = towers(seed=6)
    ids, mask = left_pad(random_prompts([3, 12, 7, 5], seed=6))
    gains = []
    real = KVCache.compact

    def spy(self, **kw):
        gains.append(real(self, **kw))
        return gains[-1]

    monkeypatch.setattr(KVCache, "compact", spy)
    with torch.inference_mode():
        ar = autoregressive(ctx, ids, mask, max_new_tokens=30)
        spec = speculative(ctx, den, ids, mask, max_new_tokens=30, block_size=6)
    assert torch.equal(spec.sequences, ar.sequences)
    assert any(g > 0 for g in gains), f"compaction never fired: {gains}"


def test_accept_with_holes_keeps_positions_logical():
    """Rows that keep different prefixes of a provisional block continue exactly like rows that
    appended only their kept tokens, before and after compaction."""
    ctx, den = towers(seed=7, **ROPE["yarn+bias"])
    prompts = random_prompts([5, 2, 4], seed=7)
    ids, mask = left_pad(prompts)
    block, after = torch.randint(4, 64, (3, 6)), torch.randint(4, 64, (3, 2))
    keep = torch.tensor([1, 6, 3])
    with torch.inference_mode():
        _, cache = ctx.prefill(ids, mask)
        ctx.extend(cache, block, provisional=True)
        ctx.accept(cache, keep)
        compacted = cache.clone()
        assert compacted.compact() == 11 - 8  # the longest row keeps 2 + 6 real positions
        for c in (cache, compacted):
            got = ctx.extend(c.clone(), after)
            den_got = den.forward_block(after, c, torch.full((3,), 0.5))
            for r in range(3):
                _, ref = ctx.prefill(torch.cat([prompts[r], block[r, : keep[r]]])[None])
                torch.testing.assert_close(den_got[r], den.forward_block(after[r: r + 1], ref,
                                                                         torch.full((1,), 0.5))[0], **TOL)
                torch.testing.assert_close(got[r], ctx.extend(ref, after[r: r + 1])[0], **TOL)


@pytest.mark.parametrize("tied", [False, True])
def test_from_backbone_of_a_transformers_checkpoint_and_round_trip(tmp_path, tied):
    hf = save_tiny_llama(tmp_path / "ar", seed=8, tie_word_embeddings=tied, attention_bias=True)
    model = TwoTowerLM.from_backbone(tmp_path / "ar", block_size=4).eval()
    assert type(model.context) is LlamaContextTower and type(model.denoiser) is LlamaDenoiserTower
    ids = torch.randint(4, 64, (2, 10))
    with torch.inference_mode():
        torch.testing.assert_close(model.context(ids), hf(ids).logits.float(), **TOL)
    randomize_time_(model.denoiser, 9)
    model.save_pretrained(tmp_path / "tt")
    back = TwoTowerLM.from_pretrained(tmp_path / "tt").eval()
    assert type(back.context) is LlamaContextTower and back.block_size == 4
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


def test_llama_recipe_fits_a_tiny_generated_checkpoint_and_exports(tmp_path):
    """recipes/llama_denoiser.yaml on a random LlamaForCausalLM written by transformers (vocab 260,
    no tokenizer files), fine-tuned on byte data, then export: the released directory is a Llama
    two-tower model with the recipe's time conditioning and the tokenizer it was trained with, so
    predict runs on it without a tokenizer argument."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    save_tiny_llama(tmp_path / "ar", seed=10, vocab_size=260)  # a bare transformers folder: no tokenizer of its own
    run = tmp_path / "run"

    def cli(*args):
        proc = subprocess.run([sys.executable, "-m", "twotower.cli", *args], cwd=root, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # The recipe ships with SmolLM2's tokenizer; this byte-vocabulary backbone trains on byte data instead.
    cli("fit", "--config", "recipes/llama_denoiser.yaml", "--model.init_args.backbone", str(tmp_path / "ar"),
        "--data.init_args.tokenizer", "twotower.tokenizers.ByteTokenizer", "--trainer.max_steps", "3", "--trainer.val_check_interval", "3", "--trainer.limit_val_batches", "1",
        "--trainer.default_root_dir", str(run), "--trainer.logger.init_args.save_dir", str(run),
        "--trainer.callbacks.init_args.dirpath", str(run / "ckpt"))
    ckpt = torch.load(run / "ckpt" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 3
    assert ckpt["twotower"]["time_conditioning"]["class_path"] == "twotower.time_embedding.AdaLNSingle"
    assert ckpt["twotower"]["tokenizer"]["class_path"] == "twotower.tokenizers.ByteTokenizer"  # the data's
    cli("export", str(run / "ckpt" / "last.ckpt"), str(tmp_path / "tt"))
    raw = json.loads((tmp_path / "tt" / "config.json").read_text())
    assert raw["model_type"] == "llama" and raw["time_conditioning"]["init_args"]["init"] == "identity"
    assert raw["tokenizer"] == "byte"
    model = TwoTowerLM.from_pretrained(tmp_path / "tt")
    assert type(model.denoiser) is LlamaDenoiserTower
    den = {k.removeprefix("denoiser."): v for k, v in ckpt["state_dict"].items() if k.startswith("denoiser.")}
    for k, v in model.denoiser.state_dict().items():
        assert torch.equal(v, den[k]), k
    # predict on the export with every decoder, through the CLI (the speculative output is the AR one)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("def f(x):\n", "import os\n", "x = ")))
    texts = {}
    for decoder in ("Autoregressive", "Speculative", "MaskDiffusion", "MockAR"):
        out = tmp_path / f"pred_{decoder}.jsonl"
        cli("predict", "--config", "recipes/generate.yaml", "--model.init_args.model", str(tmp_path / "tt"),
            "--model.init_args.decoder", f"twotower.decoding.{decoder}", "--data.init_args.prompts", str(prompts),
            "--model.init_args.max_new_tokens", "10", "--model.init_args.stop_at_eos", "false",
            "--trainer.callbacks.init_args.output", str(out), "--trainer.enable_progress_bar", "false")
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["index"] for r in rows] == [0, 1, 2] and all(r["generated_tokens"] == 10 for r in rows)
        texts[decoder] = [r["completion"] for r in rows]
    assert texts["Speculative"] == texts["Autoregressive"]


def test_convert_cli_on_a_llama_checkpoint(tmp_path):
    """`python -m twotower.cli convert` on a transformers Llama folder: an identity-initialised two-tower
    model whose mock-AR output is the AR output."""
    import subprocess
    import sys
    from pathlib import Path

    save_tiny_llama(tmp_path / "ar", seed=11, vocab_size=260)
    proc = subprocess.run([sys.executable, "-m", "twotower.cli", "convert", str(tmp_path / "ar"), str(tmp_path / "tt")],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    model = TwoTowerLM.from_pretrained(tmp_path / "tt").eval()
    assert type(model.denoiser) is LlamaDenoiserTower
    ids, mask = left_pad(random_prompts([5, 9], seed=11))
    assert torch.equal(model.generate_mock_ar(ids, 12, attention_mask=mask), model.generate_ar(ids, 12, attention_mask=mask))
