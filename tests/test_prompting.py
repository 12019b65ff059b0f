"""One prompt encoding (`prompting.encode_prompt`) everywhere: a prompt gives the same ids and the same
greedy text through the Python API, predict, the server and the eval harness, for the byte-level
embedded default and for a model with a Hugging Face tokenizer; chat messages go through the
tokenizer's chat template in `/v1/chat/completions` (the official openai client, streamed and not)
and in predict's prompt files."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import WORD_CHAT_TEMPLATE, WORDS, running_server, save_word_tokenizer, save_word_twotower

from twotower.decoding import Autoregressive, Speculative
from twotower.prompting import encode_prompt
from twotower.tokenizers import ByteTokenizer, HFTokenizer

ROOT = Path(__file__).resolve().parents[1]
CHAT_WORDS = WORDS + ["user", "assistant", "system"]
MESSAGES = [{"role": "system", "content": "w7"}, {"role": "user", "content": "w1 w2 w3"}]


def hf_reference(path):
    """transformers' own tokenizer for the folder (the independent reference)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


# ---- the rule --------------------------------------------------------------------------------------


def test_bos_follows_the_tokenizer(tmp_path):
    text = "w1 w2 w3"
    assert encode_prompt(ByteTokenizer(), "hi") == [1, ord("h") + 4, ord("i") + 4]  # the byte model: always BOS
    assert encode_prompt(ByteTokenizer(), "hi", add_bos=False) == [ord("h") + 4, ord("i") + 4]
    for bos in (False, True):  # SmolLM2-style (adds nothing) and Llama-style (adds <s>)
        path = save_word_tokenizer(tmp_path / f"bos{bos}", bos=bos)
        want = hf_reference(path)(text, add_special_tokens=True)["input_ids"]
        assert (want[0] == WORDS.index("<s>")) == bos
        assert encode_prompt(HFTokenizer(str(path)), text) == want
        assert encode_prompt(HFTokenizer(str(path)), text, add_bos=True)[0] == WORDS.index("<s>")


def test_chat_messages_go_through_the_template(tmp_path):
    path = save_word_tokenizer(tmp_path / "chat", CHAT_WORDS, chat_template=WORD_CHAT_TEMPLATE)
    want = hf_reference(path).apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)["input_ids"]
    ids = encode_prompt(HFTokenizer(str(path)), MESSAGES)
    assert ids == want and ids[-2:] == [CHAT_WORDS.index("<s>"), CHAT_WORDS.index("assistant")]
    with pytest.raises(ValueError, match="has no chat template.*plain text prompt"):
        encode_prompt(ByteTokenizer(), MESSAGES)
    with pytest.raises(ValueError, match="has no chat template.*chat_template"):
        encode_prompt(HFTokenizer(str(save_word_tokenizer(tmp_path / "plain"))), MESSAGES)
    with pytest.raises(ValueError, match=r"messages\[1\] must be an object with a string \"role\""):
        encode_prompt(HFTokenizer(str(path)), [MESSAGES[0], {"content": "w1"}])
    with pytest.raises(TypeError, match="a prompt is a string or a list of chat messages"):
        encode_prompt(ByteTokenizer(), 5)


# ---- the four paths --------------------------------------------------------------------------------


def python_api(model_dir, prompt, n):
    from twotower.model import TwoTowerLM

    model = TwoTowerLM.from_pretrained(model_dir).eval()
    ids = model.encode(prompt)
    out = model.generate(ids, decoder=Speculative(), max_new_tokens=n, eos_token_id=model.tokenizer.eos_token_id)
    return ids[0].tolist(), model.tokenizer.decode(out.new_tokens[0, : int(out.num_generated[0])])


def predict_module(model_dir, prompt, n):
    """GenerationModule + PromptDataModule as the predict CLI links them (the model's tokenizer)."""
    from twotower.data import PromptDataModule
    from twotower.inference import GenerationModule

    gm = GenerationModule(str(model_dir), decoder=Speculative(), max_new_tokens=n)
    batch = next(iter(PromptDataModule(prompt_list=[prompt], tokenizer=gm.tokenizer).predict_dataloader()))
    row, = gm.predict_step(batch, 0)
    return batch["input_ids"][0].tolist(), row["completion"]


def server(model_dir, prompt, n):
    """The server's request builder and its scheduler thread (what /v1/completions runs)."""
    from twotower.decoding import Towers
    from twotower.model import TwoTowerLM
    from twotower.serving.requests import ServeSettings, parse_completion
    from twotower.serving.scheduler import Job, Scheduler
    from twotower.tokenizers import tokenizer_for

    model = TwoTowerLM.from_pretrained(model_dir).eval()
    tok = tokenizer_for(model, model_dir)
    req = parse_completion({"prompt": prompt, "max_tokens": n, "decoder": "speculative"}, ServeSettings(), tok,
                           context_limit=None, model_block_size=model.block_size)
    sched = Scheduler(Towers.of(model), max_batch=2).start()
    try:
        job = sched.submit(Job(req, tok, [tok.eos_token_id]))
        deadline = time.time() + 120
        while not job.over:
            assert time.time() < deadline
            time.sleep(0.02)
    finally:
        sched.stop()
    assert job.error is None, job.error
    return req.prompt_ids, job.text


def harness(model_dir, prompt, n):
    pytest.importorskip("lm_eval", reason="needs the [eval] extra")
    from lm_eval.api.instance import Instance

    from twotower.evaluation.harness import TwoTowerEvalLM

    lm = TwoTowerEvalLM(pretrained=str(model_dir), decoder="speculative")
    req = Instance(request_type="generate_until", doc={}, arguments=(prompt, {"until": [], "max_gen_toks": n}), idx=0)
    text, = lm.generate_until([req], disable_tqdm=True)
    return lm.tok_encode(prompt), text


@pytest.mark.parametrize("kind", ["byte", "hf"])
def test_a_prompt_gives_the_same_ids_and_text_through_every_path(kind, tmp_path):
    if kind == "byte":  # the embedded default, by its built-in name
        model_dir, prompt, n = "embedded", "def fibonacci(n):", 24
        want_ids = [1] + [b + 4 for b in prompt.encode()]
    else:  # a SmolLM2-style Hugging Face tokenizer: no BOS before text
        tok_dir = save_word_tokenizer(tmp_path / "tok")
        model_dir, prompt, n = save_word_twotower(tmp_path / "word", tok_dir, seed=1), "w5 w6 w7", 10
        want_ids = hf_reference(tok_dir)(prompt)["input_ids"]
    from twotower.model import TwoTowerLM

    model = TwoTowerLM.from_pretrained(model_dir).eval()  # the reference: AR greedy on the expected ids
    ref = Autoregressive().generate(model, torch.tensor([want_ids]), max_new_tokens=n,
                                    eos_token_id=model.tokenizer.eos_token_id)
    want_text = model.tokenizer.decode(ref.new_tokens[0, : int(ref.num_generated[0])])
    assert want_text.strip(), "the reference itself is only whitespace"
    for path in (python_api, predict_module, server, harness):
        ids, text = path(model_dir, prompt, n)
        assert list(ids) == want_ids, path.__name__
        assert text == want_text, path.__name__


# ---- chat ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    """A tiny two-tower model whose word tokenizer has a chat template."""
    root = tmp_path_factory.mktemp("chat")
    tok = save_word_tokenizer(root / "tok", CHAT_WORDS, chat_template=WORD_CHAT_TEMPLATE)
    return save_word_twotower(root / "model", tok, seed=1)


def greedy_reply(model, ids: list[int], n: int) -> str:
    out = Autoregressive().generate(model, torch.tensor([ids]), max_new_tokens=n,
                                    eos_token_id=model.tokenizer.eos_token_id)
    return model.tokenizer.decode(out.new_tokens[0, : int(out.num_generated[0])])


def test_chat_completions_apply_the_chat_template(chat_model_dir):
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from twotower.model import TwoTowerLM
    from twotower.serving.app import create_app
    from twotower.serving.requests import ServeSettings

    model = TwoTowerLM.from_pretrained(chat_model_dir).eval()
    ids = hf_reference(chat_model_dir).apply_chat_template(MESSAGES, add_generation_prompt=True)["input_ids"]
    want = greedy_reply(model, ids, 8)
    assert want.strip(), "the reference reply is empty: the test could not tell templates apart"
    app = create_app(ServeSettings(model=str(chat_model_dir), max_tokens=8), model=model)
    with running_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        r = client.chat.completions.create(model="twotower", messages=MESSAGES, max_tokens=8, temperature=0)
        assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
        assert r.choices[0].message.content == want and r.usage.prompt_tokens == len(ids)
        assert r.choices[0].finish_reason in ("stop", "length")
        chunks = list(client.chat.completions.create(model="twotower", messages=MESSAGES, max_tokens=8,
                                                     temperature=0, stream=True))
        assert all(c.object == "chat.completion.chunk" for c in chunks)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
        assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.BadRequestError, match=r"messages\[0\] must be an object"):
            client.chat.completions.create(model="twotower", messages=[{"role": "user"}], max_tokens=4)


def test_chat_without_a_template_is_a_400_naming_messages(twotower_dir):
    openai = pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from twotower.serving.app import create_app
    from twotower.serving.requests import ServeSettings

    app = create_app(ServeSettings(model=str(twotower_dir), max_tokens=4))
    with running_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="twotower", messages=MESSAGES, max_tokens=4)
        assert e.value.param == "messages" and "no chat template" in str(e.value)


def test_predict_reads_messages_rows_beside_prompt_rows(chat_model_dir, tmp_path):
    from twotower.model import TwoTowerLM

    prompts = tmp_path / "p.jsonl"
    rows = [{"messages": MESSAGES}, {"prompt": "w4 w5"}]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "pred.jsonl"
    cmd = [sys.executable, "-m", "twotower.cli", "predict", "--config", "generate",
           "--model.init_args.model", str(chat_model_dir), "--data.init_args.prompts", str(prompts),
           "--model.init_args.decoder", "twotower.decoding.Speculative", "--model.init_args.max_new_tokens", "6",
           "--trainer.callbacks.init_args.output", str(out), "--trainer.enable_progress_bar", "false"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = [json.loads(line) for line in out.read_text().splitlines()]
    model = TwoTowerLM.from_pretrained(chat_model_dir).eval()
    ref = hf_reference(chat_model_dir)
    chat_ids = ref.apply_chat_template(MESSAGES, add_generation_prompt=True)["input_ids"]
    text_ids = ref("w4 w5")["input_ids"]
    assert got[0]["prompt"] == MESSAGES and got[1]["prompt"] == "w4 w5"
    assert [r["prompt_tokens"] for r in got] == [len(chat_ids), len(text_ids)]
    assert [r["completion"] for r in got] == [greedy_reply(model, chat_ids, 6), greedy_reply(model, text_ids, 6)]
