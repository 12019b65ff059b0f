"""Self-distillation data, loss masks and init_from for denoiser fine-tuning."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from conftest import randomize_, save_tiny_backbone

import twotower.data.distill as distill
from twotower.data import DistilledDataModule, distill_rows
from twotower.model import TwoTowerLM
from twotower.towers.nemotron_h.context import ContextTower
from twotower.training import DenoiserFineTuning


def _naive_greedy(context: ContextTower, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Reference: full forward over the growing sequence, argmax of the last position, no cache."""
    seq = prompt.clone()
    for _ in range(n):
        nxt = context(seq[None])[0, -1].argmax()
        seq = torch.cat([seq, nxt[None]])
    return seq


def test_distill_rows_equal_a_naive_uncached_greedy_loop(backbone_dir):
    context = ContextTower.from_pretrained(backbone_dir).eval()
    real = torch.randint(4, 260, (5, 24), generator=torch.Generator().manual_seed(1))
    p = torch.tensor([8, 16, 8, 16, 8])
    with torch.no_grad():
        out = distill_rows(context, real, p, pad_token_id=0, batch_size=2, progress=False)
        for i in range(5):
            ref = _naive_greedy(context, real[i, : p[i]], 24 - int(p[i]))
            assert torch.equal(out[i], ref), i
    assert not torch.equal(out, real)  # the continuation really was rewritten


def test_distill_rows_rejects_bad_prompt_lengths(backbone_dir):
    context = ContextTower.from_pretrained(backbone_dir)
    real = torch.randint(4, 260, (2, 16))
    with pytest.raises(ValueError, match="prompt lengths"):
        distill_rows(context, real, torch.tensor([0, 8]), pad_token_id=0, progress=False)
    with pytest.raises(ValueError, match="prompt lengths"):
        distill_rows(context, real, torch.tensor([8, 16]), pad_token_id=0, progress=False)


def test_data_module_rows_masks_and_cache(backbone_dir, code_corpus, tmp_path, monkeypatch):
    kw = dict(source=str(code_corpus), seq_len=32, block_size=8, batch_size=4, num_train=12, num_val=3,
              min_prompt=8, max_prompt=16, val_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    dm = DistilledDataModule(str(backbone_dir), **kw)
    dm.setup()
    context = ContextTower.from_pretrained(backbone_dir).eval()
    batch = next(iter(dm.train_dataloader()))
    x, mask = batch["input_ids"], batch["loss_mask"]
    assert x.shape == mask.shape == (4, 32) and x.dtype == torch.long and mask.dtype == torch.bool
    assert len(dm.train_set) == 12 and len(dm.val_set) == 3
    real_rows = {tuple(r.tolist()) for r in dm.text.train_data}
    for row, m in zip(x, mask):
        p = int((~m).sum())
        assert p in (8, 16) and not m[:p].any() and m[p:].all()
        assert any(tuple(r[:p]) == tuple(row[:p].tolist()) for r in real_rows)  # a real prompt ...
        with torch.no_grad():  # ... continued by the backbone itself
            assert torch.equal(row, _naive_greedy(context, row[:p], 32 - p))
    # A second module with the same settings loads the cache and generates nothing.
    monkeypatch.setattr(distill, "distill_rows", lambda *a, **k: pytest.fail("regenerated despite the cache"))
    again = DistilledDataModule(str(backbone_dir), **kw)
    again.setup()
    assert torch.equal(again.train_set.rows, dm.train_set.rows)
    # A different backbone invalidates it.
    other = save_tiny_backbone(tmp_path / "other", seed=5)
    with pytest.raises(pytest.fail.Exception, match="regenerated"):
        fresh = DistilledDataModule(str(other), **kw)
        fresh.setup()  # distils nothing yet: rows are made when a batch first needs them
        fresh.train_set[0]


def test_data_module_bad_settings(backbone_dir, code_corpus):
    with pytest.raises(ValueError, match="multiple of block_size"):
        DistilledDataModule(str(backbone_dir), source=str(code_corpus), seq_len=32, block_size=8, min_prompt=4)
    with pytest.raises(ValueError, match="max_prompt < seq_len"):
        DistilledDataModule(str(backbone_dir), source=str(code_corpus), seq_len=32, block_size=8, min_prompt=8, max_prompt=32)
    with pytest.raises(FileNotFoundError):
        DistilledDataModule("/nonexistent/backbone", source=str(code_corpus), seq_len=32, block_size=8, min_prompt=8, max_prompt=16)


def test_loss_mask_limits_the_targets(backbone_dir):
    module = DenoiserFineTuning(str(backbone_dir), block_size=8, loss_weighting="none")
    x = torch.randint(4, 260, (2, 32), generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(2, 32, dtype=torch.bool)
    mask[:, 8:16] = True
    y = x.clone()
    y[:, 16:] = torch.randint(4, 260, (2, 16), generator=torch.Generator().manual_seed(4))  # later blocks only

    def run(ids, m):
        return module.forward_loss(ids, loss_mask=m, generator=torch.Generator().manual_seed(0))

    a, b = run(x, mask), run(y, mask)
    # Later blocks cannot reach block 1 (causal context, block-local denoiser), so with the mask the
    # loss is unchanged; without it, it changes.
    assert torch.equal(a["loss"], b["loss"]) and a["masked"] == b["masked"]
    assert not torch.equal(run(x, None)["loss"], run(y, None)["loss"])
    full = run(x, None)
    assert 0 < a["masked"] < full["masked"] and a["tokens"] == 16
    assert torch.equal(run(x, torch.ones_like(mask))["loss"], full["loss"])
    with pytest.raises(ValueError, match="loss_mask has shape"):
        run(x, mask[:, :16])


def test_fit_on_distilled_batches_and_init_from(backbone_dir, code_corpus, tmp_path):
    # init_from: a released two-tower directory seeds the denoiser.
    lm = TwoTowerLM.from_backbone(backbone_dir, block_size=8)
    randomize_(lm.denoiser, seed=9, scale=0.1)
    lm.save_pretrained(tmp_path / "start")
    module = DenoiserFineTuning(str(backbone_dir), block_size=8, init_from=str(tmp_path / "start"), lr=1e-2,
                                warmup_steps=0)
    for k, v in lm.denoiser.state_dict().items():
        assert torch.equal(module.denoiser.state_dict()[k], v), k
    dm = DistilledDataModule(str(backbone_dir), source=str(code_corpus), seq_len=32, block_size=8, batch_size=4,
                             num_train=8, num_val=4, min_prompt=8, max_prompt=16, val_fraction=0.2)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        num_sanity_val_steps=0, limit_val_batches=1)
    trainer.fit(module, dm)
    assert trainer.global_step == 3
    assert torch.isfinite(trainer.callback_metrics["val/masked_acc"])
    assert any(not torch.equal(module.denoiser.state_dict()[k], v) for k, v in lm.denoiser.state_dict().items())
    # A denoiser trained against another context tower is refused.
    other = TwoTowerLM.from_backbone(save_tiny_backbone(tmp_path / "other", seed=5), block_size=8)
    other.save_pretrained(tmp_path / "other_tt")
    with pytest.raises(ValueError, match="context tower differs"):
        # (checked when the towers are built: configure_model, or the first access outside a Trainer)
        DenoiserFineTuning(str(backbone_dir), block_size=8, init_from=str(tmp_path / "other_tt")).configure_model()
    with pytest.raises(FileNotFoundError, match="init_from"):
        DenoiserFineTuning(str(backbone_dir), block_size=8, init_from=str(tmp_path / "missing"))
    with pytest.raises(TypeError, match="batch must be"):
        module.training_step([1, 2], 0)


# ---- the shifted (AR-aligned) variant -------------------------------------------------------------


def test_shifted_loss_equals_a_naive_per_block_loop(backbone_dir):
    """Training (all blocks at once) == inference forward per block on the prefix cache, read shifted."""
    torch.manual_seed(0)
    S = 8
    module = DenoiserFineTuning(str(backbone_dir), block_size=S, loss_weighting="none", shifted=True,
                                time_init="pixart").eval()
    randomize_(module.denoiser, seed=2, scale=0.1)
    x = torch.randint(4, 260, (2, 32), generator=torch.Generator().manual_seed(5))
    mask_id = module.hparams.mask_token_id
    # Re-create the masks forward_loss draws: same generator, same calls.
    seen = {}
    import twotower.training as training

    real_mask_blocks = training.mask_blocks

    def spy(*a, **k):
        out = real_mask_blocks(*a, **k)
        seen["noisy_tail"], seen["masked_tail"] = out[0], out[1]
        return out

    training.mask_blocks = spy
    try:
        with torch.no_grad():
            out = module.forward_loss(x, generator=torch.Generator().manual_seed(0))
    finally:
        training.mask_blocks = real_mask_blocks
    noisy = x.clone().view(2, 4, S)
    noisy[:, :, 1:] = seen["noisy_tail"].view(2, 4, S - 1)
    masked = torch.zeros(2, 4, S, dtype=torch.bool)
    masked[:, :, 1:] = seen["masked_tail"].view(2, 4, S - 1)
    assert not masked[:, :, 0].any() and masked.any()
    ce_sum, count = 0.0, 0
    with torch.no_grad():
        for k in range(4):
            for b in range(2):
                if k == 0:  # an empty context: the first block runs on a zero-length cache
                    _, cache = module.context.prefill(x[b : b + 1, :1], logits="none")
                    cache = cache.empty_like(cache, "cpu")
                    assert cache.length == 0
                else:
                    _, cache = module.context.prefill(x[b : b + 1, : k * S], logits="none")
                blk = noisy[b : b + 1, k]
                t = masked[b, k].float().sum()[None] / S
                logits = module.denoiser.forward_block(blk, cache, t)[0]  # (S, V)
                for p in range(1, S):
                    if masked[b, k, p]:
                        ce_sum += torch.nn.functional.cross_entropy(logits[p - 1], x[b, k * S + p]).item()
                        count += 1
    assert count == int(out["masked"])
    assert abs(ce_sum - float(out["ce_sum"])) < 1e-4 * max(1.0, ce_sum)
    assert all(noisy.view(2, -1)[masked.view(2, -1)] == mask_id)


def test_shifted_generation_opens_each_block_with_the_ar_token(backbone_dir, tmp_path):
    from twotower.samplers import ConfidenceThreshold

    lm = TwoTowerLM.from_backbone(backbone_dir, block_size=8, shifted=True, time_init="pixart").eval()
    randomize_(lm.denoiser, seed=4, scale=0.1)
    prompts = torch.randint(4, 260, (3, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(prompts)
    mask[1, :3] = 0  # left padding
    calls = []
    out = lm.generate(prompts, mask, sampler=ConfidenceThreshold(0.3), steps_per_block=8, max_new_tokens=17,
                      step_callback=lambda blk, step, before, logits, after: calls.append(blk))
    assert out.new_tokens.shape == (3, 17) and out.blocks == 3
    assert 2 not in calls  # the last block has one position: the AR token, no denoiser forward
    assert int(out.nfe.max()) == sum(1 for c in calls if c == 0) + sum(1 for c in calls if c == 1)
    with torch.no_grad():
        for b in range(3):
            start = int((mask[b] == 0).sum())
            seq = torch.cat([prompts[b, start:], out.new_tokens[b]])
            for k in range(3):  # position 0 of every block is the context tower's argmax (never [MASK])
                at = 10 - start + 8 * k
                logits = lm.context(seq[None, :at])[0, -1]
                logits[lm.mask_token_id] = float("-inf")
                assert int(seq[at]) == int(logits.argmax()), (b, k)
            # the same row alone gives the same tokens (batch invariance with left padding)
            alone = lm.generate(prompts[b : b + 1, start:], sampler=ConfidenceThreshold(0.3), steps_per_block=8,
                                max_new_tokens=17)
            assert torch.equal(alone.new_tokens[0], out.new_tokens[b])
    # the flag survives save / load, and so does the output
    lm.save_pretrained(tmp_path / "shifted")
    again = TwoTowerLM.from_pretrained(tmp_path / "shifted")
    assert again.shifted
    assert torch.equal(again.generate(prompts, mask, sampler=ConfidenceThreshold(0.3), steps_per_block=8,
                                      max_new_tokens=17).new_tokens, out.new_tokens)
    # an unshifted run of the same weights reads the outputs at another offset: different tokens
    lm.shifted = False
    plain = lm.generate(prompts, mask, sampler=ConfidenceThreshold(0.3), steps_per_block=8, max_new_tokens=17)
    assert not torch.equal(plain.new_tokens, out.new_tokens)


def test_shifted_flag_must_match_init_from(backbone_dir, tmp_path):
    TwoTowerLM.from_backbone(backbone_dir, block_size=8, shifted=True).save_pretrained(tmp_path / "s")
    with pytest.raises(ValueError, match="shifted"):
        DenoiserFineTuning(str(backbone_dir), block_size=8, init_from=str(tmp_path / "s"))
    assert DenoiserFineTuning(str(backbone_dir), block_size=8, init_from=str(tmp_path / "s"), shifted=True)
    with pytest.raises(ValueError, match="block_size >= 2"):
        DenoiserFineTuning(str(backbone_dir), block_size=1, shifted=True)


# ---- any family, chat prompts, generation dtype ---------------------------------------------------


def _chat_module(backbone, corpus, **kw) -> DistilledDataModule:
    """A DistilledDataModule on `backbone` whose rows are all chat prompts (short snippets, room to answer)."""
    kw = dict(source=str(corpus), seq_len=128, block_size=8, batch_size=2, num_train=4, num_val=2, min_prompt=8,
              max_prompt=16, val_fraction=0.2, chat_fraction=1.0, chat_snippet=8) | kw
    dm = DistilledDataModule(str(backbone), **kw)
    dm.setup()
    return dm


def _eos_after(backbone, out, token: int) -> None:
    """Copy the Llama backbone folder to `out` with the EOS row of its LM head set to 1.05x token's row:
    wherever `token` is the greedy choice with a positive logit, EOS now is."""
    import shutil

    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(backbone)
    eos = hf.config.eos_token_id
    with torch.no_grad():
        hf.lm_head.weight[eos] = 1.05 * hf.lm_head.weight[token]
    hf.save_pretrained(out)
    for f in backbone.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)


def test_chat_prompts_use_the_backbones_template_and_targets_stop_after_the_first_eos(tmp_path, code_corpus):
    from conftest import save_chat_llama

    from twotower.tokenizers import HFTokenizer
    from twotower.towers.base import ContextTowerBase

    plain = save_chat_llama(tmp_path / "llama")
    dm = _chat_module(plain, code_corpus)
    assert isinstance(dm.tokenizer, HFTokenizer) and dm.tokenizer.path == str(plain)  # the backbone's own
    rows = dm.train_set.rows
    # A token the backbone likes to continue with: made to be EOS in a second backbone.
    gen = torch.cat([rows[i, int(dm.train_set.prompt_len[i]):] for i in range(len(rows))])
    favourite = int(torch.mode(gen).values)
    _eos_after(plain, tmp_path / "eos", favourite)
    dm = _chat_module(tmp_path / "eos", code_corpus)
    context = ContextTowerBase.from_pretrained(tmp_path / "eos").eval()  # a Llama: any family distils
    tok, eos = dm.tokenizer, dm.tokenizer.eos_token_id
    snippets = {tok.decode(r[:8].tolist()).strip() for r in dm.text.train_data}
    instructions = [t.split("{snippet}")[0] for t in distill.CHAT_TEMPLATES]
    cut = 0
    for i in range(len(dm.train_set)):
        item, p = dm.train_set[i], int(dm.train_set.prompt_len[i])
        row, mask = item["input_ids"], item["loss_mask"]
        prompt = tok.decode(row[:p].tolist(), skip_special_tokens=False)
        assert prompt.startswith("<|im_start|>user\n") and prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
        assert sum(prompt.startswith("<|im_start|>user\n" + s) for s in instructions) == 1
        assert any(s in prompt for s in snippets)  # about a real snippet of the corpus
        assert p > 16  # the template's length, not a drawn text prompt (8 or 16)
        with torch.no_grad():  # answered by the backbone itself
            assert torch.equal(row, _naive_greedy(context, row[:p], 128 - p))
        ends = [j for j in range(p, 128) if int(row[j]) == eos]
        last = ends[0] if ends else 127  # the EOS itself is a target, nothing after it
        assert not mask[:p].any() and mask[p:last + 1].all() and not mask[last + 1:].any()
        cut += bool(ends) and ends[0] < 127
    assert cut >= 1  # some answer really ended early
    assert dm.train_set.stop_at.all()  # every row is a chat row


def test_stop_at_eos_masks_by_hand():
    """`_DistilledRows` on hand-made rows: only chat rows stop, at the first EOS after the prompt."""
    E = 2
    rows = torch.tensor([[5, E, 6, 7, E, 8, E, 9],    # chat: an EOS in the prompt is not the end
                         [5, 6, 7, 8, 9, 10, 11, 12],  # chat, no EOS: targets to the end
                         [5, 6, 7, E, 8, 9, 10, 11],   # text row: EOS is an ordinary target
                         [5, 6, 7, 8, E, 9, 10, 11]])  # chat, EOS right at the prompt end
    sets = distill._DistilledRows(rows, torch.tensor([3, 3, 2, 4]), shard_rows=2, split="train", done=rows,
                                  stop_at=torch.tensor([True, True, False, True]), eos_id=E)
    masks = [sets[i]["loss_mask"].int().tolist() for i in range(4)]
    assert masks == [[0, 0, 0, 1, 1, 0, 0, 0],
                     [0, 0, 0, 1, 1, 1, 1, 1],
                     [0, 0, 1, 1, 1, 1, 1, 1],
                     [0, 0, 0, 0, 1, 0, 0, 0]]
    assert all(torch.equal(sets[i]["input_ids"], rows[i]) for i in range(4))


def test_chat_prompts_need_a_chat_template_and_settings_are_checked(backbone_dir, code_corpus):
    kw = dict(source=str(code_corpus), seq_len=32, block_size=8, min_prompt=8, max_prompt=16, val_fraction=0.2)
    dm = DistilledDataModule(str(backbone_dir), chat_fraction=1.0, **kw)
    with pytest.raises(ValueError, match=r"chat_fraction=1.0 needs a tokenizer with a chat template; "
                                         r"ByteTokenizer.* has none \(set chat_fraction: 0\)"):
        dm.setup()
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="chat_fraction must be in"):
            DistilledDataModule(str(backbone_dir), chat_fraction=bad, **kw)
    with pytest.raises(ValueError, match="gen_dtype must be one of"):
        DistilledDataModule(str(backbone_dir), gen_dtype="float16", **kw)


def test_chat_prompts_longer_than_the_rows_are_refused(tmp_path, code_corpus):
    from conftest import save_chat_llama

    backbone = save_chat_llama(tmp_path / "llama")
    with pytest.raises(ValueError, match="leaves less than one block of seq_len=64; lower chat_snippet"):
        _chat_module(backbone, code_corpus, seq_len=64, chat_snippet=32)


def test_without_chat_rows_the_prompts_are_drawn_as_before(backbone_dir, code_corpus):
    """chat_fraction=0 keeps the cache keys of the rule before chat prompts, so it must keep its draws
    too (train then val, from one generator), or a cached val shard would meet other prompt lengths."""
    dm = DistilledDataModule(str(backbone_dir), source=str(code_corpus), seq_len=32, block_size=8, num_train=6,
                             num_val=5, min_prompt=8, max_prompt=24, val_fraction=0.2, seed=3)
    dm.setup()
    gen = torch.Generator().manual_seed(3)
    for split, data, n in [(dm.train_set, dm.text.train_data, 6), (dm.val_set, dm.text.val_data, 5)]:
        take = torch.randperm(data.shape[0], generator=gen)[:n]
        take = take.repeat((n + take.numel() - 1) // take.numel())[:n]
        p = torch.randint(1, 3 + 1, (n,), generator=gen) * 8
        assert torch.equal(split.prompt_len, p) and torch.equal(split.real, data[take])
        assert not split.stop_at.any()


def test_generation_in_bfloat16(tmp_path, code_corpus):
    from conftest import save_chat_llama

    backbone = save_chat_llama(tmp_path / "llama")
    kw = dict(source=str(code_corpus), seq_len=32, block_size=8, batch_size=2, num_train=2, num_val=1, min_prompt=8,
              max_prompt=16, val_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    dm = DistilledDataModule(str(backbone), gen_dtype="bfloat16", **kw)
    dm.setup()
    row = dm.train_set[0]["input_ids"]
    assert next(dm._context.parameters()).dtype == torch.bfloat16
    assert row.shape == (32,) and int(row.max()) < dm.tokenizer.vocab_size
    plain = DistilledDataModule(str(backbone), **kw)
    key = plain._cache_path("text")
    assert key != dm._cache_path("text")  # a bf16 distillation is cached apart
    assert key == DistilledDataModule(str(backbone), chat_snippet=5, **kw)._cache_path("text")  # unused: same key
