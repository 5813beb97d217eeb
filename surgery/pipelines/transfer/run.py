"""`surgery transfer`: port a PEFT adapter trained on an SLM to an LLM without the LLM's gradients.

Jin, Zhang & Zong (EMNLP 2023), W_plug: depth — SLM layer i maps to a block of consecutive LLM
layers (ops.project.depth_blocks) and its modules are duplicated into it; width — one fitted
projection per space each module touches (fit.py), through which the adapter's weights are
carried (each kind's port, surgery.kinds). Writes a PEFT adapter
(or an AdapterHub directory, for a bottleneck adapter) for the LLM plus transfer.json (layer map, fit
quality) and projections.safetensors (the maps, for tune-bridge). Format: docs/formats.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

from ...arch import arch_of
from ...errors import AdapterError, ArchitectureError, OutputError, ResourceError, ShapeError
from ...io.checkpoint import Checkpoint
from ...io.hashing import file_sha256
from ...io.model import Placement
from ...io.writer import OutputDir, check_output, parse_size
from ...kinds import kind_of
from ...kinds.base import PortContext
from ...ops.project import depth_blocks
from .fit import FitOptions, Pair, fit_projections
from .memory import ceiling, memory_guard
from .scale import SCALES, choose_scale
from .plan import kv_keys, layer_roles, locate, module_path

FORMAT = "surgery.transfer/1"
MAPS = ("activations", "embeddings")
DEPTHS = ("block", "first", "best")
PROJECTIONS = "projections.safetensors"


def _open_pair(adapter: str, llm: str, slm_base: str | None):
    kind = kind_of(adapter, "transfer")
    ad = kind.read(adapter)
    base = slm_base or ad.base
    if not base:
        raise AdapterError(f"{ad.path}/adapter_config.json names no base model", "pass --slm-base DIR")
    if not os.path.isdir(base):
        raise AdapterError(f"the adapter's base model {base} is not a directory here", "pass --slm-base DIR (the SLM it was trained on)")
    ck_s, ck_l = Checkpoint.open(base), Checkpoint.open(llm)
    arch_s, arch_l = arch_of(ck_s), arch_of(ck_l)
    if arch_s.family != arch_l.family:
        raise ArchitectureError(f"the SLM is {arch_s.family} and the LLM is {arch_l.family}",
                                "transfer maps modules by name within one family; pick an LLM of the SLM's family")
    if len(arch_s.stacks) != 1 or ck_s.config.get("is_encoder_decoder"):
        raise ArchitectureError(f"{arch_s.family} is an encoder-decoder family", "transfer supports decoder-only models")
    stack = next(iter(arch_s.stacks))
    if arch_l.stacks[stack] < arch_s.stacks[stack]:
        raise ShapeError(f"the LLM has {arch_l.stacks[stack]} layers, fewer than the SLM's {arch_s.stacks[stack]}",
                         "swap --slm and --llm: transfer goes from the smaller model to the larger")
    return kind, ad, ck_s, ck_l, arch_s, arch_l, stack


def _choose_layers(blocks, records, depth: str) -> list[list[int]]:
    """block: every LLM layer of the block; first: its first; best: the one whose fits explain most."""
    if depth == "block":
        return blocks
    if depth == "first":
        return [blk[:1] for blk in blocks]
    chosen = []
    for blk in blocks:
        def score(j):
            rel = [r["rel_residual"] for r in records if r["llm_layer"] == j and not r["silent"]]
            return (sum(rel) / len(rel) if rel else float("inf"), j)
        chosen.append([min(blk, key=score)])
    return chosen


@dataclass(frozen=True)
class TransferConfig:
    """transfer's settings. The CLI's flags take their defaults from here, so each is defined once."""

    map_kind: str = "activations"  # activations (fit on calibration text) or embeddings (data-free)
    depth: str = "block"  # block | first | best: which LLM layers of a block take an SLM layer's modules
    samples: int = 64  # calibration texts
    seq_len: int = 128  # tokens per calibration text
    ridge: float = 1e-9  # relative to the mean eigenvalue of each Gram
    batch: int = 8
    # the streamed layers' dtype: auto = each checkpoint's own (not float32 on the CPU as for the other
    # commands: a window of layers in its stored dtype is what keeps transfer's memory bounded)
    dtype: str = "auto"
    # auto: a ported LoRA's deltas are sized by forward passes on --data (scale.py: each module's effect
    # normalised to the SLM's, then a global factor chosen by the LLM's loss, 0 and the raw port included)
    scale: str = "auto"


def transfer(adapter: str, llm: str, out: str, cfg: TransferConfig | None = None, *, slm_base: str | None = None,
             data: str | None = None, map_kind: str | None = None, depth: str | None = None, samples: int | None = None,
             seq_len: int | None = None, ridge: float | None = None, batch: int | None = None, dtype: str | None = None,
             scale: str | None = None, max_memory: str | int | None = None, force: bool = False, plot: str | None = None) -> dict:
    """Port `adapter` (trained on its SLM) to `llm`; write OUT and return transfer.json's contents
    with "output": OUT's path (and "plot": the --plot PNG, or None).

    cfg: the settings (TransferConfig, whose defaults these are); a keyword given (not None) overrides its field.
    max_memory: peak-RSS budget ("3GB", bytes); it decides how many LLM layers are captured and fitted
    at once (memory.py). None: one layer at a time (every layer runs once either way, so a bigger window
    buys no time), refused before any work if one layer needs more than the machine has.
    plot: also draw each fit's relative residual per LLM layer and space to this PNG (surgery.plot.residuals).
    dtype: the dtype the streamed layers run in (auto: each checkpoint's own). The models are not loaded
    whole (stream.py reads each window's weights), so transfer takes no --device-map; the fits run in
    float64 whatever the layers' dtype.
    """
    given = dict(map_kind=map_kind, depth=depth, samples=samples, seq_len=seq_len, ridge=ridge, batch=batch, dtype=dtype, scale=scale)
    cfg = replace(cfg or TransferConfig(), **{k: v for k, v in given.items() if v is not None})
    if cfg.map_kind not in MAPS:
        raise AdapterError(f"unknown --map {cfg.map_kind!r}", f"choose one of {', '.join(MAPS)}")
    if cfg.depth not in DEPTHS:
        raise AdapterError(f"unknown --depth {cfg.depth!r}", f"choose one of {', '.join(DEPTHS)}")
    if cfg.scale not in SCALES:
        raise AdapterError(f"unknown --scale {cfg.scale!r}", f"choose one of {', '.join(SCALES)}")
    Placement(cfg.dtype).check()
    budget = None if max_memory is None else _budget(max_memory)
    kind, ad, ck_s, ck_l, arch_s, arch_l, stack = _open_pair(adapter, llm, slm_base)
    inputs = [ad.path, ck_s.path, ck_l.path]
    check_output(os.path.abspath(out), inputs, force)  # before any forward pass, not after
    if plot:
        from ... import plot as plots

        plots.check(plot, force, inputs=inputs + [data], output=out)
    with memory_guard(budget or ceiling()), OutputDir(out, inputs=inputs, force=force) as od:
        summary = _transfer(kind, ad, ck_s, ck_l, arch_s, arch_l, stack, od, cfg, data=data, budget=budget)
        path = od.commit()
    if plot:  # from the fits transfer.json records
        plots.residuals(plot, summary["fits"], summary["layers_used"][stack],
                        f"transfer {kind.name} ({arch_s.family}): {cfg.map_kind} map, depth {cfg.depth}")
    return {**summary, "output": path, "plot": plot}  # transfer.json's contents, where they were written, the plot


def _scale(kind, ad, ck_s, ck_l, arch_s, arch_l, stack, od, cfg: TransferConfig, data, blocks, chosen) -> dict:
    """transfer.json's "scale": what --scale did to the written adapter (scale.py)."""
    if cfg.scale == "none":
        return {"mode": "none"}
    if kind.name != "lora":
        return {"mode": "none", "reason": f"--scale auto sizes LoRA deltas; a {kind.name} adapter is written as ported"}
    if not data:
        return {"mode": "none", "reason": "no --data text to choose the scale by"}
    slm_of = {j: i for i, blk in enumerate(blocks) for j in blk}

    def slm_module(name):
        _, j, suffix = locate(arch_l, name)
        return module_path(arch_s, stack, slm_of[j], suffix)

    def copies(name):
        return len(chosen[slm_of[locate(arch_l, name)[1]]])

    return choose_scale(od, slm_adapter=ad.path, slm_base=ck_s.path, llm=ck_l.path, data=data, samples=cfg.samples, seq_len=cfg.seq_len,
                        batch=cfg.batch, dtype=cfg.dtype, slm_module_of=slm_module, copies_of=copies)


def _budget(text) -> int:
    try:
        n = parse_size(text)
    except (ValueError, TypeError, OutputError):
        n = 0
    if n <= 0:
        raise ResourceError(f"--max-memory {text!r} is not a size", "write it like 3GB, 3500MB or 3.5e9")
    return n


def _transfer(kind, ad, ck_s, ck_l, arch_s, arch_l, stack, od, cfg: TransferConfig, *, data, budget) -> dict:
    blocks = depth_blocks(arch_s.stacks[stack], arch_l.stacks[stack])
    port = PortContext(arch_s, arch_l, stack, blocks, llm_path=ck_l.path, llm_config=ck_l.config,
                       roles=layer_roles(arch_s, stack), locate=lambda module: locate(arch_s, module),
                       llm_module=lambda layer, suffix: module_path(arch_l, stack, layer, suffix),
                       kv_keys=lambda: kv_keys(arch_s, stack))
    needs = kind.transfer_needs(ad, port)
    opts = FitOptions(cfg.map_kind, data, cfg.samples, cfg.seq_len, cfg.ridge, cfg.batch, budget, cfg.dtype)
    fits = fit_projections(Pair(ck_s, ck_l, arch_s, arch_l, stack, blocks), needs, opts, od.tmp, kind.needs_embeddings)
    chosen = _choose_layers(blocks, fits.records, cfg.depth) if kind.layered else blocks
    port.chosen, port.maps, port.embed = chosen, fits.maps, fits.embed
    write = kind.port(ad, port)
    data_sha = None
    if data and cfg.map_kind == "activations":
        data_sha = file_sha256(data)
    summary = {
        "format": FORMAT, "kind": kind.name, "slm_adapter": ad.path, "slm_base": ck_s.path, "llm": ck_l.path,
        "family": arch_s.family, "map": cfg.map_kind, "depth": cfg.depth, "ridge": cfg.ridge, "dtype": cfg.dtype,
        "samples": cfg.samples if cfg.map_kind == "activations" else None,
        "seq_len": cfg.seq_len if cfg.map_kind == "activations" else None,
        "data_sha256": data_sha,
        "depth_map": {stack: blocks}, "layers_used": {stack: chosen},
        "fits": fits.records, "warnings": fits.warnings,
    }
    write(od)
    summary["scale"] = _scale(kind, ad, ck_s, ck_l, arch_s, arch_l, stack, od, cfg, data, blocks, chosen)
    fits.maps.write(od.path(PROJECTIONS), {f"embed.{d}": m for d, m in fits.embed.items()}, {"format": FORMAT})
    od.write_json("transfer.json", summary)
    return summary
