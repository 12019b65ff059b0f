"""`twotower-eval` / `python -m twotower.evaluation`: lm-evaluation-harness's own command line with
the `twotower` model registered first.

Every argument is lm_eval's (`--model twotower --model_args ... --tasks ... --include_path ...`).
lm_eval 0.4.x reads no plugin entry points, so its bare `lm_eval` command does not know
`--model twotower`; this runs the same CLI after registering it. Harness versions that load the
`lm_eval.models` entry point this package declares need no wrapper.
"""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from lm_eval.__main__ import cli_evaluate
    except ImportError as e:  # the optional extra is missing
        sys.exit(f"twotower-eval needs lm-evaluation-harness: pip install -e \".[eval]\" ({e})")
    from .harness import register

    register()
    cli_evaluate()


if __name__ == "__main__":
    main()
