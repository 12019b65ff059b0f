"""The generation loops as plain PyTorch (no Lightning): block mask diffusion and AR baseline.

`generate_diffusion` (DESIGN section 2):

    cache = context.prefill(prompt)                                   # clean prompt, once
    for each block of n = min(S, what is left) positions:
        x = [MASK] * n
        for s in 0 .. steps_per_block - 1, while x has a [MASK]:
            t       = (#[MASK] in x) / n                              # (B,), per sequence
            logits  = denoiser.forward_block(x, cache, t)             # (B, n, V); [MASK] logit -> -inf
            cand    = argmax(logits)  or  Gumbel-max of softmax(logits / temperature)
            conf    = softmax(logits)[cand]                           # untempered
            commit  = sampler(conf, cand, masked, step=s, ...)        # which masks to fill now
            x[commit] = cand[commit]
        a row's first EOS in the block ends it (pad after it)
        context.extend(cache, x)                                      # one chunked forward

`generate_speculative`: lossless two-tower decoding. The denoiser drafts a block in a few forwards
(default one); the context tower appends it provisionally in the chunked extend it runs anyway and
so scores every drafted position at once; each row keeps the longest prefix its own next-token
choice agrees with, plus that choice at the first disagreement, and the rest is rolled back without
another forward (`ContextTower.accept`). The output is the AR model's own: greedy, token for token.

`generate_ar`: the context tower alone, one token per forward (the quality / speed baseline).

The loops are vectorised over the batch and keep host syncs to about one per step (diffusion: "is
anything still masked", plus one per block when an EOS id is given; speculative: two per
iteration; AR: "has every row finished", only when an EOS id is given). Caches are preallocated
for prompt + max_new_tokens so that no step reallocates. Rows that finish (EOS, or their
max_new_tokens in speculative decoding) leave the working batch of the diffusion and speculative
loops at the next block boundary, so later forwards only pay for the rows still running; within a
block, a row whose positions are all filled takes no part (no NFE). The AR baseline keeps finished
rows in the batch (holding pad tokens).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["GenerationOutput", "generate_diffusion", "generate_speculative", "generate_ar"]

StepCallback = Callable[[int, int, Tensor, Tensor, Tensor], None]


@dataclass
class GenerationOutput:
    """What a generation call returns. All tensors live on the context tower's device.

    Attributes:
        sequences: (B, T + N) long: the input ids as given (left padding included) followed by
            the N generated positions; after a row's EOS (and beyond its last token) the pad id.
            N is the longest row's `num_generated`.
        new_tokens: (B, N) long, the generated part of `sequences`.
        num_generated: (B,) long, tokens generated per row, up to and including its EOS.
        nfe: (B,) long, network forward passes a row took part in while it still needed them:
            denoiser forwards in which the row had a [MASK] left (diffusion), context-tower
            forwards before the row finished (AR). Independent of the rest of the batch.
        tokens_per_nfe: (B,) float32, num_generated / nfe.
        seconds: (B,) float64, wall time from the call's start until the row finished.
        blocks: number of blocks denoised (0 in AR mode).
        total_seconds: wall time of the whole call.
    """

    sequences: Tensor
    new_tokens: Tensor
    num_generated: Tensor
    nfe: Tensor
    tokens_per_nfe: Tensor
    seconds: Tensor
    blocks: int = 0
    total_seconds: float = 0.0


# ---- validation ---------------------------------------------------------------------------------


def _check_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_token(name: str, value, vocab_size: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
        raise ValueError(f"{name} must be a token id in [0, {vocab_size}), got {value!r}")
    return value


def _check_temperature(temperature) -> float:
    temperature = float(temperature)
    if not temperature >= 0:  # also rejects NaN
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    return temperature


def _eos_ids(eos_token_id: int | Sequence[int] | None, vocab_size: int, device) -> Tensor | None:
    """The EOS id(s) as a (k,) long tensor, or None when generation should not stop early."""
    if eos_token_id is None:
        return None
    ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
    if not ids:
        return None
    for i in ids:
        _check_token("eos_token_id", i, vocab_size)
    return torch.tensor(ids, dtype=torch.long, device=device)


def _rows(mask: Tensor, limit: int = 8) -> str:
    rows = mask.nonzero().flatten().tolist()
    return str(rows[:limit]) + (" ..." if len(rows) > limit else "")


def _check_prompt(config, input_ids: Tensor, attention_mask: Tensor | None, max_new_tokens: int,
                  device, mask_token_id: int | None = None) -> tuple[Tensor, Tensor | None]:
    """Validate a (left-padded) prompt batch; returns (input_ids long, bool mask or None) on `device`."""
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a (batch, length) tensor, got {shape}")
    if input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    B, T = input_ids.shape
    if B == 0 or T == 0:
        raise ValueError(f"empty prompt: input_ids has shape {(B, T)}; every row needs at least one token")
    _check_int("max_new_tokens", max_new_tokens)
    limit = getattr(config, "max_position_embeddings", None)
    if limit is not None and T + max_new_tokens > limit:
        raise ValueError(
            f"prompt length {T} + max_new_tokens {max_new_tokens} = {T + max_new_tokens} exceeds the model's "
            f"max_position_embeddings = {limit}; shorten the prompt or lower max_new_tokens"
        )
    input_ids = input_ids.to(device=device, dtype=torch.long)
    valid = None
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (B, T):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(B, T)} like input_ids")
        valid = attention_mask.to(device).bool()
        empty = ~valid.any(-1)
        if bool(empty.any()):
            raise ValueError(f"empty prompt: row(s) {_rows(empty)} of attention_mask have no real token")
        # Generated tokens are appended on the right, so padding must sit on the left.
        right_pad = (valid[:, 1:] < valid[:, :-1]).any(-1)
        if bool(right_pad.any()):
            raise ValueError(f"attention_mask must use left padding (zeros before the prompt); row(s) "
                             f"{_rows(right_pad)} have a 0 after a 1")
        if bool(valid.all()):
            valid = None  # lets the towers take their unpadded fast path
    if mask_token_id is not None:
        has_mask = input_ids == mask_token_id
        if valid is not None:
            has_mask &= valid
        bad = has_mask.any(-1)
        if bool(bad.any()):
            raise ValueError(f"the prompt of row(s) {_rows(bad)} contains the [MASK] token id {mask_token_id}, "
                             "which is reserved for the positions the denoiser fills; remove it from the prompt "
                             "(or pass the model's real mask_token_id)")
    return input_ids, valid


def _device_of(module: torch.nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _same_device(a: torch.device, b: torch.device) -> bool:
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


# ---- per-step math ------------------------------------------------------------------------------


def _predict(logits: Tensor, temperature: float, generator: torch.Generator | None) -> Tensor:
    """(..., V) logits -> (...) token ids: argmax, or a Gumbel-max sample of softmax(logits / temperature).

    Gumbel-max as argmax(logits / T - log E) with E ~ Exp(1) (-log E is Gumbel-distributed), drawn
    from `generator` so seeded runs repeat. A generator on another device draws there and the noise
    is moved (correct but slower; pass one on the logits' device for speed).
    """
    if temperature <= 0:
        return logits.argmax(-1)
    gen_device = generator.device if generator is not None else logits.device
    noise = torch.empty(logits.shape, device=gen_device, dtype=torch.float32).exponential_(generator=generator)
    noise = noise.to(logits.device).log_().neg_()
    return noise.add_(logits.float(), alpha=1.0 / temperature).argmax(-1)


def _confidence(logits: Tensor, tokens: Tensor) -> Tensor:
    """softmax(logits)[tokens]: (B, n, V), (B, n) -> (B, n), via logsumexp (no (B, n, V) probs tensor)."""
    chosen = logits.gather(-1, tokens[..., None]).squeeze(-1)
    return (chosen - torch.logsumexp(logits, -1)).exp()


class _Tracker:
    """Per-row bookkeeping shared by both loops: output buffer, counts, EOS, finish times."""

    def __init__(self, batch: int, max_new_tokens: int, pad_token_id: int, eos: Tensor | None, device, start: float):
        self.tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        self.num_generated = torch.zeros(batch, dtype=torch.long, device=device)
        self.nfe = torch.zeros(batch, dtype=torch.long, device=device)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.seconds = torch.full((batch,), float("nan"), dtype=torch.float64)  # host
        self.pad, self.eos, self.start = pad_token_id, eos, start
        self.length = 0  # positions written so far (same for every row)

    def commit(self, block: Tensor) -> tuple[Tensor, bool]:
        """Record a block (B, n) of new tokens; returns (the block as stored, whether every row has finished).

        The first EOS of a still-running row ends it; later positions become pad. One host sync (the
        finished flags) when an EOS id is set, none otherwise.
        """
        n = block.shape[1]
        active = ~self.finished
        block = block.masked_fill(~active[:, None], self.pad)
        if self.eos is None:
            self.num_generated += active.long() * n
        else:
            is_eos = torch.isin(block, self.eos) & active[:, None]
            after = (is_eos.cumsum(-1) - is_eos.long()) > 0  # strictly after the row's first EOS
            block = block.masked_fill(after, self.pad)
            hit = is_eos.any(-1)
            count = torch.where(hit, is_eos.long().argmax(-1) + 1, n)
            self.num_generated += torch.where(active, count, 0)
            self.finished |= hit
        self.tokens[:, self.length : self.length + n] = block
        self.length += n
        if self.eos is None:
            return block, False
        finished = self.finished.cpu()
        self.seconds[finished & self.seconds.isnan()] = time.perf_counter() - self.start
        return block, bool(finished.all())

    def commit_block(self, block: Tensor, offset: int) -> None:
        """Record a block (B, n) for every row at positions [offset, offset + n): the case where no
        row can finish early (no EOS id), so all rows advance together. No host read."""
        n = block.shape[1]
        self.tokens[:, offset: offset + n] = block
        self.num_generated += n

    def commit_ragged(self, block: Tensor, count: Tensor, max_new_tokens: int, rows: Tensor) -> Tensor:
        """Record, for working row r (the tracker's row rows[r]), the first count[r] tokens of block
        (R, n) after what that row already holds; returns the (R,) bool host tensor of which working
        rows have now finished.

        Rows advance by different amounts (speculative decoding). A row finishes at its first EOS
        or when it holds max_new_tokens; tokens past either are dropped. `self.tokens` must have n
        spare columns past max_new_tokens (writes that are dropped land there). One host sync.
        """
        n = block.shape[1]
        j = torch.arange(n, device=block.device)
        finished, have = self.finished[rows], self.num_generated[rows]
        count = torch.where(finished, 0, count.minimum(max_new_tokens - have))
        if self.eos is not None:
            is_eos = torch.isin(block, self.eos) & (j < count[:, None])
            hit = is_eos.any(-1)
            count = torch.where(hit, is_eos.long().argmax(-1) + 1, count)
            finished = finished | hit
        pos = torch.where(j < count[:, None], have[:, None] + j, max_new_tokens + j)  # dropped: spare columns
        self.tokens[rows] = self.tokens[rows].scatter_(1, pos, block)
        have = have + count
        finished = finished | (have >= max_new_tokens)
        self.num_generated[rows] = have
        self.finished[rows] = finished
        done = finished.cpu()
        now = time.perf_counter()
        newly = rows.cpu()[done]
        self.seconds[newly] = torch.where(self.seconds[newly].isnan(), now - self.start, self.seconds[newly])
        return done

    def output(self, input_ids: Tensor, blocks: int) -> GenerationOutput:
        n = int(self.num_generated.max())  # also waits for queued device work before reading the clock
        total = time.perf_counter() - self.start
        self.seconds[self.seconds.isnan()] = total
        device = input_ids.device
        new = self.tokens[:, :n].to(device)
        num = self.num_generated.to(device)
        nfe = self.nfe.to(device)
        return GenerationOutput(
            sequences=torch.cat([input_ids, new], dim=1),
            new_tokens=new,
            num_generated=num,
            nfe=nfe,
            tokens_per_nfe=num.float() / nfe.clamp(min=1).float(),
            seconds=self.seconds.to(device),
            blocks=blocks,
            total_seconds=total,
        )


# ---- mask diffusion -----------------------------------------------------------------------------


def _denoise_block(denoiser, cache, n: int, *, sampler, steps_per_block: int, mask_token_id: int,
                   temperature: float, generator, tracker: _Tracker, rows: Tensor, block_index: int,
                   step_callback: StepCallback | None, first: Tensor | None = None, shift: bool = False,
                   fill_last: bool = False) -> Tensor:
    """Fill one block of n positions for every row of the working batch; returns x (R, n) with no [MASK] left.

    `rows` (R,): the tracker rows the working batch holds (finished rows have left it); a row
    counts an NFE for each forward in which it still had a [MASK]. `first` (R,): the block opens
    with these tokens (the context tower's next-token prediction), never masked. `shift`: the
    denoiser output at position i is read as the prediction for position i + 1 (a shifted model;
    needs `first`). `fill_last`: the last allowed step fills every position still masked without
    consulting the sampler (a one-step draft is then the plain argmax, no confidences computed).
    """
    R, device = rows.shape[0], cache.device
    masked = torch.ones(R, n, dtype=torch.bool, device=device)
    x = torch.full((R, n), mask_token_id, dtype=torch.long, device=device)
    if first is not None:
        masked[:, 0] = False
        x[:, 0] = first
    for step in range(steps_per_block):
        if not bool(masked.any()):  # the one host sync per step
            break
        t = masked.sum(-1, dtype=torch.float32) / n
        logits = denoiser.forward_block(x, cache, t)  # (B, n, V) float32, freshly allocated
        if shift:  # output i predicts position i + 1; position 0 is never masked
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        logits[..., mask_token_id] = float("-inf")
        cand = torch.where(masked, _predict(logits, temperature, generator), x)
        if fill_last and step == steps_per_block - 1:
            commit = masked
        else:
            conf = _confidence(logits, cand)
            commit = sampler(conf, cand, masked, step=step, steps_per_block=steps_per_block, logits=logits)
            commit = commit & masked  # a plain-callable sampler gets no contract enforcement otherwise
        tracker.nfe.index_add_(0, rows, masked.any(-1).long().to(tracker.nfe.device))
        before, x = x, torch.where(commit, cand, x)
        masked &= ~commit
        if step_callback is not None:
            step_callback(block_index, step, before, logits, x)
    if bool(masked.any()):
        raise RuntimeError(f"sampler {sampler!r} left masked positions after steps_per_block={steps_per_block} "
                           "steps; a sampler must commit every masked position at the last step "
                           "(subclass twotower.samplers.Sampler to get this guaranteed)")
    return x


def _denoiser_placement(denoiser, ctx_device: torch.device, denoiser_device) -> tuple[torch.device, bool]:
    """(device the denoiser runs on, whether its cache is a mirror of the context cache)."""
    actual = _device_of(denoiser)
    if denoiser_device is None:
        return actual, not _same_device(actual, ctx_device)
    wanted = torch.device(denoiser_device)
    if not _same_device(wanted, actual):
        raise ValueError(f"denoiser_device={wanted} but the denoiser's weights are on {actual}; move the denoiser "
                         "first (TwoTowerLM.place_towers_on_devices) or leave denoiser_device=None")
    # An explicit device always uses the mirror, even when it equals the context's (tests, debugging).
    return actual, True


def _check_two_tower_call(context, denoiser, input_ids, attention_mask, *, sampler, block_size, max_new_tokens,
                          mask_token_id, pad_token_id, temperature, denoiser_device):
    """The checks both two-tower loops share. Returns (temperature, input_ids, valid, context
    device, denoiser device, whether the denoiser reads a mirror of the cache)."""
    cfg = context.config
    _check_int("block_size", block_size)
    _check_token("mask_token_id", mask_token_id, cfg.vocab_size)
    _check_token("pad_token_id", pad_token_id, cfg.vocab_size)
    temperature = _check_temperature(temperature)
    if not callable(sampler):
        raise ValueError(f"sampler must be a Sampler (or a callable with its signature), got {sampler!r}")
    ctx_device = _device_of(context)
    input_ids, valid = _check_prompt(cfg, input_ids, attention_mask, max_new_tokens, ctx_device, mask_token_id)
    den_device, use_mirror = _denoiser_placement(denoiser, ctx_device, denoiser_device)
    return temperature, input_ids, valid, ctx_device, den_device, use_mirror


@torch.inference_mode()
def generate_diffusion(
    context,
    denoiser,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    sampler,
    block_size: int = 16,
    steps_per_block: int = 16,
    max_new_tokens: int,
    mask_token_id: int,
    pad_token_id: int,
    temperature: float = 0.0,
    eos_token_id: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    step_callback: StepCallback | None = None,
    denoiser_device=None,
    shifted: bool = False,
) -> GenerationOutput:
    """Block-wise mask-diffusion generation with a context tower and a denoiser tower.

    Args:
        context: a ContextTower; input_ids (B, T) and attention_mask (B, T) (1 = real token,
            left padding) are moved to its device.
        denoiser: a DenoiserTower (same config), on the same device or another one.
        sampler: the commit policy, a `twotower.samplers.Sampler` (or any callable with its
            signature returning (B, n) bool).
        block_size: S, positions per block; the last block is shorter when max_new_tokens is not
            a multiple of S.
        steps_per_block: denoiser forwards allowed per block (the sampler finishes a block in time).
        max_new_tokens: positions to generate at most.
        mask_token_id / pad_token_id: the [MASK] id (never produced, never allowed in a prompt) and
            the id written after a row's EOS.
        temperature: 0 = argmax; > 0 = Gumbel-max sampling from softmax(logits / temperature) with
            `generator`. Confidence always uses the untempered softmax.
        eos_token_id: an id (or ids) that ends a row; None = generate max_new_tokens for every row.
        step_callback: called after every denoiser step as
            `step_callback(block_index, step_index, tokens_before (B, n), logits (B, n, V), tokens_after (B, n))`
            (logits with the [MASK] column at -inf). Treat the tensors as read-only.
        denoiser_device: None = the denoiser's own device, with the context cache mirrored to it
            (incrementally, once per block) only when it differs from the context's. Given
            explicitly, the mirror is always used.
        shifted: the denoiser was trained shifted (`DenoiserFineTuning(shifted=True)`): each block's
            first token is the context tower's own next-token prediction (from the prefill / the
            previous block's extend, no extra forward), and the denoiser output at position i
            predicts position i + 1, as in the AR model it was copied from.

    Returns:
        GenerationOutput (see its docstring).
    """
    _check_int("steps_per_block", steps_per_block)
    temperature, input_ids, valid, ctx_device, den_device, use_mirror = _check_two_tower_call(
        context, denoiser, input_ids, attention_mask, sampler=sampler, block_size=block_size,
        max_new_tokens=max_new_tokens, mask_token_id=mask_token_id, pad_token_id=pad_token_id,
        temperature=temperature, denoiser_device=denoiser_device)
    eos = _eos_ids(eos_token_id, context.config.vocab_size, den_device)

    start = time.perf_counter()
    B, T = input_ids.shape
    # Capacity for everything this call will append: no cache growth (reallocation) mid-generation.
    want = "last" if shifted else "none"
    logits, cache = context.prefill(input_ids, valid, logits=want, capacity=T + max_new_tokens)
    den_cache = cache.mirror_to(den_device) if use_mirror else cache
    tracker = _Tracker(B, max_new_tokens + block_size, pad_token_id, eos, den_device, start)  # spare columns
    rows = torch.arange(B, device=den_device)  # the working batch: the rows still running
    blocks = made = 0
    while made < max_new_tokens:
        n = min(block_size, max_new_tokens - made)
        first = None
        if shifted:  # [MASK] is never produced, as in the denoiser's steps
            last = logits[:, -1].float()
            last[:, mask_token_id] = float("-inf")
            first = _predict(last, temperature, generator).to(den_device)
        x = _denoise_block(denoiser, den_cache, n, sampler=sampler, steps_per_block=steps_per_block,
                           mask_token_id=mask_token_id, temperature=temperature, generator=generator, tracker=tracker,
                           rows=rows, block_index=blocks, step_callback=step_callback, first=first, shift=shifted)
        blocks += 1
        made += n
        if eos is None:  # no row can finish early (the batch never shrinks): no host read needed
            tracker.commit_block(x, made - n)
            if made >= max_new_tokens:
                break  # the context never needs the last block
        else:
            done = tracker.commit_ragged(x, torch.full((rows.shape[0],), n, device=den_device), max_new_tokens, rows)
            if bool(done.all()) or made >= max_new_tokens:
                break
            if bool(done.any()):  # drop finished rows: later forwards only pay for the rows still running
                stay = (~done).nonzero().squeeze(1)
                cache, rows, x = cache.select(stay.to(ctx_device)), rows[stay.to(den_device)], x[stay.to(x.device)]
                den_cache = cache.mirror_to(den_device) if use_mirror else cache
        logits = context.extend(cache, x.to(ctx_device), logits=want)
        if use_mirror:
            den_cache = cache.mirror_to(den_device, den_cache)
    tracker.tokens = tracker.tokens[:, :max_new_tokens]
    return tracker.output(input_ids, blocks)


# ---- speculative (lossless) ---------------------------------------------------------------------


@torch.inference_mode()
def generate_speculative(
    context,
    denoiser,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    sampler,
    block_size: int = 16,
    draft_steps: int = 1,
    max_new_tokens: int,
    mask_token_id: int,
    pad_token_id: int,
    temperature: float = 0.0,
    eos_token_id: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    step_callback: StepCallback | None = None,
    denoiser_device=None,
    shifted: bool = False,
) -> GenerationOutput:
    """Draft with the denoiser, verify with the context tower: the AR model's output, fewer forwards.

    Per iteration, for every unfinished row:

        d_0         = the context tower's own next token (known from the previous forward)
        d_1..d_{n-1} = the denoiser's draft: `draft_steps` denoising steps with `sampler` from an
                      all-[MASK] block whose position 0 holds d_0 (the last step fills the rest)
        logits      = context.extend(cache, d, provisional=True)      # one chunked forward
        a_i         = the context tower's token after d_0..d_{i-1} (argmax of logits[i - 1], or a
                      Gumbel-max sample at temperature > 0)
        keep        = 1 + the number of leading i >= 1 with d_i == a_i
        accept(cache, keep); the next d_0 = a_keep (the context tower's token after the kept ones)

    Every kept token is the context tower's own choice given the tokens before it, so greedy output
    equals `generate_ar` (up to float rounding between a chunked and a one-token forward) and
    sampled output is distributed as AR sampling. The denoiser only decides how many tokens one
    iteration yields (1 to n). Rows advance independently; a row that keeps fewer than another
    leaves masked-out holes in the shared cache (squeezed out by `HybridCache.compact` once they
    add up to a block), and a row that has finished leaves the working batch (its cache rows are
    dropped), so later forwards only pay for the rows still running.

    Args: as `generate_diffusion`, plus `draft_steps` (denoiser forwards per draft; the sampler
    picks the commits of all but the last, which fills every position left: with the default 1
    the draft is the denoiser's argmax and the sampler is not consulted). Drafts are always
    greedy; `temperature` applies to the context tower's choices, i.e. to the output.

    `nfe` counts denoiser forwards, as in mask diffusion (the verifying extend is the context
    forward every block-wise mode runs per block); `blocks` counts iterations. `step_callback`
    sees the draft steps of the rows still running.
    """
    _check_int("draft_steps", draft_steps)
    temperature, input_ids, valid, ctx_device, den_device, use_mirror = _check_two_tower_call(
        context, denoiser, input_ids, attention_mask, sampler=sampler, block_size=block_size,
        max_new_tokens=max_new_tokens, mask_token_id=mask_token_id, pad_token_id=pad_token_id,
        temperature=temperature, denoiser_device=denoiser_device)
    if block_size < 2:
        raise ValueError("speculative decoding needs block_size >= 2 (position 0 is the context tower's own token)")
    eos = _eos_ids(eos_token_id, context.config.vocab_size, ctx_device)

    start = time.perf_counter()
    B, T = input_ids.shape
    n = block_size
    logits, cache = context.prefill(input_ids, valid, logits="last", capacity=T + max_new_tokens + n)
    den_cache = cache.mirror_to(den_device) if use_mirror else cache
    tracker = _Tracker(B, max_new_tokens + n, pad_token_id, eos, ctx_device, start)  # n spare columns
    nxt = _predict(logits[:, -1], temperature, generator)  # (B,) the context tower's next token
    rows = torch.arange(B, device=ctx_device)  # the working batch: the rows still running
    iterations = 0
    while True:
        x = _denoise_block(denoiser, den_cache, n, sampler=sampler, steps_per_block=draft_steps,
                           mask_token_id=mask_token_id, temperature=0.0, generator=None, tracker=tracker,
                           rows=rows, block_index=iterations, step_callback=step_callback,
                           first=nxt.to(den_device), shift=shifted, fill_last=True)
        x = x.to(ctx_device)
        logits = context.extend(cache, x, logits="all", provisional=True)  # (R, n, V)
        ar = _predict(logits, temperature, generator)  # ar[:, i]: the context tower's token after x[:, :i + 1]
        keep = (ar[:, :-1] == x[:, 1:]).long().cumprod(-1).sum(-1) + 1
        context.accept(cache, keep)
        nxt = ar.gather(1, (keep - 1)[:, None]).squeeze(1)
        iterations += 1
        done = tracker.commit_ragged(x, keep, max_new_tokens, rows)
        if bool(done.all()):
            break
        fresh = False
        if bool(done.any()):  # drop finished rows: later forwards only pay for the rows still running
            stay = (~done).nonzero().squeeze(1).to(ctx_device)
            cache, rows, nxt = cache.select(stay), rows[stay], nxt[stay]
            fresh = True
        if rows.numel() > 1:
            # Rows keep different prefixes, so the others leave holes: squeeze them out once they
            # add up to a block and an eighth of the cache (bounds memory and attention width).
            fresh = cache.compact(min_gain=max(n, cache.length // 8)) > 0 or fresh
        if use_mirror:
            den_cache = cache.mirror_to(den_device) if fresh else cache.mirror_to(den_device, den_cache)
        else:
            den_cache = cache
    tracker.tokens = tracker.tokens[:, :max_new_tokens]
    return tracker.output(input_ids, iterations)


# ---- AR baseline --------------------------------------------------------------------------------


@torch.inference_mode()
def generate_ar(
    context,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    max_new_tokens: int,
    pad_token_id: int,
    temperature: float = 0.0,
    eos_token_id: int | Sequence[int] | None = None,
    generator: torch.Generator | None = None,
) -> GenerationOutput:
    """Autoregressive generation with the context tower alone: one token per (cached) forward.

    input_ids / attention_mask: (B, T), left padding. Greedy (temperature 0) takes the argmax over
    the whole vocabulary, so it matches transformers' greedy `generate` on the same weights.
    NFE = context forwards: prefill (first token) plus one `extend` per later token.
    """
    cfg = context.config
    _check_token("pad_token_id", pad_token_id, cfg.vocab_size)
    temperature = _check_temperature(temperature)
    device = _device_of(context)
    input_ids, valid = _check_prompt(cfg, input_ids, attention_mask, max_new_tokens, device)
    eos = _eos_ids(eos_token_id, cfg.vocab_size, device)

    start = time.perf_counter()
    B, T = input_ids.shape
    logits, cache = context.prefill(input_ids, valid, logits="last", capacity=T + max_new_tokens)
    tracker = _Tracker(B, max_new_tokens, pad_token_id, eos, device, start)
    for i in range(max_new_tokens):
        tracker.nfe += ~tracker.finished
        token = _predict(logits[:, -1], temperature, generator)[:, None]  # (B, 1)
        token, all_done = tracker.commit(token)
        if all_done or i == max_new_tokens - 1:
            break
        logits = context.extend(cache, token, logits="last")
    return tracker.output(input_ids, blocks=0)
