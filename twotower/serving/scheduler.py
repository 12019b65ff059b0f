"""Continuous batching at block boundaries: one scheduler thread, one working batch per decoder setting.

    HTTP handlers --submit(Job)--> inbox --> waiting (FIFO) --admit--> Stepper (per key) --step--> Job.commit
                                                                                              |
                            HTTP handlers <--events (text deltas, done)-- Job.sink  <---------+

The scheduler thread owns every cache and tensor (no locks around the models). Each turn of its
loop it takes new requests, admits as many as the working batches have room for (`max_batch` rows
each, `max_rows` over all batches; the rows a batch takes at one boundary are prefilled together, as one
left-padded batch, and concatenated into it),
and advances every working batch by one iteration. A request joins at the next block boundary and
leaves as soon as it has finished, so a long request never holds back a short one; an abandoned
request (client gone: `Job.cancel`) is dropped at the next boundary, before the next forward, and
counted in `stats()["dropped"]`. An error inside a step fails the requests of that batch only.

`Job` is one request's row: its cap, EOS ids and stop strings decide when it ends (`commit`), and
it turns tokens into text deltas for streaming: the text is sent only up to a point no later token
can change (trailing partial UTF-8 characters, and the last len(stop) - 1 characters while stop
strings are set, are held back), so the streamed pieces always add up to the final text.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from ..decoding import StopStrings, Towers
from ..decoding.checks import same_device
from .requests import CompletionRequest
from .stepper import Stepper
from ..validation import check_int, device_of

__all__ = ["Job", "Scheduler"]

log = logging.getLogger("twotower.serving")


class Job:
    """One request's row in a working batch, and the bridge to its HTTP handler.

    sink: called on the scheduler thread with each event: {"type": "text", "text": delta},
    {"type": "done", "finish_reason": "stop" | "length", "text", "completion_tokens"}, or
    {"type": "error", "message"}. It must not block (the HTTP layer hands it to its event loop).
    """

    def __init__(self, request: CompletionRequest, tokenizer, eos_ids, sink: Callable[[dict], None] | None = None):
        self.request = request
        self.prompt_ids, self.max_tokens, self.decoder = request.prompt_ids, request.max_tokens, request.decoder
        self.generator = request.generator()
        self.tokenizer, self.eos = tokenizer, frozenset(eos_ids)
        self.stop = StopStrings(tokenizer.decode, request.stop) if request.stop else None
        # Streamed text holds back len(longest stop) - 1 characters: they may be the start of a stop
        # string that the next token completes, and text already sent cannot be taken back.
        self.hold = max((len(s) for s in request.stop), default=1) - 1
        self.sink = sink
        self.tokens: list[int] = []
        self.nfe = 0
        self.finish_reason: str | None = None
        self.cancelled = False
        self.error: str | None = None
        self.iterations = 0  # working-batch iterations this row took part in
        self.cancelled_at: int | None = None  # `iterations` when the job was cancelled
        self.text = ""
        self._sent = 0
        self.submitted = time.perf_counter()

    @property
    def made(self) -> int:
        return len(self.tokens)

    @property
    def over(self) -> bool:
        """Finished, failed or abandoned: the row leaves its batch at the next boundary."""
        return self.finish_reason is not None or self.cancelled or self.error is not None

    def cancel(self) -> None:
        """The client went away (called from the HTTP side; the scheduler drops the row)."""
        if not self.cancelled:
            self.cancelled_at = self.iterations
        self.cancelled = True

    @property
    def abandoned(self) -> bool:
        """Cancelled before it finished or failed: its work was dropped."""
        return self.cancelled and self.finish_reason is None and self.error is None

    def fail(self, message: str) -> None:
        self.error = message
        self._send({"type": "error", "message": message})

    def commit(self, tokens: list[int]) -> bool:
        """Record a row's new tokens; returns whether the row has finished.

        Keeps at most max_tokens in all, up to and including the first EOS; with stop strings the
        row finishes once its text contains one (tokens kept whole, the text cut before it).
        """
        if self.over:
            return True
        tokens = list(tokens)[: self.max_tokens - len(self.tokens)]
        for i, t in enumerate(tokens):
            if t in self.eos:
                tokens, self.finish_reason = tokens[: i + 1], "stop"
                break
        self.tokens.extend(tokens)
        if self.finish_reason is None and len(self.tokens) >= self.max_tokens:
            self.finish_reason = "length"
        text = self.tokenizer.decode(self.tokens)
        if self.stop is not None and any(s in text for s in self.stop.strings):
            text, self.finish_reason = self.stop.truncate(text), "stop"
        self._emit(text)
        return self.finish_reason is not None

    def _emit(self, text: str) -> None:
        done = self.finish_reason is not None
        # U+FFFD at the end is a character whose bytes have not all arrived (byte-level tokens): wait for them.
        upto = len(text) if done else len(text.rstrip("\ufffd")) - self.hold
        if upto > self._sent:
            self._send({"type": "text", "text": text[self._sent: upto]})
            self._sent = upto
        if done:
            self.text = text
            self._send({"type": "done", "finish_reason": self.finish_reason, "text": text,
                        "completion_tokens": len(self.tokens), "nfe": self.nfe})

    def _send(self, event: dict) -> None:
        if self.sink is not None and not self.cancelled:
            try:
                self.sink(event)
            except RuntimeError:  # the handler's event loop is gone: nobody is listening any more
                self.cancelled = True


class Scheduler:
    """The batching loop, on its own thread.

    Args:
        towers: the model's towers (with `denoiser_device` set, the denoiser reads a mirror).
        max_batch: rows per working batch.
        max_rows: rows running at once over all working batches (requests of different decoder
            settings run in different batches); None = no bound beyond max_batch per batch.
        idle_wait: seconds the idle loop blocks waiting for a request before checking for stop.
        overlap: run the towers at the same time across request groups: requests of one decoder
            setting are spread over two working batches, and while the context tower finishes
            (verifies / extends) one batch, the denoiser drafts the next one on a second thread.
            Each batch still runs draft -> finish in order, so outputs are unchanged. None (the
            default) turns it on when the towers live on two different devices, where the two
            halves really run in parallel; on one device they would only contend.
    """

    def __init__(self, towers: Towers, *, max_batch: int = 8, idle_wait: float = 0.05, overlap: bool | None = None,
                 max_rows: int | None = None):
        check_int("max_batch", max_batch)
        check_int("max_rows", max_rows, optional=True)
        self.max_rows = max_rows
        self.dropped = 0  # abandoned jobs removed (from a working batch or from the queue) before finishing
        if overlap is not None and not isinstance(overlap, bool):
            raise ValueError(f"overlap must be a bool or None (auto), got {overlap!r}")
        self.towers, self.max_batch, self.idle_wait = towers, max_batch, idle_wait
        self.overlap = _two_devices(towers) if overlap is None else overlap
        self.overlapped = 0  # iterations whose draft ran beside another batch's finish
        self._pool = None
        self.inbox: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self.waiting: deque[Job] = deque()
        self.batches: dict[tuple, Stepper] = {}
        self.iterations = 0
        self.peak = 0  # the most rows ever running at once (batching at work)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- control (any thread) -----------------------------------------------------------------
    def start(self) -> "Scheduler":
        if self.overlap and self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="twotower-denoiser")
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="twotower-scheduler", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def submit(self, job: Job) -> Job:
        if self._thread is None:
            raise RuntimeError("the scheduler is not running; call start() first")
        self.inbox.put(job)
        return job

    def stats(self) -> dict:
        return {"running": sum(len(b) for b in list(self.batches.values())),
                "waiting": len(self.waiting) + self.inbox.qsize(), "batches": len(self.batches),
                "iterations": self.iterations, "peak": self.peak, "dropped": self.dropped,
                "overlap": self.overlap, "overlapped": self.overlapped}

    # ---- the loop (scheduler thread) ----------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while not self._stop.is_set():
                # Block only when idle: with rows running, the loop must not wait for new requests.
                self._take(block=not self.batches and not self.waiting)
                self._admit()
                self.peak = max(self.peak, sum(len(b) for b in self.batches.values()))
                for batch in self.batches.values():
                    batch.leave()  # abandoned rows go before the forward
                active = [b for b in self.batches.values() if len(b)]
                if self.overlap and self._pool is not None and len(active) > 1:
                    self._overlapped_turn(active)
                else:
                    for batch in active:
                        self._guarded(batch, batch.step)
                for key, batch in list(self.batches.items()):
                    if not len(batch):
                        del self.batches[key]
                if self.batches:
                    self.iterations += 1
        for batch in self.batches.values():
            for job in batch.jobs:
                job.fail("the server is shutting down")
        for job in self.waiting:
            job.fail("the server is shutting down")

    def _overlapped_turn(self, active: list[Stepper]) -> None:
        """One iteration of every batch, pipelined: batch i+1 drafts (denoiser, worker thread) while
        batch i finishes (context tower, this thread)."""
        failed = object()

        def draft(batch):
            with torch.inference_mode():  # inference mode is per thread
                return batch.draft()

        pending = self._guarded(active[0], active[0].draft, failed)
        for i, batch in enumerate(active):
            # Submitted before this batch's finish, so the next draft (denoiser device) runs beside it
            # (context device); each batch's own draft still precedes its finish.
            future = self._pool.submit(draft, active[i + 1]) if i + 1 < len(active) else None
            if pending is not failed:
                self._guarded(batch, lambda b=batch, d=pending: b.finish(d))
            if future is not None:
                pending = self._guarded(active[i + 1], future.result, failed)
                self.overlapped += 1

    def _count_drop(self, job: Job) -> None:
        self.dropped += 1

    def _take(self, block: bool) -> None:
        try:
            if block:
                self.waiting.append(self.inbox.get(timeout=self.idle_wait))
            while True:
                self.waiting.append(self.inbox.get_nowait())
        except queue.Empty:
            pass

    def _admit(self) -> None:
        """Join waiting requests to their working batch while it has room (FIFO per batch). The requests
        a batch takes at one boundary are prefilled together (`Stepper.admit`): one forward, not one each."""
        still: deque[Job] = deque()
        groups: dict[tuple, list[Job]] = {}  # per batch key, the jobs it takes now (in arrival order)

        def size(k) -> int:  # the rows batch k holds once this boundary's group has joined
            return len(self.batches.get(k, ())) + len(groups.get(k, ()))

        running = sum(len(b) for b in self.batches.values())
        while self.waiting:
            job = self.waiting.popleft()
            if job.over:
                self.dropped += job.abandoned
                continue
            if self.max_rows is not None and running >= self.max_rows:
                still.append(job)
                continue
            try:
                key = Stepper.key(job.decoder, self.towers)  # refuses a decoder that cannot be stepped
            except Exception as e:  # noqa: BLE001 - a request the loop cannot run fails alone
                job.fail(f"cannot schedule this request: {e}")
                continue
            if self.overlap:  # two groups per setting, so the towers have two batches to overlap
                # The emptier group: the two batches stay balanced, so neither tower waits on a lopsided one.
                key = min(((*key, g) for g in (0, 1)), key=size)
            if size(key) >= self.max_batch:
                still.append(job)
                continue
            if key not in self.batches:
                self.batches[key] = Stepper(self.towers, job.decoder, on_drop=self._count_drop)
            groups.setdefault(key, []).append(job)
            running += 1
        self.waiting = still
        for key, group in groups.items():
            self._admit_group(key, self.batches[key], group)

    def _admit_group(self, key, batch: Stepper, group: list[Job]) -> None:
        """batch.admit(group): one prefill, or one per request where the padded group would not fit
        (`Stepper.group_call`). A failed prefill fails its requests (and the batch, if any of them had joined)."""
        call = batch.group_call(group) if len(group) > 1 else None  # a lone request's own errors fail it below
        if len(group) > 1 and call is None:
            for job in group:
                self._admit_group(key, batch, [job])
            return
        try:
            batch.admit(group, call)
        except Exception as e:  # noqa: BLE001
            log.exception("prefill failed")
            if any(job in batch.jobs for job in group):  # joined before the failure: the batch state is suspect
                self._fail_batch(key, batch, f"prefill failed: {e}")
            for job in group:
                if not job.over:  # not joined (the failing prefill was its own or its group's)
                    job.fail(f"prefill failed: {e}")
            if not len(batch):
                self.batches.pop(key, None)

    def _guarded(self, batch: Stepper, fn, failed=None):
        """fn()'s result; on an exception the batch's requests fail (the others keep being served)
        and `failed` is returned."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - fail this batch's requests, keep serving the others
            log.exception("a decoding step failed")
            key = next(k for k, b in self.batches.items() if b is batch)
            self._fail_batch(key, batch, f"decoding failed: {type(e).__name__}: {e}")
            return failed

    def _fail_batch(self, key, batch: Stepper, message: str) -> None:
        for job in batch.jobs:
            job.fail(message)
        batch.clear()


def _two_devices(towers: Towers) -> bool:
    """Whether the context and the denoiser tower sit on different devices."""
    if towers.denoiser is None:
        return False
    return not same_device(device_of(towers.context), device_of(towers.denoiser))
