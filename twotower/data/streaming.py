"""Streaming training data: a corpus too large for memory -> packed rows, read as it is needed.

    iter_documents --held_out(name)--> train / held-out document stream
        --tokenizer.encode_tensor--> [bos] + doc + [eos] token stream --cut--> rows (seq_len,)
        --every k-th row (rank, worker)--> seeded shuffle buffer --> {"input_ids", "index"}

`TextDataModule` tokenises the whole corpus into one tensor before the first step; here nothing
is listed or materialised. A split is decided per document by `held_out` (the rule of
`split_documents`, so a document lands in the same split in both modules; `split_documents`'
small-corpus fallback, which needs the whole list, does not apply). Rows are exactly those of
`pack_documents` over the same documents, in the same order, and `index` is a row's number in
that order: per-sample noise seeds (`twotower.distributed.sample_seed`) then do not depend on the
number of workers, ranks or the shuffle.

Memory: the packing carry (< seq_len tokens) plus one document's tokens, and at most
`shuffle_buffer + 1` rows (the buffer and the row on its way in or out); `max_rows_held` records
the high-water mark of rows for tests.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from twotower.distributed import _rank_world
from twotower.tokenizers import ByteTokenizer, Tokenizer

from .packing import as_long_tensor, check_corpus_settings
from .sources import STDLIB, held_out, iter_documents


class StreamingRows(IterableDataset):
    """One split of a corpus as a stream of packed rows: items {"input_ids": (seq_len,), "index": int}.

    Sharding: DataLoader worker w of rank r (of W ranks, n workers each) takes the rows whose
    number i has i % (W n) == w W + r, so each rank takes i % W == r whatever n is. Across ranks the
    last < W rows (a group that does not divide by W) are dropped, as `EpochShuffle` drops its
    tail, so every rank gets the same number of rows and steps in lockstep; in one process every
    row is used exactly once per epoch.

    Shuffling: rows pass through a buffer of `shuffle_buffer` rows (0: stream order); each row
    out is a seeded random draw from the buffer, seeded by (seed, epoch, shard): the same seed
    and epoch give the same order. `set_epoch` picks the epoch (`StreamingTextDataModule`'s
    loader calls it before each pass).

    rank / world_size: None reads the process group when iterating in the main process (set
    them to simulate a rank, or when workers cannot see the group).
    """

    def __init__(self, source: str, tokenizer: Tokenizer, seq_len: int, *, heldout: bool, val_fraction: float,
                 pattern: str = "**/*.txt", text_field: str = "text", max_documents: int | None = None,
                 max_sequences: int | None = None, shuffle_buffer: int = 0, seed: int = 0,
                 rank: int | None = None, world_size: int | None = None) -> None:
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer={shuffle_buffer} must be >= 0 (0: no shuffle)")
        if (rank is None) != (world_size is None) or (world_size is not None and not 0 <= rank < world_size):
            raise ValueError(f"rank={rank}, world_size={world_size}: give both (0 <= rank < world_size) or neither")
        self.source, self.tokenizer, self.seq_len = str(source), tokenizer, seq_len
        self.heldout, self.val_fraction = heldout, val_fraction
        self.pattern, self.text_field, self.max_documents = pattern, text_field, max_documents
        self.max_sequences, self.shuffle_buffer, self.seed = max_sequences, shuffle_buffer, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.max_rows_held = 0  # high-water mark of rows held at once, for tests

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    # -- the unsharded row stream

    def token_documents(self) -> Iterator[torch.Tensor]:
        """This split's documents as token tensors (n,), in corpus order, one at a time."""
        self._documents_seen = 0
        for doc in iter_documents(self.source, pattern=self.pattern, text_field=self.text_field):
            if self.max_documents is not None and self._documents_seen >= self.max_documents:
                break
            self._documents_seen += 1
            if held_out(doc.name, self.val_fraction) == self.heldout:
                yield self.tokenizer.encode_tensor(doc.text)

    def rows(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(row number, row (seq_len,)) in stream order: `pack_documents`' rows, one at a time.

        Only the carry (the < seq_len tokens after the last full row) outlives a document.
        """
        tok, L_ = self.tokenizer, self.seq_len
        bos = torch.tensor([] if tok.bos_token_id is None else [tok.bos_token_id], dtype=torch.long)
        eos = torch.tensor([] if tok.eos_token_id is None else [tok.eos_token_id], dtype=torch.long)
        carry, i = torch.empty(0, dtype=torch.long), 0
        for ids in self.token_documents():
            stream = torch.cat([carry, bos, as_long_tensor(ids), eos])
            n = stream.numel() // L_
            for k in range(n):
                if self.max_sequences is not None and i >= self.max_sequences:
                    return
                yield i, stream[k * L_:(k + 1) * L_].clone()  # a copy: the document can be freed
                i += 1
            # clone: a slice would keep the whole document's tensor alive until the next one.
            carry = stream[n * L_:].clone()
        if i == 0:
            self._raise_no_rows()

    def _raise_no_rows(self) -> None:
        if self._documents_seen == 0:
            raise ValueError(f"corpus {self.source!r} contains no non-empty documents; check source, "
                             "pattern and text_field")
        if self.heldout:
            raise ValueError(
                f"corpus {self.source!r}: the held-out documents (name hash < val_fraction={self.val_fraction}) "
                f"give no full row of seq_len={self.seq_len} tokens; add documents, raise val_fraction, or "
                "set val_fraction=0 to train without a held-out split")
        raise ValueError(f"corpus {self.source!r}: the training documents give no full row of seq_len={self.seq_len} "
                         f"tokens; lower seq_len, lower val_fraction={self.val_fraction} or add documents")

    # -- sharding and shuffling

    def _shard(self) -> tuple[int, int, int, int]:
        """(slot, k, rank, world): this reader takes rows i with i % k == slot."""
        info = get_worker_info()
        # Workers split each rank's share further: k = world * workers readers, each taking one slot.
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rank, world = (self.rank, self.world_size) if self.world_size is not None else _rank_world()
        return worker * world + rank, world * workers, rank, world

    def __iter__(self) -> Iterator[dict]:
        slot, k, rank, world = self._shard()
        # Distinct prime multipliers give each (seed, epoch, slot) its own seed, so ranks and workers
        # shuffle differently and every epoch reshuffles.
        rng = random.Random(self.seed * 1_000_003 + self.epoch * 7_919 + slot * 104_729)
        buf: list[tuple[int, torch.Tensor]] = []
        held = None  # this reader's row, waiting until its group of `world` rows is complete
        self.max_rows_held = 0
        for i, row in self.rows():
            if i % k == slot:
                held = (i, row)
                self._note(len(buf) + 1)
            # Row i completes the group of rank-0..W-1 rows it belongs to: release this rank's row.
            if held is None or i < held[0] + (world - 1 - rank):
                continue
            item, held = held, None
            if self.shuffle_buffer == 0:
                yield self._item(item)
                continue
            if len(buf) < self.shuffle_buffer:
                buf.append(item)
                self._note(len(buf))
                continue
            # Reservoir-style swap: the new row takes a random slot and that slot's row goes out, so memory
            # stays at shuffle_buffer rows however long the corpus is.
            j = rng.randrange(len(buf))
            out, buf[j] = buf[j], item
            self._note(len(buf) + 1)
            yield self._item(out)
        # The tail: what is left in the buffer goes out in random order too.
        rng.shuffle(buf)
        while buf:
            yield self._item(buf.pop())

    def _note(self, rows: int) -> None:
        self.max_rows_held = max(self.max_rows_held, rows)

    @staticmethod
    def _item(item: tuple[int, torch.Tensor]) -> dict:
        return {"input_ids": item[1], "index": item[0]}


class _EpochLoader(DataLoader):
    """A DataLoader that tells its dataset the epoch before each pass (in the main process, so that
    workers, which get a copy of the dataset, see it too)."""

    def __init__(self, dataset: StreamingRows, epoch_fn, **kwargs) -> None:
        super().__init__(dataset, **kwargs)
        self._epoch_fn = epoch_fn

    def __iter__(self):
        # Before super().__iter__: worker processes copy the dataset when they start, epoch included.
        self.dataset.set_epoch(self._epoch_fn())
        return super().__iter__()


class StreamingTextDataModule(L.LightningDataModule):
    """`TextDataModule`'s rows, streamed: for corpora too large to tokenise and hold at once.

    Batches are {"input_ids": LongTensor (B, seq_len), "index": LongTensor (B,)} (the index seeds
    each sample's noise in `DenoiserFineTuning`). Arguments as `TextDataModule`'s, plus:

    Args:
        shuffle_buffer: rows in the training shuffle buffer (0: stream order). Held-out rows are
            never shuffled.
        rank / world_size: simulate a distributed rank (None: read the process group).
    The epoch of the shuffle is the trainer's current epoch while training, else this module's
    counter (`set_epoch`, or +1 per pass). No cache: each epoch reads and tokenises the corpus again.
    """

    def __init__(self, source: str = STDLIB, tokenizer: Tokenizer | None = None, seq_len: int = 256,
                 block_size: int = 16, batch_size: int = 8, val_fraction: float = 0.02,
                 max_documents: int | None = None, max_train_sequences: int | None = None,
                 max_val_sequences: int | None = None, shuffle_buffer: int = 1024, num_workers: int = 0,
                 seed: int = 0, text_field: str = "text", pattern: str = "**/*.txt",
                 rank: int | None = None, world_size: int | None = None) -> None:
        super().__init__()
        check_corpus_settings(seq_len, block_size, batch_size, val_fraction, max_documents=max_documents,
                              max_train_sequences=max_train_sequences, max_val_sequences=max_val_sequences)
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer={shuffle_buffer} must be >= 0 (0: no shuffle)")
        self.source, self.seq_len, self.block_size = str(source), seq_len, block_size
        self.tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
        self.batch_size, self.val_fraction, self.max_documents = batch_size, val_fraction, max_documents
        self.max_train_sequences, self.max_val_sequences = max_train_sequences, max_val_sequences
        self.shuffle_buffer, self.num_workers, self.seed = shuffle_buffer, num_workers, seed
        self.text_field, self.pattern, self.rank, self.world_size = text_field, pattern, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch of the next pass when no trainer drives this module."""
        self.epoch = epoch

    def _next_epoch(self) -> int:
        if self.trainer is not None:
            return self.trainer.current_epoch
        epoch, self.epoch = self.epoch, self.epoch + 1
        return epoch

    def dataset(self, heldout: bool = False) -> StreamingRows:
        """One split as a `StreamingRows` (rank and world size resolved now, in the main process)."""
        rank, world = (self.rank, self.world_size) if self.world_size is not None else _rank_world()
        return StreamingRows(
            self.source, self.tokenizer, self.seq_len, heldout=heldout, val_fraction=self.val_fraction,
            pattern=self.pattern, text_field=self.text_field, max_documents=self.max_documents,
            max_sequences=self.max_val_sequences if heldout else self.max_train_sequences,
            shuffle_buffer=0 if heldout else self.shuffle_buffer, seed=self.seed, rank=rank, world_size=world)

    def setup(self, stage: str | None = None) -> None:
        """Fail early on an empty corpus or a split too short for one row: reads documents only
        until each split has seq_len tokens (no listing of the corpus)."""
        need = {False: self.seq_len, True: self.seq_len if self.val_fraction > 0 else 0}
        tok, seen = self.tokenizer, 0
        markers = (tok.bos_token_id is not None) + (tok.eos_token_id is not None)
        for doc in iter_documents(self.source, pattern=self.pattern, text_field=self.text_field):
            if self.max_documents is not None and seen >= self.max_documents:
                break
            seen += 1
            split = held_out(doc.name, self.val_fraction)
            if need[split] > 0:
                # Tokenised only while a split still needs tokens: setup reads as little of the corpus as it can.
                need[split] -= tok.encode_tensor(doc.text).numel() + markers
            if max(need.values()) <= 0:
                return
        probe = self.dataset(False)
        probe._documents_seen = seen
        for heldout in (False, True):
            if need[heldout] > 0:
                probe.heldout = heldout
                probe._raise_no_rows()

    def train_dataloader(self) -> DataLoader:
        return _EpochLoader(self.dataset(False), self._next_epoch, batch_size=self.batch_size,
                            num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_fraction == 0:
            return []
        return DataLoader(self.dataset(True), batch_size=self.batch_size, num_workers=self.num_workers)
