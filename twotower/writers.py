"""`JsonlPredictionWriter`: predictions as one JSONL file, safe under DDP, resumable after a crash.

How a run writes (any number of ranks):

    setup          rank 0 takes the output's lock `<output>.lock` (one run per output), checks the
                   output against this run's settings, reads which prompts are done (resume) or
                   clears the old output (`overwrite`; an existing output is refused otherwise), and
                   broadcasts the result; every rank then opens its own part file `<output>.rank<R>.part`.
    each batch     one `os.write` per line (O_APPEND), then an fsync: a crash loses at most the
                   line being written, and a torn last line is repaired on resume.
    predict end    barrier; rank 0 merges the old output (resume), every part file (any rank
                   count, an earlier crashed run's included), keeps the first row per prompt index
                   (Lightning's samplers, or a dataset padded to the rank count, can repeat a prompt),
                   sorts by index, writes a temp file in the same folder and `os.replace`s it onto
                   the output; the parts are removed; barrier.
    teardown       rank 0 releases the lock (on an error too, through `on_exception`).

Why per-rank parts: with one shared file, every rank would truncate it at start (a late rank wipes
lines another wrote) and lines would interleave by rank. Why rank 0 decides and broadcasts: every
rank must skip exactly the same prompts, or the distributed sampler splits different datasets.

Why a lock: two runs on one output would remove or merge each other's part files. The lock is a
file created atomically (O_CREAT | O_EXCL) holding the owner's PID and host; a lock left by a
process that no longer exists on this host (a killed run) is stale and taken over.

Resume protocol: the writer hands the finished prompt indices to the data module's
`skip_prompts(indices) -> remaining` (`PromptDataModule` has it), which leaves them out of
`predict_dataloader`. The sidecar `<output>.meta.json` records what produced the rows (the
module's `prediction_settings()`: model directory and fingerprint, decoder repr, max_new_tokens,
seed, ...); a resume with other settings is refused, naming what differs.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import BasePredictionWriter

META_SUFFIX = ".meta.json"
LOCK_SUFFIX = ".lock"
# The fix that every refusal to resume names.
START_OVER = ("set resume: false and overwrite: true (--trainer.callbacks.init_args.resume false "
              "--trainer.callbacks.init_args.overwrite true) to start over")
INFORMATIONAL = ("model",)  # recorded, not compared: a moved checkpoint keeps its fingerprint


def read_rows(path: Path, *, repair: bool = False) -> list[dict]:
    """The complete JSON lines of `path` (none if it is missing).

    A last line without its newline or not valid JSON is a write cut short by a crash: it is
    dropped (and with `repair`, cut off the file, so that appends start on a fresh line). A bad line
    before the last one is corruption, not a crash, and raises.
    """
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline
    rows, keep = [], len(data) - len(tail)
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines) - 1 and not tail:  # the final line: cut short, newline included
                keep = len(data) - len(line) - 1
                break
            raise ValueError(f"{path}:{n + 1}: not a JSON line; the file is corrupt (delete it, or write to "
                             "another output path)") from None
        if not isinstance(row, dict) or not isinstance(row.get("index"), int):
            raise ValueError(f"{path}:{n + 1}: a prediction row needs an integer 'index' field")
        rows.append(row)
    if repair and keep < len(data):
        with path.open("r+b") as f:
            f.truncate(keep)
            os.fsync(f.fileno())
    return rows


def atomic_write_text(path: Path, text: str) -> None:
    """Write `path` through a temp file in the same folder and `os.replace`: readers see the old
    file or the new one, never a half-written one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _read_owner(path: Path) -> dict | None:
    """The {"pid", "host"} a lock file records; None if it is gone, not yet written or not a lock."""
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None


class OutputLock:
    """An exclusive claim on one output file: `<output>.lock`, created atomically (O_CREAT | O_EXCL)
    and holding the owner's PID and host as JSON.

    `acquire` refuses a lock another live process holds, naming its PID, host and the lock path. A
    lock whose owner no longer exists on this host is stale (a killed run) and is taken over; a lock
    from another host cannot be checked and is refused. `release` removes the lock only if this
    object took it.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.held = False
        self.me: dict = {}

    def acquire(self) -> None:
        if self.held:
            return
        # Read now, not at construction: a spawned rank runs in another process than the one that built it.
        self.me = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(3):  # a stale lock removed, or one released meanwhile: try again
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._clear_stale(_read_owner(self.path))
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(self.me))
                f.flush()
                os.fsync(f.fileno())
            self.held = True
            return
        raise RuntimeError(f"could not take the lock {self.path}: other runs keep taking it; run one at a time")

    def _clear_stale(self, owner: dict | None) -> None:
        """Remove the lock if its owner is a dead process on this host; raise if it may be live."""
        if owner is None and not self.path.exists():
            return  # released between our attempt and the read
        if owner is None or owner.get("host") != self.me["host"] or _pid_alive(owner["pid"]):
            raise RuntimeError(self._held_message(owner))
        # Move it aside before deleting: if another run took the lock over since we read it, the
        # file moved is not the stale one, and it is put back.
        aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if _read_owner(aside) != owner:
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)

    def _held_message(self, owner: dict | None) -> str:
        if owner is None:
            return (f"{self.path} exists but names no owner (a run starting right now, or a damaged lock); if no "
                    f"other run writes to this output, delete {self.path}")
        return (f"another run (PID {owner['pid']} on {owner.get('host')}) is writing to this output: it holds the "
                f"lock {self.path}. Wait for it to finish or write to another output path; if that process is "
                f"gone (on another machine, say), delete {self.path}")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if _read_owner(self.path) == self.me:  # never remove a lock another run took over
            self.path.unlink(missing_ok=True)


class JsonlPredictionWriter(BasePredictionWriter):
    """Writes each predicted row (a dict with an integer `index`) as one JSON line of `output`,
    sorted by index, each prompt once, whatever the number of ranks.

    Args:
        output: the JSONL file. Its folder also holds the per-rank part files while a run is in
            progress and the sidecar `<output>.meta.json`.
        resume: keep the rows already in `output` (and in part files a killed run left) and
            generate only the missing prompts; refused when the sidecar shows other settings.
        overwrite: delete an existing output (and a killed run's part files) and start over.
            With neither, a run whose output already holds predictions is refused, naming the file.

    One run at a time per output: rank 0 holds `<output>.lock` (see `OutputLock`) from setup to
    teardown, and a second run on the same output is refused, naming the first one's PID.
    """

    def __init__(self, output: str = "predictions.jsonl", resume: bool = False, overwrite: bool = False):
        super().__init__(write_interval="batch")
        for name, value in (("resume", resume), ("overwrite", overwrite)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false, got {value!r}")
        if resume and overwrite:
            raise ValueError("resume and overwrite are both true: resume keeps the rows already written, overwrite "
                             "deletes them; set one of the two")
        self.output = Path(output)
        self.resume = resume
        self.overwrite = overwrite
        self.meta_path = self.output.with_name(self.output.name + META_SUFFIX)
        self.lock = OutputLock(self.output.with_name(self.output.name + LOCK_SUFFIX))
        self._fd: int | None = None
        self._merged = False
        self.skipped = 0  # prompts found done at setup (for callers and tests)

    # ---- paths --------------------------------------------------------------------------------
    def part_path(self, rank: int) -> Path:
        return self.output.with_name(f"{self.output.name}.rank{rank}.part")

    def part_files(self) -> list[Path]:
        return sorted(self.output.parent.glob(f"{self.output.name}.rank*.part"))

    # ---- setup: decide on rank 0, broadcast, open this rank's part ------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "predict":
            return
        settings = _settings_of(pl_module)
        datamodule = trainer.datamodule
        decision: Any = None
        if trainer.is_global_zero:
            try:
                self.output.parent.mkdir(parents=True, exist_ok=True)
                self.lock.acquire()
                decision = ("ok", self._prepare(settings, getattr(datamodule, "prompt_texts", None)))
            except Exception as e:  # sent, not raised here: the other ranks wait in the broadcast
                decision = ("error", f"{type(e).__name__}: {e}")
        decision = trainer.strategy.broadcast(decision, src=0)
        if decision[0] == "error":  # every rank raises, so none waits in a collective for rank 0
            raise ValueError(decision[1])
        done: list[int] = decision[1]
        self.skipped = len(done)
        remaining = None
        if done:
            skip = getattr(datamodule, "skip_prompts", None)
            if skip is None:
                raise TypeError(f"resume found {len(done)} finished prompts in {self.output}, but the data module "
                                f"{type(datamodule).__name__} has no skip_prompts(indices) to leave them out; use "
                                f"twotower.data.PromptDataModule, or {START_OVER}")
            remaining = skip(done)
        self._merged = False
        self._fd = os.open(self.part_path(trainer.global_rank), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if remaining == 0:  # nothing to generate: Lightning skips the predict loop and its end hooks
            self._finish(trainer)

    def _prepare(self, settings: dict, prompts: list[str] | None) -> list[int]:
        """Rank 0: check / reset the files; the sorted indices of finished prompts."""
        if not self.resume:
            self._refuse_to_replace()
            for path in [self.output, self.meta_path, *self.part_files()]:
                path.unlink(missing_ok=True)
            atomic_write_text(self.meta_path, json.dumps(settings, indent=1) + "\n")
            return []
        rows = read_rows(self.output, repair=True)
        for part in self.part_files():
            rows += read_rows(part, repair=True)
        if self.meta_path.exists():
            self._check_meta(settings)
        elif rows:
            raise ValueError(f"{self.output} holds {len(rows)} predictions but no {self.meta_path.name} saying what "
                             f"produced them, so they cannot be resumed safely; {START_OVER}, or write to another "
                             "output path")
        else:
            atomic_write_text(self.meta_path, json.dumps(settings, indent=1) + "\n")
        done = {}
        for row in rows:
            done.setdefault(row["index"], row)
        if prompts is not None:
            for i, row in sorted(done.items()):
                if i >= len(prompts) or ("prompt" in row and row["prompt"] != prompts[i]):
                    now = repr(prompts[i][:60]) if i < len(prompts) else f"no prompt {i} ({len(prompts)} prompts)"
                    raise ValueError(f"{self.output} does not match the prompts: its row {i} is for "
                                     f"{str(row.get('prompt'))[:60]!r}, the prompt file has {now}; resume with the "
                                     f"same prompts, {START_OVER}, or write to another output path")
        return sorted(done)

    def _refuse_to_replace(self) -> None:
        """A fresh run without `overwrite` must not delete predictions an earlier run wrote."""
        found = [p.name for p in [self.output, *self.part_files()] if p.exists()]
        if found and not self.overwrite:
            raise FileExistsError(
                f"{self.output} already holds predictions ({', '.join(found)}), and this run would delete them. Set "
                "resume: true (--trainer.callbacks.init_args.resume true) to keep them and generate only the missing "
                "prompts, overwrite: true (--trainer.callbacks.init_args.overwrite true) to start over, or write to "
                "another output path")

    def _check_meta(self, settings: dict) -> None:
        try:
            saved = json.loads(self.meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise ValueError(f"{self.meta_path} is not valid JSON; {START_OVER}") from None
        keys = sorted((set(saved) | set(settings)) - set(INFORMATIONAL))
        diff = [f"{k}: file {saved.get(k)!r} vs this run {settings.get(k)!r}" for k in keys
                if saved.get(k) != settings.get(k)]
        if diff:
            raise ValueError(f"cannot resume {self.output}: it was written with other settings ("
                             + "; ".join(diff) + f"). Resume with the same settings, {START_OVER}, or write to "
                             "another output path")

    # ---- writing ------------------------------------------------------------------------------
    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        if self._fd is None:
            raise RuntimeError("JsonlPredictionWriter.setup did not run (the writer must be a Trainer callback)")
        for row in prediction:
            data = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
            while data:  # one write per line; a partial write (rare, huge lines) continues where it stopped
                data = data[os.write(self._fd, data):]
        os.fsync(self._fd)

    def on_predict_end(self, trainer, pl_module) -> None:
        self._finish(trainer)

    def _finish(self, trainer) -> None:
        if self._merged:
            return
        self._merged = True
        if self._fd is not None:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
        trainer.strategy.barrier("twotower-jsonl-parts-written")
        error = None
        if trainer.is_global_zero:
            try:
                self.merge(expected=getattr(trainer.datamodule, "num_prompts", None))
            except Exception as e:  # raised after the barrier, so that no rank waits for rank 0 forever
                error = e
        trainer.strategy.barrier("twotower-jsonl-merged")
        if error is not None:
            raise error

    def merge(self, expected: int | None = None) -> int:
        """Rank 0: the output (kept on resume; a fresh run removed it at start) and every part file
        -> one file sorted by index, the first row per index kept; parts removed. Returns the row count."""
        rows: dict[int, dict] = {}
        for path in [self.output, *self.part_files()]:
            for row in read_rows(path):
                rows.setdefault(row["index"], row)
        text = "".join(json.dumps(rows[i], ensure_ascii=False) + "\n" for i in sorted(rows))
        atomic_write_text(self.output, text)
        for part in self.part_files():
            part.unlink(missing_ok=True)
        if expected is not None:
            missing = sorted(set(range(expected)) - rows.keys())
            if missing:
                raise RuntimeError(f"{self.output}: {len(missing)} of {expected} prompts have no prediction "
                                   f"(indices {missing[:10]}...); rerun with resume: true to fill them in")
        return len(rows)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.lock.release()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "predict")  # Lightning calls teardown only after a run that did not raise


def _settings_of(pl_module) -> dict:
    """What produced the rows: the module's `prediction_settings()` if it has one."""
    get = getattr(pl_module, "prediction_settings", None)
    if get is not None:
        return dict(get())
    return {"module": type(pl_module).__qualname__}
