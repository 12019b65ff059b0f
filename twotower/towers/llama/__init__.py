"""The Llama tower family (transformers' `LlamaConfig`, model_type "llama"): RoPE (default, linear,
llama3, yarn), grouped-query attention (with `attention_bias`: biases on q, k, v and o), SwiGLU
MLP, RMSNorm, and a `KVCache` (cache.py). The Llama-like families (`towers/qwen2`,
`towers/mistral`) reuse these classes with their own `LlamaBackbone` subclass.

Importing this package registers the family (`twotower.towers.base.register_family`).
"""

from transformers import LlamaConfig

from ..base import TowerFamily, register_family
from .cache import KVCache
from .context import LlamaContextTower
from .denoiser import LlamaDenoiserTower

__all__ = ["LlamaContextTower", "LlamaDenoiserTower", "KVCache"]

register_family(TowerFamily(model_type="llama", config_class=LlamaConfig, context=LlamaContextTower,
                            denoiser=LlamaDenoiserTower, embed_key="embed_tokens.weight",
                            hf_architecture="LlamaForCausalLM"))
