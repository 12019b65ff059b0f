"""What a second verified branch per speculative iteration would gain (issue 23, lever 4; D²SD idea), offline.

No new decoder: the speculative loop is replayed against AR's own greedy output (which `Speculative`
reproduces token for token), so every iteration's accepted length is known without a verify. At
position j of a one-forward draft d (d_0 the context tower's token, d_1..d_{n-1} the denoiser's
argmax), branch 2 is

    d_0 .. d_{j-1}, r_j, d_{j+1} .. d_{n-1}      r_j = the denoiser's runner-up token at j

(positions after j of a one-forward mask draft do not condition on the token at j, so branch 2's
continuation is the same draft). An iteration then keeps max(keep_1, keep_2) tokens and verifying
branch 2 costs n - j extra positions (j .. n-1; the prefix is shared). Branch 2 only gains when j is
the first rejected position and r_j is AR's token there: the correction token already gives AR's
token at the first rejection, so the gain is the run of accepted tokens after j.

Two figures per choice of j (a "policy"):

- on the baseline's iterations: the iterations `Speculative` really runs, each scored with and
  without branch 2 (mean kept per iteration, uncut), plus why it gains or not: how often j is the
  rejection point, how often the runner-up is then right;
- exact loop: the loop re-run with branch 2 taking effect (the next iteration starts after the
  longer branch), tokens/iteration = generated tokens / iterations, the benchmark's figure.

Policies: `lowest` (the least confident drafted position), `first<c` (the first drafted position
whose confidence is below c; no branch when there is none), `likeliest` (argmax_j of P(first
rejection at j) = prod_{k<j} c_k (1 - c_j), c the draft's confidences), `expected` (argmax_j of
prod_{k<j} c_k q_j (1 + sum_{m>j} prod_{j<k<=m} c_k), q the runner-up's probability: the expected
extra tokens, with confidences read as probabilities), `likeliest/L` (that j, branch 2 cut to L
positions: less verify work), and two ceilings: `oracle-j` (j = the true
rejection point, the runner-up token) and `oracle-token` (j = the rejection point and AR's token
there: the most any one-position second branch can add).

    python benchmarks/two_branch_potential.py twotower/assets/twotower
    python benchmarks/two_branch_potential.py smollm2-135m --seeds 0 1

Prints a table and writes JSON (default benchmarks/results/two_branch_potential_<model>.json).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from twotower.decoding import Autoregressive, Speculative  # noqa: E402
from twotower.model import TwoTowerLM  # noqa: E402

# ---- choosing j -------------------------------------------------------------------------------
# A policy sees the draft's confidences c (n-1,) and runner-up probabilities q (n-1,) of positions
# 1 .. n-1 (index i - 1 for position i) and the true first rejected position (None: none; only the
# ceilings read it); it returns j in 1 .. n-1, or None for no second branch this iteration.
Policy = Callable[[torch.Tensor, torch.Tensor, "int | None"], "int | None"]


def lowest(c, q, reject):
    return int(c.argmin()) + 1


def first_below(threshold: float) -> Policy:
    """The first drafted position whose confidence is below `threshold` (None when there is none)."""
    def pick(c, q, reject):
        low = (c < threshold).nonzero()
        return int(low[0]) + 1 if len(low) else None
    return pick


def reach(c: torch.Tensor) -> torch.Tensor:
    """(n-1,) prod_{k<j} c_k for j = 1 .. n-1: the chance the draft is still accepted just before j."""
    return torch.cat([c.new_ones(1), c[:-1].cumprod(0)])


def likeliest(c, q, reject):
    return int((reach(c) * (1 - c)).argmax()) + 1


def expected(c, q, reject):
    # After a right token at j, the run continues through j+1 .. m with chance prod_{j<k<=m} c_k.
    n1 = c.shape[0]
    tail = torch.stack([c[j + 1:].cumprod(0).sum() if j + 1 < n1 else c.new_zeros(()) for j in range(n1)])
    return int((reach(c) * q * (1 + tail)).argmax()) + 1


def oracle_j(c, q, reject):
    return reject


# "<rule>/<L>": the same j, with branch 2 cut to its first L positions (j .. j+L-1): less verify work.
POLICIES: dict[str, Policy] = {"lowest": lowest, "first<0.5": first_below(0.5), "first<0.7": first_below(0.7),
                               "first<0.9": first_below(0.9), "likeliest": likeliest, "likeliest/4": likeliest,
                               "likeliest/8": likeliest, "expected": expected, "oracle-j": oracle_j,
                               "oracle-token": oracle_j}


# ---- one iteration ----------------------------------------------------------------------------
@dataclass
class Draft:
    """A one-forward greedy draft of n positions: tokens x (n,), the runner-up r (n,) (r[0] unused),
    the confidences c and runner-up probabilities q of positions 1 .. n-1."""

    x: torch.Tensor
    r: torch.Tensor
    c: torch.Tensor
    q: torch.Tensor


def draft(model, cache, first: int, n: int) -> Draft:
    """`draft_one_step`'s draft (the default `Speculative`'s), keeping the top two per position."""
    mask_id = model.mask_token_id
    x = torch.full((1, n), mask_id, dtype=torch.long)
    x[0, 0] = first
    t = torch.full((1,), (n - 1) / n)
    logits = model.denoiser.forward_block(x, cache, t)[0].float()
    logits[:, mask_id] = float("-inf")
    pred = logits[:-1] if model.shifted else logits[1:]  # predictions for positions 1 .. n-1
    prob = pred.softmax(-1)
    top = prob.topk(2, dim=-1)
    x = x[0].clone()
    x[1:] = top.indices[:, 0]
    r = x.clone()
    r[1:] = top.indices[:, 1]
    return Draft(x, r, top.values[:, 0], top.values[:, 1])


def accepted(x: torch.Tensor, truth: torch.Tensor) -> int:
    """Tokens an iteration keeps: 1 + the leading drafted positions equal to AR's (truth (n,), x[0] == truth[0])."""
    return int((x[1:] == truth[1:]).long().cumprod(0).sum()) + 1


@dataclass
class Outcome:
    """What one iteration keeps with a second branch at j (None: none) and what it costs."""

    keep: int
    j: int | None
    extra_positions: int
    hit: bool  # j was the first rejected position
    right: bool  # ... and the second candidate there was AR's token


def with_branch(d: Draft, truth: torch.Tensor, name: str) -> Outcome:
    n = d.x.shape[0]
    keep1 = accepted(d.x, truth)
    reject = keep1 if keep1 < n else None
    j = POLICIES[name](d.c, d.q, reject)
    if j is None:
        return Outcome(keep1, None, 0, False, False)
    rule, _, cap = name.partition("/")
    length = min(n - j, int(cap)) if cap else n - j  # branch 2's verified positions j .. j+length-1
    y = d.x.clone()
    y[j] = truth[j] if rule == "oracle-token" else d.r[j]
    keep2 = min(accepted(y, truth), j + length)
    return Outcome(max(keep1, keep2), j, length, j == reject, j == reject and bool(y[j] == truth[j]))


# ---- the loop ---------------------------------------------------------------------------------
@dataclass
class Trace:
    """One prompt's loop under one policy (None: plain speculative)."""

    iterations: int = 0
    generated: int = 0
    extra_positions: int = 0
    outcomes: dict[str, list[Outcome]] = field(default_factory=dict)  # baseline only: every policy
    keeps: list[int] = field(default_factory=list)


def replay(model, prompt: torch.Tensor, truth: torch.Tensor, n_new: int, n: int, policy: str | None) -> Trace:
    """Run the speculative loop on one prompt (T,) against AR's output `truth` (n_new + n,), -1 past
    its end, until n_new tokens: the cache advances by what each iteration keeps (with branch 2 under
    `policy`). The baseline (policy None) also scores every policy on each of its iterations."""
    _, cache = model.context.prefill(prompt[None], logits="none", capacity=prompt.shape[0] + n_new + 2 * n)
    tr = Trace(outcomes={} if policy else {name: [] for name in POLICIES})
    pos = 0
    while pos < n_new:
        d = draft(model, cache, int(truth[pos]), n)
        window = truth[pos:pos + n]
        if policy is None:
            keep = accepted(d.x, window)
            for name in POLICIES:
                tr.outcomes[name].append(with_branch(d, window, name))
        else:
            o = with_branch(d, window, policy)
            keep = o.keep
            tr.extra_positions += o.extra_positions
        tr.keeps.append(keep)
        tr.iterations += 1
        keep = min(keep, n_new - pos)  # the loop's last iteration is cut by max_new_tokens
        model.context.extend(cache, truth[None, pos:pos + keep], logits="none")
        pos += keep
    tr.generated = pos
    return tr


# ---- prompts ----------------------------------------------------------------------------------
def byte_prompts(model, args) -> tuple[list[torch.Tensor], int | None]:
    """The benchmark's held-out byte windows (`workload.select_windows`, as draft_diagnostics.py)."""
    from benchmarks import workload
    from twotower.tokenizers import ByteTokenizer

    tok = ByteTokenizer(model.config.vocab_size)
    docs, _ = workload.heldout_token_docs(False, tok)
    out = []
    for seed in args.seeds:
        windows = workload.select_windows(docs, args.prompts, args.prompt_len, args.max_new_tokens,
                                          bos_id=tok.bos_token_id, seed=seed)
        out += [torch.tensor(w.ids) for w in windows]
    return out, None


def real_prompts(model, args) -> tuple[list[torch.Tensor], int | None]:
    """real_model.py's held-out prompts: prose and Python windows and chat instructions, per seed."""
    from benchmarks import real_model as rm

    tok = model.tokenizer
    docs = {"prose": rm.held_out_documents("stdlib-docs"), "python": rm.held_out_documents("stdlib")}
    out = []
    for seed in args.seeds:
        rng = random.Random(seed)
        out += rm.windows(tok, docs["prose"], args.per_kind, args.prompt_tokens, rng)
        out += rm.windows(tok, docs["python"], args.per_kind, args.prompt_tokens, rng)
        out += [rm.chat_ids(tok, t) for t in rng.sample(rm.INSTRUCTIONS, args.per_kind)]
    return [torch.tensor(p) for p in out], tok.eos_token_id


def references(model, prompts: list[torch.Tensor], eos: int | None, N: int, n: int, reuse: str | None):
    """Per prompt (AR's output (N + n,), -1 after EOS, and the count the loop runs to), and the
    speculative loop's generated tokens and denoiser forwards. `reuse`: a file that keeps them, so a
    rerun over the same prompts skips the slow part (it is checked against the prompts)."""
    if reuse and Path(reuse).exists():
        saved = torch.load(reuse)
        if len(saved["prompts"]) == len(prompts) and all(torch.equal(a, b) for a, b in zip(saved["prompts"], prompts)):
            return saved["truths"], saved["spec_tokens"], saved["spec_nfe"]
        print(f"--reuse {reuse}: other prompts; computing afresh", file=sys.stderr)
    truths, spec_tokens, spec_nfe = [], 0, 0
    for pr in prompts:
        # AR's output, n past max_new_tokens so the last drafts are scored in full; -1 after EOS.
        out = Autoregressive().generate(model, pr[None], max_new_tokens=N + n, eos_token_id=eos)
        t = torch.full((N + n,), -1, dtype=torch.long)
        g = int(out.num_generated[0])
        t[:g] = out.new_tokens[0, :g]
        truths.append((t, min(N, g)))
        s = Speculative().generate(model, pr[None], max_new_tokens=N, eos_token_id=eos)
        if not torch.equal(s.new_tokens[0, :int(s.num_generated[0])], t[:min(N, g)]):
            print("warning: Speculative's output differs from AR's on a prompt", file=sys.stderr)
        spec_tokens += int(s.num_generated[0])
        spec_nfe += int(s.nfe[0])
    if reuse:
        torch.save({"prompts": prompts, "truths": truths, "spec_tokens": spec_tokens, "spec_nfe": spec_nfe}, reuse)
    return truths, spec_tokens, spec_nfe


# ---- report -----------------------------------------------------------------------------------
def summarize(base: list[Trace], exact: dict[str, list[Trace]], spec_tpi: float) -> dict:
    base_keeps = [k for t in base for k in t.keeps]
    iters = sum(t.iterations for t in base)
    res = {"spec_tokens_per_iter_measured": spec_tpi,
           "baseline": {"tokens_per_iter": sum(t.generated for t in base) / iters, "iterations": iters,
                        "mean_keep": statistics.fmean(base_keeps)},
           "policies": {}}
    for name in POLICIES:
        outs = [o for t in base for o in t.outcomes[name]]
        branched = [o for o in outs if o.j is not None]
        hits = [o for o in branched if o.hit]
        p = {"mean_keep": statistics.fmean(o.keep for o in outs),
             "gain_per_iter": statistics.fmean(o.keep for o in outs) - statistics.fmean(base_keeps),
             "branch_rate": len(branched) / len(outs),
             "extra_positions_per_iter": sum(o.extra_positions for o in outs) / len(outs),
             "hit_rate": len(hits) / max(1, len(branched)),
             "right_given_hit": sum(o.right for o in hits) / max(1, len(hits))}
        if name in exact:
            tr = exact[name]
            it = sum(t.iterations for t in tr)
            p["exact_tokens_per_iter"] = sum(t.generated for t in tr) / it
            p["exact_extra_positions_per_iter"] = sum(t.extra_positions for t in tr) / it
        res["policies"][name] = p
    return res


def render(name: str, res: dict, n: int) -> str:
    b = res["baseline"]
    lines = [f"### {name}: speculative {b['tokens_per_iter']:.3f} tokens/iteration replayed "
             f"({res['spec_tokens_per_iter_measured']:.3f} measured by Speculative), mean kept "
             f"{b['mean_keep']:.3f} over {b['iterations']} iterations, verify {n} positions", "",
             "| j policy | kept/iter (baseline iters) | gain | exact loop tokens/iter | exact gain | "
             "extra verify positions/iter | branch rate | j = rejection | runner-up right there |",
             "|---|---|---|---|---|---|---|---|---|"]
    for pname, p in res["policies"].items():
        ex = p.get("exact_tokens_per_iter")
        lines.append(f"| {pname} | {p['mean_keep']:.3f} | {p['gain_per_iter']:+.3f} | "
                     + (f"{ex:.3f} | {ex - b['tokens_per_iter']:+.3f} | " if ex is not None else "- | - | ")
                     + f"{p['extra_positions_per_iter']:.2f} | {p['branch_rate']:.2f} | {p['hit_rate']:.2f} | "
                     f"{p['right_given_hit']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("model", help="a two-tower folder or a built-in name")
    p.add_argument("--source", choices=["auto", "bytes", "real"], default="auto",
                   help="prompts: the byte benchmark's windows or real_model.py's (auto: by vocabulary size)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1])
    p.add_argument("--prompts", type=int, default=32, help="byte windows per seed")
    p.add_argument("--prompt-len", type=int, default=128, help="byte window length")
    p.add_argument("--per-kind", type=int, default=4, help="real prompts of each kind per seed")
    p.add_argument("--prompt-tokens", type=int, default=48, help="real prose / python window")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--exact", nargs="*", default=None,
                   help="policies to re-run as an exact loop (default: all)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reuse", help="keep AR's and Speculative's results in this file and read them on a rerun")
    p.add_argument("--out")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    exact_names = list(POLICIES) if args.exact is None else args.exact
    for e in exact_names:
        if e not in POLICIES:
            raise SystemExit(f"--exact {e!r}: not a policy; choose from {', '.join(POLICIES)}")
    t0 = time.perf_counter()
    model = TwoTowerLM.from_pretrained(args.model, dtype=torch.float32).eval()
    n, N = model.block_size, args.max_new_tokens
    source = args.source if args.source != "auto" else ("bytes" if model.config.vocab_size <= 512 else "real")
    with torch.inference_mode():
        prompts, eos = (byte_prompts if source == "bytes" else real_prompts)(model, args)
        truths, spec_tokens, spec_nfe = references(model, prompts, eos, N, n, args.reuse)
        print(f"{len(prompts)} prompts, AR + speculative in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
        base = [replay(model, pr, t, g, n, None) for pr, (t, g) in zip(prompts, truths)]
        exact = {}
        for name in exact_names:
            exact[name] = [replay(model, pr, t, g, n, name) for pr, (t, g) in zip(prompts, truths)]
            print(f"  exact loop {name} done ({time.perf_counter() - t0:.0f}s)", file=sys.stderr)
    res = summarize(base, exact, spec_tokens / spec_nfe)
    res["settings"] = {**vars(args), "source": source, "prompts_total": len(prompts), "block_size": n}
    print(render(args.model, res, n))
    write_result(res, args, "two_branch_potential")
    return 0


def write_result(res: dict, args, kind: str) -> None:
    """`res` as JSON to --out, default results/<kind>_<model name>.json."""
    slug = Path(args.model).name if Path(args.model).exists() else args.model
    out = Path(args.out or Path(__file__).parent / "results" / f"{kind}_{slug}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1))
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
