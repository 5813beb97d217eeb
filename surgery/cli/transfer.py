"""`surgery transfer`: port an SLM adapter to an LLM without the LLM's gradients."""

from __future__ import annotations

from typing import Annotated

import typer

from ..kinds import names as kind_names
from ..pipelines.transfer import TransferConfig, transfer
from ..pipelines.transfer.run import DEPTHS, MAPS
from ..pipelines.transfer.scale import SCALES
from . import app
from ..io.model import DTYPES
from .train import _quiet
from .common import CalibData, Force, JsonOut, Output, Plot, choice, console, print_json, say_plot, table

C = TransferConfig()  # every default below is TransferConfig's


@app.command("transfer")
def transfer_cmd(
    slm: Annotated[str, typer.Option("--slm", help=f"Adapter trained on the small model: {', '.join(kind_names('transfer'))}.")],
    llm: Annotated[str, typer.Option("--llm", help="The large model directory (same family as the SLM).")],
    output: Output,
    slm_base: Annotated[str, typer.Option("--slm-base", help="The SLM directory (default: the adapter config's base).")] = None,
    data: CalibData("; --scale auto scores them as training does: a prompt/completion record by its completion") = None,
    map_kind: Annotated[str, choice("--map", MAPS, "activations: fit on calibration text; embeddings: data-free.")] = C.map_kind,
    depth: Annotated[str, choice("--depth", DEPTHS, "block: every LLM layer of an SLM layer's block; first; best: the best-fitting layer.")] = C.depth,
    samples: Annotated[int, typer.Option("--samples", help="Calibration texts to use.")] = C.samples,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per calibration text.")] = C.seq_len,
    ridge: Annotated[float, typer.Option("--ridge", help="Ridge strength, relative to the mean eigenvalue of each Gram.")] = C.ridge,
    max_memory: Annotated[str, typer.Option("--max-memory", help="Peak memory budget, e.g. 3GB: LLM layers are then captured and fitted together while they fit in it (default: one layer at a time, the least memory; a bigger window buys no time). With a budget, freed memory is handed back to the OS at once, at some CPU cost.")] = None,
    dtype: Annotated[str, choice("--dtype", DTYPES, "Dtype the streamed layers run in: auto = each checkpoint's own (the fits are float64 regardless).")] = C.dtype,
    scale: Annotated[str, choice("--scale", SCALES, "auto: size a ported LoRA's deltas by forward passes on --data (each module's effect matched to the SLM's, then a factor chosen by the LLM's loss, 0 included: never worse than no adapter on that text); none: as ported.")] = C.scale,
    plot: Plot("each fitted projection's relative residual per LLM layer and space") = None,
    force: Force = False,
    json_out: JsonOut = False,
):
    """Port ADAPTER to the LLM: layers duplicated over blocks, widths through fitted projections (W_plug)."""
    _quiet()  # --scale auto loads both models whole: no transformers loading bars on stderr
    cfg = TransferConfig(map_kind=map_kind, depth=depth, samples=samples, seq_len=seq_len, ridge=ridge, dtype=dtype, scale=scale)
    info = transfer(slm, llm, output, cfg, slm_base=slm_base, data=data, max_memory=max_memory, force=force, plot=plot)
    if json_out:
        print_json(info)
        return
    stack, blocks = next(iter(info["depth_map"].items()))
    used = info["layers_used"][stack]
    t = table(f"{info['kind']} → {output}  (map: {info['map']}, depth: {info['depth']})")
    for col in ("llm layer", "slm layer", "space", "direction", "rel. residual", "rank / dim", "tokens"):
        t.add_column(col, justify="right" if col not in ("space", "direction") else "left")
    for r in info["fits"]:
        layer = "-" if r["llm_layer"] is None else str(r["llm_layer"])
        if r["llm_layer"] is not None and not any(r["llm_layer"] in u for u in used):
            layer += " (unused)"
        resid = "silent" if r["silent"] else f"{r['rel_residual']:.2e}"
        slm_layer = "-" if r["slm_layer"] is None else str(r["slm_layer"])
        t.add_row(layer, slm_layer, r["space"], r["direction"], resid, f"{r['rank']}/{r['dim']}", str(r["tokens"]))
    c = console()
    c.print(t)
    c.print(f"depth map ({stack}): " + ", ".join(f"{i}→{b[0]}..{b[-1]}" if len(b) > 1 else f"{i}→{b[0]}"
                                                for i, b in enumerate(blocks)))
    for w in info["warnings"]:
        c.print(f"[yellow]warning:[/] {w}")
    say_plot(info["plot"])
