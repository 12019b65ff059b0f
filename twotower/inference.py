"""GenerationModule: `predict` for a batch of prompts, from a YAML recipe.

    python -m twotower.cli predict --config recipes/generate.yaml

The module loads a two-tower checkpoint directory and generates with the sampler the recipe names
(`class_path`, any importable `Sampler` subclass, the user's own included). Inference-only choices
(sampler, steps, temperature) live here, never in training checkpoints. Two-device placement
happens when prediction starts (LightningCLI first moves the whole module to one device).
Each prediction is a list of per-prompt dicts; `JsonlPredictionWriter` writes them as JSONL.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from .samplers import ConfidenceThreshold, MockAR, Sampler
from .tokenizers import ByteTokenizer, Tokenizer

MODES = ("diffusion", "speculative", "mock_ar", "ar")


class GenerationModule(L.LightningModule):
    """Generate continuations for prompt batches from `PromptDataModule`.

    Args:
        model: a two-tower checkpoint directory (released layout).
        mode: "diffusion" (the sampler decides commits), "speculative" (the denoiser drafts, the
            context tower verifies: the AR model's own output, fewer forwards), "mock_ar" (one token
            per denoiser step, left to right) or "ar" (context tower alone, the baseline).
        sampler: the commit policy for "diffusion" (and for the draft steps before the last in
            "speculative"); default ConfidenceThreshold(0.8).
        block_size: tokens per block (default: the checkpoint's).
        steps_per_block: the most denoiser steps a block may take ("diffusion").
        draft_steps: denoiser steps per draft ("speculative").
        max_new_tokens: per prompt.
        temperature: 0 = greedy; > 0 samples (Gumbel-max) with `seed`.
        stop_at_eos: stop a sequence at the tokenizer's EOS.
        context_device / denoiser_device: e.g. "cuda:0" / "cuda:1" to split the towers.
        dtype: "float32", "bfloat16" or "float16" (None keeps the checkpoint's).
        compile: `torch.compile` the towers' hot paths (`TwoTowerLM.compile_towers`) when prediction
            starts: slower first batches, faster after.
        tokenizer: decodes completions; default the byte tokenizer.
    """

    def __init__(self, model: str, mode: str = "diffusion", sampler: Sampler | None = None,
                 block_size: int | None = None, steps_per_block: int = 16, draft_steps: int = 1,
                 max_new_tokens: int = 128,
                 temperature: float = 0.0, stop_at_eos: bool = True, context_device: str | None = None,
                 denoiser_device: str | None = None, dtype: str | None = None, seed: int | None = 0,
                 tokenizer: Tokenizer | None = None, compile: bool = False):
        super().__init__()
        from .model import TwoTowerLM

        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if (context_device is None) != (denoiser_device is None):
            raise ValueError("give both context_device and denoiser_device, or neither")
        torch_dtype = None
        if dtype is not None:
            if dtype not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
            torch_dtype = getattr(torch, dtype)
        if not (Path(model) / "config.json").exists():
            raise FileNotFoundError(f"two-tower checkpoint not found: {Path(model) / 'config.json'} "
                                    "(make one with `python -m twotower.cli convert` or `export`)")
        self.model = TwoTowerLM.from_pretrained(model, dtype=torch_dtype)
        self.model.eval().requires_grad_(False)
        self.mode = mode
        self.sampler = MockAR() if mode == "mock_ar" else (sampler or ConfidenceThreshold(0.8))
        self.block_size = block_size or self.model.block_size
        self.steps_per_block = self.block_size if mode == "mock_ar" else steps_per_block
        self.draft_steps = draft_steps
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.stop_at_eos = stop_at_eos
        self.devices = (context_device, denoiser_device)
        self.seed = seed
        self.tokenizer = tokenizer or ByteTokenizer()
        self.compile = compile

    def on_predict_start(self) -> None:
        if self.devices[0] is not None:
            self.model.place_towers_on_devices(*self.devices)
        if self.compile:
            self.model.compile_towers()

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        gen = None
        if self.temperature > 0 and self.seed is not None:
            gen = torch.Generator(device=self.model.context_device).manual_seed(self.seed + batch_idx)
        eos = self.tokenizer.eos_token_id if self.stop_at_eos else None
        if self.mode == "ar":
            out = self.model.generate_ar(ids, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                         eos_token_id=eos, attention_mask=mask, generator=gen, return_dict=True)
        elif self.mode == "speculative":
            out = self.model.generate_speculative(ids, self.max_new_tokens, self.block_size, self.draft_steps,
                                                  self.temperature, eos, mask, sampler=self.sampler, generator=gen,
                                                  return_dict=True)
        else:
            out = self.model.generate(ids, attention_mask=mask, sampler=self.sampler, block_size=self.block_size,
                                      steps_per_block=self.steps_per_block, max_new_tokens=self.max_new_tokens,
                                      temperature=self.temperature, eos_token_id=eos, generator=gen)
        rows = []
        for r in range(ids.shape[0]):
            n = int(out.num_generated[r])
            new = out.new_tokens[r, :n].tolist()
            rows.append({
                "index": int(batch["index"][r]),
                "prompt": batch["prompts"][r],
                "completion": self.tokenizer.decode(new),
                "prompt_tokens": int(mask[r].sum()),
                "generated_tokens": n,
                "nfe": int(out.nfe[r]),
                "tokens_per_nfe": round(float(out.tokens_per_nfe[r]), 4),
                "seconds": round(float(out.seconds[r]), 4),
                "mode": self.mode,
            })
        return rows


class JsonlPredictionWriter(BasePredictionWriter):
    """Writes each predicted row as one JSON line, in prompt order, as batches finish."""

    def __init__(self, output: str = "predictions.jsonl"):
        super().__init__(write_interval="batch")
        self.output = Path(output)

    def on_predict_start(self, trainer, pl_module) -> None:
        self.output.parent.mkdir(parents=True, exist_ok=True)
        self.output.write_text("")  # a fresh file per run: no stale lines from an earlier run

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
        with self.output.open("a", encoding="utf-8") as f:
            for row in prediction:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
