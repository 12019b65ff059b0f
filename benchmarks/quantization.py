"""int8 towers vs full precision: stored weight bytes, greedy agreement, speculative losslessness.

    PYTHONPATH=. python benchmarks/quantization.py [--model DIR] [--prompts 16] [--max-new-tokens 64]

Prints three measurements for `TwoTowerLM.from_pretrained(model, quantize="int8")`:

* weight bytes actually stored (every parameter and buffer: int8 values, their float32 scales,
  and the parts kept in precision) vs the same model loaded in bfloat16;
* greedy token agreement with the unquantized model on held-out prompts (stdlib held-out split,
  byte tokenizer): both in float32, so only the int8 rounding differs. Reported per decoder
  (Autoregressive: the context tower; MaskDiffusion: both towers) as the share of positions equal
  up to the first divergence and in total;
* that int8 speculative decoding returns exactly the int8 model's own AR (greedy) output.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.workload import heldout_token_docs, select_windows  # noqa: E402
from twotower.data import collate_prompts  # noqa: E402
from twotower.decoding import Autoregressive, MaskDiffusion, Speculative  # noqa: E402
from twotower.model import TwoTowerLM  # noqa: E402
from twotower.quantization import stored_bytes  # noqa: E402
from twotower.tokenizers import ByteTokenizer  # noqa: E402

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "twotower" / "assets" / "twotower"


def agreement(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(share of equal tokens, mean share of the prefix before the first difference)."""
    same = a == b
    prefix = torch.where(same.all(1), same.shape[1], (~same).int().argmax(1)).float() / same.shape[1]
    return same.float().mean().item(), prefix.mean().item()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=64)
    a = p.parse_args(argv)
    torch.manual_seed(0)

    bf16 = TwoTowerLM.from_pretrained(a.model, dtype=torch.bfloat16)
    int8_bf16 = TwoTowerLM.from_pretrained(a.model, dtype=torch.bfloat16, quantize="int8")
    full, qbytes = stored_bytes(bf16), stored_bytes(int8_bf16)
    print(f"weights stored: bf16 {full / 1e6:.3f} MB, int8 {qbytes / 1e6:.3f} MB, ratio {qbytes / full:.3f}")
    quantized = sum(b.numel() * b.element_size() for n, b in int8_bf16.named_buffers() if n.endswith(("_int8", "_scale")))
    kept = qbytes - quantized
    print(f"  kept in bf16/float32 (embeddings, heads, time modules, routers, norms, SSM): {kept / 1e6:.3f} MB "
          f"= {100 * kept / full:.1f} % of the bf16 model; the quantized projections store at "
          f"{quantized / (full - kept):.3f}x their bf16 bytes")
    del bf16, int8_bf16

    tok = ByteTokenizer()
    docs, source = heldout_token_docs(False, tok)
    windows = select_windows(docs, a.prompts, a.prompt_len, a.max_new_tokens, bos_id=tok.bos_token_id)
    ids, mask = collate_prompts([w.ids for w in windows], tok.pad_token_id)
    ref = TwoTowerLM.from_pretrained(a.model, dtype=torch.float32).eval()
    q = TwoTowerLM.from_pretrained(a.model, dtype=torch.float32, quantize="int8").eval()
    print(f"prompts: {len(windows)} x {a.prompt_len} tokens from the {source}, {a.max_new_tokens} new tokens, greedy")
    result = {"bytes_ratio": qbytes / full}
    with torch.inference_mode():
        outs = {}
        for name, dec in [("Autoregressive", Autoregressive()), ("MaskDiffusion", MaskDiffusion())]:
            r = ref.generate(ids, mask, dec, max_new_tokens=a.max_new_tokens).new_tokens
            o = q.generate(ids, mask, dec, max_new_tokens=a.max_new_tokens).new_tokens
            outs[name] = o
            tokens, prefix = agreement(o, r)
            result[name] = tokens
            print(f"{name:15s} int8 vs float32: {100 * tokens:.1f} % of tokens equal, "
                  f"{100 * prefix:.1f} % equal before the first difference")
        spec = q.generate(ids, mask, Speculative(), max_new_tokens=a.max_new_tokens).new_tokens
        lossless = torch.equal(spec, outs["Autoregressive"])
        result["speculative_equals_ar"] = lossless
        print(f"int8 Speculative == int8 Autoregressive: {lossless}")
    return result


if __name__ == "__main__":
    main()
