"""(IA)³ (Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning", arXiv:2205.05638): learned vectors that rescale activations.

Files: PEFT's format, adapter_config.json (peft_type IA3, target_modules, feedforward_modules) +
base_model.model.<module>.ia3_l per wrapped linear layer:
  * attention keys and values (not feedforward): l [out, 1] scales the layer's output,
    y = l ⊙ (W x + b), so merging scales W's rows and the bias: W' = diag(l) W, b' = l ⊙ b;
  * the MLP's down projection (feedforward): l [1, in] scales its input, y = W (l ⊙ x) + b,
    so merging scales W's columns and leaves the bias: W' = W diag(l).
Unmerge divides by l (exactly: an l with a zero entry has erased that row or column, and is
refused). A merge weight w interpolates the scaling, l_w = 1 + w (l − 1), as modules_to_save
interpolates a replaced module; w = 1 is peft's merge_and_unload. Stored orientation (GPT-2's
Conv1D keeps [in, out]) comes from the family map.

Targets for training come from the family map too: layers writing a key/value space (spaces
flagged kv) and, as feedforward, layers reading an MLP neuron space (the `prune.neurons` spaces),
the choice peft makes per model type (k, v, down_proj for Llama; c_attn, mlp.c_proj for GPT-2).
Transfer is not offered: a projected diagonal scaling P diag(l) Q is no longer diagonal, so the
ported adapter could not be an (IA)³ adapter.
"""

from __future__ import annotations

import os

from ..errors import AdapterError, NumericsError, ShapeError
from ..io.adapter import targets_module
from .base import Kind, MergeTarget, PeftRefine, Step, checked
from .lora import describe_modules, targeted, task_type

PARAMS = ("ia3_l",)


def scale(weight, l, rows: bool, transposed: bool, sign: int):
    """W' = diag(l) W (rows=True) or W diag(l), for W stored [out, in] or, transposed, [in, out];
    sign −1 divides (unmerge). float32 in, float32 out."""
    l = l.float().reshape(-1)
    dim0 = rows != transposed  # l runs along the stored dim 0: out of [out, in], or in of [in, out]
    v = l.unsqueeze(1) if dim0 else l.unsqueeze(0)
    return weight.mul_(v) if sign > 0 else weight.div_(v)


def feedforward(config: dict, module: str) -> bool:
    ff = config.get("feedforward_modules") or []
    return targets_module({"target_modules": ff}, module)


def default_targets(arch) -> tuple[list[str], list[str]]:
    """(targets, feedforward) suffixes: key/value writers and MLP neuron readers of the layer stacks."""
    neurons = set((arch.spec.get("prune") or {}).get("neurons") or {})
    targets, ff = set(), set()
    for t in arch.linears():
        if t.stack is None:
            continue
        suffix = t.module[len(arch.spec["stacks"][t.stack]["prefix"].format(i=t.layer)):]
        if any(arch.is_kv(s) for s in t.out_dims):
            targets.add(suffix)
        if set(t.in_dims) & neurons:
            targets.add(suffix)
            ff.add(suffix)
    return sorted(targets), sorted(ff)


class IA3(PeftRefine, Kind):
    name = "ia3"
    title = "(IA)³"
    peft_type = "IA3"
    commands = ("train", "eval", "inspect", "merge-lora", "unmerge-lora", "refine")

    def merge_steps(self, ad, target: MergeTarget, weight: float, sign: int) -> list:
        steps = []
        for mod, ps in sorted(ad.module_params(PARAMS).items()):
            spec, _, (n_out, n_in) = target.linear(ad, mod)
            label = f"{os.path.basename(ad.path)}:{mod}"
            ff = feedforward(ad.config, mod)
            l = checked(label, ps["ia3_l"].float())
            want = (1, n_in) if ff else (n_out, 1)
            if tuple(l.shape) != want:
                raise ShapeError(f"{label}: ia3_l is {list(l.shape)} but a {'feedforward' if ff else 'key/value'} "
                                 f"layer [{n_out} out, {n_in} in] needs {list(want)}",
                                 "use the adapter with the base model it was trained on (and its feedforward_modules)")
            l = 1 + weight * (l.reshape(-1) - 1)
            if sign < 0 and bool((l == 0).any()):
                raise NumericsError(f"{label}: the (IA)³ scaling has zero entries, which the merge erased",
                                    "those rows or columns cannot be recovered; unmerge from another copy of the base")
            steps.append((spec.name, Step(label, lambda w, orig, l=l, ff=ff, t=spec.transposed:
                                          scale(w, l, rows=not ff, transposed=t, sign=sign))))
            bname = spec.name[: -len("weight")] + "bias"
            if not ff and bname in target.by_name:  # peft scales the bias of an output-scaled layer too
                steps.append((bname, Step(label, lambda w, orig, l=l: w.mul_(l) if sign > 0 else w.div_(l))))
        return steps

    def wrap(self, model, arch, opts):
        import peft

        if opts.targets:
            targets = list(opts.targets)
            neurons = set((arch.spec.get("prune") or {}).get("neurons") or {})
            hits = targeted(arch, targets)
            ff = sorted({s for s in targets for t in hits
                         if (t.module == s or t.module.endswith("." + s)) and set(t.in_dims) & neurons})
        else:
            targets, ff = default_targets(arch)
            hits = targeted(arch, targets)
        cfg = peft.IA3Config(task_type=task_type(model), target_modules=targets, feedforward_modules=ff,
                             fan_in_fan_out=any(t.transposed for t in hits))
        return peft.get_peft_model(model, cfg)

    def details(self, ad) -> dict:
        info = describe_modules(ad, ad.module_params(PARAMS))
        for k in ("use_rslora", "use_dora", "rank_pattern", "alpha_pattern"):
            info.pop(k)
        return {**info, "feedforward_modules": ad.config.get("feedforward_modules")}


KIND = IA3()
