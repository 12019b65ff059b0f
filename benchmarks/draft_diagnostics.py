"""Where a speculative draft loses tokens: teacher-forced drafts against the real loop, per checkpoint.

On held-out prompt windows (`workload.select_windows`) continued greedily by the AR model:

- teacher forced: every block of 16 after the prompt, fully masked apart from its first token (the
  context tower's own), drafted in one denoiser forward over the clean prefix, the way training
  sees blocks: per-position accuracy against AR's tokens and the mean accepted prefix (the leading
  run of correct positions, what a speculative iteration would keep after position 0);
- the real loop (`Speculative`, batch 1): tokens kept per iteration, for the first iteration after
  the prompt and for iterations that start right after a rejected draft (each row's last iteration,
  cut by max_new_tokens, left out).

    python benchmarks/draft_diagnostics.py twotower/assets/twotower [more checkpoints] --prompts 32 --seed 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import workload  # noqa: E402
from twotower.decoding import Autoregressive, Speculative  # noqa: E402
from twotower.model import TwoTowerLM  # noqa: E402
from twotower.tokenizers import ByteTokenizer  # noqa: E402


def teacher_forced(model, prompts: torch.Tensor, ar: torch.Tensor) -> tuple[list[float], float]:
    """(per-position accuracy of positions 1 .. S-1, mean accepted prefix) of full-mask drafts of the
    blocks of `ar` (P, N), N a multiple of S, each over the clean prompt + the AR tokens before it."""
    S = model.block_size
    P, N = ar.shape
    if N % S:
        raise ValueError(f"max_new_tokens {N} must be a multiple of the block size {S}")
    mask_id, ctx, den = model.config.mask_token_id, model.context, model.denoiser
    ok = []
    for k in range(N // S):
        _, cache = ctx.prefill(torch.cat([prompts, ar[:, :k * S]], 1), logits="none")
        block = torch.full((P, S), mask_id, dtype=torch.long)
        block[:, 0] = ar[:, k * S]
        t = torch.full((P,), (S - 1) / S)
        logits = den.forward_block(block, cache, t)
        if model.shifted:  # output i predicts position i + 1
            pred = logits[:, :-1].argmax(-1)
        else:
            pred = logits[:, 1:].argmax(-1)
        ok.append(pred == ar[:, k * S + 1:(k + 1) * S])
    ok = torch.cat(ok)  # (P * blocks, S - 1)
    return ok.float().mean(0).tolist(), ok.long().cumprod(-1).sum(-1).float().mean().item()


def loop_keeps(model, prompts: torch.Tensor, max_new_tokens: int) -> list[list[int]]:
    """Tokens kept per iteration of the real speculative loop, one list per prompt (batch 1)."""
    keeps: list[list[int]] = []
    accept = model.context.accept

    def record(cache, keep):
        keeps[-1].append(int(keep[0]))
        return accept(cache, keep)

    model.context.accept = record
    try:
        for row in prompts:
            keeps.append([])
            Speculative().generate(model, row[None], None, max_new_tokens=max_new_tokens, eos_token_id=None)
    finally:
        del model.context.accept
    return keeps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=1, help="prompt-window seed")
    args = p.parse_args(argv)
    tok = ByteTokenizer(260)
    docs, _ = workload.heldout_token_docs(False, tok)
    windows = workload.select_windows(docs, args.prompts, args.prompt_len, args.max_new_tokens,
                                      bos_id=tok.bos_token_id, seed=args.seed)
    prompts = torch.tensor([w.ids for w in windows])
    with torch.inference_mode():
        for path in args.models:
            model = TwoTowerLM.from_pretrained(path).eval()
            ar = Autoregressive().generate(model, prompts, None, max_new_tokens=args.max_new_tokens,
                                           eos_token_id=None).new_tokens
            acc, prefix = teacher_forced(model, prompts, ar)
            keeps = [k[:-1] for k in loop_keeps(model, prompts, args.max_new_tokens)]
            every = [k for ks in keeps for k in ks]
            after_reject = [k for ks in keeps for prev, k in zip(ks, ks[1:]) if prev < model.block_size]
            print(f"{path}: teacher-forced accepted prefix {prefix:.3f} (per position "
                  + " ".join(f"{a:.2f}" for a in acc) + f"); loop: {len(every)} iterations keep "
                  f"{statistics.fmean(every):.3f}, first {statistics.fmean(k[0] for k in keeps if k):.3f}, "
                  f"after a rejected draft {statistics.fmean(after_reject):.3f} ({len(after_reject)})", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
