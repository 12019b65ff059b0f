"""What this machine's CPU does with bfloat16 (and which fast CPU kernels this torch has), asked of torch itself.

On a CPU, torch runs bfloat16 matmuls through oneDNN only where oneDNN has a bf16 path (AVX512-BW/VL/DQ,
AVX-NE-CONVERT, AMX). Elsewhere (an AVX2-only CPU, e.g. many AMD EPYC and laptop parts) it falls back
to a reference kernel: measured here on an AVX2-only AMD EPYC, a (64, 576) x (576, 1536) bf16 matmul
took 60x float32's time. The recipes and benchmarks that choose bf16 were measured on a CPU with AMX,
where bf16 is the fast dtype; on the other kind the same choice makes every job tens of times slower,
so loading and training say so, with the fix. The inference copies of `TwoTowerLM.merge_adapters` ask
here too: whether oneDNN pre-packs a weight of a given dtype (`onednn_can_pack`) and whether torch has
the dynamic int8 linear kernels (`has_int8_linear`).

A leaf module: it imports nothing of the package.
"""

from __future__ import annotations

import functools
import warnings

import torch

__all__ = ["cpu_has_bf16_path", "onednn_can_pack", "has_int8_linear", "fast_dtype_name", "slow_bf16",
           "warn_if_slow_bf16", "SlowBFloat16Warning", "FLOAT32_FIX"]

# Every way to ask for float32 instead, by entry point: one message serves all of them.
FLOAT32_FIX = ("use float32 on this machine: dtype=torch.float32 (Python), --dtype float32 (predict, serve, "
               "benchmarks), gen_dtype: float32 or auto (distillation), --trainer.precision 32-true (fit)")


class SlowBFloat16Warning(UserWarning):
    """bfloat16 was asked for on a CPU where torch computes it through a slow fallback."""


@functools.cache
def onednn_can_pack(dtype: torch.dtype) -> bool:
    """Whether oneDNN can pre-pack a linear weight of `dtype` on this CPU (`torch.ops.mkldnn`'s reorder).

    Asked of the reorder on a tiny weight, once per dtype and process: it refuses with a RuntimeError
    on CPUs without the instructions its kernels for that dtype need (bf16 on an AVX2-only CPU), and
    which instructions those are is oneDNN's to decide, not ours to copy.
    """
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(16, 16, dtype=dtype), 16)
    except RuntimeError:
        return False
    return True


def cpu_has_bf16_path() -> bool:
    """Whether oneDNN has a bfloat16 path on this CPU (so bf16 matmuls are not the slow fallback)."""
    return onednn_can_pack(torch.bfloat16)


@functools.cache
def has_int8_linear() -> bool:
    """Whether this torch can run a dynamically quantized int8 linear on the CPU (fbgemm / x86 engine).

    Asked of the ops themselves on a tiny weight, once per process. torch marks its quantized tensor
    types deprecated (a UserWarning) but still ships the kernels, which are the fast int8 path on a CPU;
    where a torch drops them, this answers no and int8 copies fall back to their float weights.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = torch.quantize_per_channel(torch.ones(4, 4), torch.ones(4, dtype=torch.float64),
                                           torch.zeros(4, dtype=torch.long), 0, torch.qint8)
            packed = torch.ops.quantized.linear_prepack(q, None)
            torch.ops.quantized.linear_dynamic(torch.ones(1, 4), packed, True)
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return True


def slow_bf16(dtype, device) -> bool:
    """Whether tensors of `dtype` on `device` take torch's slow bf16 fallback (bf16 on such a CPU)."""
    device = torch.device("cpu" if device is None else device)
    return dtype == torch.bfloat16 and device.type == "cpu" and not cpu_has_bf16_path()


def warn_if_slow_bf16(dtype, device, what: str) -> bool:
    """Warn (SlowBFloat16Warning) that `what` (e.g. "loading smollm2-135m in bfloat16") will be slow
    here, naming the float32 fix; returns whether it warned."""
    if not slow_bf16(dtype, device):
        return False
    warnings.warn(f"{what} on this CPU: it has no oneDNN bf16 path (no AVX512-BW/VL/DQ, AVX-NE-CONVERT or "
                  f"AMX), so torch computes bfloat16 through a fallback that is tens of times slower than "
                  f"float32 here; {FLOAT32_FIX}", SlowBFloat16Warning, stacklevel=3)
    return True


def fast_dtype_name(device) -> str:
    """The dtype an "auto" setting picks on `device`: "bfloat16" where bf16 has a fast path (a CUDA device
    that supports it, a CPU with a oneDNN bf16 path), else "float32"."""
    device = torch.device("cpu" if device is None else device)
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if device.type == "cpu" and cpu_has_bf16_path() else "float32"
