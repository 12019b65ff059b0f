"""Working batches for the scheduler: requests join and leave a decoder's state machine between steps.

There is no decoding loop here. A `Stepper` is one working batch: the `DecodeState` of the decoder
its requests share (`Decoder.batch_key`), and the requests (`Job`s) whose rows it holds. The
decoder does every iteration itself (`Decoder.draft` / `Decoder.step`, as in `Decoder.generate`);
the stepper only

* admits requests: the prompts admitted at one boundary are prefilled together (`Decoder.begin` on one
  left-padded call, as `generate` batches them; the scheduler admits them one by one where the padded call
  would not fit, `group_call`) and
  joined to the batch (`DecodeState.join`: the caches are concatenated, left padding = absent keys,
  exact), and
* lets finished or abandoned rows leave (`DecodeState.keep`).

Per-row bookkeeping is `JobRows`: each row is a request with its own cap, EOS ids, stop strings,
sampling settings and generator (`Job.commit`, scheduler.py), so rows of other temperatures or
seeds share a forward, and a seeded request draws exactly as it would alone. Any `Decoder` that
implements the state machine (`prefill` / `advance`) is served this way, the user's own included.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..decoding import Decoder, DecodeState, Rows, Towers

__all__ = ["Stepper", "JobRows", "RowChoice"]


class RowChoice:
    """A `TokenChooser` look-alike for a working batch: row r uses jobs[r]'s chooser and generator.

    (R, ..., V) logits -> (R, ...) ids. All-greedy batches take one batched argmax (what
    `TokenChooser` does at temperature 0); otherwise each row draws from its own generator, one
    call per row per forward, as the row's decoder would alone.
    """

    def __init__(self, jobs):
        self.jobs = jobs

    def __call__(self, logits: Tensor, generator=None) -> Tensor:
        # Greedy rows need no generator, so the batch takes one argmax; otherwise per-row calls keep each
        # seeded request's draws what they would be alone.
        if all(j.decoder.chooser.greedy for j in self.jobs):
            return logits.argmax(-1)
        return torch.cat([j.decoder.chooser(logits[r: r + 1], j.generator) for r, j in enumerate(self.jobs)])


class JobRows(Rows):
    """The rows of a working batch as the scheduler's requests: row r is jobs[r]."""

    can_finish_early = True  # a request ends at its EOS, a stop string, or when its client leaves

    def __init__(self, jobs: list, on_drop: Callable[[object], None] | None = None):
        self.jobs = list(jobs)
        self.on_drop = on_drop  # told of each abandoned job as its row leaves (the scheduler's `dropped`)

    def __len__(self) -> int:
        return len(self.jobs)

    def _of(self, idx: list[int] | None) -> list:
        return self.jobs if idx is None else [self.jobs[r] for r in idx]

    @property
    def greedy(self) -> bool:
        return all(j.decoder.chooser.greedy for j in self.jobs)

    @property
    def generator(self) -> torch.Generator | None:
        # Only a lone row has a generator of its own to share (a sampler's draws); else the global RNG.
        return self.jobs[0].generator if len(self.jobs) == 1 else None

    def choose(self, logits: Tensor, idx: list[int] | None = None) -> Tensor:
        return RowChoice(self._of(idx))(logits)

    def count_forward(self, took_part: Tensor | None = None, idx: list[int] | None = None) -> None:
        jobs = self._of(idx)
        # One host read for the whole batch; the counts are per job, on the host.
        part = [True] * len(jobs) if took_part is None else took_part.tolist()
        for j, p in zip(jobs, part):
            j.nfe += int(p)

    def commit(self, block: Tensor, count: Tensor | None = None) -> Tensor:
        # The jobs' bookkeeping (stop strings, streaming) is host-side: one device read per commit.
        rows = block.tolist()
        counts = [len(r) for r in rows] if count is None else count.tolist()
        return torch.tensor([j.commit(r[:k]) for j, r, k in zip(self.jobs, rows, counts)], dtype=torch.bool)

    def left(self) -> list[int]:
        return [max(j.max_tokens - j.made, 0) for j in self.jobs]

    def keep(self, idx: list[int]) -> None:
        # Every way a row leaves (the decoder dropping finished rows, the scheduler dropping abandoned
        # ones) passes here. Counted before the rows go, so whoever sees the batch without them also
        # sees the count.
        if self.on_drop is not None:
            kept = set(idx)
            for r, job in enumerate(self.jobs):
                if r not in kept and job.abandoned:
                    self.on_drop(job)
        self.jobs = [self.jobs[r] for r in idx]

    def join(self, other: Rows) -> None:
        if not isinstance(other, JobRows):
            raise TypeError(f"JobRows can only take the rows of other JobRows, got {type(other).__name__}")
        self.jobs.extend(other.jobs)


class Stepper:
    """One working batch: the requests of one decoder setting and their decoder's `DecodeState`.

    The first request's decoder drives the batch (`Decoder.batch_key` says which others may join).
    """

    def __init__(self, towers: Towers, decoder: Decoder, on_drop: Callable[[object], None] | None = None):
        self.towers = towers
        self.decoder = decoder
        self.state: DecodeState | None = None
        self.iterations = 0
        self.on_drop = on_drop  # told of each abandoned job as it leaves (the scheduler's `dropped` count)

    @staticmethod
    def key(decoder: Decoder, towers: Towers) -> tuple:
        """Requests with equal keys share forwards; a decoder that cannot be stepped is refused here,
        naming what it must implement."""
        decoder.require_steps()
        return decoder.batch_key(towers)

    @property
    def jobs(self) -> list:
        return [] if self.state is None else self.state.rows.jobs

    def __len__(self) -> int:
        return len(self.jobs)

    # ---- membership ---------------------------------------------------------------------------
    def admit(self, jobs: list, call=None) -> None:
        """Start the jobs and join their rows to the batch, with one left-padded prefill for all of them (as
        `generate` batches its prompts). call: their `group_call`, when the caller made it already. Raises
        before anything changed when the call is refused."""
        if jobs:
            call = self._call(jobs) if call is None else call
            started = self.decoder.begin(call, JobRows(jobs, on_drop=self.on_drop))
            if self.state is None:
                self.state = started
            else:
                self.state.join(started)

    def group_call(self, jobs: list):
        """The checked call that prefills `jobs` together, or None where it is refused: padding a short prompt
        that asks for many tokens to the longest prompt can pass the context limit that none of them passes
        alone (the scheduler then admits them one by one)."""
        try:
            return self._call(jobs)
        except ValueError:
            return None

    def _call(self, jobs: list):
        """The checked call that prefills `jobs` together: prompts left-padded to the longest (padding is absent
        keys, so each row computes what it would alone), room for the largest max_tokens."""
        width = max(len(j.prompt_ids) for j in jobs)
        ids = torch.zeros(len(jobs), width, dtype=torch.long)
        valid = torch.zeros(len(jobs), width, dtype=torch.bool)
        for r, job in enumerate(jobs):
            ids[r, width - len(job.prompt_ids):] = torch.tensor(job.prompt_ids, dtype=torch.long)
            valid[r, width - len(job.prompt_ids):] = True
        return jobs[0].decoder.prepare(self.towers, ids, valid, max_new_tokens=max(j.max_tokens for j in jobs))

    def leave(self) -> None:
        """Drop the rows whose job finished or was abandoned (client gone)."""
        if self.state is not None:
            self.state.keep([r for r, j in enumerate(self.jobs) if not j.over])

    def clear(self) -> None:
        """Drop every row at once (their requests failed)."""
        self.state = None

    def step(self) -> None:
        """One iteration for every row, then finished rows leave."""
        self.finish(self.draft())

    def draft(self):
        """The decoder's denoiser half of an iteration (`Decoder.draft`); returns what `finish` needs.

        Splitting an iteration lets the scheduler overlap the towers across working batches when
        they live on two devices: batch B's draft runs while batch A's `finish` runs."""
        return self.decoder.draft(self.state)

    def finish(self, drafted) -> None:
        """The rest of the iteration (`Decoder.step` with the draft), then finished rows leave."""
        for job in self.jobs:
            job.iterations += 1
        if not self.state.done:  # rows that finished but have not left yet need no more steps
            self.decoder.step(self.state, drafted)
        self.iterations += 1
        self.leave()
