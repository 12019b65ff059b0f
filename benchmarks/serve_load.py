"""Bounded load benchmark of the OpenAI-compatible server: concurrent clients vs one request at a time.

    PYTHONPATH=. python benchmarks/serve_load.py [--requests 16] [--decoder speculative] [--output FILE]

Starts the server in-process on 127.0.0.1 (a free port; loopback only) with the embedded default
model, sends a fixed list of requests (the recipe prompts, max_tokens cycling through 16..64),

1. all at once (one client thread per request: continuous batching at block boundaries), then
2. the same requests one by one (each waits for the previous: no batching),

and reports, for each, wall time, completion tokens per second and p50 / p95 request latency; it
also checks that both runs returned the same texts (greedy). Then it stops the server and exits.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _post(url: str, body: dict) -> tuple[float, dict]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    t = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as r:
        out = json.loads(r.read())
    return time.perf_counter() - t, out


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def _summary(name: str, wall: float, results: list[tuple[float, dict]]) -> dict:
    lat = [r[0] for r in results]
    tokens = sum(r[1]["usage"]["completion_tokens"] for r in results)
    return {"mode": name, "requests": len(results), "completion_tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1), "requests_per_s": round(len(results) / wall, 2),
            "p50_latency_s": round(statistics.median(lat), 3), "p95_latency_s": round(_percentile(lat, 0.95), 3)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=str(ROOT / "twotower/assets/twotower"))
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--decoder", default="speculative", choices=["speculative", "diffusion", "ar"])
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--output", default=None, help="write the figures as JSON here")
    a = p.parse_args(argv)

    import torch
    import uvicorn

    from twotower.serving.app import create_app
    from twotower.serving.requests import ServeSettings

    torch.set_num_threads(a.threads)
    prompts = [json.loads(line)["prompt"] for line in (ROOT / "recipes/prompts.jsonl").read_text().splitlines()]
    bodies = [{"prompt": prompts[i % len(prompts)], "max_tokens": 16 + 16 * (i % 4), "temperature": 0,
               "decoder": a.decoder} for i in range(a.requests)]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = ServeSettings(model=a.model, max_batch=a.max_batch, port=port)
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/v1/completions"
    try:
        _post(url, {"prompt": "warm up", "max_tokens": 4, "decoder": a.decoder})
        t = time.perf_counter()
        with ThreadPoolExecutor(len(bodies)) as pool:
            together = list(pool.map(lambda b: _post(url, b), bodies))
        batched = _summary("concurrent (continuous batching)", time.perf_counter() - t, together)
        t = time.perf_counter()
        apart = [_post(url, b) for b in bodies]
        serial = _summary("one by one", time.perf_counter() - t, apart)
    finally:
        server.should_exit = True
        thread.join(30)
    same = [x[1]["choices"][0]["text"] for x in together] == [x[1]["choices"][0]["text"] for x in apart]
    report = {"decoder": a.decoder, "model": a.model, "max_batch": a.max_batch, "threads": a.threads,
              "same_texts": same, "runs": [batched, serial],
              "speedup_tokens_per_s": round(batched["tokens_per_s"] / serial["tokens_per_s"], 2)}
    for r in report["runs"]:
        print(f"{r['mode']:>34}: {r['requests']} requests, {r['completion_tokens']} tokens in {r['wall_s']} s = "
              f"{r['tokens_per_s']} tok/s; latency p50 {r['p50_latency_s']} s, p95 {r['p95_latency_s']} s")
    print(f"throughput x{report['speedup_tokens_per_s']} with batching; identical texts: {same}")
    if a.output:
        Path(a.output).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["same_texts"] else 1)
