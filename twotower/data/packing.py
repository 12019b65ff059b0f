"""Packing: token streams -> fixed-length training rows.

`pack_documents` concatenates `[bos] + doc + [eos]` for every document and cuts the stream
into rows of `seq_len` tokens, a LongTensor (N, seq_len); `PackedRows` serves those rows to a
DataLoader. `check_seq_len` enforces that a row is a whole number of denoiser blocks, the
layout every training module here assumes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch.utils.data import Dataset


def as_long_tensor(ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """A token list or tensor of any shape as a flat LongTensor (n,)."""
    if isinstance(ids, torch.Tensor):
        return ids.long().reshape(-1)
    return torch.tensor(list(ids), dtype=torch.long)


def pack_documents(
    docs: Iterable[Sequence[int] | torch.Tensor],
    seq_len: int,
    *,
    bos_id: int | None,
    eos_id: int | None,
    max_sequences: int | None = None,
) -> torch.Tensor:
    """Concatenate `[bos] + doc + [eos]` for every doc and cut the stream into rows.

    Rows may start or end mid-document (standard LM packing); the last partial row is dropped.
    `bos_id` / `eos_id` = None omits that marker. `max_sequences` stops reading `docs` once
    that many rows are full, so a lazy iterable is only tokenised as far as needed.

    Returns:
        LongTensor (N, seq_len); N may be 0.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len={seq_len} must be positive")
    # An absent marker is an empty tensor, so the loop below needs no branch: cat skips it.
    bos = torch.tensor([bos_id] if bos_id is not None else [], dtype=torch.long)
    eos = torch.tensor([eos_id] if eos_id is not None else [], dtype=torch.long)
    pieces: list[torch.Tensor] = []
    total = 0
    limit = None if max_sequences is None else max_sequences * seq_len
    for doc in docs:
        # Checked before the next document is read: a lazy iterable is tokenised no further than needed.
        if limit is not None and total >= limit:
            break
        ids = as_long_tensor(doc)
        pieces += [bos, ids, eos]
        total += bos.numel() + ids.numel() + eos.numel()
    stream = torch.cat(pieces) if pieces else torch.empty(0, dtype=torch.long)
    n = stream.numel() // seq_len
    if max_sequences is not None:
        n = min(n, max_sequences)
    # clone: a view would keep the whole stream, dropped tail included, alive with the rows.
    return stream[: n * seq_len].reshape(n, seq_len).clone()


class PackedRows(Dataset):
    """Rows of a (N, L) tensor; items are (L,) tensors, so default collation gives (B, L).

    indexed: items are {"input_ids": (L,), "index": i} instead; the index seeds each sample's noise
    in `DenoiserFineTuning`, which makes data-parallel training equal to one process.
    """

    def __init__(self, data: torch.Tensor, indexed: bool = False) -> None:
        self.data, self.indexed = data, indexed

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, i: int):
        return {"input_ids": self.data[i], "index": i} if self.indexed else self.data[i]


def check_seq_len(seq_len: int, block_size: int) -> None:
    """Raise unless seq_len is a positive multiple of block_size (the error names the nearest valid one)."""
    if block_size <= 0:
        raise ValueError(f"block_size={block_size} must be positive")
    if seq_len <= 0 or seq_len % block_size:
        # max: a seq_len under half a block rounds to 0, which is no valid length either.
        nearest = max(block_size, round(seq_len / block_size) * block_size)
        raise ValueError(
            f"seq_len={seq_len} must be a positive multiple of block_size={block_size}; "
            f"nearest valid value: seq_len={nearest}"
        )


def check_corpus_settings(seq_len: int, block_size: int, batch_size: int, val_fraction: float,
                          **limits: int | None) -> None:
    """The settings every text data module shares: seq_len a multiple of block_size, a positive
    batch, val_fraction in [0, 1), and positive row / document limits (None = no limit)."""
    check_seq_len(seq_len, block_size)
    if batch_size <= 0:
        raise ValueError(f"batch_size={batch_size} must be positive")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    for name, value in limits.items():
        if value is not None and value <= 0:
            raise ValueError(f"{name}={value} must be positive (or None for no limit)")
