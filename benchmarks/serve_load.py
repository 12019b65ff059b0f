"""Bounded load run of the OpenAI-compatible server: concurrent clients, clients that disconnect, and
the same requests one by one.

    PYTHONPATH=. python benchmarks/serve_load.py [--clients 32] [--disconnect 4] [--decoder mixed] [--output FILE]

Starts the server in-process on 127.0.0.1 (a free port; loopback only) with the embedded default
model (`embedded`), then

1. `--clients` official `openai` clients at once (one client per thread; completions, every third
   streamed, every fourth a seeded sample; prompts from recipes/prompts.jsonl, max_tokens cycling
   up to `--max-tokens`; decoders cycling speculative / diffusion / ar with `--decoder mixed`),
   beside `--disconnect` raw-socket clients that ask for a long completion (half streamed, half
   not) and close their connection once their job is running;
2. checks that no work leaked: the disconnected jobs were dropped (the scheduler's `dropped`
   counter, and each such job took part in at most one iteration after it was cancelled) and the
   scheduler is idle (nothing running or waiting) once the clients are done;
3. sends the same requests one by one (each alone in the server) and checks that every concurrent
   output equals its output alone;

and prints a summary (throughput, p50 / p95 latency of both runs, the disconnect figures). Exits 1
if a check failed. It stops the server before it returns.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DECODERS = ("speculative", "diffusion", "ar")


def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def _summary(name: str, wall: float, results: list[dict]) -> dict:
    lat = [r["seconds"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {"mode": name, "requests": len(results), "completion_tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1), "requests_per_s": round(len(results) / wall, 2),
            "p50_latency_s": round(statistics.median(lat), 3), "p95_latency_s": round(_percentile(lat, 0.95), 3)}


def _bodies(n: int, decoder: str, max_tokens: int) -> list[dict]:
    prompts = [json.loads(line)["prompt"] for line in (ROOT / "recipes/prompts.jsonl").read_text().splitlines()]
    steps = sorted({max(4, max_tokens * k // 4) for k in (1, 2, 3, 4)})
    bodies = []
    for i in range(n):
        name = DECODERS[i % 3] if decoder == "mixed" else decoder
        body = {"prompt": prompts[i % len(prompts)], "max_tokens": steps[i % len(steps)], "temperature": 0,
                "decoder": name, "stream": i % 3 == 2}
        if i % 4 == 3 and name != "diffusion":  # seeded samples draw as alone (AR and speculative)
            body.update(temperature=0.8, seed=1000 + i)
        bodies.append(body)
    return bodies


def _ask(client, body: dict) -> dict:
    """One request through the openai client: its text, completion tokens and latency."""
    extra = {"decoder": body["decoder"]}
    kw = dict(model="twotower", prompt=body["prompt"], max_tokens=body["max_tokens"],
              temperature=body["temperature"], extra_body=extra)
    if "seed" in body:
        kw["seed"] = body["seed"]
    t = time.perf_counter()
    if body["stream"]:
        text, tokens = "", 0
        for chunk in client.completions.create(stream=True, **kw):
            if chunk.choices:
                text += chunk.choices[0].text
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    else:
        r = client.completions.create(**kw)
        text, tokens = r.choices[0].text, r.usage.completion_tokens
    return {"text": text, "tokens": tokens, "seconds": time.perf_counter() - t}


def _disconnecting_client(port: int, body: dict, job_of, timeout: float) -> dict:
    """Send `body` on a raw socket, wait until its job is running (or `timeout`), close the socket."""
    data = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
        deadline = time.time() + timeout
        job = None
        while time.time() < deadline:
            job = job or job_of(body["prompt"])
            if job is not None and job.iterations >= 2:
                break
            time.sleep(0.01)
        if body["stream"] and job is not None and job.iterations >= 2:
            got = b""
            while b"data: " not in got:
                got += s.recv(4096)
        running = job is not None and job.iterations >= 1
    return {"prompt": body["prompt"], "running_when_closed": running}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded", help="a two-tower directory or a built-in name")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--disconnect", type=int, default=4, help="clients that close their connection mid-request")
    p.add_argument("--decoder", default="mixed", choices=["mixed", *DECODERS])
    p.add_argument("--max-tokens", type=int, default=64, help="the largest max_tokens of the normal clients")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--timeout", type=float, default=300, help="seconds any one wait may take")
    p.add_argument("--output", default=None, help="write the report as JSON here")
    a = p.parse_args(argv)

    import openai
    import torch
    import uvicorn

    from twotower.serving.app import create_app
    from twotower.serving.requests import ServeSettings

    torch.set_num_threads(a.threads)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    settings = ServeSettings(model=a.model, max_batch=a.max_batch, port=port, host="127.0.0.1")
    app = create_app(settings)
    sched = app.state.scheduler
    jobs, real_submit = [], sched.submit

    def submit(job):
        jobs.append(job)
        return real_submit(job)

    sched.submit = submit

    def job_of(prompt: str):
        return next((j for j in list(jobs) if j.request.prompt == prompt), None)

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + a.timeout
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/v1"
    bodies = _bodies(a.clients, a.decoder, a.max_tokens)
    context = app.state.model.max_position_embeddings or 4096
    long_tokens = min(3000, context - 64)
    gone = [{"prompt": f"# client {i} goes away\n", "max_tokens": long_tokens, "temperature": 0,
             "decoder": DECODERS[i % 3] if a.decoder == "mixed" else a.decoder, "stream": i % 2 == 0}
            for i in range(a.disconnect)]
    clients = [openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=a.timeout)
               for _ in range(a.clients)]
    try:
        _ask(clients[0], {"prompt": "warm up", "max_tokens": 4, "temperature": 0, "decoder": "ar", "stream": False})
        start = threading.Barrier(a.clients + a.disconnect)

        def normal(i):
            start.wait()
            return _ask(clients[i], bodies[i])

        def leaving(i):
            start.wait()
            return _disconnecting_client(port, gone[i], job_of, a.timeout)

        t = time.perf_counter()
        with ThreadPoolExecutor(a.clients + a.disconnect) as pool:
            left = [pool.submit(leaving, i) for i in range(a.disconnect)]
            together = [f.result() for f in [pool.submit(normal, i) for i in range(a.clients)]]
            left = [f.result() for f in left]
        batched = _summary("concurrent (continuous batching)", time.perf_counter() - t, together)
        t_idle = time.perf_counter()
        while (sched.stats()["running"] or sched.stats()["waiting"]) and time.perf_counter() - t_idle < a.timeout:
            time.sleep(0.01)
        idle_after_s = round(time.perf_counter() - t_idle, 3)
        after = sched.stats()
        dropped_jobs = [job_of(g["prompt"]) for g in gone]
        extra = [None if j is None or j.cancelled_at is None else j.iterations - j.cancelled_at for j in dropped_jobs]
        disconnected = {
            "clients": a.disconnect, "max_tokens": long_tokens, "dropped": after["dropped"],
            "running_when_closed": sum(x["running_when_closed"] for x in left),
            "tokens_made": [None if j is None else j.made for j in dropped_jobs],
            "iterations_after_cancel": extra,
        }
        t = time.perf_counter()
        apart = [_ask(clients[0], b) for b in bodies]
        serial = _summary("one by one (alone)", time.perf_counter() - t, apart)
    finally:
        server.should_exit = True
        thread.join(30)
    same = [r["text"] for r in together] == [r["text"] for r in apart]
    differ = [i for i, (x, y) in enumerate(zip(together, apart)) if x["text"] != y["text"]]
    ok = (same and after["running"] == 0 and after["waiting"] == 0 and disconnected["dropped"] == a.disconnect
          and all(x is not None and x <= 1 for x in extra)
          and all(j is not None and j.finish_reason is None for j in dropped_jobs))
    report = {"model": a.model, "decoder": a.decoder, "clients": a.clients, "max_batch": a.max_batch,
              "max_rows": sched.max_rows, "threads": a.threads, "same_texts": same, "differing": differ,
              "disconnected": disconnected, "after": after, "idle_after_s": idle_after_s, "ok": ok,
              "runs": [batched, serial], "speedup_tokens_per_s": round(batched["tokens_per_s"] / serial["tokens_per_s"],
                                                                       2)}
    for r in report["runs"]:
        print(f"{r['mode']:>34}: {r['requests']} requests, {r['completion_tokens']} tokens in {r['wall_s']} s = "
              f"{r['tokens_per_s']} tok/s; latency p50 {r['p50_latency_s']} s, p95 {r['p95_latency_s']} s")
    print(f"throughput x{report['speedup_tokens_per_s']} with batching; every output equals the request alone: {same}"
          + (f" (differ: {differ})" if differ else ""))
    print(f"{a.disconnect} clients disconnected mid-request (max_tokens {long_tokens}; "
          f"{disconnected['running_when_closed']} were running): dropped {disconnected['dropped']}, tokens made "
          f"{disconnected['tokens_made']}, iterations after cancel {extra}")
    print(f"scheduler after the run: running {after['running']}, waiting {after['waiting']} (idle "
          f"{idle_after_s} s after the last client), peak {after['peak']} rows, {after['iterations']} iterations; "
          f"{'OK' if ok else 'FAILED'}")
    if a.output:
        Path(a.output).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    sys.exit(0 if main()["ok"] else 1)
