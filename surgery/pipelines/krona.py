"""extract-krona: approximate each linear delta by its nearest Kronecker product, write a PEFT LoKr adapter.

The delta ΔW of a module comes from a tuned checkpoint (TUNED - BASE, tensor by tensor) or from a
LoRA adapter (scaling * B @ A). Both are taken in nn.Linear [out, in] orientation, the one LoKr
factors. Each ΔW is replaced by lokr_w1 (x) lokr_w2 (surgery.ops.kron.kron_params), written as
full factors with alpha = r so peft's scaling alpha / r is exactly 1.
"""

from __future__ import annotations

import os

from ..arch import arch_of
from ..errors import AdapterError, ShapeError
from ..io.adapter import CONFIG, Adapter, lora_key, saved_module_key, split_targets, targets_module, write_adapter
from ..io.checkpoint import Checkpoint
from ..io.writer import OutputDir
from ..kinds.lora import modules as lora_modules


def lokr_config(base: str, r: int, targets: list[str], factor: int) -> dict:
    """adapter_config.json for peft's LoKrConfig: full w1 and w2 (decompose_both False, r large enough)."""
    return {
        "peft_type": "LOKR", "task_type": None, "base_model_name_or_path": base, "inference_mode": True,
        "r": r, "alpha": r, "rank_dropout": 0.0, "module_dropout": 0.0, "use_effective_conv2d": False,
        "decompose_both": False, "decompose_factor": factor, "rank_dropout_scale": False,
        "target_modules": sorted(targets), "exclude_modules": None, "init_weights": True,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "modules_to_save": None,
    }


def _selected(arch, targets: list[str] | None) -> list:
    """Linear modules the user asked for (peft target_modules rules); tied copies are never stored."""
    targets = split_targets(targets)
    mods = [t for t in arch.linears() if t.tied_to is None]
    if targets:
        cfg = {"target_modules": list(targets)}
        mods = [t for t in mods if targets_module(cfg, t.module)]
        if not mods:
            names = sorted({t.module.rsplit(".", 1)[-1] for t in arch.linears() if t.tied_to is None})
            tied = [t for t in arch.linears() if t.tied_to and targets_module(cfg, t.module)]
            why = f" ({tied[0].module} is tied to {tied[0].tied_to} and has no weight of its own)" if tied else ""
            raise AdapterError(f"--targets {', '.join(targets)} match no linear module of this {arch.family} model{why}",
                               f"use module names such as {', '.join(names)}")
    return mods


def _not_captured(base: Checkpoint, tuned: Checkpoint, specs) -> list:
    """[name, ||Δ||_F] of tensors TUNED changed outside the selected linear weights (a LoKr adapter drops them)."""
    from ..ops.bitfit import delta_sq_norm, same_bits

    taken = {t.name for t in specs}
    out = []
    for name in base.keys():
        if name in taken or name not in tuned or tuned.shape(name) != base.shape(name):
            continue
        b, t = base.read(name), tuned.read(name)
        if not same_bits(b, t):
            out.append([name, delta_sq_norm(b, t) ** 0.5])
    return sorted(out, key=lambda x: (-x[1], x[0]))


def _model_deltas(base: Checkpoint, tuned: Checkpoint, specs):
    """(spec, ΔW [out, in] float64 or None when unchanged) for each selected module."""
    import torch

    for t in specs:
        if t.name not in tuned:
            raise ShapeError(f"{tuned.path} has no tensor {t.name} (BASE has it)",
                             "pass a TUNED checkpoint of the same architecture as BASE")
        if tuned.shape(t.name) != base.shape(t.name):
            raise ShapeError(f"{t.name} is {list(base.shape(t.name))} in BASE but {list(tuned.shape(t.name))} in TUNED",
                             "pass a TUNED checkpoint fine-tuned from BASE")
        d = tuned.read(t.name).to(torch.float64) - base.read(t.name).to(torch.float64)
        yield t, (None if not bool(d.any()) else (d.T if t.transposed else d))


def _adapter_deltas(base: Checkpoint, arch, ad: Adapter, specs):
    """(spec, scaling * B @ A) for each LoRA module among the selected ones."""
    import torch

    wanted = {t.module: t for t in specs}
    for m in lora_modules(ad):
        if m.magnitude is not None or m.bias is not None:
            raise AdapterError(f"{ad.path}: {m.module} uses DoRA or a LoRA bias, whose delta is not B @ A",
                               "merge it with `surgery merge-lora` and pass the merged model as TUNED")
        t = wanted.get(m.module)
        if t is None:
            if m.module not in arch.by_module():
                raise AdapterError(f"{ad.path}: module {m.module} is not a linear layer of BASE ({arch.family})",
                                   "pass the base model the adapter was trained on")
            continue
        d = m.scaling * (m.B.to(torch.float64) @ m.A.to(torch.float64))
        out_in = arch.shape(t)[::-1] if t.transposed else arch.shape(t)
        if tuple(d.shape) != tuple(out_in):
            raise ShapeError(f"{ad.path}: {m.module} delta is {list(d.shape)} but BASE's layer is {list(out_in)} [out, in]",
                             "pass the base model the adapter was trained on")
        yield t, d


def extract_krona(base_path: str, source: str, out: str, *, factor: int = -1, targets: list[str] | None = None,
                  force: bool = False) -> dict:
    """Write OUT as a PEFT LoKr adapter approximating SOURCE - BASE; returns the per-module report."""
    from ..ops.kron import kron_params

    base = Checkpoint.open(base_path)
    arch = arch_of(base)
    if factor == 0 or factor < -1:
        raise AdapterError(f"--factor {factor} is not a valid decompose factor", "use -1 (near square root) or a positive integer")
    is_adapter = os.path.exists(os.path.join(source, CONFIG))
    ad = Adapter.open(source) if is_adapter else None
    specs = _selected(arch, targets)
    if ad is not None:  # only the modules the adapter touches matter
        touched = {m.module for m in lora_modules(ad)}
        specs = [t for t in specs if t.module in touched]
    # PEFT's LoKr wraps nn.Linear only. Conv1D layers (GPT-2, stored [in, out]) still get factors in
    # nn.Linear [out, in] orientation, which `surgery merge-lora` folds (it transposes by the family
    # map); the report says such an adapter is for merge-lora, not for PeftModel.from_pretrained.
    merge_only = [t.module for t in specs if t.transposed]
    tuned = None if ad else Checkpoint.open(source)
    deltas = _adapter_deltas(base, arch, ad, specs) if ad else _model_deltas(base, tuned, specs)

    tensors, rows, unchanged = {}, [], []
    max_w2 = 1
    for t, d in deltas:
        if d is None:
            unchanged.append(t.module)
            continue
        fit = kron_params(d, factor)
        tensors[lora_key(t.module, "lokr_w1")] = fit.A.float()
        tensors[lora_key(t.module, "lokr_w2")] = fit.B.float()
        max_w2 = max(max_w2, *fit.B.shape)
        dense = d.numel()
        kept = fit.A.numel() + fit.B.numel()
        rows.append({"module": t.module, "shape": list(d.shape), "w1": list(fit.A.shape), "w2": list(fit.B.shape),
                     "rel_error": fit.rel_error, "delta_norm": fit.norm, "iterations": fit.iterations,
                     "params": kept, "dense_params": dense, "compression": dense / kept})
    if not rows:
        raise AdapterError(f"no selected module of {source} differs from BASE",
                           "check that TUNED was fine-tuned from BASE, or widen --targets")
    if ad is not None:  # whole modules the LoRA replaced (a task head) carry over unchanged
        saved = ad.modules_to_save()
        tensors.update({saved_module_key(mod, p): t for mod, ps in saved.items() for p, t in ps.items()})
    # what the adapter cannot carry: other tensors the fine-tune changed (biases, norms, excluded layers)
    lost = _not_captured(base, tuned, specs) if tuned else []
    # peft keeps lokr_w2 whole only when r >= max(w2 dims) / 2; alpha = r makes alpha / r exactly 1.
    r = max_w2
    with OutputDir(out, inputs=[base.path, source], force=force) as od:
        cfg = lokr_config(base.path, r, [row["module"] for row in rows], factor)
        if ad is not None:
            cfg.update(modules_to_save=ad.config.get("modules_to_save"), task_type=ad.config.get("task_type"))
        write_adapter(od, cfg, tensors)
        path = od.commit()
    dense = sum(row["dense_params"] for row in rows)
    kept = sum(row["params"] for row in rows)
    sq = sum(row["delta_norm"] ** 2 for row in rows)
    sq_err = sum((row["rel_error"] * row["delta_norm"]) ** 2 for row in rows)
    return {"output": path, "source": "lora" if ad else "model", "r": r, "alpha": r, "factor": factor,
            "modules": rows, "unchanged": unchanged, "params": kept, "dense_params": dense,
            "compression": dense / kept, "rel_error": (sq_err / sq) ** 0.5 if sq else 0.0,
            "modules_to_save": sorted(ad.modules_to_save()) if ad else [], "not_captured": lost,
            "merge_only": [m for m in merge_only if m in {row["module"] for row in rows}]}
