"""The Llama tower family (transformers' `LlamaConfig`, model_type "llama"): RoPE (default, linear,
llama3, yarn), grouped-query attention with optional Qwen2-style biases, SwiGLU MLP, RMSNorm.

Importing this package registers the family (`twotower.towers.base.register_family`).
"""

from transformers import LlamaConfig

from ..base import TowerFamily, register_family
from .context import LlamaContextTower
from .denoiser import LlamaDenoiserTower

__all__ = ["LlamaContextTower", "LlamaDenoiserTower"]

register_family(TowerFamily(model_type="llama", config_class=LlamaConfig, context=LlamaContextTower,
                            denoiser=LlamaDenoiserTower, embed_key="embed_tokens.weight",
                            hf_architecture="LlamaForCausalLM"))
