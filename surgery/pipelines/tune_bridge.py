"""`surgery tune-bridge`: fine-tune an LLM's LoRA (or bottleneck) adapter through the bridge, never touching the LLM.

Algorithm 1 steps 4-8 (Jin, Zhang & Zong, 2023). The adapter's kind (surgery.kinds) gives a route:
restrict the LLM adapter to the bridge's kept coordinates (W_down), put it on the bridge, train it
with the shared loop, and lift the learned change back into the LLM's coordinates (LoraRoute in
kinds/lora.py, BottleneckRoute in kinds/bottleneck.py). Only the LLM's config.json is read, for
the sizes of its spaces.
"""

from __future__ import annotations

import os
import shutil

from ..arch import load_arch
from . import bridge_prefix as bp
from ..errors import CheckpointError
from ..io.jsonfile import load_json
from ..io.tokenizer import load_tokenizer
from ..io.writer import OutputDir
from ..kinds import kind_of
from ..log import note
from ..train.data import MAX_LENGTH, load_examples, pad_id_of
from ..train.loop import TrainConfig, fit, is_main_process, place
from ..train.methods import load_base

BRIDGE_FORMAT = "surgery.bridge/1"


def read_bridge(path: str) -> tuple[str, dict]:
    """(bridge checkpoint dir, bridge.json contents); accepts the directory or the json file."""
    d = os.path.dirname(os.path.abspath(path)) if path.endswith(".json") else os.path.abspath(path)
    f = os.path.join(d, "bridge.json")
    if not os.path.exists(f):
        raise CheckpointError(f"{d} has no bridge.json", "pass the directory written by `surgery prune-bridge`")
    meta = load_json(f, CheckpointError, "re-create the bridge with `surgery prune-bridge`")
    if meta.get("format") != BRIDGE_FORMAT or "kept" not in meta:
        raise CheckpointError(f"{f} is not a {BRIDGE_FORMAT} file (format {meta.get('format')!r})",
                              "re-create the bridge with `surgery prune-bridge`")
    return d, meta


def _llm_config(meta: dict, llm: str | None, where: str) -> dict:
    src = llm or meta.get("source")
    cfg = os.path.join(src or "", "config.json")
    if not src or not os.path.exists(cfg):
        raise CheckpointError(f"{where} names the LLM {src!r}, whose config.json is not there",
                              "pass --llm with the LLM directory (only its config.json is read)")
    return load_json(cfg, CheckpointError, "restore the LLM's config.json from the original model")


def _examples(tok, data: str, eval_data: str | None, seq2seq: bool, max_length: int):
    return (load_examples(data, tok, seq2seq=seq2seq, max_length=max_length),
            load_examples(eval_data, tok, seq2seq=seq2seq, max_length=max_length) if eval_data else None)


def planned_rank(meta: dict, kind: str, route) -> int | None:
    """The rank a LoRA is tuned at without --rank when its bridge was planned for a higher one
    (prune-bridge --memory-reduction --bridge-rank, recorded in bridge.json's "memory" beside --lora-rank)
    than the kept modules have (route.rank): the step then holds what the plan counted, not less. None
    otherwise; a plan below the kept modules' rank is only noted (a rank cannot shrink, and the step holds
    more than the plan counted)."""
    plan = meta.get("memory") or {}
    planned = plan.get("bridge_rank") if plan.get("bridge_rank") != plan.get("lora_rank") else None
    if not planned or kind != "lora":  # no plan, or one at the LLM's LoRA rank (no --bridge-rank): the adapter's
        return None
    if type(planned) is not int or planned < 1:  # bridge.json comes from wherever the bridge came from
        raise CheckpointError(f"bridge.json's memory.bridge_rank is {planned!r}, not a rank",
                              "re-create the bridge with prune-bridge --memory-reduction, or pass --rank R")
    if planned > route.rank:
        note(f"tune-bridge: the bridge was planned for LoRA rank {planned} (prune-bridge --bridge-rank); the adapter's "
             f"rank {route.rank} grows to it on the kept layers (pass --rank {route.rank} to keep it)")
        return planned
    if planned < route.rank:
        note(f"tune-bridge: the bridge was planned for LoRA rank {planned}, below the adapter's {route.rank}: the "
             "training step holds more than prune-bridge --memory-reduction counted")
    return None


def tune_bridge(adapter_dir: str, bridge: str, data: str, out: str, *, eval_data: str | None = None,
                llm: str | None = None, max_length: int = MAX_LENGTH, force: bool = False,
                cfg: TrainConfig | None = None, placement=None, plot: str | None = None, prefix: bool | None = None,
                rank: int | None = None) -> dict:
    """Tune `adapter_dir` (a LoRA or bottleneck adapter for the LLM) on the bridge; write the lifted LLM adapter to `out`.
    plot: also draw the loss curves (measured on the bridge) to this PNG (surgery.plot.loss).
    prefix: the bridge's first kept layer reads the LLM's own hidden state there (computed once, forward
    only, by the LLM with the adapter on: pipelines/bridge_prefix.py); empty, a plain tune, when it is layer 0.
    None (the default): on when the bridge dropped exactly the LLM's first layers (bridge_prefix.prefix_default).
    rank: LoRA only: the modules of the bridge's kept layers grow to this rank before tuning, their start's
    delta and scaling unchanged (kinds/lora.py LoraRoute); None: the rank the bridge was planned for, if
    higher than the kept modules' (planned_rank), else theirs."""
    cfg = cfg or TrainConfig()
    cfg.check()
    bdir, meta = read_bridge(bridge)
    llm_config = _llm_config(meta, llm, os.path.join(bdir, "bridge.json"))
    arch = load_arch(llm_config, "the LLM's config.json")
    if arch.family != meta.get("family", arch.family):
        raise CheckpointError(f"bridge.json says family {meta['family']} but the LLM is {arch.family}", "pass the matching --llm")
    kind = kind_of(adapter_dir, "tune-bridge")
    route = kind.bridge_route(adapter_dir, arch, meta["kept"], rank=rank, seed=cfg.seed)
    rank_set_by = "the adapter" if rank is None else "--rank"
    if rank is None and (rank := planned_rank(meta, kind.name, route)):
        route.grow(rank, cfg.seed)
        rank_set_by = "bridge.json"
    if prefix is None:
        prefix, why = bp.prefix_default(meta, arch)
        set_by = "auto"
    else:
        why, set_by = "asked", "--prefix" if prefix else "--no-prefix"
    n_prefix = bp.prefix_layers(meta, arch) if prefix else 0
    if prefix and not n_prefix:
        why = "the bridge keeps the LLM's layer 0: the prefix is empty"
        note("tune-bridge --prefix: the bridge keeps the LLM's layer 0, whose input (the embedding output) it computes "
             "with the LLM's own weights: the prefix is empty, this is a plain tune")
    inputs = [route.path, bdir, data] + ([eval_data] if eval_data else [])
    if plot:
        from .. import plot as plots

        plots.check(plot, force, inputs=inputs, output=out)
    with OutputDir(out, inputs=inputs, force=force) as od:
        states = bp.state_dir(out) if n_prefix else None
        try:
            if n_prefix:
                # the LLM's first layers, forward only, once, before the bridge is loaded: the pass holds the
                # LLM and one shard; then the bridge loads without its token embedding (the states replace it)
                from transformers import AutoConfig

                tok, config = load_tokenizer(bdir), AutoConfig.from_pretrained(bdir)
                train_ex, eval_ex = _examples(tok, data, eval_data, False, max_length)
                index = bp.write_states(llm or meta["source"], adapter_dir, kind, [train_ex] + ([eval_ex] if eval_ex else []),
                                        n_prefix, states, pad_id=pad_id_of(tok, config), batch_size=cfg.batch_size, placement=placement)
                model = bp.load_without_embedding(bdir, placement, states, index)
            else:
                model, tok, _ = load_base(bdir, placement)
                train_ex, eval_ex = _examples(tok, data, eval_data, bool(model.config.is_encoder_decoder), max_length)
            seq2seq = bool(model.config.is_encoder_decoder)
            pm = place(route.wrap(model, bdir), placement)
            before, hist, after = fit(pm, tok, train_ex, eval_ex, cfg, seq2seq=seq2seq)
        finally:
            if states:
                shutil.rmtree(states, ignore_errors=True)
        if not is_main_process():  # data-parallel workers: the main process writes the one output
            od.abort()
            return {}
        route.write(od, pm, arch, llm_config)
        od.write_json("tune_bridge.json", {"adapter": route.path, "bridge": bdir, "data": os.path.abspath(data),
                                           "kind": kind.name, "seed": cfg.seed, "epochs": cfg.epochs, "lr": cfg.lr,
                                           "batch_size": cfg.batch_size, "rank": rank, "rank_set_by": rank_set_by,
                                           "prefix_layers": n_prefix,
                                           "prefix_set_by": set_by, "bridge_before": before,
                                           "bridge_after": after, "history": hist.as_dict()})
        path = od.commit()
    if plot:
        plots.loss_curves(plot, hist.as_dict(), before, "eval" if eval_ex else "train",
                          f"tune-bridge {kind.name} ({arch.family}, on the bridge): {os.path.basename(path)}")
    bridge_params = sum(p.numel() for p in pm.parameters() if not p.requires_grad)
    return {"output": path, "plot": plot, "family": arch.family, "kind": kind.name, "modules": route.modules, "rank": rank,
            "rank_set_by": rank_set_by,
            "steps": hist.steps,
            "bridge_parameters": bridge_params, "llm_parameters": arch.num_parameters(),
            "trainable": sum(p.numel() for p in pm.parameters() if p.requires_grad),
            "device": hist.device, "mixed_precision": hist.mixed_precision,
            "evaluated_on": "eval" if eval_ex else "train", "before": before, "after": after,
            "prefix": {"on": bool(n_prefix), "layers": n_prefix, "set_by": set_by, "why": why}}
