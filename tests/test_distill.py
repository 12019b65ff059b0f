"""Self-distillation data, loss masks and init_from for denoiser fine-tuning."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from conftest import randomize_, tiny_config

import twotower.distill as distill
from twotower.distill import DistilledDataModule, distill_rows
from twotower.model import TwoTowerLM
from twotower.towers.context import ContextTower
from twotower.towers.loading import save_backbone_hf
from twotower.training import DenoiserFineTuning


def _save_backbone(path: Path, seed: int) -> Path:
    cfg = tiny_config("M*-EM*E", vocab_size=260)
    tower = randomize_(ContextTower(cfg), seed=seed, scale=0.1)
    state = {k.removeprefix("backbone."): v for k, v in tower.state_dict().items()}
    save_backbone_hf(state, path, config=cfg)
    return path


@pytest.fixture
def backbone_dir(tmp_path) -> Path:
    return _save_backbone(tmp_path / "backbone", seed=0)


@pytest.fixture
def corpus(tmp_path) -> Path:
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(8):
        (root / f"doc{i}.txt").write_text(("def g%d(y):\n    return y * %d  # %s\n" % (i, i, "ab" * i)) * 10)
    return root


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


def test_data_module_rows_masks_and_cache(backbone_dir, corpus, tmp_path, monkeypatch):
    kw = dict(source=str(corpus), seq_len=32, block_size=8, batch_size=4, num_train=12, num_val=3,
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
    other = _save_backbone(tmp_path / "other", seed=5)
    with pytest.raises(pytest.fail.Exception, match="regenerated"):
        DistilledDataModule(str(other), **kw).setup()


def test_data_module_bad_settings(backbone_dir, corpus):
    with pytest.raises(ValueError, match="multiple of block_size"):
        DistilledDataModule(str(backbone_dir), source=str(corpus), seq_len=32, block_size=8, min_prompt=4)
    with pytest.raises(ValueError, match="max_prompt < seq_len"):
        DistilledDataModule(str(backbone_dir), source=str(corpus), seq_len=32, block_size=8, min_prompt=8, max_prompt=32)
    with pytest.raises(FileNotFoundError):
        DistilledDataModule("/nonexistent/backbone", source=str(corpus), seq_len=32, block_size=8, min_prompt=8, max_prompt=16)


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


def test_fit_on_distilled_batches_and_init_from(backbone_dir, corpus, tmp_path):
    # init_from: a released two-tower directory seeds the denoiser.
    lm = TwoTowerLM.from_backbone(backbone_dir, block_size=8)
    randomize_(lm.denoiser, seed=9, scale=0.1)
    lm.save_pretrained(tmp_path / "start")
    module = DenoiserFineTuning(str(backbone_dir), block_size=8, init_from=str(tmp_path / "start"), lr=1e-2,
                                warmup_steps=0)
    for k, v in lm.denoiser.state_dict().items():
        assert torch.equal(module.denoiser.state_dict()[k], v), k
    dm = DistilledDataModule(str(backbone_dir), source=str(corpus), seq_len=32, block_size=8, batch_size=4,
                             num_train=8, num_val=4, min_prompt=8, max_prompt=16, val_fraction=0.2)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        num_sanity_val_steps=0, limit_val_batches=1)
    trainer.fit(module, dm)
    assert trainer.global_step == 3
    assert torch.isfinite(trainer.callback_metrics["val/masked_acc"])
    assert any(not torch.equal(module.denoiser.state_dict()[k], v) for k, v in lm.denoiser.state_dict().items())
    # A denoiser trained against another context tower is refused.
    other = TwoTowerLM.from_backbone(_save_backbone(tmp_path / "other", seed=5), block_size=8)
    other.save_pretrained(tmp_path / "other_tt")
    with pytest.raises(ValueError, match="context tower differs"):
        DenoiserFineTuning(str(backbone_dir), block_size=8, init_from=str(tmp_path / "other_tt"))
    with pytest.raises(FileNotFoundError, match="init_from"):
        DenoiserFineTuning(str(backbone_dir), block_size=8, init_from=str(tmp_path / "missing"))
    with pytest.raises(TypeError, match="batch must be"):
        module.training_step([1, 2], 0)
