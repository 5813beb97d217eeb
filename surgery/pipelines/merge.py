"""merge-lora / unmerge-lora: fold adapters into (or out of) a checkpoint, one tensor at a time.

Plan first (which output tensor gets which steps, from the family map and the adapters, all small),
then stream: read one base tensor, apply its steps in float32, round once, write, drop. Tensors no
adapter touches are copied in their stored dtype without a float32 detour, so peak memory is the
largest touched tensor in float32 (about 3 copies), never a shard.

Tied weights: peft wraps `lm_head` even when it shares its weight with the input embedding, and
merging then changes both (peft only warns). What the adapter *meant* is base embeddings in and
the adapted head out, so we untie: write the head explicitly, set the tie flag false, and say so.
"""

from __future__ import annotations

import copy
import os
import time
from dataclasses import dataclass, field

from ..arch.generic import GenericArch, linear_map
from ..errors import AdapterError, NumericsError, ShapeError
from ..io.adapter import Adapter
from ..io.checkpoint import Checkpoint
from ..io.writer import OutputDir, nonfinite_count
from ..ops.lokr import lokr_delta
from ..ops.lora import LowRankDelta, dora_factor, dora_norm, fold, fold_rounded, lora_bias_delta
from .stream import write_checkpoint

DORA_NORMS = "dora_norms.safetensors"  # n = ‖W + ΔW‖ per DoRA module, written beside a merged checkpoint
SUPPORTED = ("LORA", "LOKR")


@dataclass
class Step:
    """One change to one output tensor: fn(current float32, original float32) -> new float32."""

    label: str  # "adapter-dir:module" for messages
    fn: object
    lowrank: object = None  # a plain LoRA step's LowRankDelta: lets produce() fold in place, row block by block


@dataclass
class Plan:
    ck: Checkpoint
    arch: object
    steps: dict = field(default_factory=dict)  # output tensor name -> [Step]
    source: dict = field(default_factory=dict)  # output tensor name -> tensor read (differs when untying)
    untied: list = field(default_factory=list)
    tie_flags: set = field(default_factory=set)
    dora_norms: dict = field(default_factory=dict)  # filled while streaming (merge) or read (unmerge)
    modules: int = 0
    by_module: dict = field(default_factory=dict)  # the family map's module -> spec, built once (not per module)

    def add(self, name: str, step: Step) -> None:
        self.steps.setdefault(name, []).append(step)


def _checked(label: str, t):
    bad = nonfinite_count(t)
    if bad:
        raise NumericsError(f"{label}: the adapter's delta has {bad} NaN/inf values",
                            "the adapter is broken (check its weights and alpha/scaling); nothing was written")
    return t


def _linear(plan: Plan, ad: Adapter, module: str):
    spec = plan.by_module.get(module)
    if spec is None and isinstance(plan.arch, GenericArch):
        raise AdapterError(f"{ad.path}: module {module} has no 2-D weight {module}.weight in {plan.ck.path}",
                           "was the adapter trained on another base? (a tied lm_head needs a family file: docs/arch.md)")
    if spec is None:
        raise AdapterError(f"{ad.path}: module {module} is not a linear layer of this {plan.arch.family} model",
                           "was the adapter trained on another base? `surgery inspect` shows both")
    shape = plan.arch.shape(spec)
    out_in = (shape[1], shape[0]) if spec.transposed else shape
    return spec, shape, out_in


def _plan_lora(plan: Plan, ad: Adapter, weight: float, sign: int, dora_norms: dict | None) -> None:
    by_name = plan.arch.by_name()
    for m in ad.lora_modules():
        spec, shape, (n_out, n_in) = _linear(plan, ad, m.module)
        label = f"{os.path.basename(ad.path)}:{m.module}"
        if m.fan_in_fan_out and isinstance(plan.arch, GenericArch):
            raise AdapterError(f"{label}: the adapter says fan_in_fan_out (a Conv1D layer stored [in, out]) but the "
                               "generic map assumes nn.Linear's [out, in]", "add a family file that marks the layer "
                               "transposed, with --family FILE.json (docs/arch.md)")
        if tuple(m.A.shape) != (m.rank, n_in) or tuple(m.B.shape) != (n_out, m.rank):
            raise ShapeError(f"{label}: lora_A {list(m.A.shape)} / lora_B {list(m.B.shape)} do not fit the base "
                             f"weight [{n_out} out, {n_in} in]", "use the adapter with the base model it was trained on")
        # Orientation follows the family map, as peft's Conv1D detection does, whatever fan_in_fan_out says.
        # Kept as factors: a dense ΔW per module held until its tensor streams by would be the model again.
        _checked(label, m.A)
        _checked(label, m.B)
        delta = LowRankDelta(m.A, m.B, m.scaling * weight, spec.transposed)
        factor = None
        if m.magnitude is not None:
            if weight != 1.0:
                raise AdapterError(f"{label}: a DoRA adapter cannot be merged with weight {weight}",
                                   "DoRA rescales whole rows; merge it with weight 1")
            if sign < 0:
                if dora_norms is None or spec.name not in dora_norms:
                    raise AdapterError(
                        f"{label}: unmerging DoRA needs the row norms ‖W+ΔW‖ recorded at merge time ({DORA_NORMS})",
                        "unmerge a checkpoint written by `surgery merge-lora`; a DoRA merge loses each row's norm, "
                        "so only the row directions are recoverable")
                factor = dora_factor(m.magnitude, dora_norms[spec.name], spec.transposed)
        plain = m.magnitude is None and factor is None
        plan.add(spec.name, Step(label, _lora_step(plan, spec, delta, sign, factor, m.magnitude), delta if plain else None))
        bname = spec.name[: -len("weight")] + "bias"
        if m.bias is not None and (bname in by_name or bool(m.bias.abs().max() > 0)):
            # lora_bias is one flag per adapter: extract-lora gives bias-less layers a zero bias, skipped here
            if bname not in by_name:
                raise AdapterError(f"{label}: the adapter has a lora_B bias but the base layer has no bias",
                                   "peft cannot merge lora_bias into a layer without bias either")
            bdelta = _checked(label, lora_bias_delta(m.bias, m.scaling * weight))  # a vector: cheap to keep
            plan.add(bname, Step(label, lambda w, orig, d=bdelta: fold(w, d, sign)))
        plan.modules += 1


def _lora_step(plan: Plan, spec, delta, sign: int, factor, magnitude):
    if magnitude is None or factor is not None:
        return lambda w, orig: fold(w, delta, sign, factor)

    def dora_merge(w, orig):
        # peft: the norm is taken on the *unmerged* base weight plus this adapter's delta
        d = delta.dense()
        n = dora_norm(orig.float(), d, spec.transposed)
        plan.dora_norms[spec.name] = n
        return fold(w, d, sign, dora_factor(magnitude, n, spec.transposed))

    return dora_merge


def _plan_lokr(plan: Plan, ad: Adapter, weight: float, sign: int) -> None:
    for m in ad.lokr_modules():
        spec, shape, out_in = _linear(plan, ad, m.module)
        label = f"{os.path.basename(ad.path)}:{m.module}"
        _lokr_fits(label, m.params, out_in)

        def step(w, orig, m=m, label=label, out_in=out_in, t=spec.transposed):
            d = lokr_delta(m.params, m.scaling * weight, out_in)
            return fold(w, _checked(label, d.T if t else d), sign)

        plan.add(spec.name, Step(label, step))
        plan.modules += 1


def _lokr_fits(label: str, params: dict, out_in: tuple) -> None:
    """Check the Kronecker factors' shapes at plan time (kron of [a,b] and [c,d] is [a·c, b·d])."""
    try:
        shapes = []
        for i in (1, 2):
            if f"lokr_w{i}" in params:
                shapes.append(tuple(params[f"lokr_w{i}"].shape[:2]))
            elif i == 2 and "lokr_t2" in params:  # einsum("ijkl,ip,jr->prkl")
                shapes.append((params["lokr_w2_a"].shape[1], params["lokr_w2_b"].shape[1]))
            else:
                shapes.append((params[f"lokr_w{i}_a"].shape[0], params[f"lokr_w{i}_b"].shape[1]))
    except KeyError as e:
        raise ShapeError(f"{label}: LoKr factors are incomplete (no {e})", "the adapter file is incomplete; re-save it") from e
    if shapes[0][0] * shapes[1][0] * shapes[0][1] * shapes[1][1] != out_in[0] * out_in[1]:
        raise ShapeError(f"{label}: LoKr factors {shapes} do not make a {list(out_in)} weight",
                         "use the adapter with the base model it was trained on")


def _plan_saved(plan: Plan, ad: Adapter, weight: float, sign: int) -> None:
    """modules_to_save: the adapter carries the whole module; weight w interpolates W + w·(S − W)."""
    saved = ad.modules_to_save()
    if saved and sign < 0:
        raise AdapterError(f"{ad.path} replaces whole modules ({', '.join(sorted(saved))}) whose base values "
                           "are not in the merged checkpoint", "copy those tensors from the base model instead")
    by_name = plan.arch.by_name()
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
            _checked(label, t)
            plan.add(name, Step(label, lambda w, orig, t=t: w.lerp_(t.float(), weight)))


def plan_adapters(ck: Checkpoint, adapters: list[Adapter], weights: list[float], sign: int,
                  dora_norms: dict | None = None) -> Plan:
    arch = linear_map(ck)
    plan = Plan(ck=ck, arch=arch, by_module=arch.by_module())
    for ad, w in zip(adapters, weights):
        if ad.peft_type not in SUPPORTED:
            raise AdapterError(f"{ad.path} is a {ad.peft_type} adapter", "merge-lora folds LoRA, DoRA and LoKr adapters")
        (_plan_lora(plan, ad, w, sign, dora_norms) if ad.peft_type == "LORA" else _plan_lokr(plan, ad, w, sign))
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
    if dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ShapeError(f"unknown dtype {dtype!r}", "use auto, float32, bfloat16 or float16")
    weights = list(weights or [])
    if weights and len(weights) != len(adapters):
        raise AdapterError(f"{len(weights)} --weight values for {len(adapters)} adapters", "give one weight per adapter, or none")
    weights = weights or [1.0] * len(adapters)
    ck = Checkpoint.open(base)
    ads = [Adapter.open(a) for a in adapters]
    norms = _read_norms(ck.path) if sign < 0 else None
    plan = plan_adapters(ck, ads, weights, sign, norms)

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
        if plan.dora_norms and sign > 0:
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in sorted(plan.dora_norms.items())}, od.path(DORA_NORMS))
        path = od.commit()
    return {"output": path, "adapters": [{"path": a.path, "type": a.peft_type, "weight": w} for a, w in zip(ads, weights)],
            "modules": plan.modules, "tensors_changed": len(plan.steps), "tensors_written": len(specs),
            "untied": plan.untied, "dora_modules": len(plan.dora_norms), "bytes": writer.total,
            "shards": len(writer.files), "seconds": round(time.time() - t0, 3), "notes": notes,
            "dtype": dtype if dtype != "auto" else str(ck.main_dtype()).replace("torch.", "")}


def _read_norms(path: str) -> dict | None:
    f = os.path.join(path, DORA_NORMS)
    if not os.path.exists(f):
        return None
    from safetensors.torch import load_file

    return load_file(f)


def merge_lora(base: str, adapters: list[str], out: str, **kw) -> dict:
    """Fold one or more LoRA/DoRA/LoKr adapters (each with an optional weight) into `base`."""
    return apply_adapters(base, adapters, out, sign=1, **kw)


def unmerge_lora(merged: str, adapter: str, out: str, **kw) -> dict:
    """Take `adapter` out of a merged checkpoint again (W −= ΔW; DoRA needs the recorded norms)."""
    return apply_adapters(merged, [adapter], out, sign=-1, **kw)
