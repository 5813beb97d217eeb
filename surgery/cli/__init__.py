"""Typer entry point. Each command group lives in its own small module; the library never imports typer.

Heavy imports (torch, transformers) happen inside command bodies so `surgery --help` is instant.
"""

from __future__ import annotations

import os
import sys
from importlib import import_module

import typer

app = typer.Typer(
    name="surgery",
    help="Surgery on saved checkpoints: merge, extract, prune and transfer parameter-efficient adapters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)



@app.callback()
def _root() -> None:
    """Surgery on saved checkpoints: merge, extract, prune and transfer parameter-efficient adapters.

    Set SURGERY_DEBUG=1 to see tracebacks.
    """


# One module per command group; each registers its commands on `app` when imported.
COMMAND_MODULES = ["inspect", "prune", "krona", "bitfit", "train", "transfer", "merge", "extract", "refine"]
for _name in COMMAND_MODULES:
    import_module(f"{__name__}.{_name}")


def main() -> None:
    from ..errors import SurgeryError

    debug = os.environ.get("SURGERY_DEBUG") == "1"
    try:
        app()
    except SurgeryError as e:
        if debug:
            raise
        print(f"surgery: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("surgery: interrupted; no output was written", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # a bug or an OS error: still one line unless debugging
        if debug:
            raise
        print(f"surgery: internal error: {type(e).__name__}: {e} (set SURGERY_DEBUG=1 for the traceback)",
              file=sys.stderr)
        sys.exit(1)
