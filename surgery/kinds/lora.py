"""LoRA (Hu et al., 2021, arXiv:2106.09685): ΔW = s · B A on chosen linear layers, in PEFT's format.

Files: adapter_config.json (peft_type LORA) + base_model.model.<module>.lora_A.weight [r, in] and
.lora_B.weight [out, r] (also for GPT-2's Conv1D, whose stored weight is [in, out]); optional
.lora_B.bias (lora_bias). s = alpha/r (alpha/√r with rsLoRA), rank_pattern / alpha_pattern per module
(the rule is io.adapter's rank_alpha + scaling, written once).

merge: W ± s·BA in float32, folded as factors (ops.lora). transfer: A_llm = A·Q_in, B_llm = P_out·B
(ops.project.port_lora), duplicated into the chosen LLM layers. tune-bridge: restrict A and B to the
bridge's kept coordinates (ops.bridge.restrict), train a peft LoRA there, lift the change back.
DoRA is its own kind (dora.py) built on these readers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import AdapterError, ShapeError
from ..io.adapter import Adapter, lora_config, lora_key, scaling, write_adapter
from ..ops.bridge import lift, restrict
from ..ops.lora import LowRankDelta, fold, grow_rank, lora_bias_delta
from ..ops.project import port_lora
from ..ops.slice import axis_indices, bridge_name
from .base import Kind, MergeTarget, PeftRefine, PortContext, Step, checked

PARAMS = ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_magnitude_vector", "lora_magnitude_vector.weight")


@dataclass
class LoraModule:
    """One wrapped linear layer of a LoRA adapter, in peft's own orientation.

    A: [r, in], B: [out, r] always (also for fan_in_fan_out layers, whose *base weight* is [in, out]).
    """

    module: str
    A: object
    B: object
    scaling: float
    fan_in_fan_out: bool = False
    magnitude: object | None = None  # DoRA
    bias: object | None = None  # lora_bias=True: a bias on lora_B

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])


def modules(ad) -> list[LoraModule]:
    """Every LoRA module of the adapter, with its scaling after rank/alpha patterns."""
    if ad.peft_type != "LORA":
        raise AdapterError(f"{ad.path} is a {ad.peft_type} adapter, not LoRA", "use a LoRA adapter here")
    cfg = ad.config
    out = []
    for mod, ps in sorted(ad.module_params(PARAMS).items()):
        if "lora_A.weight" not in ps or "lora_B.weight" not in ps:
            raise AdapterError(f"{ad.path}: {mod} lacks lora_A or lora_B", "the adapter file is incomplete; re-save it")
        A, B = ps["lora_A.weight"], ps["lora_B.weight"]
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise AdapterError(f"{ad.path}: {mod} has lora_A {list(A.shape)} and lora_B {list(B.shape)} that do not chain",
                               "only linear (2-D) LoRA layers are supported")
        rank = int(A.shape[0])
        r0 = cfg.get("r", rank)
        r, alpha = ad.rank_alpha(mod, r0, cfg.get("lora_alpha", cfg.get("alpha", r0)))
        if r != rank:
            raise AdapterError(f"{ad.path}: {mod} has rank {rank} but the config says {r}",
                               "fix r/rank_pattern in adapter_config.json")
        mag = ps.get("lora_magnitude_vector", ps.get("lora_magnitude_vector.weight"))
        out.append(LoraModule(mod, A, B, scaling(r, alpha, bool(cfg.get("use_rslora"))),
                              bool(cfg.get("fan_in_fan_out")), mag, ps.get("lora_B.bias")))
    return out


def module_delta(ad, target: MergeTarget, m: LoraModule, weight: float):
    """(spec, label, LowRankDelta) of one module, its shapes checked against the base."""
    spec, _, (n_out, n_in) = target.linear(ad, m.module)
    label = f"{os.path.basename(ad.path)}:{m.module}"
    if m.fan_in_fan_out and target.generic:
        raise AdapterError(f"{label}: the adapter says fan_in_fan_out (a Conv1D layer stored [in, out]) but the "
                           "generic map assumes nn.Linear's [out, in]", "add a family file that marks the layer "
                           "transposed, with --family FILE.json (docs/arch.md)")
    if tuple(m.A.shape) != (m.rank, n_in) or tuple(m.B.shape) != (n_out, m.rank):
        raise ShapeError(f"{label}: lora_A {list(m.A.shape)} / lora_B {list(m.B.shape)} do not fit the base "
                         f"weight [{n_out} out, {n_in} in]", "use the adapter with the base model it was trained on")
    # Orientation follows the family map, as peft's Conv1D detection does, whatever fan_in_fan_out says.
    # Kept as factors: a dense ΔW per module held until its tensor streams by would be the model again.
    checked(label, m.A)
    checked(label, m.B)
    return spec, label, LowRankDelta(m.A, m.B, m.scaling * weight, spec.transposed)


def bias_steps(target: MergeTarget, m: LoraModule, spec, label: str, weight: float, sign: int) -> list:
    """lora_bias: the base bias absorbs scaling · b (a vector: cheap to keep)."""
    bname = spec.name[: -len("weight")] + "bias"
    if m.bias is None or not (bname in target.by_name or bool(m.bias.abs().max() > 0)):
        # lora_bias is one flag per adapter: extract-lora gives bias-less layers a zero bias, skipped here
        return []
    if bname not in target.by_name:
        raise AdapterError(f"{label}: the adapter has a lora_B bias but the base layer has no bias",
                           "peft cannot merge lora_bias into a layer without bias either")
    bdelta = checked(label, lora_bias_delta(m.bias, m.scaling * weight))
    return [(bname, Step(label, lambda w, orig, d=bdelta: fold(w, d, sign)))]


def default_targets(arch) -> list[str]:
    """Every linear layer inside the layer stacks (not the LM head), as module-name suffixes."""
    names = set()
    for t in arch.linears():
        if t.stack is not None:
            names.add(t.module[len(arch.spec["stacks"][t.stack]["prefix"].format(i=t.layer)):])
    return sorted(names)


def targeted(arch, targets: list[str]):
    """The family map's linear tensors that these target suffixes select."""
    hits = [t for t in arch.linears() if any(t.module == s or t.module.endswith("." + s) for s in targets)]
    if not hits:
        raise AdapterError(f"--targets {','.join(targets)} match no linear layer of this {arch.family} model",
                           f"choose among {', '.join(default_targets(arch))}")
    return hits


def task_type(model) -> str:
    return "SEQ_2_SEQ_LM" if model.config.is_encoder_decoder else "CAUSAL_LM"


class Lora(PeftRefine, Kind):
    name = "lora"
    title = "LoRA"
    peft_type = "LORA"
    commands = ("train", "eval", "inspect", "merge-lora", "unmerge-lora", "transfer", "tune-bridge", "refine")
    layered = True

    def matches(self, path, config):
        return super().matches(path, config) and not config.get("use_dora")

    # ---- merge-lora / unmerge-lora ------------------------------------------------------------
    def merge_steps(self, ad, target: MergeTarget, weight: float, sign: int) -> list:
        steps = []
        for m in modules(ad):
            spec, label, delta = module_delta(ad, target, m, weight)
            steps.append((spec.name, Step(label, lambda w, orig, d=delta: fold(w, d, sign), delta)))
            steps += bias_steps(target, m, spec, label, weight, sign)
        return steps

    # ---- transfer -----------------------------------------------------------------------------
    def transfer_needs(self, ad, port: PortContext) -> dict:
        """{slm layer: {key: {directions}}}: to_slm of each module's input, to_llm of its outputs."""
        if ad.modules_to_save():
            raise AdapterError(f"{ad.path} saves whole modules ({', '.join(sorted(ad.modules_to_save()))})",
                               "a replaced module cannot be projected; retrain the SLM adapter without modules_to_save")
        needs: dict = {}
        for lm in modules(ad):
            _, i, suffix = port.locate(lm.module)
            role = port.roles[suffix]
            keys = needs.setdefault(i, {})
            keys.setdefault(role.in_key, set()).add("to_slm")
            for k in role.out_keys:
                keys.setdefault(k, set()).add("to_llm")
        return needs

    def port(self, ad, port: PortContext):
        """Rank, alpha and rsLoRA are kept; a module whose scaling differs from what the written config
        gives it (alpha patterns) has the ratio folded into B: one scaling rule per module."""
        import torch

        cfg = ad.config
        r0 = cfg.get("r", 8)
        alpha = cfg.get("lora_alpha", r0)
        rslora = bool(cfg.get("use_rslora"))
        tensors, targets, rank_pattern = {}, [], {}
        for lm in modules(ad):
            _, i, suffix = port.locate(lm.module)
            role = port.roles[suffix]
            ratio = lm.scaling / scaling(lm.rank, alpha, rslora)  # the written config gives rank r, alpha alpha
            for j in port.chosen[i]:
                Q = port.maps[(j, role.in_key, "to_slm")]
                P = torch.block_diag(*[port.maps[(j, k, "to_llm")] for k in role.out_keys])
                A2, B2, b2 = port_lora(lm.A, lm.B, Q, P, lm.bias)
                name = port.llm_module(j, suffix)
                tensors[lora_key(name, "lora_A.weight")] = A2
                tensors[lora_key(name, "lora_B.weight")] = B2 * ratio
                if b2 is not None:
                    tensors[lora_key(name, "lora_B.bias")] = b2 * ratio
                targets.append(name)
                if lm.rank != r0:
                    rank_pattern[name] = lm.rank
        extra = {k: cfg[k] for k in ("task_type", "fan_in_fan_out", "lora_bias") if k in cfg}
        config = lora_config(port.llm_path, r0, alpha, targets, use_rslora=rslora, rank_pattern=rank_pattern, **extra)
        return lambda od: write_adapter(od, config, tensors)

    # ---- tune-bridge --------------------------------------------------------------------------
    def bridge_route(self, path: str, arch, kept: dict, rank: int | None = None, seed: int = 0):
        return LoraRoute(self, path, arch, kept, rank, seed)

    # ---- train --------------------------------------------------------------------------------
    def peft_config(self, model, arch, opts, **extra):
        import peft

        targets = list(opts.targets) if opts.targets else default_targets(arch)
        transposed = [t.module for t in targeted(arch, targets) if t.transposed]
        alpha = float(opts.alpha if opts.alpha is not None else 2 * opts.rank)
        # fan_in_fan_out tells peft the base weight is [in, out]; the map knows which layers are.
        return peft.LoraConfig(task_type=task_type(model), r=opts.rank, lora_alpha=alpha, target_modules=targets,
                               lora_dropout=0.0, fan_in_fan_out=bool(transposed), **extra)

    def wrap(self, model, arch, opts):
        import peft

        return peft.get_peft_model(model, self.peft_config(model, arch, opts))

    # ---- inspect ------------------------------------------------------------------------------
    def details(self, ad) -> dict:
        return details(ad)


def details(ad) -> dict:
    return describe_modules(ad, ad.module_params(PARAMS), r=ad.config.get("r"),
                            alpha=ad.config.get("lora_alpha", ad.config.get("alpha")))


def describe_modules(ad, mods: dict, **head) -> dict:
    """inspect's fields for a kind with per-module weights (LoRA, DoRA, LoKr, IA3)."""
    import re

    cfg = ad.config
    return {**head, "use_rslora": bool(cfg.get("use_rslora")), "use_dora": bool(cfg.get("use_dora")),
            "rank_pattern": cfg.get("rank_pattern") or {}, "alpha_pattern": cfg.get("alpha_pattern") or {},
            "target_modules": cfg.get("target_modules"), "modules_to_save": cfg.get("modules_to_save"),
            "modules": sorted(mods), "module_types": sorted({re.sub(r"^.*\.\d+\.", "", m) for m in mods}),
            "layers": sorted({int(x) for m in mods for x in re.findall(r"\.(\d+)\.", m)[:1]})}


class LoraRoute:
    """tune-bridge for a PEFT LoRA: restrict A and B to the bridge, train a peft LoRA there, lift.

    Algorithm 1 steps 4-8 (Jin, Zhang & Zong, 2023): for every LoRA module, its tensor in the family
    map gives the module's input and output axes; the bridge's kept coordinates become positions
    along them (ops.slice.axis_indices; fused q|k|v axes included), A and B are restricted to them
    (W_down), and after training the learned change is lifted back (ops.bridge.lift).

    rank (tune-bridge --rank): the modules of the bridge's kept layers first grow to this rank
    (ops.lora.grow_rank, seeded: the start's B A unchanged) and keep their scaling, written as
    per-module rank_pattern / alpha_pattern entries; modules of dropped layers keep theirs.
    """

    def __init__(self, kind: Lora, path: str, arch, kept: dict, rank: int | None = None, seed: int = 0):
        self.kind = kind
        self.ad = Adapter.open(path)
        self.path = self.ad.path
        if self.ad.config.get("lora_bias"):
            raise AdapterError(f"{self.path} uses lora_bias, which tune-bridge does not lift back", "use a plain LoRA adapter")
        if self.ad.modules_to_save():
            raise AdapterError(f"{self.path} saves whole modules (modules_to_save)", "use a LoRA adapter without modules_to_save")
        self.steps = self._plan(arch, kept)
        if rank is not None:
            self.grow(rank, seed)

    @property
    def rank(self) -> int:
        """The largest rank among the kept modules (what --rank must reach)."""
        return max(int(s["A"].shape[0]) for s in self.steps)

    def grow(self, rank: int, seed: int) -> None:
        """Every kept module at `rank` (module doc), drawn in module order from one seeded generator."""
        import torch

        top = max(self.steps, key=lambda s: s["A"].shape[0])  # a rank cannot shrink: every kept module must reach it
        if rank < top["A"].shape[0]:
            raise AdapterError(f"--rank {rank} is below the rank {top['A'].shape[0]} of {self.path}'s {top['module']}",
                               f"pass --rank >= {top['A'].shape[0]}, or leave it out to keep the adapter's rank")
        g = torch.Generator().manual_seed(seed)
        for s in self.steps:
            if s["A"].shape[0] < rank:
                s["A"], s["B"] = grow_rank(s["A"], s["B"], rank, g)
                s["A_b"], s["B_b"] = restrict(s["A"], s["B"], s["in_idx"], s["out_idx"])
                s["grown"] = True

    def _plan(self, arch, kept: dict) -> list[dict]:
        """Per module the bridge keeps: its bridge name (layers renumber when the bridge dropped some),
        kept positions and restricted A_b, B_b. Modules of dropped layers stay as given."""
        by_module = arch.by_module()
        out = []
        for m in modules(self.ad):
            t = by_module.get(m.module)
            if t is None:
                raise AdapterError(f"{self.path}: module {m.module} is not a linear layer of this {arch.family} LLM",
                                   "pass the adapter that `surgery transfer` wrote for this LLM")
            n_in, n_out = arch.axis_size(t.in_dims), arch.axis_size(t.out_dims)
            if tuple(m.A.shape[1:]) != (n_in,) or m.B.shape[0] != n_out:
                raise ShapeError(f"{self.path}: {m.module} has lora_A {list(m.A.shape)} and lora_B {list(m.B.shape)} "
                                 f"but the LLM's layer is {n_out}x{n_in}",
                                 "the adapter is for another model; pass the one `surgery transfer` wrote for this LLM")
            name = bridge_name(arch, t.stack, t.layer, m.module, kept)
            if name is None:
                continue
            layer = kept["layers"][t.stack][t.layer] if t.stack else {}
            k = {**layer, "residual": kept["residual"]}
            in_idx, out_idx = axis_indices(arch, t.in_dims, k), axis_indices(arch, t.out_dims, k)
            A_b, B_b = restrict(m.A, m.B, in_idx, out_idx)
            out.append({"module": m.module, "bridge_module": name, "A": m.A, "B": m.B, "scaling": m.scaling,
                        "in_idx": in_idx, "out_idx": out_idx, "A_b": A_b, "B_b": B_b})
        if not out:
            raise AdapterError(f"{self.path}: every LoRA module sits in a layer the bridge dropped",
                               "prune the bridge with fewer --drop-layers")
        return out

    def wrap(self, model, bdir: str):
        """The bridge with the same LoRA config (rank, alpha, targets, patterns) and the restricted weights."""
        import peft

        lcfg = bridge_lora_config(peft.LoraConfig.from_pretrained(self.path), self.steps)
        lcfg.inference_mode = False
        lcfg.base_model_name_or_path = None  # it wraps the bridge, not the LLM its file names (write() keeps that
        pm = peft.get_peft_model(model, lcfg)  # file's config), so peft need not warn that the base was "renamed"
        sd = {}
        for s in self.steps:
            sd[lora_key(s["bridge_module"], "lora_A.weight")] = s["A_b"]
            sd[lora_key(s["bridge_module"], "lora_B.weight")] = s["B_b"]
        load_exact(pm, sd, bdir)
        return pm

    def write(self, od, pm, arch, llm_config: dict) -> None:
        import peft

        new = peft.get_peft_model_state_dict(pm)
        tensors = dict(self.ad.tensors)
        for s in self.steps:
            ka, kb = lora_key(s["module"], "lora_A.weight"), lora_key(s["module"], "lora_B.weight")
            ba, bb = lora_key(s["bridge_module"], "lora_A.weight"), lora_key(s["bridge_module"], "lora_B.weight")
            tensors[ka], tensors[kb] = lift(s["A"], s["B"], s["in_idx"], s["out_idx"],
                                            s["A_b"], new[ba].cpu(), s["B_b"], new[bb].cpu())
        write_adapter(od, grown_config(self.ad.config, self.steps), tensors)

    @property
    def modules(self) -> int:
        return len(self.steps)


def grown_config(cfg: dict, steps: list[dict]) -> dict:
    """The adapter's config with an exact rank_pattern / alpha_pattern entry for every module whose rank
    tune-bridge --rank grew: its new rank, and the alpha that keeps its scaling (alpha/r, alpha/√r with
    rsLoRA). The entries go first: peft and io.adapter take the first pattern that matches."""
    import math
    import re

    grown = [s for s in steps if s.get("grown")]
    if not grown:
        return cfg
    root = math.sqrt if cfg.get("use_rslora") else float
    rp = {re.escape(s["module"]): int(s["A"].shape[0]) for s in grown}
    ap = {re.escape(s["module"]): s["scaling"] * root(int(s["A"].shape[0])) for s in grown}
    return {**cfg, "rank_pattern": {**rp, **(cfg.get("rank_pattern") or {})},
            "alpha_pattern": {**ap, **(cfg.get("alpha_pattern") or {})}}


def bridge_lora_config(lcfg, steps: list[dict]):
    """The LLM adapter's LoraConfig for the bridge. When the bridge renumbered layers (--drop-layers),
    layer-indexed settings (layers_to_transform, rank/alpha patterns, regex targets) would point at
    the wrong layers, so every module is named exactly, with its own rank and alpha. So are they when
    a rank or alpha pattern names a module of a dropped layer, which peft would warn matched nothing."""
    import math
    import re

    if (all(s["module"] == s["bridge_module"] and s["A"].shape[0] == lcfg.r for s in steps)
            and not (lcfg.rank_pattern or lcfg.alpha_pattern)):  # (a module tune-bridge --rank grew differs from r)
        return lcfg
    r = {re.escape(s["bridge_module"]): int(s["A"].shape[0]) for s in steps}
    alpha = {k: s["scaling"] * (math.sqrt(r[k]) if lcfg.use_rslora else r[k]) for s, k in zip(steps, r)}
    lcfg.target_modules = sorted(s["bridge_module"] for s in steps)
    lcfg.layers_to_transform, lcfg.layers_pattern = None, None
    lcfg.rank_pattern, lcfg.alpha_pattern = r, alpha
    return lcfg


def load_exact(pm, sd: dict, bdir: str) -> None:
    """Load the restricted weights into the bridge's peft model, refusing any that peft would skip."""
    from peft import set_peft_model_state_dict

    try:
        res = set_peft_model_state_dict(pm, sd)
    except RuntimeError as e:  # torch's size-mismatch message
        raise ShapeError(f"the bridge at {bdir} does not match its bridge.json ({str(e).splitlines()[-1].strip()})",
                         "re-create the bridge with `surgery prune-bridge`") from e
    if res.unexpected_keys:
        raise AdapterError(f"the bridge at {bdir} has no LoRA layer for {res.unexpected_keys[0]}",
                           "the bridge and the adapter must come from the same LLM")
    missing = [k for k in res.missing_keys if "lora_" in k]
    if missing:
        raise AdapterError(f"the bridge's LoRA layer {missing[0]} got no weights from the adapter",
                           "the adapter's target_modules select layers it holds no weights for")


KIND = Lora()
