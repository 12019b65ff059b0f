"""The lm-evaluation-harness model (`--model twotower`): lm_eval's own CLI on tiny local tasks of each
output type, exact log-likelihoods against transformers' NemotronH, batch-size invariance, `until`
handling (a stop string spanning two blocks), and clear errors for bad model_args."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval", reason="needs the [eval] extra")
from lm_eval.api.instance import Instance  # noqa: E402

from twotower.evaluation.harness import TwoTowerEvalLM, build_decoder  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "twotower" / "assets" / "twotower"
BACKBONE = ROOT / "twotower" / "assets" / "backbone"
CONTEXTS = ["def add(a, b):\n    return", "import os\n", "class Stack:\n    def push(self, x):\n", "x"]
CONTINUATIONS = [" a + b\n", "import sys", "        self.items.append(x)", " = 1"]


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


@pytest.fixture(scope="module")
def lm() -> TwoTowerEvalLM:
    return TwoTowerEvalLM(pretrained=str(DEFAULT), decoder="speculative", batch_size=3)


# ---- exact log-likelihoods ----------------------------------------------------------------------


def test_loglikelihoods_equal_transformers_nemotron_h_on_the_backbone(lm):
    from transformers import NemotronHForCausalLM

    ref = NemotronHForCausalLM.from_pretrained(BACKBONE, dtype=torch.float32).eval()
    got = lm.loglikelihood(requests("loglikelihood", list(zip(CONTEXTS, CONTINUATIONS))), disable_tqdm=True)
    for (ctx, cont), (logp, greedy) in zip(zip(CONTEXTS, CONTINUATIONS), got):
        c, t = lm._encode_pair(ctx, cont)  # lm_eval's split (a context's trailing space moves over)
        ids = torch.tensor([c + t])
        with torch.no_grad():
            logits = ref(ids).logits[0].float()
        lp = torch.log_softmax(logits[len(c) - 1: -1], -1)
        want = lp.gather(-1, torch.tensor(t)[:, None]).sum().item()
        assert logp == pytest.approx(want, abs=1e-4, rel=1e-5), (ctx, cont)
        assert greedy == bool((lp.argmax(-1) == torch.tensor(t)).all())
    # A continuation that is the model's own greedy choice is reported greedy.
    ctx = lm.tok_encode(CONTEXTS[0])
    with torch.no_grad():
        first = int(ref(torch.tensor([ctx])).logits[0, -1].argmax())
    (_, greedy), = lm.loglikelihood(requests("loglikelihood", [(CONTEXTS[0], lm.tok_decode([first]))]),
                                    disable_tqdm=True)
    assert greedy


def test_rolling_loglikelihood_sums_windows_of_the_context_length():
    text = "def f(x):\n    return x * 2\n" * 8
    whole = TwoTowerEvalLM(pretrained=str(DEFAULT), batch_size=2)
    windowed = TwoTowerEvalLM(pretrained=str(DEFAULT), batch_size=2, max_length=40)
    a, = whole.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]), disable_tqdm=True)
    b, = windowed.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]), disable_tqdm=True)
    # Unwindowed it is one teacher-forced pass from BOS over every byte.
    ids = [whole.prefix_token_id] + whole.tok_encode(text, add_special_tokens=False)
    with torch.no_grad():
        lp = torch.log_softmax(whole.model.context(torch.tensor([ids]))[0, :-1], -1)
    assert a == pytest.approx(lp.gather(-1, torch.tensor(ids[1:])[:, None]).sum().item(), rel=1e-5)
    assert b < a  # shorter windows see less context, so the text is less likely
    assert math.isfinite(b)


def test_results_do_not_depend_on_batch_size():
    pairs = list(zip(CONTEXTS, CONTINUATIONS)) * 2
    gen = [(c, {"until": ["\n\n"], "max_gen_toks": 24}) for c in CONTEXTS]
    for decoder in ("speculative", "diffusion"):
        outs = []
        for bs in (1, 3):
            lm = TwoTowerEvalLM(pretrained=str(DEFAULT), decoder=decoder, batch_size=bs)
            ll = lm.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
            outs.append((ll, lm.generate_until(requests("generate_until", gen), disable_tqdm=True)))
        (ll1, g1), (ll3, g3) = outs
        for (a, ga), (b, gb) in zip(ll1, ll3):
            assert a == pytest.approx(b, abs=1e-5) and ga == gb
        assert g1 == g3, decoder


# ---- generate_until -----------------------------------------------------------------------------


def test_until_cuts_at_the_earliest_stop_string_spanning_two_blocks(lm):
    ctx = "def fibonacci(n):\n"
    free, = lm.generate_until(requests("generate_until", [(ctx, {"until": [], "max_gen_toks": 40})]),
                              disable_tqdm=True)
    assert len(free) == 40  # byte tokens: one character each, no stop
    stop = free[15:18]  # bytes 15-17: the block boundary of a 16-token block lies inside it
    before = lm.stats["generated_tokens"]
    cut, = lm.generate_until(requests("generate_until", [(ctx, {"until": [stop, "never"], "max_gen_toks": 40})]),
                             disable_tqdm=True)
    assert cut == free[: free.find(stop)]
    assert lm.stats["generated_tokens"] - before < 40  # the row ended early, not after 40 tokens
    # A string and the EOS default work too; sampling settings are honoured (seeded by lm_eval).
    one, = lm.generate_until(requests("generate_until", [(ctx, {"until": stop, "max_gen_toks": 40})]),
                             disable_tqdm=True)
    assert one == cut
    short, = lm.generate_until(requests("generate_until", [(ctx, {"max_gen_toks": 5})]), disable_tqdm=True)
    assert short == free[:5]
    assert lm.get_model_info()["twotower_tokens_per_forward"] > 1  # speculative: several per forward


def test_every_decoder_serves_generate_until():
    gen = [(c, {"until": ["\n\n"], "max_gen_toks": 20}) for c in CONTEXTS[:2]]
    texts = {}
    for decoder in ("ar", "speculative", "diffusion", "mock_ar", "twotower.decoding.MaskDiffusion"):
        block = {} if decoder in ("ar", "mock_ar") else {"block_size": 8}
        lm = TwoTowerEvalLM(pretrained=str(DEFAULT), decoder=decoder, batch_size=2, **block)
        texts[decoder] = lm.generate_until(requests("generate_until", gen), disable_tqdm=True)
        assert all(isinstance(t, str) and "\n\n" not in t for t in texts[decoder])
    assert texts["speculative"] == texts["ar"]  # lossless
    assert texts["twotower.decoding.MaskDiffusion"] == texts["diffusion"]


# ---- bad model_args -----------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(decoder="beam"), "unknown decoder 'beam': use one of"),
    (dict(decoder="os.path.join"), "unknown decoder 'os.path.join'"),
    (dict(pretrained="/nowhere/at/all"), "no two-tower checkpoint there"),
    (dict(pretrained=None), "needs model_args pretrained=DIR"),
    (dict(decoder="mock_ar", threshold=0.8), "MockAR takes no threshold"),
    (dict(decoder="ar", block_size=8), r"Autoregressive takes no setting\(s\) \['block_size'\]"),
    (dict(dtype="int4"), "dtype='int4'"),
    (dict(batch_size="auto"), "batch_size must be a positive integer"),
    (dict(tokenizer="/nowhere/tok"), "use 'byte' or a local Hugging Face tokenizer folder"),
    (dict(temperature=1.0), r"unknown model_args \['temperature'\]"),
])
def test_bad_model_args_fail_with_a_clear_message(kwargs, match):
    args = dict(pretrained=str(DEFAULT))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        TwoTowerEvalLM(**args)


def test_device_defaults_to_the_one_that_exists(caplog):
    from twotower.evaluation.harness import default_device

    with caplog.at_level("WARNING"):
        lm = TwoTowerEvalLM(pretrained="embedded")  # a built-in name, like the README's command
    assert lm.device.type == ("cuda" if torch.cuda.is_available() else "cpu") == default_device().split(":")[0]
    assert not [r for r in caplog.records if "CUDA" in r.getMessage()]


def test_build_decoder_maps_settings_onto_the_decoder():
    d = build_decoder("diffusion", threshold=0.7, block_size=8, steps_per_block=4, temperature=0.5, top_k=3)
    assert (d.block_size, d.steps_per_block, d.sampler.threshold, d.temperature) == (8, 4, 0.7, 0.5)
    s = build_decoder("speculative", block_size=8, draft_steps=2)
    assert (s.block_size, s.draft_steps) == (8, 2)


# ---- lm_eval's own CLI --------------------------------------------------------------------------

TASKS = {
    "tt_mc": """
        task: tt_mc
        custom_dataset: !function tt_utils.load_mc
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{context}}"
        doc_to_choice: choices
        doc_to_target: gold
        target_delimiter: ""
        metric_list:
          - metric: acc
    """,
    "tt_roll": """
        task: tt_roll
        custom_dataset: !function tt_utils.load_roll
        test_split: test
        output_type: loglikelihood_rolling
        doc_to_text: ""
        doc_to_target: "{{text}}"
        metric_list:
          - metric: word_perplexity
          - metric: bits_per_byte
    """,
    "tt_gen": """
        task: tt_gen
        custom_dataset: !function tt_utils.load_gen
        test_split: test
        output_type: generate_until
        doc_to_text: "{{prompt}}"
        doc_to_target: "{{answer}}"
        target_delimiter: ""
        generation_kwargs:
          until: ["\\n\\n"]
          max_gen_toks: 16
        metric_list:
          - metric: exact_match
    """,
}
UTILS = """
    import datasets

    def _d(rows):
        return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})

    def load_mc(**_):
        return _d([{"context": "def add(a, b):\\n    return", "choices": [" a + b", " banana"], "gold": 0},
                   {"context": "import os\\nimport", "choices": [" sys", " ???"], "gold": 0},
                   {"context": "for i in", "choices": [" range(10):", " zzz"], "gold": 0}])

    def load_roll(**_):
        return _d([{"text": "def f(x):\\n    return x\\n"}, {"text": "import os\\nimport sys\\n"}])

    def load_gen(**_):
        return _d([{"prompt": "def f(x):\\n", "answer": "    return x"}, {"prompt": "import os\\n", "answer": "import sys"}])
"""


def test_lm_eval_cli_runs_every_output_type(tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tt_utils.py").write_text(textwrap.dedent(UTILS))
    for name, body in TASKS.items():
        (tasks / f"{name}.yaml").write_text(textwrap.dedent(body))
    out = tmp_path / "out"
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, "-m", "twotower.evaluation", "--model", "twotower", "--model_args",
           f"pretrained={DEFAULT},decoder=speculative", "--tasks", "tt_mc,tt_roll,tt_gen", "--include_path",
           str(tasks), "--batch_size", "2", "--output_path", str(out), "--log_samples"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the console summary ends with the generation speed; no device warning on a machine without CUDA
    assert "tokens per forward" in proc.stdout.splitlines()[-1], proc.stdout[-2000:]
    if not torch.cuda.is_available():
        assert "CUDA is not available" not in proc.stdout + proc.stderr
    res = json.loads(next(out.rglob("results_*.json")).read_text())
    r = res["results"]
    assert 0 <= r["tt_mc"]["acc,none"] <= 1 and r["tt_gen"]["exact_match,none"] in (0.0, 0.5, 1.0)
    assert math.isfinite(r["tt_roll"]["word_perplexity,none"]) and r["tt_roll"]["bits_per_byte,none"] > 0
    assert res["config"]["twotower_decoder"].startswith("Speculative")
    assert res["config"]["twotower_tokens_per_forward"] >= 1
    assert f"{res['config']['twotower_tokens_per_forward']:.2f} tokens per forward" in proc.stdout
    # The CLI's scores are this model's: recompute the multiple-choice accuracy in process.
    lm = TwoTowerEvalLM(pretrained=str(DEFAULT))
    docs = [json.loads(line)["doc"] for line in next(out.rglob("samples_tt_mc_*.jsonl")).read_text().splitlines()]
    correct = 0
    for doc in docs:
        ll = lm.loglikelihood(requests("loglikelihood", [(doc["context"], c) for c in doc["choices"]]),
                              disable_tqdm=True)
        correct += int(max(range(len(ll)), key=lambda i: ll[i][0]) == doc["gold"])
    assert r["tt_mc"]["acc,none"] == pytest.approx(correct / len(docs))


def test_the_shipped_suite_runs_through_the_readme_command(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "twotower.evaluation", "--model", "twotower", "--model_args",
           "pretrained=embedded,decoder=speculative", "--tasks", "twotower_nextline,twotower_complete",
           "--include_path", "benchmarks/eval", "--batch_size", "2", "--limit", "2", "--output_path", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, HF_DATASETS_OFFLINE="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    assert set(r) == {"twotower_nextline", "twotower_complete"}
    assert 0 <= r["twotower_complete"]["edit_similarity,none"] <= 1 and 0 <= r["twotower_nextline"]["acc,none"] <= 1
