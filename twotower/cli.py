"""Command line: LightningCLI for fit / validate / predict, plus checkpoint tools.

    python -m twotower.cli fit --config recipes/denoiser.yaml
    python -m twotower.cli predict --config recipes/generate.yaml
    python -m twotower.cli convert AR_DIR OUT_DIR        # AR checkpoint (any registered family) -> two-tower
    python -m twotower.cli export RUN.ckpt OUT_DIR       # fine-tuning checkpoint -> two-tower layout
                                                        # (a .ckpt file or a sharded FSDP2 checkpoint folder)
    python -m twotower.cli import-gguf FILE.gguf OUT_DIR # llama.cpp GGUF (Llama family) -> backbone folder
    python -m twotower.cli serve --config recipes/serve.yaml [--port 8000]   # OpenAI-compatible server

`--plugins mypkg[,other]` (before or after the subcommand, for every subcommand) imports your own
modules first: tower families, decoders, samplers, time conditionings (`twotower.plugins`, which also
loads the installed entry points of the groups twotower.families / twotower.decoders / twotower.plugins).

Every model and data component is chosen in YAML by `class_path` / `init_args`. `--config` takes a
path or the name of a recipe shipped with the package (`--config generate`, from any directory), and
model folders may be given by built-in name (`embedded`, `embedded-backbone`; see `twotower.hub`).

Each subcommand imports what it runs inside the function that runs it: `serve` needs the [serve]
extra and no Lightning, `import-gguf` the [gguf] extra and no model, `fit` / `predict` Lightning and
no FastAPI, so no command pays for (or fails on) another command's heavy or optional dependencies.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import inspect
import re
import sys
from argparse import ArgumentError
from pathlib import Path

from .hub import find_recipe
from .plugins import PluginError, load_entry_points, load_plugins, strip_plugins_option
from .tokenizers import DEFAULT_MASK_TOKEN_ID

TOOLS = ("convert", "export", "import-gguf", "serve")
# The key under which `parser_kwargs` hands each subcommand parser its name (taken out before the
# parser is built, so jsonargparse never sees it).
SUBCOMMAND_KEY = "twotower_subcommand"
PLUGINS_HELP = ("--plugins MODULE[,MODULE]: import these modules first (your tower families, decoders, samplers, "
                "time conditionings); entry points in the groups twotower.families, twotower.decoders and "
                "twotower.plugins are loaded too (see twotower.plugins)")


def convert(ar_dir: str, out_dir: str, *, block_size: int = 16, mask_token_id: int = DEFAULT_MASK_TOKEN_ID,
            time_init: str = "identity", max_shard_size: int | None = None, expert_layout: str = "fused",
            shifted: bool = False) -> Path:
    """AR checkpoint directory (or built-in name) -> released two-tower directory, ready to fine-tune or run.

    shifted: mark the model AR-aligned (see `TwoTowerLM`); fine-tune it with `shifted=True` too.
    """
    from .model import TwoTowerLM  # only the checkpoint tools load the model (see the module docstring)

    model = TwoTowerLM.from_backbone(ar_dir, block_size=block_size, mask_token_id=mask_token_id, time_init=time_init,
                                     shifted=shifted)
    model.save_pretrained(out_dir, max_shard_size=max_shard_size, expert_layout=expert_layout)
    return Path(out_dir)


def export(ckpt_path: str, out_dir: str, *, backbone: str | None = None, max_shard_size: int | None = None,
           expert_layout: str = "fused") -> Path:
    """Fine-tuning checkpoint (.ckpt, denoiser side only) -> released two-tower directory.

    The frozen context tower is read from the path the checkpoint references (or `backbone`, a
    folder or built-in name); the conversion is `twotower.export.export_checkpoint`, which also
    writes the tokenizer the model was fine-tuned with.
    """
    from .export import export_checkpoint  # builds the model (see the module docstring)

    return export_checkpoint(ckpt_path, out_dir, backbone=backbone, max_shard_size=max_shard_size,
                             expert_layout=expert_layout)


def _tool_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m twotower.cli", epilog=PLUGINS_HELP)
    sub = p.add_subparsers(dest="tool", required=True)
    c = sub.add_parser("convert", help="AR checkpoint of any registered tower family (NemotronH, Llama, Qwen2, "
                                       "Mistral, plug-ins) -> two-tower checkpoint (identity-init denoiser)")
    c.add_argument("ar_dir")
    c.add_argument("out_dir")
    c.add_argument("--block-size", type=int, default=16)
    c.add_argument("--mask-token-id", type=int, default=3)
    c.add_argument("--time-init", choices=["identity", "pixart"], default="identity")
    c.add_argument("--max-shard-size", type=int, default=None, help="bytes per safetensors shard")
    c.add_argument("--expert-layout", choices=["fused", "per_expert"], default="fused")
    c.add_argument("--shifted", action="store_true", help="AR-aligned denoiser (output i predicts position i + 1)")
    e = sub.add_parser("export", help="fine-tuning .ckpt (or sharded checkpoint folder) -> two-tower directory")
    e.add_argument("ckpt")
    e.add_argument("out_dir")
    e.add_argument("--backbone", default=None, help="the frozen context tower, if it moved since training")
    e.add_argument("--max-shard-size", type=int, default=None)
    e.add_argument("--expert-layout", choices=["fused", "per_expert"], default="fused")
    g = sub.add_parser("import-gguf", help="llama.cpp .gguf file (Llama family) -> backbone folder (needs [gguf])")
    g.add_argument("gguf")
    g.add_argument("out_dir")
    g.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="weights' dtype on disk")
    a = p.parse_args(argv)
    if a.tool == "import-gguf":
        from .gguf import import_gguf  # the [gguf] extra's importer (see the module docstring)

        out = import_gguf(a.gguf, a.out_dir, dtype=a.dtype)
    elif a.tool == "convert":
        out = convert(a.ar_dir, a.out_dir, block_size=a.block_size, mask_token_id=a.mask_token_id,
                      time_init=a.time_init, max_shard_size=a.max_shard_size, expert_layout=a.expert_layout,
                      shifted=a.shifted)
    else:
        out = export(a.ckpt, a.out_dir, backbone=a.backbone, max_shard_size=a.max_shard_size,
                     expert_layout=a.expert_layout)
    print(f"wrote {out}")
    return 0


# ---- bad options: the error first, with the closest valid key ------------------------------------

def _closest(word: str, candidates) -> str | None:
    found = difflib.get_close_matches(word, sorted(set(candidates)), n=1, cutoff=0.6)
    return found[0] if found else None


def _init_args(class_path: str) -> list[str]:
    """The constructor arguments of the class `class_path` names (none if it cannot be imported)."""
    module, _, name = class_path.rpartition(".")
    try:
        params = inspect.signature(getattr(importlib.import_module(module), name)).parameters.values()
    except (ImportError, AttributeError, ValueError, TypeError):
        return []
    return [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def option_hint(message: str, keys) -> str | None:
    """One line for a jsonargparse error about an unknown option or subcommand, naming it and the
    closest valid one (a class's constructor argument, a key of `keys`, or a subcommand); None for
    other errors."""
    nested = re.search(r"Option '([^']+)' is not accepted", message)
    owners = re.findall(r"class_path '([^']+)'", message[: nested.start()]) if nested else []
    if owners:  # an init_args key of the innermost class named before it
        bad, owner, near = nested[1], owners[-1], _closest(nested[1], _init_args(owners[-1]))
        return f"'{bad}' is not an argument of {owner}" + (f"; did you mean '{near}'?" if near else "")
    top = re.search(r"does not accept option '([^']+)'|unrecognized arguments: --([^\s=]+)", message)
    if top:
        bad = top[1] or top[2]
        near = _closest(bad, keys)
        return f"unknown option '{bad}'" + (f"; did you mean '{near}'?" if near else "")
    choice = re.search(r"invalid choice: '([^']+)' \(choose from (.*)\)", message)
    if choice:
        near = _closest(choice[1], re.findall(r"'([^']+)'", choice[2]))
        return f"unknown subcommand '{choice[1]}'" + (f"; did you mean '{near}'?" if near else "")
    return None


def model_tokenizer(model):
    """The instantiated model's tokenizer (GenerationModule: the checkpoint's own, or the one it was given)."""
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError(f"{type(model).__name__} has no tokenizer to hand to the data module")
    return tok


def _cli_class():
    from lightning.pytorch.cli import LightningCLI  # fit / validate / predict only (see the module docstring)

    class TwoTowerCLI(LightningCLI):
        """LightningCLI whose `predict` links the model's tokenizer into the data module
        (`data.init_args.tokenizer` is computed from the instantiated model, never set twice), and
        whose bad options are reported in a line or two, the closest valid key suggested, instead of
        after the whole usage text."""

        def init_parser(self, **kwargs):
            # Parsers raise instead of printing their usage (about 40 lines) above the error;
            # parse_arguments reports it, then restores the default for later errors.
            # Each subcommand parser is built with parser_kwargs[subcommand] (`cli_main`), which
            # carries its name: add_arguments_to_parser then knows which parser it extends.
            subcommand = kwargs.pop(SUBCOMMAND_KEY, None)
            parser = super().init_parser(**{**kwargs, "exit_on_error": False})
            self.__dict__.setdefault("_parsers", []).append(parser)
            self.__dict__.setdefault("_subcommand_of", {})[id(parser)] = subcommand
            return parser

        def parse_arguments(self, parser, args) -> None:
            try:
                super().parse_arguments(parser, args)
            except ArgumentError as e:
                sys.exit(self._report(str(e), sys.argv[1:] if args is None else args))
            finally:
                for p in self._parsers:
                    p.exit_on_error = True

        def _report(self, message: str, args) -> int:
            keys = [k for p in self._parsers for k in p.get_defaults().keys()]
            sub = next((a for a in args if a in self.subcommands()), None)
            hint = option_hint(message, keys)
            sys.stderr.write(f"error: {hint or message}\n")
            sys.stderr.write(f"tip: python -m twotower.cli {sub or '{' + ','.join(self.subcommands()) + '}'} --help "
                             "lists the accepted options\n")
            return 2

        def add_arguments_to_parser(self, parser) -> None:
            if self._subcommand_of.get(id(parser)) == "predict":
                parser.link_arguments("model", "data.init_args.tokenizer", compute_fn=model_tokenizer,
                                      apply_on="instantiate")

    return TwoTowerCLI


def cli_main(args: list[str] | None = None, run: bool = True):
    """LightningCLI over any LightningModule / LightningDataModule named in the YAML; `predict`
    hands the model's tokenizer to the data module (`TwoTowerCLI`). `--plugins` in `args` is
    honoured as by `main` (`load_cli_plugins`)."""
    import lightning as L  # fit / validate / predict only (see the module docstring)

    if isinstance(args, (list, tuple)):  # main() has already taken --plugins out of sys.argv
        args = load_cli_plugins(list(args))
    cls = _cli_class()
    return cls(
        L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
        save_config_kwargs={"overwrite": True}, args=args, run=run, auto_configure_optimizers=False,
        parser_kwargs=parser_kwargs(cls.subcommands()),
    )


def parser_kwargs(subcommands) -> dict:
    """LightningCLI's `parser_kwargs`: the main parser and each subcommand's (a key per subcommand
    is LightningCLI's public way to configure that parser alone) get the --plugins note in their
    help, and each subcommand parser its own name under SUBCOMMAND_KEY (read by `init_parser`)."""
    return {"epilog": PLUGINS_HELP, **{name: {SUBCOMMAND_KEY: name, "epilog": PLUGINS_HELP} for name in subcommands}}


def resolve_configs(argv: list[str]) -> list[str]:
    """`--config NAME` -> the shipped recipe of that name (`hub.find_recipe`: "generate", "generate.yaml"
    or "recipes/generate.yaml" from any directory); existing paths, and values that match no shipped
    recipe (jsonargparse also takes inline YAML), are left as they are."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--config" and i + 1 < len(out):
            found = find_recipe(out[i + 1])
            out[i + 1] = out[i + 1] if found is None else str(found)
        elif arg.startswith("--config="):
            found = find_recipe(arg.removeprefix("--config="))
            out[i] = arg if found is None else f"--config={found}"
    return out


def load_cli_plugins(argv: list[str]) -> list[str]:
    """Load the installed entry points and the ``--plugins`` modules (`twotower.plugins`), before any
    parser reads the arguments; returns `argv` without the --plugins option."""
    names, argv = strip_plugins_option(argv)
    load_entry_points()
    load_plugins(names)
    return argv


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
    try:
        argv = load_cli_plugins(sys.argv[1:] if argv is None else list(argv))
    except PluginError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    argv = resolve_configs(argv)
    if from_command_line:
        sys.argv[1:] = argv  # LightningCLI reads sys.argv itself
    if argv and argv[0] == "serve":  # jsonargparse settings (recipes/serve.yaml); needs the [serve] extra
        from .serving.app import main as serve_main  # the [serve] extra (see the module docstring)

        return serve_main(argv[1:])
    if argv and argv[0] in TOOLS:
        return _tool_main(argv)
    # LightningCLI reads sys.argv itself; handing it the same list again only triggers a warning.
    from .data.prompts import PromptError  # the data package loads Lightning (see the module docstring)

    try:
        cli_main(None if from_command_line else argv)
    except PromptError as e:  # every bad prompt, found before the first forward: the list, not a traceback
        sys.stderr.write(f"error: {e}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
