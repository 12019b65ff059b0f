"""`predict` checks every prompt before the first forward (issue 21): a bad line, a value that is not
a prompt, one the tokenizer cannot encode, and one longer than the model's context leaves room for
with max_new_tokens are all reported at once (file:line and why), the run exits non-zero, and
nothing is written (no output, part file, sidecar or lock; an existing output is left alone)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# twotower_dir (conftest): a tiny two-tower checkpoint, byte tokenizer (BOS + one id per byte), 512 positions.


def _predict(tmp_path, model_dir, prompts: Path, *extra, max_new_tokens: int = 12):
    out = tmp_path / "out" / "pred.jsonl"
    cmd = [sys.executable, "-m", "twotower.cli", "predict", "--config", "recipes/generate.yaml",
           "--model.init_args.model", str(model_dir), "--data.init_args.prompts", str(prompts),
           "--data.init_args.batch_size", "2", "--model.init_args.max_new_tokens", str(max_new_tokens),
           "--model.init_args.decoder", "twotower.decoding.Autoregressive",
           "--trainer.callbacks.init_args.output", str(out), "--trainer.enable_progress_bar", "false", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    return proc, out


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_every_bad_prompt_is_reported_at_once_and_nothing_is_written(twotower_dir, tmp_path):
    prompts = _write(tmp_path / "p.jsonl", [
        json.dumps({"prompt": "ok one"}),                                  # 1
        json.dumps({"prompt": "x" * 600}),                                 # 2: 601 tokens > 500
        '{"prompt": "cut',                                                 # 3: not JSON
        json.dumps({"prompt": 5}),                                         # 4: not a prompt
        json.dumps({"messages": [{"role": "user", "content": "hi"}]}),     # 5: no chat template
        json.dumps({"prompt": "ok two"}),                                  # 6
        json.dumps({"text": "y" * 499}),                                   # 7: 500 tokens: fits exactly
        json.dumps({"text": "y" * 500}),                                   # 8: 501 tokens
    ])
    (tmp_path / "out").mkdir()
    proc, out = _predict(tmp_path, twotower_dir, prompts)
    assert proc.returncode != 0
    err = proc.stderr
    # the lines are read first: the JSON problems (3, 4) are reported together
    assert f"{prompts}:3" in err and f"{prompts}:4" in err, err[-3000:]
    assert list((tmp_path / "out").iterdir()) == []
    # with the JSON fixed, the encoding and length problems (2, 5, 8) are reported together
    lines = prompts.read_text().splitlines()
    lines[2], lines[3] = json.dumps({"prompt": "three"}), json.dumps({"prompt": "four"})
    _write(prompts, lines)
    proc, out = _predict(tmp_path, twotower_dir, prompts)
    assert proc.returncode != 0
    err = proc.stderr
    for n in (2, 5, 8):
        assert f"{prompts}:{n}:" in err, (n, err[-3000:])
    for n in (1, 3, 4, 6, 7):
        assert f"{prompts}:{n}:" not in err, (n, err[-3000:])
    assert "601 tokens; at most 500 fit" in err and "max_position_embeddings 512" in err and "chat template" in err
    assert "Traceback" not in err  # the list, not a stack trace
    assert list((tmp_path / "out").iterdir()) == []


def test_an_over_long_prompt_in_a_later_batch_fails_before_the_first(twotower_dir, tmp_path):
    """The issue's case: prompt 40 of 48 failed after 19 s, finished rows left in a part file. Here
    prompt 6 of 7 (batch 3): nothing runs, and an existing output with overwrite: true stays as it was."""
    prompts = _write(tmp_path / "p.jsonl", [json.dumps({"prompt": f"p{i}"}) for i in range(5)]
                     + [json.dumps({"prompt": "z" * 505}), json.dumps({"prompt": "p6"})])
    (tmp_path / "out").mkdir()
    old = tmp_path / "out" / "pred.jsonl"
    old.write_text('{"index": 0, "completion": "from an earlier run"}\n')
    proc, out = _predict(tmp_path, twotower_dir, prompts, "--trainer.callbacks.init_args.overwrite", "true")
    assert proc.returncode != 0
    assert f"{prompts}:6: the prompt is 506 tokens; at most 500 fit" in proc.stderr, proc.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["pred.jsonl"]
    assert old.read_text() == '{"index": 0, "completion": "from an earlier run"}\n'
    # the same file with a budget that fits runs
    proc, out = _predict(tmp_path, twotower_dir, prompts, "--trainer.callbacks.init_args.overwrite", "true",
                         max_new_tokens=6)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(out.read_text().splitlines()) == 7


def test_prompt_list_problems_are_reported_together():
    from twotower.data import PromptDataModule, PromptError

    with pytest.raises(PromptError) as e:
        PromptDataModule(prompt_list=["fine", 5, "", {"role": "user"}], add_bos=False).setup()
    assert [p.split(":")[0] for p in e.value.problems] == ["prompt 1", "prompt 2", "prompt 3"]
    assert "3 of 4 prompts cannot be generated" in str(e.value)


def test_the_length_check_runs_once_a_model_is_attached(twotower_dir):
    """A data module set up before the trainer (resume does that) still checks lengths when the
    module's budget becomes known."""
    from types import SimpleNamespace

    from twotower.data import PromptDataModule, PromptError
    from twotower.inference import GenerationModule

    dm = PromptDataModule(prompt_list=["short", "w" * 510])
    dm.setup()  # no trainer: no limit known yet
    gm = GenerationModule(str(twotower_dir), max_new_tokens=12)
    dm.trainer = SimpleNamespace(lightning_module=gm)
    with pytest.raises(PromptError, match=r"prompt 1: the prompt is 511 tokens; at most 500 fit"):
        dm.setup()
