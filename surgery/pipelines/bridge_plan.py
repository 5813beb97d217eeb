"""Plan a bridge: its widths (from --reduction or explicit sizes), its config, and what it keeps.

Widths are set through the family map's `prune.config_keys` (which config field holds each width).
A width without a config key follows from the others: GPT-2 has no head_dim field, so its heads
follow from the residual width (hidden = heads * head_dim); T5 and GPT-2 have no kv_heads field,
so kv_heads = heads. Heads are kept in whole grouped-query groups and head_dim never changes
(RoPE rotates pairs inside a head).
"""

from __future__ import annotations

import copy
import math

from ..arch import load_arch
from ..errors import ShapeError
from ..ops.fisher import retained, top_k
from ..ops.slice import heads_to_coords

SIZE_NAMES = ("hidden", "heads", "kv_heads", "intermediate")


def _sizes_at(arch, s: float, fixed: dict) -> dict:
    d, keys = arch.dims, arch.prune["config_keys"]
    rep = d["heads"] // d["kv_heads"]

    def shrink(n):
        return max(1, min(n, round(n / s)))

    out = {"intermediate": fixed.get("intermediate", shrink(d["intermediate"]))}
    if "kv_heads" in fixed:
        kv = fixed["kv_heads"]
    elif "heads" in fixed:
        kv = fixed["heads"] // rep
    elif "head_dim" not in keys and "hidden" in fixed:
        kv = fixed["hidden"] // d["head_dim"] // rep
    else:
        kv = shrink(d["kv_heads"])
    out["kv_heads"], out["heads"] = kv, kv * rep
    # no head_dim field: the residual width is heads * head_dim
    if "head_dim" not in keys:
        out["hidden"] = out["heads"] * d["head_dim"]
    elif arch.prune.get("hidden_multiple_of_heads") and "hidden" not in fixed:
        # the family's config refuses a hidden size that is not whole heads (transformers' LlamaConfig
        # does even with an explicit head_dim): round the shrunk width to a multiple of the heads
        h = out["heads"]
        out["hidden"] = min(d["hidden"] // h * h, max(h, round(shrink(d["hidden"]) / h) * h))
    else:
        out["hidden"] = fixed.get("hidden", shrink(d["hidden"]))
    return out


def _check_fixed(arch, fixed: dict) -> None:
    d, keys = arch.dims, arch.prune["config_keys"]
    rep = d["heads"] // d["kv_heads"]
    for name, v in fixed.items():
        if not 1 <= v <= d[name]:
            raise ShapeError(f"requested {name} {v} is outside 1..{d[name]} (the LLM's {name})",
                             "a bridge is a sub-model: choose a size no larger than the LLM's")
    if "heads" in fixed and fixed["heads"] % rep:
        raise ShapeError(f"requested {fixed['heads']} heads, but {arch.family} groups {rep} query heads per kv head",
                         f"use a multiple of {rep} (grouped-query groups are kept whole)")
    if "heads" in fixed and "kv_heads" in fixed and fixed["heads"] != fixed["kv_heads"] * rep:
        raise ShapeError(f"requested {fixed['heads']} heads with {fixed['kv_heads']} kv heads; the LLM's ratio is {rep}",
                         "keep heads = kv_heads * the LLM's group size, or give only one of them")
    if arch.prune.get("hidden_multiple_of_heads") and "hidden" in fixed and "heads" in fixed \
            and fixed["hidden"] % fixed["heads"]:
        raise ShapeError(f"{arch.family}: hidden {fixed['hidden']} is not a multiple of {fixed['heads']} heads",
                         "its config refuses that; choose a hidden size that is a multiple of the heads")
    if "head_dim" not in keys and "hidden" in fixed:
        if fixed["hidden"] % (d["head_dim"] * rep):
            raise ShapeError(f"{arch.family}: hidden {fixed['hidden']} is not a multiple of head_dim {d['head_dim']}"
                             f"{' x ' + str(rep) if rep > 1 else ''}",
                             "its config derives head_dim = hidden // heads, so the hidden size must be whole heads")
        if "heads" in fixed and fixed["heads"] * d["head_dim"] != fixed["hidden"]:
            raise ShapeError(f"{arch.family}: hidden {fixed['hidden']} != heads {fixed['heads']} x head_dim {d['head_dim']}",
                             "give only one of --hidden-size / --num-attention-heads")


def bridge_config(arch, sizes: dict) -> dict:
    """The LLM's config with the bridge's widths written into the family's config fields."""
    cfg = copy.deepcopy(arch.config)
    want = {**sizes, "head_dim": arch.dims["head_dim"]}
    for name, key in arch.prune["config_keys"].items():
        cfg[key] = want[name]
    new = load_arch(cfg)
    for name in (*SIZE_NAMES, "head_dim"):
        if new.dims[name] != want[name]:
            raise ShapeError(f"{arch.family}: the bridge config gives {name} {new.dims[name]}, expected {want[name]}",
                             "the family map's prune.config_keys lacks the field that sets it")
    return cfg


def plan_sizes(arch, reduction: float, fixed: dict) -> dict:
    """Widths that keep about 1/reduction of the parameters, each width divided by a common
    factor s (about sqrt(reduction); found by search so the embeddings' share is accounted for)."""
    if not (math.isfinite(reduction) and reduction >= 1):  # nan passes `< 1`; it would reach bridge.json
        raise ShapeError(f"--reduction {reduction} is not a number >= 1", "a bridge keeps 1/R of the LLM; use R >= 1 (16 in the paper)")
    fixed = {k: v for k, v in fixed.items() if v is not None}
    _check_fixed(arch, fixed)
    target = arch.num_parameters() / reduction
    best = None
    for step in range(0, 121):
        s = math.exp(step * math.log(max(reduction, 1.0) * 4) / 120) if reduction > 1 else 1.0
        sizes = _sizes_at(arch, s, fixed)
        n = load_arch(bridge_config(arch, sizes)).num_parameters()
        err = abs(math.log(n / target))
        if best is None or err < best[0] - 1e-12:
            best = (err, sizes)
        if reduction == 1:
            break
    return {k: best[1][k] for k in SIZE_NAMES}


def _group_key(group: str, kv: bool) -> str:
    base = "heads" if group == "attn" else f"{group}_heads"
    return ("kv_" + base if group == "attn" else f"{group}_kv_heads") if kv else base


def select(arch, unit_scores: dict, sizes: dict) -> tuple[dict, dict]:
    """Kept coordinates (bridge.json `kept`) and retained importance shares (`retained`)."""
    res = top_k(unit_scores["residual"], sizes["hidden"])
    kept = {"residual": res, "layers": {}}
    ret = {"residual": retained(unit_scores["residual"], res), "layers": {}}
    rep = arch.dims["heads"] // arch.dims["kv_heads"]
    shared = set(arch.prune.get("shared_heads", []))
    for stack, n in arch.stacks.items():
        groups = arch.head_groups(stack)
        # groups whose heads are one set per stack (T5: layer 0's relative position bias feeds all)
        pooled = {g: sum(unit_scores[(stack, i, g)] for i in range(n)) for g in groups if g in shared}
        layers, rets = [], []
        for i in range(n):
            lk, lr = {}, {}
            for g, spaces in groups.items():
                sc = pooled.get(g, unit_scores[(stack, i, g)])
                kv = top_k(sc, sizes["kv_heads"])
                heads = [k * rep + r for k in kv for r in range(rep)]
                for s in spaces:
                    lk[s] = heads_to_coords(kv if arch.is_kv(s) else heads, arch.head_size(s))
                lk[_group_key(g, False)], lk[_group_key(g, True)] = heads, kv
                lr[_group_key(g, False)] = retained(unit_scores[(stack, i, g)], kv)
            for space, dim in arch.prune.get("neurons", {}).items():
                if (stack, i, space) in unit_scores:
                    keep = top_k(unit_scores[(stack, i, space)], sizes[dim])
                    lk[space] = keep
                    lr[space] = retained(unit_scores[(stack, i, space)], keep)
            layers.append(lk)
            rets.append(lr)
        kept["layers"][stack], ret["layers"][stack] = layers, rets
    return kept, ret


def layer_kept(kept: dict, stack: str | None, layer: int | None) -> dict:
    """{space: kept coordinates} for slicing one tensor (residual always; layer spaces in a layer)."""
    out = {"residual": kept["residual"]}
    if stack is not None:
        out.update({k: v for k, v in kept["layers"][stack][layer].items() if "." in k})
    return out
