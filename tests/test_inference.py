"""`predict` end to end: recipe -> GenerationModule -> JSONL, with decoders chosen by class_path (the
user's own decoder and sampler classes included)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from twotower.decoding import Autoregressive, MaskDiffusion, MockAR, Speculative, TolerantSpeculative
from twotower.inference import GenerationModule
from twotower.samplers import FrontierRun, TopKCommit

ROOT = Path(__file__).resolve().parents[1]

# twotower_dir (conftest): a tiny two-tower checkpoint, byte-tokenizer vocabulary, block size 8.


def _prompts(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "prompts.jsonl"
    with path.open("w") as f:
        for i in range(n):
            key = "prompt" if i % 2 else "text"
            f.write(json.dumps({key: "def f%d(x):\n    return " % i + "x" * i}) + "\n")
    return path


def _predict(tmp_path, model_dir, prompts, *extra, env=None, config="recipes/generate.yaml"):
    out = tmp_path / "pred.jsonl"
    cmd = [sys.executable, "-m", "twotower.cli", "predict", "--config", config,
           "--model.init_args.model", str(model_dir), "--data.init_args.prompts", str(prompts),
           "--data.init_args.batch_size", "3", "--model.init_args.max_new_tokens", "12",
           "--trainer.callbacks.init_args.output", str(out), "--trainer.enable_progress_bar", "false", *extra]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_predict_writes_one_line_per_prompt(twotower_dir, tmp_path):
    rows = _predict(tmp_path, twotower_dir, _prompts(tmp_path, 7))
    assert [r["index"] for r in rows] == list(range(7))
    for r in rows:
        assert {"prompt", "completion", "prompt_tokens", "generated_tokens", "nfe", "tokens_per_nfe", "seconds"} <= set(r)
        assert 1 <= r["generated_tokens"] <= 12 and r["nfe"] >= 1 and r["seconds"] >= 0
        assert abs(r["tokens_per_nfe"] - r["generated_tokens"] / r["nfe"]) < 1e-3
    assert rows[3]["prompt"].startswith("def f3(x)")


def test_predict_with_users_own_sampler_class(twotower_dir, tmp_path):
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "my_samplers.py").write_text(textwrap.dedent('''
        from twotower.samplers import Sampler, commit_top_n

        class CommitThree(Sampler):
            """Commit exactly three positions per step (the last step takes the rest)."""
            def __init__(self, k: int = 3):
                self.k = k

            def select(self, confidence, candidates, masked, *, step, steps_per_block, logits=None):
                return commit_top_n(confidence, masked, self.k)
    '''))
    env = dict(os.environ, PYTHONPATH=f"{pkg}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    rows = _predict(tmp_path, twotower_dir, _prompts(tmp_path, 2),
                    "--model.init_args.decoder.init_args.sampler", "my_samplers.CommitThree",
                    "--model.init_args.decoder.init_args.sampler.k", "3", "--model.init_args.stop_at_eos", "false",
                    env=env)
    # Blocks of 8 with 3 commits per step: 3 denoiser steps per block (3 + 3 + 2), 12 tokens = 8 + 4.
    assert all(r["generated_tokens"] == 12 for r in rows)
    assert all(r["nfe"] == 3 + 2 for r in rows)  # block 1: 3 steps; block 2 (4 tokens): 2 steps


def test_predict_with_users_own_decoder_class(twotower_dir, tmp_path):
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "my_decoders.py").write_text(textwrap.dedent('''
        import torch
        from twotower.decoding import Decoder

        class RepeatLast(Decoder):
            """Writes the prompt's last token `times` times per forward-free step (a toy loop)."""
            uses_denoiser = False

            def __init__(self, times: int = 2):
                super().__init__()
                self.times = times

            def _decode(self, call):
                tracker = call.tracker(spare=self.times)
                last = call.input_ids[:, -1:]
                for _ in range(-(-call.max_new_tokens // self.times)):
                    tracker.count_forward(None)
                    tracker.commit(last.repeat(1, self.times), torch.full((last.shape[0],), self.times))
                return tracker.output(call.input_ids, blocks=0)
    '''))
    env = dict(os.environ, PYTHONPATH=f"{pkg}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    rows = _predict(tmp_path, twotower_dir, _prompts(tmp_path, 3), "--model.init_args.decoder", "my_decoders.RepeatLast",
                    "--model.init_args.decoder.times", "4", env=env)
    for r in rows:
        assert r["decoder"] == "RepeatLast" and r["generated_tokens"] == 12 and r["nfe"] == 3
        assert r["completion"] == r["prompt"][-1] * 12


def test_predict_recipe_with_speculative_decoder_is_the_ar_output(twotower_dir, tmp_path):
    prompts = _prompts(tmp_path, 4)
    spec = _predict(tmp_path, twotower_dir, prompts, config="recipes/generate_speculative.yaml")
    ar = _predict(tmp_path, twotower_dir, prompts, "--model.init_args.decoder", "twotower.decoding.Autoregressive",
                  "--trainer.callbacks.init_args.overwrite", "true")  # the same output file
    assert [r["completion"] for r in spec] == [r["completion"] for r in ar]
    assert {r["decoder"] for r in spec} == {"Speculative"} and {r["decoder"] for r in ar} == {"Autoregressive"}


@pytest.mark.parametrize("decoder", [Autoregressive(), MockAR(), MaskDiffusion(), Speculative(),
                                     MaskDiffusion(TopKCommit(3), steps_per_block=4), MaskDiffusion(FrontierRun(0.5)),
                                     TolerantSpeculative(0.5)], ids=repr)
def test_generation_module_runs_its_decoder_like_the_model(twotower_dir, decoder):
    from twotower.data import PromptDataModule

    data = PromptDataModule(prompt_list=["abc", "hello world"], batch_size=2)
    batch = next(iter(data.predict_dataloader()))
    module = GenerationModule(str(twotower_dir), decoder=decoder, max_new_tokens=10, stop_at_eos=False)
    rows = module.predict_step(batch, 0)
    ref = module.model.generate(batch["input_ids"], batch["attention_mask"], decoder, max_new_tokens=10)
    for r, row in enumerate(rows):
        assert row["completion"] == module.tokenizer.decode(ref.new_tokens[r].tolist())
        assert row["nfe"] == int(ref.nfe[r]) and row["decoder"] == type(decoder).__name__


def test_a_decoder_name_comes_from_the_one_registry(twotower_dir):
    """predict resolves a decoder name as serve and eval do (`decoding.register_decoder`)."""
    from twotower.decoding import Speculative

    assert type(GenerationModule(str(twotower_dir), decoder="speculative").decoder) is Speculative


def test_generation_module_bad_values(twotower_dir, tmp_path):
    with pytest.raises(ValueError, match="decoder must be a twotower.decoding.Decoder"):
        GenerationModule(str(twotower_dir), decoder=3)
    with pytest.raises(ValueError, match="unknown decoder 'beam'.*register_decoder"):
        GenerationModule(str(twotower_dir), decoder="beam")
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
        GenerationModule(str(twotower_dir), max_new_tokens=0)
    with pytest.raises(FileNotFoundError, match="two-tower checkpoint not found"):
        GenerationModule(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="both context_device and denoiser_device"):
        GenerationModule(str(twotower_dir), context_device="cpu")
    with pytest.raises(ValueError, match="dtype"):
        GenerationModule(str(twotower_dir), dtype="int8")


def test_two_device_placement_in_module_on_cpu(twotower_dir):
    module = GenerationModule(str(twotower_dir), context_device="cpu", denoiser_device="cpu", max_new_tokens=6)
    module.on_predict_start()
    ids = torch.tensor([[1, 70, 71, 72]])
    rows = module.predict_step({"input_ids": ids, "attention_mask": torch.ones_like(ids), "prompts": ["x"],
                                "index": torch.tensor([0])}, 0)
    assert rows[0]["generated_tokens"] >= 1
