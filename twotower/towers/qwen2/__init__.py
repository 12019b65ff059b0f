"""The Qwen2 tower family (transformers' `Qwen2Config`, model_type "qwen2"): Llama's layers with
biases on the q, k and v projections and none on o_proj, and an optional sliding window on the
layers `config.layer_types` marks "sliding_attention" (lengths within the window run exactly as
transformers; longer ones are refused, see `twotower/towers/llama/layers.py`).

Importing this package registers the family (`twotower.towers.base.register_family`).
"""

from transformers import Qwen2Config

from ..base import TowerFamily, register_family
from ..llama import LlamaContextTower, LlamaDenoiserTower
from ..llama.layers import LlamaBackbone

__all__ = ["Qwen2Backbone", "Qwen2ContextTower", "Qwen2DenoiserTower"]


class Qwen2Backbone(LlamaBackbone):
    """`Qwen2Model`'s layer stack (same parameter names as Llama's)."""

    @staticmethod
    def attention_biases(config) -> tuple[bool, bool]:
        """Qwen2 always has q/k/v biases and never an o_proj bias (there is no config switch)."""
        return True, False

    @staticmethod
    def attention_window(config) -> int | None:
        """config.sliding_window when some layer is a sliding one (Qwen2Config sets sliding_window to
        None unless use_sliding_window, and marks layers >= max_window_layers in layer_types)."""
        sliding = "sliding_attention" in (getattr(config, "layer_types", None) or ())
        return config.sliding_window if sliding else None


class Qwen2ContextTower(LlamaContextTower):
    """The Qwen2 AR model as the context tower. `config` is a transformers `Qwen2Config`."""

    backbone_class = Qwen2Backbone


class Qwen2DenoiserTower(LlamaDenoiserTower):
    """The trainable Qwen2 tower (Llama's denoiser over `Qwen2Backbone`)."""

    backbone_class = Qwen2Backbone


register_family(TowerFamily(model_type="qwen2", config_class=Qwen2Config, context=Qwen2ContextTower,
                            denoiser=Qwen2DenoiserTower, embed_key="embed_tokens.weight",
                            hf_architecture="Qwen2ForCausalLM"))
