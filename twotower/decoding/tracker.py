"""Per-row bookkeeping shared by every decoding loop, and the `GenerationOutput` it produces.

A loop hands each step's (or block's) new tokens to `RowTracker.commit`; the tracker owns the
output buffer, the per-row counts (tokens, network forwards), EOS handling, finish times, and
says which rows have finished, so that loops can drop them from their working batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["GenerationOutput", "RowTracker"]


@dataclass
class GenerationOutput:
    """What a decoder returns. All tensors live on the context tower's device.

    Attributes:
        sequences: (B, T + N) long: the input ids as given (left padding included) followed by
            the N generated positions; after a row's EOS (and beyond its last token) the pad id.
            N is the longest row's `num_generated`.
        new_tokens: (B, N) long, the generated part of `sequences`.
        num_generated: (B,) long, tokens generated per row, up to and including its EOS.
        nfe: (B,) long, network forward passes a row took part in while it still needed them
            (denoiser forwards for the two-tower decoders, context forwards for AR).
        tokens_per_nfe: (B,) float32, num_generated / nfe.
        seconds: (B,) float64, wall time from the call's start until the row finished.
        blocks: blocks denoised (diffusion), iterations (speculative); 0 for one-token decoders.
        total_seconds: wall time of the whole call.
    """

    sequences: Tensor
    new_tokens: Tensor
    num_generated: Tensor
    nfe: Tensor
    tokens_per_nfe: Tensor
    seconds: Tensor
    blocks: int = 0
    total_seconds: float = 0.0


class RowTracker:
    """Output buffer and per-row state for a batch of B rows generating up to `max_new_tokens`.

    Args:
        spare: extra columns past max_new_tokens where tokens a row cannot keep are written (so a
            commit is one scatter, with no per-row branching); at least the largest block.
        eos: (k,) long EOS ids on `device`, or None (rows then only stop at max_new_tokens).
        start: `time.perf_counter()` at the call's start.
        stop: a stop criterion (`decoding.stopping.StopCriterion`), asked after each commit about
            the rows still running; a row it flags finishes there.
    """

    def __init__(self, batch: int, max_new_tokens: int, *, spare: int, pad_token_id: int, eos: Tensor | None,
                 device, start: float, stop=None):
        self.max_new_tokens, self.pad_token_id = max_new_tokens, pad_token_id
        self.tokens = torch.full((batch, max_new_tokens + spare), pad_token_id, dtype=torch.long, device=device)
        self.num_generated = torch.zeros(batch, dtype=torch.long, device=device)
        self.nfe = torch.zeros(batch, dtype=torch.long, device=device)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        # NaN = still running: the first commit that finishes a row writes its time, later ones keep it.
        self.seconds = torch.full((batch,), float("nan"), dtype=torch.float64)  # host
        self.eos, self.start, self.stop = eos, start, stop
        self._uniform = 0  # while every row has advanced alike with no EOS id: positions written

    @property
    def can_finish_early(self) -> bool:
        """Whether a row can finish before max_new_tokens (an EOS id or a stop criterion is set):
        loops then pass their working rows to `commit` and drop the rows that finish."""
        return self.eos is not None or self.stop is not None

    def ensure_spare(self, width: int) -> None:
        """Room for a commit `width` positions wide (a decoder may commit wider blocks than its spare)."""
        spare = self.tokens.shape[1] - self.max_new_tokens
        if width > spare:
            more = torch.full((self.tokens.shape[0], width - spare), self.pad_token_id, dtype=torch.long,
                              device=self.tokens.device)
            self.tokens = torch.cat([self.tokens, more], dim=1)

    def count_forward(self, rows: Tensor | None, took_part: Tensor | None = None) -> None:
        """One network forward for the working rows `rows` (R,) (None = all); `took_part` (R,)
        bool limits it to the rows that still needed it."""
        add = torch.ones(self.nfe.shape[0] if rows is None else rows.shape[0], dtype=torch.long,
                         device=self.nfe.device) if took_part is None else took_part.long().to(self.nfe.device)
        if rows is None:
            self.nfe += add
        else:
            self.nfe.index_add_(0, rows, add)

    def commit(self, block: Tensor, count: Tensor | None = None, rows: Tensor | None = None) -> Tensor | None:
        """Record new tokens; returns which working rows have finished, as an (R,) bool host tensor.

        Loops call it with `rows` whenever `can_finish_early`, and drop the rows it reports done.

        block (R, n): the working rows' new tokens; row r keeps its first count[r] (default n).
        rows (R,): the tracker rows the working batch holds (default: all B, in order).

        A row finishes at its first EOS or once it holds max_new_tokens; tokens past either are
        dropped (and, with a stop criterion, at the commit where it fires). With no EOS id or stop
        criterion, every row given and no count, nothing needs reading from the
        device: the tokens are written as a slice and None is returned (all rows advance alike,
        so the caller knows from its own step count when they are done). Otherwise one host sync.
        """
        n = block.shape[1]
        if not self.can_finish_early and count is None and rows is None and self._uniform is not None:
            self.tokens[:, self._uniform: self._uniform + n] = block
            self._uniform += n
            self.num_generated += n
            return None
        # Once any row advances on its own, positions differ per row: the slice fast path is off for good.
        self._uniform = None
        j = torch.arange(n, device=block.device)
        finished = self.finished if rows is None else self.finished[rows]
        have = self.num_generated if rows is None else self.num_generated[rows]
        if count is None:
            count = torch.full_like(have, n)
        # A finished row keeps nothing more; the others keep at most what their cap leaves.
        count = torch.where(finished, 0, count.minimum(self.max_new_tokens - have))
        if self.eos is not None:
            is_eos = torch.isin(block, self.eos) & (j < count[:, None])
            hit = is_eos.any(-1)
            # argmax of a bool row is its first True: the first EOS, which is kept (+ 1) and ends the row.
            count = torch.where(hit, is_eos.long().argmax(-1) + 1, count)
            finished = finished | hit
        pos = torch.where(j < count[:, None], have[:, None] + j, self.max_new_tokens + j)  # dropped: spare columns
        have = have + count
        finished = finished | (have >= self.max_new_tokens)
        if rows is None:
            self.tokens.scatter_(1, pos, block)
            self.num_generated, self.finished = have, finished
        else:
            # Advanced indexing reads a copy: scatter into it, then write the rows back.
            self.tokens[rows] = self.tokens[rows].scatter_(1, pos, block)
            self.num_generated[rows] = have
            self.finished[rows] = finished
        # The one host sync of a commit: loops drop finished rows, so they must know which on the host.
        done = finished.cpu()
        all_rows = torch.arange(done.shape[0]) if rows is None else rows.cpu()
        if self.stop is not None and not bool(done.all()):
            running = (~done).nonzero().squeeze(1)  # working-batch positions still running
            live = all_rows[running]
            on_device = live.to(self.tokens.device)
            hit = self.stop(self.tokens[on_device].cpu(), self.num_generated[on_device].cpu())
            if bool(hit.any()):
                done = done.clone()  # on CPU, .cpu() returned the tracker's own tensor
                done[running[hit]] = True
                self.finished[live[hit].to(self.finished.device)] = True
        now = time.perf_counter()
        newly = all_rows[done]
        self.seconds[newly] = torch.where(self.seconds[newly].isnan(), now - self.start, self.seconds[newly])
        return done

    def output(self, input_ids: Tensor, blocks: int) -> GenerationOutput:
        """The result, on `input_ids`' device (reading the counts also waits for queued device work)."""
        # new_tokens is as wide as the longest row; shorter rows are padded with pad_token_id.
        n = int(self.num_generated.max())
        total = time.perf_counter() - self.start
        self.seconds[self.seconds.isnan()] = total
        device = input_ids.device
        new = self.tokens[:, :n].to(device)
        num = self.num_generated.to(device)
        nfe = self.nfe.to(device)
        return GenerationOutput(
            sequences=torch.cat([input_ids, new], dim=1),
            new_tokens=new,
            num_generated=num,
            nfe=nfe,
            tokens_per_nfe=num.float() / nfe.clamp(min=1).float(),
            seconds=self.seconds.to(device),
            blocks=blocks,
            total_seconds=total,
        )
