"""Running and timing the modes: one warm-up call each, then interleaved timed passes.

Every mode of ours generates through its decoder's public `generate`; the transformers baseline
through its family's `<Family>ForCausalLM.generate` (`TowerFamily.hf_architecture`). EOS is ignored everywhere, so each call yields exactly
max_new_tokens per row and tokens / second compare like for like. Memory is read from tensor
shapes on CPU (parameters + the run's cache) and from the allocator on CUDA.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import dataclass

import torch
from torch import Tensor

from twotower.evaluation import score_continuations

from .modes import Mode

__all__ = ["sync", "tensor_bytes", "module_bytes", "wrap_method", "Call", "Runner", "run_modes", "generation_runs",
           "ratio", "add_ratios"]


def sync(device: torch.device) -> None:
    """Wait for queued CUDA work, so a wall-clock reading covers it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tensor_bytes(obj, _seen: set | None = None) -> int:
    """Bytes of every distinct tensor reachable from `obj` (lists, dicts, object attributes)."""
    seen = set() if _seen is None else _seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple, set)):
        return sum(tensor_bytes(v, seen) for v in obj)
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module, torch.device, torch.dtype)):
        return sum(tensor_bytes(v, seen) for v in vars(obj).values())
    return 0


def module_bytes(*modules) -> int:
    """Parameter + buffer bytes of the given modules (shared tensors counted once)."""
    seen, total = set(), 0
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


@contextlib.contextmanager
def wrap_method(obj, name: str, wrapper):
    """Within the block, `obj.name` is `wrapper(original)` on this instance only.

    An instance attribute shadows the class's method, so other instances are untouched; on exit
    the shadow is dropped, or, where the instance already had its own attribute (e.g. a
    `torch.compile`d `forward_block` from `TwoTowerLM.compile_towers`), that one is put back.
    """
    original = getattr(obj, name)
    own = name in vars(obj)
    setattr(obj, name, wrapper(original))
    try:
        yield
    finally:
        if own:
            setattr(obj, name, original)
        else:
            delattr(obj, name)


def _capture_cache(model):
    """(context manager, list): the list receives the HybridCache of every `context.prefill` call (to size it)."""
    box = []

    def wrap(original):
        def prefill(*a, **k):
            out = original(*a, **k)
            box.append(out[1])
            return out
        return prefill

    return wrap_method(model.context, "prefill", wrap), box


# ---- one call -----------------------------------------------------------------------------------


@dataclass
class Call:
    """One generation call's result: new_tokens (B, N) and nfe (B,) on CPU, blocks (iterations for
    speculative, 0 for one-token modes), and the cache's bytes when it was measured."""

    new_tokens: Tensor
    nfe: Tensor
    blocks: int
    cache_bytes: int | None = None


class Runner:
    """Calls one mode on a (B, T) batch: its decoder with our model, or transformers' `generate`."""

    def __init__(self, model, hf, max_new_tokens: int):
        self.model, self.hf, self.N = model, hf, max_new_tokens

    def __call__(self, mode: Mode, ids: Tensor, mask: Tensor, *, measure_cache: bool = False) -> Call:
        if mode.decoder is None:
            return self._hf(ids, mask, measure_cache)
        patch, box = _capture_cache(self.model) if measure_cache else (contextlib.nullcontext(), [])
        with patch:
            out = mode.decoder.generate(self.model, ids, mask, max_new_tokens=self.N, eos_token_id=None)
        if out.new_tokens.shape[1] != self.N:
            raise RuntimeError(f"{mode.name} generated {out.new_tokens.shape[1]} tokens, expected {self.N}")
        cache = box[0].nbytes() if box else None
        return Call(out.new_tokens.cpu(), out.nfe.cpu(), out.blocks, cache)

    @torch.no_grad()
    def _hf(self, ids: Tensor, mask: Tensor, measure_cache: bool) -> Call:
        if self.hf is None:
            raise RuntimeError("the hf_generate mode needs the transformers model; load_models(need_hf=True)")
        N = self.N
        out = self.hf.generate(ids, attention_mask=mask, max_new_tokens=N, do_sample=False,
                               return_dict_in_generate=measure_cache)
        seq = out.sequences if measure_cache else out
        new = seq[:, ids.shape[1]:]
        if new.shape[1] != N:
            raise RuntimeError(f"transformers generated {new.shape[1]} tokens, expected {N} (is EOS disabled?)")
        cache = None
        if measure_cache:
            c = out.get("cache", None) or out.get("past_key_values", None)
            cache = tensor_bytes(c) or None
        # transformers exposes no forward count; greedy decoding is one forward per token by construction.
        return Call(new.cpu(), torch.full((ids.shape[0],), N), 0, cache)


# ---- timed runs ---------------------------------------------------------------------------------


def _timed_call(runner: Runner, mode: Mode, ids: Tensor, mask: Tensor, device: torch.device):
    """One timed call of `mode` on one batch: (seconds, call, (CUDA peak, resident) bytes or None)."""
    resident = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)  # every loaded model's weights, not only this mode's
    sync(device)
    start = time.perf_counter()
    call = runner(mode, ids, mask)
    sync(device)
    seconds = time.perf_counter() - start
    peak = None if resident is None else (torch.cuda.max_memory_allocated(device), resident)
    return seconds, call, peak


def rotated(n_modes: int, turn: int) -> list[int]:
    """The mode indexes in the order of one turn: each turn starts one mode later, so over the turns
    every mode runs in every position (first after a warm machine, last after all the others) alike."""
    return [(turn + k) % n_modes for k in range(n_modes)]


def run_modes(runner: Runner, modes: list[Mode], batches: list[tuple[Tensor, Tensor]], repeats: int,
              device: torch.device) -> list[dict]:
    """One warm-up call per mode, then `repeats` rounds in which every mode makes one timed pass over
    every batch, interleaved batch by batch: each batch runs under every mode back to back, in an
    order that rotates from batch to batch (`rotated`). A slow spell of the machine (other load,
    frequency changes) then lands on every mode alike, within seconds rather than within a round of
    whole passes, and no mode always runs first or last; the ratios are steadier (two modes that run
    the same computation measure alike). Returns, per mode, raw numbers + the tokens (N_total, N)."""
    warm = [runner(mode, *batches[0], measure_cache=True) for mode in modes]  # warm-up; also sizes the caches
    seconds: list[list[float]] = [[] for _ in modes]
    first: list = [None] * len(modes)
    deterministic = [True] * len(modes)
    peaks: list = [None] * len(modes)
    started = time.perf_counter()
    for rnd in range(repeats):
        spent, calls = [0.0] * len(modes), [[] for _ in modes]
        for j, (ids, mask) in enumerate(batches):
            for i in rotated(len(modes), rnd * len(batches) + j):
                dt, call, peak = _timed_call(runner, modes[i], ids, mask, device)
                spent[i] += dt
                calls[i].append(call)
                if peak is not None and (peaks[i] is None or peak[0] - peak[1] > peaks[i][0] - peaks[i][1]):
                    peaks[i] = peak
        for i in range(len(modes)):
            seconds[i].append(spent[i])
            if first[i] is None:
                first[i] = calls[i]
            else:
                deterministic[i] &= torch.equal(torch.cat([c.new_tokens for c in first[i]]),
                                                torch.cat([c.new_tokens for c in calls[i]]))
        print(f"    round {rnd + 1}/{repeats} done ({time.perf_counter() - started:.0f} s)", flush=True)
    out = []
    for i, mode in enumerate(modes):
        calls = first[i]
        tokens = torch.cat([c.new_tokens for c in calls])
        total = tokens.numel()
        nfe = int(sum(int(c.nfe.sum()) for c in calls))
        block_rows = sum(c.blocks * c.new_tokens.shape[0] for c in calls)
        tps = [total / s for s in seconds[i]]
        out.append({
            "tokens": tokens,
            "seconds_per_repeat": seconds[i],
            "tokens_per_s_per_repeat": tps,
            "tokens_per_s": statistics.median(tps),
            "generated_tokens_per_repeat": total,
            "nfe_total": nfe,
            "nfe_source": "by construction (1 forward per token)" if mode.kind == "hf" else "counted",
            "tokens_per_nfe": total / nfe,
            # Speculative: one draft forward per row and iteration (rows run different numbers of
            # iterations), so tok/NFE is tokens per iteration, except with lookup drafts
            # (`Speculative(lookup=...)`), whose iterations may run no forward: hence tokens per
            # iteration at batch 1, where a call's iterations are its row's. No per-block figure.
            # One-token modes (AR, mock-AR) have no blocks at all.
            "nfe_per_block": nfe / block_rows if block_rows and mode.kind != "speculative" else None,
            "tokens_per_iteration": total / block_rows if block_rows and mode.kind == "speculative"
            and all(c.new_tokens.shape[0] == 1 for c in calls) else None,
            "deterministic_across_repeats": deterministic[i],
            "cache_bytes": warm[i].cache_bytes,
            "cuda_peak_bytes": None if peaks[i] is None else peaks[i][0],
            "cuda_peak_working_bytes": None if peaks[i] is None else peaks[i][0] - peaks[i][1],
        })
    return out


def generation_runs(runner: Runner, modes: list[Mode], prompts: Tensor, truth: Tensor, b: int, repeats: int,
                    device: torch.device, tok) -> list[dict]:
    """Every mode at batch size b (prompts (P, T) in batches of b, truth (P, N)): speed, memory and
    quality, one JSON-ready dict per mode. modes[0] must be "ar", the reference for "= AR"."""
    model = runner.model
    batches = [(prompts[i: i + b], torch.ones_like(prompts[i: i + b])) for i in range(0, prompts.shape[0], b)]
    runs, ar_tokens = [], None
    print(f"  batch {b}: warm-up, then {repeats} interleaved rounds of {len(modes)} modes", flush=True)
    for mode, r in zip(modes, run_modes(runner, modes, batches, repeats, device)):
        tokens = r.pop("tokens")
        ar_tokens = tokens if mode.kind == "ar" else ar_tokens
        params = (runner.hf,) if mode.decoder is None else \
            (model.context, model.denoiser) if mode.uses_denoiser else (model.context,)
        q = score_continuations(model.context, prompts, tokens, truth, reference=ar_tokens)
        q["match_ar"] = q.pop("match_reference", None)
        r = {"mode": mode.name, "description": mode.description, "kind": mode.kind, "decoder": repr(mode.decoder),
             "threshold": mode.threshold, "block_size": mode.block, "batch_size": b, **r,
             "param_bytes": module_bytes(*params), "quality": q, "samples": [tok.decode(t) for t in tokens[:2]]}
        runs.append(r)
        per_it = "" if r["tokens_per_iteration"] is None else f"  {r['tokens_per_iteration']:5.2f} tok/iter"
        print(f"  {mode.name:>15} batch {b}: {r['tokens_per_s']:9.1f} tok/s  {r['tokens_per_nfe']:5.2f} tok/NFE{per_it}"
              f"  agree {q['agreement']:.3f}  nll {q['nll']:.3f}  dist-4 {q['distinct_4']:.3f}", flush=True)
    return runs


def ratio(value: float | None, reference: float | None) -> float | None:
    """value / reference, or None when either is missing or the reference is 0 (undefined)."""
    if value is None or reference is None or not math.isfinite(value) or not math.isfinite(reference) \
            or reference == 0:
        return None
    return value / reference


def add_ratios(runs: list[dict]) -> None:
    """Throughput ratios and quality retention of every run against AR / transformers at its batch size."""
    for r in runs:
        same = {x["mode"]: x for x in runs if x["batch_size"] == r["batch_size"]}
        ar, hf = same.get("ar"), same.get("hf_generate")
        r["speedup_vs_ar"] = ratio(r["tokens_per_s"], ar and ar["tokens_per_s"])
        r["speedup_vs_hf"] = ratio(r["tokens_per_s"], hf and hf["tokens_per_s"])
        r["retention_agreement"] = ratio(r["quality"]["agreement"], ar and ar["quality"]["agreement"])
        r["retention_nll"] = ratio(ar and ar["quality"]["nll"], r["quality"]["nll"])
        if r["mode"] == "ar":  # the reference retains all of itself, even where 0 / 0 leaves the ratio undefined
            for key in ("retention_agreement", "retention_nll"):
                r[key] = 1.0 if r[key] is None else r[key]
