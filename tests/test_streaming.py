"""StreamingTextDataModule: the rows of pack_documents, read as a stream; the split, sharding over
ranks and workers, the shuffle buffer, bounded memory, errors, and two training steps."""

from __future__ import annotations

import json
import random
from collections import Counter

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from twotower.data import (
    StreamingRows,
    StreamingTextDataModule,
    held_out,
    iter_documents,
    pack_documents,
    split_documents,
)
from twotower.tokenizers import ByteTokenizer


def _jsonl_corpus(path, n: int, seed: int = 0):
    """n documents of 5-200 bytes (many shorter than a row, some spanning rows) as JSONL."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"doc {i}: " + "xyz"[i % 3] * rng.randint(0, 190)}) + "\n")
    return path


@pytest.fixture
def corpus(tmp_path):
    return _jsonl_corpus(tmp_path / "corpus.jsonl", 300)


def _packed(source, seq_len, heldout, val_fraction, max_sequences=None):
    tok = ByteTokenizer()
    docs = [tok.encode_tensor(d.text) for d in iter_documents(source) if held_out(d.name, val_fraction) == heldout]
    return pack_documents(docs, seq_len, bos_id=tok.bos_token_id, eos_id=tok.eos_token_id, max_sequences=max_sequences)


def _rows(source, seq_len=32, *, heldout=False, val_fraction=0.2, **kw):
    return StreamingRows(str(source), ByteTokenizer(), seq_len, heldout=heldout, val_fraction=val_fraction, **kw)


def test_split_rule_is_split_documents_rule(corpus):
    names = [d.name for d in iter_documents(corpus)]
    train_idx, val_idx = split_documents(names, 0.2)
    assert 0 < len(val_idx) < len(names)  # the small-corpus fallback does not apply here
    assert [i for i, n in enumerate(names) if held_out(n, 0.2)] == val_idx


@pytest.mark.parametrize("heldout", [False, True])
def test_rows_equal_pack_documents_in_order(corpus, heldout):
    expected = _packed(corpus, 32, heldout, 0.2)
    items = list(_rows(corpus, heldout=heldout))
    assert expected.shape[0] > 10
    assert torch.equal(torch.stack([it["input_ids"] for it in items]), expected)
    assert [it["index"] for it in items] == list(range(expected.shape[0]))
    capped = list(_rows(corpus, heldout=heldout, max_sequences=5))
    assert torch.equal(torch.stack([it["input_ids"] for it in capped]), _packed(corpus, 32, heldout, 0.2, 5))


def test_large_file_streams_within_buffer_plus_one_row(tmp_path):
    source = _jsonl_corpus(tmp_path / "big.jsonl", 3000, seed=1)
    expected = _packed(source, 16, False, 0.02)
    assert expected.shape[0] > 5000
    plain = _rows(source, 16, val_fraction=0.02, shuffle_buffer=0)
    assert torch.equal(torch.stack([it["input_ids"] for it in plain]), expected)
    assert plain.max_rows_held <= 1
    shuffled = _rows(source, 16, val_fraction=0.02, shuffle_buffer=4, seed=3)
    items = list(shuffled)
    assert 1 < shuffled.max_rows_held <= 4 + 1
    assert sorted(it["index"] for it in items) == list(range(expected.shape[0]))
    assert [it["index"] for it in items] != list(range(expected.shape[0]))
    assert all(torch.equal(it["input_ids"], expected[it["index"]]) for it in items)


def test_shuffle_is_seeded_per_epoch(corpus):
    def order(seed, epoch):
        ds = _rows(corpus, shuffle_buffer=8, seed=seed)
        ds.set_epoch(epoch)
        return [it["index"] for it in ds]

    assert order(0, 0) == order(0, 0)
    assert order(0, 1) != order(0, 0) and order(1, 0) != order(0, 0)
    assert sorted(order(0, 1)) == sorted(order(0, 0))


@pytest.mark.parametrize("shuffle_buffer", [0, 8])
def test_ranks_take_disjoint_rows_in_lockstep(corpus, shuffle_buffer):
    n = _packed(corpus, 32, False, 0.2).shape[0]
    world = 3
    per_rank = [[it["index"] for it in _rows(corpus, shuffle_buffer=shuffle_buffer, rank=r, world_size=world)]
                for r in range(world)]
    assert len({len(p) for p in per_rank}) == 1  # same number of rows: ranks step together
    assert all(i % world == r for r, p in enumerate(per_rank) for i in p)
    everything = sorted(i for p in per_rank for i in p)
    assert everything == list(range(n // world * world))  # disjoint; only the last < world rows dropped


def test_two_workers_and_two_ranks_use_every_row_once(corpus):
    n = _packed(corpus, 32, False, 0.2).shape[0]
    seen = Counter()
    for rank in range(2):
        data = StreamingTextDataModule(str(corpus), seq_len=32, block_size=8, batch_size=4, val_fraction=0.2,
                                       shuffle_buffer=6, num_workers=2, rank=rank, world_size=2)
        batches = list(data.train_dataloader())
        assert all(b["input_ids"].shape[1:] == (32,) for b in batches)
        seen.update(i for b in batches for i in b["index"].tolist())
    assert sorted(seen) == list(range(n // 2 * 2)) and set(seen.values()) == {1}
    # one process, two workers: every row exactly once
    data = StreamingTextDataModule(str(corpus), seq_len=32, block_size=8, batch_size=4, val_fraction=0.2,
                                   num_workers=2)
    assert sorted(i for b in data.train_dataloader() for i in b["index"].tolist()) == list(range(n))


def test_module_epoch_counter_reshuffles(corpus):
    data = StreamingTextDataModule(str(corpus), seq_len=32, block_size=8, batch_size=4, val_fraction=0.2,
                                   shuffle_buffer=16)
    loader = data.train_dataloader()
    first, second = ([i for b in loader for i in b["index"].tolist()] for _ in range(2))
    assert first != second and sorted(first) == sorted(second)
    data.set_epoch(0)
    assert [i for b in loader for i in b["index"].tolist()] == first
    val = [i for b in data.val_dataloader() for i in b["index"].tolist()]
    assert val == list(range(_packed(corpus, 32, True, 0.2).shape[0]))


def test_errors_name_the_value_and_the_fix(tmp_path, corpus):
    with pytest.raises(ValueError, match="seq_len=30 must be a positive multiple of block_size=8"):
        StreamingTextDataModule(str(corpus), seq_len=30, block_size=8)
    with pytest.raises(ValueError, match="shuffle_buffer=-1"):
        StreamingTextDataModule(str(corpus), seq_len=32, block_size=8, shuffle_buffer=-1)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(ValueError, match="no non-empty documents"):
        StreamingTextDataModule(str(empty), seq_len=32, block_size=8).setup()
    with pytest.raises(ValueError, match="no non-empty documents"):
        list(_rows(empty))
    few = _jsonl_corpus(tmp_path / "few.jsonl", 3)
    assert not any(held_out(d.name, 0.01) for d in iter_documents(few))
    with pytest.raises(ValueError, match=r"held-out .*val_fraction=0.01.*add documents"):
        StreamingTextDataModule(str(few), seq_len=32, block_size=8, val_fraction=0.01).setup()
    with pytest.raises(ValueError, match=r"held-out .*val_fraction=0.01.*add documents"):
        list(_rows(few, heldout=True, val_fraction=0.01))
    with pytest.raises(ValueError, match="training documents give no full row of seq_len=4096"):
        StreamingTextDataModule(str(few), seq_len=4096, block_size=8, val_fraction=0.0).setup()
    StreamingTextDataModule(str(few), seq_len=32, block_size=8, val_fraction=0.0).setup()  # no held-out: fine


def test_two_training_steps(backbone_dir, corpus, tmp_path):
    from twotower.training import DenoiserFineTuning

    module = DenoiserFineTuning(str(backbone_dir), block_size=8, lr=1e-2, warmup_steps=0)
    before = {k: v.clone() for k, v in module.denoiser.state_dict().items()}
    data = StreamingTextDataModule(str(corpus), seq_len=32, block_size=8, batch_size=4, val_fraction=0.2,
                                   shuffle_buffer=16)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        num_sanity_val_steps=0, limit_val_batches=1, val_check_interval=2)
    trainer.fit(module, data)
    assert trainer.global_step == 2
    assert any(not torch.equal(v, before[k]) for k, v in module.denoiser.state_dict().items())
    assert any(k.startswith("val/") for k in trainer.callback_metrics), list(trainer.callback_metrics)
