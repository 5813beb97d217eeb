"""`surgery refine`: forward-only (MeZO) tuning of an LLM's adapter on the LLM itself."""

from __future__ import annotations

from typing import Annotated

import typer

from ..kinds import names as kind_names
from ..pipelines.refine import refine
from ..train.data import MAX_LENGTH
from ..train.zeroth import RefineConfig
from . import app
from .common import Force, JsonOut, Output, Placement, Seed, human_count, places_model, print_json
from .train import Data, EvalData, MaxLen, _quiet, _render


_D = RefineConfig()


@app.command("refine")
@places_model
def refine_cmd(
    adapter: Annotated[str, typer.Option("--adapter", help=f"The LLM's adapter, e.g. from `surgery tune-bridge` (kinds: {', '.join(kind_names('refine'))}).")],
    llm: Annotated[str, typer.Option("--llm", help="The LLM the adapter is for: a Hugging Face checkpoint directory (never modified).")],
    data: Data,
    output: Output,
    eval_data: EvalData = None,
    steps: Annotated[int, typer.Option("--steps", help="MeZO steps (two forward passes each).")] = _D.steps,
    lr: Annotated[float, typer.Option("--lr", help="Learning rate of the update lr*g*z.")] = _D.lr,
    eps: Annotated[float, typer.Option("--eps", help="Perturbation scale: the losses are taken at theta +- eps*z.")] = _D.eps,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Examples per step (both passes see the same batch).")] = _D.batch_size,
    max_length: MaxLen = MAX_LENGTH,
    log_every: Annotated[int, typer.Option("--log-every", help="Steps per recorded training loss.")] = _D.log_every,
    eval_every: Annotated[int, typer.Option("--eval-every", help="Steps between evaluations on --eval (0: before and after only).")] = _D.eval_every,
    keep_best: Annotated[bool, typer.Option("--keep-best/--keep-last", help="Write the evaluated state (input, each --eval-every, last) with the lowest loss, or the last step's.")] = _D.keep_best,
    backoff: Annotated[float, typer.Option("--backoff", help="With --keep-best: an evaluation worse than the best restores the best state and multiplies lr by this (1: never).")] = _D.backoff,
    layers: Annotated[str, typer.Option("--layers", metavar="SPEC", help="Perturb and update only these LLM layers' adapter tensors, e.g. 0-2 or 0,1,2 (STACK:0-2 on a model with several stacks); 'untuned': the layers tune-bridge's bridge did not hold (read from its tune_bridge.json); the others are written back unchanged.")] = "all",
    seed: Seed = _D.seed,
    where: Placement = None,
    force: Force = False,
    json_out: JsonOut = False,
):
    """Tune an adapter on the LLM with forward passes only (MeZO): no gradients, no optimizer state, inference memory. OUT has the input's format and refine.json."""
    _quiet()
    cfg = RefineConfig(steps=steps, lr=lr, eps=eps, batch_size=batch_size, seed=seed, log_every=log_every,
                       eval_every=eval_every, keep_best=keep_best, backoff=backoff)
    s = refine(adapter, llm, data, output, eval_data=eval_data, max_length=max_length, force=force, cfg=cfg,
               placement=where, layers=layers)
    if json_out:
        print_json(s)
        return
    _render(f"refine {s['kind']} on the {s['family']} LLM (MeZO): {s['output']}", s,
            [("tuned", f"{human_count(s['trainable'])} adapter parameters"
                       + (f" of {human_count(s['adapter_parameters'])} (layers {_layers(s['layers'])})" if s["layers"] != "all" else "")
                       + f"; LLM {human_count(s['llm_parameters'])} frozen"),
             ("steps", f"{s['steps']} on {s['device']} ({2 * s['steps']} forward passes, no backward); "
                       f"kept the state after step {s['kept_step']}")]
            + ([("lr", " -> ".join(f"{lr:g} (step {st})" for st, lr in s["lr_schedule"]))] if len(s["lr_schedule"]) > 1 else []))


def _layers(chosen: dict) -> str:
    """{stack: [0, 1, 2]} -> "0, 1, 2" (one stack) or "encoder 0, 1; decoder 2"."""
    if len(chosen) == 1:
        return ", ".join(map(str, next(iter(chosen.values()))))
    return "; ".join(f"{st} {', '.join(map(str, v))}" for st, v in chosen.items())
