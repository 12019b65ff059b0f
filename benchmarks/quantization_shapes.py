"""int8 weight bytes at realistic sizes, from shapes alone (no weights, no download, any machine).

    PYTHONPATH=. python benchmarks/quantization_shapes.py [--config nano30b|h8b] [--json OUT]

Builds both towers of each config on the meta device (`twotower.model.shape_only_model`:
the model `from_pretrained(dtype=bfloat16, quantize="int8")` would build, quantized by the same
`quantize_model` and plan), and prints the stored bytes per part in bf16 and int8 and the ratio,
then what one GPU must hold for the two towers (weights; the load and forward transients are
estimates from the code's order of work, not measurements). tests/test_quantization_shapes.py proves the count
equal to the bytes of real quantized models and keeps these configs at or under 0.55x.

The configs carry the public numbers of NVIDIA's published checkpoints (their config.json fields,
as transformers' NemotronHConfig takes them); fields that do not change a weight's shape (norm
epsilons, rope, time-step limits) are left at transformers' defaults.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import NemotronHConfig  # noqa: E402

from twotower.model import shape_only_model  # noqa: E402
from twotower.quantization import (  # noqa: E402
    PARTS,
    QUANT_CHUNK,
    Int8Experts,
    Int8Linear,
    bytes_by_part,
)

_COMMON = dict(vocab_size=131072, head_dim=128, mamba_head_dim=64, ssm_state_size=128, n_groups=8, conv_kernel=4,
               chunk_size=128, expand=2, mlp_hidden_act="relu2", mamba_hidden_act="silu", use_conv_bias=True,
               mamba_proj_bias=False, use_bias=False, mlp_bias=False, attention_bias=False,
               tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)

CONFIGS = {
    # nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16, config.json: 52 layers (23 Mamba-2, 23 MoE, 6
    # attention), hidden 2688, 128 routed experts of 1856 (top 6) + one shared expert of 3712,
    # GQA 32 / 2 heads of 128, Mamba 64 heads of 64, state 128, 8 groups. ~31.6 B parameters a tower.
    "nano30b": dict(
        _COMMON, hidden_size=2688, hybrid_override_pattern="MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME",
        num_attention_heads=32, num_key_value_heads=2, intermediate_size=1856, mamba_num_heads=64,
        n_routed_experts=128, num_experts_per_tok=6, moe_intermediate_size=1856,
        moe_shared_expert_intermediate_size=3712, n_group=1, topk_group=1, routed_scaling_factor=2.5,
        norm_topk_prob=True, max_position_embeddings=262144),
    # nvidia/Nemotron-H-8B-Base-8K, config.json: 52 layers (24 Mamba-2, 24 MLP, 4 attention),
    # hidden 4096, MLP 21504 (relu2), GQA 32 / 8 heads of 128, Mamba 128 heads of 64, state 128,
    # 8 groups; dense (no experts). ~8.1 B parameters a tower.
    "h8b": dict(
        _COMMON, hidden_size=4096, hybrid_override_pattern="M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-",
        num_attention_heads=32, num_key_value_heads=8, intermediate_size=21504, mamba_num_heads=128,
        max_position_embeddings=8192),
}


def nemotron_config(name: str) -> NemotronHConfig:
    return NemotronHConfig(**CONFIGS[name])


def largest_dequantized_bytes(model, itemsize: int = 2) -> int:
    """The largest bf16 weight one int8 module dequantizes during a forward (`Int8Experts`: both
    stacks at once; `Int8Linear`: its weight): the transient an int8 forward adds on top."""
    sizes = [0]
    for m in model.modules():
        if isinstance(m, Int8Experts):
            sizes.append((m.up_proj_int8.numel() + m.down_proj_int8.numel()) * itemsize)
        elif isinstance(m, Int8Linear):
            sizes.append(m.weight_int8.numel() * itemsize)
    return max(sizes)


def measure(name: str) -> dict:
    config = nemotron_config(name)
    bf16 = shape_only_model(config)
    int8 = shape_only_model(config, quantize="int8")
    full, quant = bytes_by_part(bf16), bytes_by_part(int8)
    params = sum(p.numel() for p in bf16.parameters()) + sum(b.numel() for b in bf16.buffers())
    largest = max(t.numel() * t.element_size() for t in bf16.state_dict().values())
    return {"config": name, "parameters": params, "bf16": full, "int8": quant,
            "bf16_total": sum(full.values()), "int8_total": sum(quant.values()),
            "ratio": sum(quant.values()) / sum(full.values()),
            # from_pretrained(quantize="int8") reads one tensor at a time in bf16 and rounds it straight
            # away (float32 temporaries of QUANT_CHUNK elements): the device holds the int8 model, one
            # bf16 tensor and that buffer at most (an estimate from the loader's order, not a measurement)
            "int8_load_transient": largest + 3 * 4 * QUANT_CHUNK,
            "largest_dequantized": largest_dequantized_bytes(int8)}


def report(r: dict) -> None:
    gb = 1e9
    print(f"\n{r['config']}: {r['parameters'] / 1e9:.2f} B parameters in both towers")
    print(f"  {'part':24s} {'bf16 GB':>9s} {'int8 GB':>9s} {'ratio':>7s}")
    for part in PARTS:
        a, b = r["bf16"][part], r["int8"][part]
        ratio = f"{b / a:.3f}" if a else "-"
        print(f"  {part:24s} {a / gb:9.3f} {b / gb:9.3f} {ratio:>7s}")
    kept = sum(r["int8"][p] for p in PARTS if p not in ("projections", "MoE experts", "int8 scales"))
    print(f"  {'total':24s} {r['bf16_total'] / gb:9.3f} {r['int8_total'] / gb:9.3f} {r['ratio']:7.3f}"
          f"   (kept in bf16 / float32: {100 * kept / r['bf16_total']:.1f} % of the bf16 bytes)")
    print(f"  one GPU, both towers: weights {r['bf16_total'] / gb:.1f} GB bf16 vs {r['int8_total'] / gb:.1f} GB int8; "
          f"loading int8 adds at most {r['int8_load_transient'] / gb:.2f} GB (one bf16 tensor + the rounding buffer), "
          f"an int8 forward {r['largest_dequantized'] / gb:.2f} GB (the largest module dequantized)")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), action="append", help="default: all")
    p.add_argument("--json", help="write the figures here")
    a = p.parse_args(argv)
    results = [measure(name) for name in (a.config or list(CONFIGS))]
    for r in results:
        report(r)
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
