"""The benchmark's modes: a name, the decoder that generates, and what the report needs to know.

A mode of ours holds a `twotower.decoding.Decoder` instance and generation is
`mode.decoder.generate(model, ids, mask, max_new_tokens=N, eos_token_id=None)`; the baseline
`hf_generate` holds no decoder (the harness calls transformers' `generate`). Every decoder is
greedy (temperature 0), so runs are deterministic and comparable token for token.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field

from twotower.decoding import Autoregressive, Decoder, MaskDiffusion, MockAR, Speculative, TolerantSpeculative
from twotower.samplers import ConfidenceThreshold, FrontierRun, Sampler

__all__ = ["Mode", "ar", "hf_generate", "mock_ar", "diffusion", "speculative", "BASE_MODES", "DEFAULT_MODES",
           "speculative_batch", "frontier", "tolerant", "FULL_MODES", "SMOKE_MODES", "GROUPS", "from_class_path", "split_modes", "parse_modes"]


@dataclass(frozen=True)
class Mode:
    """One way of generating.

    name: the mode's name in tables, JSON and `--modes`.
    kind: "ar" (the reference), "hf" (transformers' greedy `generate`, the baseline), "mock_ar",
        "diffusion", "speculative" or "other" (a decoder by class_path of none of those classes);
        the report, the profile and the JSON group by it.
    decoder: the decoder that generates (None for "hf").
    description: one line for the report.
    threshold / block: the diffusion threshold and the block size, where the mode has them.
    """

    name: str
    kind: str
    decoder: Decoder | None = field(compare=False)
    description: str
    threshold: float | None = None
    block: int | None = None

    @property
    def uses_denoiser(self) -> bool:
        """Whether the mode runs the denoiser tower (its parameters count towards its memory)."""
        return self.decoder is not None and self.decoder.uses_denoiser


def ar() -> Mode:
    return Mode("ar", "ar", Autoregressive(), "AR (ours: context tower, cached)")


def hf_generate() -> Mode:
    return Mode("hf_generate", "hf", None, "transformers greedy generate")


def mock_ar() -> Mode:
    # The released mock-AR decoder: one clean token per denoiser forward, no blocks. (Until the
    # decoders refactor this mode was MaskDiffusion with the samplers.MockAR commit policy.)
    return Mode("mock_ar", "mock_ar", MockAR(), "mock-AR (released: two towers, 1 token / denoiser forward)")


def diffusion(threshold: float, block: int) -> Mode:
    # steps_per_block = block: the threshold alone sets the pace (it can take one token a step).
    dec = MaskDiffusion(sampler=ConfidenceThreshold(threshold), block_size=block, steps_per_block=block)
    return Mode(f"diff_t{threshold:g}_b{block}", "diffusion", dec,
                f"mask diffusion, ConfidenceThreshold({threshold:g}), block {block}", threshold, block)


def speculative(block: int) -> Mode:
    return Mode(f"spec_b{block}", "speculative", Speculative(block_size=block),
                f"speculative: 1-forward denoiser draft + context-tower verification, block {block}", None, block)


def speculative_batch(block: int, batch_block: int) -> Mode:
    return Mode(f"spec_b{block}_bb{batch_block}", "speculative",
                Speculative(block_size=block, batch_block_size=batch_block),
                f"speculative, drafts of {batch_block} while rows share the batch, {block} alone (same output as AR)",
                None, block)


def frontier(min_joint: float, block: int) -> Mode:
    dec = MaskDiffusion(sampler=FrontierRun(min_joint), block_size=block, steps_per_block=block)
    return Mode(f"diff_frontier{min_joint:g}_b{block}", "diffusion", dec,
                f"mask diffusion, FrontierRun({min_joint:g}) (left-to-right runs), block {block}", None, block)


def tolerant(tolerance: float, block: int) -> Mode:
    return Mode(f"tolerant{tolerance:g}_b{block}", "speculative", TolerantSpeculative(tolerance, block_size=block),
                f"TolerantSpeculative({tolerance:g}): speculative that also keeps drafts the context tower gives "
                f">= {tolerance:g} x its top probability (not lossless), block {block}", None, block)


BASE_MODES = [ar(), hf_generate(), mock_ar()]
# The default run: the baselines, diffusion at three thresholds (0.8 is the headline) and speculative
# decoding, all at block 16. Every other mode stays selectable (--modes all, or by name).
DEFAULT_MODES = BASE_MODES + [diffusion(t, 16) for t in (0.5, 0.8, 0.9)] + [frontier(0.5, 16), speculative(16),
                                                                          speculative_batch(16, 8), tolerant(0.5, 16)]
FULL_MODES = BASE_MODES + [diffusion(t, 16) for t in (0.5, 0.7, 0.8, 0.9, 0.95)] + \
    [diffusion(0.8, b) for b in (4, 8, 32)] + [frontier(m, 16) for m in (0.5, 0.7)] + [speculative(16), speculative_batch(16, 8), tolerant(0.5, 16)]
SMOKE_MODES = BASE_MODES + [diffusion(0.5, 16), diffusion(0.8, 16), diffusion(0.8, 4), speculative(16)]
GROUPS = {"default": DEFAULT_MODES, "all": FULL_MODES}

SPEC_HELP = ("a listed name, diff_t<THRESHOLD>_b<BLOCK>, spec_b<BLOCK>, a group (default, all), "
             "diff[_b<BLOCK>]:<sampler class_path>[:<json init args>] (MaskDiffusion with that sampler, block 16 "
             "unless _b<BLOCK>), or decoder:<Decoder class_path>[:<json init args>]; NAME=<spec> names the mode")


def _from_name(name: str) -> Mode | None:
    """diff_t<T>_b<S> / spec_b<S> -> its Mode; None when the name is neither (or its numbers do not parse)."""
    try:
        if name.startswith("spec_b"):
            args, make = (int(name.removeprefix("spec_b")),), speculative
        elif name.startswith("diff_t") and name.count("_b") == 1:
            t, b = name.removeprefix("diff_t").split("_b")
            args, make = (float(t), int(b)), diffusion
        else:
            return None
    except ValueError:
        return None
    try:
        return make(*args)
    except ValueError as err:  # the decoder or sampler refuses the value: its message names the fix
        raise SystemExit(f"mode {name!r}: {err}") from None


def _import_class(path: str, base: type, example: str, item: str) -> type:
    module, _, attr = path.rpartition(".")
    cls = None
    if module:
        try:
            cls = getattr(importlib.import_module(module), attr, None)
        except ImportError as err:
            raise SystemExit(f"mode {item!r}: cannot import {module!r} ({err})") from None
    if not (isinstance(cls, type) and issubclass(cls, base)):
        raise SystemExit(f"mode {item!r}: {path!r} is not the class_path of a {base.__module__}.{base.__name__} "
                         f"subclass, e.g. {example}")
    return cls


def _init_args(text: str, item: str) -> dict:
    if not text:
        return {}
    try:
        args = json.loads(text)
    except json.JSONDecodeError as err:
        raise SystemExit(f"mode {item!r}: the init args {text!r} are not JSON ({err}); write them as a JSON "
                         'object, e.g. {"threshold": 0.8}') from None
    if not isinstance(args, dict):
        raise SystemExit(f"mode {item!r}: the init args must be a JSON object (keyword arguments), got {text!r}")
    return args


def _short(args: dict) -> str:
    return "" if not args else "(" + ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                                              for k, v in args.items()) + ")"


def _kind_of(decoder: Decoder) -> str:
    for cls, kind in ((Speculative, "speculative"), (MaskDiffusion, "diffusion"), (MockAR, "mock_ar")):
        if isinstance(decoder, cls):
            return kind
    return "other"  # Autoregressive subclasses included: "ar" is the reference mode only


def from_class_path(item: str) -> Mode | None:
    """`[NAME=]diff[_b<S>]:<Sampler class_path>[:<json>]` or `[NAME=]decoder:<Decoder class_path>[:<json>]`
    -> its Mode; None when `item` has neither form.

    diff: `MaskDiffusion(sampler=cls(**json), block_size=S, steps_per_block=S)`, S = 16 unless given,
    as for the diff_t<T>_b<S> modes. decoder: `cls(**json)`, any `twotower.decoding.Decoder`; its
    kind (speculative, diffusion, mock_ar) follows its class, so the report and the profile treat it
    as such. Without NAME the mode is named after the class and its arguments.
    """
    name, spec = None, item
    head = item.split(":", 1)[0]
    if "=" in head:
        name, spec = item.split("=", 1)
        if not name.strip():
            raise SystemExit(f"mode {item!r}: empty NAME before '='")
        name = name.strip()
    prefix, sep, rest = spec.partition(":")
    if not sep:
        return None
    path, _, text = rest.partition(":")
    path, text = path.strip(), text.strip()
    args = _init_args(text, item)
    if prefix == "decoder":
        cls = _import_class(path, Decoder, "twotower.decoding.Speculative", item)
        try:
            dec = cls(**args)
        except (TypeError, ValueError) as err:
            raise SystemExit(f"mode {item!r}: {cls.__name__}(**{args}) failed: {err}") from None
        return Mode(name or f"{cls.__name__}{_short(args)}", _kind_of(dec), dec,
                    f"{cls.__module__}.{cls.__qualname__}{_short(args) or '()'}", None,
                    getattr(dec, "block_size", None))
    if prefix == "diff" or prefix.startswith("diff_b"):
        try:
            block = 16 if prefix == "diff" else int(prefix.removeprefix("diff_b"))
        except ValueError:
            raise SystemExit(f"mode {item!r}: {prefix!r} is not diff or diff_b<BLOCK>") from None
        cls = _import_class(path, Sampler, "twotower.samplers.ConfidenceThreshold", item)
        try:
            sampler = cls(**args)
            dec = MaskDiffusion(sampler=sampler, block_size=block, steps_per_block=block)
        except (TypeError, ValueError) as err:
            raise SystemExit(f"mode {item!r}: {cls.__name__}(**{args}) / block {block} failed: {err}") from None
        return Mode(name or f"diff_{cls.__name__}{_short(args)}_b{block}", "diffusion", dec,
                    f"mask diffusion, {cls.__name__}{_short(args) or '()'}, block {block}",
                    getattr(sampler, "threshold", None), block)
    return None


def split_modes(spec: str) -> list[str]:
    """`--modes` split on the commas outside JSON brackets and strings: `a,diff:x.Y:{"p":1,"q":2}` ->
    ["a", 'diff:x.Y:{"p":1,"q":2}']."""
    items, depth, quote, cur = [], 0, False, []
    for i, ch in enumerate(spec):
        if quote:
            quote = not (ch == '"' and spec[i - 1] != "\\")
        elif ch == '"':
            quote = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append("".join(cur))
            cur = []
            continue
        cur.append(ch)
    items.append("".join(cur))
    if quote or depth:
        raise SystemExit(f"--modes {spec!r}: unbalanced brackets or quotes in a mode's JSON init args")
    return [s.strip() for s in items if s.strip()]


def parse_modes(spec: str | None, available: list[Mode]) -> list[Mode]:
    """`--modes a,b,c` -> Modes, "ar" first (the reference for retention, ratios and "= AR").

    Any diff_t<T>_b<S> or spec_b<S> name is accepted, not only the listed ones, and so are the
    class_path forms of `from_class_path` and the groups "default" / "all"; a repeated name runs
    once. None / "" -> `available` as it is (every built-in list starts with "ar").
    """
    if not spec:
        return list(available)
    known = {m.name: m for m in FULL_MODES + available}
    out: dict[str, Mode] = {}
    for item in split_modes(spec):
        group = GROUPS.get(item)
        found = list(group) if group else [known.get(item) or _from_name(item) or from_class_path(item)]
        if found[0] is None:
            raise SystemExit(f"unknown mode {item!r}; choose from {', '.join(m.name for m in FULL_MODES)} "
                             f"or {SPEC_HELP}")
        for mode in found:
            if mode is not known.get(mode.name, mode) and "=" in item.split(":", 1)[0]:
                raise SystemExit(f"mode {item!r}: the name {mode.name!r} is a built-in mode's; pick another NAME")
            out.setdefault(mode.name, mode)
    return [known["ar"]] + [m for name, m in out.items() if name != "ar"]
