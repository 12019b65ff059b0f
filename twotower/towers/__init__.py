"""The tower families. Importing this package registers every built-in family
(`base.registered_families()`): NemotronH (context.py, denoiser.py) and Llama (llama/)."""

from . import denoiser as _nemotron_h  # noqa: F401  (registers "nemotron_h")
from . import llama as _llama  # noqa: F401,E402  (registers "llama")
