"""Quality / speed benchmark: our AR mode, transformers' `generate`, mock-AR, diffusion and speculative decoding.

    python -m twotower.cli bench                       # the full run (benchmarks/README.md)
    python -m twotower.cli bench --smoke --out /tmp/b  # a tiny random model, seconds

NVIDIA's headline for the released model is a trade-off: 98.7% of the AR model's quality at 2.42x its
wall-clock throughput (confidence threshold 0.8, block 16). This measures ours, in one run, on the
same held-out prompts for every mode:

* speed: generated tokens / s (wall clock, one warm-up call per mode, median of `--repeats` runs over
  all prompts; the runs are interleaved, one pass of every mode per round, so drift hits all alike), tokens per NFE, NFE per block, memory (CUDA: peak allocated; CPU: parameter bytes +
  the bytes of the run's cache, both computed from tensor shapes);
* quality: (a) agreement with the held-out continuation over its first 64 tokens, (b) NLL per token
  of the generated continuation under the context tower (teacher-forced; lower is better), (c)
  distinct-2 / distinct-4 ratios (degenerate, repetitive output scores low);
* retention = mode / AR for (a), AR / mode for (b); throughput ratios vs our AR and vs transformers;
* training speed: denoiser fine-tuning step vs AR backbone training step on the same batch;
* a per-phase wall-time profile of mask diffusion and of AR decoding at batch 1.

Every mode is greedy (temperature 0) and ignores EOS, so each generates exactly max_new_tokens.
Results go to `--out`: bench.md (tables), bench.json (every raw number), tradeoff.png.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["main", "agreement", "distinct_n", "continuation_nll", "select_windows", "update_readme"]

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = "twotower/assets/twotower"
DEFAULT_BACKBONE = "twotower/assets/backbone"
AGREEMENT_TOKENS = 64  # agreement is scored over the first 64 generated tokens
TARGET_RETENTION, TARGET_SPEEDUP = 0.987, 2.42  # NVIDIA's headline (threshold 0.8, block 16)
README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"


# ---- modes --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Mode:
    """One way of generating. kind: "ar" (ours), "hf" (transformers), "mock_ar", "diffusion" or
    "speculative" (one-forward drafts verified by the context tower: lossless)."""

    name: str
    kind: str
    threshold: float | None = None
    block: int | None = None

    def describe(self) -> str:
        if self.kind == "diffusion":
            return f"mask diffusion, ConfidenceThreshold({self.threshold:g}), block {self.block}"
        if self.kind == "speculative":
            return f"speculative: 1-forward denoiser draft + context-tower verification, block {self.block}"
        return {"ar": "AR (ours: context tower, cached)", "hf": "transformers greedy generate",
                "mock_ar": "mock-AR (two towers, 1 token / step)"}[self.kind]


def _diffusion(threshold: float, block: int) -> Mode:
    return Mode(f"diff_t{threshold:g}_b{block}", "diffusion", threshold, block)


def _speculative(block: int) -> Mode:
    return Mode(f"spec_b{block}", "speculative", None, block)


BASE_MODES = [Mode("ar", "ar"), Mode("hf_generate", "hf"), Mode("mock_ar", "mock_ar")]
FULL_MODES = BASE_MODES + [_diffusion(t, 16) for t in (0.5, 0.7, 0.8, 0.9, 0.95)] + \
    [_diffusion(0.8, b) for b in (4, 8, 32)] + [_speculative(16)]
SMOKE_MODES = BASE_MODES + [_diffusion(0.5, 16), _diffusion(0.8, 16), _diffusion(0.8, 4), _speculative(16)]


def parse_modes(spec: str | None, available: list[Mode]) -> list[Mode]:
    """`--modes a,b,c` -> Mode list (any diff_t<T>_b<S> or spec_b<S> name is accepted); "ar" is always run first."""
    if not spec:
        return list(available)  # both lists start with "ar"
    known = {m.name: m for m in FULL_MODES + available}
    out = []
    for name in (s.strip() for s in spec.split(",") if s.strip()):
        if name in known:
            out.append(known[name])
            continue
        try:
            if name.startswith("spec_b"):
                out.append(_speculative(int(name.removeprefix("spec_b"))))
                continue
            t, b = name.removeprefix("diff_t").split("_b")
            assert name.startswith("diff_t")
            out.append(_diffusion(float(t), int(b)))
        except (ValueError, AssertionError):
            raise SystemExit(f"unknown mode {name!r}; choose from {', '.join(m.name for m in FULL_MODES)} "
                             "(or any diff_t<THRESHOLD>_b<BLOCK> / spec_b<BLOCK>)") from None
    # "ar" runs first, always: the reference for retention, throughput ratios and "= AR".
    return [known["ar"]] + [m for m in dict.fromkeys(out) if m.name != "ar"]


# ---- prompts ------------------------------------------------------------------------------------


@dataclass
class Window:
    """A held-out prompt: ids = [bos] + tokens[offset : offset + P], truth = the next N tokens."""

    doc: int
    offset: int
    ids: list[int]
    truth: list[int]


def select_windows(docs: list[list[int]], n: int, prompt_len: int, max_new_tokens: int, *, bos_id: int,
                   seed: int = 0) -> list[Window]:
    """n deterministic (seeded) windows from tokenised documents; documents too short are skipped.

    Documents are visited in a seeded order, round-robin, each visit drawing a fresh random offset,
    so the windows spread over as many documents as there are.
    """
    need = prompt_len + max_new_tokens
    eligible = [i for i, d in enumerate(docs) if len(d) >= need]
    if not eligible:
        longest = max((len(d) for d in docs), default=0)
        raise ValueError(f"no held-out document has prompt_len + max_new_tokens = {need} tokens (longest: "
                         f"{longest}); lower --prompt-len or --max-new-tokens")
    rng = random.Random(seed)
    rng.shuffle(eligible)
    seen, out = set(), []
    for k in range(n):
        doc = eligible[k % len(eligible)]
        span = len(docs[doc]) - need + 1
        for _ in range(16):  # avoid repeating a window when the document allows it
            offset = rng.randrange(span)
            if (doc, offset) not in seen:
                break
        seen.add((doc, offset))
        toks = docs[doc]
        out.append(Window(doc, offset, [bos_id] + list(toks[offset: offset + prompt_len]),
                          list(toks[offset + prompt_len: offset + need])))
    return out


def heldout_token_docs(smoke: bool, tokenizer) -> tuple[list[list[int]], str]:
    """Tokenised held-out documents of the embedded stdlib corpus (smoke: its first 60 documents)."""
    from .data import TextDataModule

    dm = TextDataModule(tokenizer=tokenizer, max_documents=60 if smoke else None)
    docs = [tokenizer.encode(t) for t in dm.heldout_documents()]
    return docs, "stdlib held-out split" + (" (first 60 documents)" if smoke else "")


# ---- quality metrics ----------------------------------------------------------------------------


def agreement(generated: Tensor, truth: Tensor, first: int = AGREEMENT_TOKENS) -> Tensor:
    """(B, N), (B, N') -> (B,) fraction of the first min(first, N, N') positions where they are equal."""
    n = min(first, generated.shape[1], truth.shape[1])
    if n == 0:
        raise ValueError("agreement needs at least one position")
    return (generated[:, :n] == truth[:, :n].to(generated.device)).float().mean(-1)


def distinct_n(tokens: list[int] | Tensor, n: int) -> float:
    """Distinct n-grams / n-grams of one sequence (1.0 = no repeated n-gram; nan if shorter than n)."""
    toks = tokens.tolist() if isinstance(tokens, Tensor) else list(tokens)
    grams = [tuple(toks[i: i + n]) for i in range(len(toks) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


@torch.no_grad()
def continuation_nll(context, prompts: Tensor, continuation: Tensor, batch_size: int = 8) -> Tensor:
    """Mean NLL per token (nats) of `continuation` (B, N) after `prompts` (B, T) under `context`.

    Teacher-forced: one causal forward over prompt + continuation; position T - 1 + j predicts
    continuation token j, and only those N positions are scored. Returns (B,) float64.
    """
    out = []
    T = prompts.shape[1]
    for i in range(0, prompts.shape[0], batch_size):
        p, c = prompts[i: i + batch_size], continuation[i: i + batch_size].to(prompts.device)
        logits = context(torch.cat([p, c], 1))[:, T - 1: -1].double()  # (b, N, V)
        nll = -logits.log_softmax(-1).gather(-1, c[..., None]).squeeze(-1)
        out.append(nll.mean(-1).cpu())
    return torch.cat(out)


def ratio(value: float | None, reference: float | None) -> float | None:
    """value / reference, or None when either is missing or the reference is 0 (undefined)."""
    if value is None or reference is None or not math.isfinite(value) or not math.isfinite(reference) \
            or reference == 0:
        return None
    return value / reference


# ---- devices, memory, timing --------------------------------------------------------------------


def _sync(device: torch.device) -> None:
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
def _patched(obj, name: str, wrapper):
    """Replace obj.name by wrapper(original) for one run only (an instance attribute shadows a method)."""
    original = getattr(obj, name)
    own = name in vars(obj)  # a module's function (restore it) vs a class method (drop the shadow)
    setattr(obj, name, wrapper(original))
    try:
        yield
    finally:
        if own:
            setattr(obj, name, original)
        else:
            delattr(obj, name)


def _capture_cache(model):
    """Records the HybridCache every `context.prefill` call returns (to size it)."""
    box = []

    def wrap(original):
        def prefill(*a, **k):
            out = original(*a, **k)
            box.append(out[1])
            return out
        return prefill

    return _patched(model.context, "prefill", wrap), box


# ---- running one mode ---------------------------------------------------------------------------


@dataclass
class Call:
    new_tokens: Tensor  # (B, N) on CPU
    nfe: Tensor  # (B,) on CPU
    blocks: int
    cache_bytes: int | None = None


class Runner:
    """Calls one mode on a (B, T) batch: our model's methods, or transformers' `generate`."""

    def __init__(self, model, hf, max_new_tokens: int):
        self.model, self.hf, self.N = model, hf, max_new_tokens

    def __call__(self, mode: Mode, ids: Tensor, mask: Tensor, *, measure_cache: bool = False) -> Call:
        m, N = self.model, self.N
        if mode.kind == "hf":
            return self._hf(ids, mask, measure_cache)
        patch, box = _capture_cache(m) if measure_cache else (contextlib.nullcontext(), [])
        with patch:
            if mode.kind == "ar":
                out = m.generate_ar(ids, N, attention_mask=mask, eos_token_id=None, return_dict=True)
            elif mode.kind == "mock_ar":
                out = m.generate_mock_ar(ids, N, attention_mask=mask, eos_token_id=None, return_dict=True)
            elif mode.kind == "speculative":
                out = m.generate_speculative(ids, N, block_size=mode.block, attention_mask=mask, eos_token_id=None,
                                             return_dict=True)
            else:
                from .samplers import ConfidenceThreshold

                # steps_per_block = block: the threshold alone sets the pace (it can take one token a step).
                out = m.generate(ids, mask, sampler=ConfidenceThreshold(mode.threshold), block_size=mode.block,
                                 steps_per_block=mode.block, max_new_tokens=N, temperature=0.0, eos_token_id=None)
        if out.new_tokens.shape[1] != N:
            raise RuntimeError(f"{mode.name} generated {out.new_tokens.shape[1]} tokens, expected {N}")
        cache = box[0].nbytes() if box else None
        return Call(out.new_tokens.cpu(), out.nfe.cpu(), out.blocks, cache)

    @torch.no_grad()
    def _hf(self, ids: Tensor, mask: Tensor, measure_cache: bool) -> Call:
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


def _timed_pass(runner: Runner, mode: Mode, batches: list[tuple[Tensor, Tensor]], device: torch.device):
    """One timed pass of `mode` over every batch: (seconds, calls, CUDA peak working bytes or None)."""
    resident = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)  # every loaded model's weights, not only this mode's
    _sync(device)
    start = time.perf_counter()
    calls = [runner(mode, ids, mask) for ids, mask in batches]
    _sync(device)
    seconds = time.perf_counter() - start
    peak = None if resident is None else (torch.cuda.max_memory_allocated(device), resident)
    return seconds, calls, peak


def run_modes(runner: Runner, modes: list[Mode], batches: list[tuple[Tensor, Tensor]], repeats: int,
              device: torch.device) -> list[dict]:
    """One warm-up call per mode, then `repeats` rounds in which every mode makes one timed pass over
    every batch. Interleaving the modes round by round means a slow spell of the machine (other load,
    frequency changes) lands on every mode alike instead of on whichever mode happened to run then,
    so the throughput ratios are steadier. Returns, per mode, raw numbers + the tokens."""
    warm = [runner(mode, *batches[0], measure_cache=True) for mode in modes]  # warm-up; also sizes the caches
    seconds = [[] for _ in modes]
    first: list = [None] * len(modes)
    deterministic = [True] * len(modes)
    peaks: list = [None] * len(modes)
    started = time.perf_counter()
    for rnd in range(repeats):
        for i, mode in enumerate(modes):
            dt, calls, peak = _timed_pass(runner, mode, batches, device)
            seconds[i].append(dt)
            new = torch.cat([c.new_tokens for c in calls])
            if first[i] is None:
                first[i] = calls
            else:
                deterministic[i] &= torch.equal(torch.cat([c.new_tokens for c in first[i]]), new)
            if peak is not None and (peaks[i] is None or peak[0] - peak[1] > peaks[i][0] - peaks[i][1]):
                peaks[i] = peak
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
            # Speculative: one draft forward per row and iteration by construction (rows run different
            # numbers of iterations), so tok/NFE already is tokens per iteration; no per-block figure.
            "nfe_per_block": nfe / block_rows if block_rows and mode.kind != "speculative" else None,
            "deterministic_across_repeats": deterministic[i],
            "cache_bytes": warm[i].cache_bytes,
            "cuda_peak_bytes": None if peaks[i] is None else peaks[i][0],
            "cuda_peak_working_bytes": None if peaks[i] is None else peaks[i][0] - peaks[i][1],
        })
    return out


def quality(context, prompts: Tensor, tokens: Tensor, truth: Tensor, ar_tokens: Tensor | None) -> dict:
    """Per-mode quality: agreement with the held-out text, NLL under the context tower, distinct-n."""
    agree = agreement(tokens, truth)
    nll = continuation_nll(context, prompts, tokens.to(prompts.device))
    d2 = [distinct_n(r, 2) for r in tokens]
    d4 = [distinct_n(r, 4) for r in tokens]
    out = {"agreement": agree.mean().item(), "nll": nll.mean().item(),
           "distinct_2": statistics.fmean(d2), "distinct_4": statistics.fmean(d4),
           "agreement_per_prompt": agree.tolist(), "nll_per_prompt": nll.tolist()}
    if ar_tokens is not None:
        out["match_ar"] = (tokens == ar_tokens).float().mean().item()
    return out


# ---- training speed -----------------------------------------------------------------------------


def training_batch(docs: list[list[int]], batch: int, seq_len: int, *, bos_id: int, eos_id: int) -> Tensor:
    """(batch, seq_len + 1) rows packed from `[bos] + doc + [eos]` (tiled when the documents are short)."""
    stream = [t for d in docs for t in [bos_id, *d, eos_id]]
    need = batch * (seq_len + 1)
    stream = (stream * (need // max(1, len(stream)) + 1))[:need]
    return torch.tensor(stream, dtype=torch.long).view(batch, seq_len + 1)


def _median_step_seconds(step, steps: int, warmup: int, device) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        _sync(device)
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return times


def training_speed(model, backbone: Path, rows: Tensor, *, steps: int, warmup: int, device: torch.device) -> dict:
    """Denoiser fine-tuning step vs AR backbone training step, both on inputs (B, L) = rows[:, :-1].

    Denoiser: DenoiserFineTuning.forward_loss (frozen context pass + denoiser over every block) +
    backward + AdamW. AR: a trainable ContextTower from the same backbone, next-token cross-entropy
    over the same B x L inputs (targets = rows[:, 1:]) + backward + AdamW.
    """
    from .towers.context import ContextTower
    from .training import DenoiserFineTuning

    x = rows[:, :-1].to(device)
    B, L = x.shape
    ft = DenoiserFineTuning(backbone=str(backbone), block_size=model.block_size, mask_token_id=model.mask_token_id,
                            shifted=model.shifted)
    ft.denoiser.load_state_dict(model.denoiser.state_dict())  # the benchmarked model's own denoiser
    ft.to(device).train()
    params = [p for p in ft.denoiser.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    gen = torch.Generator(device=device).manual_seed(0)

    def denoiser_step():
        opt.zero_grad(set_to_none=True)
        ft.forward_loss(x, generator=gen)["loss"].backward()
        opt.step()

    den_times = _median_step_seconds(denoiser_step, steps, warmup, device)
    del ft, opt, params

    ar = ContextTower.from_pretrained(backbone).to(device).train().requires_grad_(True)
    ar_opt = torch.optim.AdamW(ar.parameters(), lr=1e-5)
    target = rows[:, 1:].to(device)

    def ar_step():
        ar_opt.zero_grad(set_to_none=True)
        logits = ar(x)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1)).backward()
        ar_opt.step()

    ar_times = _median_step_seconds(ar_step, steps, warmup, device)
    del ar, ar_opt
    den_s, ar_s = statistics.median(den_times), statistics.median(ar_times)
    return {"batch": B, "seq_len": L, "tokens_per_step": B * L, "steps": steps, "warmup": warmup,
            "denoiser_step_seconds": den_times, "ar_step_seconds": ar_times,
            "denoiser_tokens_per_s": B * L / den_s, "ar_tokens_per_s": B * L / ar_s,
            "ratio": ar_s / den_s, "target_ratio": 0.66}


# ---- per-phase profile --------------------------------------------------------------------------


class PhaseTimer:
    """Accumulates wall time per phase; `wrap(name)` times a callable (syncing CUDA around it)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.last_forward_end: float | None = None

    def add(self, name: str, dt: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + dt
        self.calls[name] = self.calls.get(name, 0) + 1

    def wrap(self, name: str, mark_end: bool = False):
        def decorate(fn):
            def timed(*a, **k):
                _sync(self.device)
                start = time.perf_counter()
                out = fn(*a, **k)
                _sync(self.device)
                end = time.perf_counter()
                self.add(name, end - start)
                if mark_end:
                    self.last_forward_end = end
                return out
            return timed
        return decorate


def profile(model, mode: Mode, batches: list[tuple[Tensor, Tensor]], N: int, device: torch.device) -> dict:
    """Wall-time split of one pass over `batches` (batch 1) into its phases.

    Diffusion: "denoiser forward" = DenoiserTower.forward_block; "sampling/commit" = from its return
    to the end of the step (mask logit, argmax, confidence softmax, sampler, commit), read through
    the step callback. Speculative: "denoiser forward (draft)", "context extend (verify)" and
    "accept (rollback)" = ContextTower.accept. AR: "decode forward" = ContextTower.extend;
    "sampling/commit" = the argmax. CUDA is synchronised around each timed call, which adds a
    little time of its own.
    """
    from . import generation
    from .samplers import ConfidenceThreshold

    pt = PhaseTimer(device)
    ctx = model.context
    total = 0.0
    names = {"diffusion": ("denoiser forward", "context extend"),
             "speculative": ("denoiser forward (draft)", "context extend (verify)"),
             "ar": (None, "decode forward (extend)")}[mode.kind]
    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(ctx, "prefill", pt.wrap("prefill")))
        stack.enter_context(_patched(ctx, "extend", pt.wrap(names[1])))
        if mode.kind != "ar":
            stack.enter_context(_patched(model.denoiser, "forward_block", pt.wrap(names[0], True)))
        if mode.kind == "speculative":
            stack.enter_context(_patched(ctx, "accept", pt.wrap("accept (rollback)")))
        if mode.kind == "ar":
            stack.enter_context(_patched(generation, "_predict", pt.wrap("sampling/commit")))

        def on_step(*_):
            _sync(device)
            pt.add("sampling/commit", time.perf_counter() - pt.last_forward_end)

        for ids, mask in batches:
            _sync(device)
            start = time.perf_counter()
            if mode.kind == "diffusion":
                model.generate(ids, mask, sampler=ConfidenceThreshold(mode.threshold), block_size=mode.block,
                               steps_per_block=mode.block, max_new_tokens=N, eos_token_id=None, step_callback=on_step)
            elif mode.kind == "speculative":
                model.generate_speculative(ids, N, block_size=mode.block, attention_mask=mask, eos_token_id=None,
                                           step_callback=on_step)
            else:
                model.generate_ar(ids, N, attention_mask=mask, eos_token_id=None, return_dict=True)
            _sync(device)
            total += time.perf_counter() - start
    phases = {"diffusion": ["prefill", names[0], "sampling/commit", names[1]],
              "speculative": ["prefill", names[0], "sampling/commit", names[1], "accept (rollback)"],
              "ar": ["prefill", names[1], "sampling/commit"]}[mode.kind]
    rows = {p: {"seconds": pt.seconds.get(p, 0.0), "calls": pt.calls.get(p, 0)} for p in phases}
    rows["other"] = {"seconds": max(0.0, total - sum(r["seconds"] for r in rows.values())), "calls": None}
    for r in rows.values():
        r["share"] = r["seconds"] / total if total else None
        r["ms_per_call"] = 1e3 * r["seconds"] / r["calls"] if r["calls"] else None
    tokens = N * sum(ids.shape[0] for ids, _ in batches)
    return {"mode": mode.name, "total_seconds": total, "tokens": tokens, "tokens_per_s": tokens / total,
            "phases": rows}


# ---- the models ---------------------------------------------------------------------------------


def smoke_model(tmp: Path):
    """A tiny random two-tower model over the byte vocabulary (260), its backbone saved to `tmp`."""
    from .model import TwoTowerLM
    from .towers.context import ContextTower
    from .towers.loading import save_backbone_hf
    from .training import init_weights, tiny_nemotron_config

    cfg = tiny_nemotron_config(pattern="M*-EM*E", vocab_size=260, hidden_size=32, num_attention_heads=4,
                               num_key_value_heads=2, head_dim=8, intermediate_size=48, mamba_num_heads=4,
                               mamba_head_dim=8, ssm_state_size=8, n_groups=2, n_routed_experts=4,
                               num_experts_per_tok=2, moe_intermediate_size=24,
                               moe_shared_expert_intermediate_size=16, max_position_embeddings=512, chunk_size=16)
    ctx = ContextTower(cfg)
    init_weights(ctx, seed=0, std=0.3)
    with torch.no_grad():  # peaky logits, so that the confidence thresholds commit different amounts
        ctx.lm_head.weight.mul_(3.0)
    save_backbone_hf({k.removeprefix("backbone."): v for k, v in ctx.state_dict().items()}, tmp, config=cfg)
    return TwoTowerLM.from_backbone(tmp).eval(), tmp


def load_models(args, tmp: Path, device: torch.device, *, need_hf: bool = True):
    """(TwoTowerLM, transformers NemotronHForCausalLM or None, backbone dir), in eval mode on `device`."""
    from transformers import NemotronHForCausalLM

    from .model import TwoTowerLM

    if args.smoke:
        model, backbone = smoke_model(tmp)
    else:
        model_dir, backbone = _resolve(args.model, "--model"), _resolve(args.backbone, "--backbone")
        model = TwoTowerLM.from_pretrained(model_dir).eval()
    model.to(device)
    if not need_hf:
        return model, None, Path(backbone)
    dtype = model.context.backbone.embeddings.weight.dtype  # the baseline runs in the same precision
    with _quiet_transformers():
        hf = NemotronHForCausalLM.from_pretrained(backbone, dtype=dtype).to(device).eval()
    hf.generation_config.eos_token_id = None  # never stop early: every mode makes max_new_tokens
    hf.generation_config.pad_token_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    return model, hf, Path(backbone)


def _resolve(path: str, flag: str) -> Path:
    p = Path(path)
    if not p.is_absolute() and not p.exists():
        p = REPO_ROOT / path
    if not (p / "config.json").exists():
        raise SystemExit(f"{flag} {path}: no config.json there. Build the embedded model first (README), pass "
                         f"{flag} DIR, or try --smoke")
    return p


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


def machine_info(device: torch.device, threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import transformers

    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": threads, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(), "device": str(device),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# ---- reports ------------------------------------------------------------------------------------


def _f(v, fmt: str = ".3f", missing: str = "n/a") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return missing
    return format(v, fmt)


def _mib(v) -> str:
    return _f(None if v is None else v / 2**20, ".2f")


def render_markdown(res: dict, *, level: int = 1, png: str = "tradeoff.png") -> str:
    """The report as markdown; `level` is the heading level of its title (README: 3)."""
    h = "#" * level
    s, m = res["settings"], res["machine"]
    cuda = m["device"].startswith("cuda")
    L: list[str] = [f"{h} twotower benchmark{' (smoke: tiny random model)' if s['smoke'] else ''}", ""]
    L += [f"{len(res['prompts'])} held-out prompts ({s['prompt_source']}), prompt = [bos] + {s['prompt_len']} "
          f"byte tokens, {s['max_new_tokens']} new tokens, seed {s['seed']}; greedy (temperature 0) everywhere. "
          f"**EOS is ignored** (no early stop), so every mode generates exactly {s['max_new_tokens']} tokens and "
          f"speeds compare like for like. tok/s = generated tokens / wall second, median of {s['repeats']} runs "
          f"after one warm-up call per mode, interleaved (each round times one pass of every mode, so a slow "
          f"spell of the machine hits all modes alike). Diffusion uses steps_per_block = block size. spec_b<S>: speculative "
          f"decoding, a one-forward denoiser draft of S positions verified by the context tower (its output is "
          f"the AR output); its NFE counts denoiser forwards, one per iteration, so tok/NFE = tokens per "
          f"iteration, each of which also runs one verifying context extend.", ""]
    if s.get("compile"):
        L += ["**Compiled**: our towers ran under `torch.compile` (`TwoTowerLM.compile_towers`) in every mode of ours, "
              "AR included; transformers' `generate` ran eagerly. Compilation happened in the warm-up calls.", ""]
    L += [f"Machine: {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch threads, torch {m['torch']}, "
          f"transformers {m['transformers']}, device `{m['device']}`" + (f" ({m['gpu']})" if cuda else "")
          + f", {m['date']}.", ""]
    L += [f"{h}# Generation", ""]
    mem = "params + CUDA peak working MiB" if cuda else "params + cache MiB (from shapes)"
    L += [f"| mode | batch | tok/s | x AR | x HF | tok/NFE | NFE/block | agree@{AGREEMENT_TOKENS} | ret. agree "
          f"| NLL | ret. NLL | dist-2 | dist-4 | = AR | {mem} |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["runs"]:
        q = r["quality"]
        memv = f"{_mib(r['param_bytes'])} + {_mib(r['cuda_peak_working_bytes' if cuda else 'cache_bytes'])}"
        L.append(f"| {r['mode']} | {r['batch_size']} | {_f(r['tokens_per_s'], '.1f')} | {_f(r['speedup_vs_ar'], '.2f')} "
                 f"| {_f(r['speedup_vs_hf'], '.2f')} | {_f(r['tokens_per_nfe'], '.2f')} "
                 f"| {_f(r['nfe_per_block'], '.2f', '-')} | {_f(q['agreement'])} | {_f(r['retention_agreement'])} "
                 f"| {_f(q['nll'])} | {_f(r['retention_nll'])} | {_f(q['distinct_2'])} | {_f(q['distinct_4'])} "
                 f"| {_f(q.get('match_ar'))} | {memv} |")
    ref = res["reference"]
    L += ["", f"Held-out text itself: NLL {_f(ref['nll'])}, dist-2 {_f(ref['distinct_2'])}, "
          f"dist-4 {_f(ref['distinct_4'])}.", ""]
    L += ["- **agree@64**: fraction of the first 64 generated positions equal to the held-out continuation. "
          "**ret. agree** = mode / AR (same batch size).",
          "- **NLL**: mean negative log-likelihood (nats / token) of the generated continuation under the context "
          "tower, teacher-forced over prompt + continuation. **Lower is better**; **ret. NLL** = AR NLL / mode NLL. "
          "Greedy AR output is the context tower's own choice, so its NLL is low by construction.",
          "- **dist-2 / dist-4**: distinct n-grams / n-grams of a continuation (mean over prompts); low = repetitive.",
          "- **= AR**: fraction of generated tokens identical to our AR mode's at the same batch size.",
          "- **x AR / x HF**: throughput ratio vs our AR mode / vs transformers' greedy `generate` "
          "(same batch size). tok/NFE of transformers is 1 by construction (not counted).",
          "- Memory: " + ("parameter bytes of the model(s) the mode uses + measured CUDA working memory: "
                          "`torch.cuda.max_memory_allocated` during the timed runs minus what was allocated before "
                          "them (all loaded weights); the raw peak is in bench.json." if cuda else
                          "CPU run, so no measured peak: parameter bytes of the model(s) the mode uses + bytes of "
                          "that run's cache tensors (`HybridCache.nbytes()`; transformers: its cache object), "
                          "computed from tensor shapes, not measured RSS."), ""]
    if any(not r["deterministic_across_repeats"] for r in res["runs"]):
        bad = ", ".join(f"{r['mode']}@{r['batch_size']}" for r in res["runs"] if not r["deterministic_across_repeats"])
        L += [f"Warning: output differed between repeats for {bad} (quality uses the first repeat).", ""]
    for head in (r for r in res["runs"] if r["mode"] in ("diff_t0.8_b16", "spec_b16")):
        what = "Headline operating point (threshold 0.8, block 16)" if head["kind"] == "diffusion" else \
            "Lossless speculative mode (block 16)"
        vs_hf = "" if head["speedup_vs_hf"] is None else f" ({head['speedup_vs_hf']:.2f}x transformers')"
        L += [f"- {what} at batch {head['batch_size']}: "
              f"{_f(head['speedup_vs_ar'], '.2f')}x our AR's throughput{vs_hf} at "
              f"{_f(head['retention_agreement'], '.1%')} agreement retention / "
              f"{_f(head['retention_nll'], '.1%')} NLL retention (NVIDIA: {TARGET_SPEEDUP}x at {TARGET_RETENTION:.1%})."]
    L += [""]
    L += [f"![quality retention vs throughput]({png})", ""]
    t = res.get("training")
    if t:
        L += [f"{h}# Training speed", "",
              f"Batch {t['batch']} x {t['seq_len']} tokens, median step time of {t['steps']} steps after "
              f"{t['warmup']} warm-up step(s); a step = forward + backward + AdamW step.", "",
              "| path | step ms | tokens/s |", "|---|---:|---:|",
              f"| denoiser fine-tuning (frozen context pass + denoiser) | "
              f"{_f(1e3 * statistics.median(t['denoiser_step_seconds']), '.1f')} | {_f(t['denoiser_tokens_per_s'], '.0f')} |",
              f"| AR backbone training | {_f(1e3 * statistics.median(t['ar_step_seconds']), '.1f')} "
              f"| {_f(t['ar_tokens_per_s'], '.0f')} |", "",
              f"Denoiser / AR training throughput: **{_f(t['ratio'], '.2f')}** (target >= {t['target_ratio']}).", ""]
    prof = res.get("profile")
    if prof:
        L += [f"{h}# Where the time goes (batch 1)", ""]
        for p in prof:
            L += [f"`{p['mode']}`: {_f(p['total_seconds'], '.2f')} s over {p['tokens']} tokens "
                  f"({_f(p['tokens_per_s'], '.1f')} tok/s with timers on).", "",
                  "| phase | seconds | share | calls | ms / call |", "|---|---:|---:|---:|---:|"]
            for name, r in p["phases"].items():
                L.append(f"| {name} | {_f(r['seconds'], '.3f')} | {_f(r['share'], '.1%')} | {r['calls'] or '-'} "
                         f"| {_f(r['ms_per_call'], '.2f', '-')} |")
            top = max(p["phases"].items(), key=lambda kv: kv[1]["seconds"])
            L += ["", f"Largest share: {top[0]} ({_f(top[1]['share'], '.0%')}).", ""]
    return "\n".join(L).rstrip() + "\n"


def plot_tradeoff(res: dict, path: Path) -> None:
    """Quality retention (agreement, NLL) vs throughput ratio over AR: one labelled point per mode x batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5), constrained_layout=True)
    batches = sorted({r["batch_size"] for r in res["runs"]})
    colors = dict(zip(batches, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, key, title in ((axes[0], "retention_agreement", "(a) agreement retention (mode / AR)"),
                           (axes[1], "retention_nll", "(b) NLL retention (AR NLL / mode NLL; lower NLL is better)")):
        xs, ys, others = [TARGET_SPEEDUP, 1.0], [TARGET_RETENTION, 1.0], 0
        for k, b in enumerate(batches):
            pts = [r for r in res["runs"] if r["batch_size"] == b and r[key] is not None and r["speedup_vs_ar"]]
            ax.scatter([r["speedup_vs_ar"] for r in pts], [r[key] for r in pts], color=colors[b], label=f"batch {b}",
                       zorder=3)
            for r in pts:  # batch sizes' labels on alternating sides so coinciding points stay readable
                ax.annotate(r["mode"], (r["speedup_vs_ar"], r[key]), fontsize=7, color=colors[b],
                            xytext=(4, 4 if k % 2 == 0 else -10), textcoords="offset points")
            xs += [r["speedup_vs_ar"] for r in pts]
            ys += [r[key] for r in pts]
            others += sum(r["mode"] != "ar" for r in pts)
        ax.axhline(TARGET_RETENTION, ls="--", color="gray", lw=1)
        ax.axvline(TARGET_SPEEDUP, ls="--", color="gray", lw=1)
        ax.text(TARGET_SPEEDUP, TARGET_RETENTION, f" NVIDIA: {TARGET_RETENTION:.1%} @ {TARGET_SPEEDUP}x",
                fontsize=8, color="gray", va="bottom")
        ax.set_xlim(0, 1.15 * max(xs))
        ax.set_ylim(min(0.0, 1.1 * min(ys)), 1.1 * max(ys))
        ax.set_xlabel("throughput ratio vs our AR (tokens/s, same batch size)")
        ax.set_ylabel("quality retention")
        ax.set_title(title if others else title + "\n(undefined for the other modes: AR's score is 0)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
    fig.suptitle(f"twotower: quality vs speed ({res['machine']['device']}"
                 f"{', smoke model' if res['settings']['smoke'] else ''})")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def update_readme(readme: Path, text: str) -> None:
    """Replace what sits between the bench markers in `readme` with `text` (append a Results section
    with the markers when they are missing)."""
    body = readme.read_text() if readme.exists() else ""
    block = f"{README_START}\n{text.rstrip()}\n{README_END}"
    i, j = body.find(README_START), body.find(README_END)
    if i != -1 and j > i:
        body = body[:i] + block + body[j + len(README_END):]
    else:
        body = body.rstrip() + ("\n\n" if body.strip() else "") + f"## Results\n\n{block}\n"
    readme.write_text(body)


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items() if not isinstance(v, Tensor)}
    if isinstance(obj, list):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# ---- main ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m twotower.cli bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="two-tower checkpoint directory")
    p.add_argument("--backbone", default=DEFAULT_BACKBONE, help="AR NemotronH checkpoint (transformers baseline, training)")
    p.add_argument("--prompts", type=int, default=64, help="held-out prompts")
    p.add_argument("--prompt-len", type=int, default=128, help="prompt tokens (after [bos])")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per mode (median reported)")
    p.add_argument("--batch-sizes", default="1,8")
    p.add_argument("--modes", default=None, help="comma list, e.g. ar,hf_generate,diff_t0.8_b16 (default: all)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=0, help="prompt-window seed")
    p.add_argument("--train-batch", type=int, default=8)
    p.add_argument("--train-seq-len", type=int, default=256)
    p.add_argument("--train-steps", type=int, default=5, help="timed training steps per path")
    p.add_argument("--no-training", action="store_true", help="skip the training-speed comparison")
    p.add_argument("--no-profile", action="store_true", help="skip the per-phase profile")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile our towers (TwoTowerLM.compile_towers) for every mode of ours, AR included; "
                        "compilation happens in the warm-up calls, outside the timings")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--update-readme", action="store_true", help="write bench.md into README.md's Results section")
    p.add_argument("--readme", default=str(REPO_ROOT / "README.md"), help=argparse.SUPPRESS)
    p.add_argument("--smoke", action="store_true",
                   help="tiny random model, 2 prompts of 32 tokens, 16 new tokens, 1 repeat, batch 1,2, fewer "
                        "modes, 1 thread unless --threads")
    return p


def _apply_smoke(args) -> None:
    args.prompts, args.prompt_len, args.max_new_tokens, args.repeats = 2, 32, 16, 1
    args.batch_sizes, args.train_batch, args.train_seq_len, args.train_steps = "1,2", 2, 32, 2
    if args.threads is None:
        args.threads = 1  # a tiny model: more threads only add synchronisation


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `cli bench -- --smoke`: argparse.REMAINDER keeps the separator
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    if args.smoke:
        _apply_smoke(args)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if not batch_sizes or min(batch_sizes) < 1 or args.prompts < 1 or args.repeats < 1 or args.max_new_tokens < 1:
        raise SystemExit("--prompts, --repeats, --max-new-tokens and every --batch-sizes entry must be >= 1")
    modes = parse_modes(args.modes, SMOKE_MODES if args.smoke else FULL_MODES)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    threads_before = torch.get_num_threads()
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix="twotower-bench-") as tmp:
            res = _run(args, modes, batch_sizes, device, threads, Path(tmp))
    finally:
        torch.set_num_threads(threads_before)
    (out_dir / "bench.json").write_text(json.dumps(_jsonable(res), indent=1, allow_nan=False))
    plot_tradeoff(res, out_dir / "tradeoff.png")
    md = render_markdown(res)
    (out_dir / "bench.md").write_text(md)
    print(f"wrote {out_dir / 'bench.md'}, {out_dir / 'bench.json'}, {out_dir / 'tradeoff.png'}")
    if args.update_readme:
        readme = Path(args.readme)
        png = os.path.relpath((out_dir / "tradeoff.png").resolve(), readme.resolve().parent)
        update_readme(readme, render_markdown(res, level=3, png=png))
        print(f"updated the Results section of {readme}")
    return 0


def _run(args, modes: list[Mode], batch_sizes: list[int], device: torch.device, threads: int, tmp: Path) -> dict:
    from .tokenizers import ByteTokenizer

    torch.manual_seed(args.seed)
    model, hf, backbone = load_models(args, tmp, device, need_hf=any(m.kind == "hf" for m in modes))
    if args.compile:
        model.compile_towers()
    vocab = model.config.vocab_size
    if vocab < ByteTokenizer.MIN_VOCAB:
        raise SystemExit(f"the benchmark prompts are byte-tokenised (vocab >= 260); this model's vocab is {vocab}")
    tok = ByteTokenizer(vocab)
    docs, source = heldout_token_docs(args.smoke, tok)
    windows = select_windows(docs, args.prompts, args.prompt_len, args.max_new_tokens, bos_id=tok.bos_token_id,
                             seed=args.seed)
    prompts = torch.tensor([w.ids for w in windows], device=device)
    truth = torch.tensor([w.truth for w in windows])
    runner = Runner(model, hf, args.max_new_tokens)
    print(f"bench: {len(windows)} prompts x {args.max_new_tokens} new tokens, modes {[m.name for m in modes]}, "
          f"batch sizes {batch_sizes}, device {device}, {threads} threads; greedy, EOS ignored", flush=True)

    with torch.inference_mode(), _quiet_transformers():
        runs = [run for b in batch_sizes for run in _generation_runs(runner, modes, prompts, truth, b, args.repeats,
                                                                      device, tok)]
        _ratios(runs)
        ref_nll = continuation_nll(model.context, prompts, truth.to(device))
        reference = {"nll": ref_nll.mean().item(), "distinct_2": statistics.fmean(distinct_n(t, 2) for t in truth),
                     "distinct_4": statistics.fmean(distinct_n(t, 4) for t in truth)}

    result = {"settings": {k: v for k, v in vars(args).items() if k != "readme"} | {
                  "prompt_source": source, "modes": [m.name for m in modes], "batch_sizes": batch_sizes,
                  "temperature": 0.0, "eos": "ignored (eos_token_id=None): every mode generates max_new_tokens",
                  "agreement_tokens": AGREEMENT_TOKENS, "dtype": str(model.context.backbone.embeddings.weight.dtype),
                  "block_size_model": model.block_size},
              "machine": machine_info(device, threads),
              "prompts": [{"doc": w.doc, "offset": w.offset, "text": tok.decode(w.ids)} for w in windows],
              "reference": reference, "runs": runs}
    del hf, runner
    if not args.no_training:
        rows = training_batch(docs, args.train_batch, args.train_seq_len, bos_id=tok.bos_token_id,
                              eos_id=tok.eos_token_id)
        result["training"] = training_speed(model, backbone, rows, steps=args.train_steps,
                                            warmup=1 if args.smoke else 2, device=device)
        t = result["training"]
        print(f"  training: denoiser {t['denoiser_tokens_per_s']:.0f} tok/s, AR {t['ar_tokens_per_s']:.0f} tok/s, "
              f"ratio {t['ratio']:.2f}", flush=True)
    if not args.no_profile:
        one = [(prompts[i: i + 1], torch.ones_like(prompts[i: i + 1])) for i in range(len(windows))]
        result["profile"] = []
        with torch.inference_mode():
            for mode in (_diffusion(0.8, 16), _speculative(16), Mode("ar", "ar")):
                result["profile"].append(profile(model, mode, one, args.max_new_tokens, device))
                p = result["profile"][-1]
                split = ", ".join(f"{k} {v['share']:.0%}" for k, v in p["phases"].items() if v["share"] is not None)
                print(f"  profile {mode.name}: {split}", flush=True)
    return result


def _generation_runs(runner: Runner, modes: list[Mode], prompts: Tensor, truth: Tensor, b: int, repeats: int,
                     device: torch.device, tok) -> list[dict]:
    """Every mode at batch size b (the prompts in batches of b): speed, memory and quality, one dict each."""
    model = runner.model
    batches = [(prompts[i: i + b], torch.ones_like(prompts[i: i + b])) for i in range(0, prompts.shape[0], b)]
    runs, ar_tokens = [], None  # modes[0] is "ar" (parse_modes), the reference for "= AR"
    print(f"  batch {b}: warm-up, then {repeats} interleaved rounds of {len(modes)} modes", flush=True)
    for mode, r in zip(modes, run_modes(runner, modes, batches, repeats, device)):
        tokens = r.pop("tokens")
        ar_tokens = tokens if mode.kind == "ar" else ar_tokens
        params = {"hf": (runner.hf,), "ar": (model.context,)}.get(mode.kind, (model.context, model.denoiser))
        block = mode.block or (model.block_size if mode.kind == "mock_ar" else None)
        r = {"mode": mode.name, "description": mode.describe(), "kind": mode.kind, "threshold": mode.threshold,
             "block_size": block, "batch_size": b, **r, "param_bytes": module_bytes(*params),
             "quality": quality(model.context, prompts, tokens, truth, ar_tokens),
             "samples": [tok.decode(t) for t in tokens[:2]]}
        runs.append(r)
        q = r["quality"]
        print(f"  {mode.name:>15} batch {b}: {r['tokens_per_s']:9.1f} tok/s  {r['tokens_per_nfe']:5.2f} tok/NFE"
              f"  agree {q['agreement']:.3f}  nll {q['nll']:.3f}  dist-4 {q['distinct_4']:.3f}", flush=True)
    return runs


def _ratios(runs: list[dict]) -> None:
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


if __name__ == "__main__":
    sys.exit(main())
