"""A context tower's length limit is its `max_length`: max_position_embeddings, or a shorter sliding
window (Mistral, Qwen2 with use_sliding_window). generate and the server refuse a request past it up
front, naming the limit, instead of the tower failing mid-generation; a request that ends at the
window runs to its end (Speculative narrows its last blocks to fit)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
import torch
from conftest import tiny_mistral_config

from twotower.decoding import Autoregressive, MaskDiffusion, Speculative
from twotower.model import TwoTowerLM
from twotower.tokenizers import BYTE_TOKENIZER, ByteTokenizer

WINDOW = 16


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = tiny_mistral_config(vocab_size=ByteTokenizer().vocab_size, sliding_window=WINDOW, tokenizer=BYTE_TOKENIZER)
    return TwoTowerLM(config, block_size=4).eval()


def test_the_limit_is_the_window(model):
    assert model.max_length == WINDOW < model.config.max_position_embeddings


def test_generate_refuses_a_prompt_and_continuation_past_the_window(model):
    ids = torch.randint(4, 200, (1, 10))
    decoder = MaskDiffusion(block_size=4, steps_per_block=4)
    with torch.inference_mode():
        out = model.generate(ids, decoder=decoder, max_new_tokens=WINDOW - 10)  # exactly the window: fine
        assert out.new_tokens.shape[1] <= WINDOW - 10
        with pytest.raises(ValueError, match="10 \\+ max_new_tokens 8 = 18 exceeds the model's sliding_window = 16"):
            model.generate(ids, decoder=decoder, max_new_tokens=8)


@pytest.mark.parametrize("prompt_len", [8, 11, 13, 15])
def test_speculative_fits_a_request_that_ends_at_the_window(model, prompt_len):
    # Its last verify would run a whole block past the window: it is narrowed to fit, and greedy
    # output stays the AR model's own.
    ids = torch.randint(4, 200, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    with torch.inference_mode():
        got = model.generate(ids, decoder=Speculative(block_size=4), max_new_tokens=WINDOW - prompt_len)
        want = model.generate(ids, decoder=Autoregressive(), max_new_tokens=WINDOW - prompt_len)
    assert torch.equal(got.new_tokens, want.new_tokens)


class Lucky(Speculative):
    """Keeps a random number of drafted tokens per row, so rows drift apart and leave holes."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.g = torch.Generator().manual_seed(0)

    def kept(self, logits, ar, x):
        return torch.randint(1, x.shape[1] + 1, (x.shape[0],), generator=self.g)


def test_rows_with_holes_reach_the_window():
    # Holes count as cache positions: next to the window they are squeezed out, so every row still
    # makes its max_new_tokens.
    torch.manual_seed(0)
    config = tiny_mistral_config(vocab_size=ByteTokenizer().vocab_size, sliding_window=24, tokenizer=BYTE_TOKENIZER)
    model = TwoTowerLM(config, block_size=4).eval()
    for seed in range(4):
        ids = torch.randint(4, 200, (4, 8), generator=torch.Generator().manual_seed(seed))
        with torch.inference_mode():
            out = model.generate(ids, decoder=Lucky(block_size=4), max_new_tokens=16)
        assert out.num_generated.tolist() == [16] * 4


def post(url: str, body: dict) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_server_refuses_a_request_past_the_window(model):
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    from conftest import running_server

    from twotower.serving.app import create_app
    from twotower.serving.requests import ServeSettings

    settings = ServeSettings(model="tiny-mistral", max_tokens=4)  # the default decoder: speculative
    app = create_app(settings, model=model, tokenizer=ByteTokenizer())
    with running_server(app) as url:
        status, body = post(url, {"prompt": "x" * 10, "max_tokens": 8})
        assert status == 400, body
        message = body["error"]["message"]
        # The byte tokenizer adds BOS: the prompt is 11 tokens, so 5 is the most max_tokens may be.
        assert "exceeds the context limit (sliding_window) 16" in message and "at most 5" in message, message
        status, body = post(url, {"prompt": "x" * 20, "max_tokens": 1})
        assert status == 400 and "context limit (sliding_window) is 16" in body["error"]["message"], body
        for decoder in ("speculative", "diffusion"):  # a request that ends at the window runs to its end
            status, body = post(url, {"prompt": "x" * 10, "max_tokens": 5, "decoder": decoder})
            assert status == 200 and body["usage"]["completion_tokens"] == 5, body
