"""`surgery extract-krona`: nearest Kronecker product of each linear delta, as a PEFT LoKr adapter."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..pipelines.krona import extract_krona
from . import app
from .common import BaseModel, Force, JsonOut, Output, Targets, console, human_count, print_json, table


@app.command("extract-krona")
def extract_krona_cmd(
    base: BaseModel,
    tuned: Annotated[str, typer.Argument(help="A fine-tuned model directory, or a LoRA adapter directory, holding the delta.")],
    output: Output,
    factor: Annotated[int, typer.Option("--factor", help="PEFT LoKr decompose_factor: -1 = factors near the square root.")] = -1,
    targets: Targets("to extract", "every linear layer") = None,
    force: Force = False,
    json_out: JsonOut = False,
):
    """Approximate each ΔW by the best A ⊗ B (Van Loan–Pitsianis) and write a PEFT LoKr adapter."""
    rep = extract_krona(base, tuned, output, factor=factor, targets=targets, force=force)
    if json_out:
        print_json(rep)
        return
    t = table(f"LoKr adapter -> {rep['output']} (r = alpha = {rep['r']}, scaling 1)")
    for col in ("module", "ΔW [out, in]", "w1", "w2", "rel. error", "compression"):
        t.add_column(col, justify="left" if col == "module" else "right", overflow="fold")
    for m in rep["modules"]:
        t.add_row(m["module"], "x".join(map(str, m["shape"])), "x".join(map(str, m["w1"])), "x".join(map(str, m["w2"])),
                  f"{m['rel_error']:.4f}", f"{m['compression']:.1f}x")
    t.add_row("total", "", "", "", f"{rep['rel_error']:.4f}", f"{rep['compression']:.1f}x", style="bold")
    c = console()
    c.print(t)
    c.print(f"{human_count(rep['params'])} parameters for {human_count(rep['dense_params'])} dense delta entries"
            + (f"; {len(rep['unchanged'])} selected modules unchanged, skipped" if rep["unchanged"] else ""))
    if rep["modules_to_save"]:
        c.print(f"carried over whole from the LoRA: {', '.join(rep['modules_to_save'])}")
    if rep["merge_only"]:
        mo = rep["merge_only"]
        shown = ", ".join(mo[:3]) + (f", … ({len(mo)} modules)" if len(mo) > 3 else "")
        c.print(f"[yellow]note:[/] PEFT's LoKr cannot wrap Conv1D layers ({shown}): fold this adapter with "
                "`surgery merge-lora`; PeftModel.from_pretrained will refuse it")
    lost = rep["not_captured"]
    if lost:
        shown = ", ".join(f"{n} (‖Δ‖ {v:.3g})" for n, v in lost[:3]) + (f", … ({len(lost)} tensors)" if len(lost) > 3 else "")
        c.print(f"[yellow]note:[/] TUNED also changed tensors a LoKr adapter does not hold: {shown}")
