"""The tower-family registry: transformers' `config.model_type` -> the family's classes and facts.

It is the only place that turns a model type into classes: loading, conversion and training ask
`family_for(config)` instead of testing strings. It imports nothing of the package, so every module
that needs a family (the contracts in base.py, checkpoint reading in loading.py, the GGUF importer)
can ask it without importing the towers that fill it.

Who fills it: each family's package calls `base.register_family` on import, and
`twotower/towers/__init__.py` imports every built-in family. This module is a submodule of that
package, so Python runs the package's `__init__` before this module can be imported: by the time
anyone can ask, the built-in families are registered (plug-in families register through
`twotower.plugins`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

__all__ = ["TowerFamily", "family_for", "registered_families"]


@dataclass(frozen=True)
class TowerFamily:
    """One backbone architecture's classes and checkpoint facts.

    model_type: transformers' `config.model_type`; config_class: its config class;
    embed_key: the backbone name of the input embeddings (what a tied head copies);
    hf_architecture: the transformers class name written into an AR config.json;
    raw_config_check: called with a config.json dict before it is parsed, to raise a ValueError
    naming what a file of this family lacks (None: transformers' own validation only);
    float32_suffixes: weight names (by suffix) loaded and saved in float32 whatever the dtype asked
    for, as transformers keeps them.
    """

    model_type: str
    config_class: type
    context: type
    denoiser: type
    embed_key: str
    hf_architecture: str
    raw_config_check: Callable[[dict], None] | None = None
    float32_suffixes: tuple[str, ...] = ()

    def check_raw_config(self, raw: dict) -> None:
        """Raise ValueError if a config.json dict cannot be this family's (see `raw_config_check`)."""
        if self.raw_config_check is not None:
            self.raw_config_check(raw)


_FAMILIES: dict[str, TowerFamily] = {}


def add(family: TowerFamily) -> None:
    """Enter a family whose classes `base.register_family` has checked (use that, not this)."""
    _FAMILIES[family.model_type] = family


def registered_families() -> dict[str, TowerFamily]:
    """model_type -> family, every family registered so far (every built-in one: see the module docstring)."""
    return dict(_FAMILIES)


def family_for(config_or_type) -> TowerFamily:
    """The family of a config (or a model_type string); an unknown type names the registered ones."""
    model_type = config_or_type if isinstance(config_or_type, str) else getattr(config_or_type, "model_type", None)
    if model_type not in _FAMILIES:
        raise ValueError(f"no tower family is registered for model_type {model_type!r}; registered: "
                         f"{sorted(_FAMILIES)} (a new family calls twotower.towers.base.register_family)")
    return _FAMILIES[model_type]
