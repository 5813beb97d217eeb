"""`surgery prune-bridge`: prune an LLM into a bridge model (Jin, Zhang & Zong, EMNLP 2023)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..errors import SurgeryError
from ..pipelines.bridge_plan import RESIDUAL
from ..pipelines.importance import METHODS as IMPORTANCE
from ..pipelines.prune import DEFAULT_REDUCTION, DROP_BY, PruneConfig, prune_bridge
from . import app
from .common import (CalibData, Force, JsonOut, MaxShard, Output, Placement, Plot, Seed, choice, console, human_count, places_model,
                     print_json, say_plot, table)

C = PruneConfig()  # every default below is PruneConfig's
Size = lambda flag, what: Annotated[Optional[int], typer.Option(flag, help=f"{what} of the bridge (overrides --reduction).")]  # noqa: E731


@app.command("prune-bridge")
@places_model
def prune_bridge_cmd(
    llm: Annotated[str, typer.Argument(help="The LLM's model directory (config.json, weights, tokenizer).")],
    output: Output,
    data: CalibData(),
    reduction: Annotated[Optional[float], typer.Option("--reduction", help=f"Keep about 1/R of the non-embedding parameters (default {DEFAULT_REDUCTION:g}, as the paper).")] = C.reduction,
    memory_reduction: Annotated[Optional[float], typer.Option("--memory-reduction", help="Instead of --reduction: size the bridge so that its `tune-bridge --prefix` training step holds at most 1/M of what LoRA on the whole LLM holds at --train-shape (tensor count: weights, saved activations, LoRA gradient and AdamW state). Keeps the LLM's last layers: as many kv groups as fit, then MLP neurons; a previous layer only when the whole last one fits.")] = C.memory_reduction,
    train_shape: Annotated[Optional[str], typer.Option("--train-shape", help=f"With --memory-reduction: the training step both are counted at, BATCHxTOKENS (tune-bridge's --batch-size x --max-length; default {C.train_batch}x{C.train_length}).")] = None,
    lora_rank: Annotated[Optional[int], typer.Option("--lora-rank", help=f"With --memory-reduction: the rank of the LoRA on every linear layer of the LLM it is measured against (default {C.lora_rank}).")] = None,
    bridge_rank: Annotated[Optional[int], typer.Option("--bridge-rank", help="With --memory-reduction: the rank the bridge's layers are tuned at (tune-bridge --rank; default --lora-rank).")] = None,
    residual: Annotated[str, choice("--residual", RESIDUAL, "keep: every residual channel stays and heads, neurons and layers are cut (default); prune: cut the residual width too (the narrow LST bridge).")] = C.residual,
    drop_layers: Annotated[Optional[str], typer.Option("--drop-layers", help="Leave out N whole layers per stack (tune-bridge keeps their adapter as given); auto (default): depth shares the reduction with heads and neurons (about 1/sqrt(R) of the layers kept; with the residual kept and no explicit widths), 0: widths only.")] = C.drop_layers,
    drop_by: Annotated[Optional[str], choice("--drop-by", DROP_BY, "Which layers --drop-layers leaves out: similarity (default; lowest block influence, 1 - cos(in, out)) or fisher (lowest Fisher of a per-layer mask), or first (the first layers: the kept ones then read the LLM's own hidden state under tune-bridge --prefix; --memory-reduction's).")] = C.drop_by,
    hidden_size: Size("--hidden-size", "Residual width (with --residual prune)") = C.hidden_size,
    intermediate_size: Size("--intermediate-size", "MLP width") = C.intermediate_size,
    num_attention_heads: Size("--num-attention-heads", "Attention heads") = C.num_attention_heads,
    num_key_value_heads: Size("--num-key-value-heads", "Key/value heads") = C.num_key_value_heads,
    samples: Annotated[int, typer.Option("--samples", help="Calibration blocks to use.")] = C.samples,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per calibration block.")] = C.seq_len,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Blocks per forward/backward pass.")] = C.batch_size,
    importance: Annotated[str, choice("--importance", IMPORTANCE, "fisher-mask: Kwon et al. 2022; fisher-param: LST; magnitude; random: a control.")] = C.importance,
    seed: Seed = C.seed,
    force: Force = False,
    max_shard_size: MaxShard = C.max_shard_size,
    where: Placement = None,  # --dtype/--device/--device-map; default: device_map auto with a GPU, the CPU otherwise
    max_memory: Annotated[Optional[str], typer.Option("--max-memory", help="Memory budget per device for the calibration passes, e.g. cpu=8GiB or 0=70GiB,cpu=100GiB; accelerate offloads the rest to disk.")] = None,
    plot: Plot("each layer's head and neuron importance, kept and dropped,") = None,
    json_out: JsonOut = False,
):
    """Prune LLM into a smaller checkpoint of the same family, by Fisher information on calibration data."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    planned = {"--train-shape": train_shape, "--lora-rank": lora_rank, "--bridge-rank": bridge_rank}
    if memory_reduction is None and (alone := [k for k, v in planned.items() if v is not None]):
        raise SurgeryError(f"{alone[0]} only applies with --memory-reduction", f"add --memory-reduction M, or leave out {alone[0]}")
    batch, length = parse_shape(train_shape) if train_shape else (C.train_batch, C.train_length)
    cfg = PruneConfig(reduction=reduction, residual=residual, drop_layers=drop_layers, drop_by=drop_by,
                      hidden_size=hidden_size, intermediate_size=intermediate_size,
                      num_attention_heads=num_attention_heads, num_key_value_heads=num_key_value_heads,
                      samples=samples, seq_len=seq_len, batch_size=batch_size, importance=importance, seed=seed,
                      max_shard_size=max_shard_size, memory_reduction=memory_reduction, train_batch=batch,
                      train_length=length, lora_rank=C.lora_rank if lora_rank is None else lora_rank,
                      bridge_rank=bridge_rank)
    r = prune_bridge(llm, output, data, cfg, force=force, placement=where, max_memory=parse_max_memory(max_memory),
                     plot=plot)
    if json_out:
        print_json({k: v for k, v in r.items() if k != "kept"})
        return
    render(r)
    say_plot(r["plot"])


def parse_shape(text: str) -> tuple[int, int]:
    """"16x64" -> (16, 64): --train-shape's batch x tokens."""
    b, sep, t = text.lower().replace("×", "x").partition("x")
    if not (sep and b.strip().isdigit() and t.strip().isdigit() and int(b) > 0 and int(t) > 0):
        raise SurgeryError(f"--train-shape {text!r} is not BATCHxTOKENS", "write e.g. --train-shape 16x64 (tune-bridge's --batch-size x --max-length)")
    return int(b), int(t)


def parse_max_memory(text: str | None) -> dict | None:
    """"cpu=8GiB,0=70GiB" -> {"cpu": "8GiB", 0: "70GiB"} (accelerate's max_memory; GPUs by index)."""
    if not text:
        return None
    out = {}
    for part in text.split(","):
        dev, sep, size = part.strip().partition("=")
        if not sep or not dev or not size:
            raise SurgeryError(f"--max-memory {text!r}: {part!r} is not DEVICE=SIZE", "write e.g. cpu=8GiB or 0=70GiB,cpu=100GiB")
        out[int(dev) if dev.isdigit() else dev] = size
    return out


def render(r: dict) -> None:
    p, loss = r["parameters"], r["calibration_loss"]
    head = table(f"bridge {r['output']}", show_header=False)
    head.add_column(style="bold")
    head.add_column()
    head.add_row("from", f"{r['source']} ({r['family']})")
    head.add_row("importance", f"{r['importance']} on {r['samples']} x {r['seq_len']} tokens (seed {r['seed']})")
    head.add_row("sizes", ", ".join(f"{k} {r['llm_sizes'][k]} -> {v}" for k, v in r["sizes"].items()))
    lay = r["layers"]
    head.add_row("layers", ", ".join(f"{st} {lay['llm'][st]} -> {lay['bridge'][st]}" for st in lay["llm"])
                 + "".join(f" (dropped {st} {v}, by {lay['drop_by']})" for st, v in lay["dropped"].items() if v))
    head.add_row("parameters", f"{human_count(p['llm'])} -> {human_count(p['bridge'])} ({p['bridge'] / p['llm']:.1%})")
    head.add_row("non-embedding", f"{human_count(p['llm_non_embedding'])} -> {human_count(p['bridge_non_embedding'])} "
                 f"({p['bridge_non_embedding'] / max(p['llm_non_embedding'], 1):.1%})")
    if r.get("memory"):
        m = r["memory"]
        head.add_row("training memory", f"tune-bridge --prefix step {m['bridge_bytes'] / 1e6:,.2f} MB vs LoRA on the LLM "
                     f"{m['llm_lora_bytes'] / 1e6:,.2f} MB: {m['ratio']:.3f}x (asked >= {m['memory_reduction']:g}x; "
                     f"{m['batch']} x {m['seq_len']} tokens, LoRA rank {m['lora_rank']}, bridge rank {m['bridge_rank']})")
    head.add_row("calibration loss", f"LLM {loss['llm']:.4f}, bridge {loss['bridge']:.4f} ({loss['bridge'] - loss['llm']:+.4f})")
    head.add_row("residual", "every channel kept" if r["residual"] == "keep" else
                 f"{r['sizes']['hidden']} of {r['llm_sizes']['hidden']} channels, {r['retained']['residual']:.1%} of the mass")
    con = console()
    con.print(head)
    if r.get("note"):
        con.print(f"[yellow]note:[/yellow] {r['note']}")
    keys = sorted({k for layers in r["retained"]["layers"].values() for lay in layers if lay for k in lay})
    t = table("importance mass retained per layer")
    t.add_column("stack")
    t.add_column("layer", justify="right")
    for k in keys:
        t.add_column(k, justify="right")
    for stack, layers in r["retained"]["layers"].items():
        for i, lay in enumerate(layers):
            t.add_row(stack, str(i), *(("dropped" if lay is None else f"{lay[k]:.1%}" if k in lay else "-") for k in keys))
    con.print(t)
