"""What one speculative iteration costs, and what each cost lever buys: `python benchmarks/spec_cost.py`.

Two parts, on the embedded default and held-out prompt windows (as `bench.py` draws them), greedy,
no EOS (every row makes --max-new-tokens):

1. The cost split of one `Speculative` iteration at each batch size: the denoiser's draft forward
   (`DenoiserTowerBase.forward_block`), the verifying extend (`ContextTowerBase.extend`, provisional), the
   rollback (`ContextTowerBase.accept`), the per-row bookkeeping (`RowTracker.commit`) and the rest of
   the loop (draft choice, agreement, row dropping, compaction, host syncs), per iteration, next to
   one AR step (`Autoregressive`'s whole call divided by its steps). The prefill, paid once per
   call by both decoders, is left out of both.
2. Interleaved A/B runs of the levers, each against the shipped settings: every generate call of a
   lever is followed (or preceded, alternating) by the same call of the baseline, and the ratio of
   their summed times is taken per round; the median over rounds is printed, with tokens per
   iteration and whether the output tokens are identical (they must be: every lever is lossless).

Times are thread CPU seconds (`time.thread_time`) with torch on one thread, which a busy machine's
other processes do not inflate; wall seconds are printed next to them. Read ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.workload import REPO_ROOT, heldout_token_docs, select_windows  # noqa: E402
from twotower import ByteTokenizer, TwoTowerLM  # noqa: E402
from twotower.decoding import Autoregressive, RowTracker, Speculative, denoise_block  # noqa: E402
from twotower.decoding import speculative as spec_module  # noqa: E402
from twotower.towers.nemotron_h import layers  # noqa: E402


def clocks() -> tuple[float, float]:
    return time.perf_counter(), time.thread_time()


# ---- part 1: where an iteration's time goes ------------------------------------------------------


class Split:
    """Accumulated (wall, cpu) seconds per phase; `wrap` times a callable (outermost call only)."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._depth = 0

    def wrap(self, name, fn):
        def timed(*a, **k):
            if self._depth:
                return fn(*a, **k)
            self._depth += 1
            w, c = clocks()
            try:
                return fn(*a, **k)
            finally:
                w2, c2 = clocks()
                self.wall[name] = self.wall.get(name, 0.0) + w2 - w
                self.cpu[name] = self.cpu.get(name, 0.0) + c2 - c
                self._depth -= 1
        return timed


@contextlib.contextmanager
def patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def cost_split(model, batches, N: int, decoder: Speculative) -> dict:
    """Per-iteration milliseconds (cpu, wall) of each phase of `decoder`, and of one AR step.

    Each batch runs `decoder` (phases timed) and then `Autoregressive`, so that a slow spell of the
    machine hits both; the prefill is taken out of both totals.
    """
    split, ar = Split(), Split()
    ctx, den = model.context, model.denoiser
    phases = ((den, "forward_block", "draft forward"), (ctx, "extend", "verify extend"),
              (ctx, "accept", "accept (rollback)"), (ctx, "prefill", "prefill"),
              (RowTracker, "commit", "tracker commit"))
    iters = 0
    spec_total, ar_total = {"wall": 0.0, "cpu": 0.0}, {"wall": 0.0, "cpu": 0.0}
    for ids in batches:
        with contextlib.ExitStack() as stack:
            for obj, name, label in phases:
                stack.enter_context(patched(obj, name, split.wrap(label, getattr(obj, name))))
            w, c = clocks()
            with torch.inference_mode():
                iters += decoder.generate(model, ids, torch.ones_like(ids), max_new_tokens=N).blocks
            w2, c2 = clocks()
        spec_total["wall"] += w2 - w
        spec_total["cpu"] += c2 - c
        with patched(ctx, "prefill", ar.wrap("prefill", ctx.prefill)):
            w, c = clocks()
            with torch.inference_mode():
                Autoregressive().generate(model, ids, torch.ones_like(ids), max_new_tokens=N)
            w2, c2 = clocks()
        ar_total["wall"] += w2 - w
        ar_total["cpu"] += c2 - c
    out = {"iterations": iters}
    for clock, table in (("cpu", split.cpu), ("wall", split.wall)):
        phases_ms = {k: v for k, v in table.items() if k != "prefill"}
        total = spec_total[clock] - table["prefill"]
        phases_ms["rest of the loop"] = total - sum(phases_ms.values())
        out[clock] = {k: 1e3 * v / iters for k, v in phases_ms.items()} | {"iteration": 1e3 * total / iters}
    steps = len(batches) * N
    out["ar_step"] = {clock: 1e3 * (ar_total[clock] - getattr(ar, clock)["prefill"]) / steps
                      for clock in ("cpu", "wall")}
    out["ar_over_spec"] = {clock: (ar_total[clock] - getattr(ar, clock)["prefill"])
                           / (spec_total[clock] - getattr(split, clock)["prefill"]) for clock in ("cpu", "wall")}
    return out


# ---- part 2: levers, A/B -------------------------------------------------------------------------


def reference_draft(denoiser, cache, n, *, first, shift, mask_token_id, tracker, rows, block_index,
                    step_callback=None, cut=0.0):
    """The draft through `denoise_block` (the reference `draft_one_step` replaces)."""
    x = denoise_block(denoiser, cache, n, sampler=None, steps=1, mask_token_id=mask_token_id,
                      chooser=spec_module._GREEDY, generator=None, tracker=tracker, rows=rows,
                      block_index=block_index, step_callback=step_callback, first=first, shift=shift, fill_last=True)
    return x, None


LEVERS = {
    # name: (what the lever is, decoder, patches {(module, attribute): value} that undo it)
    "one-step draft path": ("draft_one_step instead of denoise_block (fewer ops, no host sync)",
                            Speculative(), {(spec_module, "draft_one_step"): reference_draft}),
    "grouped MoE past 24 tokens": ("experts E <= 2k dense only up to DENSE_MAX_TOKENS tokens",
                                   Speculative(), {(layers, "DENSE_MAX_TOKENS"): 1 << 30}),
    "draft_cut=0.02": ("verify only the confident draft prefix", Speculative(draft_cut=0.02), {}),
    "draft_cut=0.05": ("verify only the confident draft prefix", Speculative(draft_cut=0.05), {}),
    "draft_cut=0.1": ("verify only the confident draft prefix", Speculative(draft_cut=0.1), {}),
    "block_size=12": ("shorter drafts (the denoiser was trained on 16)", Speculative(block_size=12), {}),
    "block_size=8": ("shorter drafts (the denoiser was trained on 16)", Speculative(block_size=8), {}),
    "batch_block_size=8": ("8-position drafts while more than one row runs, 16 after",
                           Speculative(batch_block_size=8), {}),
    "batch_block_size=12": ("12-position drafts while more than one row runs, 16 after",
                            Speculative(batch_block_size=12), {}),
    "batch_block_size=6": ("6-position drafts while more than one row runs, 16 after",
                           Speculative(batch_block_size=6), {}),
    "batch_block_size=4": ("4-position drafts while more than one row runs, 16 after",
                           Speculative(batch_block_size=4), {}),
}


def run(model, decoder, ids, N, patches=None):
    with contextlib.ExitStack() as stack:
        for (obj, name), value in (patches or {}).items():
            stack.enter_context(patched(obj, name, value))
        w, c = clocks()
        with torch.inference_mode():
            out = decoder.generate(model, ids, torch.ones_like(ids), max_new_tokens=N)
        w2, c2 = clocks()
    return out, w2 - w, c2 - c


def ab(model, batches, N: int, rounds: int, lever: tuple, base: tuple) -> dict:
    """lever / base: (decoder, patches). Interleaved per call; returns ratios base/lever (> 1: the lever is faster)."""
    t = {k: {"wall": [0.0] * rounds, "cpu": [0.0] * rounds} for k in ("lever", "base")}
    toks = {"lever": [], "base": []}
    iters = {"lever": 0, "base": 0}
    tpi = {"lever": [], "base": []}
    for r in range(-1, rounds):  # round -1 warms up and records the outputs
        for j, ids in enumerate(batches):
            order = [("lever", lever), ("base", base)]
            for name, (dec, patches) in (order if (r + j) % 2 == 0 else order[::-1]):
                out, wall, cpu = run(model, dec, ids, N, patches)
                if r < 0:
                    toks[name].append(out.new_tokens)
                    iters[name] += out.blocks
                    tpi[name].append(out.tokens_per_nfe)
                else:
                    t[name]["wall"][r] += wall
                    t[name]["cpu"][r] += cpu
    ratio = {clock: statistics.median(b / a for a, b in zip(t["lever"][clock], t["base"][clock]))
             for clock in ("cpu", "wall")}
    spread = [b / a for a, b in zip(t["lever"]["cpu"], t["base"]["cpu"])]
    return {"speedup_cpu": ratio["cpu"], "speedup_wall": ratio["wall"], "spread_cpu": (min(spread), max(spread)),
            "identical": torch.equal(torch.cat(toks["lever"]), torch.cat(toks["base"])),
            "tokens_per_iteration": {k: float(torch.cat(v).mean()) for k, v in tpi.items()}, "iterations": iters}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(REPO_ROOT / "twotower" / "assets" / "twotower"))
    p.add_argument("--prompts", type=int, default=16, help="held-out prompt windows per seed")
    p.add_argument("--seeds", default="1", help="comma-separated window seeds (bench.py's default is 0)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--rounds", type=int, default=3, help="timed A/B rounds per lever (after one warm-up round)")
    p.add_argument("--levers", default=",".join(LEVERS), help=f"comma-separated subset of: {', '.join(LEVERS)}; "
                                                              "'none' runs the cost split only")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tok = ByteTokenizer()
    model = TwoTowerLM.from_pretrained(args.model).eval()
    docs, _ = heldout_token_docs(False, tok)
    N = args.max_new_tokens
    levers = [] if args.levers == "none" else [name.strip() for name in args.levers.split(",")]
    for name in levers:
        if name not in LEVERS:
            raise SystemExit(f"--levers: unknown lever {name!r}; choose from {', '.join(LEVERS)}")
    print(f"# spec_cost: {args.model}, {args.prompts} prompts x seeds {args.seeds}, prompt {args.prompt_len}, "
          f"{N} new tokens, torch threads {args.threads}, times in thread-CPU ms (wall in brackets)")
    for seed in (int(s) for s in args.seeds.split(",")):
        wins = select_windows(docs, args.prompts, args.prompt_len, N, bos_id=tok.bos_token_id, seed=seed)
        ids = torch.tensor([w.ids for w in wins])
        for bs in (int(b) for b in args.batch_sizes.split(",")):
            batches = [ids[i: i + bs] for i in range(0, len(ids), bs)]
            run(model, Speculative(), batches[0], N)  # warm-up
            split = cost_split(model, batches, N, Speculative())
            ar = split["ar_step"]
            rel = split["ar_over_spec"]
            print(f"\n## seed {seed}, batch {bs}: {split['iterations']} iterations; one AR step "
                  f"{ar['cpu']:.2f} ms ({ar['wall']:.2f}); decode time AR / speculative, prefill excluded: "
                  f"{rel['cpu']:.3f} ({rel['wall']:.3f})")
            print("| phase | ms / iteration | AR steps |\n|---|---|---|")
            for k, v in split["cpu"].items():
                print(f"| {k} | {v:.2f} ({split['wall'][k]:.2f}) | {v / ar['cpu']:.2f} |")
            if levers:
                print("\n| lever | speedup over shipped (cpu, [min..max]) | wall | tokens/iter lever / shipped "
                      "| identical |\n|---|---|---|---|---|")
            for name in levers:
                what, dec, undo = LEVERS[name]
                if undo:  # the shipped code has the lever: A = shipped, B = the lever undone
                    res = ab(model, batches, N, args.rounds, (Speculative(), {}), (dec, undo))
                else:  # an option: A = the option, B = shipped defaults
                    res = ab(model, batches, N, args.rounds, (dec, {}), (Speculative(), {}))
                lo, hi = res["spread_cpu"]
                tpi = res["tokens_per_iteration"]
                print(f"| {name} ({what}) | {res['speedup_cpu']:.3f} [{lo:.3f}..{hi:.3f}] | {res['speedup_wall']:.3f} | "
                      f"{tpi['lever']:.2f} / {tpi['base']:.2f} | {res['identical']} |", flush=True)


if __name__ == "__main__":
    main()
