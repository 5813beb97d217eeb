"""`surgery train`, `surgery tune-bridge`, `surgery eval`: the training stages of Algorithm 1 and evaluation."""

from __future__ import annotations

from typing import Annotated

import typer

from ..io.adapterhub import PRESETS
from ..kinds import ALIASES, MethodOptions, get as get_kind, names as kind_names
from ..pipelines.evaluate import evaluate
from ..train.data import MAX_LENGTH
from ..train.loop import TrainConfig
from . import app
from .common import (Force, JsonOut, Output, Placement, Plot, Seed, Targets, choice, console, human_count, places_model, print_json,
                     say_plot, table)

Data = Annotated[str, typer.Option("--data", help="JSONL: {\"text\"} (LM loss); {\"prompt\",\"completion\"}, chat {\"messages\"} or Alpaca {\"instruction\",\"input\",\"output\"} (loss on the answer).")]
EvalData = Annotated[str | None, typer.Option("--eval", help="JSONL evaluated periodically and at the end.")]
Epochs = Annotated[float, typer.Option("--epochs", help="Passes over the training data (fractions allowed).")]
Lr = Annotated[float, typer.Option("--lr", help="AdamW learning rate.")]
Batch = Annotated[int, typer.Option("--batch-size", help="Examples per step.")]
T, M = TrainConfig(), MethodOptions()  # the loop's and the methods' defaults, defined there once
MaxLen = Annotated[int, typer.Option("--max-length", help="Tokens per example (long prompts lose their start).")]
EvalEvery = Annotated[int, typer.Option("--eval-every", help="Steps between evaluations (0: once per epoch).")]
LogEvery = Annotated[int, typer.Option("--log-every", help="Steps per training-loss record (their mean) in the output's history.")]
LossPlot = Plot("the training loss per --log-every steps and the eval loss and accuracy at each evaluation")


def _quiet() -> None:
    """Our own table and bar report progress; transformers' loading bars and peft's deprecation
    warnings would only bury them."""
    import warnings

    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(peft|transformers|accelerate)(\.|$)")


def _render(title: str, s: dict, extra: list[tuple[str, str]]) -> None:
    t = table(title)
    for c in ("", "loss", "perplexity", "accuracy"):
        t.add_column(c, justify="right" if c else "left")
    for name in ("before", "after"):
        m = s[name]
        acc = "-" if m["accuracy"] is None else f"{m['accuracy']:.1%} ({m['correct']}/{m['scored']})"
        t.add_row(f"{name} ({s['evaluated_on']})", f"{m['loss']:.4f}", f"{m['perplexity']:.2f}", acc)
    c = console()
    c.print(t)
    for k, v in extra:
        c.print(f"{k}: {v}")


@app.command("train")
@places_model
def train_cmd(
    model: Annotated[str, typer.Argument(help="The (small) model to tune: a Hugging Face checkpoint directory.")],
    data: Data,
    output: Output,
    method: Annotated[str, choice("--method", kind_names("train"), "Adapter kind (docs/kinds.md).", aliases=tuple(ALIASES),
                                       explain=lambda v: v in kind_names() and get_kind(v, "train"))] = "lora",
    eval_data: EvalData = None,
    epochs: Epochs = T.epochs,
    lr: Lr = T.lr,
    batch_size: Batch = T.batch_size,
    rank: Annotated[int, typer.Option("--rank", help="LoRA/LoKr rank.")] = M.rank,
    alpha: Annotated[float | None, typer.Option("--alpha", help="LoRA/LoKr alpha (default 2 x rank).")] = M.alpha,
    targets: Targets("to tune", "every linear layer in the blocks") = None,
    virtual_tokens: Annotated[int, typer.Option("--virtual-tokens", help="Prompt/prefix length.")] = M.virtual_tokens,
    adapter_config: Annotated[str, choice("--adapter-config", PRESETS, "Bottleneck adapter preset: houlsby (attention + FFN), pfeiffer (FFN).")] = M.adapter_config,
    reduction_factor: Annotated[float | None, typer.Option("--reduction-factor", help="Bottleneck width = hidden // N (default 16).")] = M.reduction_factor,
    max_length: MaxLen = MAX_LENGTH,
    eval_every: EvalEvery = T.eval_every,
    log_every: LogEvery = T.log_every,
    seed: Seed = T.seed,
    where: Placement = None,
    plot: LossPlot = None,
    force: Force = False,
    json_out: JsonOut = False,
):
    """Parameter-efficient tuning of a model (step 1 of Algorithm 1); saves a PEFT adapter (BitFit: bitfit.safetensors; bottleneck: AdapterHub layout)."""
    from ..api import train

    _quiet()
    s = train(model, data, output, method=method, eval_data=eval_data, epochs=epochs, lr=lr, batch_size=batch_size,
              rank=rank, alpha=alpha, targets=targets, virtual_tokens=virtual_tokens, adapter_config=adapter_config,
              reduction_factor=reduction_factor, max_length=max_length, eval_every=eval_every, log_every=log_every, seed=seed,
              force=force, placement=where, plot=plot)
    if not s:  # a data-parallel worker; the main process reports
        return
    if json_out:
        print_json(s)
        return
    _render(f"train {s['method']} on {s['family']}: {s['output']}", s,
            [("trainable", f"{human_count(s['trainable'])} of {human_count(s['parameters'])} parameters"),
             ("steps", f"{s['steps']} on {s['device']} (mixed precision: {s['mixed_precision']})")])
    say_plot(s["plot"])


@app.command("tune-bridge")
@places_model
def tune_bridge_cmd(
    adapter: Annotated[str, typer.Option("--adapter", help=f"The LLM's adapter (from `surgery transfer`): {', '.join(kind_names('tune-bridge'))}.")],
    bridge: Annotated[str, typer.Option("--bridge", help="The bridge directory (from `surgery prune-bridge`, with bridge.json).")],
    data: Data,
    output: Output,
    eval_data: EvalData = None,
    llm: Annotated[str | None, typer.Option("--llm", help="The LLM directory, if it moved since prune-bridge (only config.json is read, and with --prefix its weights).")] = None,
    prefix: Annotated[bool | None, typer.Option("--prefix/--no-prefix", help="Feed the bridge's kept layers the LLM's own hidden state where the bridge starts, computed once by the LLM with the adapter on, forward only (a bridge that dropped the LLM's first layers: prune-bridge --drop-by first or --memory-reduction). Default: on exactly when the bridge dropped a leading run of the LLM's layers; the output says which. A bridge that kept layer 0 has an empty prefix: a plain tune.")] = None,
    rank: Annotated[int | None, typer.Option("--rank", help="LoRA only: grow the modules of the bridge's kept layers to this rank before tuning (new A rows drawn as peft draws lora_A, seeded by --seed; new B columns zero; each module's scaling kept, written as rank_pattern/alpha_pattern), so the start is unchanged and the tune has more directions. Modules of dropped layers keep their rank. Default: the rank the bridge was planned for (prune-bridge --bridge-rank) if above the adapter's, else the adapter's.")] = None,
    epochs: Epochs = T.epochs,
    lr: Lr = T.lr,
    batch_size: Batch = T.batch_size,
    max_length: MaxLen = MAX_LENGTH,
    eval_every: EvalEvery = T.eval_every,
    log_every: LogEvery = T.log_every,
    seed: Seed = T.seed,
    where: Placement = None,
    plot: LossPlot = None,
    force: Force = False,
    json_out: JsonOut = False,
):
    """Tune an LLM's LoRA or bottleneck adapter through the bridge (W_down), then lift the update back: OUT is an adapter for the LLM."""
    from ..api import tune_bridge

    _quiet()
    s = tune_bridge(adapter, bridge, data, output, eval_data=eval_data, llm=llm, epochs=epochs, lr=lr,
                    batch_size=batch_size, max_length=max_length, eval_every=eval_every, log_every=log_every, seed=seed,
                    force=force, placement=where, plot=plot, prefix=prefix, rank=rank)
    if not s:
        return
    if json_out:
        print_json(s)
        return
    _render(f"tune-bridge ({s['family']}, {s['modules']} {s['kind']} modules, measured on the bridge): {s['output']}", s,
            [("bridge", f"{human_count(s['bridge_parameters'])} parameters (LLM {human_count(s['llm_parameters'])}); "
                        f"{human_count(s['trainable'])} trainable"),
             ("prefix", prefix_line(s["prefix"])),
             *([("rank", f"LoRA rank {s['rank']} on the kept layers ({s['rank_set_by']})")] if s["rank"] else []),
             ("steps", f"{s['steps']} on {s['device']} (mixed precision: {s['mixed_precision']})")])
    say_plot(s["plot"])


def prefix_line(p: dict) -> str:
    """Whether tune-bridge fed the bridge the LLM's own states, and why (auto: bridge_prefix.prefix_default)."""
    span = "layer 0" if p["layers"] == 1 else f"layers 0-{p['layers'] - 1}"
    state = f"on: the LLM's {span} ran forward only" if p["on"] else "off"
    why = p["set_by"] + ("" if p["why"] == "asked" else ": " + p["why"])
    return f"{state} ({why})"


@app.command("eval")
@places_model
def eval_cmd(
    model: Annotated[str, typer.Argument(help="A Hugging Face checkpoint directory.")],
    data: Data,
    adapter: Annotated[str | None, typer.Option("--adapter", help=f"An adapter to apply first: {', '.join(kind_names('eval'))}.")] = None,
    batch_size: Batch = 8,
    max_length: MaxLen = MAX_LENGTH,
    where: Placement = None,
    json_out: JsonOut = False,
):
    """Loss, perplexity and exact-match accuracy (teacher-forced argmax = greedy) of completions."""

    _quiet()
    s = evaluate(model, data, adapter=adapter, batch_size=batch_size, max_length=max_length, placement=where)
    if json_out:
        print_json({"output": None, **s})  # every command's JSON has "output"; eval writes nothing
        return
    t = table(f"eval {s['model']}" + (f" + {s['adapter']}" if s["adapter"] else ""), show_header=False)
    t.add_column(style="bold")
    t.add_column(justify="right")
    acc = "-" if s["accuracy"] is None else f"{s['accuracy']:.1%} ({s['correct']}/{s['scored']})"
    for k, v in (("loss", f"{s['loss']:.4f}"), ("perplexity", f"{s['perplexity']:.2f}"), ("accuracy", acc),
                 ("examples", str(s["examples"])), ("tokens scored", str(s["tokens"]))):
        t.add_row(k, v)
    console().print(t)
