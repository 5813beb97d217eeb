"""`surgery tune-bridge`: fine-tune an LLM's LoRA (or bottleneck) adapter through the bridge, never touching the LLM.

Algorithm 1 steps 4-8 (Jin, Zhang & Zong, 2023). Plan: for every LoRA module of the LLM adapter,
find its tensor in the family map, turn the bridge's kept coordinates into positions along the
module's input and output axes (surgery.ops.slice.axis_indices; fused q|k|v axes included) and
restrict A and B to them (W_down). Then put a peft LoRA with those weights on the bridge, train it
with the shared loop, and lift the learned change back into the LLM's coordinates
(surgery.ops.bridge). Only the LLM's config.json is read, for the sizes of its spaces.
An AdapterHub bottleneck adapter takes the same path through BottleneckRoute (tune_bridge_bottleneck).
"""

from __future__ import annotations

import json
import math
import os

from ..errors import AdapterError, CheckpointError, ShapeError
from ..train.loop import TrainConfig

BRIDGE_FORMAT = "surgery.bridge/1"


def read_bridge(path: str) -> tuple[str, dict]:
    """(bridge checkpoint dir, bridge.json contents); accepts the directory or the json file."""
    d = os.path.dirname(os.path.abspath(path)) if path.endswith(".json") else os.path.abspath(path)
    f = os.path.join(d, "bridge.json")
    if not os.path.exists(f):
        raise CheckpointError(f"{d} has no bridge.json", "pass the directory written by `surgery prune-bridge`")
    with open(f) as fh:
        meta = json.load(fh)
    if meta.get("format") != BRIDGE_FORMAT or "kept" not in meta:
        raise CheckpointError(f"{f} is not a {BRIDGE_FORMAT} file (format {meta.get('format')!r})",
                              "re-create the bridge with `surgery prune-bridge`")
    return d, meta


def _llm_config(meta: dict, llm: str | None, where: str) -> dict:
    src = llm or meta.get("source")
    cfg = os.path.join(src or "", "config.json")
    if not src or not os.path.exists(cfg):
        raise CheckpointError(f"{where} names the LLM {src!r}, whose config.json is not there",
                              "pass --llm with the LLM directory (only its config.json is read)")
    with open(cfg) as f:
        return json.load(f)


def bridge_module(arch, t, kept: dict) -> str | None:
    """The bridge's name for the LLM module of tensor spec `t` (layers renumber when the bridge
    dropped some), or None when the bridge dropped its layer."""
    from .bridge_plan import bridge_layer

    if t.stack is None:
        return t.module
    j = bridge_layer(kept, t.stack, t.layer)
    if j is None:
        return None
    prefix = arch.spec["stacks"][t.stack]["prefix"]
    return prefix.format(i=j) + t.module[len(prefix.format(i=t.layer)):]


def plan(adapter, arch, kept: dict) -> list[dict]:
    """Per LoRA module the bridge keeps: its bridge name, kept input/output positions and the
    restricted A_b, B_b. Modules of dropped layers are left out (their A and B stay as given)."""
    from ..ops.bridge import restrict
    from ..ops.slice import axis_indices

    by_module = arch.by_module()
    out = []
    for m in adapter.lora_modules():
        t = by_module.get(m.module)
        if t is None:
            raise AdapterError(f"{adapter.path}: module {m.module} is not a linear layer of this {arch.family} LLM",
                               "pass the adapter that `surgery transfer` wrote for this LLM")
        n_in, n_out = arch.axis_size(t.in_dims), arch.axis_size(t.out_dims)
        if tuple(m.A.shape[1:]) != (n_in,) or m.B.shape[0] != n_out:
            raise ShapeError(f"{adapter.path}: {m.module} has lora_A {list(m.A.shape)} and lora_B {list(m.B.shape)} "
                             f"but the LLM's layer is {n_out}x{n_in}",
                             "the adapter is for another model; pass the one `surgery transfer` wrote for this LLM")
        name = bridge_module(arch, t, kept)
        if name is None:
            continue
        layer = kept["layers"][t.stack][t.layer] if t.stack else {}
        k = {**layer, "residual": kept["residual"]}
        in_idx, out_idx = axis_indices(arch, t.in_dims, k), axis_indices(arch, t.out_dims, k)
        A_b, B_b = restrict(m.A, m.B, in_idx, out_idx)
        out.append({"module": m.module, "bridge_module": name, "A": m.A, "B": m.B, "scaling": m.scaling,
                    "in_idx": in_idx, "out_idx": out_idx, "A_b": A_b, "B_b": B_b})
    if not out:
        raise AdapterError(f"{adapter.path}: every LoRA module sits in a layer the bridge dropped",
                           "prune the bridge with fewer --drop-layers")
    return out


def bridge_lora_config(lcfg, steps: list[dict]):
    """The LLM adapter's LoraConfig for the bridge. When the bridge renumbered layers (--drop-layers),
    layer-indexed settings (layers_to_transform, rank/alpha patterns, regex targets) would point at
    the wrong layers, so every module is named exactly, with its own rank and alpha."""
    import re

    if all(s["module"] == s["bridge_module"] for s in steps):
        return lcfg
    r = {re.escape(s["bridge_module"]): int(s["A"].shape[0]) for s in steps}
    alpha = {re.escape(s["bridge_module"]): s["scaling"] * (math.sqrt(r[k]) if lcfg.use_rslora else r[k])
             for s, k in zip(steps, r)}
    lcfg.target_modules = sorted(s["bridge_module"] for s in steps)
    lcfg.layers_to_transform, lcfg.layers_pattern = None, None
    lcfg.rank_pattern, lcfg.alpha_pattern = r, alpha
    return lcfg


def _check_supported(adapter) -> None:
    cfg = adapter.config
    if adapter.peft_type != "LORA":
        raise AdapterError(f"{adapter.path} is a {adapter.peft_type} adapter; tune-bridge tunes LoRA and bottleneck adapters",
                           "transfer a LoRA or bottleneck adapter (surgery train --method lora|adapter, then surgery transfer)")
    for key, what in (("use_dora", "DoRA"), ("lora_bias", "lora_bias")):
        if cfg.get(key):
            raise AdapterError(f"{adapter.path} uses {what}, which tune-bridge does not lift back", "use a plain LoRA adapter")
    if adapter.modules_to_save():
        raise AdapterError(f"{adapter.path} saves whole modules (modules_to_save)", "use a LoRA adapter without modules_to_save")


class LoraRoute:
    """tune-bridge for a PEFT LoRA: restrict A and B (plan), train a peft LoRA on the bridge, lift (ops.bridge)."""

    kind = "LoRA"

    def __init__(self, adapter_dir: str, arch, kept: dict):
        from ..io.adapter import Adapter

        self.ad = Adapter.open(adapter_dir)
        _check_supported(self.ad)
        self.steps = plan(self.ad, arch, kept)
        self.path = self.ad.path

    def wrap(self, model, bdir: str):
        """The bridge with the same LoRA config (rank, alpha, targets, patterns) and the restricted weights."""
        import peft

        from ..io.adapter import lora_key

        lcfg = bridge_lora_config(peft.LoraConfig.from_pretrained(self.ad.path), self.steps)
        lcfg.inference_mode = False
        pm = peft.get_peft_model(model, lcfg)
        sd = {}
        for s in self.steps:
            sd[lora_key(s["bridge_module"], "lora_A.weight")] = s["A_b"]
            sd[lora_key(s["bridge_module"], "lora_B.weight")] = s["B_b"]
        _load_exact(pm, sd, bdir)
        return pm

    def write(self, od, pm, arch, llm_config: dict) -> None:
        import peft

        from ..io.adapter import lora_key, write_adapter
        from ..ops.bridge import lift

        new = peft.get_peft_model_state_dict(pm)
        tensors = dict(self.ad.tensors)
        for s in self.steps:
            ka, kb = lora_key(s["module"], "lora_A.weight"), lora_key(s["module"], "lora_B.weight")
            ba, bb = lora_key(s["bridge_module"], "lora_A.weight"), lora_key(s["bridge_module"], "lora_B.weight")
            tensors[ka], tensors[kb] = lift(s["A"], s["B"], s["in_idx"], s["out_idx"],
                                            s["A_b"], new[ba].cpu(), s["B_b"], new[bb].cpu())
        write_adapter(od, self.ad.config, tensors)

    @property
    def modules(self) -> int:
        return len(self.steps)


def tune_bridge(adapter_dir: str, bridge: str, data: str, out: str, *, eval_data: str | None = None,
                llm: str | None = None, max_length: int = 512, force: bool = False,
                cfg: TrainConfig | None = None) -> dict:
    """Tune `adapter_dir` (a LoRA or bottleneck adapter for the LLM) on the bridge; write the lifted LLM adapter to `out`."""
    from ..arch import load_arch
    from ..io.adapterhub import is_adapterhub_dir
    from ..io.writer import OutputDir
    from ..train.data import load_examples
    from ..train.loop import fit, is_main_process, place
    from ..train.methods import load_base
    from .tune_bridge_bottleneck import BottleneckRoute

    cfg = cfg or TrainConfig()
    bdir, meta = read_bridge(bridge)
    llm_config = _llm_config(meta, llm, os.path.join(bdir, "bridge.json"))
    arch = load_arch(llm_config, "the LLM's config.json")
    if arch.family != meta.get("family", arch.family):
        raise CheckpointError(f"bridge.json says family {meta['family']} but the LLM is {arch.family}", "pass the matching --llm")
    route = (BottleneckRoute if is_adapterhub_dir(adapter_dir) else LoraRoute)(adapter_dir, arch, meta["kept"])
    inputs = [route.path, bdir, data] + ([eval_data] if eval_data else [])
    with OutputDir(out, inputs=inputs, force=force) as od:
        model, tok, _ = load_base(bdir)
        seq2seq = bool(model.config.is_encoder_decoder)
        train_ex = load_examples(data, tok, seq2seq=seq2seq, max_length=max_length)
        eval_ex = load_examples(eval_data, tok, seq2seq=seq2seq, max_length=max_length) if eval_data else None
        pm = place(route.wrap(model, bdir))
        before, hist, after = fit(pm, tok, train_ex, eval_ex, cfg, seq2seq=seq2seq)
        if not is_main_process():  # data-parallel workers: the main process writes the one output
            od.abort()
            return {}
        route.write(od, pm, arch, llm_config)
        od.write_json("tune_bridge.json", {"adapter": route.path, "bridge": bdir, "data": os.path.abspath(data),
                                           "kind": route.kind, "seed": cfg.seed, "epochs": cfg.epochs, "lr": cfg.lr,
                                           "batch_size": cfg.batch_size, "bridge_before": before,
                                           "bridge_after": after, "history": hist.as_dict()})
        path = od.commit()
    bridge_params = sum(p.numel() for p in pm.parameters() if not p.requires_grad)
    return {"output": path, "family": arch.family, "kind": route.kind, "modules": route.modules, "steps": hist.steps,
            "bridge_parameters": bridge_params, "llm_parameters": arch.num_parameters(),
            "trainable": sum(p.numel() for p in pm.parameters() if p.requires_grad),
            "device": hist.device, "mixed_precision": hist.mixed_precision,
            "evaluated_on": "eval" if eval_ex else "train", "before": before, "after": after}


def _load_exact(pm, sd: dict, bdir: str) -> None:
    """Load the restricted weights into the bridge's LoRA, refusing any that peft would skip."""
    from peft import set_peft_model_state_dict

    try:
        res = set_peft_model_state_dict(pm, sd)
    except RuntimeError as e:  # torch's size-mismatch message
        raise ShapeError(f"the bridge at {bdir} does not match its bridge.json ({str(e).splitlines()[-1].strip()})",
                         "re-create the bridge with `surgery prune-bridge`") from e
    if res.unexpected_keys:
        raise AdapterError(f"the bridge at {bdir} has no LoRA layer for {res.unexpected_keys[0]}",
                           "the bridge and the adapter must come from the same LLM")
    lora_missing = [k for k in res.missing_keys if "lora_" in k]
    if lora_missing:
        raise AdapterError(f"the bridge's LoRA layer {lora_missing[0]} got no weights from the adapter",
                           "the adapter's target_modules select layers it holds no weights for")
