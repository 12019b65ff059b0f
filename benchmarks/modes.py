"""The benchmark's modes: a name, the decoder that generates, and what the report needs to know.

A mode of ours holds a `twotower.decoding.Decoder` instance and generation is
`mode.decoder.generate(model, ids, mask, max_new_tokens=N, eos_token_id=None)`; the baseline
`hf_generate` holds no decoder (the harness calls transformers' `generate`). Every decoder is
greedy (temperature 0), so runs are deterministic and comparable token for token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from twotower.decoding import Autoregressive, Decoder, MaskDiffusion, MockAR, Speculative
from twotower.samplers import ConfidenceThreshold

__all__ = ["Mode", "ar", "hf_generate", "mock_ar", "diffusion", "speculative", "BASE_MODES", "FULL_MODES",
           "SMOKE_MODES", "parse_modes"]


@dataclass(frozen=True)
class Mode:
    """One way of generating.

    name: the mode's name in tables, JSON and `--modes`.
    kind: "ar", "hf" (transformers' greedy `generate`, the baseline), "mock_ar", "diffusion" or
        "speculative"; the report and the JSON group by it.
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


BASE_MODES = [ar(), hf_generate(), mock_ar()]
FULL_MODES = BASE_MODES + [diffusion(t, 16) for t in (0.5, 0.7, 0.8, 0.9, 0.95)] + \
    [diffusion(0.8, b) for b in (4, 8, 32)] + [speculative(16)]
SMOKE_MODES = BASE_MODES + [diffusion(0.5, 16), diffusion(0.8, 16), diffusion(0.8, 4), speculative(16)]


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


def parse_modes(spec: str | None, available: list[Mode]) -> list[Mode]:
    """`--modes a,b,c` -> Modes, "ar" first (the reference for retention, ratios and "= AR").

    Any diff_t<T>_b<S> or spec_b<S> name is accepted, not only the listed ones; a repeated name
    runs once. None / "" -> `available` as it is (both built-in lists start with "ar").
    """
    if not spec:
        return list(available)
    known = {m.name: m for m in FULL_MODES + available}
    out: dict[str, Mode] = {}
    for name in (s.strip() for s in spec.split(",") if s.strip()):
        mode = known.get(name) or _from_name(name)
        if mode is None:
            raise SystemExit(f"unknown mode {name!r}; choose from {', '.join(m.name for m in FULL_MODES)} "
                             "(or any diff_t<THRESHOLD>_b<BLOCK> / spec_b<BLOCK>)")
        out.setdefault(mode.name, mode)
    return [known["ar"]] + [m for name, m in out.items() if name != "ar"]
