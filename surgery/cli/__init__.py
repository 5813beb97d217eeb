"""Typer entry point. Each command group lives in its own small module; the library never imports typer.

Heavy imports (torch, transformers) happen inside command bodies so `surgery --help` is instant.
"""

from __future__ import annotations

import errno
import functools
import os
import signal
import sys
from importlib import import_module

import typer

from ..errors import SurgeryError
from ..io.hub import local_dir
from ..io.writer import abort_all

app = typer.Typer(
    name="surgery",
    help="Surgery on saved checkpoints: merge, extract, prune and transfer parameter-efficient adapters.",
    no_args_is_help=True,
    add_completion=True,  # --install-completion / --show-completion for bash, zsh, fish, PowerShell
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        typer.echo(f"surgery {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only results and errors: no notes on stderr."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Also say what is being done, on stderr."),
) -> None:
    """Surgery on saved checkpoints: merge, extract, prune and transfer parameter-efficient adapters.

    Set SURGERY_DEBUG=1 to see tracebacks.
    """
    from .. import log

    log.set_level(log.QUIET if quiet else log.VERBOSE if verbose else log.NORMAL)


# One module per command group; each registers its commands on `app` when imported.
COMMAND_MODULES = ["inspect", "prune", "krona", "bitfit", "train", "transfer", "merge", "extract", "refine"]
for _name in COMMAND_MODULES:
    import_module(f"{__name__}.{_name}")

# --help lists the commands in the order of the method (docs/method.md), then the adapter tools,
# each with its docstring's first line, whole (click would cut it at the terminal width)
PIPELINE_ORDER = ["inspect", "train", "transfer", "prune-bridge", "tune-bridge", "refine", "eval", "merge-lora",
                  "unmerge-lora", "extract-lora", "extract-krona", "extract-bitfit", "apply-bitfit"]
app.registered_commands.sort(key=lambda c: PIPELINE_ORDER.index(c.name) if c.name in PIPELINE_ORDER else len(PIPELINE_ORDER))
for _cmd in app.registered_commands:
    if _cmd.short_help is None and _cmd.callback.__doc__:
        _cmd.short_help = _cmd.callback.__doc__.strip().splitlines()[0]

# Parameters that name an input model or adapter. Each goes through io/hub.local_dir before the
# command runs, so `org/name` works wherever a directory does (tests/test_hub.py checks that every
# command's input parameter is listed here).
INPUTS = frozenset({"path", "base", "tuned", "merged", "delta", "model", "adapter", "adapters", "llm", "slm",
                    "slm_base", "bridge"})


def _resolving(fn):
    @functools.wraps(fn)  # typer reads the wrapped signature and annotations
    def run(*args, **kwargs):
        for k in INPUTS & kwargs.keys():
            v = kwargs[k]
            kwargs[k] = [local_dir(x) for x in v] if isinstance(v, (list, tuple)) else local_dir(v)
        return fn(*args, **kwargs)

    return run


for _cmd in app.registered_commands:
    _cmd.callback = _resolving(_cmd.callback)


SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(BaseException):
    """SIGINT, SIGTERM or SIGHUP, raised wherever the program is, so all three unwind the same way:
    every open output's temporary directory is removed on the way out. A BaseException, not a
    KeyboardInterrupt, because click turns KeyboardInterrupt into "Aborted!" before main() sees it,
    and so that no `except Exception` in between can swallow it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_interrupted(signum, frame):
    raise Interrupted(signum)


def os_error_line(e: OSError) -> str:
    """One line for an OSError that reached the top: what failed, on which file, and the fix."""
    where = f" {e.filename}" if e.filename else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device writing{where}; free some space or write -o to another disk (nothing was written)"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied on{where or ' a file'}; choose paths you can read and write"
    return f"{e.strerror or type(e).__name__}:{where or ' (no file named)'}; check the path and try again"


def main() -> None:
    try:
        previous = {sig: signal.signal(sig, _raise_interrupted) for sig in SIGNALS}
    except ValueError:  # not the main thread (an embedding program): leave its signals alone
        previous = {}
    try:
        _run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run() -> None:
    debug = os.environ.get("SURGERY_DEBUG") == "1"
    try:
        app()
    except SurgeryError as e:
        abort_all()
        if debug:
            raise
        print(f"surgery: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except (Interrupted, KeyboardInterrupt) as e:
        abort_all()
        signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
        print(f"surgery: interrupted ({signal.Signals(signum).name}); no output was written", file=sys.stderr)
        sys.exit(128 + signum)
    except OSError as e:  # a full disk, a path we may not write: the OS said what, we say where
        abort_all()
        if debug:
            raise
        print(f"surgery: error: {os_error_line(e)}", file=sys.stderr)
        sys.exit(1)
    except Exception as e:  # a bug: still one line unless debugging
        abort_all()
        if debug:
            raise
        print(f"surgery: internal error: {type(e).__name__}: {e} (set SURGERY_DEBUG=1 for the traceback)",
              file=sys.stderr)
        sys.exit(1)
