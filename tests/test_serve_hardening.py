"""The server under adversarial requests (issue 21, "Reliability and security"): out-of-range settings
and unknown fields get a 400 naming the field before anything is queued, a client that disconnects
is dropped within one block in both modes, the API key, content types, body size, CORS and docs
settings, and a small version of `benchmarks/serve_load.py`.

Servers bind to 127.0.0.1 on a free port in a daemon thread and are stopped at teardown; every
client loop is bounded.
"""

from __future__ import annotations

import json
import logging
import socket
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

from conftest import running_server, save_tiny_twotower, served_alone  # noqa: E402
from twotower.serving.requests import RequestError, ServeSettings, parse_completion  # noqa: E402
from twotower.tokenizers import ByteTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return save_tiny_twotower(tmp_path_factory.mktemp("harden") / "tt")  # block_size 8, 512 positions


@pytest.fixture(scope="module")
def model(model_path):
    from twotower.model import TwoTowerLM

    return TwoTowerLM.from_pretrained(model_path).eval()


@pytest.fixture(scope="module")
def server(model_path, model):
    """The default settings (no key, 4 MB bodies), and a record of every job the handlers submit."""
    from twotower.serving.app import create_app

    settings = ServeSettings(model=str(model_path), max_tokens=16, max_batch=8)
    app = create_app(settings, model=model)
    sched = app.state.scheduler
    submitted = []
    real_submit = sched.submit

    def submit(job):
        submitted.append(job)
        return real_submit(job)

    sched.submit = submit
    with running_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        yield SimpleNamespace(url=url, port=int(url.rsplit(":", 1)[1]), model=model, settings=settings, app=app,
                              client=client, scheduler=sched, submitted=submitted)


def alone(srv, body: dict) -> str:
    """What `decoder.generate` gives for this request on its own (the reference)."""
    return served_alone(srv, body, TOK)


def post(url: str, body, path: str = "/v1/completions", headers=None, timeout: float = 60) -> tuple[int, dict, dict]:
    """(status, JSON body (or {"raw": text} when it is not JSON), headers)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw, hdrs = r.status, r.read(), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        status, raw, hdrs = e.code, e.read(), {k.lower(): v for k, v in e.headers.items()}
    try:
        return status, json.loads(raw), hdrs
    except ValueError:
        return status, {"raw": raw.decode(errors="replace")}, hdrs


def raw_http(port: int, head: bytes, body_parts=(), timeout: float = 20, whole: bool = True) -> tuple[int, bytes]:
    """Send a hand-made request (head, then each body part) on a raw socket; (status, response bytes):
    the whole response until the server closes (or `timeout`), or with whole=False its head only."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head)
        for part in body_parts:
            s.sendall(part)
        got = b""
        while b"\r\n\r\n" not in got:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
        try:
            while whole:
                chunk = s.recv(65536)
                if not chunk:
                    break
                got += chunk
        except (socket.timeout, ConnectionResetError):
            pass
    return int(got.split(b" ", 2)[1]), got


def wait_until(cond, seconds: float = 60, what: str = "condition"):
    deadline = time.time() + seconds
    while not cond():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


# ---- 1. every per-request setting has a range: a 400 at once, naming field, value and range -----------

OUT_OF_RANGE = [  # (field, value, text the message must hold: the allowed range)
    ("block_size", 9, "[2, 8]"),  # the model was trained with blocks of 8 (speculative needs >= 2)
    ("block_size", 64, "[2, 8]"),
    ("max_tokens", 4097, "[1, 4096]"),
    ("temperature", 2.5, "[0.0, 2.0]"),
    ("top_p", 1.5, "(0.0, 1.0]"),
    ("top_k", -1, "[0, 260]"),
    ("top_k", 10 ** 6, "[0, 260]"),
    ("threshold", 1.5, "(0.0, 1.0]"),
    ("steps_per_block", 0, "[1, 16]"),
    ("steps_per_block", 10 ** 6, "[1, 16]"),
    ("draft_steps", 10 ** 6, "[1, 16]"),
    ("seed", 2 ** 70, "[-9223372036854775808, 9223372036854775807]"),
    ("seed", -(2 ** 63) - 1, "[-9223372036854775808, 9223372036854775807]"),
    ("stop", ["a"] * 17, "at most 16 strings"),
]


def test_out_of_range_settings_get_400_before_queuing_and_a_concurrent_request_is_unaffected(server):
    normal = {"prompt": "def add(a, b):", "max_tokens": 48, "decoder": "ar"}
    result = {}
    before = len(server.submitted)
    runner = threading.Thread(target=lambda: result.update(out=post(server.url, normal)))
    runner.start()
    wait_until(lambda: len(server.submitted) > before, what="the normal request to be queued")
    try:
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda c: post(server.url, {"prompt": "hi", "max_tokens": 4, "temperature": 0.5,
                                                                c[0]: c[1]}), OUT_OF_RANGE))
    finally:
        runner.join(120)
    for (field, value, allowed), (status, out, _) in zip(OUT_OF_RANGE, answers):
        assert status == 400, (field, value, status, out)
        err = out["error"]
        assert err["param"] == field and err["type"] == "invalid_request_error", (field, err)
        assert field in err["message"] and allowed in err["message"], (field, err["message"])
        shown = repr(value)[:60] if not isinstance(value, list) else "17 strings"
        assert shown in err["message"], (field, err["message"])
    assert len(server.submitted) == before + 1, "an out-of-range request reached the scheduler"
    status, out, _ = result["out"]
    assert status == 200 and out["choices"][0]["text"] == alone(server, normal)


def test_a_block_size_of_100000_is_refused_at_once(server):
    """The issue's case (20 GB RSS, the scheduler blocked for minutes); it never reaches the scheduler."""
    before = len(server.submitted)
    status, out, _ = post(server.url, {"prompt": "hi", "max_tokens": 8, "block_size": 100000})
    assert status == 400 and out["error"]["param"] == "block_size" and "100000" in out["error"]["message"]
    assert len(server.submitted) == before


def test_in_range_extensions_are_served_as_alone(server):
    """top_k, steps_per_block and draft_steps (new per-request settings) reach the decoder."""
    bodies = [{"prompt": "x = ", "max_tokens": 10, "decoder": "diffusion", "steps_per_block": 2, "block_size": 4},
              {"prompt": "x = ", "max_tokens": 10, "decoder": "speculative", "draft_steps": 2, "block_size": 8},
              {"prompt": "x = ", "max_tokens": 10, "decoder": "ar", "top_k": 3, "temperature": 0.7, "seed": 5}]
    for body in bodies:
        status, out, _ = post(server.url, body)
        assert status == 200, out
        assert out["choices"][0]["text"] == alone(server, body), body


# ---- 4. unknown and unsupported fields ----------------------------------------------------------------


@pytest.mark.parametrize("field,value", [
    ("best_of", 2), ("logprobs", 1), ("logprobs", 0), ("echo", True), ("n", 2), ("suffix", "}"), ("foo", 1),
    ("presence_penalty", 0.5), ("frequency_penalty", -1), ("logit_bias", {"5": 10}), ("messages", []),
    ("stream_options", {"include_usage": "yes"}), ("tools", [{"type": "function"}]),
])
def test_unknown_and_unsupported_fields_get_400_naming_them(server, field, value):
    before = len(server.submitted)
    status, out, _ = post(server.url, {"prompt": "hi", "max_tokens": 4, field: value})
    assert status == 400, (field, out)
    assert out["error"]["param"] == field and field in out["error"]["message"], out
    assert len(server.submitted) == before


def test_what_the_official_client_sends_still_works(server):
    """The openai client sends model / prompt / stream; the neutral values of OpenAI's other fields
    (n = 1, penalties 0, echo false, best_of 1, user, stream_options) are accepted."""
    body = {"prompt": "abc", "max_tokens": 12, "stop": ["e"], "seed": 3, "temperature": 0, "top_p": 1}
    want = alone(server, body)
    r = server.client.completions.create(model="twotower", n=1, user="u", presence_penalty=0, frequency_penalty=0,
                                         best_of=1, echo=False, logprobs=None, **body)
    assert r.choices[0].text == want
    chunks = list(server.client.completions.create(model="twotower", stream=True,
                                                   stream_options={"include_usage": True}, **body))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want


# ---- JSON the parser itself refuses -------------------------------------------------------------------


@pytest.mark.parametrize("raw", [
    b"[" * 100000 + b"]" * 100000,  # nesting deeper than the recursion limit
    b'{"prompt": "hi", "max_tokens": 1' + b"0" * 5000 + b"}",  # an int of more digits than Python converts
    b'{"prompt": "hi"' + b"\xff" + b"}",  # not UTF-8
], ids=["deep", "digits", "not-utf8"])
def test_bodies_the_json_parser_refuses_are_400_not_500(server, raw):
    status, out, _ = post(server.url, raw)
    assert status == 400 and out["error"]["param"] == "body", out


# ---- 2. a client that disconnects is dropped within one block --------------------------------------


@pytest.mark.parametrize("stream,decoder", [(False, "ar"), (False, "speculative"), (False, "diffusion"),
                                            (True, "speculative"), (True, "ar")])
def test_a_client_that_disconnects_leaves_the_batch_within_one_block(server, monkeypatch, stream, decoder):
    """Counted per iteration by a hook on the working batch, not timed: after the client closes its
    socket, the job takes part in at most one more iteration (the one running at that moment).

    Once the client is gone, the hook holds the scheduler at each block boundary until the job is
    cancelled (at most 10 s, then it gives up and lets the job run on), and meanwhile hands the
    job's handler an empty text event every 50 ms, as a running job does every block: the server
    must notice the disconnect while the job's events keep coming."""
    from twotower.serving.stepper import Stepper

    real_finish = Stepper.finish
    taken: dict[int, int] = {}
    state = {"job": None, "closed": False, "gave_up": False}

    def finish(self, drafted):
        for j in self.jobs:
            taken[id(j)] = taken.get(id(j), 0) + 1
        real_finish(self, drafted)
        job = state["job"]
        if state["closed"] and not state["gave_up"] and job is not None:
            deadline = time.time() + 10
            while not job.cancelled and time.time() < deadline:
                if job.sink is not None:
                    job.sink({"type": "text", "text": ""})
                time.sleep(0.05)
            state["gave_up"] = not job.cancelled

    monkeypatch.setattr(Stepper, "finish", finish)
    dropped = server.scheduler.stats().get("dropped", 0)
    before = len(server.submitted)
    body = json.dumps({"prompt": "long", "max_tokens": 400, "decoder": decoder, "stream": stream}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=60) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        wait_until(lambda: len(server.submitted) > before, what="the job")
        job = state["job"] = server.submitted[-1]
        wait_until(lambda: taken.get(id(job), 0) >= 3, what="the job to run")
        if stream:
            got = b""
            while b"data: " not in got:
                got += s.recv(4096)
            assert b"200 OK" in got
        state["closed"] = True
        at_close = taken[id(job)]
    wait_until(lambda: job.over and not any(job in b.jobs for b in list(server.scheduler.batches.values())),
               what="the job to leave")
    assert not state["gave_up"], "the server did not cancel the job of a client that disconnected"
    assert job.finish_reason is None and job.made < 400, "the abandoned job ran to its end"
    after = taken[id(job)] - at_close
    assert after <= 1, f"the job took part in {after} iterations after its client disconnected"
    assert job.iterations - job.cancelled_at <= 1
    wait_until(lambda: server.scheduler.stats()["running"] == 0, what="the batch to empty")
    assert server.scheduler.stats()["dropped"] == dropped + 1


# ---- 3. API key, content type, body size, CORS, docs -------------------------------------------------


@pytest.fixture
def make_server(model_path, model):
    """make_server(**settings) -> a running server's URL (stopped at teardown)."""
    from contextlib import ExitStack

    from twotower.serving.app import create_app

    with ExitStack() as stack:
        def make(**kw):
            settings = ServeSettings(model=str(model_path), max_tokens=8, **kw)
            app = create_app(settings, model=model)
            return stack.enter_context(running_server(app, settings)), app

        yield make


def test_the_api_key_from_the_environment(make_server, monkeypatch):
    from twotower.serving import app as app_module

    monkeypatch.setenv("TWOTOWER_API_KEY", "s3cret-key")
    compared = []
    real = app_module.hmac.compare_digest if hasattr(app_module, "hmac") else None
    if real is not None:
        monkeypatch.setattr(app_module.hmac, "compare_digest", lambda a, b: compared.append(1) or real(a, b))
    url, _ = make_server()
    body = {"prompt": "hi", "max_tokens": 3}
    assert post(url, body)[0] == 401
    assert post(url, body, headers={"Authorization": "Bearer wrong"})[0] == 401
    assert post(url, body, headers={"Authorization": "s3cret-key"})[0] == 401
    status, out, hdrs = post(url, body, headers={"Authorization": "Bearer s3cret-key-and-more"})
    assert status == 401 and out["error"]["code"] == "invalid_api_key"
    assert post(url, body, headers={"Authorization": "Bearer s3cret-key"})[0] == 200
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url + "/v1/models", timeout=30)
    assert e.value.code == 401
    with urllib.request.urlopen(url + "/health", timeout=30) as r:  # liveness probes need no key
        assert r.status == 200
    assert compared, "the key was not compared with hmac.compare_digest"


def test_the_api_key_setting_through_the_official_client(make_server):
    url, _ = make_server(api_key="k-123")
    good = openai.OpenAI(base_url=url + "/v1", api_key="k-123", max_retries=0, timeout=60)
    assert good.completions.create(model="twotower", prompt="hi", max_tokens=3).choices[0].text is not None
    assert [m.id for m in good.models.list().data] == ["twotower"]
    bad = openai.OpenAI(base_url=url + "/v1", api_key="k-12", max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="twotower", prompt="hi", max_tokens=3)


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; "
                                          "boundary=x", None])
def test_a_cross_origin_simple_post_runs_no_generation(server, content_type):
    """A browser sends text/plain (or a form) cross-origin without a preflight: 415, nothing queued."""
    before = len(server.submitted)
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: http://evil.example\r\n"
            b"Connection: close\r\n")
    body = json.dumps({"prompt": "hi", "max_tokens": 4}).encode()
    if content_type is not None:
        head += b"Content-Type: " + content_type.encode() + b"\r\n"
    status, got = raw_http(server.port, head + b"Content-Length: %d\r\n\r\n" % len(body), [body])
    assert status == 415, got[:300]
    assert b"access-control-allow-origin" not in got.lower()
    assert len(server.submitted) == before
    status, _, _ = post(server.url, {"prompt": "hi", "max_tokens": 2},
                        headers={"Content-Type": "application/json; charset=utf-8"})
    assert status == 200


def test_bodies_over_the_limit_get_413_before_parsing(server):
    limit = 4 * 1024 * 1024
    before = len(server.submitted)
    # Content-Length over the limit: refused before a byte of the body is read
    status, got = raw_http(server.port, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                                        b"application/json\r\nContent-Length: %d\r\n\r\n" % (limit + 1))
    assert status == 413, got[:300]
    assert b'"param":"body"' in got.replace(b" ", b"")
    # no Content-Length (chunked): counted while reading
    chunk = b"x" * 65536
    parts = [b"%x\r\n%s\r\n" % (len(chunk), chunk)] * (limit // len(chunk) + 1) + [b"0\r\n\r\n"]
    status, got = raw_http(server.port, b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                                        b"application/json\r\nTransfer-Encoding: chunked\r\n\r\n", parts)
    assert status == 413, got[:300]
    assert len(server.submitted) == before


def test_the_body_limit_is_a_setting(make_server):
    url, _ = make_server(max_body_bytes=1000)
    assert post(url, {"prompt": "x" * 1000, "max_tokens": 2})[0] == 413
    assert post(url, {"prompt": "x" * 100, "max_tokens": 2})[0] == 200


def test_large_prompts_are_tokenized_off_the_event_loop(model_path, model):
    """Decoding and tokenizing the body run on a worker thread, so a 3 MB prompt never stalls the loop."""
    from twotower.serving.app import create_app

    threads = []

    class Spy(ByteTokenizer):
        def encode(self, text, **kw):
            threads.append(threading.current_thread().name)
            return super().encode(text, **kw)

    app = create_app(ServeSettings(model=str(model_path), max_tokens=4), model=model, tokenizer=Spy())
    with running_server(app) as url:
        status, out, _ = post(url, {"prompt": "y" * (3 * 1024 * 1024), "max_tokens": 2})
        assert status == 400 and out["error"]["param"] == "prompt"  # longer than the context
        assert post(url, {"prompt": "hi", "max_tokens": 2})[0] == 200
    assert threads and all(t.startswith("twotower-parse") for t in threads), threads


def test_cors_is_off_unless_configured(server, make_server):
    preflight = (b"OPTIONS /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nOrigin: %s\r\n"
                 b"Access-Control-Request-Method: POST\r\nAccess-Control-Request-Headers: content-type\r\n"
                 b"Connection: close\r\n\r\n")
    _, got = raw_http(server.port, preflight % b"http://evil.example")
    assert b"access-control-allow-origin" not in got.lower()
    url, _ = make_server(cors_origins=["http://good.example"])
    port = int(url.rsplit(":", 1)[1])
    status, got = raw_http(port, preflight % b"http://good.example")
    assert status == 200 and b"access-control-allow-origin: http://good.example" in got.lower()
    _, got = raw_http(port, preflight % b"http://evil.example")
    assert b"access-control-allow-origin" not in got.lower()


def test_docs_are_off_by_default(server, make_server):
    for path in ("/docs", "/redoc", "/openapi.json"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(server.url + path, timeout=30)
        assert e.value.code == 404, path
    url, _ = make_server(docs=True)
    with urllib.request.urlopen(url + "/openapi.json", timeout=30) as r:
        assert r.status == 200 and "/v1/completions" in json.loads(r.read())["paths"]


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def health(port: int) -> int:
    """The status of GET /health on a fresh connection (the head only: the server keeps it open)."""
    return raw_http(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", whole=False)[0]


def test_a_body_that_trickles_in_gets_408_and_the_server_goes_on(make_server):
    """Slow-loris on the body: the headers promise 64 bytes, 10 arrive, then nothing. The server
    answers 408 once body_timeout_s has passed (bounded: the socket's own timeout is 30 s), and
    serves the next request."""
    url, _ = make_server(body_timeout_s=0.5)
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 64\r\n\r\n")
    status, got = raw_http(port_of(url), head, [b'{"prompt":'], timeout=30, whole=False)
    assert status == 408, got[:200]
    assert post(url, {"prompt": "hi", "max_tokens": 2})[0] == 200


def test_connections_beyond_max_connections_get_503(make_server):
    """Clients that open connections and never finish their headers hold at most max_connections:
    a request on one more is refused at once (503), and once they go, requests are served again."""
    url, _ = make_server(max_connections=3, header_timeout_s=300)  # the header deadline out of the way
    port = port_of(url)
    idle = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(2)]
    try:
        for s in idle:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # headers never finished
        wait_until(lambda: health(port) == 503, what="the connection bound to refuse a request")
        assert health(port) == 503  # refused while the idle connections hold their places
    finally:
        for s in idle:
            s.close()
    wait_until(lambda: health(port) == 200, what="requests to be served again")
    assert post(url, {"prompt": "hi", "max_tokens": 2})[0] == 200


def recv_all(s: socket.socket) -> bytes:
    """What the server sends on `s` until it closes it (bounded by the socket's own timeout)."""
    got = b""
    while chunk := s.recv(65536):
        got += chunk
    return got


@pytest.mark.parametrize("sent", [b"", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"],
                         ids=["nothing", "half-headers"])
def test_headers_not_complete_in_time_get_408_and_a_closed_connection(make_server, sent):
    """Slow-loris on the headers: a client that connects and sends nothing, or stops halfway through
    its headers, gets 408 and is disconnected once header_timeout_s has passed (the socket's own
    timeout, 30 s, bounds the wait)."""
    url, _ = make_server(header_timeout_s=0.5)
    with socket.create_connection(("127.0.0.1", port_of(url)), timeout=30) as s:
        s.sendall(sent)
        start = time.monotonic()
        got = recv_all(s)  # returns when the server closes the connection
    assert got.startswith(b"HTTP/1.1 408 "), got[:200]
    assert b"header_timeout_s" in got
    assert 0.3 < time.monotonic() - start < 25
    assert post(url, {"prompt": "hi", "max_tokens": 2})[0] == 200


def test_slow_header_clients_cannot_hold_max_connections(make_server):
    """The attack the 503 test above shows, with the deadline on: the clients never finish their headers
    and never close, and the server serves again once header_timeout_s has dropped them."""
    url, _ = make_server(max_connections=3, header_timeout_s=1.0)
    port = port_of(url)
    idle = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(2)]
    try:
        for s in idle:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
        assert [recv_all(s)[:13] for s in idle] == [b"HTTP/1.1 408 "] * 2  # still open on our side
        wait_until(lambda: health(port) == 200, what="requests to be served while the clients hold on")
    finally:
        for s in idle:
            s.close()


def test_a_kept_alive_connection_is_not_timed_between_requests(make_server):
    """The deadline runs from a request's first byte, not from the previous response: a client that
    waits longer than header_timeout_s between two requests on one connection is served twice
    (idle connections are uvicorn's keep-alive timer's, 5 s)."""
    url, _ = make_server(header_timeout_s=0.5)
    head = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port_of(url)), timeout=30) as s:
        statuses = []
        for _ in range(2):
            s.sendall(head)
            got = b""
            while b"\r\n\r\n" not in got or not got.rstrip().endswith(b"}"):
                chunk = s.recv(65536)
                assert chunk, f"the server closed the connection after {statuses}"
                got += chunk
            statuses.append(int(got.split(b" ", 2)[1]))
            time.sleep(1.5)  # three header deadlines, under the keep-alive timeout
    assert statuses == [200, 200]


def test_the_header_deadline_refuses_bad_times():
    from twotower.serving.connections import header_deadline_protocol

    with pytest.raises(ValueError, match="header_timeout_s must be a number of seconds > 0, got 0"):
        header_deadline_protocol(0)
    with pytest.raises(ValueError, match="header_timeout_s must be a number of seconds > 0, got True"):
        ServeSettings(header_timeout_s=True).check(16)


def test_serve_settings_refuse_bad_connection_bounds():
    with pytest.raises(ValueError, match="max_connections must be an integer >= 2, got 1"):
        ServeSettings(max_connections=1).check(16)
    with pytest.raises(ValueError, match="body_timeout_s must be a number of seconds > 0, got 0"):
        ServeSettings(body_timeout_s=0).check(16)


def test_batch_block_size_is_a_server_setting_that_reaches_speculative_decoders():
    with pytest.raises(ValueError, match="batch_block_size must be an integer >= 2, got 1"):
        ServeSettings(batch_block_size=1).check(16)
    settings = ServeSettings(batch_block_size=4)
    settings.check(16)
    for name in ("speculative", "two_branch"):
        req = parse_completion({"prompt": "x = ", "max_tokens": 4, "decoder": name}, settings, TOK, context_limit=512,
                               model_block_size=16)
        assert req.decoder.batch_block_size == 4 and req.decoder.block_size == 16
    # Decoders without the setting are built as before (diffusion drafts no speculative block).
    req = parse_completion({"prompt": "x = ", "max_tokens": 4, "decoder": "diffusion"}, settings, TOK, context_limit=512,
                           model_block_size=16)
    assert not hasattr(req.decoder, "batch_block_size")
    with pytest.raises(RequestError, match="batch_block_size") as err:  # the operator's trade-off, not a request's
        parse_completion({"prompt": "x", "max_tokens": 4, "batch_block_size": 2}, settings, TOK, context_limit=512,
                         model_block_size=16)
    assert err.value.param == "batch_block_size"


def test_lookup_is_a_server_setting_that_reaches_speculative_decoders():
    with pytest.raises(ValueError, match="lookup must be an integer >= 1, got 0"):
        ServeSettings(lookup=0).check(16)
    settings = ServeSettings(lookup=4)
    settings.check(16)
    req = parse_completion({"prompt": "x = ", "max_tokens": 4, "decoder": "speculative"}, settings, TOK,
                           context_limit=512, model_block_size=16)
    assert req.decoder.lookup.ngrams == (4,) and req.decoder.lookup.max_tokens is None
    with pytest.raises(ValueError, match="lookup_max_tokens=15 needs lookup"):
        ServeSettings(lookup_max_tokens=15).check(16)
    longer = ServeSettings(lookup=3, lookup_max_tokens=15)
    longer.check(16)
    req = parse_completion({"prompt": "x = ", "max_tokens": 4, "block_size": 6}, longer, TOK, context_limit=512,
                           model_block_size=16)
    assert req.decoder.lookup.max_tokens == 15 and req.decoder.block_size == 6
    # two_branch takes the lookup as its second candidate; decoders without the setting are built as before.
    req = parse_completion({"prompt": "x = ", "max_tokens": 4, "decoder": "two_branch"}, settings, TOK,
                           context_limit=512, model_block_size=16)
    assert req.decoder.lookup.ngrams == (4,)
    req = parse_completion({"prompt": "x = ", "max_tokens": 4, "decoder": "mask_diffusion"}, settings, TOK,
                           context_limit=512, model_block_size=16)
    assert not hasattr(req.decoder, "lookup")
    with pytest.raises(RequestError, match="lookup") as err:
        parse_completion({"prompt": "x", "max_tokens": 4, "lookup": 2}, settings, TOK, context_limit=512,
                         model_block_size=16)
    assert err.value.param == "lookup"


def test_forks_alternatives_branch_len_and_lookup_alone_are_server_settings_for_two_branch():
    with pytest.raises(ValueError, match="forks must be an integer >= 1, got 0"):
        ServeSettings(forks=0).check(16)
    with pytest.raises(ValueError, match="branch_len must be an integer >= 1, got 0"):
        ServeSettings(branch_len=0).check(16)
    with pytest.raises(ValueError, match="lookup_alone=8 needs lookup"):
        ServeSettings(decoder="two_branch", lookup_alone=8).check(16)
    settings = ServeSettings(decoder="two_branch", forks=3, alternatives=2, branch_len=4, lookup=4, lookup_alone=8)
    settings.check(16)
    req = parse_completion({"prompt": "x = ", "max_tokens": 4}, settings, TOK, context_limit=512, model_block_size=16)
    assert (req.decoder.forks, req.decoder.alternatives, req.decoder.branch_len) == (3, 2, 4)
    assert req.decoder.lookup_alone == 8 and req.decoder.lookup.ngrams == (4,)
    req = parse_completion({"prompt": "x = ", "max_tokens": 4, "decoder": "speculative"}, settings, TOK,
                           context_limit=512, model_block_size=16)
    assert type(req.decoder).__name__ == "Speculative"  # takes no forks: built as before
    default = parse_completion({"prompt": "x", "max_tokens": 4}, ServeSettings(decoder="two_branch"), TOK,
                               context_limit=512, model_block_size=16)
    assert (default.decoder.forks, default.decoder.alternatives, default.decoder.branch_len) == (1, 1, None)
    assert default.decoder.lookup_alone is None
    with pytest.raises(RequestError, match="forks") as err:
        parse_completion({"prompt": "x", "max_tokens": 4, "forks": 2}, settings, TOK, context_limit=512,
                         model_block_size=16)
    assert err.value.param == "forks"


def test_a_warning_when_listening_beyond_loopback_without_a_key(model, model_path, monkeypatch, caplog):
    import uvicorn

    from twotower.serving.app import exposure_warning, serve

    assert exposure_warning(ServeSettings(host="127.0.0.1")) is None
    assert exposure_warning(ServeSettings(host="::1")) is None
    assert exposure_warning(ServeSettings(host="localhost")) is None
    assert exposure_warning(ServeSettings(host="0.0.0.0", api_key="k")) is None
    assert "API key" in exposure_warning(ServeSettings(host="0.0.0.0"))
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, *a, **kw: None)  # nothing is bound
    with caplog.at_level(logging.WARNING, logger="twotower.serving"):
        serve(ServeSettings(model=str(model_path), host="0.0.0.0", port=9), model=model)
    assert any("without an API key" in r.getMessage() for r in caplog.records)


def test_settings_outside_their_own_limits_are_refused(model_path, model):
    from twotower.serving.app import create_app

    with pytest.raises(ValueError, match="block_size 16 is above max_block_size 8"):
        create_app(ServeSettings(model=str(model_path), block_size=16), model=model)
    with pytest.raises(ValueError, match="max_tokens 100 is above max_tokens_limit 50"):
        create_app(ServeSettings(model=str(model_path), max_tokens=100, max_tokens_limit=50), model=model)


def test_settings_come_from_the_cli_and_the_recipe():
    from twotower.serving.app import parse_settings

    s = parse_settings(["--config", str(ROOT / "recipes/serve.yaml"), "--api_key", "abc", "--max_body_bytes", "1000",
                        "--cors_origins", '["http://a.example"]', "--max_block_size", "8"])
    assert (s.api_key, s.max_body_bytes, s.cors_origins, s.max_block_size, s.docs) == \
        ("abc", 1000, ["http://a.example"], 8, False)


# ---- many decoder settings at once: a bound over all working batches -----------------------------------


def test_max_rows_bounds_the_rows_over_all_batches(model):
    """Every distinct threshold is its own working batch (max_batch rows each), so without a bound
    over all batches eight such requests run eight rows at once."""
    from twotower.decoding import Towers
    from twotower.serving.scheduler import Job, Scheduler

    srv = SimpleNamespace(model=model, settings=ServeSettings(max_tokens=16))
    bodies = [{"prompt": f"p{i}", "max_tokens": 12, "decoder": "diffusion", "threshold": 0.5 + i / 20}
              for i in range(8)]
    sched = Scheduler(Towers.of(model), max_batch=2, max_rows=3).start()
    try:
        jobs = [sched.submit(Job(parse_completion(b, srv.settings, TOK, context_limit=512, model_block_size=8), TOK,
                                 [TOK.eos_token_id])) for b in bodies]
        wait_until(lambda: all(j.over for j in jobs), 120, "the jobs")
    finally:
        sched.stop()
    assert 2 <= sched.peak <= 3
    assert [j.text for j in jobs] == [alone(srv, b) for b in bodies]


def test_a_full_queue_gets_503_at_once(make_server, monkeypatch):
    """max_waiting bounds the requests queued for a row: one more is refused at once (503,
    Retry-After), the queued ones are still served."""
    from twotower.serving.stepper import Stepper

    release, real_finish = threading.Event(), Stepper.finish

    def finish(self, drafted):  # hold the scheduler thread at the first boundary until released
        release.wait(60)
        real_finish(self, drafted)

    monkeypatch.setattr(Stepper, "finish", finish)
    url, app = make_server(max_batch=1, max_rows=1, max_waiting=1)
    sched, body = app.state.scheduler, {"prompt": "hi", "max_tokens": 4, "decoder": "ar"}
    answers = {}
    try:
        a = threading.Thread(target=lambda: answers.update(a=post(url, body)))
        a.start()
        wait_until(lambda: sched.stats()["running"] == 1, 30, "the first request to run")
        b = threading.Thread(target=lambda: answers.update(b=post(url, body)))
        b.start()
        wait_until(lambda: sched.stats()["waiting"] == 1, 30, "the second request to wait")
        status, out, headers = post(url, body)
        assert status == 503 and out["error"]["code"] == "overloaded" and headers.get("retry-after") == "1"
        assert "max_waiting" in out["error"]["message"]
    finally:
        release.set()
        a.join(60)
        b.join(60)
    assert answers["a"][0] == 200 and answers["b"][0] == 200


# ---- the load script, small ---------------------------------------------------------------------------


def test_load_script_small(model_path):
    """`benchmarks/serve_load.py` with 6 clients and 2 that disconnect: every output equals the
    request served alone, the disconnected jobs were dropped, the scheduler ends idle."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("serve_load", ROOT / "benchmarks/serve_load.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    report = mod.main(["--model", str(model_path), "--clients", "6", "--disconnect", "2", "--max-tokens", "24"])
    assert report["same_texts"] and report["ok"], report
    assert report["disconnected"]["dropped"] == 2 and report["after"]["running"] == 0
    assert report["after"]["waiting"] == 0
