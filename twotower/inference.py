"""Batch generation as a LightningModule: `python -m twotower.cli predict --config recipes/generate.yaml`.

`GenerationModule` loads a released-layout two-tower directory and generates with the decoder the
recipe names by `class_path` (any `twotower.decoding.Decoder` subclass, the user's own included),
which carries its own settings (sampler, block size, steps, temperature, ...). Inference-only
choices live here, never in training checkpoints. Two-device placement happens when prediction
starts (LightningCLI first moves the whole module to one device). Each prediction is a list of
per-prompt dicts; `JsonlPredictionWriter` writes them as JSONL.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from .decoding import Decoder, MaskDiffusion
from .tokenizers import BYTE_TOKENIZER, Tokenizer, check_tokenizer_fits, load_tokenizer


class GenerationModule(L.LightningModule):
    """Generate continuations for prompt batches from `PromptDataModule`.

    Args:
        model: a two-tower checkpoint directory (released layout).
        decoder: the decoding strategy, e.g. `twotower.decoding.Speculative` (lossless, the AR
            model's own output), `MaskDiffusion` (a sampler commits tokens), `MockAR`,
            `Autoregressive`; default `MaskDiffusion()` (ConfidenceThreshold(0.8), the model's block).
        max_new_tokens: per prompt.
        stop_at_eos: stop a sequence at the tokenizer's EOS.
        context_device / denoiser_device: e.g. "cuda:0" / "cuda:1" to split the towers.
        dtype: "float32", "bfloat16" or "float16" (None keeps the checkpoint's).
        seed: seeds sampling decoders (temperature > 0): batch i uses seed + i.
        tokenizer: decodes completions (and, linked by the CLI, encodes the prompts); default the
            checkpoint's own (`tokenizers.load_tokenizer`). One that does not fit the model (more ids
            than its embedding, or a byte tokenizer on a model that is not byte-level) is refused.
        compile: `torch.compile` the towers' hot paths (`TwoTowerLM.compile_towers`) when prediction
            starts: slower first batches, faster after.
    """

    def __init__(self, model: str, decoder: Decoder | None = None, max_new_tokens: int = 128,
                 stop_at_eos: bool = True, context_device: str | None = None, denoiser_device: str | None = None,
                 dtype: str | None = None, seed: int | None = 0, tokenizer: Tokenizer | None = None,
                 compile: bool = False):
        super().__init__()
        from .model import TwoTowerLM

        if decoder is not None and not isinstance(decoder, Decoder):
            raise ValueError(f"decoder must be a twotower.decoding.Decoder (chosen by class_path), got {decoder!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an int >= 1, got {max_new_tokens!r}")
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
        self.decoder = MaskDiffusion() if decoder is None else decoder
        self.max_new_tokens = max_new_tokens
        self.stop_at_eos = stop_at_eos
        self.devices = (context_device, denoiser_device)
        self.seed = seed
        if tokenizer is None:
            tokenizer = self.model.tokenizer or load_tokenizer(model)
        byte_level = getattr(self.model.config, "tokenizer", None) == BYTE_TOKENIZER
        self.tokenizer = check_tokenizer_fits(tokenizer, vocab_size=self.model.config.vocab_size,
                                              byte_level=byte_level, where=model)
        self.compile = compile

    def on_predict_start(self) -> None:
        if self.devices[0] is not None:
            self.model.place_towers_on_devices(*self.devices)
        if self.compile:
            self.model.compile_towers()

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        gen = None
        if self.decoder.temperature > 0 and self.seed is not None:
            gen = torch.Generator(device=self.model.context_device).manual_seed(self.seed + batch_idx)
        eos = self.tokenizer.eos_token_id if self.stop_at_eos else None
        out = self.model.generate(ids, mask, self.decoder, max_new_tokens=self.max_new_tokens, eos_token_id=eos,
                                  generator=gen)
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
                "decoder": type(self.decoder).__name__,
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
