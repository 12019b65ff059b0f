"""Step-wise decoders: one working batch that requests join and leave between iterations.

A `Stepper` holds the rows of every request that shares one decoder configuration (its `key`),
their `HybridCache` and per-row state, and advances all of them by one iteration (`step`): a block
for diffusion, a draft-and-verify round for speculative decoding, one token for AR. Between steps
the scheduler may

* `admit` requests: each prompt is prefilled on its own (as `Decoder.generate` would) and its cache
  rows are joined to the batch with `HybridCache.concat` (left padding = absent keys: exact), and
* let finished or abandoned rows leave (`cache.select`).

The loops are the library's own (`denoise_block`, `ContextTower.extend / accept`, the decoder's
`TokenChooser`), rewritten as a state machine, so that a request's greedy output equals
`decoder.generate` on that request alone. Each row keeps its own chooser and generator (`RowChoice`),
so rows with other temperatures or seeds share a forward; a seeded AR or speculative request draws
exactly as it would alone. Per-row bookkeeping (the token cap, EOS, stop strings, NFE) lives in the
request's `Job.commit` (scheduler.py) instead of a fixed-size `RowTracker`, because rows come and go.
"""

from __future__ import annotations

import abc

import torch
from torch import Tensor

from ..caches import HybridCache
from ..decoding import Autoregressive, Decoder, MaskDiffusion, Speculative, Towers, denoise_block

__all__ = ["Stepper", "ARStepper", "SpeculativeStepper", "DiffusionStepper", "RowChoice", "stepper_for"]



class RowChoice:
    """A `TokenChooser` look-alike for a working batch: row r uses jobs[r]'s chooser and generator.

    (R, ..., V) logits -> (R, ...) ids. All-greedy batches take one batched argmax (what
    `TokenChooser` does at temperature 0); otherwise each row draws from its own generator, one
    call per row per forward, as the row's decoder would alone.
    """

    def __init__(self, jobs):
        self.jobs = jobs

    def __call__(self, logits: Tensor, generator=None) -> Tensor:
        if all(j.decoder.chooser.greedy for j in self.jobs):
            return logits.argmax(-1)
        return torch.cat([j.decoder.chooser(logits[r: r + 1], j.generator) for r, j in enumerate(self.jobs)])


class _Counter:
    """What `denoise_block` needs of a RowTracker: per-row NFE counts, here kept on the jobs."""

    def __init__(self, jobs):
        self.jobs = jobs

    def count_forward(self, rows: Tensor, took_part: Tensor | None = None) -> None:
        part = [True] * len(self.jobs) if took_part is None else took_part.tolist()
        for j, p in zip(self.jobs, part):
            j.nfe += int(p)


class Stepper(abc.ABC):
    """The working batch of one decoder configuration.

    Subclasses implement `_prefill(job) -> (cache (1 row), state (1, ...))` and `_step()`, and
    keep the invariant between steps: `self.state` (R, ...) holds what each row's next iteration
    starts from and the cache holds every token the row committed that the loop has fed back.
    """

    decoder_type: type[Decoder]

    def __init__(self, towers: Towers, decoder: Decoder):
        self.towers = towers
        self.decoder = decoder  # the first member's decoder: the settings the batch shares
        self.jobs: list = []
        self.cache: HybridCache | None = None
        self.state: Tensor | None = None
        self.iterations = 0
        self._mirror: HybridCache | None = None  # the denoiser's copy of the cache (two devices)
        from ..decoding.base import denoiser_placement, device_of

        self.ctx_device = device_of(towers.context)
        self.den_device, self.use_mirror = (None, False) if towers.denoiser is None else \
            denoiser_placement(towers.denoiser, self.ctx_device, towers.denoiser_device)

    @classmethod
    def key(cls, decoder: Decoder, towers: Towers) -> tuple:
        """Requests with equal keys share forwards (temperature / top-p / seed may differ per row)."""
        return (cls.__name__,)

    def __len__(self) -> int:
        return len(self.jobs)

    # ---- membership ---------------------------------------------------------------------------
    def admit(self, jobs: list) -> None:
        """Prefill each job alone and join its row to the batch (the batch may be empty)."""
        caches, states = [] if self.cache is None else [self.cache], [] if self.state is None else [self.state]
        for job in jobs:
            cache, state = self._prefill(job)
            caches.append(cache)
            states.append(state)
            self.jobs.append(job)
        self.cache = caches[0] if len(caches) == 1 else type(caches[0]).concat(caches)
        self._mirror = None
        self.state = torch.cat(states) if states[0] is not None else None

    def leave(self) -> None:
        """Drop the rows whose job finished or was abandoned (client gone) from cache and state."""
        stay = [r for r, j in enumerate(self.jobs) if not j.over]
        if len(stay) == len(self.jobs):
            return
        self.jobs = [self.jobs[r] for r in stay]
        self._mirror = None
        if not stay:
            self.cache, self.state = None, None
            return
        idx = torch.tensor(stay, dtype=torch.long, device=self.cache.device)
        self.cache = self.cache.select(idx)
        if self.state is not None:
            self.state = self.state[idx.to(self.state.device)]

    def step(self) -> None:
        """One iteration for every row, then finished rows leave."""
        self.finish(self.draft())

    def draft(self):
        """The denoiser-side half of an iteration (reads the batch, writes nothing the context half
        reads concurrently); returns what `finish` needs. Decoders without a denoiser half return None."""
        return None

    def finish(self, drafted) -> None:
        """The context-side half: commit the drafted tokens, extend the cache; then finished rows leave.

        Splitting an iteration lets the scheduler overlap the towers across working batches when
        they live on two devices: batch B's draft runs while batch A's `finish` runs."""
        for job in self.jobs:
            job.iterations += 1
        self._step(drafted)
        self.iterations += 1
        self.leave()

    # ---- subclass hooks -----------------------------------------------------------------------
    @abc.abstractmethod
    def _prefill(self, job) -> tuple[HybridCache, Tensor | None]:
        """Run the prompt alone; return its 1-row cache and state."""

    @abc.abstractmethod
    def _step(self, drafted) -> None:
        """Advance every row by one iteration (given `draft()`'s result) and `commit` each row's new
        tokens to its job."""

    def _prompt(self, job) -> Tensor:
        return torch.tensor([job.prompt_ids], dtype=torch.long, device=self.ctx_device)

    def den_cache(self, cache: HybridCache | None = None) -> HybridCache:
        """The cache as the denoiser reads it: the context cache itself on one device; on two, a
        mirror on the denoiser's device, brought up to date incrementally (`HybridCache.mirror_to`)
        and copied afresh after the batch changed shape (admit / leave / compact) or for a sub-batch."""
        if not self.use_mirror:
            return self.cache if cache is None else cache
        if cache is not None:
            return cache.mirror_to(self.den_device)
        if self._mirror is None or self._mirror.batch_size != self.cache.batch_size \
                or self._mirror.length > self.cache.length:
            self._mirror = self.cache.mirror_to(self.den_device)
        else:
            self._mirror = self.cache.mirror_to(self.den_device, self._mirror)
        return self._mirror


class ARStepper(Stepper):
    """`Autoregressive`, one token per step. state (R, V): each row's next-token logits."""

    decoder_type = Autoregressive

    def _prefill(self, job):
        ids = self._prompt(job)
        logits, cache = self.towers.context.prefill(ids, None, logits="last", capacity=ids.shape[1] + job.max_tokens)
        job.nfe += 1
        return cache, logits[:, -1]

    def _step(self, drafted) -> None:
        token = RowChoice(self.jobs)(self.state)  # (R,)
        done = [j.commit([t]) for j, t in zip(self.jobs, token.tolist())]
        if all(done):
            return
        if any(done):  # shrink before the forward: the finished rows need no more
            keep = torch.tensor([not d for d in done], device=token.device)
            self.jobs = [j for j, d in zip(self.jobs, done) if not d]
            self.cache, token = self.cache.select(keep), token[keep]
        logits = self.towers.context.extend(self.cache, token[:, None], logits="last")
        for j in self.jobs:
            j.nfe += 1
        self.state = logits[:, -1]


class SpeculativeStepper(Stepper):
    """`Speculative`: draft a block with the denoiser, keep what the context tower agrees with.

    state (R,): each row's next token, the context tower's own choice (the draft's position 0).
    """

    decoder_type = Speculative

    @classmethod
    def key(cls, decoder, towers):
        return (cls.__name__, decoder.block_size_for(towers), decoder.draft_steps, repr(decoder.sampler),
                decoder.rule_key())

    def _prefill(self, job):
        ids = self._prompt(job)
        n = job.decoder.block_size_for(self.towers)
        logits, cache = self.towers.context.prefill(ids, None, logits="last",
                                                    capacity=ids.shape[1] + job.max_tokens + n)
        return cache, job.decoder.chooser(logits[:, -1], job.generator)

    def draft(self) -> Tensor:
        towers, n = self.towers, self.decoder.block_size_for(self.towers)
        den = self.den_cache()
        return self.decoder.draft(towers.denoiser, den, n, first=self.state.to(den.device), shift=towers.shifted,
                                  mask_token_id=towers.mask_token_id, tracker=_Counter(self.jobs),
                                  rows=torch.arange(len(self.jobs)), block_index=self.iterations)[0]

    def _step(self, drafted: Tensor) -> None:
        towers, n, R = self.towers, self.decoder.block_size_for(self.towers), len(self.jobs)
        x = drafted.to(self.ctx_device)
        logits = towers.context.extend(self.cache, x, logits="all", provisional=True)  # (R, n, V)
        ar = RowChoice(self.jobs)(logits)  # ar[:, i]: the context tower's token after x[:, :i + 1]
        keep = self.decoder.kept(logits, ar, x)
        towers.context.accept(self.cache, keep)
        self.state = ar.gather(1, (keep - 1)[:, None]).squeeze(1)
        for j, row, k in zip(self.jobs, x.tolist(), keep.tolist()):
            j.commit(row[:k])
        if R > 1:  # rows keep different prefixes: squeeze the holes out once they add up (exact)
            if self.cache.compact(min_gain=max(n, self.cache.length // 8)):
                self._mirror = None


class DiffusionStepper(Stepper):
    """`MaskDiffusion`: the denoiser fills one block per step, then the context tower reads it.

    state (R, V): each row's last context logits (shifted models: the block's first token), or
    None for unshifted models. A row's last block is shorter when its max_tokens is not a
    multiple of the block size, as alone: rows with a shorter block denoise in a group of their own.
    """

    decoder_type = MaskDiffusion

    @classmethod
    def key(cls, decoder, towers):
        return (cls.__name__, decoder.block_size_for(towers), decoder.steps_per_block, repr(decoder.sampler))

    def _prefill(self, job):
        ids = self._prompt(job)
        want = "last" if self.towers.shifted else "none"
        logits, cache = self.towers.context.prefill(ids, None, logits=want, capacity=ids.shape[1] + job.max_tokens)
        return cache, (logits[:, -1] if self.towers.shifted else None)

    def draft(self) -> list[list[int]]:
        """Denoise every row's next block (rows with a shorter last block in a group of their own)."""
        dec, towers, n_max = self.decoder, self.towers, self.decoder.block_size_for(self.towers)
        widths = [min(n_max, j.max_tokens - j.made) for j in self.jobs]
        blocks: list[list[int] | None] = [None] * len(self.jobs)
        for n in sorted(set(widths)):
            rows = [r for r, w in enumerate(widths) if w == n]
            whole = len(rows) == len(self.jobs)
            idx = torch.tensor(rows, dtype=torch.long, device=self.cache.device)
            den = self.den_cache() if whole else self.den_cache(self.cache.select(idx))
            jobs = [self.jobs[r] for r in rows]
            choice = RowChoice(jobs)
            first = None
            if towers.shifted:  # the context tower's own next token opens the block ([MASK] never chosen)
                last = (self.state if whole else self.state[idx]).float()
                last[:, towers.mask_token_id] = float("-inf")
                first = choice(last).to(den.device)
            x = denoise_block(towers.denoiser, den, n, sampler=dec.sampler, steps=dec.steps_per_block,
                              mask_token_id=towers.mask_token_id, chooser=choice, generator=None,
                              tracker=_Counter(jobs), rows=torch.arange(len(rows)), block_index=self.iterations,
                              first=first, shift=towers.shifted)
            for r, block in zip(rows, x.tolist()):
                blocks[r] = block
        return blocks

    def _step(self, blocks: list[list[int]]) -> None:
        towers = self.towers
        done = [j.commit(b) for j, b in zip(self.jobs, blocks)]
        if all(done):
            return
        # Rows still running all had a full block (a shorter one is a row's last), so they stack.
        stay = [r for r, d in enumerate(done) if not d]
        x = torch.tensor([blocks[r] for r in stay], dtype=torch.long, device=self.cache.device)
        if len(stay) < len(self.jobs):
            idx = torch.tensor(stay, dtype=torch.long, device=self.cache.device)
            self.jobs = [self.jobs[r] for r in stay]
            self.cache, self._mirror = self.cache.select(idx), None
            self.state = None if self.state is None else self.state[idx]
        logits = towers.context.extend(self.cache, x, logits="last" if towers.shifted else "none")
        if towers.shifted:
            self.state = logits[:, -1]


STEPPERS: tuple[type[Stepper], ...] = (SpeculativeStepper, DiffusionStepper, ARStepper)


def stepper_for(decoder: Decoder) -> type[Stepper]:
    """The step-wise loop of a decoder (by class, subclasses included)."""
    for cls in STEPPERS:
        if isinstance(decoder, cls.decoder_type):
            return cls
    raise ValueError(f"the server has no step-wise loop for {type(decoder).__name__}; serve one of "
                     f"{[c.decoder_type.__name__ for c in STEPPERS]}")
