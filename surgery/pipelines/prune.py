"""prune-bridge: Fisher-information structured pruning of an LLM into a standard bridge checkpoint.

Jin, Zhang & Zong (EMNLP 2023) tune adapters through a *bridge*: the LLM pruned (as in Ladder
Side-Tuning) to about 1/16 of its parameters. Plan: widths (bridge_plan) -> score units on
calibration data -> choose kept coordinates and, optionally, layers to drop -> estimate norm
corrections -> stream every tensor through surgery.ops.slice.select into a checkpoint of the same
family, with bridge.json beside it. By default the residual stream is kept whole (bridge_plan).

Memory: the LLM is loaded in its checkpoint's dtype; the Fisher pass recomputes one block at a time
(importance.fisher_mask) over micro-batches of 256 tokens, the loss goes through the LM head a chunk
of tokens at a time (ops/loss.py), the statistics pass is a no-grad forward, and freed activations
go back to the OS at once (io/allocator.py): peak memory follows the weights plus one block's
activations (1.1B-shaped bf16 llama: docs/benchmarks.md).
"""

from __future__ import annotations

import gc
import shutil
from dataclasses import dataclass, replace

from ..arch import arch_of, load_arch
from ..errors import ArchitectureError, DataError, ShapeError
from ..io.allocator import return_freed_memory
from ..io.checkpoint import Checkpoint
from ..io.writer import OutputDir
from ..ops.fisher import norm_correction, recalibrate_norm
from ..ops.slice import select as slice_select
from . import importance as imp
from ..io.hashing import file_sha256
from ..ops.fisher import block_influence, top_k
from .bridge_memory import plan_by_memory
from .bridge_plan import (bridge_config, check_drop_layers, kept_layers, layer_kept, parameter_counts, plan_bridge,
                          select, unit_maps)
from ..io.model import Placement, load_model
from .calibration import batch_loss, batches, mean_loss, token_blocks
from .stream import write_checkpoint

FORMAT = "surgery.bridge/1"
DROP_BY = ("similarity", "fisher", "first")


def _norm_modules(arch) -> dict[str, str]:
    """{norm module path: its gain tensor} for every norm the model has."""
    return {t.name.rsplit(".", 1)[0]: t.name for t in arch.tensors() if t.role == "norm"}


def _block(args, kwargs):
    x = args[0] if args else kwargs.get("hidden_states")
    return x[0] if isinstance(x, tuple) else x


def calibration_stats(model, arch, blocks, batch_size: int, residual: list[int]) -> tuple[dict, dict, float]:
    """One no-grad pass (activations live one block at a time): per norm the pooled (ratio, shift)
    of ops.fisher.norm_correction for the kept residual channels (skipped when every channel is
    kept), per layer its block influence (ops.fisher.block_influence, for --drop-by similarity),
    and the LLM's calibration loss."""
    import torch

    every = len(residual) == arch.dims["hidden"]
    acc: dict[str, list] = {} if every else {m: [0.0, 0.0, 0] for m in _norm_modules(arch)}
    bi = {(st, i): [0.0, 0] for st, n in arch.stacks.items() for i in range(n)}
    handles, inputs = [], {}

    def pre(name):
        def h(mod, args):
            r, s, n = norm_correction(args[0], residual, arch.norm)
            a = acc[name]
            a[0], a[1], a[2] = a[0] + r, a[1] + s, a[2] + n
        return h

    def block_in(key):
        def h(mod, args, kwargs):
            inputs[key] = _block(args, kwargs)
        return h

    def block_out(key):
        def h(mod, args, kwargs, out):
            total, count = block_influence(inputs.pop(key), _block((out,), {}))
            bi[key][0] += total
            bi[key][1] += count
        return h

    for name in acc:
        handles.append(model.get_submodule(name).register_forward_pre_hook(pre(name)))
    for (st, i) in bi:
        mod = model.get_submodule(arch.spec["stacks"][st]["prefix"].format(i=i).rstrip("."))
        handles.append(mod.register_forward_pre_hook(block_in((st, i)), with_kwargs=True))
        handles.append(mod.register_forward_hook(block_out((st, i)), with_kwargs=True))
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for b in batches(blocks, batch_size, model.config.is_encoder_decoder, "norm statistics"):
                total += float(batch_loss(model, b)) * b["labels"].numel()
                count += b["labels"].numel()
    finally:
        for h in handles:
            h.remove()
    corr = {m: {"ratio": a[0] / a[2], "shift": a[1] / a[2]} for m, a in acc.items() if a[2]}
    sim = {key: (v[0] / v[1] if v[1] else 0.0) for key, v in bi.items()}
    return corr, sim, total / max(count, 1)


def choose_dropped(arch, layer_scores: dict, drop_layers: int) -> dict[str, list[int]]:
    """{stack: the drop_layers lowest-scored layers} (ties: the later layer goes first)."""
    import torch

    out = {}
    for st, n in arch.stacks.items():
        if drop_layers:
            v = torch.tensor([layer_scores[(st, i)] for i in range(n)], dtype=torch.float64)
            keep = top_k(v.flip(0), n - drop_layers)  # flipped: ties keep the earlier layer
            out[st] = sorted(set(range(n)) - {n - 1 - k for k in keep})
    return out


def _sources(arch, barch, kept: dict) -> dict:
    """{bridge tensor name: (LLM tensor name, LLM layer whose kept coordinates slice it)}.
    Bridge layer j is LLM layer kept_layers[stack][j]; a tensor only one layer holds (T5's relative
    position bias, which serves the whole stack) comes from the LLM layer that holds it."""
    llm = arch.by_name()
    holders = {(t.stack, t.name[len(arch.spec["stacks"][t.stack]["prefix"].format(i=t.layer)):]): t.name
               for t in arch.tensors() if t.stack is not None}
    live = kept_layers(kept)
    out = {}
    for t in barch.stored_tensors():
        if t.stack is None:
            out[t.name] = (t.name, None)
            continue
        src = live[t.stack][t.layer]
        rest = t.name[len(barch.spec["stacks"][t.stack]["prefix"].format(i=t.layer)):]
        name = arch.spec["stacks"][t.stack]["prefix"].format(i=src) + rest
        out[t.name] = (name if name in llm else holders[(t.stack, rest)], src)
    return out


def _tensor_producer(ck, arch, barch, kept: dict, corr: dict, sizes: dict):
    """produce(bridge name) for the stream writer: read the LLM's tensor, slice to kept coordinates,
    recalibrate norms."""
    specs = arch.by_name()
    sources = _sources(arch, barch, kept)
    every = len(kept["residual"]) == arch.dims["hidden"]  # nothing dropped: norms stay exact
    scale = arch.prune.get("output_scale")
    scaled = scale["norm"] if scale and arch.flags.get(scale["when"]) else None

    def produce(bname: str):
        name, layer = sources[bname]
        spec = specs[name]
        k = layer_kept(kept, spec.stack, layer)
        x = ck.read(name)
        y = slice_select(x, arch, spec.dims, k)
        if spec.role in ("norm", "norm_bias"):
            module = name.rsplit(".", 1)[0]
            c = {"ratio": 1.0, "shift": 0.0} if every else corr.get(module, {"ratio": 1.0, "shift": 0.0})
            gain = y if spec.role == "norm" else slice_select(ck.read(module + ".weight"), arch, spec.dims, k)
            g, b = recalibrate_norm(gain, y if spec.role == "norm_bias" else None, c["ratio"], c["shift"])
            y = g if spec.role == "norm" else b
            if name == scaled:  # e.g. T5 multiplies the decoder output by d_model^-0.5 before the LM head
                y = y * (sizes["hidden"] / arch.dims["hidden"]) ** scale["power"]
        return y.to(x.dtype).contiguous()

    return produce


@dataclass(frozen=True)
class PruneConfig:
    """prune-bridge's settings. The CLI's flags take their defaults from here, so each is defined once."""

    # None: not given; then 16 (keep about 1/R of the non-embedding parameters; the paper uses 16), unless
    # memory_reduction plans the bridge instead (the two are exclusive, so "not given" must be visible)
    reduction: float | None = None
    residual: str = "keep"  # keep every residual channel, or prune it too (the narrow LST bridge)
    # whole layers left out per stack; None or "auto": depth shares the reduction (bridge_plan)
    drop_layers: int | str | None = None
    # which: similarity (block influence; the default), fisher, or first (keep the last layers: memory_reduction's)
    drop_by: str | None = None
    hidden_size: int | None = None  # explicit bridge widths override the reduction
    intermediate_size: int | None = None
    num_attention_heads: int | None = None
    num_key_value_heads: int | None = None
    samples: int = 32  # calibration blocks
    seq_len: int = 128  # tokens per block
    batch_size: int = 8  # blocks per forward/backward pass
    importance: str = "fisher-mask"
    seed: int = 0
    max_shard_size: str = "5GB"
    # plan the sizes by training memory instead (pipelines/bridge_memory.py): tune-bridge --prefix's step holds at
    # most 1/memory_reduction of LoRA (rank lora_rank, every linear layer) on the LLM, both at train_batch x
    # train_length tokens; bridge_rank: the rank the bridge's layers train with (default lora_rank)
    memory_reduction: float | None = None
    train_batch: int = 8  # tune-bridge's --batch-size default
    train_length: int = 512  # tune-bridge's --max-length default (train.data.MAX_LENGTH)
    lora_rank: int = 8
    bridge_rank: int | None = None


DEFAULT_REDUCTION = 16.0
WIDTH_FLAGS = {"hidden_size": "--hidden-size", "intermediate_size": "--intermediate-size",
               "num_attention_heads": "--num-attention-heads", "num_key_value_heads": "--num-key-value-heads"}


def memory_conflict(cfg: PruneConfig) -> str | None:
    """The first flag that contradicts --memory-reduction (which sets every size, the depth and the ranking)."""
    if cfg.reduction is not None:
        return "--reduction (it plans by parameter count; --memory-reduction by training memory)"
    given = [flag for k, flag in WIDTH_FLAGS.items() if getattr(cfg, k) is not None]
    if given:
        return f"{given[0]} (the plan sets every width)"
    if cfg.residual != "keep":
        return f"--residual {cfg.residual} (the plan keeps the residual: tune-bridge --prefix feeds it the LLM's own state)"
    if parse_drop_layers(cfg.drop_layers) is not None:
        return f"--drop-layers {cfg.drop_layers} (the plan sets the depth)"
    if cfg.drop_by not in (None, "first"):
        return f"--drop-by {cfg.drop_by} (the plan keeps the last layers: --drop-by first)"
    return None


def parse_drop_layers(v) -> int | None:
    """--drop-layers: "auto" (None: the planner shares the reduction with depth) or a count of layers."""
    if v is None or v == "auto":
        return None
    try:
        n = int(v)
    except (TypeError, ValueError):
        n = -1
    if n < 0 or str(v).strip() not in (str(n), f"+{n}"):
        raise ShapeError(f"--drop-layers {v!r} is neither 'auto' nor a count of layers",
                         "pass --drop-layers auto (the default) or a whole number such as 0 or 2")
    return n


def prune_bridge(llm: str, out: str, data: str, cfg: PruneConfig | None = None, *, reduction: float | None = None,
                 residual: str | None = None, drop_layers: int | str | None = None, drop_by: str | None = None,
                 hidden_size: int | None = None, intermediate_size: int | None = None,
                 num_attention_heads: int | None = None, num_key_value_heads: int | None = None,
                 samples: int | None = None, seq_len: int | None = None, batch_size: int | None = None,
                 importance: str | None = None, seed: int | None = None, max_shard_size: str | None = None,
                 memory_reduction: float | None = None, train_batch: int | None = None, train_length: int | None = None,
                 lora_rank: int | None = None, bridge_rank: int | None = None, force: bool = False, placement: Placement | None = None, max_memory: dict | None = None,
                 progress: bool | None = None, plot: str | None = None) -> dict:
    """Write a bridge of `llm` to `out`; returns the report (also the content of bridge.json).

    cfg: the settings (PruneConfig, whose defaults these are); a keyword given (not None) overrides its field.
    placement: dtype and devices of the calibration passes (io.model; --dtype auto loads the LLM in its
    own dtype, here also on the CPU: the Fisher passes recompute one block at a time in float32);
    max_memory ({device: "20GiB", "cpu": ...}) caps each device for accelerate's placement.
    plot: also draw each layer's head and neuron importance, kept and dropped, to this PNG (surgery.plot.importance).
    """
    import torch

    given = dict(reduction=reduction, residual=residual, drop_layers=drop_layers, drop_by=drop_by, hidden_size=hidden_size,
                 intermediate_size=intermediate_size, num_attention_heads=num_attention_heads,
                 num_key_value_heads=num_key_value_heads, samples=samples, seq_len=seq_len, batch_size=batch_size,
                 importance=importance, seed=seed, max_shard_size=max_shard_size, memory_reduction=memory_reduction,
                 train_batch=train_batch, train_length=train_length, lora_rank=lora_rank, bridge_rank=bridge_rank)
    cfg = replace(cfg or PruneConfig(), **{k: v for k, v in given.items() if v is not None})
    if cfg.importance not in imp.METHODS:
        raise DataError(f"unknown importance {cfg.importance!r}", f"choose one of {', '.join(imp.METHODS)}")
    if cfg.drop_by not in (None, *DROP_BY):
        raise DataError(f"unknown --drop-by {cfg.drop_by!r}", f"choose one of {', '.join(DROP_BY)}")
    by_memory = cfg.memory_reduction is not None
    if by_memory and (clash := memory_conflict(cfg)):
        raise ShapeError(f"--memory-reduction cannot be combined with {clash}", "leave out one of the two")
    drop_by = cfg.drop_by or ("first" if by_memory else "similarity")
    reduction = DEFAULT_REDUCTION if cfg.reduction is None else cfg.reduction
    ck = Checkpoint.open(llm)
    arch = arch_of(ck)
    if arch.prune.get("unsupported"):
        raise ArchitectureError(f"prune-bridge does not support {arch.family}: {arch.prune['unsupported']}",
                                "use a family whose map has prune.config_keys (docs/arch.md)")
    if "config_keys" not in arch.prune:
        raise ArchitectureError(f"family {arch.family} has no prune.config_keys", "add it to its family file (docs/arch.md)")
    asked = parse_drop_layers(cfg.drop_layers)
    if asked is not None:
        check_drop_layers(arch, asked)
    memory = None
    if by_memory:  # sizes and depth from the training-memory plan; the Fisher scores still choose which units
        plan = plan_by_memory(arch, cfg.memory_reduction, cfg.train_batch, cfg.train_length, cfg.lora_rank,
                              cfg.bridge_rank)
        sizes, drop, memory = plan["sizes"], plan["drop"], plan["record"]
    else:
        sizes, drop = plan_bridge(arch, reduction, {"hidden": cfg.hidden_size, "intermediate": cfg.intermediate_size,
                                                    "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads},
                                  residual=cfg.residual, drop_layers=asked)
    missing = [t.name for t in arch.stored_tensors() if t.name not in ck]
    if missing:
        raise ArchitectureError(f"{ck.path} lacks {missing[0]} (and {len(missing) - 1} more) that its family map lists",
                                "re-save the LLM with save_pretrained")
    if plot:
        from .. import plot as plots

        plots.check(plot, force, inputs=[ck.path, data], output=out)
    return_freed_memory()  # freed activations leave the RSS at once (io/allocator.py)
    with OutputDir(out, inputs=[ck.path], force=force) as od:
        torch.manual_seed(cfg.seed)
        blocks, L = token_blocks(ck.path, data, cfg.samples, cfg.seq_len, cfg.seed, arch.dims.get("positions"))
        # with a memory budget accelerate offloads what does not fit to CPU, then to disk (inside the
        # output's temporary directory, removed before the rename)
        offload = od.path(".offload") if max_memory else None
        model = load_model(ck.path, placement, dispatch="gpu", auto_dtype="stored", max_memory=max_memory,
                           offload_folder=offload)
        if cfg.importance == "magnitude":
            scores = imp.magnitude(ck, arch)
        elif cfg.importance == "random":
            scores = imp.random_scores(ck, arch, cfg.seed)
        elif cfg.importance == "fisher-param":
            scores = imp.fisher_param(model, arch, blocks, cfg.batch_size)
        else:
            scores = imp.fisher_mask(model, arch, blocks, cfg.batch_size)
        u = imp.units(arch, scores)
        corr, similarity, llm_loss = calibration_stats(model, arch, blocks, cfg.batch_size,
                                                       top_k(u["residual"], sizes["hidden"]))
        layer_scores = similarity
        if drop and drop_by == "fisher":
            layer_scores = imp.layer_fisher(scores if cfg.importance == "fisher-mask" else
                                            imp.fisher_mask(model, arch, blocks, cfg.batch_size), arch)
        if drop and drop_by == "first":  # keep the last layers: tune-bridge --prefix feeds them the LLM's own states
            layer_scores = {(st, i): float(i) for st, n in arch.stacks.items() for i in range(n)}
        dropped = choose_dropped(arch, layer_scores, drop)
        del model, scores
        gc.collect()
        if offload:
            shutil.rmtree(offload, ignore_errors=True)
        kept, ret = select(arch, u, sizes, dropped)
        bcfg = bridge_config(arch, sizes, kept_layers(kept))
        barch = load_arch(bcfg)
        specs = [(t.name, ck.dtype(_sources(arch, barch, kept)[t.name][0]), barch.shape(t)) for t in barch.stored_tensors()]
        write_checkpoint(od, specs, _tensor_producer(ck, arch, barch, kept, corr, sizes), config=bcfg,
                         side_from=ck.path, max_shard_size=cfg.max_shard_size, description="writing bridge",
                         progress=progress)
        bridge = load_model(od.tmp, placement, dispatch="gpu", auto_dtype="stored", max_memory=max_memory,
                            offload_folder=offload)
        bridge_loss = mean_loss(bridge, blocks, cfg.batch_size)
        del bridge
        if offload:
            shutil.rmtree(offload, ignore_errors=True)
        pl, pb = parameter_counts(arch), parameter_counts(barch)
        manifest = {
            "format": FORMAT, "source": ck.path, "family": arch.family, "importance": cfg.importance,
            "seed": cfg.seed, "samples": int(blocks.shape[0]), "seq_len": L, "data_sha256": file_sha256(data),
            # the parameter reduction asked; null when the sizes came from the memory plan ("memory")
            "reduction": None if by_memory else float(reduction), "residual": cfg.residual,
            "sizes": sizes, "llm_sizes": {k: arch.dims[k] for k in sizes},
            "layers": {"llm": dict(arch.stacks), "bridge": dict(barch.stacks),
                       "drop_by": drop_by if drop else None, "drop_planned": asked is None,
                       "dropped": dropped, "scores": {st: [layer_scores[(st, i)] for i in range(n)]
                                                      for st, n in arch.stacks.items()}},
            "parameters": {"llm": pl["total"], "bridge": pb["total"],
                           "llm_non_embedding": pl["non_embedding"], "bridge_non_embedding": pb["non_embedding"]},
            "calibration_loss": {"llm": llm_loss, "bridge": bridge_loss},
            "norms": corr if len(kept["residual"]) < arch.dims["hidden"] else {},
            "kept": kept, "retained": ret,
        }
        if memory:
            manifest["memory"] = memory
        share = pb["non_embedding"] / max(pl["non_embedding"], 1)
        if not by_memory and share > 1.25 / reduction:  # e.g. GPT-2 keeps every head with its residual, T5/llama at least one kv group
            manifest["note"] = (f"kept {share:.1%} of the non-embedding parameters, more than 1/{reduction:g}: the widths "
                                "cannot shrink further; add --drop-layers N (or --residual prune) to go lower")
        od.write_json("bridge.json", manifest)
        path = od.commit()
    if plot:  # from the scores the selection used, not recomputed
        plots.importance(plot, unit_maps(arch, u, kept),
                         f"prune-bridge {arch.family}: {cfg.importance} importance, kept for a " +
                         (f"1/{cfg.memory_reduction:g}-memory bridge" if by_memory else f"1/{reduction:g} bridge"))
    return {"output": path, "plot": plot, **manifest}
