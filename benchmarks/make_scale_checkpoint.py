"""Write the ~0.3B-parameter bf16 NemotronH checkpoint (32 experts) that `benchmarks/scale.py` measures.

    python benchmarks/make_scale_checkpoint.py /tmp/scale-0.3b [--max-shard-size 200MB]

Written by transformers' own `NemotronHForCausalLM.save_pretrained` (random weights, seeded), so it
is exactly what a user's AR checkpoint looks like on disk; nothing is downloaded and nothing here
is shipped. The defaults (hidden 1024, 16 layers "MEMEM*EMEMEM*EME", 32 experts of 384, top-4,
vocabulary 32k) give about 0.31 B parameters, 0.61 GB in bf16. Router weights get a real spread
(transformers initialises them to zero, which would send every token to the same four experts
and make the MoE timings meaningless).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def scale_config(pattern: str = "MEMEM*EMEMEM*EME", hidden: int = 1024, experts: int = 32, vocab: int = 32000,
                 moe_intermediate: int = 384, top_k: int = 4):
    from transformers import NemotronHConfig

    return NemotronHConfig(
        vocab_size=vocab, hidden_size=hidden, hybrid_override_pattern=pattern,
        num_attention_heads=8, num_key_value_heads=2, head_dim=128, intermediate_size=4 * hidden,
        mamba_num_heads=32, mamba_head_dim=64, ssm_state_size=128, n_groups=1, conv_kernel=4, chunk_size=128,
        n_routed_experts=experts, num_experts_per_tok=top_k, moe_intermediate_size=moe_intermediate,
        moe_shared_expert_intermediate_size=2 * moe_intermediate, routed_scaling_factor=1.0, norm_topk_prob=True,
        n_group=1, topk_group=1, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False, use_conv_bias=True, mamba_proj_bias=False, use_bias=False,
    )


def make(out: str | Path, *, seed: int = 0, max_shard_size: str | None = None, **config_kwargs) -> dict:
    """Build, randomise the routers, save in bf16; returns {"parameters", "bytes", "files"}."""
    from transformers import NemotronHForCausalLM

    torch.manual_seed(seed)
    config = scale_config(**config_kwargs)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16 directly: no float32 copy of 0.3 B weights
    try:
        model = NemotronHForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(prev)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mixer.gate.weight"):
                p.normal_(0.0, 0.5)
    out = Path(out)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out, **kwargs)
    n = sum(p.numel() for p in model.parameters())
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    info = {"parameters": n, "bytes": nbytes, "files": sorted(f.name for f in out.glob("*.safetensors"))}
    (out / "scale_info.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-shard-size", default=None, help="e.g. 200MB (default: transformers' default)")
    p.add_argument("--pattern", default="MEMEM*EMEMEM*EME")
    p.add_argument("--experts", type=int, default=32)
    a = p.parse_args(argv)
    info = make(a.out, seed=a.seed, max_shard_size=a.max_shard_size, pattern=a.pattern, experts=a.experts)
    print(f"wrote {a.out}: {info['parameters'] / 1e9:.3f} B parameters, {info['bytes'] / 2**20:.0f} MiB "
          f"({len(info['files'])} safetensors file(s))")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
