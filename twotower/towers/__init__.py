"""The tower families. Importing this package registers every built-in family
(`base.registered_families()`): NemotronH (context.py, denoiser.py) and Llama (llama/)."""

# Importing each family's module registers it ("nemotron_h", "llama").
from . import denoiser, llama  # noqa: F401,E402
