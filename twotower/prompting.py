"""How a prompt becomes token ids: one rule for `predict`, `serve`, the eval harness and `TwoTowerLM.encode`.

    encode_prompt(tokenizer, "def fibonacci(n):")                      # text
    encode_prompt(tokenizer, [{"role": "user", "content": "Hi"}])      # chat messages

* A text prompt gets BOS exactly when the tokenizer puts one before text (`Tokenizer.adds_bos`):
  the byte tokenizer does (the embedded model was trained with BOS before every document, and
  without it writes only whitespace); a Hugging Face tokenizer follows its own setting, i.e. what
  `tokenizer(text, add_special_tokens=True)` does (Llama's add `<s>`, SmolLM2's add nothing).
  `add_bos=True / False` overrides that for text prompts.
* Chat messages (a list of {"role", "content"} dicts, OpenAI's shape) go through the tokenizer's chat
  template with the generation prompt (`Tokenizer.apply_chat_template`); the template decides every
  special token. A tokenizer without a template raises a ValueError that says what to send instead.

Why one function: the server used to encode without BOS while `predict` added one, so the same prompt
gave different text through the two (issue 20).
"""

from __future__ import annotations

from .tokenizers import Tokenizer

__all__ = ["Prompt", "encode_prompt", "is_chat", "check_messages"]

# A text prompt, or chat messages [{"role": ..., "content": ...}, ...].
Prompt = str | list


def is_chat(prompt: Prompt) -> bool:
    """Whether `prompt` is chat messages (a list) rather than text."""
    return isinstance(prompt, list)


def check_messages(messages) -> list[dict]:
    """Chat messages as given, after checking their shape: a non-empty list of {"role": str,
    "content": str} dicts (other keys are passed on to the template). Raises ValueError naming the
    first bad message."""
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"messages must be a non-empty list of {{\"role\", \"content\"}} objects, "
                         f"got {messages!r:.80}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"messages[{i}] must be an object with a string \"role\" and a string \"content\", "
                             f"got {m!r:.80}")
    return messages


def encode_prompt(tokenizer: Tokenizer, prompt: Prompt, *, add_bos: bool | None = None) -> list[int]:
    """The ids a model is given for `prompt` (text or chat messages; see the module docstring).

    add_bos: None follows the tokenizer (`Tokenizer.adds_bos`); True / False force it, for text
    prompts only (a chat template places its own special tokens).
    """
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, add_bos=tokenizer.adds_bos if add_bos is None else add_bos)
    if is_chat(prompt):
        return tokenizer.apply_chat_template(check_messages(prompt))
    raise TypeError(f"a prompt is a string or a list of chat messages, got {type(prompt).__name__} {prompt!r:.80}")
