"""Typer entry point. Each command group lives in its own small module; the library never imports typer.

Heavy imports (torch, transformers) happen inside command bodies so `surgery --help` is instant.
"""

from __future__ import annotations

import functools
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
COMMAND_MODULES = ["inspect", "prune", "krona", "bitfit", "train", "transfer", "merge", "extract"]
for _name in COMMAND_MODULES:
    import_module(f"{__name__}.{_name}")

# Parameters that name an input model or adapter. Each goes through io/hub.local_dir before the
# command runs, so `org/name` works wherever a directory does (tests/test_hub.py checks that every
# command's input parameter is listed here).
INPUTS = frozenset({"path", "base", "tuned", "merged", "delta", "model", "adapter", "adapters", "llm", "slm",
                    "slm_base", "bridge"})


def _resolving(fn):
    @functools.wraps(fn)  # typer reads the wrapped signature and annotations
    def run(*args, **kwargs):
        from ..io.hub import local_dir

        for k in INPUTS & kwargs.keys():
            v = kwargs[k]
            kwargs[k] = [local_dir(x) for x in v] if isinstance(v, (list, tuple)) else local_dir(v)
        return fn(*args, **kwargs)

    return run


for _cmd in app.registered_commands:
    _cmd.callback = _resolving(_cmd.callback)


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
