"""`surgery extract-bitfit` / `surgery apply-bitfit`: bias-only deltas (BitFit) out of and back into a model."""

from __future__ import annotations

from typing import Annotated

import typer

from ..pipelines.bitfit import apply_bitfit, extract_bitfit
from . import app
from .common import BaseModel, Force, JsonOut, MaxShard, Output, TunedModel, console, human_bytes, print_json, table


@app.command("extract-bitfit")
def extract_bitfit_cmd(
    base: BaseModel,
    tuned: TunedModel,
    output: Output,
    force: Force = False,
    json_out: JsonOut = False,
):
    """Save the biases (and new task heads) TUNED changed, and report what a bias-only delta drops."""
    m = extract_bitfit(base, tuned, output, force=force)
    if json_out:
        print_json({k: v for k, v in m.items() if k != "config"})
        return
    n, s = m["norms"], m["sizes"]
    t = table(f"BitFit delta -> {m['output']}", show_header=False)
    t.add_column(style="bold")
    t.add_column()
    t.add_row("biases kept", str(n["changed_biases"]))
    t.add_row("task heads kept", ", ".join(m["heads"]) or "-")
    t.add_row("delta size", f"{human_bytes(s['delta_bytes'])} ({100 * s['fraction']:.3f}% of {human_bytes(s['model_bytes'])})")
    t.add_row("‖Δ bias‖ / ‖Δ other‖", f"{n['bias_norm']:.4g} / {n['other_norm']:.4g}")
    t.add_row("Δ norm outside biases", f"{100 * n['outside_fraction']:.2f}% ({n['changed_other']} other tensors changed)")
    for name, v in n["largest_other"]:
        t.add_row("  dropped", f"{name} (‖Δ‖ {v:.4g})")
    c = console()
    c.print(t)
    if n["changed_other"]:
        c.print("[yellow]note:[/] TUNED changed tensors that are not biases; apply-bitfit will not restore them.")


@app.command("apply-bitfit")
def apply_bitfit_cmd(
    base: Annotated[str, typer.Argument(help="The base model directory the delta was extracted from.")],
    delta: Annotated[str, typer.Argument(help="The directory `surgery extract-bitfit` wrote.")],
    output: Output,
    force: Force = False,
    max_shard_size: MaxShard = "5GB",
    json_out: JsonOut = False,
):
    """Write BASE with the delta's biases and task heads: the tuned model, bit for bit."""
    r = apply_bitfit(base, delta, output, force=force, max_shard_size=max_shard_size)
    if json_out:
        print_json(r)
        return
    console().print(f"wrote {r['output']}: {r['tensors']} tensors, {r['biases']} biases from the delta"
                    + (f", task heads {', '.join(r['heads'])}" if r["heads"] else "")
                    + (f", left out {', '.join(r['dropped'])}" if r["dropped"] else ""))
