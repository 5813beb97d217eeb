"""LoKr (Yeh et al., 2024, arXiv:2309.14859): ΔW = (alpha/r) · kron(w1, w2), in PEFT's format.

Files: adapter_config.json (peft_type LOKR) + base_model.model.<module>.lokr_w1 | lokr_w1_a/_b and
lokr_w2 | lokr_w2_a/_b (| lokr_t2). ΔW is ops.lokr.lokr_delta, built when its tensor streams by.
extract-krona writes this kind (pipelines/krona.py). PEFT's LoKr cannot wrap Conv1D layers, so
training refuses transposed targets.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import AdapterError, ShapeError
from ..ops.lokr import lokr_delta
from ..ops.lora import fold
from .base import Kind, MergeTarget, PeftRefine, Step, checked
from .lora import default_targets, describe_modules, targeted, task_type

PARAMS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


@dataclass
class LokrModule:
    module: str
    params: dict  # lokr_* name -> tensor
    scaling: float


def modules(ad) -> list[LokrModule]:
    if ad.peft_type != "LOKR":
        raise AdapterError(f"{ad.path} is a {ad.peft_type} adapter, not LoKr", "use a LoKr adapter here")
    cfg = ad.config
    out = []
    for mod, ps in sorted(ad.module_params(PARAMS).items()):
        r0 = cfg.get("r", 8)
        r, alpha = ad.rank_alpha(mod, r0, cfg.get("alpha", r0))
        out.append(LokrModule(mod, ps, alpha / r))  # peft's LoKr scaling: no rsLoRA variant
    return out


def _fits(label: str, params: dict, out_in: tuple) -> None:
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


class Lokr(PeftRefine, Kind):
    name = "lokr"
    title = "LoKr"
    peft_type = "LOKR"
    commands = ("train", "eval", "inspect", "merge-lora", "unmerge-lora", "refine")

    def merge_steps(self, ad, target: MergeTarget, weight: float, sign: int) -> list:
        steps = []
        for m in modules(ad):
            spec, _, out_in = target.linear(ad, m.module)
            label = f"{os.path.basename(ad.path)}:{m.module}"
            _fits(label, m.params, out_in)

            def step(w, orig, m=m, label=label, out_in=out_in, t=spec.transposed):
                d = lokr_delta(m.params, m.scaling * weight, out_in)  # dense only while its tensor streams by
                return fold(w, checked(label, d.T if t else d), sign)

            steps.append((spec.name, Step(label, step)))
        return steps

    def wrap(self, model, arch, opts):
        import peft

        targets = list(opts.targets) if opts.targets else default_targets(arch)
        transposed = [t.module for t in targeted(arch, targets) if t.transposed]
        if transposed:
            raise AdapterError(f"{transposed[0]} is stored transposed (a Conv1D layer), which peft's LoKr cannot wrap",
                               "use --method lora on this model, or target only nn.Linear layers")
        alpha = float(opts.alpha if opts.alpha is not None else 2 * opts.rank)
        cfg = peft.LoKrConfig(task_type=task_type(model), r=opts.rank, alpha=alpha, target_modules=targets)
        return peft.get_peft_model(model, cfg)

    def details(self, ad) -> dict:
        return describe_modules(ad, ad.module_params(PARAMS), r=ad.config.get("r"),
                                alpha=ad.config.get("lora_alpha", ad.config.get("alpha")))


KIND = Lokr()
