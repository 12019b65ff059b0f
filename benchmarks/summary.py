"""Across seeds: mean and spread of every per-seed figure, the speculative profile per iteration,
and the issue's targets checked against the means.

Each seed is its own run of every mode on its own held-out prompt windows (bench.py), and every
ratio (x AR, x HF, retention) is computed inside that seed's interleaved run, on the same machine
state; only then are the seeds aggregated here. The spread is min-max over seeds (the JSON also
holds the sample standard deviation and every seed's value).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

__all__ = ["RUN_FIGURES", "spread", "summarize_runs", "summarize_iterations", "summarize_profiles", "Target", "TARGETS",
           "check_targets", "diffusion_against_target"]

# The per-run figures aggregated over seeds: name -> where a run dict holds it.
RUN_FIGURES = {
    "tokens_per_s": ("tokens_per_s",), "speedup_vs_ar": ("speedup_vs_ar",), "speedup_vs_hf": ("speedup_vs_hf",),
    "tokens_per_nfe": ("tokens_per_nfe",), "nfe_per_block": ("nfe_per_block",),
    "tokens_per_iteration": ("tokens_per_iteration",),
    "agreement": ("quality", "agreement"), "retention_agreement": ("retention_agreement",),
    "nll": ("quality", "nll"), "retention_nll": ("retention_nll",), "distinct_2": ("quality", "distinct_2"),
    "distinct_4": ("quality", "distinct_4"), "match_ar": ("quality", "match_ar"),
}


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def spread(values) -> dict | None:
    """{mean, min, max, std, n, values} of the finite numbers in `values` (None and NaN are left
    out and counted in `missing`); std is the sample standard deviation (0.0 for one value).
    None when no value is finite."""
    values = list(values)
    xs = [float(v) for v in values if _finite(v)]
    if not xs:
        return None
    return {"mean": statistics.fmean(xs), "min": min(xs), "max": max(xs),
            "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs), "missing": len(values) - len(xs),
            "values": xs}


def _get(run: dict, path: tuple[str, ...]):
    for key in path:
        run = run.get(key) if isinstance(run, dict) else None
    return run


def summarize_runs(runs: list[dict]) -> list[dict]:
    """Per mode x batch size (in first-seen order), every RUN_FIGURES figure as `spread` over the
    runs of that mode and batch size (one per seed). Each run must carry a "seed"."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in runs:
        if "seed" not in r:
            raise ValueError(f"run {r.get('mode')!r} at batch {r.get('batch_size')} has no 'seed'; the summary "
                             "aggregates one run per seed")
        groups.setdefault((r["mode"], r["batch_size"]), []).append(r)
    out = []
    for (mode, b), rs in groups.items():
        seeds = [r["seed"] for r in rs]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"mode {mode!r} at batch {b} has more than one run for a seed ({seeds})")
        first = rs[0]
        row = {"mode": mode, "batch_size": b, "kind": first.get("kind"), "description": first.get("description"),
               "seeds": seeds, "deterministic_across_repeats": all(r.get("deterministic_across_repeats", True)
                                                                   for r in rs)}
        row.update({name: spread(_get(r, path) for r in rs) for name, path in RUN_FIGURES.items()})
        out.append(row)
    return out


def summarize_iterations(per_seed: list[dict]) -> dict:
    """`phases.per_iteration` results, one per seed -> spread of each figure (phases' ms per
    iteration, iteration ms, tokens per iteration, cost in AR steps, ...) and the accepted-tokens
    histogram summed over seeds (counts, and each count's fraction of all iterations)."""
    if not per_seed:
        raise ValueError("summarize_iterations needs at least one seed's per-iteration profile")
    names = list(per_seed[0]["phases_ms"])
    out = {"mode": per_seed[0]["mode"], "seeds": len(per_seed),
           "phases_ms": {n: spread(p["phases_ms"].get(n) for p in per_seed) for n in names}}
    for key in ("iteration_ms", "prefill_ms_per_call", "tokens_per_iteration", "verifier_accepted_per_iteration",
                "ar_step_ms", "iteration_ar_steps", "implied_speedup"):
        out[key] = spread(p[key] for p in per_seed)
    size = max(len(p["accepted_histogram"]) for p in per_seed)
    hist = [sum(p["accepted_histogram"][k] for p in per_seed if k < len(p["accepted_histogram"]))
            for k in range(size)]
    total = sum(hist)
    out["accepted_histogram"] = hist
    out["accepted_fraction"] = [c / total if total else None for c in hist]
    out["iterations"] = total
    return out


@dataclass(frozen=True)
class Target:
    """One target: `figure` (a RUN_FIGURES name) of `mode` at `batch` must be >= `minimum`.

    rule "mean": met when the mean over seeds reaches it; "every seed": when every seed's does
    (for properties that must hold exactly, such as speculative output = AR output).
    """

    label: str
    mode: str
    batch: int
    figure: str
    minimum: float
    rule: str = "mean"
    note: str = ""

    def __post_init__(self):
        if self.figure not in RUN_FIGURES:
            raise ValueError(f"target {self.label!r}: figure {self.figure!r} is not one of {sorted(RUN_FIGURES)}")
        if self.rule not in ("mean", "every seed"):
            raise ValueError(f"target {self.label!r}: rule must be 'mean' or 'every seed', got {self.rule!r}")


# Issue 13's targets on the embedded default, block 16. AR vs transformers: "not slower than
# before", where before is the README's figure of 2026-11-30 (AR 1.82x transformers at batch 1).
TARGETS = [
    Target("speculative: tokens per iteration", "spec_b16", 1, "tokens_per_nfe", 7.0),
    Target("speculative x AR, batch 1", "spec_b16", 1, "speedup_vs_ar", 2.42),
    Target("speculative x AR, batch 8", "spec_b16", 8, "speedup_vs_ar", 1.0),
    Target("speculative output = AR output, batch 1", "spec_b16", 1, "match_ar", 1.0, "every seed"),
    Target("speculative output = AR output, batch 8", "spec_b16", 8, "match_ar", 1.0, "every seed"),
    Target("diffusion 0.8 x AR, batch 1", "diff_t0.8_b16", 1, "speedup_vs_ar", 1.5),
    Target("diffusion 0.8 agreement retention, batch 1", "diff_t0.8_b16", 1, "retention_agreement", 0.95),
    Target("AR x transformers, batch 1 (before: 1.82)", "ar", 1, "speedup_vs_hf", 1.82,
           note="README figure of 2026-11-30"),
]


def check_targets(summary: list[dict], targets: list[Target] = TARGETS) -> list[dict]:
    """Each target against a `summarize_runs` summary: {label, mode, batch, figure, minimum, rule,
    mean, min, max, n, seeds_met, status ("met", "missed", or "not run" when the mode, batch
    size or figure is absent), gap (mean - minimum, or for rule "every seed" the lowest seed's value -
    minimum: negative = short by that much)}."""
    rows = {(r["mode"], r["batch_size"]): r for r in summary}
    out = []
    for t in targets:
        s = (rows.get((t.mode, t.batch)) or {}).get(t.figure)
        row = {"label": t.label, "mode": t.mode, "batch": t.batch, "figure": t.figure, "minimum": t.minimum,
               "rule": t.rule, "note": t.note, "mean": None, "min": None, "max": None, "n": 0, "seeds_met": 0,
               "status": "not run", "gap": None}
        if s is not None:
            met_each = [v >= t.minimum for v in s["values"]]
            ok = all(met_each) if t.rule == "every seed" else s["mean"] >= t.minimum
            row.update(mean=s["mean"], min=s["min"], max=s["max"], n=s["n"], seeds_met=sum(met_each),
                       status="met" if ok else "missed",
                       gap=(s["min"] if t.rule == "every seed" else s["mean"]) - t.minimum)
        out.append(row)
    return out


def summarize_profiles(profiles: list[dict]) -> list[dict]:
    """`phases.profile` results (each with a "seed") -> per mode, in first-seen order: seeds, the
    spread of total tok/s (timers on) and, per phase, of its share of the wall time and its ms per call."""
    out: dict[str, dict] = {}
    for p in profiles:
        out.setdefault(p["mode"], {"mode": p["mode"], "kind": p.get("kind"), "runs": []})["runs"].append(p)
    rows = []
    for mode, g in out.items():
        ps = g.pop("runs")
        names = list(ps[0]["phases"])
        g.update(seeds=[p.get("seed") for p in ps], tokens=sum(p["tokens"] for p in ps),
                 tokens_per_s=spread(p["tokens_per_s"] for p in ps),
                 phases={n: {"share": spread(p["phases"][n]["share"] for p in ps),
                             "ms_per_call": spread(p["phases"][n]["ms_per_call"] for p in ps),
                             "calls": sum(p["phases"][n]["calls"] or 0 for p in ps) if ps[0]["phases"][n]["calls"]
                             is not None else None} for n in names})
        rows.append(g)
    return rows


def diffusion_against_target(summary: list[dict], *, speedup: float = 1.5, retention: float = 0.95,
                             batch: int = 1) -> list[dict]:
    """Every diffusion mode of a `summarize_runs` summary at `batch` against the diffusion target
    (x AR >= speedup with agreement retention >= retention, both on the means), fastest first:
    {mode, speedup_vs_ar, retention_agreement (spreads), met}. For comparing samplers and thresholds,
    where TARGETS names only diff_t0.8_b16."""
    rows = []
    for r in summary:
        if r.get("kind") != "diffusion" or r["batch_size"] != batch:
            continue
        sp, ret = r["speedup_vs_ar"], r["retention_agreement"]
        met = sp is not None and ret is not None and sp["mean"] >= speedup and ret["mean"] >= retention
        rows.append({"mode": r["mode"], "speedup_vs_ar": sp, "retention_agreement": ret, "met": met})
    return sorted(rows, key=lambda x: -(x["speedup_vs_ar"] or {"mean": 0.0})["mean"])
