"""`twotower-eval` / `python -m twotower.evaluation`: lm-evaluation-harness's own command line with
the `twotower` model registered first.

Every argument is lm_eval's (`--model twotower --model_args ... --tasks ... --include_path ...`);
`--plugins module[,module]` imports the user's plug-ins (and the installed entry points are
loaded) before lm_eval parses anything; `--device` defaults to the device that exists (cuda:0, else cpu), and the generation speed (tokens per
forward, tokens per second) is printed under the results table.
lm_eval 0.4.x reads no plugin entry points, so its bare `lm_eval` command does not know
`--model twotower`; this runs the same CLI after registering it. Harness versions that load the
`lm_eval.models` entry point this package declares need no wrapper.
"""

from __future__ import annotations

import sys

from ..cli import load_cli_plugins


def main() -> None:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as e:  # the optional extra is missing
        sys.exit(f"twotower-eval needs lm-evaluation-harness: pip install -e \".[eval]\" ({e})")
    from .harness import default_device, last_speed_line, register  # imports lm_eval, checked just above

    # Plug-ins first, so a family or decoder of the user's package is known when lm_eval builds the model.
    sys.argv[1:] = load_cli_plugins(sys.argv[1:])
    register()
    # lm_eval's default device is cuda:0, which the model would then refuse with a warning on every CPU
    # run; default to the device that exists instead (an explicit --device or --config still rules).
    flags = {a.split("=")[0] for a in sys.argv[1:]}
    if "--model" in flags and not flags & {"--device", "--config", "-C"}:  # an evaluation run (not `ls`)
        sys.argv += ["--device", default_device()]
    cli_evaluate()
    line = last_speed_line()
    if line is not None:
        print(line)


if __name__ == "__main__":
    main()
