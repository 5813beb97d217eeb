"""`surgery merge-lora` and `surgery unmerge-lora`: fold adapters into a checkpoint or take one out."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..kinds import names as kind_names
from ..pipelines.merge import merge_lora, unmerge_lora
from . import app
from ..io.model import DTYPES
from .common import (BaseModel, Family, Force, JsonOut, MaxShard, Output, choice, console, human_bytes, print_json, table,
                    use_families)

Dtype = Annotated[str, choice("--dtype", DTYPES, "Output dtype of floating tensors (auto: keep each tensor's).")]


def _report(info: dict, title: str, json_out: bool) -> None:
    if json_out:
        print_json(info)
        return
    err = console(stderr=True)
    for note in info["notes"]:
        err.print(f"note: {note}", highlight=False, soft_wrap=True)
    t = table(title, show_header=False)
    t.add_column(style="bold")
    t.add_column()
    for a in info["adapters"]:
        t.add_row("adapter", f"{a['path']} ({a['type']}, weight {a['weight']:g})")
    t.add_row("modules", str(info["modules"]))
    t.add_row("tensors changed", f"{info['tensors_changed']} of {info['tensors_written']}")
    if info["untied"]:
        t.add_row("untied", ", ".join(info["untied"]))
    if info["dora_modules"]:
        t.add_row("DoRA modules", str(info["dora_modules"]))
    t.add_row("written", f"{human_bytes(info['bytes'])} in {info['shards']} shard(s), {info['dtype']}")
    t.add_row("time", f"{info['seconds']:.2f} s")
    t.add_row("output", info["output"])
    console().print(t)


@app.command("merge-lora")
def merge_cmd(
    base: BaseModel,
    adapters: Annotated[list[str], typer.Argument(help=f"One or more PEFT adapter directories ({', '.join(kind_names('merge-lora'))}).")],
    output: Output = ...,
    weight: Annotated[Optional[list[float]], typer.Option("--weight", help="Weight per adapter, in order (default 1).")] = None,
    dtype: Dtype = "auto",
    max_shard_size: MaxShard = "5GB",
    force: Force = False,
    family: Family = None,
    json_out: JsonOut = False,
):
    """Fold adapters into the base weights and write a standalone checkpoint."""
    use_families(family)
    info = merge_lora(base, adapters, output, weights=weight, dtype=dtype, max_shard_size=max_shard_size, force=force)
    _report(info, "merge-lora", json_out)


@app.command("unmerge-lora")
def unmerge_cmd(
    merged: Annotated[str, typer.Argument(help="A checkpoint with the adapter merged in.")],
    adapter: Annotated[str, typer.Argument(help="The PEFT adapter directory that was merged.")],
    output: Output = ...,
    weight: Annotated[float, typer.Option("--weight", help="The weight it was merged with.")] = 1.0,
    dtype: Dtype = "auto",
    max_shard_size: MaxShard = "5GB",
    force: Force = False,
    family: Family = None,
    json_out: JsonOut = False,
):
    """Take an adapter out of a merged checkpoint again (W -= delta)."""
    use_families(family)
    info = unmerge_lora(merged, adapter, output, weight=weight, dtype=dtype, max_shard_size=max_shard_size, force=force)
    _report(info, "unmerge-lora", json_out)
