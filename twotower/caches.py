"""The caches' public module: the contract every family's context cache honours and the concrete caches.

`Cache`, `KVBuffers` and `PendingBlock` are defined in `twotower.cache_base`, the bottom layer the
families build on; `HybridCache` (NemotronH) and `KVCache` (Llama-like families) live with their
families. This module sits above both and only gathers them, so that
`from twotower.caches import Cache, HybridCache, KVCache` names every cache from one place without
the families importing the module that imports them.
"""

from __future__ import annotations

from .cache_base import Cache, KVBuffers, PendingBlock
from .towers.llama.cache import KVCache
from .towers.nemotron_h.cache import HybridCache

__all__ = ["Cache", "KVBuffers", "PendingBlock", "HybridCache", "KVCache"]
