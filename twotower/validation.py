"""Argument checks shared by the whole package, one home each, so every message reads the same.

Every check returns the value it accepted (converted where it says so) or raises a ValueError that
names the argument, the bad value and what is accepted. This module imports nothing from
``twotower``: it sits at the bottom of the import graph, so any module may use it without a cycle.
"""

from __future__ import annotations

import math

import torch

__all__ = ["FLOAT_DTYPES", "check_draft_vocab", "check_float", "check_int", "check_positive", "check_token", "device_of",
           "parse_dtype"]

# The dtypes a model may be loaded or generated in, by the names configs and CLIs use.
FLOAT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_int(name: str, value, minimum: int = 1, *, optional: bool = False) -> int | None:
    """`value` as an int >= `minimum` (None passes when `optional`); bools are refused, though ints."""
    if optional and value is None:
        return None
    # bool is a subclass of int: True would otherwise pass as 1 (a YAML typo such as `steps: yes`).
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}{' or None' if optional else ''}, got {value!r}")
    return value


def _condition(low: float, high: float, low_open: bool, high_open: bool) -> str:
    """The accepted range in words: "in (0, 1]", or "> 0" / ">= 0" when it has no upper bound."""
    if high == math.inf:
        return f"{'>' if low_open else '>='} {low:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


def check_float(name: str, value, *, low: float, high: float = math.inf, low_open: bool = False,
                high_open: bool = False) -> float:
    """`value` as a float in the interval from `low` to `high` (each end closed unless `*_open`).

    Bools and non-numbers are refused, and NaN fails every comparison, so it is refused too.
    The message names the parameter and the range, e.g. "threshold must be in (0, 1], got 1.5".
    """
    condition = _condition(low, high, low_open, high_open)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number {condition}, got {value!r}")
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below):
        raise ValueError(f"{name} must be {condition}, got {value!r}")
    return float(value)


def check_positive(name: str, value, *, unit: str = "") -> float:
    """`value` as a number > 0 (e.g. a learning rate or a size); `unit` is named in the message."""
    try:
        return check_float(name, value, low=0.0, low_open=True)
    except ValueError:
        # from None: check_float's message (with its own wording) would only repeat this one.
        raise ValueError(f"{name} must be a number{' of ' + unit if unit else ''} > 0, got {value!r}") from None


def check_token(name: str, value, vocab_size: int) -> int:
    """`value` as a token id in [0, vocab_size)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
        raise ValueError(f"{name} must be a token id in [0, {vocab_size}), got {value!r}")
    return value


def check_draft_vocab(ids, vocab_size: int) -> torch.Tensor:
    """A draft vocabulary (a 1-D sequence or tensor of token ids in [0, vocab_size)) as sorted, distinct int64."""
    try:
        t = torch.as_tensor(ids)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"draft_vocab must be a 1-D list or tensor of token ids, got {type(ids).__name__}") from e
    if t.dim() != 1 or t.numel() == 0 or t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"draft_vocab must be a non-empty 1-D list or tensor of integer token ids, got "
                         f"{t.dtype} of shape {tuple(t.shape)} (twotower.tokenizers.frequent_tokens builds one)")
    bad = t[(t < 0) | (t >= vocab_size)]
    if bad.numel():
        raise ValueError(f"draft_vocab must hold token ids in [0, {vocab_size}), got {bad[:5].tolist()}")
    return torch.unique(t.long())  # sorted


def check_skip_layers(layers, num_layers: int | None = None) -> frozenset[int]:
    """Layer indices a denoiser skips (an iterable of distinct ints in [0, num_layers), leaving at least
    one layer) as a frozenset. num_layers None (the depth not known yet): only non-negative ints."""
    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        raise ValueError(f"skip_layers must be a list of layer indices, got {layers!r}")
    layers = list(layers)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise ValueError(f"skip_layers must hold integer layer indices, got {layers!r}")
    bad = [i for i in layers if i < 0 or (num_layers is not None and i >= num_layers)]
    if bad:
        top = "" if num_layers is None else f", below the tower's {num_layers} layers"
        raise ValueError(f"skip_layers must be layer indices from 0{top}; got {bad}")
    if num_layers is not None and len(set(layers)) >= num_layers:
        raise ValueError(f"skip_layers {sorted(set(layers))} skips all {num_layers} layers; keep at least one")
    return frozenset(layers)


def parse_dtype(name: str, value, allowed: dict[str, torch.dtype] | None = FLOAT_DTYPES, *,
                purpose: str = "") -> torch.dtype:
    """A dtype name ("bfloat16", "torch.bfloat16") or a torch dtype -> the torch dtype.

    allowed: the accepted names (default `FLOAT_DTYPES`); None accepts any floating torch dtype.
    purpose: words after "is not supported" in the message, e.g. " for a GGUF import".
    """
    key = str(value).removeprefix("torch.")  # str(torch.bfloat16) is "torch.bfloat16"; YAML may write either
    if allowed is None:
        resolved = getattr(torch, key, None) if isinstance(value, (str, torch.dtype)) else None
        if isinstance(resolved, torch.dtype) and resolved.is_floating_point:
            return resolved
        accepted = "a floating torch dtype such as 'bfloat16' or 'float32'"
    elif isinstance(value, (str, torch.dtype)) and key in allowed:
        return allowed[key]
    else:
        accepted = f"one of {sorted(allowed)}"
    raise ValueError(f"{name} {value!r} is not supported{purpose}; {name} must be {accepted}")


def device_of(module: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (cpu for a module without any)."""
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
