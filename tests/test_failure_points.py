"""Failure-point mining (`twotower.data.failure_points`): the mined starts are where a naive speculative
loop's iterations start, and the examples put a training block exactly there."""

from __future__ import annotations

import pytest
import torch

from conftest import MASK, PAD, make_context
from twotower.data.distill import distill_rows
from twotower.data.failure_points import aligned_examples, keep_ar_consistent, mine_draft_starts
from twotower.model import TwoTowerLM

S, L = 8, 48


def _model():
    """A shifted tiny pair whose denoiser starts as the AR layers (identity time init): its drafts get
    the first drafted position right and most later ones wrong, so iterations keep 1 to several tokens."""
    torch.manual_seed(0)
    return TwoTowerLM.from_backbone(make_context(seed=3, scale=0.3, vocab_size=260), block_size=S, shifted=True).eval()


def _rows(model, n=5):
    g = torch.Generator().manual_seed(1)
    real = torch.randint(4, 260, (n, L), generator=g)
    p = torch.tensor([8, 16, 8, 24, 16])[:n]
    return distill_rows(model.context, real, p, pad_token_id=PAD, batch_size=3, progress=False), p


def _naive_starts(model, row, p):
    """One speculative loop written out: block at s = [row[s], MASK...], one denoiser forward over the
    clean prefix row[:s], keep 1 + the leading drafted positions equal to the row, next s = s + keep."""
    starts, s = [], p
    with torch.no_grad():
        while s < L:
            starts.append(s)
            _, cache = model.context.prefill(row[None, :s], logits="none")
            block = torch.full((1, S), MASK, dtype=torch.long)
            block[0, 0] = row[s]
            logits = model.denoiser.forward_block(block, cache, torch.tensor([(S - 1) / S]))
            logits[..., MASK] = float("-inf")
            draft = logits[0, :-1].argmax(-1)  # shifted: output i is the token at i + 1
            keep = 1
            for i in range(1, S):
                if s + i >= L or int(draft[i - 1]) != int(row[s + i]):
                    break
                keep += 1
            s += keep
    return starts


def test_mined_starts_are_the_naive_loops_iteration_starts():
    model = _model()
    rows, p = _rows(model)
    starts, valid = mine_draft_starts(model, rows, p, batch_size=2, progress=False)
    assert torch.equal(valid, torch.full((rows.shape[0],), L))  # the loop reproduces the distilled rows
    gaps = []
    for i in range(rows.shape[0]):
        expected = _naive_starts(model, rows[i], int(p[i]))
        assert starts[i].nonzero().squeeze(1).tolist() == expected, i
        gaps += [b - a for a, b in zip(expected, expected[1:])]
    assert min(gaps) == 1 and max(gaps) > 2  # both rejected and partly accepted drafts occur


def test_aligned_examples_put_a_block_at_each_start_and_keep_the_targets():
    rows = torch.arange(2 * L).view(2, L) % 200 + 4
    loss_mask = torch.arange(L)[None].expand(2, L) >= torch.tensor([[8], [16]])
    starts = torch.zeros(2, L, dtype=torch.bool)
    starts[0, [8, 11, 19, 27, 44]] = True  # residues 0, 3, 3, 3 and 4 (44 + 8 > L: no whole block)
    starts[1, [16, 17]] = True
    ex = aligned_examples(rows, loss_mask, starts, block_size=S, pad_token_id=PAD)
    got = {(int(r), int(k)): (x, m) for r, k, x, m in zip(ex["row"], ex["shift"], ex["input_ids"], ex["loss_mask"])}
    assert sorted(got) == [(0, 0), (0, 3), (1, 0), (1, 1)]
    x, m = got[(0, 3)]
    assert torch.equal(x[:L - 3], rows[0, 3:]) and bool((x[L - 3:] == PAD).all())
    # blocks at 11, 19 and 27 of the row are blocks 1, 2, 3 of the example (positions 8..31)
    assert m.nonzero().squeeze(1).tolist() == list(range(8, 32))
    x, m = got[(1, 1)]
    assert m.nonzero().squeeze(1).tolist() == list(range(16, 24)) and int(x[16]) == int(rows[1, 17])
    assert got[(0, 0)][1].nonzero().squeeze(1).tolist() == list(range(8, 16))


def test_targets_the_ar_model_would_not_choose_on_the_shortened_row_lose_their_loss():
    model = _model()
    rows, p = _rows(model, 2)
    starts = torch.zeros_like(rows, dtype=torch.bool)
    starts[:, 17] = True
    loss_mask = torch.arange(L)[None] >= p[:, None]
    ex = aligned_examples(rows, loss_mask, starts, block_size=S, pad_token_id=PAD)
    ex["input_ids"][0, 16 + 3] = (ex["input_ids"][0, 16 + 3] + 1 - 4) % 256 + 4  # a target the AR model would not write
    before = ex["loss_mask"].clone()
    dropped = keep_ar_consistent(model.context, ex, block_size=S, progress=False)
    with torch.no_grad():
        pred = model.context(ex["input_ids"]).argmax(-1)
    for j in range(ex["input_ids"].shape[0]):
        kept = ex["loss_mask"][j].nonzero().squeeze(1).tolist()
        # every kept target is the AR argmax over the example's own tokens before it, and in each block the
        # kept positions are a prefix of the ones it had
        assert all(int(pred[j, q - 1]) == int(ex["input_ids"][j, q]) for q in kept)
        assert kept == before[j].nonzero().squeeze(1).tolist()[:len(kept)]
    assert not bool(ex["loss_mask"][0, 19:24].any()) and int(dropped) >= 5


def test_failure_point_data_module_trains_and_caches_its_examples(backbone_dir, twotower_dir, code_corpus, tmp_path):
    import lightning as L

    from twotower.data import FailurePointDataModule
    from twotower.objectives import ExpectedAcceptedLength, FirstErrorFocal, ObjectiveSum
    from twotower.training import DenoiserFineTuning

    kw = dict(source=str(code_corpus), seq_len=32, block_size=8, batch_size=4, num_train=8, num_val=4, min_prompt=8,
              max_prompt=16, val_fraction=0.2, cache_dir=str(tmp_path / "cache"), shard_rows=4, drafter=str(twotower_dir),
              mine_rows=6, mine_batch_size=4)
    dm = FailurePointDataModule(str(backbone_dir), **kw)
    dm.setup()
    stats = dm.mining_stats
    assert stats["rows"] == 6 and stats["examples"] >= 6 and stats["iterations"] >= 6
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["loss_mask"].shape == (4, 32)
    assert len(dm.mined) == stats["examples"] + 6  # the mined rows themselves come after the examples
    again = FailurePointDataModule(str(backbone_dir), **kw)
    again.setup()  # from the cache: the same examples, no mining
    assert torch.equal(again.mined.ids, dm.mined.ids) and torch.equal(again.mined.mask, dm.mined.mask)
    module = DenoiserFineTuning(str(backbone_dir), block_size=8, loss_weighting="none",
                                objective=ObjectiveSum([FirstErrorFocal(2.0), ExpectedAcceptedLength(0.0)]))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, dm)
    assert trainer.global_step == 2
    with pytest.raises(ValueError, match="mine_rows=9 is more than num_train=8"):
        FailurePointDataModule(str(backbone_dir), **{**kw, "mine_rows": 9})
    with pytest.raises(ValueError, match="mine_dtype.*float16"):
        FailurePointDataModule(str(backbone_dir), **{**kw, "mine_dtype": "float16"})
    bf16 = FailurePointDataModule(str(backbone_dir), **{**kw, "mine_dtype": "bfloat16"})
    assert bf16.mine_dtype == "bfloat16" and dm.mine_dtype == "float32"  # None: the rows' gen_dtype
    assert bf16._mined_path() != dm._mined_path()  # mined in another dtype: its own cache entry
