"""The OpenAI-compatible server: endpoints through the official `openai` client, continuous batching
(each request's greedy output equals `decoder.generate` on it alone), streaming, 400s naming the
field, a client that disconnects mid-stream, the CLI subcommand, and `HybridCache.concat`.

Servers bind to 127.0.0.1 on a free port, run in a daemon thread (or a subprocess that stops
itself after a fixed number of requests) and are stopped at teardown.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from conftest import (served_alone, free_port, left_pad, make_context, random_prompts, running_server,  # noqa: E402
                      save_tiny_twotower)
from twotower.caches import HybridCache  # noqa: E402
from twotower.serving.requests import ServeSettings, parse_completion  # noqa: E402
from twotower.tokenizers import ByteTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from twotower.model import TwoTowerLM
    from twotower.serving.app import create_app

    path = save_tiny_twotower(tmp_path_factory.mktemp("serve") / "tt")
    model = TwoTowerLM.from_pretrained(path).eval()
    settings = ServeSettings(model=str(path), max_tokens=16, max_batch=8)
    app = create_app(settings, model=model)
    with running_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        yield SimpleNamespace(url=url, port=int(url.rsplit(":", 1)[1]), model=model, settings=settings,
                              client=client, app=app)


def alone(srv, body: dict) -> str:
    """What `decoder.generate` gives for this request on its own (the reference)."""
    return served_alone(srv, body, TOK)


def run_jobs(sched, srv, bodies: list[dict], sinks=None) -> list:
    """Start `sched`, submit one Job per request body (with its event sink), wait (bounded) until all
    are over, stop the scheduler; returns the jobs."""
    from twotower.serving.scheduler import Job

    sinks = sinks or [None] * len(bodies)
    sched.start()
    try:
        jobs = [sched.submit(Job(parse_completion(b, srv.settings, TOK, context_limit=512, model_block_size=8),
                                 TOK, [TOK.eos_token_id], sink=sink)) for b, sink in zip(bodies, sinks)]
        deadline = time.time() + 120
        while not all(j.over for j in jobs):
            assert time.time() < deadline
            time.sleep(0.02)
    finally:
        sched.stop()
    return jobs


def post(url: str, body, path: str = "/v1/completions") -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url: str, path: str) -> dict:
    with urllib.request.urlopen(url + path, timeout=30) as r:
        return json.loads(r.read())


def create(srv, prompt: str, max_tokens: int, decoder: str | None = None, **kw):
    extra = {"decoder": decoder} if decoder else {}
    return srv.client.completions.create(model="twotower", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                         extra_body=extra or None, **kw)


def test_models_and_health(server):
    models = server.client.models.list()
    assert [m.id for m in models.data] == ["twotower"]
    health = get(server.url, "/health")
    assert health["status"] == "ok" and health["running"] == 0


@pytest.mark.parametrize("decoder", ["speculative", "diffusion", "ar"])
def test_non_streaming_equals_generate_alone(server, decoder):
    r = create(server, "def add(a, b):", 12, decoder)
    assert r.object == "text_completion" and r.choices[0].finish_reason in ("stop", "length")
    assert r.choices[0].text == alone(server, {"prompt": "def add(a, b):", "max_tokens": 12, "decoder": decoder})
    assert r.usage.prompt_tokens == 1 + len("def add(a, b):") and r.usage.completion_tokens >= 1  # BOS + bytes


def test_streaming_chunks_add_up_to_the_completion(server):
    whole = create(server, "Hello", 20).choices[0].text
    pieces = [c.choices[0].text for c in create(server, "Hello", 20, stream=True)]
    assert "".join(pieces) == whole and len(pieces) >= 2  # text chunks + the finish chunk
    # raw server-sent events: completion chunks, then [DONE]
    req = urllib.request.Request(server.url + "/v1/completions", headers={"Content-Type": "application/json"},
                                 data=json.dumps({"prompt": "Hello", "max_tokens": 20, "stream": True}).encode())
    with urllib.request.urlopen(req, timeout=120) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.read().decode().split("\n") if ln]
    assert all(ln.startswith("data: ") for ln in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_stop_string(server):
    body = {"prompt": "abc", "max_tokens": 24, "stop": ["a", "e"]}
    r = server.client.completions.create(model="twotower", temperature=0, **body)
    assert r.choices[0].text == alone(server, body)
    assert "a" not in r.choices[0].text and "e" not in r.choices[0].text


def test_eight_concurrent_clients_each_equal_alone(server):
    """Different prompts and lengths join and leave the working batch; each output is its own."""
    prompts = ["x", "def f(x):\n    return", "The quick brown fox", "1 2 3 4 5", "{", "import os\n", "aaaa", "Zz"]
    bodies = [{"prompt": p, "max_tokens": 4 + 5 * i, "decoder": "speculative" if i % 3 else "ar"}
              for i, p in enumerate(prompts)]
    bodies[5]["decoder"] = "diffusion"
    bodies[6].update(temperature=0.9, seed=7)  # a seeded sample shares forwards with greedy rows
    before = get(server.url, "/health")["peak"]
    barrier = threading.Barrier(len(bodies))

    def one(body):
        barrier.wait()
        extra = {"decoder": body["decoder"]}
        return server.client.completions.create(
            model="twotower", prompt=body["prompt"], max_tokens=body["max_tokens"],
            temperature=body.get("temperature", 0), seed=body.get("seed"), extra_body=extra).choices[0].text

    with ThreadPoolExecutor(len(bodies)) as pool:
        got = list(pool.map(one, bodies))
    assert got == [alone(server, b) for b in bodies]
    assert max(before, get(server.url, "/health")["peak"]) >= 2  # rows really shared a batch


@pytest.mark.parametrize("field,value", [
    ("max_tokens", 0), ("max_tokens", "5"), ("temperature", "hot"), ("decoder", "beam"), ("stop", 5),
    ("prompt", 123), ("prompt", "x" * 600), ("seed", 1.5), ("block_size", 1), ("threshold", 0),
])
def test_bad_requests_get_400_naming_the_field(server, field, value):
    body = {"prompt": "hi", "max_tokens": 4, field: value}
    status, out = post(server.url, body)
    assert status == 400, out
    assert out["error"]["param"] == field and field in out["error"]["message"]
    assert out["error"]["type"] == "invalid_request_error"


def test_bad_request_through_the_client_and_bad_json(server):
    with pytest.raises(openai.BadRequestError) as e:
        server.client.completions.create(model="twotower", prompt="hi", max_tokens=0)
    assert "max_tokens" in str(e.value)
    status, out = post(server.url, b"{not json")
    assert status == 400 and out["error"]["param"] == "body"
    # BOS + 507 bytes: fits alone, not with the tokens
    status, out = post(server.url, {"prompt": "x" * 507, "max_tokens": 10})
    assert status == 400 and out["error"]["param"] == "max_tokens" and "at most 4" in out["error"]["message"]


def test_disconnect_mid_stream_leaves_the_batch(server):
    body = json.dumps({"prompt": "long", "max_tokens": 400, "stream": True, "decoder": "ar"}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        got = b""
        while b"data: " not in got:
            got += s.recv(4096)
        assert b"200 OK" in got
    deadline = time.time() + 60
    while get(server.url, "/health")["running"]:
        assert time.time() < deadline, "the abandoned request never left the batch"
        time.sleep(0.05)
    r = create(server, "after", 10)
    assert r.choices[0].text == alone(server, {"prompt": "after", "max_tokens": 10})


def test_cli_serve_subcommand_stops_by_itself(tmp_path):
    path = save_tiny_twotower(tmp_path / "tt")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "twotower.cli", "serve", "--config", "recipes/serve.yaml",
                             "--port", str(port), "--model", str(path), "--max_requests", "1"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.time() + 120
        while True:
            try:
                assert get(url, "/health")["status"] == "ok"
                break
            except (urllib.error.URLError, ConnectionError):
                if proc.poll() is not None or time.time() > deadline:  # stop it first: read() waits for its end
                    proc.kill()
                    pytest.fail(f"the server did not come up: {proc.stdout.read().decode()[-3000:]}")
                time.sleep(0.2)
        assert get(url, "/v1/models")["data"][0]["id"] == "twotower"
        status, out = post(url, {"prompt": "hi", "max_tokens": 3, "model": "twotower"})
        assert status == 200 and out["choices"][0]["finish_reason"] in ("stop", "length")
        assert proc.wait(timeout=60) == 0  # max_requests reached: it stops by itself
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cache_concat_is_exact():
    """Joining caches of different lengths (left padding) changes no row's next logits."""
    ctx = make_context()
    a_ids, a_mask = left_pad(random_prompts([5, 9], seed=1))
    b_ids = random_prompts([3], seed=2)[0][None]
    la, ca = ctx.prefill(a_ids, a_mask, logits="last")
    lb, cb = ctx.prefill(b_ids, None, logits="last")
    joined = HybridCache.concat([ca, cb])
    assert joined.batch_size == 3 and joined.length == ca.length and joined.padded
    nxt = torch.randint(4, 64, (3, 4))
    want = torch.cat([ctx.extend(ca, nxt[:2]), ctx.extend(cb, nxt[2:])])
    torch.testing.assert_close(ctx.extend(joined, nxt), want, rtol=1e-5, atol=1e-5)
    assert joined.compact() == 0  # the fullest row has no hole: nothing to squeeze
    assert HybridCache.cat == HybridCache.concat


@pytest.mark.parametrize("mirror, overlap", [(False, False), (True, False), (True, True)])
def test_scheduler_thread_with_a_small_batch_and_a_cache_mirror(tmp_path, mirror, overlap):
    """The scheduler alone (no HTTP): more requests than max_batch wait their turn, and with an
    explicit denoiser device the denoiser reads a mirror of the context cache; with `overlap` the
    denoiser drafts one request group on a second thread while the context tower finishes
    another. Outputs as alone in every case."""
    from twotower.decoding import Towers
    from twotower.model import TwoTowerLM
    from twotower.serving.scheduler import Scheduler

    model = TwoTowerLM.from_pretrained(save_tiny_twotower(tmp_path / "tt")).eval()
    towers = Towers.of(model)
    if mirror:
        towers.denoiser_device = "cpu"
    srv = SimpleNamespace(model=model, settings=ServeSettings(max_tokens=16))
    bodies = [{"prompt": p, "max_tokens": 6 + 4 * i, "decoder": d}
              for i, (p, d) in enumerate([("ab", "speculative"), ("x = 1\n", "diffusion"), ("hi", "speculative"),
                                          ("0123", "diffusion"), ("q", "ar"), ("def", "speculative")])]
    events: dict[int, list] = {i: [] for i in range(len(bodies))}
    threads = set()
    real_block = model.denoiser.forward_block

    def spy(*a, **kw):
        threads.add(threading.current_thread().name)
        return real_block(*a, **kw)

    model.denoiser.forward_block = spy
    sched = Scheduler(towers, max_batch=2, overlap=overlap)
    jobs = run_jobs(sched, srv, bodies, [events[i].append for i in range(len(bodies))])
    assert sched.peak <= (12 if overlap else 6)  # three decoder settings (x 2 groups), at most two rows each
    if overlap:  # drafts ran on the denoiser's thread beside another group's context half
        assert sched.overlapped > 0 and any(t.startswith("twotower-denoiser") for t in threads)
    else:
        assert sched.overlapped == 0 and not any(t.startswith("twotower-denoiser") for t in threads)
    for i, (b, j) in enumerate(zip(bodies, jobs)):
        assert j.error is None and j.text == alone(srv, b)
        assert "".join(e["text"] for e in events[i] if e["type"] == "text") == j.text
        assert events[i][-1]["type"] == "done"


def test_scheduler_serves_a_llama_family_model(tmp_path):
    """Continuous batching on a RoPE model: joined rows keep logical positions (left padding by
    `concat` is masked out and positions count real keys), so each output is the request's alone."""
    from conftest import make_family_towers

    from twotower.decoding import Towers
    from twotower.model import TwoTowerLM
    from twotower.serving.scheduler import Scheduler

    ctx, den = make_family_towers("llama", seed=4, vocab_size=260)
    model = TwoTowerLM(ctx.config, block_size=8, context=ctx, denoiser=den).eval()
    srv = SimpleNamespace(model=model, settings=ServeSettings(max_tokens=16))
    bodies = [{"prompt": p, "max_tokens": 5 + 3 * i, "decoder": d}
              for i, (p, d) in enumerate([("ab", "speculative"), ("x = 1\n", "diffusion"), ("hello", "speculative"),
                                          ("0123", "ar"), ("q", "speculative")])]
    sched = Scheduler(Towers.of(model), max_batch=4)
    jobs = run_jobs(sched, srv, bodies)
    assert sched.peak >= 2  # rows really shared a batch
    for b, j in zip(bodies, jobs):
        assert j.error is None and j.text == alone(srv, b), b


def test_scheduler_honours_a_speculative_subclass_keep_rule(tmp_path):
    """The stepper drafts through `Speculative.draft` and keeps through the decoder's own `kept`, so a
    subclass with another keep rule (`TolerantSpeculative`, not lossless) is served as it decodes
    alone, and rows of different rules never share a verify (`rule_key` is part of the batch key)."""
    import dataclasses

    from twotower.decoding import Speculative, TolerantSpeculative, Towers
    from twotower.model import TwoTowerLM
    from twotower.serving.scheduler import Job, Scheduler

    model = TwoTowerLM.from_pretrained(save_tiny_twotower(tmp_path / "tt")).eval()
    srv = SimpleNamespace(model=model, settings=ServeSettings(max_tokens=16))
    prompts = ["ab", "x = 1\n", "hello", "0123"]
    decoders = [TolerantSpeculative(0.05, block_size=8), Speculative(block_size=8)] * 2
    reqs = [dataclasses.replace(parse_completion({"prompt": p, "max_tokens": 12}, srv.settings, TOK, context_limit=512,
                                                 model_block_size=8), decoder=d) for p, d in zip(prompts, decoders)]
    sched = Scheduler(Towers.of(model), max_batch=4)
    sched.start()
    try:
        jobs = [sched.submit(Job(r, TOK, [TOK.eos_token_id])) for r in reqs]
        deadline = time.time() + 120
        while not all(j.over for j in jobs):
            assert time.time() < deadline
            time.sleep(0.02)
    finally:
        sched.stop()
    differs = False
    for r, j in zip(reqs, jobs):
        out = r.decoder.generate(model, torch.tensor([r.prompt_ids]), max_new_tokens=12, eos_token_id=TOK.eos_token_id)
        assert j.error is None and j.text == TOK.decode(out.new_tokens[0, : int(out.num_generated[0])].tolist())
        strict = Speculative(block_size=8).generate(model, torch.tensor([r.prompt_ids]), max_new_tokens=12,
                                                    eos_token_id=TOK.eos_token_id)
        differs |= not torch.equal(out.new_tokens, strict.new_tokens)
    assert differs, "the tolerant rule never kept another token here: the test cannot tell the rules apart"
