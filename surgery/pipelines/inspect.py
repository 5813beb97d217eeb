"""What is in a checkpoint or adapter directory, as a plain dict (the CLI renders it)."""

from __future__ import annotations

import os
import re

from ..errors import SurgeryError


def describe(path: str) -> dict:
    from ..io.adapterhub import is_adapterhub_dir

    if is_adapterhub_dir(path):
        return describe_bottleneck(path)
    if os.path.exists(os.path.join(path, "adapter_config.json")):
        return describe_adapter(path)
    return describe_model(path)


def describe_model(path: str) -> dict:
    from ..arch import family_specs
    from ..arch.generic import GenericArch, linear_map
    from ..io.checkpoint import Checkpoint

    ck = Checkpoint.open(path)
    info = {"kind": "model", "path": ck.path, "model_type": ck.config.get("model_type")}
    params = 0
    for k in ck.keys():
        n = 1
        for s in ck.shape(k):
            n *= s
        params += n
    shards = [{"file": s, "bytes": os.path.getsize(os.path.join(ck.path, s))} for s in ck.shards]
    info.update(parameters=params, dtypes=ck.dtypes(), shards=shards, bytes=sum(s["bytes"] for s in shards),
                tensors=len(ck.keys()), side_files=ck.side_files())
    family_specs()  # a bad --family file or SURGERY_FAMILIES is an error, not a note
    try:
        arch = linear_map(ck)
    except SurgeryError as e:
        info["family"] = None
        info["note"] = str(e)
        return info
    if isinstance(arch, GenericArch):  # no widths to report: only what the checkpoint itself says
        info.update(family=arch.family, linear_modules=len(arch.by_module()), layer_linears=len(arch.linears()))
        return info
    d = arch.dims
    info.update(family=arch.family, layers=dict(arch.stacks), hidden=d["hidden"], heads=d["heads"],
                kv_heads=d["kv_heads"], head_dim=d["head_dim"], intermediate=d["intermediate"], vocab=d["vocab"],
                tied={k: v for k, v in arch.tied().items()})
    expected = {t.name for t in arch.stored_tensors()}
    have = set(ck.keys())
    # a tied tensor may still be stored (some savers write both copies)
    optional = set(arch.tied())
    info["missing"] = sorted(expected - have)
    info["unexpected"] = sorted(have - expected - optional)
    return info


def describe_adapter(path: str) -> dict:
    from ..io.adapter import Adapter

    ad = Adapter.open(path)
    cfg = ad.config
    info = {"kind": "adapter", "path": ad.path, "peft_type": ad.peft_type, "base": ad.base,
            "parameters": ad.num_parameters(), "dtypes": sorted({str(t.dtype).replace("torch.", "") for t in ad.tensors.values()})}
    if ad.peft_type in ("LORA", "LOKR"):
        mods = ad.module_params()
        info.update(r=cfg.get("r"), alpha=cfg.get("lora_alpha", cfg.get("alpha")), use_rslora=bool(cfg.get("use_rslora")),
                    use_dora=bool(cfg.get("use_dora")), rank_pattern=cfg.get("rank_pattern") or {},
                    alpha_pattern=cfg.get("alpha_pattern") or {}, target_modules=cfg.get("target_modules"),
                    modules_to_save=cfg.get("modules_to_save"), modules=sorted(mods),
                    module_types=sorted({re.sub(r"^.*\.\d+\.", "", m) for m in mods}),
                    layers=sorted({int(x) for m in mods for x in re.findall(r"\.(\d+)\.", m)[:1]}))
    else:
        info.update(num_virtual_tokens=cfg.get("num_virtual_tokens"), token_dim=cfg.get("token_dim"),
                    num_layers=cfg.get("num_layers"))
    return info


def describe_bottleneck(path: str) -> dict:
    """An AdapterHub bottleneck adapter: preset, reduction factor, widths, where the adapters sit."""
    from ..io.adapterhub import preset_of, read_adapterhub

    ad = read_adapterhub(path, check_activation=False)  # keeps inspect free of the transformers import
    bn = ad.bn
    layers: dict = {}
    for stack, layer, _ in ad.placements.values():
        layers.setdefault(stack, set()).add(layer)
    return {"kind": "adapter", "path": ad.path, "type": "bottleneck", "name": ad.name, "config": preset_of(bn),
            "base": ad.config.get("model_name"), "model_type": ad.config.get("model_type"),
            "parameters": ad.num_parameters(),
            "dtypes": sorted({str(t.dtype).replace("torch.", "") for w in ad.modules.values() for t in w.values()}),
            "reduction_factor": bn["reduction_factor"],
            "widths": sorted({int(w["W_down"].shape[0]) for w in ad.modules.values()}),
            "non_linearity": bn["non_linearity"], "scaling": bn.get("scaling", 1.0),
            "original_ln_before": bool(bn["original_ln_before"]), "residual_before_ln": bn["residual_before_ln"],
            "original_ln_after": bool(bn["original_ln_after"]),
            "placements": sorted({p for _, _, p in ad.placements.values()}),
            "layers": {s: sorted(v) for s, v in layers.items()}, "sites": len(ad.modules)}
