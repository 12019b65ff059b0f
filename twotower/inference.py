"""Batch generation as a LightningModule: `python -m twotower.cli predict --config recipes/generate.yaml`.

`GenerationModule` loads a released-layout two-tower directory and generates with the decoder the
recipe names by `class_path` (any `twotower.decoding.Decoder` subclass, the user's own included),
which carries its own settings (sampler, block size, steps, temperature, ...). Inference-only
choices live here, never in training checkpoints. Two-device placement happens when prediction
starts (LightningCLI first moves the whole module to one device). Each prediction is a list of
per-prompt dicts; `twotower.writers.JsonlPredictionWriter` writes them as one
JSONL file, under DDP too, and resumes a killed run. `prediction_settings()` is what the writer's
sidecar records, so that a resume with another model or decoder is refused.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch

from .decoding import Decoder, MaskDiffusion, build_decoder
from .decoding.base import length_limit
from .hub import resolve_model
from .model import TwoTowerLM
from .quantization import check_quantize
from .tokenizers import Tokenizer, load_draft_vocab, tokenizer_for
from .validation import check_draft_vocab, check_int, parse_dtype

__all__ = ["GenerationModule", "checkpoint_fingerprint"]

_SAMPLE = 1 << 20  # bytes hashed from each end of a weight file's data


def ids_digest(ids: torch.Tensor) -> str:
    """"<n> ids <hash>" of a token-id list: recorded with predictions instead of the list (up to a vocabulary)."""
    return f"{ids.numel()} ids {hashlib.sha256(ids.long().numpy().tobytes()).hexdigest()[:16]}"


def checkpoint_fingerprint(path: str | os.PathLike) -> str:
    """A short hash identifying a checkpoint directory's contents, cheap at any size.

    It covers config.json, the safetensors index, and per weight file its name, size, header
    (names, dtypes, shapes) and the first and last MiB of its data: retraining changes those bytes,
    while hashing every byte of a large checkpoint would take minutes. mtimes are left out, so a
    copied checkpoint keeps its fingerprint.
    """
    root = Path(path)
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json"):
        if (root / name).exists():
            h.update(name.encode() + b"\0" + (root / name).read_bytes())
    for file in sorted(root.glob("*.safetensors")):
        size = file.stat().st_size
        # NUL separators: a name and a size cannot run into one another and collide with another pair.
        h.update(f"{file.name}\0{size}\0".encode())
        with file.open("rb") as f:
            h.update(f.read(_SAMPLE))
            if size > _SAMPLE:
                # max: a file under 2 MiB has its tail read from where the head ended, no byte hashed twice.
                f.seek(max(_SAMPLE, size - _SAMPLE))
                h.update(f.read(_SAMPLE))
    return h.hexdigest()[:16]


class GenerationModule(L.LightningModule):
    """Generate continuations for prompt batches from `PromptDataModule`.

    Args:
        model: a two-tower checkpoint directory (released layout) or a built-in model name
            (`twotower.hub`: "embedded" is the embedded default).
        decoder: the decoding strategy, e.g. `twotower.decoding.Speculative` (lossless, the AR
            model's own output), `MaskDiffusion` (a sampler commits tokens), `MockAR`,
            `Autoregressive`; default `MaskDiffusion()` (ConfidenceThreshold(0.8), the model's block).
            A string is a name of the decoder registry (`decoding.register_decoder`: "speculative",
            "diffusion", "ar", ...), built with its defaults.
        max_new_tokens: per prompt.
        stop_at_eos: stop a sequence at the tokenizer's EOS.
        context_device / denoiser_device: e.g. "cuda:0" / "cuda:1" to split the towers.
        dtype: "float32", "bfloat16" or "float16" (None keeps the checkpoint's).
        seed: seeds sampling decoders (temperature > 0): batch i uses seed + i.
        tokenizer: decodes completions (and, linked by the CLI, encodes the prompts by
            `prompting.encode_prompt`); default the checkpoint's own (`tokenizers.tokenizer_for`).
            One that does not fit the model (more ids than its embedding, or a byte tokenizer on a
            model that is not byte-level) is refused.
        compile: `torch.compile` the towers' hot paths (`TwoTowerLM.compile_towers`) when prediction
            starts: slower first batches, faster after.
        quantize: "int8" loads both towers with weight-only int8 projections (about half the
            memory; see `twotower.quantization`); None keeps full precision.
        merge_adapters: when prediction starts, make the denoiser's inference copies
            (`TwoTowerLM.merge_adapters()`: LoRA merged, projections fused, weights pre-packed for oneDNN
            on a CPU): cheaper speculative drafts for about one more backbone of memory.
        int8_draft: make those copies, and the denoiser's head, in dynamic int8 instead
            (`TwoTowerLM.merge_adapters(int8_draft=True)`; implies merge_adapters): a draft about 3x
            cheaper in float32 on a CPU; the output stays AR's.
        pack_context: pre-pack the context tower's products for oneDNN too
            (`TwoTowerLM.merge_adapters(pack_context=True)`; implies merge_adapters): cheaper AR steps
            and verifies (up to 16 rows in bf16, 128 in float32), on a CPU.
        draft_vocab: the denoiser's head over these tokens only (`TwoTowerLM.merge_adapters(draft_vocab=...)`;
            implies merge_adapters): a JSON file of ids, a folder holding draft_vocab.json, or a built-in
            model that ships one ("smollm2-135m"; `tokenizers.load_draft_vocab`). A cheaper draft whose
            speculative output stays AR's; a diffusion decoder samples only these tokens.
    """

    def __init__(self, model: str, decoder: Decoder | str | None = None, max_new_tokens: int = 128,
                 stop_at_eos: bool = True, context_device: str | None = None, denoiser_device: str | None = None,
                 dtype: str | None = None, seed: int | None = 0, tokenizer: Tokenizer | None = None,
                 compile: bool = False, quantize: str | None = None, merge_adapters: bool = False,
                 int8_draft: bool = False, pack_context: bool = False, draft_vocab: str | None = None):
        super().__init__()
        if isinstance(decoder, str):  # a name of the one decoder registry (or a class_path), default settings
            decoder = build_decoder(decoder)
        if decoder is not None and not isinstance(decoder, Decoder):
            raise ValueError(f"decoder must be a twotower.decoding.Decoder (chosen by class_path) or a registered "
                             f"decoder name, got {decoder!r}")
        check_int("max_new_tokens", max_new_tokens)
        if (context_device is None) != (denoiser_device is None):
            raise ValueError("give both context_device and denoiser_device, or neither")
        torch_dtype = None if dtype is None else parse_dtype("dtype", dtype)
        self.quantize = check_quantize(quantize)
        model = resolve_model(model, kind="two-tower checkpoint")
        if not (model / "config.json").exists():
            raise FileNotFoundError(f"two-tower checkpoint not found: {model / 'config.json'} "
                                    "(make one with `python -m twotower.cli convert` or `export`)")
        self.model = TwoTowerLM.from_pretrained(model, dtype=torch_dtype, quantize=quantize)
        # Frozen for good: LightningCLI's predict never trains, and no autograd graph is kept.
        self.model.eval().requires_grad_(False)
        self.decoder = MaskDiffusion() if decoder is None else decoder
        self.max_new_tokens = max_new_tokens
        self.stop_at_eos = stop_at_eos
        self.devices = (context_device, denoiser_device)
        self.seed = seed
        self.tokenizer = tokenizer_for(self.model, model, tokenizer)
        self.compile = compile
        self.int8_draft, self.pack_context = bool(int8_draft), bool(pack_context)
        # Read and checked now, against the loaded model: a bad list fails before any prompt is read.
        self.draft_vocab = None if draft_vocab is None else check_draft_vocab(load_draft_vocab(draft_vocab),
                                                                              self.model.config.vocab_size)
        self.merge_adapters = (bool(merge_adapters) or self.int8_draft or self.pack_context
                               or self.draft_vocab is not None)
        self.model_dir = str(model.resolve())
        self.fingerprint = checkpoint_fingerprint(model)
        self.dtype_name = dtype

    def prediction_settings(self) -> dict[str, Any]:
        """What determines the completions, as JSON values: recorded next to a predictions file so
        that resuming it with another model, decoder or setting is refused."""
        return {
            "model": self.model_dir,
            "fingerprint": self.fingerprint,
            "decoder": repr(self.decoder),
            "max_new_tokens": self.max_new_tokens,
            "stop_at_eos": self.stop_at_eos,
            "seed": self.seed,
            "dtype": self.dtype_name,
            "quantize": self.quantize,
            "tokenizer": repr(self.tokenizer),
            # Only when on, so that predictions files written before the option resume as they were.
            **({"merge_adapters": True} if self.merge_adapters else {}),
            **({"int8_draft": True} if self.int8_draft else {}),
            **({"pack_context": True} if self.pack_context else {}),
            **({"draft_vocab": ids_digest(self.draft_vocab)} if self.draft_vocab is not None else {}),
        }

    def prompt_budget(self) -> tuple[int, str] | None:
        """(the most prompt tokens a prompt may have, why): the model's context (max_position_embeddings,
        or a shorter sliding window) minus max_new_tokens; None when the model sets no limit.
        `PromptDataModule.setup` checks every prompt against it before the first forward."""
        limit, name = length_limit(self.model.context)
        if limit is None:
            return None
        return limit - self.max_new_tokens, (f"the model's context, {name} {limit}, minus "
                                             f"max_new_tokens {self.max_new_tokens}")

    def on_predict_start(self) -> None:
        if self.devices[0] is not None:
            self.model.place_towers_on_devices(*self.devices)
        if self.merge_adapters:  # after every move: moving the model drops the copies
            self.model.merge_adapters(int8_draft=self.int8_draft, pack_context=self.pack_context,
                                      draft_vocab=self.draft_vocab)
        if self.compile:
            self.model.compile_towers()

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        gen = None
        if self.decoder.temperature > 0 and self.seed is not None:
            # Seeded per batch, not once: a resumed run (or another DDP rank) draws a batch as a full run would.
            gen = torch.Generator(device=self.model.context_device).manual_seed(self.seed + batch_idx)
        eos = self.tokenizer.eos_token_id if self.stop_at_eos else None
        out = self.model.generate(ids, mask, self.decoder, max_new_tokens=self.max_new_tokens, eos_token_id=eos,
                                  generator=gen)
        rows = []
        for r in range(ids.shape[0]):
            # Rows end at different lengths: new_tokens past num_generated is padding, not output.
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
