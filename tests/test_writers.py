"""`predict` at scale: one JSONL file from any number of DDP ranks, resuming a killed run, one run per
output (its lock) and no silent deletion of an earlier output (`twotower.writers.JsonlPredictionWriter`),
through the real CLI in subprocesses."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from twotower.writers import JsonlPredictionWriter, read_rows

ROOT = Path(__file__).resolve().parents[1]
N_PROMPTS = 41  # not a multiple of the batch size (3) nor of the rank count (2)


def _prompts(tmp_path: Path, n: int = N_PROMPTS) -> Path:
    path = tmp_path / "prompts.jsonl"
    with path.open("w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": "def f%d(x):\n    return " % i + "x" * (i % 7)}) + "\n")
    return path


def _cli_command(model_dir, prompts, out, *extra) -> list[str]:
    return [sys.executable, "-m", "twotower.cli", "predict", "--config", "recipes/generate.yaml",
            "--model.init_args.model", str(model_dir), "--data.init_args.prompts", str(prompts),
            "--data.init_args.batch_size", "3", "--model.init_args.max_new_tokens", "12",
            "--trainer.callbacks.init_args.output", str(out), "--trainer.enable_progress_bar", "false", *extra]


def _cli(model_dir, prompts, out, *extra, env=None, check=True):
    proc = subprocess.run(_cli_command(model_dir, prompts, out, *extra), cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env=env)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


USER_CALLBACKS = textwrap.dedent('''
    import os
    import time
    from pathlib import Path

    from lightning.pytorch.callbacks import Callback

    class CrashAfter(Callback):
        """Kills the process (no cleanup, like a lost machine) after `batches` predict batches."""
        def __init__(self, batches: int = 4):
            self.batches = batches

        def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            if batch_idx + 1 >= self.batches:
                os._exit(17)

    class HoldAfter(Callback):
        """After `batches` predict batches, creates the file `ready` and waits until the file `go` exists."""
        def __init__(self, ready: str, go: str, batches: int = 1):
            self.ready, self.go, self.batches = Path(ready), Path(go), batches

        def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            if batch_idx + 1 == self.batches:
                self.ready.touch()
                while not self.go.exists():
                    time.sleep(0.05)
''')


def _user_callbacks(tmp_path: Path) -> dict:
    """An environment whose PYTHONPATH holds `user_callbacks` (CrashAfter, HoldAfter) for `--trainer.callbacks+=`."""
    pkg = tmp_path / "userpkg"
    pkg.mkdir(exist_ok=True)
    (pkg / "user_callbacks.py").write_text(USER_CALLBACKS)
    return dict(os.environ, PYTHONPATH=f"{pkg}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")


def _rows(path: Path) -> list[dict]:
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def _same(a: list[dict], b: list[dict]) -> bool:
    """Rows equal but for the wall-clock seconds."""
    def strip(rows):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    return strip(a) == strip(b)


def test_ddp_predict_writes_each_prompt_once_in_order(twotower_dir, tmp_path):
    prompts = _prompts(tmp_path)
    _cli(twotower_dir, prompts, tmp_path / "one.jsonl")
    one = _rows(tmp_path / "one.jsonl")
    _cli(twotower_dir, prompts, tmp_path / "two.jsonl", "--trainer.devices", "2", "--trainer.strategy", "ddp")
    two = _rows(tmp_path / "two.jsonl")
    assert [r["index"] for r in two] == list(range(N_PROMPTS))
    assert [r["completion"] for r in two] == [r["completion"] for r in one]
    assert _same(one, two)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("two.jsonl")) == \
        ["two.jsonl", "two.jsonl.meta.json"]  # the part files are gone


def test_killed_run_resumes_to_the_uninterrupted_output(twotower_dir, tmp_path):
    prompts = _prompts(tmp_path)
    _cli(twotower_dir, prompts, tmp_path / "full.jsonl")
    full = _rows(tmp_path / "full.jsonl")

    env = _user_callbacks(tmp_path)
    out = tmp_path / "pred.jsonl"
    proc = _cli(twotower_dir, prompts, out, "--trainer.callbacks+=user_callbacks.CrashAfter",
                "--trainer.callbacks.init_args.batches", "4", env=env, check=False)
    assert proc.returncode == 17, proc.stderr[-3000:]
    part = out.with_name("pred.jsonl.rank0.part")
    assert len(read_rows(part)) == 12 and not out.exists()  # 4 batches of 3, not merged yet
    assert json.loads(out.with_name("pred.jsonl.lock").read_text())["pid"] > 0  # left behind: stale
    with part.open("a") as f:  # and the process died in the middle of a line
        f.write('{"index": 12, "prompt": "def f1')

    writer = JsonlPredictionWriter(str(out), resume=True)
    assert len(read_rows(part)) == 12  # the torn line is not a row

    _cli(twotower_dir, prompts, out, "--trainer.callbacks.init_args.resume", "true")  # takes the stale lock over
    assert _same(_rows(out), full)
    assert not writer.part_files() and not writer.lock.path.exists()

    # Resuming a finished file generates nothing and leaves it as it is.
    before = out.read_text()
    _cli(twotower_dir, prompts, out, "--trainer.callbacks.init_args.resume", "true")
    assert out.read_text() == before


def test_resume_refuses_a_file_from_other_settings(twotower_dir, tmp_path):
    prompts = _prompts(tmp_path, 4)
    out = tmp_path / "pred.jsonl"
    _cli(twotower_dir, prompts, out)
    proc = _cli(twotower_dir, prompts, out, "--trainer.callbacks.init_args.resume", "true",
                "--model.init_args.decoder", "twotower.decoding.Autoregressive", check=False)
    assert proc.returncode != 0
    err = proc.stderr
    assert "cannot resume" in err and "decoder: file 'MaskDiffusion(" in err and "Autoregressive(" in err
    assert "resume: false" in err
    proc = _cli(twotower_dir, prompts, out, "--trainer.callbacks.init_args.resume", "true",
                "--model.init_args.max_new_tokens", "5", check=False)
    assert proc.returncode != 0 and "max_new_tokens: file 12 vs this run 5" in proc.stderr


def test_an_existing_output_is_kept_unless_overwrite_is_set(twotower_dir, tmp_path):
    prompts = _prompts(tmp_path, 4)
    out = tmp_path / "pred.jsonl"
    _cli(twotower_dir, prompts, out)
    before = out.read_text()
    proc = _cli(twotower_dir, prompts, out, "--model.init_args.decoder", "twotower.decoding.Autoregressive",
                check=False)
    assert proc.returncode != 0
    assert f"{out} already holds predictions (pred.jsonl)" in proc.stderr
    assert "resume: true" in proc.stderr and "overwrite: true" in proc.stderr
    assert out.read_text() == before and not out.with_name("pred.jsonl.lock").exists()  # released on the error
    _cli(twotower_dir, prompts, out, "--model.init_args.decoder", "twotower.decoding.Autoregressive",
         "--trainer.callbacks.init_args.overwrite", "true")
    assert {r["decoder"] for r in _rows(out)} == {"Autoregressive"}


def test_a_second_run_on_the_same_output_is_refused_while_the_first_runs(twotower_dir, tmp_path):
    prompts, out = _prompts(tmp_path, 9), tmp_path / "pred.jsonl"
    ready, go = tmp_path / "ready", tmp_path / "go"
    first = subprocess.Popen(_cli_command(twotower_dir, prompts, out, "--trainer.callbacks+=user_callbacks.HoldAfter",
                                          "--trainer.callbacks.init_args.ready", str(ready),
                                          "--trainer.callbacks.init_args.go", str(go)),
                             cwd=ROOT, env=_user_callbacks(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():  # the first run has written its first batch and waits
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-3000:]
            time.sleep(0.1)
        second = _cli(twotower_dir, prompts, out, check=False)
        assert second.returncode != 0
        assert f"PID {first.pid} on {socket.gethostname()}" in second.stderr
        assert f"lock {out}.lock" in second.stderr
        assert len(read_rows(out.with_name("pred.jsonl.rank0.part"))) == 3  # the first run's batch is still there
    finally:
        go.touch()
        _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert [r["index"] for r in _rows(out)] == list(range(9)) and not out.with_name("pred.jsonl.lock").exists()


def test_output_lock_takes_over_a_dead_owner_only(tmp_path):
    from twotower.writers import OutputLock

    path = tmp_path / "out.jsonl.lock"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    lock = OutputLock(path)
    lock.acquire()  # stale: its process has exited
    assert json.loads(path.read_text()) == {"pid": os.getpid(), "host": socket.gethostname()}
    with pytest.raises(RuntimeError, match=f"PID {os.getpid()} .*holds the lock {path}"):
        OutputLock(path).acquire()  # a live owner, even in this process
    lock.release()
    assert not path.exists()
    path.write_text(json.dumps({"pid": int(dead.stdout), "host": "elsewhere"}))
    with pytest.raises(RuntimeError, match="PID .* on elsewhere"):
        OutputLock(path).acquire()  # another machine's process cannot be checked
    path.write_text("")
    with pytest.raises(RuntimeError, match="names no owner"):
        OutputLock(path).acquire()
    OutputLock(path).release()  # not taken: leaves the file alone
    assert path.exists()


def test_read_rows_drops_a_torn_last_line_and_refuses_corruption(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"index": 0}\n{"index": 1}\n{"inde')
    assert [r["index"] for r in read_rows(path, repair=True)] == [0, 1]
    assert path.read_text() == '{"index": 0}\n{"index": 1}\n'  # repaired: appends start on a new line
    path.write_text('{"index": 0}\n{"ind\n{"index": 2}\n')
    with pytest.raises(ValueError, match="p.jsonl:2: not a JSON line"):
        read_rows(path)
    with pytest.raises(ValueError, match="resume must be true or false"):
        JsonlPredictionWriter(str(path), resume="yes")
    with pytest.raises(ValueError, match="resume and overwrite are both true"):
        JsonlPredictionWriter(str(path), resume=True, overwrite=True)


def test_prompt_data_module_skips_finished_prompts():
    from twotower.data import PromptDataModule

    dm = PromptDataModule(prompt_list=[f"p{i}" for i in range(7)], batch_size=2)
    assert dm.skip_prompts([0, 2, 3]) == 4
    batches = list(dm.predict_dataloader())
    assert [i for b in batches for i in b["index"].tolist()] == [1, 4, 5, 6]
    assert batches[0]["prompts"] == ["p1", "p4"]
    with pytest.raises(ValueError, match=r"indices \[9\] are outside the 7 prompts"):
        dm.skip_prompts([9])
