"""Draft quality of two-tower checkpoints, side by side, on held-out prompt windows of several seeds.

No timing: what a checkpoint's denoiser decides, per prompt-window seed (`workload.select_windows`,
the benchmark's windows):

- speculative (block 16, greedy): tokens per iteration (generated tokens / draft forwards, the
  benchmark's figure), and whether the output is AR's token for token (it must be);
- mask diffusion (ConfidenceThreshold 0.8, block 16): agreement@64 with the held-out text, NLL
  under the context tower, tokens per denoiser forward; AR's agreement and NLL on the same windows
  for the retention ratio.

    python benchmarks/draft_quality.py twotower/assets/twotower runs/denoiser_kl/export --seeds 1 2 3

Prints one line per model and seed, then mean and spread (population standard deviation) over the
seeds, and writes the whole result as JSON with --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import modes as mode_lib  # noqa: E402
from benchmarks import workload  # noqa: E402
from twotower.decoding import Autoregressive  # noqa: E402
from twotower.evaluation.quality import agreement, continuation_nll  # noqa: E402
from twotower.model import TwoTowerLM  # noqa: E402
from twotower.tokenizers import ByteTokenizer  # noqa: E402

METRICS = ("spec_tokens_per_iter", "diff_agreement", "diff_nll", "diff_tokens_per_nfe", "diff_agreement_retention")


def measure(model, prompts: torch.Tensor, truth: torch.Tensor, ar_tokens: torch.Tensor, *, block: int,
            threshold: float, batch: int) -> dict:
    """The figures of one model on one seed's windows (prompts (P, T), truth / ar_tokens (P, N))."""
    N = truth.shape[1]
    spec, diff = mode_lib.speculative(block).decoder, mode_lib.diffusion(threshold, block).decoder
    s_tok, s_nfe, d_tok, d_nfe = [], 0, [], 0
    for i in range(0, prompts.shape[0], batch):
        ids = prompts[i:i + batch]
        out = spec.generate(model, ids, None, max_new_tokens=N, eos_token_id=None)
        s_tok.append(out.new_tokens.cpu())
        s_nfe += int(out.nfe.sum())
        out = diff.generate(model, ids, None, max_new_tokens=N, eos_token_id=None)
        d_tok.append(out.new_tokens.cpu())
        d_nfe += int(out.nfe.sum())
    s_tok, d_tok = torch.cat(s_tok), torch.cat(d_tok)
    return {"spec_tokens_per_iter": s_tok.numel() / s_nfe, "spec_equals_ar": bool(torch.equal(s_tok, ar_tokens)),
            "diff_agreement": agreement(d_tok, truth).mean().item(),
            "diff_nll": continuation_nll(model.context, prompts, d_tok).mean().item(),
            "diff_tokens_per_nfe": d_tok.numel() / d_nfe}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("models", nargs="+", help="two-tower checkpoint directories")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="prompt-window seeds")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--threshold", type=float, default=0.8)
    p.add_argument("--batch", type=int, default=64, help="rows per generate call (rows are independent)")
    p.add_argument("--out", help="write the result as JSON here")
    args = p.parse_args(argv)

    models = {m: TwoTowerLM.from_pretrained(m).eval() for m in args.models}
    tok = ByteTokenizer(next(iter(models.values())).config.vocab_size)
    docs, _ = workload.heldout_token_docs(False, tok)
    result = {"settings": vars(args), "seeds": {}}
    with torch.inference_mode():
        for seed in args.seeds:
            windows = workload.select_windows(docs, args.prompts, args.prompt_len, args.max_new_tokens,
                                              bos_id=tok.bos_token_id, seed=seed)
            prompts = torch.tensor([w.ids for w in windows])
            truth = torch.tensor([w.truth for w in windows])
            first = next(iter(models.values()))  # AR is the context tower: the same for every model (checked)
            ar = Autoregressive().generate(first, prompts, None, max_new_tokens=args.max_new_tokens,
                                           eos_token_id=None).new_tokens.cpu()
            ar_agree = agreement(ar, truth).mean().item()
            row = {"ar_agreement": ar_agree, "ar_nll": continuation_nll(first.context, prompts, ar).mean().item(),
                   "models": {}}
            for name, model in models.items():
                if model.context.state_dict().keys() != first.context.state_dict().keys() or not all(
                        torch.equal(a, b) for a, b in zip(model.context.state_dict().values(),
                                                          first.context.state_dict().values())):
                    raise SystemExit(f"{name}: its context tower differs from {args.models[0]}'s; compare "
                                     "checkpoints of one backbone")
                m = measure(model, prompts, truth, ar, block=args.block, threshold=args.threshold, batch=args.batch)
                m["diff_agreement_retention"] = m["diff_agreement"] / ar_agree
                row["models"][name] = m
                print(f"seed {seed} {name}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                                          for k, v in m.items())
                      + f" (AR agreement {ar_agree:.4f}, AR NLL {row['ar_nll']:.4f})", flush=True)
            result["seeds"][seed] = row
    summary = {}
    for name in args.models:
        summary[name] = {}
        for k in METRICS:
            vals = [result["seeds"][s]["models"][name][k] for s in args.seeds]
            summary[name][k] = {"mean": statistics.fmean(vals), "std": statistics.pstdev(vals), "values": vals}
        summary[name]["spec_equals_ar_every_seed"] = all(result["seeds"][s]["models"][name]["spec_equals_ar"]
                                                         for s in args.seeds)
        print(f"{name}: " + ", ".join(f"{k} {v['mean']:.4f} +- {v['std']:.4f}" for k, v in summary[name].items()
                                      if isinstance(v, dict))
              + f", speculative == AR on every seed: {summary[name]['spec_equals_ar_every_seed']}")
    result["summary"] = summary
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
