"""Self-distillation data: real-text prompts followed by the frozen AR model's own continuation.

A denoiser fine-tuned on raw text learns to predict *text*, whose next 16 tokens are genuinely
uncertain, so at a confidence threshold of 0.8 it commits about one token per step. What the
two-tower model is asked to reproduce at inference is the AR model's *greedy* continuation, and
that is a deterministic function of the context: a denoiser trained on it faces no irreducible
entropy, becomes confident, and commits many tokens per step while staying close to AR quality.

`DistilledDataModule` builds such rows on demand, a shard of `shard_rows` rows at a time when a
batch first needs one (with a progress bar), and caches each shard, so that training starts after
one shard instead of after the whole set (16,000 rows of recipes/denoiser.yaml took hours on CPU):

    row       = real[:p] + greedy_AR(real[:p], seq_len - p)
    loss_mask = positions >= p           (only the AR-written part is a training target)

p is a multiple of block_size drawn per row from [min_prompt, max_prompt], so the first
training block starts exactly where generation starts: right after a real prompt.
Batches are dicts {"input_ids": (B, L) long, "loss_mask": (B, L) bool, "index": (B,)}; `DenoiserFineTuning`
accepts them as well as plain (B, L) tensors. `distill_rows` is the generation step on its own.

Cache layout, keyed by every setting and the backbone files' content (`cache.cache_file`):

    distilled-<key>.pt             a finished cache of the earlier format (all rows in one file);
                                   still found and used whole
    distilled-<key>-s<R>/<split>-<k>.pt   shard k of a split: rows [kR, (k+1)R) (the same rows, in the
                                   same order, as the one-file cache would hold)

The training order is shard-major (`distributed.EpochShuffle(shard_rows=R)`): shards in a random
order, rows shuffled within each, so a run touches one shard at a time. Distillation runs in the
process that loads the batch: keep num_workers=0 (each worker would distil on its own), and note
that data-parallel ranks each distil the shard they share (they write the same file atomically).
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from twotower.distributed import EpochShuffle
from twotower.decoding import Autoregressive, Towers
from twotower.hub import resolve_model
from twotower.prompting import encode_prompt
from twotower.tokenizers import Tokenizer, find_tokenizer
from twotower.towers.base import ContextTowerBase

from .cache import files_fingerprint, cache_file, load_cache, save_cache
from .instructions import write_instructions
from .packing import check_seq_len
from .sampling import ResumableLoader
from .sources import STDLIB
from .text import TextDataModule
from ..hardware import fast_dtype_name
from ..validation import FLOAT_DTYPES, check_float, check_int, device_of, parse_dtype

# Bump when the cached distilled layout changes, so that stale caches are not reused.
_FORMAT = 1
GEN_DTYPES = {name: FLOAT_DTYPES[name] for name in ("float32", "bfloat16")}  # generation (and mining) dtypes

# Instructions wrapped around a real snippet to make a chat prompt (`DistilledDataModule(chat_fraction=...)`):
# the backbone answers them itself, so the denoiser learns its assistant turns, not just plain text.
CHAT_TEMPLATES = (
    "Explain what the following text says, briefly:\n\n{snippet}",
    "Continue this text:\n\n{snippet}",
    "Summarize this in two sentences:\n\n{snippet}",
    "What is the main idea of the following?\n\n{snippet}",
    "Rewrite this more simply:\n\n{snippet}",
    "Write a short note about this:\n\n{snippet}",
)


class _DistilledRows(Dataset):
    """Distilled rows, made a shard at a time on first use; items are
    {"input_ids": (L,) long, "loss_mask": (L,) bool, "index": i}.

    real (N, L): the real rows the prompts come from; prompt_len (N,); folder: where shard files
    live (None: not cached); done: all N rows already distilled.
    distil(real, p, desc, own, start) -> {"rows": (n, L), "prompt_len": (n,)} makes the rows of one
    shard (start: offset + its first row's index, which seeds what it samples; own: its rows whose
    prompts the backbone writes, or None). offset: this split's place among all splits' rows, so
    that two splits' shards never draw the same samples.
    A shard's prompt lengths are stored with it, so prompts only known once written keep their length.
    `distilled_rows` counts the rows this object generated (the rest came from the cache).
    """

    def __init__(self, real: torch.Tensor, prompt_len: torch.Tensor, *, shard_rows: int, split: str,
                 distil=None, folder: Path | None = None, done: torch.Tensor | None = None,
                 stop_at: torch.Tensor | None = None, eos_id: int | None = None, own: torch.Tensor | None = None,
                 offset: int = 0) -> None:
        self.real, self.prompt_len, self.shard_rows, self.split = real, prompt_len.clone(), shard_rows, split
        self.own, self.offset = own, offset
        # stop_at (N,) bool: rows whose targets end at the first EOS of the continuation (chat answers:
        # what follows an answer's end is never generated at inference).
        self.stop_at, self.eos_id = stop_at, eos_id
        self.distil, self.folder = distil, folder
        self._shards: dict[int, torch.Tensor] = {}
        if done is not None:
            self._shards = {k: done[k * shard_rows:(k + 1) * shard_rows] for k in range(self.num_shards)}
        self._pos = torch.arange(real.shape[1])
        self.distilled_rows = 0

    @property
    def num_shards(self) -> int:
        return (self.real.shape[0] + self.shard_rows - 1) // self.shard_rows

    def shard(self, k: int) -> torch.Tensor:
        """Rows of shard k: from memory, the cache folder, or distilled now (then cached)."""
        if k not in self._shards:
            path = None if self.folder is None else self.folder / f"{self.split}-{k:05d}.pt"
            lo, hi = k * self.shard_rows, min((k + 1) * self.shard_rows, self.real.shape[0])
            if path is not None and path.is_file():
                made = load_cache(path)  # made by an earlier run or another rank
            else:
                own = None if self.own is None else self.own[lo:hi]
                made = self.distil(self.real[lo:hi], self.prompt_len[lo:hi],
                                   f"distilling {self.split} shard {k + 1}/{self.num_shards}", own, self.offset + lo)
                self.distilled_rows += hi - lo
                if path is not None:
                    save_cache(path, made)
            if "prompt_len" in made:  # shards cached before prompt lengths were stored keep the drawn ones
                self.prompt_len[lo:hi] = made["prompt_len"]
            self._shards[k] = made["rows"]
        return self._shards[k]

    @property
    def rows(self) -> torch.Tensor:
        """Every row (N, L), distilling whatever shard is still missing."""
        return torch.cat([self.shard(k) for k in range(self.num_shards)])

    def __len__(self) -> int:
        return self.real.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        # A shard is distilled when its first row is asked for: training starts before all are made.
        row = self.shard(i // self.shard_rows)[i % self.shard_rows]
        mask = self._pos >= self.prompt_len[i]  # read after shard(): a written prompt's length comes with it
        if self.stop_at is not None and bool(self.stop_at[i]):
            # The EOS itself stays a target (the model must learn to end), everything after it does not.
            ends = ((row == self.eos_id) & mask).nonzero()
            if len(ends):
                mask &= self._pos <= int(ends[0])
        return {"input_ids": row.long(), "loss_mask": mask, "index": i}


def distill_rows(context: ContextTowerBase, real: torch.Tensor, prompt_len: torch.Tensor, *, pad_token_id: int,
                 batch_size: int = 128, temperature: float = 0.0, generator: torch.Generator | None = None,
                 progress: bool = True, desc: str = "distilling") -> torch.Tensor:
    """Replace real[i, prompt_len[i]:] with the context tower's continuation of real[i, :prompt_len[i]].

    Rows are sorted by prompt length and generated `batch_size` at a time on the context tower's
    device, EOS ignored (a fixed-length continuation): each batch's prompts are left-padded to its
    longest and it runs Lr - (its shortest prompt) steps, each row keeping the first Lr - p tokens.
    A row's greedy continuation does not depend on its batch (padding is masked out exactly), so one
    batched loop per batch replaces one loop per prompt length. Returns a new (N, L) tensor.
    """
    if real.ndim != 2 or prompt_len.shape != real.shape[:1]:
        raise ValueError(f"real must be (N, L) and prompt_len (N,), got {tuple(real.shape)} and {tuple(prompt_len.shape)}")
    N, Lr = real.shape
    if N and (int(prompt_len.min()) < 1 or int(prompt_len.max()) >= Lr):
        raise ValueError(f"prompt lengths must lie in [1, {Lr - 1}]")
    device = device_of(context)
    out = real.clone()
    # Sorted by prompt length: a batch's prompts are close in length, so little padding and few
    # wasted steps (each batch runs until its shortest prompt's row is full).
    order = sorted(range(N), key=lambda i: int(prompt_len[i]))
    batches = [torch.tensor(order[i:i + batch_size], dtype=torch.long) for i in range(0, N, batch_size)]
    bar = _progress(int((Lr - prompt_len).sum()), desc) if progress else None
    decoder, towers = Autoregressive(temperature), Towers(context, pad_token_id=pad_token_id)
    with torch.inference_mode():
        for idx in batches:
            lens = prompt_len[idx]
            lo, hi = int(lens.min()), int(lens.max())
            ids = torch.full((idx.numel(), hi), pad_token_id, dtype=real.dtype)
            mask = torch.zeros(idx.numel(), hi, dtype=torch.long)
            for r, (i, p) in enumerate(zip(idx.tolist(), lens.tolist())):
                ids[r, hi - p:] = real[i, :p]
                mask[r, hi - p:] = 1
            # No mask when every prompt has one length: the towers' unpadded fast path.
            res = decoder.generate(towers, ids.to(device), None if lo == hi else mask.to(device),
                                   max_new_tokens=Lr - lo, generator=generator)
            new = res.new_tokens.to(out.device, out.dtype)
            for r, (i, p) in enumerate(zip(idx.tolist(), lens.tolist())):
                out[i, p:] = new[r, : Lr - p]
            if bar is not None:
                bar.update(int((Lr - lens).sum()))
    if bar is not None:
        bar.close()
    return out


def _progress(total: int, desc: str):
    return tqdm(total=total, desc=desc, unit="tok", unit_scale=True, file=sys.stderr, disable=None)


def resolve_gen_dtype(name: str, value, device: str) -> str:
    """A generation dtype's name, checked: one of GEN_DTYPES, or "auto" resolved for `device` (bfloat16
    where it has a fast path, else float32), so that caches and rows are keyed by the dtype used."""
    if value == "auto":
        return fast_dtype_name(generation_device(device))
    try:
        parse_dtype(name, value, GEN_DTYPES)
    except ValueError as e:
        raise ValueError(f"{e}, or 'auto' (bfloat16 where it has a fast path, else float32)") from None
    return value


def generation_device(device: str) -> str:
    """`device` with "auto" resolved: this rank's CUDA device if there is one, else the CPU."""
    if device != "auto":
        return device
    return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"


class DistilledDataModule(L.LightningDataModule):
    """Rows of real prompt + the frozen AR backbone's continuation, for denoiser fine-tuning.

    Args:
        backbone: the AR checkpoint directory or built-in name (the same one `DenoiserFineTuning` freezes).
        source, tokenizer, seq_len, block_size, val_fraction, cache_dir: as `TextDataModule`
            (its packed rows supply the real prompts; train and held-out prompts stay apart);
            tokenizer None: the backbone's own (`tokenizers.find_tokenizer`), else the byte tokenizer.
        num_train / num_val: rows to distil (a seeded random subset of the packed rows).
        min_prompt / max_prompt: prompt length range, in tokens; multiples of block_size.
        temperature: 0 distils the greedy continuation (what generation reproduces at temperature 0).
        gen_batch_size: rows per generation batch. device: where to generate ("auto": this rank's CUDA
            device if there is one). gen_dtype: the backbone's dtype while generating ("float32";
            "bfloat16": several times faster on CPUs with bf16 matrix units, but its greedy choices can
            differ from float32's where two tokens nearly tie, and tens of times slower on a CPU without
            a oneDNN bf16 path; "auto": bfloat16 where it has a fast path, else float32, resolved here,
            so the cache key and the rows are those of the dtype it picked).
        chat_fraction: this fraction of rows are chat prompts instead of text windows: one of
            `CHAT_TEMPLATES` around the row's first `chat_snippet` tokens, through the tokenizer's chat
            template, answered by the backbone (loss on the answer only). Needs a chat template.
        self_instruct: this fraction of the chat rows ask what the backbone itself writes as a user
            (`instructions.write_instructions`, sampled when their shard is made; a row whose message
            never ended, or whose prompt would leave no block to answer in, keeps its snippet prompt).
        shard_rows: rows distilled (and cached) together when a batch first needs one of them; a
            multiple of batch_size keeps batches within a shard. Smaller: an earlier first step;
            larger: fewer, better-filled generation batches.
        batch_size, num_workers, seed: loaders and the subset / prompt-length draw.
        cache_dir: distilled rows are cached there as `distilled-<hash>.pt`, keyed by every setting
            above and the backbone files' content; None regenerates on every setup.
    """

    def __init__(self, backbone: str, source: str = STDLIB, tokenizer: Tokenizer | None = None, seq_len: int = 256,
                 block_size: int = 16, batch_size: int = 16, num_train: int = 4096, num_val: int = 128,
                 min_prompt: int = 16, max_prompt: int = 128, temperature: float = 0.0, gen_batch_size: int = 128,
                 val_fraction: float = 0.02, device: str = "auto", num_workers: int = 0, seed: int = 0,
                 cache_dir: str | None = None, shard_rows: int = 32, chat_fraction: float = 0.0,
                 chat_snippet: int = 48, gen_dtype: str = "float32", self_instruct: float = 0.0) -> None:
        super().__init__()
        check_seq_len(seq_len, block_size)
        for name, value in [("num_train", num_train), ("num_val", num_val), ("batch_size", batch_size),
                            ("gen_batch_size", gen_batch_size), ("shard_rows", shard_rows)]:
            check_int(name, value)
        for name, value in [("min_prompt", min_prompt), ("max_prompt", max_prompt)]:
            if not isinstance(value, int) or value < block_size or value % block_size:
                raise ValueError(f"{name} must be a positive multiple of block_size={block_size}, got {value!r}")
        if not min_prompt <= max_prompt < seq_len:
            raise ValueError(f"need min_prompt <= max_prompt < seq_len, got {min_prompt}, {max_prompt}, {seq_len}")
        check_float("temperature", temperature, low=0.0)
        check_float("chat_fraction", chat_fraction, low=0.0, high=1.0)
        check_float("self_instruct", self_instruct, low=0.0, high=1.0)
        if self_instruct and not chat_fraction:
            raise ValueError(f"self_instruct={self_instruct} is a fraction of the chat rows, and chat_fraction is 0: "
                             "set chat_fraction > 0 too")
        gen_dtype = resolve_gen_dtype("gen_dtype", gen_dtype, device)
        self.backbone = resolve_model(backbone, kind="backbone checkpoint")
        if not (self.backbone / "config.json").exists():
            raise FileNotFoundError(f"backbone checkpoint not found: {self.backbone / 'config.json'}")
        if tokenizer is None:  # the backbone's own (HF files or "byte" in its config.json), as generation uses
            tokenizer = find_tokenizer(self.backbone)
        self.text = TextDataModule(source, tokenizer=tokenizer, seq_len=seq_len, block_size=block_size,
                                   batch_size=batch_size, val_fraction=val_fraction, cache_dir=cache_dir, seed=seed)
        self.seq_len, self.block_size, self.batch_size = seq_len, block_size, batch_size
        self.num_train, self.num_val = num_train, num_val
        self.min_prompt, self.max_prompt = min_prompt, max_prompt
        self.temperature, self.gen_batch_size, self.device = temperature, gen_batch_size, device
        self.num_workers, self.seed, self.cache_dir, self.shard_rows = num_workers, seed, cache_dir, shard_rows
        self.chat_fraction, self.chat_snippet, self.gen_dtype = chat_fraction, chat_snippet, gen_dtype
        self.self_instruct = self_instruct
        self._context: ContextTowerBase | None = None
        self.train_set: _DistilledRows | None = None
        self.val_set: _DistilledRows | None = None

    @property
    def tokenizer(self) -> Tokenizer:
        return self.text.tokenizer

    def _cache_path(self, text_key: str) -> Path | None:
        if self.cache_dir is None:
            return None
        settings = {"format": _FORMAT, "text": text_key, "backbone": files_fingerprint(self.backbone),
                    "num_train": self.num_train, "num_val": self.num_val, "min_prompt": self.min_prompt,
                    "max_prompt": self.max_prompt, "block_size": self.block_size, "temperature": self.temperature,
                    "seed": self.seed}
        if self.chat_fraction or self.gen_dtype != "float32":  # absent otherwise: earlier caches keep their keys
            settings.update(chat_fraction=self.chat_fraction, chat_snippet=self.chat_snippet, gen_dtype=self.gen_dtype)
        if self.self_instruct:  # absent otherwise, as above
            settings.update(self_instruct=self.self_instruct)
        return cache_file(self.cache_dir, "distilled", settings)

    def _draw(self, data: torch.Tensor, n: int, gen: torch.Generator
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(real rows, prompt lengths, chat rows, own rows): own (or None) marks the chat rows whose
        prompt the backbone writes when their shard is made; they hold a snippet prompt until then."""
        if data.shape[0] == 0:
            raise ValueError("no packed rows to take prompts from")
        take = torch.randperm(data.shape[0], generator=gen)[:n]
        if take.numel() < n:  # a small corpus: reuse rows (their prompt lengths still differ)
            take = take.repeat((n + take.numel() - 1) // take.numel())[:n]
        S = self.block_size
        p = torch.randint(self.min_prompt // S, self.max_prompt // S + 1, (n,), generator=gen) * S
        real = data[take].clone()
        # Drawn only when asked for: with chat_fraction=0 the generator runs as before chat prompts
        # existed, so the val split's prompts (drawn after train's) match the caches of that rule,
        # whose keys chat_fraction=0 leaves unchanged.
        if self.chat_fraction > 0:
            chat = torch.rand(n, generator=gen) < self.chat_fraction
        else:
            chat = torch.zeros(n, dtype=torch.bool)
        for i in chat.nonzero().flatten().tolist():
            prompt = self._chat_prompt(real[i], int(torch.randint(len(CHAT_TEMPLATES), (), generator=gen)))
            real[i, :len(prompt)] = torch.tensor(prompt, dtype=real.dtype)
            p[i] = len(prompt)
        # Drawn after the rest (and only when asked for), so that the draws above stay as they were.
        own = chat & (torch.rand(n, generator=gen) < self.self_instruct) if self.self_instruct else None
        return real, p, chat, own

    def _chat_prompt(self, row: torch.Tensor, template: int) -> list[int]:
        """A chat prompt (the tokenizer's chat template, generation prompt added) asking about the
        row's first `chat_snippet` tokens. Its length is not a multiple of the block size: training
        blocks then also start mid-answer, as they do at inference after the first block."""
        hf = getattr(self.tokenizer, "hf", None)
        if hf is None or not getattr(hf, "chat_template", None):
            raise ValueError(f"chat_fraction={self.chat_fraction} needs a tokenizer with a chat template; "
                             f"{self.tokenizer!r} has none (set chat_fraction: 0)")
        snippet = self.tokenizer.decode(row[:self.chat_snippet].tolist()).strip()
        messages = [{"role": "user", "content": CHAT_TEMPLATES[template].format(snippet=snippet)}]
        ids = encode_prompt(self.tokenizer, messages)  # as predict and serve encode a chat request
        if len(ids) > self.seq_len - self.block_size:
            raise ValueError(f"a chat prompt of {len(ids)} tokens leaves less than one block of seq_len="
                             f"{self.seq_len}; lower chat_snippet ({self.chat_snippet}) or raise seq_len")
        return ids

    def setup(self, stage: str | None = None) -> None:
        """Draw the prompts (cheap) and find what the cache already holds; distil nothing yet."""
        if self.train_set is not None:
            return
        self.text.setup()
        cache = self._cache_path(str(self.text._cache_path() or self.text.source))
        whole = load_cache(cache) if cache is not None and cache.is_file() else {}  # the one-file format
        folder = None if cache is None else cache.with_name(f"{cache.stem}-s{self.shard_rows}")
        gen = torch.Generator().manual_seed(self.seed)
        sets = {}
        splits = [("train", self.text.train_data, self.num_train, 0), ("val", self.text.val_data, self.num_val, self.num_train)]
        for split, data, n, offset in splits:
            real, p, chat, own = self._draw(data, n, gen)
            if split in whole:
                p = whole[f"{split}_prompt"]
            sets[split] = _DistilledRows(real, p, shard_rows=self.shard_rows, split=split, distil=self._distil,
                                         folder=folder, done=whole.get(split), stop_at=chat,
                                         eos_id=self.tokenizer.eos_token_id, own=own, offset=offset)
        self.train_set, self.val_set = sets["train"], sets["val"]

    def _distil(self, real: torch.Tensor, p: torch.Tensor, desc: str, own: torch.Tensor | None = None,
                start: int = 0) -> dict[str, torch.Tensor]:
        if self._context is None:
            device = generation_device(self.device)
            # Any registered family: the backbone's config.json names it.
            self._context = ContextTowerBase.from_pretrained(self.backbone, device=device,
                                                             dtype=GEN_DTYPES[self.gen_dtype]).eval()
        # Seeded per shard: a shard's rows do not depend on which shards were made before it.
        gen = torch.Generator(device=device_of(self._context)).manual_seed(self.seed + int(p.sum()))
        if own is not None and own.any():
            real, p = self._own_prompts(real, p, own, start)
        rows = distill_rows(self._context, real, p, pad_token_id=self.tokenizer.pad_token_id,
                            batch_size=self.gen_batch_size, temperature=self.temperature, desc=desc,
                            generator=gen if self.temperature > 0 else None)
        return {"rows": rows, "prompt_len": p}

    def _own_prompts(self, real: torch.Tensor, p: torch.Tensor, own: torch.Tensor, start: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """real and p with the `own` rows' prompts replaced by a message the backbone writes."""
        # Seeded by the shard's first row (val's counted after train's): a shard's messages do not depend on
        # which shards came before, and val never repeats a train shard's messages.
        gen = torch.Generator(device=device_of(self._context)).manual_seed(self.seed * 1_000_003 + start)
        rows = own.nonzero().flatten().tolist()
        texts = write_instructions(self._context, self.tokenizer, len(rows), batch_size=self.gen_batch_size,
                                   generator=gen)
        real, p = real.clone(), p.clone()
        for i, text in zip(rows, texts):
            ids = None if text is None else encode_prompt(self.tokenizer, [{"role": "user", "content": text}])
            if ids is not None and len(ids) <= self.seq_len - self.block_size:  # else the snippet prompt stays
                real[i, :len(ids)] = torch.tensor(ids, dtype=real.dtype)
                p[i] = len(ids)
        return real, p

    def train_dataloader(self) -> DataLoader:
        self.setup()
        sampler = EpochShuffle(len(self.train_set), seed=self.seed, shard_rows=self.shard_rows)
        # Resumable: a fit restarted from a checkpoint continues the same data order (`sampling.py`).
        return ResumableLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False, num_workers=self.num_workers)
