"""Self-distillation data: real-text prompts followed by the frozen AR model's own continuation.

A denoiser fine-tuned on raw text learns to predict *text*, whose next 16 tokens are genuinely
uncertain, so at a confidence threshold of 0.8 it commits about one token per step. What the
two-tower model is asked to reproduce at inference is the AR model's *greedy* continuation, and
that is a deterministic function of the context: a denoiser trained on it faces no irreducible
entropy, becomes confident, and commits many tokens per step while staying close to AR quality.

`DistilledDataModule` builds such rows once (with a progress bar) and caches them:

    row       = real[:p] + greedy_AR(real[:p], seq_len - p)
    loss_mask = positions >= p           (only the AR-written part is a training target)

p is a multiple of block_size drawn per row from [min_prompt, max_prompt], so the first
training block starts exactly where generation starts: right after a real prompt.
Batches are dicts {"input_ids": (B, L) long, "loss_mask": (B, L) bool}; `DenoiserFineTuning`
accepts them as well as plain (B, L) tensors. `distill_rows` is the generation step on its own.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from twotower.decoding import Autoregressive, Towers
from twotower.tokenizers import Tokenizer
from twotower.towers.context import ContextTower

from .cache import _files_fingerprint, cache_file, load_cache, save_cache
from .packing import _check_seq_len
from .sources import STDLIB
from .text import TextDataModule

# Bump when the cached distilled layout changes, so that stale caches are not reused.
_FORMAT = 1


class _DistilledRows(Dataset):
    """Distilled rows (N, L) with prompt lengths (N,); items are {"input_ids": (L,) long, "loss_mask": (L,) bool}."""

    def __init__(self, rows: torch.Tensor, prompt_len: torch.Tensor) -> None:
        self.rows, self.prompt_len = rows, prompt_len
        self._pos = torch.arange(rows.shape[1])

    def __len__(self) -> int:
        return self.rows.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i].long(), "loss_mask": self._pos >= self.prompt_len[i]}


def distill_rows(context: ContextTower, real: torch.Tensor, prompt_len: torch.Tensor, *, pad_token_id: int,
                 batch_size: int = 128, temperature: float = 0.0, generator: torch.Generator | None = None,
                 progress: bool = True, desc: str = "distilling") -> torch.Tensor:
    """Replace real[i, prompt_len[i]:] with the context tower's continuation of real[i, :prompt_len[i]].

    Rows are grouped by prompt length (no padding), generated `batch_size` at a time on the
    context tower's device, EOS ignored (a fixed-length continuation). Returns a new (N, L) tensor.
    """
    if real.ndim != 2 or prompt_len.shape != real.shape[:1]:
        raise ValueError(f"real must be (N, L) and prompt_len (N,), got {tuple(real.shape)} and {tuple(prompt_len.shape)}")
    N, Lr = real.shape
    if N and (int(prompt_len.min()) < 1 or int(prompt_len.max()) >= Lr):
        raise ValueError(f"prompt lengths must lie in [1, {Lr - 1}]")
    device = next(context.parameters()).device
    out = real.clone()
    groups = []
    for p in sorted(set(prompt_len.tolist())):
        idx = (prompt_len == p).nonzero().flatten()
        groups += [(p, idx[i:i + batch_size]) for i in range(0, idx.numel(), batch_size)]
    total = sum(int(i.numel()) * (Lr - p) for p, i in groups)
    bar = _progress(total, desc) if progress else None
    with torch.inference_mode():
        for p, idx in groups:
            res = Autoregressive(temperature).generate(Towers(context, pad_token_id=pad_token_id),
                                                       real[idx, :p].to(device), max_new_tokens=Lr - p,
                                                       generator=generator)
            out[idx, p:] = res.sequences[:, p:].to(out.device, out.dtype)
            if bar is not None:
                bar.update(int(idx.numel()) * (Lr - p))
    if bar is not None:
        bar.close()
    return out


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="tok", unit_scale=True, file=sys.stderr, disable=None)


class DistilledDataModule(L.LightningDataModule):
    """Rows of real prompt + the frozen AR backbone's continuation, for denoiser fine-tuning.

    Args:
        backbone: the AR checkpoint directory (the same one `DenoiserFineTuning` freezes).
        source, tokenizer, seq_len, block_size, val_fraction, cache_dir: as `TextDataModule`
            (its packed rows supply the real prompts; train and held-out prompts stay apart).
        num_train / num_val: rows to distil (a seeded random subset of the packed rows).
        min_prompt / max_prompt: prompt length range, in tokens; multiples of block_size.
        temperature: 0 distils the greedy continuation (what generation reproduces at temperature 0).
        gen_batch_size: rows per generation batch. device: where to generate ("auto": CUDA if available).
        batch_size, num_workers, seed: loaders and the subset / prompt-length draw.
        cache_dir: distilled rows are cached there as `distilled-<hash>.pt`, keyed by every setting
            above and the backbone files' content; None regenerates on every setup.
    """

    def __init__(self, backbone: str, source: str = STDLIB, tokenizer: Tokenizer | None = None, seq_len: int = 256,
                 block_size: int = 16, batch_size: int = 16, num_train: int = 4096, num_val: int = 128,
                 min_prompt: int = 16, max_prompt: int = 128, temperature: float = 0.0, gen_batch_size: int = 128,
                 val_fraction: float = 0.02, device: str = "auto", num_workers: int = 0, seed: int = 0,
                 cache_dir: str | None = None) -> None:
        super().__init__()
        _check_seq_len(seq_len, block_size)
        for name, value in [("num_train", num_train), ("num_val", num_val), ("batch_size", batch_size),
                            ("gen_batch_size", gen_batch_size)]:
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name, value in [("min_prompt", min_prompt), ("max_prompt", max_prompt)]:
            if not isinstance(value, int) or value < block_size or value % block_size:
                raise ValueError(f"{name} must be a positive multiple of block_size={block_size}, got {value!r}")
        if not min_prompt <= max_prompt < seq_len:
            raise ValueError(f"need min_prompt <= max_prompt < seq_len, got {min_prompt}, {max_prompt}, {seq_len}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        self.backbone = Path(backbone)
        if not (self.backbone / "config.json").exists():
            raise FileNotFoundError(f"backbone checkpoint not found: {self.backbone / 'config.json'}")
        self.text = TextDataModule(source, tokenizer=tokenizer, seq_len=seq_len, block_size=block_size,
                                   batch_size=batch_size, val_fraction=val_fraction, cache_dir=cache_dir, seed=seed)
        self.seq_len, self.block_size, self.batch_size = seq_len, block_size, batch_size
        self.num_train, self.num_val = num_train, num_val
        self.min_prompt, self.max_prompt = min_prompt, max_prompt
        self.temperature, self.gen_batch_size, self.device = temperature, gen_batch_size, device
        self.num_workers, self.seed, self.cache_dir = num_workers, seed, cache_dir
        self.train_set: _DistilledRows | None = None
        self.val_set: _DistilledRows | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        return self.text.tokenizer

    def _cache_path(self, text_key: str) -> Path | None:
        if self.cache_dir is None:
            return None
        settings = {"format": _FORMAT, "text": text_key, "backbone": _files_fingerprint(self.backbone),
                    "num_train": self.num_train, "num_val": self.num_val, "min_prompt": self.min_prompt,
                    "max_prompt": self.max_prompt, "block_size": self.block_size, "temperature": self.temperature,
                    "seed": self.seed}
        return cache_file(self.cache_dir, "distilled", settings)

    def _draw(self, data: torch.Tensor, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        if data.shape[0] == 0:
            raise ValueError("no packed rows to take prompts from")
        take = torch.randperm(data.shape[0], generator=gen)[:n]
        if take.numel() < n:  # a small corpus: reuse rows (their prompt lengths still differ)
            take = take.repeat((n + take.numel() - 1) // take.numel())[:n]
        S = self.block_size
        p = torch.randint(self.min_prompt // S, self.max_prompt // S + 1, (n,), generator=gen) * S
        return data[take], p

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        self.text.setup()
        cache = self._cache_path(str(self.text._cache_path() or self.text.source))
        if cache is not None and cache.is_file():
            d = load_cache(cache)
        else:
            d = self._build()
            if cache is not None:
                save_cache(cache, d)
        self.train_set = _DistilledRows(d["train"], d["train_prompt"])
        self.val_set = _DistilledRows(d["val"], d["val_prompt"])

    def _build(self) -> dict[str, torch.Tensor]:
        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        context = ContextTower.from_pretrained(self.backbone, device=device).eval()
        gen = torch.Generator().manual_seed(self.seed)
        pad = self.tokenizer.pad_token_id
        out = {}
        for split, data, n in [("train", self.text.train_data, self.num_train), ("val", self.text.val_data, self.num_val)]:
            real, p = self._draw(data, n, gen)
            out[split] = distill_rows(context, real, p, pad_token_id=pad, batch_size=self.gen_batch_size,
                                      temperature=self.temperature, desc=f"distilling {split} rows")
            out[f"{split}_prompt"] = p
        return out

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True,
                          generator=torch.Generator().manual_seed(self.seed), num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)
