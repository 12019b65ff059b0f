"""Instructions the backbone writes itself, for chat rows that look like real chat use.

A chat model continues the opening of a user turn (its chat template up to where the user's message
would begin, the default system prompt included) with a plausible user message, and ends it with its
EOS. Sampling that opening many times gives varied, natural requests without any instruction
dataset (the Magpie method, arXiv 2406.08464). `DistilledDataModule(self_instruct=...)` uses them
for some of its chat rows: the snippet templates ask only about a text snippet ("Summarize this"),
while users ask for tips, poems, recipes and code, and a denoiser that never saw such answers drafts
them poorly.

    prefix = user_turn_prefix(tokenizer)            # e.g. "<|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\n"
    texts  = write_instructions(context, tokenizer, 64, generator=torch.Generator().manual_seed(0))
"""

from __future__ import annotations

import sys

import torch
from tqdm.auto import tqdm

from ..decoding import Autoregressive, Towers
from ..tokenizers import Tokenizer
from ..towers.base import ContextTowerBase
from ..validation import check_float, check_int, device_of

__all__ = ["user_turn_prefix", "write_instructions"]

# Stands in for a user's message while the template is rendered; cannot occur in a real template.
_SENTINEL = "\x00twotower-user-message\x00"


def user_turn_prefix(tokenizer: Tokenizer) -> list[int]:
    """Token ids of the tokenizer's chat template rendered up to where a lone user message begins.

    Raises ValueError when the tokenizer has no chat template, or when its template does not show the
    user's message verbatim (then there is no place where a message begins)."""
    hf = getattr(tokenizer, "hf", None)
    if hf is None or not getattr(hf, "chat_template", None):
        raise ValueError(f"self-written instructions need a tokenizer with a chat template; {tokenizer!r} has "
                         "none (set self_instruct: 0)")
    text = hf.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False, add_generation_prompt=False)
    if text.count(_SENTINEL) != 1:
        raise ValueError(f"the chat template of {tokenizer!r} does not render a user message verbatim, so no user "
                         "turn can be opened for the backbone to write (set self_instruct: 0)")
    return list(hf.encode(text.split(_SENTINEL)[0], add_special_tokens=False))


def write_instructions(context: ContextTowerBase, tokenizer: Tokenizer, n: int, *, max_tokens: int = 64,
                       temperature: float = 1.0, top_p: float = 0.95, tries: int = 4, batch_size: int = 64,
                       generator: torch.Generator | None = None, progress: bool = True) -> list[str | None]:
    """n user messages sampled from `context` after `user_turn_prefix`, each ended by the model's EOS.

    A sample that reaches max_tokens without EOS, or is blank once stripped, is drawn again, up to
    `tries` rounds; a message still missing after that is None (the caller picks a fallback), so a
    model that rarely ends its turns cannot stall data making. Seeded by `generator` (on the context
    tower's device), the same messages for the same seed."""
    for name, value in [("n", n), ("max_tokens", max_tokens), ("tries", tries), ("batch_size", batch_size)]:
        check_int(name, value, 0 if name == "n" else 1)
    check_float("temperature", temperature, low=0.0, low_open=True)  # a greedy turn is one message n times
    check_float("top_p", top_p, low=0.0, high=1.0, low_open=True)
    prefix = torch.tensor([user_turn_prefix(tokenizer)], device=device_of(context))
    eos = tokenizer.eos_token_id
    decoder = Autoregressive(temperature=temperature, top_p=top_p)
    towers = Towers(context, pad_token_id=tokenizer.pad_token_id)
    out: list[str | None] = [None] * n
    bar = tqdm(total=n, desc="writing instructions", unit="msg", file=sys.stderr, disable=None if progress else True)
    for _ in range(tries):
        missing = [i for i, text in enumerate(out) if text is None]
        for lo in range(0, len(missing), batch_size):
            rows = missing[lo:lo + batch_size]
            # One prompt for every row: no padding, the towers' unpadded path.
            res = decoder.generate(towers, prefix.expand(len(rows), -1), None, max_new_tokens=max_tokens,
                                   eos_token_id=eos, generator=generator)
            for r, i in enumerate(rows):
                k = int(res.num_generated[r])
                ids = res.new_tokens[r, :k].tolist()
                if ids and ids[-1] == eos:  # the model closed its turn; a cut-off message is not kept
                    out[i] = tokenizer.decode(ids[:-1]).strip() or None
                    bar.update(out[i] is not None)
    bar.close()
    return out
