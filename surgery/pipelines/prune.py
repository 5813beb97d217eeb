"""prune-bridge: Fisher-information structured pruning of an LLM into a standard bridge checkpoint.

Jin, Zhang & Zong (EMNLP 2023) tune adapters through a *bridge*: the LLM pruned (as in Ladder
Side-Tuning) to about 1/16 of its parameters. Plan: widths -> score units on calibration data ->
choose kept coordinates -> estimate norm corrections -> stream every tensor through
surgery.ops.slice.select into a checkpoint of the same family, with bridge.json beside it.
"""

from __future__ import annotations

import gc

from ..arch import arch_of, load_arch
from ..errors import ArchitectureError, DataError
from ..io.checkpoint import Checkpoint
from ..io.writer import OutputDir
from ..ops.fisher import norm_correction, recalibrate_norm
from ..ops.slice import select as slice_select
from . import importance as imp
from .bridge_plan import bridge_config, layer_kept, plan_sizes, select
from ..io.hashing import file_sha256
from .calibration import batches, load_model, mean_loss, to_device, token_blocks
from .stream import write_checkpoint

FORMAT = "surgery.bridge/1"


def _norm_modules(arch) -> dict[str, str]:
    """{norm module path: its gain tensor} for every norm the model has."""
    return {t.name.rsplit(".", 1)[0]: t.name for t in arch.tensors() if t.role == "norm"}


def norm_corrections(model, arch, blocks, batch_size: int, residual: list[int]) -> tuple[dict, float]:
    """One no-grad pass: per norm the pooled (ratio, shift) of ops.fisher.norm_correction for the
    kept residual channels, and the LLM's calibration loss."""
    import torch

    acc: dict[str, list] = {m: [0.0, 0.0, 0] for m in _norm_modules(arch)}
    handles = []

    def pre(name):
        def h(mod, args):
            r, s, n = norm_correction(args[0], residual, arch.norm)
            a = acc[name]
            a[0], a[1], a[2] = a[0] + r, a[1] + s, a[2] + n
        return h

    for name in acc:
        handles.append(model.get_submodule(name).register_forward_pre_hook(pre(name)))
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for b in batches(blocks, batch_size, model.config.is_encoder_decoder):
                out = model(**to_device(b, model))
                total += float(out.loss) * b["labels"].numel()
                count += b["labels"].numel()
    finally:
        for h in handles:
            h.remove()
    corr = {m: {"ratio": a[0] / a[2], "shift": a[1] / a[2]} for m, a in acc.items() if a[2]}
    return corr, total / max(count, 1)


def _tensor_producer(ck, arch, kept: dict, corr: dict, sizes: dict):
    """produce(name) for the stream writer: read, slice to kept coordinates, recalibrate norms."""
    specs = arch.by_name()
    every = len(kept["residual"]) == arch.dims["hidden"]  # nothing dropped: norms stay exact
    scale = arch.prune.get("output_scale")
    scaled = scale["norm"] if scale and arch.flags.get(scale["when"]) else None

    def produce(name: str):
        spec = specs[name]
        x = ck.read(name)
        y = slice_select(x, arch, spec.dims, layer_kept(kept, spec.stack, spec.layer))
        if spec.role in ("norm", "norm_bias"):
            module = name.rsplit(".", 1)[0]
            c = {"ratio": 1.0, "shift": 0.0} if every else corr.get(module, {"ratio": 1.0, "shift": 0.0})
            gain = y if spec.role == "norm" else slice_select(ck.read(module + ".weight"), arch, spec.dims, layer_kept(kept, None, None))
            g, b = recalibrate_norm(gain, y if spec.role == "norm_bias" else None, c["ratio"], c["shift"])
            y = g if spec.role == "norm" else b
            if name == scaled:  # e.g. T5 multiplies the decoder output by d_model^-0.5 before the LM head
                y = y * (sizes["hidden"] / arch.dims["hidden"]) ** scale["power"]
        return y.to(x.dtype).contiguous()

    return produce


def prune_bridge(llm: str, out: str, data: str, *, reduction: float = 16.0, hidden_size: int | None = None,
                 intermediate_size: int | None = None, num_attention_heads: int | None = None,
                 num_key_value_heads: int | None = None, samples: int = 32, seq_len: int = 128,
                 importance: str = "fisher-mask", seed: int = 0, batch_size: int = 8, force: bool = False,
                 max_shard_size: str = "5GB", device_map: str | None = None, progress: bool | None = None) -> dict:
    """Write a bridge of `llm` to `out`; returns the report (also the content of bridge.json)."""
    import torch

    if importance not in imp.METHODS:
        raise DataError(f"unknown importance {importance!r}", f"choose one of {', '.join(imp.METHODS)}")
    ck = Checkpoint.open(llm)
    arch = arch_of(ck)
    if arch.prune.get("unsupported"):
        raise ArchitectureError(f"prune-bridge does not support {arch.family}: {arch.prune['unsupported']}",
                                "use a family whose map has prune.config_keys (docs/arch.md)")
    if "config_keys" not in arch.prune:
        raise ArchitectureError(f"family {arch.family} has no prune.config_keys", "add it to its family file (docs/arch.md)")
    sizes = plan_sizes(arch, reduction, {"hidden": hidden_size, "intermediate": intermediate_size,
                                         "heads": num_attention_heads, "kv_heads": num_key_value_heads})
    cfg = bridge_config(arch, sizes)
    barch = load_arch(cfg)
    missing = [t.name for t in barch.stored_tensors() if t.name not in ck]
    if missing:
        raise ArchitectureError(f"{ck.path} lacks {missing[0]} (and {len(missing) - 1} more) that its family map lists",
                                "re-save the LLM with save_pretrained")
    with OutputDir(out, inputs=[ck.path], force=force) as od:
        torch.manual_seed(seed)
        blocks, L = token_blocks(ck.path, data, samples, seq_len, seed, arch.dims.get("positions"))
        model = load_model(ck.path, device_map=device_map)
        if importance == "magnitude":
            scores = imp.magnitude(ck, arch)
        elif importance == "random":
            scores = imp.random_scores(ck, arch, seed)
        elif importance == "fisher-param":
            scores = imp.fisher_param(model, arch, blocks, batch_size)
        else:
            scores = imp.fisher_mask(model, arch, blocks, batch_size)
        kept, ret = select(arch, imp.units(arch, scores), sizes)
        corr, llm_loss = norm_corrections(model, arch, blocks, batch_size, kept["residual"])
        del model, scores
        gc.collect()
        specs = [(t.name, ck.dtype(t.name), barch.shape(t)) for t in barch.stored_tensors()]
        write_checkpoint(od, specs, _tensor_producer(ck, arch, kept, corr, sizes), config=cfg, side_from=ck.path,
                         max_shard_size=max_shard_size, description="writing bridge", progress=progress)
        bridge = load_model(od.tmp, device_map=device_map)
        bridge_loss = mean_loss(bridge, blocks, batch_size)
        del bridge
        manifest = {
            "format": FORMAT, "source": ck.path, "family": arch.family, "importance": importance,
            "seed": seed, "samples": int(blocks.shape[0]), "seq_len": L, "data_sha256": file_sha256(data),
            "reduction": float(reduction),
            "sizes": sizes, "llm_sizes": {k: arch.dims[k] for k in sizes},
            "parameters": {"llm": arch.num_parameters(), "bridge": barch.num_parameters()},
            "calibration_loss": {"llm": llm_loss, "bridge": bridge_loss},
            "norms": corr if len(kept["residual"]) < arch.dims["hidden"] else {},
            "kept": kept, "retained": ret,
        }
        od.write_json("bridge.json", manifest)
        path = od.commit()
    return {"output": path, **manifest}

