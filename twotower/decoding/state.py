"""The working batch of a step-wise decoder: `DecodeState`, and the per-row bookkeeping it reports to.

A decoder is a state machine over a batch of rows (see `base.py`): `Decoder.start` prefills the
rows into a `DecodeState`, each `Decoder.step` advances every row by one iteration, and
`state.done` says when no row is left running. Between steps rows may join (`state.join`, rows
prefilled on their own) and leave (`state.keep`); the server does both at every iteration boundary.

A state holds what the loop carries from one iteration to the next: the context tower's cache,
the denoiser's mirror of it (two devices), and `carry`, a dict of per-row tensors (first dimension:
the rows) or lists (host objects, one per row, e.g. a prompt-lookup index), which `join` concatenates
and `keep` selects along with the cache. Everything a row
produces goes through a `Rows` object, which owns the bookkeeping and the token choice:

* `TrackedRows` (here): one `RowTracker` for a `generate` call, one chooser and generator for all
  rows, the result read back as a `GenerationOutput`.
* the server's `JobRows` (serving/stepper.py): each row is a request with its own cap, EOS ids,
  stop strings, sampling settings and generator, and rows come and go.

A decoder never needs to know which one it runs with: it chooses tokens with `state.choose`, counts
its forwards with `state.count_forward`, and hands its new tokens to `state.commit`.
"""

from __future__ import annotations

import abc

import torch
from torch import Tensor

from .tracker import GenerationOutput, RowTracker

__all__ = ["DecodeState", "Rows", "TrackedRows"]


class Rows(abc.ABC):
    """The per-row bookkeeping of a working batch (one entry per row, in working-batch order).

    `idx` arguments name working-batch positions (a list of ints, or None for every row).
    """

    can_finish_early: bool = True  # a row may finish before its cap (EOS id, stop criterion, client gone)

    @abc.abstractmethod
    def __len__(self) -> int:
        """Rows in the working batch."""

    @property
    @abc.abstractmethod
    def greedy(self) -> bool:
        """Every row chooses greedily (decoders may then take shortcuts that need argmax tokens)."""

    @property
    def generator(self) -> torch.Generator | None:
        """The generator the rows share, for randomness beyond the token choice (a sampler's), or None."""
        return None

    @abc.abstractmethod
    def choose(self, logits: Tensor, idx: list[int] | None = None) -> Tensor:
        """Tokens (R, ...) from logits (R, ..., V) of rows `idx`, with each row's own chooser."""

    @abc.abstractmethod
    def count_forward(self, took_part: Tensor | None = None, idx: list[int] | None = None) -> None:
        """One network forward for rows `idx`; `took_part` (R,) bool: only the rows that needed it."""

    @abc.abstractmethod
    def commit(self, block: Tensor, count: Tensor | None = None) -> Tensor:
        """New tokens (R, n) for every row (row r keeps its first count[r]; None = all n); returns
        which rows have finished, as an (R,) bool host tensor."""

    @abc.abstractmethod
    def left(self) -> list[int]:
        """How many more tokens each row may still be given (0 once it holds its cap)."""

    @abc.abstractmethod
    def keep(self, idx: list[int]) -> None:
        """Keep only the rows at positions `idx`, in that order."""

    def join(self, other: "Rows") -> None:
        """Append `other`'s rows (bookkeeping that supports rows coming and going overrides this)."""
        raise TypeError(f"{type(self).__name__} cannot take more rows: its rows are those of one generate call; "
                        "join states whose rows are tracked per row (e.g. the server's JobRows)")


class TrackedRows(Rows):
    """The rows of one `Decoder.generate` call: a `RowTracker`, the decoder's chooser and the call's generator."""

    def __init__(self, tracker: RowTracker, chooser, generator: torch.Generator | None):
        self.tracker, self.chooser, self._generator = tracker, chooser, generator
        self.index: Tensor | None = None  # the tracker rows of the working batch; None = all, in order
        self.size = tracker.num_generated.shape[0]
        self.written: int | None = 0  # positions committed to every row alike; None once counts differed
        self.can_finish_early = tracker.can_finish_early

    def __len__(self) -> int:
        return self.size

    @property
    def greedy(self) -> bool:
        return self.chooser.greedy

    @property
    def generator(self) -> torch.Generator | None:
        return self._generator

    def choose(self, logits: Tensor, idx: list[int] | None = None) -> Tensor:
        return self.chooser(logits, self._generator)  # one draw for the whole batch, as before decoders had states

    def _tracker_rows(self, idx: list[int] | None) -> Tensor | None:
        if idx is None:
            return self.index
        base = torch.arange(self.size) if self.index is None else self.index.cpu()
        return base[torch.tensor(idx, dtype=torch.long)].to(self.tracker.nfe.device)

    def count_forward(self, took_part: Tensor | None = None, idx: list[int] | None = None) -> None:
        self.tracker.count_forward(self._tracker_rows(idx), took_part)

    def commit(self, block: Tensor, count: Tensor | None = None) -> Tensor:
        device = self.tracker.tokens.device
        self.tracker.ensure_spare(block.shape[1])
        if count is not None:
            self.written = None
        elif self.written is not None:  # the tracker's no-sync path trusts the width: cut it to the cap here
            # `written` is a host count, so the cut costs no device read.
            block = block[:, : max(self.tracker.max_new_tokens - self.written, 0)]
        done = self.tracker.commit(block.to(device), None if count is None else count.to(device), self.index)
        if self.written is not None:
            self.written += block.shape[1]
        if done is None:  # nothing was read back: every row advanced alike, so all finish together
            return torch.full((self.size,), self.written >= self.tracker.max_new_tokens)
        return done

    def left(self) -> list[int]:
        if self.written is not None:
            return [max(self.tracker.max_new_tokens - self.written, 0)] * self.size
        rows = self.index if self.index is not None else slice(None)
        # A host read: callers size their next block from it (one sync, for the whole batch).
        return (self.tracker.max_new_tokens - self.tracker.num_generated[rows]).clamp(min=0).tolist()

    def keep(self, idx: list[int]) -> None:
        if len(idx) == self.size and idx == list(range(self.size)):
            return
        base = torch.arange(self.size) if self.index is None else self.index.cpu()
        self.index = base[torch.tensor(idx, dtype=torch.long)].to(self.tracker.nfe.device)
        self.size = len(idx)

    def output(self, input_ids: Tensor, blocks: int) -> GenerationOutput:
        return self.tracker.output(input_ids, blocks)


class DecodeState:
    """One decoder's working batch between iterations.

    Attributes:
        decoder: the decoder whose settings the batch shares (rows of equal `Decoder.batch_key`).
        call: the checked call the batch was started with (towers, devices, token ids, block size).
        rows: the per-row bookkeeping (`Rows`).
        cache: the context tower's cache (None before the prefill and once every row has left).
        carry: per-row tensors (first dimension: the rows) or lists (one host object per row) the
            next iteration starts from.
        finished: (R,) bool host tensor, rows that have finished (a decoder may keep them until
            every row has, e.g. `Autoregressive`, or drop them with `drop_finished`).
        iterations: steps taken.
    """

    def __init__(self, decoder, call, rows: Rows):
        self.decoder, self.call, self.rows = decoder, call, rows
        self.cache = None
        self.carry: dict[str, Tensor | list] = {}
        self.finished = torch.zeros(len(rows), dtype=torch.bool)
        self.iterations = 0
        self.forwards = 0  # count_forward calls, to check a step callback was honoured (Decoder.step)
        self.callbacks = 0
        self.callback_seen = (0, 0)  # (forwards, callbacks) at the end of the previous step
        self._mirror = None  # the denoiser's copy of the cache (two devices)
        user = call.step_callback
        self.step_callback = None if user is None else self._counted(user)

    def _counted(self, fn):
        def callback(*args, **kwargs):
            self.callbacks += 1
            return fn(*args, **kwargs)

        return callback

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def done(self) -> bool:
        """No row is left running."""
        return len(self) == 0 or bool(self.finished.all())

    # ---- what a decoder's step calls -----------------------------------------------------------
    def choose(self, logits: Tensor, idx: list[int] | None = None) -> Tensor:
        """Tokens from logits (R, ..., V), each row with its own chooser and generator."""
        return self.rows.choose(logits, idx)

    def chooser(self, idx: list[int] | None = None):
        """`choose` for rows `idx` as a `TokenChooser`-like callable (logits, generator) -> tokens."""
        return lambda logits, generator=None: self.rows.choose(logits, idx)

    def count_forward(self, idx=None, took_part: Tensor | None = None) -> None:
        """One network forward for rows `idx` (working-batch positions; None = all), limited to
        `took_part` (R,) bool when given. Same call shape as `RowTracker.count_forward`, so a state
        can be handed to `denoise_block` / `draft_one_step` as their tracker."""
        if isinstance(idx, Tensor):  # the helpers pass working-batch positions as a tensor
            idx = idx.tolist()
        self.forwards += 1
        self.rows.count_forward(took_part, idx)

    def commit(self, block: Tensor, count: Tensor | None = None) -> Tensor:
        """Hand every row's new tokens (R, n) to the bookkeeping; returns `finished` (R,) bool (host)."""
        self.finished = self.finished | self.rows.commit(block, count)
        return self.finished

    def drop_finished(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        """Let the finished rows leave (cache, carry, bookkeeping); returns `tensors`, per-row tensors
        the step still holds (first dimension: the rows), cut to the rows that stay.

            x, = state.drop_finished(x)      # x (R, n) -> (R', n)
        """
        if not bool(self.finished.any()):  # `finished` is on the host: no device read
            return tensors
        stay = (~self.finished).nonzero().squeeze(1)
        self.keep(stay.tolist())
        return tuple(t[stay.to(t.device)] for t in tensors)

    def den_cache(self, idx: list[int] | None = None):
        """The cache as the denoiser reads it, for rows `idx` (None = all): the context cache itself on
        one device; on two, a mirror on the denoiser's device, brought up to date incrementally
        (`Cache.mirror_to`) and copied afresh after the batch changed shape or for a sub-batch."""
        call = self.call
        cache = self.cache if idx is None else self.cache.select(torch.tensor(idx, dtype=torch.long))
        if not call.use_mirror:
            return cache
        if idx is not None:
            return cache.mirror_to(call.den_device)
        m = self._mirror
        # A mirror is updated by appending new positions: a batch that changed, or a cache that shrank
        # (provisional positions rejected), needs a fresh copy.
        if m is None or m.batch_size != cache.batch_size or m.length > cache.length:
            self._mirror = cache.mirror_to(call.den_device)
        else:
            self._mirror = cache.mirror_to(call.den_device, m)
        return self._mirror

    def reshaped(self) -> None:
        """The cache changed in a way an incremental mirror cannot follow (e.g. `compact`)."""
        self._mirror = None

    # ---- rows joining and leaving --------------------------------------------------------------
    def keep(self, idx: list[int]) -> None:
        """Keep only the rows at working-batch positions `idx` (in that order): the others leave."""
        if len(idx) == len(self) and list(idx) == list(range(len(self))):
            return
        self.rows.keep(list(idx))
        self.finished = self.finished[torch.tensor(idx, dtype=torch.long)]
        self._mirror = None  # its rows no longer line up with the cache's: the next den_cache copies afresh
        if not idx:
            self.cache, self.carry = None, {}
            return
        index = torch.tensor(idx, dtype=torch.long)
        if self.cache is not None:
            self.cache = self.cache.select(index)
        self.carry = {k: [v[i] for i in idx] if isinstance(v, list) else v[index.to(v.device)]
                      for k, v in self.carry.items()}

    def join(self, other: "DecodeState") -> None:
        """Append `other`'s rows (started by a decoder of the same `batch_key`, on the same towers).

        Caches of different lengths are joined by the family cache's `concat` (left padding = absent keys:
        exact), so each row computes what it would alone."""
        if not len(self):
            self.rows, self.cache, self.carry, self.finished = other.rows, other.cache, other.carry, other.finished
            self._mirror = None
            return
        if set(self.carry) != set(other.carry):
            raise ValueError(f"cannot join states carrying {sorted(other.carry)} to one carrying {sorted(self.carry)}; "
                             "join only states of decoders with the same batch_key")
        # Everything that can fail first, so that a refused join leaves this state as it was.
        cache = type(self.cache).concat([self.cache, other.cache])
        carry = {k: v + list(other.carry[k]) if isinstance(v, list) else torch.cat([v, other.carry[k].to(v.device)])
                 for k, v in self.carry.items()}
        self.rows.join(other.rows)
        self.cache, self.carry = cache, carry
        self.finished = torch.cat([self.finished, other.finished])
        self._mirror = None

    def output(self) -> GenerationOutput:
        """The result of a `generate`-style run (rows tracked by `TrackedRows`)."""
        if not isinstance(self.rows, TrackedRows):
            raise TypeError(f"output() reads a RowTracker; these rows are {type(self.rows).__name__}, which keep "
                            "their own results")
        return self.rows.output(self.call.input_ids, self.iterations if self.decoder.counts_blocks else 0)
