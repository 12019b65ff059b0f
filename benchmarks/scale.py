"""Scale section of the benchmark: loading and forward costs of a real-sized checkpoint against transformers.

    python benchmarks/make_scale_checkpoint.py /tmp/scale-0.3b     # once (~0.3 B, bf16, 32 experts)
    python benchmarks/scale.py --checkpoint /tmp/scale-0.3b [--out results/scale.json]
    python benchmarks/bench.py ... --scale-checkpoint /tmp/scale-0.3b

Loads (each in a fresh child process, so one load's memory cannot hide another's):
  ctx       `ContextTowerBase.from_pretrained(ckpt, dtype)`
  backbone  `TwoTowerLM.from_backbone(ckpt, dtype)` (both towers)
  twotower  `TwoTowerLM.from_pretrained(converted, dtype)` (the released layout, written first)
  hf        transformers' `NemotronHForCausalLM.from_pretrained(ckpt, dtype)`
Each child reports seconds and peak RSS above the RSS it had right before the load (imports done),
and the bytes of the weights it holds: ratio = peak / weights.

Forwards (same weights, same dtype, one thread count, this process): after a 64-token prompt,
  ar_step    one token appended to the cache (our `extend` vs transformers with past_key_values)
  block16    16 tokens appended to the cache (our `extend` vs transformers)
  denoise16  our denoiser's `forward_block` of a 16-token block (no transformers counterpart)
reported as the median milliseconds of `--repeats` calls.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a file: benchmarks/ is a folder of the repository
    sys.path.insert(0, str(ROOT))
from benchmarks.memory import PEAK_RSS_PRELUDE  # noqa: E402

CHILD = r"""
import gc, json, os, resource, sys, time
import torch
import twotower.model, twotower.towers
from twotower.towers.base import ContextTowerBase
from twotower.model import TwoTowerLM
kind, path, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
if kind == "hf":
    from transformers import AutoModelForCausalLM
""" + PEAK_RSS_PRELUDE + r"""t0 = time.perf_counter()
if kind == "ctx":
    model = ContextTowerBase.from_pretrained(path, dtype=dtype)
elif kind == "backbone":
    model = TwoTowerLM.from_backbone(path, dtype=dtype)
elif kind == "twotower":
    model = TwoTowerLM.from_pretrained(path, dtype=dtype)
else:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
seconds = time.perf_counter() - t0
peak = peak_rss()
seen, weights = set(), 0
for t in list(model.parameters()) + list(model.buffers()):
    if t.untyped_storage().data_ptr() not in seen:
        seen.add(t.untyped_storage().data_ptr())
        weights += t.untyped_storage().nbytes()
print(json.dumps({"seconds": seconds, "peak_bytes": peak - before, "weight_bytes": weights}))
"""


def measure_load(kind: str, path: str | Path, dtype: str = "bfloat16", threads: int | None = None) -> dict:
    """Run one load in a child process; {"seconds", "peak_bytes", "weight_bytes", "ratio"}."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    out = subprocess.run([sys.executable, "-c", CHILD, kind, str(path), dtype], env=env, capture_output=True,
                         text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"load {kind} of {path} failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["ratio"] = res["peak_bytes"] / res["weight_bytes"]
    return res


def _median_ms(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


@torch.inference_mode()
def measure_forwards(path: str | Path, dtype: str = "bfloat16", repeats: int = 5, prompt: int = 64) -> dict:
    """Median ms of an AR step and of 16-token forwards, ours vs transformers', same weights."""
    from transformers import AutoModelForCausalLM

    from twotower.model import TwoTowerLM

    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(0)
    ours = TwoTowerLM.from_backbone(path, dtype=dt).eval()
    V = ours.config.vocab_size
    ids = torch.randint(4, V, (1, prompt), generator=g)
    one = torch.randint(4, V, (1, 1), generator=g)
    blk = torch.randint(4, V, (1, 16), generator=g)
    res: dict = {}

    _, cache = ours.context.prefill(ids, logits="none", capacity=prompt + 64 * (repeats + 2) * 17)
    res["ours_ar_step_ms"] = _median_ms(lambda: ours.context.extend(cache, one, logits="last"), repeats)
    res["ours_block16_ms"] = _median_ms(lambda: ours.context.extend(cache, blk, logits="all"), repeats)
    t = torch.full((1,), 0.5)
    res["ours_denoise16_ms"] = _median_ms(lambda: ours.denoiser.forward_block(blk, cache, t), repeats)
    del ours, cache

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dt).eval()
    out = hf(ids, use_cache=True)
    state = {"past": out.past_key_values, "pos": prompt}

    def hf_step(tokens):
        n = tokens.shape[1]
        pos = torch.arange(state["pos"], state["pos"] + n)
        o = hf(tokens, past_key_values=state["past"], use_cache=True, cache_position=pos)
        state["past"], state["pos"] = o.past_key_values, state["pos"] + n
        return o.logits

    res["hf_ar_step_ms"] = _median_ms(lambda: hf_step(one), repeats)
    try:
        res["hf_block16_ms"] = _median_ms(lambda: hf_step(blk), repeats)
    except Exception as e:  # transformers' torch path may not extend a cache by several tokens
        res["hf_block16_ms"] = None
        res["hf_block16_error"] = f"{type(e).__name__}: {e}"[:300]
    return res


def run(checkpoint: str | Path, *, dtype: str = "bfloat16", repeats: int = 5, loads=("ctx", "backbone", "twotower", "hf"),
        forwards: bool = True) -> dict:
    """The whole scale section as one dict (loads, forwards, the machine)."""
    checkpoint = Path(checkpoint)
    result = {"checkpoint": str(checkpoint), "dtype": dtype, "threads": torch.get_num_threads(),
              "torch": torch.__version__}
    info = checkpoint / "scale_info.json"
    if info.is_file():
        result["model"] = json.loads(info.read_text())
    result["loads"] = {}
    with tempfile.TemporaryDirectory(prefix="twotower-scale-") as tmp:
        if "twotower" in loads:
            from twotower.cli import convert

            convert(str(checkpoint), tmp)
        for kind in loads:
            src = tmp if kind == "twotower" else checkpoint
            result["loads"][kind] = measure_load(kind, src, dtype)
            print(f"load {kind:9s} {result['loads'][kind]}", flush=True)
    if forwards:
        result["forwards"] = measure_forwards(checkpoint, dtype, repeats)
        print(f"forwards {result['forwards']}", flush=True)
    return result


def report(result: dict) -> str:
    """Markdown table of a `run` result."""
    lines = [f"### Scale: {result['checkpoint']} ({result['dtype']}, {result['threads']} threads)", ""]
    if "model" in result:
        lines.append(f"{result['model']['parameters'] / 1e9:.3f} B parameters, "
                     f"{result['model']['bytes'] / 2**20:.0f} MiB of weights\n")
    lines += ["| load | seconds | peak RSS (MiB) | weights (MiB) | peak / weights |", "|---|---|---|---|---|"]
    for k, v in result["loads"].items():
        lines.append(f"| {k} | {v['seconds']:.2f} | {v['peak_bytes'] / 2**20:.0f} | {v['weight_bytes'] / 2**20:.0f} "
                     f"| {v['ratio']:.2f} |")
    f = result.get("forwards")
    if f:
        lines += ["", "| forward (after a 64-token prompt) | ours ms | transformers ms |", "|---|---|---|"]
        lines.append(f"| AR step (1 token) | {f['ours_ar_step_ms']:.1f} | {f['hf_ar_step_ms']:.1f} |")
        hb = f.get("hf_block16_ms")
        lines.append(f"| 16-token extend | {f['ours_block16_ms']:.1f} | {'n/a' if hb is None else f'{hb:.1f}'} |")
        lines.append(f"| 16-token denoiser block | {f['ours_denoise16_ms']:.1f} | - |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Scale benchmark: loading and forwards of a real-sized checkpoint")
    p.add_argument("--checkpoint", required=True, help="AR NemotronH directory (benchmarks/make_scale_checkpoint.py)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--loads", default="ctx,backbone,twotower,hf")
    p.add_argument("--no-forwards", action="store_true")
    p.add_argument("--out", default=None, help="write the JSON result here (and a .md beside it)")
    a = p.parse_args(argv)
    result = run(a.checkpoint, dtype=a.dtype, repeats=a.repeats, loads=tuple(x for x in a.loads.split(",") if x),
                 forwards=not a.no_forwards)
    text = report(result)
    print(text)
    if a.out:
        out = Path(a.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        out.with_suffix(".md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
