"""Plug-ins: code from outside this repository that registers tower families, decoders, samplers or
time conditionings before a command reads its settings.

Two ways in, both used by every `python -m twotower.cli` subcommand:

* ``--plugins mypkg[,otherpkg.sub]``: the named modules are imported (`load_plugins`). A module
  registers what it defines when imported (e.g. ``register_family(TowerFamily(...))``).
* Entry points of an installed distribution (`load_entry_points`), loaded once per process, in the
  groups of `GROUPS`::

      [project.entry-points."twotower.families"]
      myllama = "mypkg.family"                 # a module that registers itself, or a TowerFamily object
      [project.entry-points."twotower.decoders"]
      repeat = "mypkg.decoders:RepeatLast"     # a Decoder subclass, registered under the entry point's name
      [project.entry-points."twotower.plugins"]
      mypkg = "mypkg"                          # any module to import (samplers, time conditionings, ...)

A class named by ``class_path`` in a YAML file needs neither: jsonargparse imports it. Registries
(families by ``model_type``, decoders by name) do, since nothing imports the module that fills them.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Iterable
from types import ModuleType

from .decoding import Decoder, register_decoder
from .towers.base import TowerFamily, register_family

__all__ = ["GROUPS", "PluginError", "load_plugins", "load_entry_points", "parse_plugin_names", "strip_plugins_option"]

GROUPS = ("twotower.families", "twotower.decoders", "twotower.plugins")
OPTION = "--plugins"

# Groups already loaded in this process: entry points run registration code, once is enough.
_LOADED_GROUPS: set[str] = set()


class PluginError(ImportError):
    """A plug-in module or entry point that could not be imported; the message names it and the fix."""


# ---- --plugins -------------------------------------------------------------------------------


def parse_plugin_names(value: str) -> list[str]:
    """"a, b.c" -> ["a", "b.c"]; refuses an empty list or a name that is not a dotted module name."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    if not names:
        raise PluginError(f"{OPTION} needs one module name or more, comma separated (e.g. {OPTION} mypkg), "
                          f"got {value!r}")
    for name in names:
        if not all(part.isidentifier() for part in name.split(".")):
            raise PluginError(f"{OPTION}: {name!r} is not a module name (dotted Python identifiers, e.g. "
                              "mypkg or mypkg.families)")
    return names


def strip_plugins_option(argv: list[str]) -> tuple[list[str], list[str]]:
    """Take every ``--plugins X`` / ``--plugins=X`` out of `argv` (before or after the subcommand).

    Returns ``(module names, the other arguments in order)``: the parsers after this one never see
    the option, so a subcommand's own options and saved configs are unchanged.
    """
    names: list[str] = []
    rest: list[str] = []
    args = iter(argv)
    for arg in args:
        if arg == OPTION:
            value = next(args, None)
            if value is None or value.startswith("--"):
                raise PluginError(f"{OPTION} needs a value: {OPTION} mypkg[,otherpkg]")
            names += parse_plugin_names(value)
        elif arg.startswith(OPTION + "="):
            names += parse_plugin_names(arg[len(OPTION) + 1:])
        else:
            rest.append(arg)
    return names, rest


def load_plugins(names: Iterable[str]) -> list[ModuleType]:
    """Import each module of `names` (what ``--plugins`` lists), in order; returns the modules.

    A module that cannot be found raises `PluginError` naming it and the fix; an error raised by the
    module's own code is reported with the module's name and the original exception chained.
    """
    return [_import_plugin(name) for name in names]


def _import_plugin(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name is not None and name.startswith(e.name) and name[len(e.name):][:1] in ("", "."):
            raise PluginError(f"{OPTION}: no module named {name!r}; is the package that provides it installed "
                              "(pip install ...) or its folder on PYTHONPATH?") from e
        raise PluginError(f"{OPTION}: importing {name!r} failed: {type(e).__name__}: {e}") from e
    except Exception as e:  # the plug-in's own code failed: name it, keep the traceback chained
        raise PluginError(f"{OPTION}: importing {name!r} failed: {type(e).__name__}: {e}") from e


# ---- entry points ----------------------------------------------------------------------------


def load_entry_points(groups: Iterable[str] = GROUPS, *, reload: bool = False) -> list[str]:
    """Load every installed entry point of `groups` (default: all of `GROUPS`), each group once per
    process (`reload=True` loads it again, e.g. after adding a path to sys.path).

    Returns the loaded entry points as ``"group:name"``. A failing entry point raises `PluginError`
    naming it, its distribution and the exception.
    """
    loaded = []
    for group in groups:
        if group in _LOADED_GROUPS and not reload:
            continue
        for ep in importlib.metadata.entry_points(group=group):
            _register(group, ep.name, _load_entry_point(ep))
            loaded.append(f"{group}:{ep.name}")
        _LOADED_GROUPS.add(group)
    return loaded


def _load_entry_point(ep: importlib.metadata.EntryPoint):
    try:
        return ep.load()
    except Exception as e:
        dist = getattr(getattr(ep, "dist", None), "name", None) or "an installed distribution"
        raise PluginError(f"entry point {ep.name!r} = {ep.value!r} (group {ep.group!r}, from {dist}) failed to "
                          f"load: {type(e).__name__}: {e}; fix or uninstall that package") from e


def _register(group: str, name: str, obj) -> None:
    """What an entry point's object needs beyond its import: a TowerFamily is registered; a Decoder
    subclass is registered under the entry point's name."""
    if group == "twotower.families":
        _register_family(obj)
    elif group == "twotower.decoders":
        _register_decoder(name, obj)


def _register_family(obj) -> None:
    if isinstance(obj, TowerFamily):
        register_family(obj)


def _register_decoder(name: str, obj) -> None:
    if isinstance(obj, type) and issubclass(obj, Decoder):
        register_decoder(name, obj)
