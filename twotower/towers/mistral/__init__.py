"""The Mistral tower family (transformers' `MistralConfig`, model_type "mistral"): Llama's layers
without biases, and `config.sliding_window` on every layer when it is set (lengths within the
window run exactly as transformers; longer ones are refused, see `twotower/towers/llama/layers.py`).

Importing this package registers the family (`twotower.towers.base.register_family`).
"""

from transformers import MistralConfig

from ..base import TowerFamily, register_family
from ..llama import LlamaContextTower, LlamaDenoiserTower
from ..llama.layers import LlamaBackbone

__all__ = ["MistralBackbone", "MistralContextTower", "MistralDenoiserTower"]


class MistralBackbone(LlamaBackbone):
    """`MistralModel`'s layer stack (same parameter names as Llama's)."""

    @staticmethod
    def attention_biases(config) -> tuple[bool, bool]:
        """Mistral's projections have no biases (MistralConfig has no attention_bias switch)."""
        return False, False

    @staticmethod
    def attention_window(config) -> int | None:
        """config.sliding_window (None: full attention), on every layer as transformers' Mistral."""
        return getattr(config, "sliding_window", None)


class MistralContextTower(LlamaContextTower):
    """The Mistral AR model as the context tower. `config` is a transformers `MistralConfig`."""

    backbone_class = MistralBackbone


class MistralDenoiserTower(LlamaDenoiserTower):
    """The trainable Mistral tower (Llama's denoiser over `MistralBackbone`)."""

    backbone_class = MistralBackbone


register_family(TowerFamily(model_type="mistral", config_class=MistralConfig, context=MistralContextTower,
                            denoiser=MistralDenoiserTower, embed_key="embed_tokens.weight",
                            hf_architecture="MistralForCausalLM"))
