"""The argument checks `Decoder.generate` runs once per call, before any forward.

Kept apart from `base` (the `Decoder` protocol) so that callers that only need a check, such as the
server (device placement) or `twotower.testing` (the default pad id), import it without the decoder
machinery. Each check names the bad value and the fix.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..validation import check_token, device_of

__all__ = ["describe_rows", "same_device", "default_pad_id", "length_limit", "check_prompt", "eos_ids",
           "denoiser_placement"]


def describe_rows(mask: Tensor, limit: int = 8) -> str:
    """The indices of the True rows of `mask`, the first `limit` of them, for error messages."""
    rows = mask.nonzero().flatten().tolist()
    return str(rows[:limit]) + (" ..." if len(rows) > limit else "")


def same_device(a: torch.device, b: torch.device) -> bool:
    """Device equality where a missing index means the current one ("cuda" == "cuda:0" on device 0)."""
    if a.type != b.type:
        return False
    if a.type == "cpu":
        return True

    def index(d: torch.device) -> int:
        if d.index is not None:
            return d.index
        return torch.cuda.current_device() if d.type == "cuda" else 0

    return index(a) == index(b)


def default_pad_id(config, eos_token_id) -> int:
    """config.pad_token_id, else the (first) EOS id, else 0."""
    pad = getattr(config, "pad_token_id", None)
    if pad is None:
        pad = eos_token_id if eos_token_id is not None else getattr(config, "eos_token_id", None)
    if isinstance(pad, (list, tuple)):
        pad = pad[0] if pad else None
    return 0 if pad is None else int(pad)


def eos_ids(eos_token_id: int | Sequence[int] | None, vocab_size: int, device) -> Tensor | None:
    """The EOS id(s) as a (k,) long tensor, or None when generation should not stop early."""
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not ids:
        return None
    for i in ids:
        check_token("eos_token_id", i, vocab_size)
    return torch.tensor(ids, dtype=torch.long, device=device)


def length_limit(context: torch.nn.Module) -> tuple[int | None, str]:
    """(the most positions the context tower runs, the limit's name for messages): its `max_length`,
    which is max_position_embeddings or a shorter sliding window; (None, "") when there is none."""
    positions = getattr(context.config, "max_position_embeddings", None)
    limit = getattr(context, "max_length", positions)  # a plug-in tower need not define max_length
    if limit is None:
        return None, ""
    return limit, "max_position_embeddings" if limit == positions else "sliding_window"


def check_prompt(limit: tuple[int | None, str], input_ids: Tensor, attention_mask: Tensor | None,
                  max_new_tokens: int, device, mask_token_id: int | None = None) -> tuple[Tensor, Tensor | None]:
    """Validate a (left-padded) prompt batch; returns (input_ids long, bool mask or None) on `device`.
    limit: (positions, name) from `length_limit`: prompt + max_new_tokens must fit, or it is refused
    here rather than by the tower mid-generation."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a (batch, length) tensor, got {shape}")
    if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    B, T = input_ids.shape
    if B == 0 or T == 0:
        raise ValueError(f"empty prompt: input_ids has shape {(B, T)}; every row needs at least one token")
    limit, name = limit
    if limit is not None and T + max_new_tokens > limit:
        raise ValueError(
            f"prompt length {T} + max_new_tokens {max_new_tokens} = {T + max_new_tokens} exceeds the model's "
            f"{name} = {limit}; shorten the prompt or lower max_new_tokens"
        )
    # long: the embedding lookup and the [MASK] comparison below need one integer dtype.
    input_ids = input_ids.to(device=device, dtype=torch.long)
    valid = None
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor) or tuple(attention_mask.shape) != (B, T):
            shape = tuple(attention_mask.shape) if isinstance(attention_mask, Tensor) else type(attention_mask).__name__
            raise ValueError(f"attention_mask has shape {shape}, expected {(B, T)} like input_ids")
        valid = attention_mask.to(device).bool()
        empty = ~valid.any(-1)
        if bool(empty.any()):
            raise ValueError(f"empty prompt: row(s) {describe_rows(empty)} of attention_mask have no real token")
        # Generated tokens are appended on the right, so padding must sit on the left.
        right_pad = (valid[:, 1:] < valid[:, :-1]).any(-1)
        if bool(right_pad.any()):
            raise ValueError(f"attention_mask must use left padding (zeros before the prompt); row(s) "
                             f"{describe_rows(right_pad)} have a 0 after a 1")
        # One host sync per call (not per step): an unpadded batch skips the key masks in every forward.
        if bool(valid.all()):
            valid = None  # lets the towers take their unpadded fast path
    if mask_token_id is not None:
        has_mask = input_ids == mask_token_id
        if valid is not None:
            # Padding may use any id, the [MASK] id included: only real prompt tokens are refused.
            has_mask &= valid
        bad = has_mask.any(-1)
        if bool(bad.any()):
            raise ValueError(f"the prompt of row(s) {describe_rows(bad)} contains the [MASK] token id {mask_token_id}, "
                             "which is reserved for the positions the denoiser fills; remove it from the prompt "
                             "(or pass the model's real mask_token_id)")
    return input_ids, valid


def denoiser_placement(denoiser, ctx_device: torch.device, denoiser_device) -> tuple[torch.device, bool]:
    """(device the denoiser runs on, whether its cache is a mirror of the context cache)."""
    actual = device_of(denoiser)
    if denoiser_device is None:
        return actual, not same_device(actual, ctx_device)
    wanted = torch.device(denoiser_device)
    if not same_device(wanted, actual):
        raise ValueError(f"denoiser_device={wanted} but the denoiser's weights are on {actual}; move the denoiser "
                         "first (TwoTowerLM.place_towers_on_devices) or leave denoiser_device=None")
    # An explicit device always uses the mirror, even when it equals the context's (tests, debugging).
    return actual, True
