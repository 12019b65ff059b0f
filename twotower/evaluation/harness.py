"""An lm-evaluation-harness model for two-tower models (`--model twotower`).

    twotower-eval --model twotower \
        --model_args pretrained=embedded,decoder=speculative \
        --tasks twotower_nextline --include_path benchmarks/eval

Scores come from two places:
* `loglikelihood` / `loglikelihood_rolling` are exact: the context tower is a causal LM, so a
  continuation's log-probability is one teacher-forced forward (no Monte-Carlo estimate, unlike
  diffusion LMs without an AR tower). Batched with left padding; `is_greedy` says whether every
  continuation token is the argmax.
* `generate_until` runs any `twotower.decoding.Decoder` (speculative, mask diffusion, mock-AR,
  AR, or a class_path), batched, with `until` as stop strings checked where the decoder commits
  (a row whose text holds one leaves the batch) and the text cut at the earliest one.

Tokens per forward and tokens per second of the generation requests are logged, printed under the
results table by `twotower-eval`, and added to the results' config (`get_model_info`). Prompts are
encoded by `prompting.encode_prompt`, as in predict and serve.

`model_args`: pretrained=DIR (a two-tower checkpoint directory, or a built-in model name such as
`embedded`, see `twotower.hub`); decoder=speculative | diffusion | mock_ar | ar | tolerant | any
name registered with `decoding.register_decoder` | a Decoder class_path; threshold, block_size,
steps_per_block, draft_steps (the decoder's settings; threshold is diffusion's ConfidenceThreshold);
dtype=float32 | bfloat16 | float16; device (default cuda:0 when CUDA is available, else cpu); batch_size; tokenizer=byte | a local
Hugging Face tokenizer folder (default: the checkpoint's own, `tokenizers.tokenizer_for`); max_length
(default the model's context: max_position_embeddings, or a shorter sliding window).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import model_registry
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from ..decoding import Decoder, StopStrings
from ..decoding import build_decoder as registry_build_decoder
from ..hub import resolve_model
from ..model import TwoTowerLM
from ..prompting import encode_prompt
from ..tokenizers import ByteTokenizer, HFTokenizer, Tokenizer, tokenizer_for
from ..validation import parse_dtype

__all__ = ["TwoTowerEvalLM", "build_decoder", "register", "default_device", "last_speed_line"]

log = logging.getLogger(__name__)

_last_speed: dict[str, str | None] = {"line": None}  # see last_speed_line


def build_decoder(name: str, *, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                  threshold: float | None = None, **settings) -> Decoder:
    """Build a decoder from lm_eval-style settings (`decoding.build_decoder`, the one registry: a
    registered name or a class_path); settings the decoder does not take are refused."""
    return registry_build_decoder(name, threshold=threshold, temperature=temperature, top_k=top_k, top_p=top_p,
                                  **settings)


def _tokenizer_choice(choice: str | None) -> Tokenizer | None:
    """model_args tokenizer= -> a tokenizer (None: the checkpoint's own, chosen by `tokenizer_for`)."""
    if choice is None:
        return None
    if choice == "byte":
        return ByteTokenizer()
    path = Path(choice)
    if not path.is_dir():
        raise ValueError(f"tokenizer={choice!r}: use 'byte' or a local Hugging Face tokenizer folder (not found)")
    return HFTokenizer(str(path))


def default_device() -> str:
    """The device that exists: cuda:0 when CUDA is available, else cpu (lm_eval's own default is cuda:0)."""
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def _positive_int(name: str, value) -> int:
    """A model_args value as a positive int. Not `validation.check_int`: lm_eval hands model_args over
    as strings ("batch_size=4"), so "4" and 4.0 are accepted here and converted."""
    try:
        out = int(value)
    except (TypeError, ValueError):
        out = 0
    if out < 1 or isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return out


def _dtype(dtype: str | None) -> torch.dtype | None:
    """model_args dtype= -> the torch dtype, refused in the model_args style ("dtype='int4': ...")."""
    try:
        return None if dtype is None else parse_dtype("dtype", dtype)
    except ValueError as e:
        raise ValueError(f"dtype={dtype!r}: {e}") from None


class TwoTowerEvalLM(TemplateLM):
    """lm_eval model backed by a `TwoTowerLM` (see the module docstring for `model_args`)."""

    def __init__(self, pretrained: str | None = None, decoder: str = "speculative", threshold: float | None = None,
                 block_size: int | None = None, steps_per_block: int | None = None, draft_steps: int | None = None,
                 dtype: str | None = None, device: str | None = None, batch_size: int | str | None = 1,
                 tokenizer: str | None = None, max_length: int | None = None, max_batch_size: int | None = None,
                 **unknown):
        super().__init__()
        if unknown:
            raise ValueError(f"unknown model_args {sorted(unknown)} for --model twotower; it takes pretrained, decoder, "
                             "threshold, block_size, steps_per_block, draft_steps, dtype, device, batch_size, "
                             "tokenizer, max_length")
        if pretrained is None:
            raise ValueError("--model twotower needs model_args pretrained=DIR (a two-tower checkpoint directory)")
        try:
            path = resolve_model(str(pretrained), kind="two-tower checkpoint")
        except FileNotFoundError as e:
            raise ValueError(f"pretrained={pretrained!r}: no two-tower checkpoint there ({e})") from None
        if not (path / "config.json").is_file():
            raise ValueError(f"pretrained={pretrained!r}: no two-tower checkpoint there ({path / 'config.json'} is "
                             "missing); make one with `python -m twotower.cli convert` or `export`")
        torch_dtype = _dtype(dtype)
        self.settings = dict(threshold=threshold, block_size=block_size, steps_per_block=steps_per_block,
                             draft_steps=draft_steps)
        self.decoder_name = str(decoder)
        self.decoder = build_decoder(self.decoder_name, **self.settings)  # fails early on bad settings
        self.batch_size = _positive_int("batch_size", 1 if batch_size in (None, "") else batch_size)
        given = _tokenizer_choice(None if tokenizer is None else str(tokenizer))
        self.model = TwoTowerLM.from_pretrained(path, dtype=torch_dtype)
        self.model.eval().requires_grad_(False)
        self.tok = tokenizer_for(self.model, path, given)
        if device is None:
            device = default_device()
        elif str(device).startswith("cuda") and not torch.cuda.is_available():
            log.warning("device=%s but CUDA is not available: running on the CPU", device)
            device = "cpu"
        self.model.to(device)
        limit = self.model.max_length or 2048  # the sliding window where it is shorter than the positions
        self.max_length = _positive_int("max_length", max_length) if max_length is not None else int(limit)
        self.stats = {"generated_tokens": 0, "forwards": 0, "seconds": 0.0, "requests": 0}

    # ---- what TemplateLM needs ----------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_token_id

    @property
    def tokenizer_name(self) -> str:
        return type(self.tok).__name__

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Text -> ids by `prompting.encode_prompt`, the rule predict and serve use (BOS as the tokenizer
        does it: always for byte-level models); add_special_tokens=False leaves special tokens out, as
        lm_eval asks for continuations and rolling windows (which start from `prefix_token_id`)."""
        return encode_prompt(self.tok, string, add_bos=False if add_special_tokens is False else None)

    def tok_decode(self, ids) -> str:
        return self.tok.decode(list(ids))

    @property
    def device(self) -> torch.device:
        return self.model.context_device

    # ---- exact log-likelihoods ----------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: [(key, context ids, continuation ids)] -> [(sum log p(continuation), is_greedy)].

        Each row is (context + continuation)[:-1], left-truncated to max_length and left-padded in
        its batch; the continuation's log-probabilities are read from the last len(continuation)
        positions. Rows are batched longest first (less padding), results returned in order.
        """
        rows = []
        for _, ctx, cont in requests:
            if not cont:
                raise ValueError("lm_eval asked for the log-likelihood of an empty continuation")
            full = (list(ctx) + list(cont))[-(self.max_length + 1):]
            n = min(len(cont), len(full) - 1)  # a continuation longer than the window keeps its end
            rows.append((full[:-1], full[-n:]))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        for start in tqdm(range(0, len(order), self.batch_size), disable=disable_tqdm, desc="twotower loglikelihood"):
            idx = order[start: start + self.batch_size]
            for i, res in zip(idx, self._score([rows[i] for i in idx])):
                out[i] = res
        return out  # type: ignore[return-value]

    @torch.inference_mode()
    def _score(self, batch: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        T = max(len(inp) for inp, _ in batch)
        ids = torch.full((len(batch), T), self.tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(batch), T, dtype=torch.long)
        for r, (inp, _) in enumerate(batch):
            ids[r, T - len(inp):] = torch.tensor(inp)
            mask[r, T - len(inp):] = 1
        device = self.device
        logits = self.model.context(ids.to(device), None if bool(mask.all()) else mask.to(device))  # (b, T, V)
        results = []
        for r, (_, cont) in enumerate(batch):
            n = len(cont)
            logp = torch.log_softmax(logits[r, T - n:].float(), dim=-1)  # (n, V): predictions of cont
            target = torch.tensor(cont, device=logp.device)
            total = float(logp.gather(-1, target[:, None]).sum())
            results.append((total, bool((logp.argmax(-1) == target).all())))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-string log-likelihood, scored in windows of up to max_length tokens (each token once)."""
        out = []
        for (string,) in tqdm([r.args for r in requests], disable=disable_tqdm, desc="twotower rolling"):
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(string, add_special_tokens=False), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            scores = self._loglikelihood_tokens([(None, c, t) for c, t in windows], disable_tqdm=True)
            out.append(sum(s for s, _ in scores))
        return out

    # ---- generation ---------------------------------------------------------------------------
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Generate for every request with the configured decoder, batched per gen_kwargs group."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="twotower generate_until")
        for key, idx in groups.items():
            kwargs = dict(requests[idx[0]].args[1])
            decoder, stop, max_gen = self._generation_setup(kwargs)
            contexts = {i: self.tok_encode(requests[i].args[0])[-max(1, self.max_length - max_gen):] for i in idx}
            idx = sorted(idx, key=lambda i: -len(contexts[i]))
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start: start + self.batch_size]
                for i, text in zip(chunk, self._generate([contexts[i] for i in chunk], decoder, stop, max_gen)):
                    out[i] = text
                bar.update(len(chunk))
        bar.close()
        if self.stats["requests"]:
            _last_speed["line"] = self.speed_line()
            log.info(_last_speed["line"])
        return out  # type: ignore[return-value]

    def speed_line(self) -> str:
        """The generation speed so far, in one line (`twotower-eval` prints it under lm_eval's table)."""
        per_forward, per_second = self._speed()
        return (f"twotower {self.decoder_name}: {per_forward:.2f} tokens per forward, {per_second:.1f} tokens/s "
                f"({self.stats['generated_tokens']} tokens over {self.stats['requests']} generation requests)")

    def _generation_setup(self, kwargs: dict) -> tuple[Decoder, StopStrings, int]:
        until = kwargs.pop("until", None)
        until = [self.tok_decode([self.eot_token_id])] if until is None else until
        stop = StopStrings(self.tok_decode, [until] if isinstance(until, str) else list(until))
        max_gen = _positive_int("max_gen_toks", kwargs.pop("max_gen_toks", 256))
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        if not do_sample:
            temperature = 0.0
        elif temperature == 0.0:
            temperature = 1.0
        top_k, top_p = kwargs.pop("top_k", None), kwargs.pop("top_p", None)
        if kwargs:
            log.warning("twotower ignores gen_kwargs %s", sorted(kwargs))
        decoder = build_decoder(self.decoder_name, temperature=temperature, top_k=top_k, top_p=top_p, **self.settings)
        return decoder, stop, max_gen

    def _generate(self, contexts: list[list[int]], decoder: Decoder, stop: StopStrings, max_gen: int) -> list[str]:
        T = max(len(c) for c in contexts)
        ids = torch.full((len(contexts), T), self.tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, c in enumerate(contexts):
            ids[r, T - len(c):] = torch.tensor(c)
            mask[r, T - len(c):] = 1
        max_new = max(1, min(max_gen, self.max_length - T))
        out = self.model.generate(ids, mask, decoder, max_new_tokens=max_new, eos_token_id=self.eot_token_id,
                                  stop=stop if stop else None)
        self.stats["generated_tokens"] += int(out.num_generated.sum())
        self.stats["forwards"] += int(out.nfe.sum())
        self.stats["seconds"] += out.total_seconds
        self.stats["requests"] += len(contexts)
        texts = []
        for r in range(len(contexts)):
            new = out.new_tokens[r, : int(out.num_generated[r])].tolist()
            if new and new[-1] == self.eot_token_id:
                new = new[:-1]
            texts.append(stop.truncate(self.tok_decode(new)))
        return texts

    def _speed(self) -> tuple[float, float]:
        s = self.stats
        return s["generated_tokens"] / max(1, s["forwards"]), s["generated_tokens"] / max(s["seconds"], 1e-9)

    def get_model_info(self) -> dict:
        """Extra fields for lm_eval's results config: the decoder and the generation speed."""
        info = {"twotower_decoder": repr(self.decoder), "twotower_tokenizer": self.tokenizer_name}
        if self.stats["requests"]:
            per_forward, per_second = self._speed()
            info.update(twotower_tokens_per_forward=round(per_forward, 4), twotower_tokens_per_second=round(per_second, 2),
                        twotower_generated_tokens=self.stats["generated_tokens"])
        return info


def last_speed_line() -> str | None:
    """The speed line of the last model that generated (None if none did): lm_eval's CLI returns neither
    the model nor the results, so `twotower-eval` reads the summary from here."""
    return _last_speed["line"]


def register() -> None:
    """Register `twotower` with the installed lm_eval (harnesses that read no entry points)."""
    if "twotower" not in model_registry:
        model_registry.register("twotower")(TwoTowerEvalLM)
