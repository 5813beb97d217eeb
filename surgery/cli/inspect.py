"""`surgery inspect`: what is in a checkpoint or adapter directory."""

from __future__ import annotations

from typing import Annotated

import typer

from ..pipelines.inspect import describe
from . import app
from .common import Family, JsonOut, console, human_bytes, human_count, print_json, table, use_families


@app.command("inspect")
def inspect_cmd(
    path: Annotated[str, typer.Argument(help="A model directory (config.json + weights) or a PEFT adapter directory.")],
    json_out: JsonOut = False,
    family: Family = None,
):
    """Show family, widths, parameters, dtypes and shards of a model, or type, rank and targets of an adapter."""
    use_families(family)
    info = describe(path)
    if json_out:
        print_json({"output": None, **info})  # every command's JSON has "output"; inspect writes nothing
        return
    t = table(info["path"], show_header=False)
    t.add_column(style="bold")
    t.add_column()
    for k, v in info.items():
        if k == "path":
            continue
        if k == "parameters":
            v = f"{human_count(v)} ({v:,})"
        elif k == "bytes":
            v = human_bytes(v)
        elif k == "shards":
            v = ", ".join(f"{s['file']} ({human_bytes(s['bytes'])})" for s in v)
        elif k in ("modules",) and len(v) > 8:
            v = ", ".join(v[:4]) + f", … ({len(v)} modules)"
        elif isinstance(v, (list, tuple)):
            v = ", ".join(map(str, v)) if v else "-"
        elif isinstance(v, dict):
            v = ", ".join(f"{a}: {b}" for a, b in v.items()) if v else "-"
        t.add_row(k, str(v))
    console().print(t)
