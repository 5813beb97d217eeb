"""Option types shared by commands, defined once, and small rendering helpers."""

from __future__ import annotations

import difflib
from typing import Annotated, Optional

import typer

from ..arch import use_family_files
from ..errors import SurgeryError
from ..io.model import DEVICE_MAPS, DTYPES, Placement


def choice(flag: str, values, help: str, *, aliases=(), explain=None, **kw):
    """A typer.Option whose value is one of `values` (a list the library owns, so the check and the
    help cannot disagree): --help shows them as [a|b|c], the shell completes them, and a typo is
    refused while the flags are parsed, before torch or transformers is imported, in one line that
    lists them. `aliases` are old names still accepted but not shown; `explain(value)`, if given, may
    raise a more specific error for a value outside the list (a kind this command does not take)."""
    values = tuple(values)

    def parse(value: str) -> str:
        if value in values or value in aliases:
            return value
        if explain is not None:
            explain(value)
        close = difflib.get_close_matches(value, values, n=1)
        raise SurgeryError(f"unknown {flag} {value!r}",
                           (f"did you mean {close[0]}? " if close else "") + f"choose one of {', '.join(values)}")

    return typer.Option(flag, help=help, parser=parse, metavar=f"[{'|'.join(values)}]",
                        shell_complete=lambda ctx, param, incomplete: [v for v in values if v.startswith(incomplete)],
                        **kw)


Force = Annotated[bool, typer.Option("--force", help="Replace OUT if it exists (inputs are never overwritten).")]
Output = Annotated[str, typer.Option("--output", "-o", help="Output directory (written atomically).")]
JsonOut = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of a table.")]
def _size(value: str) -> str:
    """Check --max-shard-size before any work (parse_size's OutputError reaches main() as one line)."""
    from ..io.writer import parse_size

    parse_size(value)
    return value


MaxShard = Annotated[str, typer.Option("--max-shard-size", help="Largest shard to write, e.g. 5GB or 300MB.", callback=_size)]
Family = Annotated[Optional[list[str]], typer.Option(
    "--family", metavar="FILE.json",
    help="A family map for a model type surgery lacks (repeatable; also SURGERY_FAMILIES=DIR; docs/arch.md).")]
Seed = Annotated[int, typer.Option("--seed", help="Random seed (same inputs and seed give identical output).")]
# The models a delta is taken between (extract-lora, extract-krona, extract-bitfit, merge-lora)
BaseModel = Annotated[str, typer.Argument(help="The base model directory.")]
TunedModel = Annotated[str, typer.Argument(help="The fine-tuned model directory (same architecture and sizes as BASE).")]


def Targets(what: str, default: str):
    """--targets: one syntax and one matching rule in every command (io.adapter.split_targets, peft's
    target_modules); `what` the modules are for, `default` what is taken without the flag."""
    return Annotated[Optional[list[str]], typer.Option(
        "--targets", help=f"Modules {what}, by peft's target_modules rule (a name matches that module in every layer: "
                          f"q_proj, attn.c_attn), repeatable or comma-separated. Default: {default}.")]


def CalibData(extra: str = ""):
    """--data for calibration (prune-bridge, transfer): read by io.data.documents, each record's whole text."""
    return Annotated[Optional[str], typer.Option(
        "--data", help="Calibration data: one text per line, or JSONL records (each record's whole text, any kind "
                       f"train reads: docs/train.md){extra}.")]
# How a command that runs a model loads it (surgery/io/model.py owns what they mean)
ModelDtype = Annotated[str, choice("--dtype", DTYPES, "Model dtype: auto = the checkpoint's on a GPU, float32 on the CPU.")]
Device = Annotated[Optional[str], typer.Option("--device", help="Put the whole model on one device: cpu, cuda, cuda:N, mps.")]
DeviceMap = Annotated[Optional[str], choice("--device-map", DEVICE_MAPS,
                                            "Spread the model over the GPUs (then CPU, disk) with accelerate.")]



def Plot(what: str):
    """--plot FILE.png for a command that draws `what` (surgery/plot; matplotlib is the optional extra)."""
    return Annotated[Optional[str], typer.Option("--plot", metavar="FILE.png", help=f"Also draw {what} to this PNG "
                                                 "(needs matplotlib: pip install 'surgery[plot]').")]


def say_plot(path: str | None) -> None:
    """The human report's last line when --plot drew something."""
    if path:
        console().print(f"plot: {path}", highlight=False, soft_wrap=True)


def placement(dtype: str, device: str | None, device_map: str | None):
    """The Placement of --dtype/--device/--device-map, checked before torch is imported."""
    return Placement(dtype, device, device_map).check()


def places_model(command):
    """--dtype, --device and --device-map, defined once for every command that runs a model.

    The command declares `where: Placement = None` where the three flags belong (--help lists them
    there, in this order, with Placement's defaults) and is called with their checked Placement, before
    torch is imported. Typer reads the command's signature, so the wrapper shows it one with the flags
    in place of `where`."""
    import functools
    import inspect

    sig = inspect.signature(command, eval_str=True)
    default = Placement()
    flags = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=kind, default=getattr(default, name))
             for name, kind in (("dtype", ModelDtype), ("device", Device), ("device_map", DeviceMap))]
    params = [q for p in sig.parameters.values() for q in (flags if p.name == "where" else [p])]

    @functools.wraps(command)
    def run(*args, dtype, device, device_map, **kwargs):
        return command(*args, where=placement(dtype, device, device_map), **kwargs)

    run.__signature__ = sig.replace(parameters=params)
    run.__annotations__ = {p.name: p.annotation for p in params}
    return run


def use_families(files: list[str] | None) -> None:
    """Register this command's --family files before it reads any model (pure Python: no torch)."""
    use_family_files(files or [])


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n} B"


def human_count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def console(stderr: bool = False):
    """A rich console; piped (not a terminal), it is as wide as the lines need (COLUMNS, else 200) so
    tables do not fold paths and names mid-word at rich's default 80 columns."""
    import os
    import sys

    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else int(os.environ.get("COLUMNS") or 200)
    return Console(stderr=stderr, width=width)


def print_json(obj) -> None:
    import json

    typer.echo(json.dumps(obj, indent=2, default=str))  # NaN stays visible here: it is a report, not a file


def table(title: str | None = None, **kw):
    """A rich Table whose title stays on one line: rich wraps a title to the table's width, so a long
    path over a two-column table came out folded mid-word, one piece a line, when piped."""
    from rich.table import Table
    from rich.text import Text

    return Table(title=None if title is None else Text(title, no_wrap=True, overflow="ignore"), **kw)
