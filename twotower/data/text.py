"""The training data module: a text corpus -> packed (B, seq_len) rows, train and held-out.

    source --iter_documents--> [Document(name, text)] --split_documents--> train / held-out
           --tokenizer.encode + pack_documents--> LongTensor (N, seq_len) per split

Reading and the split live in `sources`, packing in `packing`, the cache key in `cache`;
`TextDataModule` strings them together, tops up a held-out split too small for one row, and
caches the packed tensors so that a rerun does not tokenise the corpus again.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from twotower.tokenizers import ByteTokenizer, Tokenizer

from twotower.distributed import EpochShuffle

from .cache import source_fingerprint, tokenizer_fingerprint, cache_file, load_cache, save_cache
from .packing import PackedRows, check_corpus_settings, pack_documents
from .sampling import ResumableLoader
from .sources import STDLIB, Document, unit_hash, iter_documents, split_documents

# Bump when the packed layout changes, so that stale caches are not reused.
_CACHE_FORMAT = 1


class TextDataModule(L.LightningDataModule):
    """Packed next-token / denoising training rows from a text corpus.

    Batches are LongTensors (B, seq_len). Rows are packed from `[bos] + doc + [eos]` streams,
    train and held-out documents packed separately (see `split_documents`).

    Args:
        source: "stdlib" (the embedded Python stdlib corpus), a folder, a text / JSONL file or
            a `datasets` directory; see `iter_documents`.
        tokenizer: defaults to `ByteTokenizer()`.
        seq_len: row length; must be a multiple of `block_size`.
        block_size: the denoiser's block size (only checked against seq_len here).
        batch_size: rows per batch.
        val_fraction: expected fraction of documents held out. If the held-out documents are
            too short for one row, train documents move over (in split-hash order) until they are.
        max_documents: keep only the first N documents in source order (quick runs).
        max_train_sequences / max_val_sequences: cap the number of packed rows per split.
        num_workers: DataLoader workers.
        seed: seeds the training shuffle (each epoch draws a new order from this generator). The
            train loader is a `ResumableLoader`: a fit resumed from a checkpoint goes on where the
            order was, not from the start of the epoch.
        text_field: JSONL / datasets column holding the text.
        pattern: glob for folder sources.
        indexed: batches are {"input_ids": (B, seq_len), "index": (B,)}: each sample's noise is then
            seeded by its index, and N data-parallel ranks train exactly as one process (see
            `twotower.distributed.EpochShuffle`, which orders and splits the rows either way).
        cache_dir: if set, packed tensors are cached there as `packed-<hash>.pt`, keyed by the
            settings above, the tokenizer and the source files' sizes and mtimes.
    """

    def __init__(
        self,
        source: str = STDLIB,
        tokenizer: Tokenizer | None = None,
        seq_len: int = 256,
        block_size: int = 16,
        batch_size: int = 8,
        val_fraction: float = 0.02,
        max_documents: int | None = None,
        max_train_sequences: int | None = None,
        max_val_sequences: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        text_field: str = "text",
        pattern: str = "**/*.txt",
        cache_dir: str | None = None,
        indexed: bool = False,
    ) -> None:
        super().__init__()
        check_corpus_settings(seq_len, block_size, batch_size, val_fraction, max_documents=max_documents,
                              max_train_sequences=max_train_sequences, max_val_sequences=max_val_sequences)
        self.source = str(source)
        self.tokenizer = tokenizer if tokenizer is not None else ByteTokenizer()
        self.seq_len = seq_len
        self.block_size = block_size
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.max_documents = max_documents
        self.max_train_sequences = max_train_sequences
        self.max_val_sequences = max_val_sequences
        self.num_workers = num_workers
        self.seed = seed
        self.text_field = text_field
        self.pattern = pattern
        self.cache_dir = cache_dir
        self.indexed = indexed
        self.train_data: torch.Tensor | None = None  # (N_train, seq_len)
        self.val_data: torch.Tensor | None = None  # (N_val, seq_len)
        self._split: tuple[list[Document], list[Document]] | None = None

    # -- documents

    def _load_split(self) -> tuple[list[Document], list[Document]]:
        if self._split is None:
            docs = []
            for doc in iter_documents(self.source, pattern=self.pattern, text_field=self.text_field):
                if self.max_documents is not None and len(docs) >= self.max_documents:
                    break
                docs.append(doc)
            if not docs:
                raise ValueError(f"corpus {self.source!r} contains no non-empty documents")
            # Split by a hash of each document's name, not by position: adding documents or listing them in
            # another order leaves every existing document in its split.
            train_idx, val_idx = split_documents([d.name for d in docs], self.val_fraction)
            if self.val_fraction > 0:
                train_idx, val_idx = self._top_up_heldout(docs, train_idx, val_idx)
            self._split = [docs[i] for i in train_idx], [docs[i] for i in val_idx]
        return self._split

    def _top_up_heldout(
        self, docs: list[Document], train_idx: list[int], val_idx: list[int]
    ) -> tuple[list[int], list[int]]:
        """Move train documents to the held-out split until it fills at least one row.

        Only small corpora (or small max_documents) need this. Documents move in order of their
        split hash, so the result still ignores listing order; one train document always stays.
        """
        def length(i: int) -> int:
            # An estimate (a tokenizer without bos or eos adds fewer); it only decides when to stop moving.
            return self.tokenizer.encode_tensor(docs[i].text).numel() + 2  # + bos, eos

        have = sum(length(i) for i in val_idx)
        moved = set()
        # [:-1]: the training split keeps at least one document whatever happens.
        for i in sorted(train_idx, key=lambda i: (unit_hash(docs[i].name), docs[i].name))[:-1]:
            if have >= self.seq_len:
                break
            moved.add(i)
            have += length(i)
        return [i for i in train_idx if i not in moved], sorted(val_idx + list(moved))

    def heldout_documents(self) -> list[str]:
        """Texts of the held-out documents (the benchmark draws prompts and continuations here)."""
        return [doc.text for doc in self._load_split()[1]]

    # -- packing

    def _pack(self, docs: list[Document], max_sequences: int | None) -> torch.Tensor:
        tok = self.tokenizer
        return pack_documents(
            (tok.encode_tensor(d.text) for d in docs),
            self.seq_len,
            bos_id=tok.bos_token_id,
            eos_id=tok.eos_token_id,
            max_sequences=max_sequences,
        )

    def _cache_path(self) -> Path | None:
        if self.cache_dir is None:
            return None
        settings = {
            "format": _CACHE_FORMAT,
            "source": self.source,
            "files": source_fingerprint(self.source),
            # No seed or batch_size: they shape the loaders, not the packed rows, and may change over a cache.
            "tokenizer": tokenizer_fingerprint(self.tokenizer),
            "seq_len": self.seq_len,
            "val_fraction": self.val_fraction,
            "max_documents": self.max_documents,
            "max_train_sequences": self.max_train_sequences,
            "max_val_sequences": self.max_val_sequences,
            "text_field": self.text_field,
            "pattern": self.pattern,
        }
        return cache_file(self.cache_dir, "packed", settings)

    def setup(self, stage: str | None = None) -> None:
        """Tokenise and pack both splits (or load them from the cache); idempotent."""
        if self.train_data is not None:
            return
        cache = self._cache_path()
        if cache is not None and cache.is_file():
            packed = load_cache(cache)
            self.train_data, self.val_data = packed["train"], packed["val"]
            return
        train_docs, val_docs = self._load_split()
        train = self._pack(train_docs, self.max_train_sequences)
        val = self._pack(val_docs, self.max_val_sequences)
        if train.shape[0] == 0:
            raise ValueError(
                f"corpus {self.source!r}: the {len(train_docs)} training documents give no full row of "
                f"seq_len={self.seq_len} tokens; lower seq_len or add documents"
            )
        if self.val_fraction > 0 and val.shape[0] == 0:
            raise ValueError(
                f"corpus {self.source!r}: the {len(val_docs)} held-out documents give no full row of "
                f"seq_len={self.seq_len} tokens; raise val_fraction, lower seq_len or add documents"
            )
        if cache is not None:
            save_cache(cache, {"train": train, "val": val})
        self.train_data, self.val_data = train, val

    # -- loaders

    def train_dataloader(self) -> ResumableLoader:
        self.setup()
        return ResumableLoader(
            PackedRows(self.train_data, self.indexed),
            batch_size=self.batch_size,
            # EpochShuffle (not shuffle=True): one seeded order per epoch, interleaved across ranks so W
            # ranks train on what one process would, and ResumableLoader can restart it mid-epoch.
            sampler=EpochShuffle(self.train_data.shape[0], seed=self.seed),
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(
            # Unshuffled: validation losses are comparable between runs and checkpoints.
            PackedRows(self.val_data, self.indexed), batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers
        )
