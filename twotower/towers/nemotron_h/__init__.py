"""The NemotronH tower family (transformers' `NemotronHConfig`, model_type "nemotron_h"): Mamba-2,
attention without positional encoding, relu^2 MLP and MoE blocks (layers.py, ssd.py), a
`HybridCache` of K,V + Mamba states (cache.py), MoE routers kept in float32.

Importing this package registers the family (`twotower.towers.base.register_family`).
"""

from transformers import NemotronHConfig

from ..base import TowerFamily, register_family
from .cache import HybridCache
from .context import ContextTower
from .denoiser import DenoiserTower

__all__ = ["ContextTower", "DenoiserTower", "HybridCache"]



def check_raw_config(raw: dict) -> None:
    """A NemotronH config.json names its block pattern; transformers would silently use a default."""
    if "hybrid_override_pattern" not in raw and "layers_block_type" not in raw:
        raise ValueError("it is not a NemotronH config: it has neither 'hybrid_override_pattern' nor "
                         "'layers_block_type'")


register_family(TowerFamily(model_type="nemotron_h", config_class=NemotronHConfig, context=ContextTower,
                            denoiser=DenoiserTower, embed_key="embeddings.weight",
                            hf_architecture="NemotronHForCausalLM", raw_config_check=check_raw_config,
                            # transformers keeps the routers in float32 whatever the model dtype (router
                            # logits and the choose-only correction bias decide expert selection; bf16
                            # would change which experts win).
                            float32_suffixes=("e_score_correction_bias", "mixer.gate.weight")))
