"""What one speculative iteration of the real model costs, phase by phase, with and without the
inference copies of `TwoTowerLM.merge_adapters`:

    python benchmarks/real_model_phases.py                    # smollm2-135m, bf16, batch 1, 1 thread
    python benchmarks/real_model_phases.py --ops              # + torch.profiler's top operators per phase
    python benchmarks/real_model_phases.py --dtype float32 --threads 2 --kernels --variants plain \
        merged+fused "merged+fused, int8 draft"                # + one product per shape: float32 / int8 / bf16
    # README's real-model figures:
    python benchmarks/real_model_phases.py --rounds 5 --iterations 6 --ops > benchmarks/results/real_model_phases.txt

Phases, timed around the towers' public methods on one held prompt (the cache grows as in decoding):
    draft   DenoiserTower.forward_block over a block of 16 (position 0 known, the rest [MASK])
    verify  ContextTower.extend of the 16 drafted tokens, provisional, logits at every position
    accept  ContextTower.accept (the rollback: 2 of 16 kept, as a typical iteration)
    AR step ContextTower.extend of one token, last logits (what an iteration is counted in)
Variants, interleaved round by round on the same loaded model (so the machine's load hits them
alike): `plain` (as shipped), `merged` (LoRA merged), `merged+fused` (+ q/k/v and gate/up fused),
`merged+fused+packed` (`merge_adapters()`: + pre-packed for oneDNN, head included) and
`+ context fused` (`merge_adapters(fuse_context=True)`) and `+ context packed`
(`merge_adapters(pack_context=True)`: the context's products packed too, AR's steps included), and
`merged+fused, int8 draft` (`merge_adapters(int8_draft=True)`: the draft's products and head in
dynamic int8; the context's untouched) and `int8 draft + context packed` (`merge_adapters(int8_draft=True,
pack_context=True)`), the last also packed for inputs of at most 16 rows (`... context packed16`, `pack_rows=16`).
Phase times are thread CPU ms (`time.thread_time`; --kernels: wall ms),
the median over rounds; read ratios, not absolutes (the machine is shared). `iteration` is
draft + verify + accept, and `AR steps` that over the same variant's AR step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from twotower.model import TwoTowerLM

PROMPT = ("import os\n\n\ndef walk(top):\n    \"\"\"Yield every file below top.\"\"\"\n    for root, dirs, files in "
          "os.walk(top):\n        for name in files:\n            yield os.path.join(root, name)\n")
VARIANTS = {"plain": None, "merged": {"fuse": False, "pack": False}, "merged+fused": {"fuse": True, "pack": False},
            "merged+fused+packed": {"fuse": True, "pack": True},
            "+ context fused": {"fuse": True, "pack": True, "fuse_context": True},
            "+ context packed": {"fuse": True, "pack": True, "pack_context": True},
            "merged+fused, int8 draft": {"fuse": True, "int8_draft": True},
            "int8 draft + context packed": {"fuse": True, "int8_draft": True, "pack_context": True},
            # packed for inputs of up to 16 rows, not float32's default 128: oneDNN picks the layout by that size
            "int8 draft + context packed16": {"fuse": True, "int8_draft": True, "pack_context": True, "pack_rows": 16}}
PHASES = ("draft", "verify", "accept", "AR step")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (after one warm-up round)")
    p.add_argument("--iterations", type=int, default=8, help="iterations per round and variant")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--block", type=int, default=None, help="positions per draft and verify (default: the model's block)")
    p.add_argument("--ops", action="store_true", help="print torch.profiler's top operators per phase and variant")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT",
                   help=f"the variants to time (default: all of {list(VARIANTS)})")
    p.add_argument("--kernels", action="store_true",
                   help="also time one product per projection shape of the model at each --kernel-rows: float32 "
                        "F.linear, dynamic int8 (InferenceLinear(pack='int8')), float32 pre-packed for oneDNN and "
                        "bf16 where this CPU has a path")
    p.add_argument("--kernel-rows", type=int, nargs="+", default=[1, 16], metavar="ROWS",
                   help="the row counts of --kernels (default: 1 16)")
    return p.parse_args(argv)


def set_variant(model: TwoTowerLM, name: str) -> None:
    model.unmerge_adapters()
    if VARIANTS[name] is not None:
        model.merge_adapters(**VARIANTS[name])


def phase_calls(model: TwoTowerLM, ids: torch.Tensor, iterations: int, block: int | None = None):
    """(a fresh cache after the prompt, {phase: a callable running it once on that cache}); drafts and
    verifies of `block` positions (default: the model's block size)."""
    ctx, den, S = model.context, model.denoiser, block or model.block_size
    _, cache = ctx.prefill(ids, logits="last", capacity=ids.shape[1] + (S + 1) * (iterations + 2))
    x = torch.full((1, S), model.mask_token_id, dtype=torch.long)
    x[:, 0] = ids[0, -1]
    t = torch.full((1,), (S - 1) / S)
    drafted = torch.randint(100, 1000, (1, S), generator=torch.Generator().manual_seed(0))
    keep = torch.tensor([2])
    return cache, {"draft": lambda: den.forward_block(x, cache, t),
                   "verify": lambda: ctx.extend(cache, drafted, logits="all", provisional=True),
                   "accept": lambda: ctx.accept(cache, keep),
                   "AR step": lambda: ctx.extend(cache, drafted[:, :1], logits="last")}


def time_round(model: TwoTowerLM, ids: torch.Tensor, iterations: int, block: int | None = None) -> dict[str, float]:
    """Thread CPU ms per call of each phase over `iterations` iterations (draft, verify, accept, AR step)."""
    _, calls = phase_calls(model, ids, iterations, block)
    spent = dict.fromkeys(PHASES, 0.0)
    for _ in range(iterations):
        for name in PHASES:  # verify then accept: the cache stays settled between iterations
            t0 = time.thread_time()
            calls[name]()
            spent[name] += time.thread_time() - t0
    return {k: 1e3 * v / iterations for k, v in spent.items()}


def top_ops(model: TwoTowerLM, ids: torch.Tensor, rows: int = 8) -> None:
    """torch.profiler's operator table of each phase (3 calls each), with the operator count per call."""
    from torch.profiler import ProfilerActivity, profile

    _, calls = phase_calls(model, ids, 4)
    for name in ("draft", "verify", "AR step"):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                calls[name]()
                if name == "verify":
                    calls["accept"]()
        events = prof.key_averages()
        mm = sum(e.count for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
        packed = sum(e.count for e in events if e.key in ("mkldnn::_linear_pointwise", "quantized::linear_dynamic"))
        print(f"\n--- {name}: {mm / 3:.0f} matmuls + {packed / 3:.0f} packed or int8 products per call", flush=True)
        print(events.table(sort_by="self_cpu_time_total", row_limit=rows))


def time_call(fn, repeats: int = 30) -> float:
    """Median wall ms of fn() over `repeats` calls, after 3 warm-up calls. Wall, not thread CPU time: one
    product's kernels may run on several threads, and how much of it the calling thread does (or spins)
    differs between libraries (MKL, oneDNN, fbgemm), which would bias a thread-time comparison."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def kernel_table(model: TwoTowerLM, row_counts=(1, 16)) -> None:
    """One product per projection shape of the context tower (q/k/v and gate/up side by side, as fused) at
    each row count: float32 F.linear (MKL), dynamic int8, float32 pre-packed for oneDNN where it packs
    float32 (with whether each row of the packed product has the bits of that row's product alone) and
    bf16 where this CPU has a path."""
    from twotower.hardware import cpu_has_bf16_path, onednn_can_pack
    from twotower.towers.inference_linear import InferenceLinear

    layer = model.context.backbone.layers[0]
    att, mlp = layer.self_attn, layer.mlp
    shapes = {"q/k/v": torch.cat([att.q_proj.weight, att.k_proj.weight, att.v_proj.weight]), "o": att.o_proj.weight,
              "gate/up": torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]), "down": mlp.down_proj.weight,
              "head": model.context.lm_head.weight}
    bf16, packs = cpu_has_bf16_path(), onednn_can_pack(torch.float32)
    extra = [("packed float32 ms", "float32 / packed", "packed rows = alone")] if packs else []
    cols = ["product (out x in)", "rows", "float32 ms", "int8 ms", "float32 / int8",
            *[c for e in extra for c in e], *(["bf16 ms"] if bf16 else [])]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for name, w in shapes.items():
        w = w.detach().float()
        int8, packed = InferenceLinear(w, pack="int8"), InferenceLinear(w, pack=True) if packs else None
        for rows in row_counts:
            x = torch.randn(rows, w.shape[1])
            f32, q = time_call(lambda: torch.nn.functional.linear(x, w)), time_call(lambda: int8(x))
            line = f"| {name} ({w.shape[0]} x {w.shape[1]}) | {rows} | {f32:.3f} | {q:.3f} | {f32 / q:.2f} |"
            if packs:
                p = time_call(lambda: packed(x))
                alone = torch.cat([packed(x[r:r + 1]) for r in range(rows)])
                line += f" {p:.3f} | {f32 / p:.2f} | {'yes' if torch.equal(alone, packed(x)) else 'no'} |"
            if bf16:
                wb, xb = w.bfloat16(), x.bfloat16()
                line += f" {time_call(lambda: torch.nn.functional.linear(xb, wb)):.3f} |"
            print(line, flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model = TwoTowerLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype)).eval()
    ids = torch.tensor([model.tokenizer.encode(PROMPT)])
    results = {name: {k: [] for k in PHASES} for name in args.variants}
    with torch.inference_mode():
        for r in range(args.rounds + 1):
            for name in args.variants:
                set_variant(model, name)
                got = time_round(model, ids, args.iterations, args.block)
                if r:  # round 0 warms up
                    for k, v in got.items():
                        results[name][k].append(v)
            print(f"round {r}/{args.rounds}", file=sys.stderr, flush=True)
        med = {name: {k: statistics.median(v) for k, v in res.items()} for name, res in results.items()}
        print(f"{args.model}, {args.dtype}, batch 1, {args.threads} thread(s), block {args.block or model.block_size}: "
              f"thread CPU ms per call, median of {args.rounds} rounds x {args.iterations} iterations\n")
        print("| variant | draft | verify | accept | iteration | AR step | iteration in AR steps |")
        print("|---|---|---|---|---|---|---|")
        for name, m in med.items():
            it = m["draft"] + m["verify"] + m["accept"]
            print(f"| {name} | {m['draft']:.1f} | {m['verify']:.1f} | {m['accept']:.2f} | {it:.1f} | "
                  f"{m['AR step']:.1f} | {it / m['AR step']:.2f} |")
        if args.kernels:
            kernel_table(model, args.kernel_rows)
        if args.ops:
            for name in args.variants:
                set_variant(model, name)
                print(f"\n===== {name}")
                top_ops(model, ids)
    return 0


if __name__ == "__main__":
    sys.exit(main())
