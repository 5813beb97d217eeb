"""merge-lora / unmerge-lora: fold adapters into (or out of) a checkpoint, one tensor at a time.

Plan first (which output tensor gets which steps, from the family map and the adapters, all small),
then stream: read one base tensor, apply its steps in float32, round once, write, drop. Tensors no
adapter touches are copied in their stored dtype without a float32 detour, so peak memory is the
largest touched tensor in float32 (about 3 copies), never a shard.

Tied weights: peft wraps `lm_head` even when it shares its weight with the input embedding, and
merging then changes both (peft only warns). What the adapter *meant* is base embeddings in and
the adapted head out, so we untie: write the head explicitly, set the tie flag false, and say so.

Each adapter's kind (surgery.kinds) gives the steps of its modules (the delta of each); what every
PEFT kind shares, modules_to_save, is planned here.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field

from ..arch.generic import GenericArch, linear_map
from ..errors import AdapterError, ShapeError
from ..io.checkpoint import Checkpoint
from ..io.model import DTYPES
from ..io.writer import OutputDir
from ..kinds import kind_of
from ..kinds.base import MergeTarget, Step, checked
from ..kinds.dora import NORMS as DORA_NORMS
from ..ops.lora import fold_rounded
from .stream import write_checkpoint


@dataclass
class Plan:
    ck: Checkpoint
    target: MergeTarget
    steps: dict = field(default_factory=dict)  # output tensor name -> [Step]
    source: dict = field(default_factory=dict)  # output tensor name -> tensor read (differs when untying)
    untied: list = field(default_factory=list)
    tie_flags: set = field(default_factory=set)
    modules: int = 0

    @property
    def arch(self):
        return self.target.arch

    def add(self, name: str, step: Step) -> None:
        self.steps.setdefault(name, []).append(step)


def _plan_saved(plan: Plan, ad, weight: float, sign: int) -> None:
    """modules_to_save: the adapter carries the whole module; weight w interpolates W + w·(S − W)."""
    saved = ad.modules_to_save()
    if saved and sign < 0:
        raise AdapterError(f"{ad.path} replaces whole modules ({', '.join(sorted(saved))}) whose base values "
                           "are not in the merged checkpoint", "copy those tensors from the base model instead")
    by_name = plan.target.by_name
    for mod, params in sorted(saved.items()):
        for p, t in sorted(params.items()):
            name = f"{mod}.{p}"
            if name not in by_name:
                raise AdapterError(f"{ad.path}: modules_to_save names {name}, which this {plan.arch.family} model lacks",
                                   "was the adapter trained on another base?")
            want = plan.arch.shape(by_name[name])
            if tuple(t.shape) != want:
                raise ShapeError(f"{ad.path}: saved {name} is {list(t.shape)} but the base has {list(want)}",
                                 "use the adapter with the base model it was trained on")
            label = f"{os.path.basename(ad.path)}:{name}"
            checked(label, t)
            plan.add(name, Step(label, lambda w, orig, t=t: w.lerp_(t.float(), weight)))


def plan_adapters(ck: Checkpoint, adapters: list, weights: list[float], sign: int,
                  dora_norms: dict | None = None) -> Plan:
    """adapters: (kind, opened adapter) pairs; each kind gives the steps of its modules."""
    arch = linear_map(ck)
    plan = Plan(ck=ck, target=MergeTarget(arch, arch.by_module(), arch.by_name(), norms_in=dora_norms,
                                          generic=isinstance(arch, GenericArch), path=ck.path))
    for (kind, ad), w in zip(adapters, weights):
        steps = kind.merge_steps(ad, plan.target, w, sign)
        for name, step in steps:
            plan.add(name, step)
        plan.modules += len({step.label for _, step in steps})
        _plan_saved(plan, ad, w, sign)
    _untie(plan)
    return plan


def _untie(plan: Plan) -> None:
    """A tied copy that is not stored must be written once either side of the tie is edited."""
    for name, src in plan.arch.tied().items():
        if name in plan.ck or not (name in plan.steps or src in plan.steps):
            continue
        plan.source[name] = src
        plan.untied.append(name)
        flag = plan.arch.tie_flag(name)
        if flag:
            plan.tie_flags.add(flag)


def _out_dtype(dtype: str, stored):
    import torch

    if dtype == "auto" or not stored.is_floating_point:
        return stored
    return getattr(torch, dtype)


def apply_adapters(base: str, adapters: list[str], out: str, *, weights: list[float] | None = None, sign: int = 1,
                   dtype: str = "auto", max_shard_size="5GB", force: bool = False, progress: bool | None = None) -> dict:
    """Merge (sign=+1) or unmerge (sign=-1) adapters into the checkpoint `base`, writing `out`."""
    import torch

    t0 = time.time()
    if dtype not in DTYPES:
        raise ShapeError(f"unknown dtype {dtype!r}", f"use {', '.join(DTYPES)}")
    weights = list(weights or [])
    if weights and len(weights) != len(adapters):
        raise AdapterError(f"{len(weights)} --weight values for {len(adapters)} adapters", "give one weight per adapter, or none")
    weights = weights or [1.0] * len(adapters)
    ck = Checkpoint.open(base)
    command = "merge-lora" if sign > 0 else "unmerge-lora"
    kinds = [kind_of(a, command) for a in adapters]
    ads = [k.read(a) for k, a in zip(kinds, adapters)]
    norms = _read_norms(ck.path) if sign < 0 else None
    plan = plan_adapters(ck, list(zip(kinds, ads)), weights, sign, norms)

    names = ck.keys() + [n for n in plan.untied if n not in ck]
    src = lambda n: plan.source.get(n, n)  # noqa: E731
    specs = [(n, _out_dtype(dtype, ck.dtype(src(n))), ck.shape(src(n))) for n in names]
    out_dtype = {n: d for n, d, _ in specs}

    def produce(name):
        t = ck.read(src(name))
        steps = plan.steps.get(name, [])
        if not steps:
            return t.to(out_dtype[name])
        if t.dtype == out_dtype[name] in (torch.bfloat16, torch.float16) and all(s.lowrank is not None for s in steps):
            # plain LoRA into a half-precision weight we own: the same sums, rounded once, without
            # a float32 copy of the whole weight (see fold_rounded)
            return fold_rounded(t, [s.lowrank for s in steps], sign)
        # w is ours to update in place; steps that need the unmerged base (DoRA) read `orig` (stored dtype)
        w = t.float() if t.dtype != torch.float32 else t.clone()
        for s in steps:
            w = s.fn(w, t)
        return w.to(out_dtype[name])

    config = copy.deepcopy(ck.config)
    for flag in sorted(plan.tie_flags):
        config[flag] = False
    if dtype != "auto":
        for key in ("torch_dtype", "dtype"):
            if key in config:
                config[key] = dtype
    notes = [f"untied {n} from {plan.source[n]}: the adapter changes one side of a tie, so both are written "
             f"and {', '.join(sorted(plan.tie_flags)) or 'the tie'} is set false" for n in plan.untied]
    with OutputDir(out, inputs=[ck.path, *[a.path for a in ads]], force=force) as od:
        writer = write_checkpoint(od, specs, produce, config=config, side_from=ck.path, max_shard_size=max_shard_size,
                                  description="merging" if sign > 0 else "unmerging", progress=progress)
        if plan.target.norms_out and sign > 0:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in sorted(plan.target.norms_out.items())}, od.path(DORA_NORMS))
        path = od.commit()
    return {"output": path, "adapters": [{"path": a.path, "type": k.name, "weight": w} for k, a, w in zip(kinds, ads, weights)],
            "modules": plan.modules, "tensors_changed": len(plan.steps), "tensors_written": len(specs),
            "untied": plan.untied, "dora_modules": len(plan.target.norms_out), "bytes": writer.total,
            "shards": len(writer.files), "seconds": round(time.time() - t0, 3), "notes": notes,
            "dtype": dtype if dtype != "auto" else str(ck.main_dtype()).replace("torch.", "")}


def _read_norms(path: str) -> dict | None:
    f = os.path.join(path, DORA_NORMS)
    if not os.path.exists(f):
        return None
    from safetensors.torch import load_file

    return load_file(f)


def merge_lora(base: str, adapters: list[str], out: str, *, weights: list[float] | None = None, dtype: str = "auto",
               max_shard_size: str = "5GB", force: bool = False, progress: bool | None = None) -> dict:
    """Fold one or more adapters (the kinds that list merge-lora: LoRA, DoRA, LoKr, (IA)³) into `base`
    and write the checkpoint `out`; returns the report.

    weights: one per adapter (default 1 each). dtype: auto (keep the stored dtype), float32, bfloat16
    or float16 for the floating tensors written. max_shard_size: e.g. "5GB". progress: a bar on
    stderr (None: only on a terminal for large jobs)."""
    return apply_adapters(base, adapters, out, sign=1, weights=weights, dtype=dtype, max_shard_size=max_shard_size,
                          force=force, progress=progress)


def unmerge_lora(merged: str, adapter: str, out: str, *, weight: float = 1.0, dtype: str = "auto",
                 max_shard_size: str = "5GB", force: bool = False, progress: bool | None = None) -> dict:
    """Take `adapter`, merged with `weight`, out of the checkpoint `merged` again (W −= ΔW; DoRA needs
    the norms merge_lora recorded) and write `out`; returns the report."""
    return apply_adapters(merged, [adapter], out, sign=-1, weights=[weight], dtype=dtype,
                          max_shard_size=max_shard_size, force=force, progress=progress)
