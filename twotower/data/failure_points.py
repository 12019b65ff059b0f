"""Training blocks that start where a speculative draft starts: after the current denoiser's failures.

In speculative decoding (`twotower.decoding.Speculative`) an iteration's block starts right after the
previous draft's accepted prefix and the context tower's correction token, i.e. where the denoiser
itself just failed. `DistilledDataModule`'s blocks start at multiples of the block size after the
prompt, anywhere in the text. On the embedded default, drafts over the clean AR prefix keep 5.39
tokens an iteration, iterations that start after a rejected draft 4.71 (README, "Results"): the
loop starts its blocks on harder text than training does. Issue 23, lever 1(c): train on those starts.

`mine_draft_starts` runs the real draft-and-verify loop of a two-tower model over distilled rows
(prompt = the row's real prompt, greedy, as many new tokens as the row holds) and marks the position
where each iteration starts. The loop's output is the AR model's greedy continuation, which is what
the distilled row holds; where float rounding makes the two part, the row counts only up to there.

`FailurePointDataModule` trains on those starts. Training blocks sit at multiples of S (S = block
size) of a row, so a start s with r = s mod S becomes block-aligned by dropping the row's first r
tokens (all from its real prompt, which is itself a window cut from running text): example =
row[r:], right-padded, with the loss only on the blocks that start at mined starts of residue r.
Their targets are the AR model's continuation of the *whole* prompt; a block keeps them only up to
the first one the AR model, reading the shortened row, would not choose itself (one context forward
per example checks it), so no target is one the context tower would not produce there.

Examples are cached like the distilled rows (`failure-<key>.pt`, keyed by the distilled rows' key,
the drafter's files and the mining settings). A progress bar shows the mining.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from twotower.decoding import Speculative
from twotower.distributed import EpochShuffle
from twotower.hub import resolve_model
from twotower.model import TwoTowerLM

from .cache import cache_file, files_fingerprint, load_cache, save_cache
from .distill import GEN_DTYPES, DistilledDataModule, resolve_gen_dtype
from .sampling import ResumableLoader
from ..validation import check_int, device_of

# Bump when the cached example layout or the mining rule changes.
_FORMAT = 1


class _StartRecorder(Speculative):
    """`Speculative` that notes, before each draft, where every running row's iteration starts.

    starts (B, L) bool, indexed by the generate call's rows; offset (B,): a row's prompt length, so
    that a start is prompt length + tokens generated so far (the position of the draft's first token,
    the context tower's own)."""

    def __init__(self, starts: Tensor, offset: Tensor, **kwargs) -> None:
        super().__init__(**kwargs)
        self.starts, self.offset = starts, offset

    def draft(self, state):
        rows = state.rows
        index = torch.arange(len(rows)) if rows.index is None else rows.index.cpu()
        pos = self.offset[index] + rows.tracker.num_generated[index].cpu()
        inside = pos < self.starts.shape[1]
        self.starts[index[inside], pos[inside]] = True
        return super().draft(state)


def mine_draft_starts(model, rows: Tensor, prompt_len: Tensor, *, batch_size: int = 64,
                      progress: bool = True) -> tuple[Tensor, Tensor]:
    """(starts, valid): where each speculative iteration of `model` starts on each row.

    rows (N, L) distilled rows (prompt + the AR model's greedy continuation), prompt_len (N,).
    starts (N, L) bool marks the first position of every iteration's block (the context tower's own
    token, then the draft), the first at the prompt's end. valid (N,) long: the loop's output equals the
    row before this position (L where it equals it throughout); starts at or past it are left out.
    Rows of one prompt length run together (no padding), `batch_size` at a time, greedy, EOS ignored.
    """
    if rows.ndim != 2 or prompt_len.shape != rows.shape[:1]:
        raise ValueError(f"rows must be (N, L) and prompt_len (N,), got {tuple(rows.shape)} and {tuple(prompt_len.shape)}")
    N, L = rows.shape
    if N and (int(prompt_len.min()) < 1 or int(prompt_len.max()) >= L):
        raise ValueError(f"prompt lengths must lie in [1, {L - 1}], got {int(prompt_len.min())}..{int(prompt_len.max())}")
    starts = torch.zeros(N, L, dtype=torch.bool)
    valid = torch.full((N,), L, dtype=torch.long)
    groups = []
    for p in sorted(set(prompt_len.tolist())):
        idx = (prompt_len == p).nonzero().squeeze(1)
        groups += [idx[i:i + batch_size] for i in range(0, idx.numel(), batch_size)]
    bar = tqdm(total=N, desc="mining draft starts", unit="row", file=sys.stderr, disable=not progress)
    device = device_of(model.context)
    with torch.inference_mode():
        for idx in groups:
            p = int(prompt_len[idx[0]])
            part = torch.zeros(idx.numel(), L, dtype=torch.bool)
            decoder = _StartRecorder(part, torch.full((idx.numel(),), p, dtype=torch.long))
            out = decoder.generate(model, rows[idx, :p].to(device), None, max_new_tokens=L - p, eos_token_id=None)
            differ = (out.new_tokens.cpu() != rows[idx, p:]).long()
            # first position where the loop's output leaves the row (L where it never does)
            first = torch.where(differ.any(1), differ.argmax(1) + p, torch.full_like(idx, L))
            part &= torch.arange(L)[None] < first[:, None]
            starts[idx], valid[idx] = part, first
            bar.update(idx.numel())
    bar.close()
    return starts, valid


def aligned_examples(rows: Tensor, loss_mask: Tensor, starts: Tensor, *, block_size: int,
                     pad_token_id: int) -> dict[str, Tensor]:
    """Examples whose blocks start at the marked starts: for each row and residue r of its starts
    (mod block_size) with a whole block inside the row, input_ids = row[r:] padded on the right, and a
    loss mask on those blocks only (and on the row's own `loss_mask`). Returns {"input_ids" (M, L),
    "loss_mask" (M, L) bool, "row" (M,), "shift" (M,)}: the source row and the r dropped from its front."""
    N, L = rows.shape
    S = block_size
    ids, masks, src, shifts = [], [], [], []
    for i in range(N):
        s = starts[i].nonzero().squeeze(1)
        s = s[s + S <= L]  # a whole block inside the row
        for r in sorted(set((s % S).tolist())):
            x = torch.full((L,), pad_token_id, dtype=rows.dtype)
            x[:L - r] = rows[i, r:]
            m = torch.zeros(L, dtype=torch.bool)
            for b in (s[s % S == r] - r).tolist():
                m[b:b + S] = True
            m[:L - r] &= loss_mask[i, r:]
            m[L - r:] = False
            ids.append(x)
            masks.append(m)
            src.append(i)
            shifts.append(r)
    if not ids:
        return {"input_ids": rows.new_zeros(0, L), "loss_mask": torch.zeros(0, L, dtype=torch.bool),
                "row": torch.zeros(0, dtype=torch.long), "shift": torch.zeros(0, dtype=torch.long)}
    return {"input_ids": torch.stack(ids), "loss_mask": torch.stack(masks), "row": torch.tensor(src),
            "shift": torch.tensor(shifts)}


def keep_ar_consistent(context, examples: dict[str, Tensor], *, block_size: int, batch_size: int = 32,
                       progress: bool = True) -> Tensor:
    """Narrow each example's loss mask to the targets the AR model itself would choose on the shortened
    row: in every block, positions from the first target that is not the context tower's argmax over
    the tokens before it (in the example) on lose their loss. Returns how many targets were dropped."""
    ids, mask = examples["input_ids"], examples["loss_mask"]
    S = block_size
    device = device_of(context)
    dropped = 0
    bar = tqdm(total=ids.shape[0], desc="checking mined targets", unit="example", file=sys.stderr,
               disable=not progress)
    with torch.inference_mode():
        for lo in range(0, ids.shape[0], batch_size):
            x, m = ids[lo:lo + batch_size], mask[lo:lo + batch_size]
            # The head only where a target follows: most positions carry none, and on a 49k vocabulary
            # the full float32 (32, 160, V) logits would be 1 GB a batch.
            need = torch.zeros_like(m)
            need[:, :-1] = m[:, 1:]  # logits at p predict p + 1
            ok = torch.ones_like(m)
            if bool(need.any()):
                logits, _ = context.forward_train(x.to(device), S, return_logits=need.to(device))
                ok[:, 1:][m[:, 1:]] = logits.argmax(-1).cpu() == x[:, 1:][m[:, 1:]]
            # a wrong target breaks the rest of its block: running AND within each block of S
            bad = (~ok & m).view(x.shape[0], -1, S).long().cumsum(-1).view_as(x) > 0
            dropped += int((m & bad).sum())
            mask[lo:lo + batch_size] = m & ~bad
            bar.update(x.shape[0])
    bar.close()
    return torch.tensor(dropped)


class _Examples(Dataset):
    """Mined examples {"input_ids", "loss_mask", "index"}, then (if given) the ordinary rows after them."""

    def __init__(self, examples: dict[str, Tensor], ordinary: Dataset | None, ordinary_rows: int) -> None:
        self.ids, self.mask = examples["input_ids"], examples["loss_mask"]
        self.ordinary, self.ordinary_rows = ordinary, ordinary_rows if ordinary is not None else 0

    def __len__(self) -> int:
        return self.ids.shape[0] + self.ordinary_rows

    def __getitem__(self, i: int) -> dict:
        M = self.ids.shape[0]
        if i < M:
            return {"input_ids": self.ids[i].long(), "loss_mask": self.mask[i], "index": i}
        item = dict(self.ordinary[i - M])
        item["index"] = i  # the noise seed follows this dataset's index, unique over both parts
        return item


class FailurePointDataModule(DistilledDataModule):
    """`DistilledDataModule` whose training blocks start where the drafter's speculative iterations start.

    The first `mine_rows` training rows are distilled as usual (and cached), then `drafter`'s real
    speculative loop runs over them (`mine_draft_starts`) and every iteration start becomes a training
    block (`aligned_examples`, targets checked by `keep_ar_consistent`). Validation rows are the
    ordinary distilled ones. Every argument of `DistilledDataModule`, and:

    Args:
        drafter: the two-tower model whose draft failures to train on: a released-layout directory or
            built-in name ("embedded", the shipped default; usually the run's `init_from`).
        mine_rows: how many training rows to mine (the first ones; at most num_train).
        mine_batch_size: rows per speculative generate call while mining.
        with_rows: also train on the mined rows themselves (their ordinary blocks after the prompt).
        mine_dtype: the drafter's dtype while mining and checking targets ("float32", "bfloat16" or "auto"; None:
            gen_dtype, the dtype the rows were written in, whose greedy choices the check then repeats).
    """

    def __init__(self, *args, drafter: str = "embedded", mine_rows: int = 512, mine_batch_size: int = 64,
                 with_rows: bool = True, mine_dtype: str | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        check_int("mine_rows", mine_rows)
        check_int("mine_batch_size", mine_batch_size)
        self.mine_dtype = resolve_gen_dtype("mine_dtype", self.gen_dtype if mine_dtype is None else mine_dtype,
                                            self.device)
        if mine_rows > self.num_train:
            raise ValueError(f"mine_rows={mine_rows} is more than num_train={self.num_train}; lower mine_rows "
                             f"or raise num_train")
        self.drafter = resolve_model(drafter, kind="drafter")
        if not (self.drafter / "config.json").exists():
            raise FileNotFoundError(f"drafter checkpoint not found: {self.drafter / 'config.json'}")
        self.mine_rows, self.mine_batch_size, self.with_rows = mine_rows, mine_batch_size, with_rows
        self.mined: _Examples | None = None
        self.mining_stats: dict[str, float] = {}

    def _mined_path(self) -> Path | None:
        base = self._cache_path(str(self.text._cache_path() or self.text.source))
        if base is None:
            return None
        return cache_file(self.cache_dir, "failure", {"format": _FORMAT, "distilled": base.stem,
                                                       "drafter": files_fingerprint(self.drafter),
                                                       "mine_rows": self.mine_rows, "shard_rows": self.shard_rows,
                                                       # absent for float32: earlier caches keep their keys
                                                       **({} if self.mine_dtype == "float32" else
                                                          {"mine_dtype": self.mine_dtype})})

    def _mine(self) -> dict[str, Tensor]:
        model = TwoTowerLM.from_pretrained(self.drafter, dtype=GEN_DTYPES[self.mine_dtype]).eval()
        n = self.mine_rows
        shards = (n + self.shard_rows - 1) // self.shard_rows
        rows = torch.cat([self.train_set.shard(k) for k in range(shards)])[:n].long()
        prompt_len = self.train_set.prompt_len[:n]
        loss_mask = torch.stack([self.train_set[i]["loss_mask"] for i in range(n)])
        starts, valid = mine_draft_starts(model, rows, prompt_len, batch_size=self.mine_batch_size)
        ex = aligned_examples(rows, loss_mask, starts, block_size=self.block_size,
                              pad_token_id=self.tokenizer.pad_token_id)
        targets = int(ex["loss_mask"].sum())
        dropped = keep_ar_consistent(model.context, ex, block_size=self.block_size)
        iters = int(starts.sum())
        ex["stats"] = torch.tensor([n, iters, float((valid - prompt_len).sum()) / max(iters, 1),
                                    float((valid < rows.shape[1]).sum()), targets, float(dropped)])
        return ex

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.mined is not None:
            return
        path = self._mined_path()
        if path is not None and path.is_file():
            ex = load_cache(path)
        else:
            ex = self._mine()
            if path is not None:
                save_cache(path, ex)
        n, iters, per_iter, parted, targets, dropped = ex["stats"].tolist()
        self.mining_stats = {"rows": n, "iterations": iters, "tokens_per_iteration": per_iter,
                             "rows_parting_from_ar": parted, "targets": targets, "targets_dropped": dropped,
                             "examples": ex["input_ids"].shape[0]}
        print(f"failure points: {self.mining_stats}", file=sys.stderr)
        ordinary = self.train_set if self.with_rows else None
        self.mined = _Examples(ex, ordinary, self.mine_rows)

    def train_dataloader(self):
        self.setup()
        # One shard: the examples are all in memory, so a plain seeded shuffle of everything.
        sampler = EpochShuffle(len(self.mined), seed=self.seed)
        return ResumableLoader(self.mined, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)
