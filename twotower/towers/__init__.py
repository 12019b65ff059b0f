"""The tower families. The root holds what every family shares: the contracts and the registry
(base.py), shared helpers (common.py), checkpoint names, reading and writing (checkpoints.py,
loading.py, lazy.py, saving.py) and denoiser builders (adapters.py). Each family is a subpackage
that registers itself on import: nemotron_h/, llama/, qwen2/, mistral/.
"""

# Importing each family's package registers it ("nemotron_h", "llama", "qwen2", "mistral").
from . import llama, mistral, nemotron_h, qwen2  # noqa: F401,E402
