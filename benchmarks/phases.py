"""Where the time goes: a per-phase wall-time split of generation at batch 1, one mode or several
interleaved prompt by prompt (`profile_interleaved`).

The phases are the towers' PUBLIC methods, timed by wrapping them on the model's own instances
for the duration of the profile (restored afterwards, nothing global is touched):

    prefill          ContextTower.prefill        the prompt, once per call
    denoiser forward DenoiserTower.forward_block one denoising step (diffusion) or draft (speculative)
    context extend   ContextTower.extend         a block / verify / AR step appended to the cache
    accept           ContextTower.accept         speculative: settle the verified prefix

Whatever the decoder does between those calls (temperature / top-k, argmax, confidences, the
sampler's commit choice, bookkeeping, host syncs) is the remainder, "sampling/commit + other":
total wall time minus the timed phases. Reading it off as a remainder, rather than timing the
decoders' internals, keeps the profile valid for any decoder built on the same tower methods.
On CUDA every timed call synchronises the device, which adds a little time of its own.

A step is one AR decode step (`extend`), one speculative iteration (`accept`, once per draft and
verify) or one denoising step (`forward_block`); `per_iteration` divides a speculative profile by
its iterations and expresses an iteration in AR decode steps of an AR profile from the same run.
The tokens each iteration accepted are read from the `keep` argument of `ContextTowerBase.accept`
(the public method the profile already wraps), outside the timed span.
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch import Tensor

from .harness import sync, wrap_method
from .modes import Mode

__all__ = ["PhaseTimer", "profile", "profile_interleaved", "per_iteration", "REMAINDER", "PREFILL"]

REMAINDER = "sampling/commit + other"
PREFILL = "prefill"

# Per mode kind: (phase name, "context" | "denoiser", public method), in table order.
_PHASES = {
    "ar": [("prefill", "context", "prefill"), ("decode forward (extend)", "context", "extend")],
    "diffusion": [("prefill", "context", "prefill"), ("denoiser forward", "denoiser", "forward_block"),
                  ("context extend", "context", "extend")],
    "mock_ar": [("prefill", "context", "prefill"), ("denoiser forward", "denoiser", "forward_block"),
                ("context extend", "context", "extend")],
    "speculative": [("prefill", "context", "prefill"), ("denoiser forward (draft)", "denoiser", "forward_block"),
                    ("context extend (verify)", "context", "extend"), ("accept (rollback)", "context", "accept")],
}
# Per mode kind: the phase called once per step (AR decode step, speculative iteration, denoising step).
_STEP = {"ar": "decode forward (extend)", "diffusion": "denoiser forward", "mock_ar": "denoiser forward",
         "speculative": "accept (rollback)"}


class PhaseTimer:
    """Accumulates wall seconds and calls per phase; `wrap(name)` makes a timing wrapper.

    Only the outermost timed call counts: if one public method ever calls another, its time is
    not counted twice.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._depth = 0

    def wrap(self, name: str):
        def decorate(fn):
            def timed(*a, **k):
                if self._depth:
                    return fn(*a, **k)
                self._depth += 1
                try:
                    sync(self.device)
                    start = time.perf_counter()
                    out = fn(*a, **k)
                    sync(self.device)
                    self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
                    self.calls[name] = self.calls.get(name, 0) + 1
                    return out
                finally:
                    self._depth -= 1
            return timed
        return decorate


def _record_keep(kept: list, fn):
    """`ContextTowerBase.accept` wrapped so that every call's `keep` (R,) lands in `kept` as a list of ints."""
    def accept(cache, keep, *a, **k):
        out = fn(cache, keep, *a, **k)
        kept.append([int(v) for v in keep.reshape(-1).tolist()] if isinstance(keep, Tensor) else [int(keep)])
        return out
    return accept


def profile(model, mode: Mode, batches: list[tuple[Tensor, Tensor]], N: int, device: torch.device) -> dict:
    """Wall-time split of one pass of `mode` over `batches` ((1, T) ids and mask each) into phases.

    Returns {mode, kind, decoder, total_seconds, tokens, calls, steps, tokens_per_s, phases}; phases
    maps each phase, then REMAINDER, to {seconds, calls (None for the remainder), share of the total,
    ms_per_call}; the phases' seconds add up to total_seconds. steps: calls of the once-per-step phase.
    Speculative also gets `accepted`: per iteration, the tokens it committed to the output (the
    verifier's `keep`, cut where the row reached N tokens, so they add up to `tokens`), and
    `accepted_raw`: the verifier's `keep` as it was.
    """
    return profile_interleaved(model, [mode], batches, N, device)[0]


def profile_interleaved(model, modes: list[Mode], batches: list[tuple[Tensor, Tensor]], N: int,
                        device: torch.device) -> list[dict]:
    """`profile` of each mode, interleaved: prompt by prompt, every mode generates it in turn, so a
    slow spell of the machine lands on all of them alike (and a speculative iteration's cost in AR
    steps compares like with like). The methods are wrapped around each call only."""
    for mode in modes:
        if mode.decoder is None or mode.kind not in _PHASES:
            raise ValueError(f"profile needs one of our modes of kind {sorted(_PHASES)}, got {mode.name!r} "
                             f"(kind {mode.kind!r})")
    if any(ids.shape[0] != 1 for ids, _ in batches):
        raise ValueError(f"profile runs at batch 1: every batch must be (1, T) ids, got batch sizes "
                         f"{sorted({ids.shape[0] for ids, _ in batches})}")
    towers = {"context": model.context, "denoiser": model.denoiser}
    timers = [PhaseTimer(device) for _ in modes]
    totals, accepted, raw = [0.0] * len(modes), [[] for _ in modes], [[] for _ in modes]
    for ids, mask in batches:
        for i, mode in enumerate(modes):
            kept: list[list[int]] = []
            with contextlib.ExitStack() as stack:
                for name, tower, method in _PHASES[mode.kind]:
                    stack.enter_context(wrap_method(towers[tower], method, timers[i].wrap(name)))
                if mode.kind == "speculative":
                    stack.enter_context(wrap_method(model.context, "accept", lambda fn: _record_keep(kept, fn)))
                sync(device)
                start = time.perf_counter()
                mode.decoder.generate(model, ids, mask, max_new_tokens=N, eos_token_id=None)
                sync(device)
                totals[i] += time.perf_counter() - start
            left = N
            for keep in kept:  # batch 1: one row, so one count per iteration
                raw[i].append(keep[0])
                accepted[i].append(min(keep[0], left))
                left -= accepted[i][-1]
    out = []
    tokens = N * sum(ids.shape[0] for ids, _ in batches)
    for i, mode in enumerate(modes):
        pt, total, phases = timers[i], totals[i], _PHASES[mode.kind]
        rows = {name: {"seconds": pt.seconds.get(name, 0.0), "calls": pt.calls.get(name, 0)}
                for name, _, _ in phases}
        rows[REMAINDER] = {"seconds": max(0.0, total - sum(r["seconds"] for r in rows.values())), "calls": None}
        for r in rows.values():
            r["share"] = r["seconds"] / total if total else None
            r["ms_per_call"] = 1e3 * r["seconds"] / r["calls"] if r["calls"] else None
        res = {"mode": mode.name, "kind": mode.kind, "decoder": repr(mode.decoder), "block_size": mode.block,
               "total_seconds": total, "tokens": tokens, "calls": len(batches),
               "steps": rows[_STEP[mode.kind]]["calls"], "tokens_per_s": tokens / total if total else None,
               "phases": rows}
        if mode.kind == "speculative":
            res["accepted"], res["accepted_raw"] = accepted[i], raw[i]
        out.append(res)
    return out


def per_iteration(spec: dict, ar: dict | None = None) -> dict:
    """A speculative profile per iteration: ms of each phase but the prefill (once per call, not per
    iteration) and their sum, tokens per iteration, the histogram of tokens accepted per iteration
    (1..block size), and, given an AR profile of the same run, the iteration's cost in AR decode
    steps (AR's wall time without its prefill / its decode steps) and the throughput ratio the two
    imply without prefills (tokens per iteration / cost in AR steps).
    """
    if spec.get("kind") != "speculative" or "accepted" not in spec:
        raise ValueError(f"per_iteration needs a speculative profile, got mode {spec.get('mode')!r}")
    its = spec["steps"]
    if not its or len(spec["accepted"]) != its:
        raise ValueError(f"profile of {spec['mode']!r}: {its} accept calls but {len(spec['accepted'])} accept counts "
                         "recorded; was it made by phases.profile?")
    phases_ms = {name: 1e3 * r["seconds"] / its for name, r in spec["phases"].items() if name != PREFILL}
    iteration_ms = sum(phases_ms.values())
    size = max([spec.get("block_size") or 0] + spec["accepted_raw"])
    hist = [0] * size
    for k in spec["accepted"]:
        hist[k - 1] += 1
    out = {"mode": spec["mode"], "iterations": its, "calls": spec["calls"], "phases_ms": phases_ms,
           "iteration_ms": iteration_ms,
           "prefill_ms_per_call": 1e3 * spec["phases"][PREFILL]["seconds"] / spec["calls"],
           "tokens_per_iteration": spec["tokens"] / its,
           "verifier_accepted_per_iteration": sum(spec["accepted_raw"]) / its,
           "accepted_histogram": hist, "ar_step_ms": None, "iteration_ar_steps": None, "implied_speedup": None}
    if ar is not None:
        if ar.get("kind") != "ar" or not ar["steps"]:
            raise ValueError(f"per_iteration: the AR reference must be an AR profile with decode steps, got "
                             f"{ar.get('mode')!r}")
        out["ar_step_ms"] = 1e3 * (ar["total_seconds"] - ar["phases"][PREFILL]["seconds"]) / ar["steps"]
        out["iteration_ar_steps"] = iteration_ms / out["ar_step_ms"]
        out["implied_speedup"] = out["tokens_per_iteration"] / out["iteration_ar_steps"]
    return out
