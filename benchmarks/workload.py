"""What the benchmark runs on: the held-out prompt windows, the models, the machine.

Prompts are byte-tokenised windows of the embedded corpus's held-out documents (never trained
on): prompt = [bos] + tokens[a : a + P], truth = the next N tokens. `--smoke` swaps the embedded
checkpoints for a tiny random model built in a temporary directory, so the whole harness runs in
seconds with nothing on disk.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import random
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["REPO_ROOT", "Window", "select_windows", "heldout_token_docs", "smoke_model", "load_models",
           "quiet_transformers", "machine_info"]

REPO_ROOT = Path(__file__).resolve().parents[1]


# ---- prompts ------------------------------------------------------------------------------------


@dataclass
class Window:
    """A held-out prompt: ids = [bos] + tokens[offset : offset + P], truth = the next N tokens."""

    doc: int
    offset: int
    ids: list[int]
    truth: list[int]


def select_windows(docs: list[list[int]], n: int, prompt_len: int, max_new_tokens: int, *, bos_id: int,
                   seed: int = 0) -> list[Window]:
    """n deterministic (seeded) windows from tokenised documents; documents too short are skipped.

    Documents are visited in a seeded order, round-robin, each visit drawing a fresh random offset,
    so the windows spread over as many documents as there are.
    """
    need = prompt_len + max_new_tokens
    eligible = [i for i, d in enumerate(docs) if len(d) >= need]
    if not eligible:
        longest = max((len(d) for d in docs), default=0)
        raise ValueError(f"no held-out document has prompt_len + max_new_tokens = {need} tokens (longest: "
                         f"{longest}); lower --prompt-len or --max-new-tokens")
    rng = random.Random(seed)
    rng.shuffle(eligible)
    seen, out = set(), []
    for k in range(n):
        doc = eligible[k % len(eligible)]
        span = len(docs[doc]) - need + 1
        for _ in range(16):  # avoid repeating a window when the document allows it
            offset = rng.randrange(span)
            if (doc, offset) not in seen:
                break
        seen.add((doc, offset))
        toks = docs[doc]
        out.append(Window(doc, offset, [bos_id] + list(toks[offset: offset + prompt_len]),
                          list(toks[offset + prompt_len: offset + need])))
    return out


def heldout_token_docs(smoke: bool, tokenizer) -> tuple[list[list[int]], str]:
    """Tokenised held-out documents of the embedded stdlib corpus (smoke: its first 60 documents)."""
    from twotower.data import TextDataModule

    dm = TextDataModule(tokenizer=tokenizer, max_documents=60 if smoke else None)
    docs = [tokenizer.encode(t) for t in dm.heldout_documents()]
    return docs, "stdlib held-out split" + (" (first 60 documents)" if smoke else "")


# ---- the models ---------------------------------------------------------------------------------


def smoke_model(tmp: Path):
    """(a tiny random TwoTowerLM over the byte vocabulary (260), the directory its backbone is saved in)."""
    from twotower.model import TwoTowerLM
    from twotower.pretraining import init_weights, tiny_nemotron_config
    from twotower.towers.nemotron_h.context import ContextTower
    from twotower.towers.saving import save_backbone_hf

    cfg = tiny_nemotron_config(pattern="M*-EM*E", vocab_size=260, hidden_size=32, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=8, intermediate_size=48, mamba_num_heads=4,
                               mamba_head_dim=8, ssm_state_size=8, n_groups=2, n_routed_experts=4,
                               num_experts_per_tok=2, moe_intermediate_size=24,
                               moe_shared_expert_intermediate_size=16, max_position_embeddings=512, chunk_size=16)
    ctx = ContextTower(cfg)
    init_weights(ctx, seed=0, std=0.3)
    with torch.no_grad():  # peaky logits, so that the confidence thresholds commit different amounts
        ctx.lm_head.weight.mul_(3.0)
    save_backbone_hf({k.removeprefix("backbone."): v for k, v in ctx.state_dict().items()}, tmp, config=cfg)
    return TwoTowerLM.from_backbone(tmp).eval(), tmp


def load_models(args, tmp: Path, device: torch.device, *, need_hf: bool = True):
    """(TwoTowerLM, the transformers `<Family>ForCausalLM` of its family or None, backbone dir), in eval
    mode on `device`.

    The transformers baseline loads the same backbone weights in the same dtype, with EOS disabled
    so that it, like every mode of ours, generates exactly max_new_tokens.
    """
    import transformers

    from twotower.model import TwoTowerLM
    from twotower.towers.base import family_for

    if args.smoke:
        model, backbone = smoke_model(tmp)
    else:
        model_dir, backbone = _resolve(args.model, "--model"), _resolve(args.backbone, "--backbone")
        model = TwoTowerLM.from_pretrained(model_dir).eval()
    model.to(device)
    if not need_hf:
        return model, None, Path(backbone)
    dtype = next(model.context.parameters()).dtype
    hf_class = getattr(transformers, family_for(model.config).hf_architecture)  # any registered family
    with quiet_transformers():
        hf = hf_class.from_pretrained(backbone, dtype=dtype).to(device).eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    return model, hf, Path(backbone)


def _resolve(path: str, flag: str) -> Path:
    p = Path(path)
    if not p.is_absolute() and not p.exists():
        p = REPO_ROOT / path  # the defaults are repo-relative, wherever the command runs from
    if not (p / "config.json").exists():
        raise SystemExit(f"{flag} {path}: no config.json there. Build the embedded model first (README), pass "
                         f"{flag} DIR, or try --smoke")
    return p


@contextlib.contextmanager
def quiet_transformers():
    """transformers' warnings and progress bars off for the block (they would interleave with ours)."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def machine_info(device: torch.device, threads: int) -> dict:
    """CPU model, cores, threads, library versions, device (and GPU name), date: what the figures depend on."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import transformers

    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": threads, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(), "device": str(device),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
