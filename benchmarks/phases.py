"""Where the time goes: a per-phase wall-time split of one mode's generation at batch 1.

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
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch import Tensor

from .harness import sync, wrap_method
from .modes import Mode

__all__ = ["PhaseTimer", "profile", "REMAINDER"]

REMAINDER = "sampling/commit + other"

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


def profile(model, mode: Mode, batches: list[tuple[Tensor, Tensor]], N: int, device: torch.device) -> dict:
    """Wall-time split of one pass of `mode` over `batches` ((1, T) ids and mask each) into phases.

    Returns {mode, decoder, total_seconds, tokens, tokens_per_s, phases}; phases maps each phase,
    then REMAINDER, to {seconds, calls (None for the remainder), share of the total, ms_per_call}.
    The phases' seconds add up to total_seconds.
    """
    if mode.decoder is None or mode.kind not in _PHASES:
        raise ValueError(f"profile needs one of our modes of kind {sorted(_PHASES)}, got {mode.name!r} "
                         f"(kind {mode.kind!r})")
    towers = {"context": model.context, "denoiser": model.denoiser}
    phases = _PHASES[mode.kind]
    pt = PhaseTimer(device)
    total = 0.0
    with contextlib.ExitStack() as stack:
        for name, tower, method in phases:
            stack.enter_context(wrap_method(towers[tower], method, pt.wrap(name)))
        for ids, mask in batches:
            sync(device)
            start = time.perf_counter()
            mode.decoder.generate(model, ids, mask, max_new_tokens=N, eos_token_id=None)
            sync(device)
            total += time.perf_counter() - start
    rows = {name: {"seconds": pt.seconds.get(name, 0.0), "calls": pt.calls.get(name, 0)} for name, _, _ in phases}
    rows[REMAINDER] = {"seconds": max(0.0, total - sum(r["seconds"] for r in rows.values())), "calls": None}
    for r in rows.values():
        r["share"] = r["seconds"] / total if total else None
        r["ms_per_call"] = 1e3 * r["seconds"] / r["calls"] if r["calls"] else None
    tokens = N * sum(ids.shape[0] for ids, _ in batches)
    return {"mode": mode.name, "decoder": repr(mode.decoder), "total_seconds": total, "tokens": tokens,
            "tokens_per_s": tokens / total if total else None, "phases": rows}
