"""twotower: two-tower block-diffusion language models (frozen AR context tower + denoiser tower).

Tower families: NemotronH, Llama, Qwen2 and Mistral (`twotower.towers.base` says how to add one).

Public API: the composed model, its towers and cache, samplers, noise schedules and the
Lightning modules. Heavy submodules load on first attribute access, so `import twotower` is quick.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "TwoTowerLM": "twotower.model",
    "GenerationOutput": "twotower.decoding",
    "Decoder": "twotower.decoding",
    "MaskDiffusion": "twotower.decoding",
    "Speculative": "twotower.decoding",
    "Autoregressive": "twotower.decoding",
    "ContextTower": "twotower.towers.nemotron_h",
    "DenoiserTower": "twotower.towers.nemotron_h",
    "HybridCache": "twotower.caches",
    "KVCache": "twotower.caches",
    "Cache": "twotower.caches",
    "LlamaContextTower": "twotower.towers.llama",
    "LlamaDenoiserTower": "twotower.towers.llama",
    "Qwen2ContextTower": "twotower.towers.qwen2",
    "Qwen2DenoiserTower": "twotower.towers.qwen2",
    "MistralContextTower": "twotower.towers.mistral",
    "MistralDenoiserTower": "twotower.towers.mistral",
    "ContextTowerBase": "twotower.towers.base",
    "DenoiserTowerBase": "twotower.towers.base",
    "AdaLNSingle": "twotower.time_embedding",
    "TimeConditioning": "twotower.time_embedding",
    "NoTimeConditioning": "twotower.time_embedding",
    "Sampler": "twotower.samplers",
    "ConfidenceThreshold": "twotower.samplers",
    "TopKCommit": "twotower.samplers",
    "MockAR": "twotower.samplers",
    "MarginThreshold": "twotower.samplers",
    "EntropyBounded": "twotower.samplers",
    "NoiseSchedule": "twotower.schedules",
    "LinearSchedule": "twotower.schedules",
    "CosineSchedule": "twotower.schedules",
    "LogLinearSchedule": "twotower.schedules",
    "DenoiserFineTuning": "twotower.training",
    "ARPretraining": "twotower.training",
    "GenerationModule": "twotower.inference",
    "ByteTokenizer": "twotower.tokenizers",
    "HFTokenizer": "twotower.tokenizers",
    "TextDataModule": "twotower.data",
    "PromptDataModule": "twotower.data",
    "DistilledDataModule": "twotower.data",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'twotower' has no attribute {name!r}")
