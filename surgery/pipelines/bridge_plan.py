"""Plan a bridge: its widths (from --reduction or explicit sizes), its depth, its config, and what it keeps.

Two shapes (`residual`):
* "keep" (default): every residual channel stays (embeddings, norms, every read and write of the
  stream), and the reduction is spent on attention heads (whole kv groups), MLP neurons and, with
  `drop_layers`, whole layers. The lift back into the LLM then covers every residual coordinate,
  which is what makes the tuned adapter carry over (issue 16: 0.55 vs 0.09 accuracy on the LLM).
* "prune": the residual width is cut too (the narrow bridge of Ladder Side-Tuning / the paper);
  kept for comparison.
`--reduction R` means about 1/R of the *non-embedding* parameters (embeddings and LM head are the
vocabulary's, which a bridge never shrinks, and on small models they hide the saving).

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
from ..ops.slice import bridge_layer, bridge_layer_ids, bridge_name, heads_to_coords  # noqa: F401 (re-exported)

SIZE_NAMES = ("hidden", "heads", "kv_heads", "intermediate")
RESIDUAL = ("keep", "prune")
EMBEDDING_ROLES = ("embedding", "lm_head")


def parameter_counts(arch) -> dict:
    """{"total", "non_embedding"}: stored parameters, and those outside the vocabulary's
    embeddings / LM head (and GPT-2's position table) -- the part a bridge can shrink."""
    total = emb = 0
    for t in arch.stored_tensors():
        n = 1
        for d in arch.shape(t):
            n *= d
        total += n
        emb += n if t.role in EMBEDDING_ROLES else 0
    return {"total": total, "non_embedding": total - emb}


def kv_choices(arch, hidden: int) -> list[int]:
    """The kv-head counts (1..the LLM's) the family's config accepts at this residual width: all of them,
    unless it refuses a hidden size that is not whole heads (llama: 2048 wide with 8 heads a group takes
    1, 2 or 4 groups, not 3)."""
    d, rep = arch.dims, arch.dims["heads"] // arch.dims["kv_heads"]
    every = list(range(1, d["kv_heads"] + 1))
    return [k for k in every if hidden % (k * rep) == 0] if arch.prune.get("hidden_multiple_of_heads") else every


def _valid_kv(arch, kv: int, hidden: int) -> int:
    """The nearest kv-head count (ties: fewer) the family's config accepts at this residual width."""
    ok = kv_choices(arch, hidden)
    return min(ok, key=lambda k: (abs(k - kv), k)) if ok else kv


def _sizes_at(arch, s: float, fixed: dict, residual: str = "prune") -> dict:
    d, keys = arch.dims, arch.prune["config_keys"]
    rep = d["heads"] // d["kv_heads"]

    def shrink(n):
        return max(1, min(n, round(n / s)))

    out = {"intermediate": fixed.get("intermediate", shrink(d["intermediate"]))}
    if residual == "keep":
        out["hidden"] = d["hidden"]
        if "kv_heads" in fixed or "heads" in fixed:
            kv = fixed["kv_heads"] if "kv_heads" in fixed else fixed["heads"] // rep
        elif "head_dim" not in keys:  # GPT-2: head_dim = hidden // heads, so a kept residual keeps every head
            kv = d["kv_heads"]
        else:
            kv = _valid_kv(arch, shrink(d["kv_heads"]), d["hidden"])
        out["kv_heads"], out["heads"] = kv, kv * rep
        return out
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


def _check_fixed(arch, fixed: dict, residual: str = "prune") -> None:
    d, keys = arch.dims, arch.prune["config_keys"]
    rep = d["heads"] // d["kv_heads"]
    if residual not in RESIDUAL:
        raise ShapeError(f"unknown residual mode {residual!r}", "use --residual keep (default) or --residual prune")
    if residual == "keep" and fixed.get("hidden", d["hidden"]) != d["hidden"]:
        raise ShapeError(f"--hidden-size {fixed['hidden']} drops residual channels, but the bridge keeps the residual "
                         f"({d['hidden']} channels)", "add --residual prune for a narrow bridge, or leave out --hidden-size")
    if residual == "keep" and "head_dim" not in keys and fixed.get("heads", d["heads"]) != d["heads"]:
        raise ShapeError(f"{arch.family} derives head_dim = hidden // heads, so a bridge that keeps the residual keeps "
                         f"all {d['heads']} heads", "leave out --num-attention-heads, or add --residual prune")
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


def stack_count_key(arch, stack: str) -> str:
    """The config field that holds a stack's layer count (first name the family map lists)."""
    return arch.spec["stacks"][stack]["count"][0]


def bridge_config(arch, sizes: dict, layers: dict | None = None) -> dict:
    """The LLM's config with the bridge's widths written into the family's config fields, and,
    when `layers` ({stack: kept LLM layer indices}) drops some, its layer counts and per-layer lists."""
    cfg = copy.deepcopy(arch.config)
    want = {**sizes, "head_dim": arch.dims["head_dim"]}
    for name, key in arch.prune["config_keys"].items():
        cfg[key] = want[name]
    for stack, keep in (layers or {}).items():
        if len(keep) == arch.stacks[stack]:
            continue
        cfg[stack_count_key(arch, stack)] = len(keep)
        for key in arch.spec["stacks"][stack].get("per_layer", []):  # e.g. layer_types (sliding/full attention)
            if isinstance(cfg.get(key), list) and len(cfg[key]) == arch.stacks[stack]:
                cfg[key] = [cfg[key][i] for i in keep]
    new = load_arch(cfg)
    for name in (*SIZE_NAMES, "head_dim"):
        if new.dims[name] != want[name]:
            raise ShapeError(f"{arch.family}: the bridge config gives {name} {new.dims[name]}, expected {want[name]}",
                             "the family map's prune.config_keys lacks the field that sets it")
    return cfg


def check_drop_layers(arch, drop_layers: int) -> None:
    fewest = min(arch.stacks.values())
    if not 0 <= drop_layers < fewest:
        raise ShapeError(f"--drop-layers {drop_layers} is outside 0..{fewest - 1} (the LLM has {fewest} layers"
                         f"{' in its shortest stack' if len(arch.stacks) > 1 else ''})",
                         "a bridge keeps at least one layer per stack; drop fewer layers")


def plan_sizes(arch, reduction: float, fixed: dict, residual: str = "keep", drop_layers: int | None = 0) -> dict:
    """Widths that keep about 1/reduction of the non-embedding parameters (plan_bridge's sizes)."""
    return plan_bridge(arch, reduction, fixed, residual, drop_layers)[0]


def plan_bridge(arch, reduction: float, fixed: dict, residual: str = "keep",
                drop_layers: int | None = None) -> tuple[dict, int]:
    """(widths, layers dropped per stack) that keep about 1/reduction of the non-embedding parameters.

    Every free dimension is divided by one common factor s, found by search so the bridge's
    non-embedding count is closest to N/R: with the residual kept, kv groups -> heads, the MLP's
    neurons and, when `drop_layers` is None (planned depth), the number of layers (kept = round(L/s),
    at least 1), so s is about sqrt(R) and no dimension is cut to a sliver while another stays whole
    (a kv group cannot be split: at R = 16 on a 4-layer model with 2 kv groups, widths alone kept
    2 of 384 neurons per layer; with depth planned the bridge keeps 1 layer with 64). An explicit
    `drop_layers` fixes the depth; so do explicit widths and `residual="prune"` (the narrow LST bridge
    keeps every layer), where depth is not planned (0 unless given).
    """
    if not (math.isfinite(reduction) and reduction >= 1):  # nan passes `< 1`; it would reach bridge.json
        raise ShapeError(f"--reduction {reduction} is not a number >= 1", "a bridge keeps 1/R of the LLM; use R >= 1 (16 in the paper)")
    fixed = {k: v for k, v in fixed.items() if v is not None}
    _check_fixed(arch, fixed, residual)
    fewest = min(arch.stacks.values())
    planned = drop_layers is None and residual == "keep" and not fixed
    if drop_layers is None:
        drop_layers = 0
    check_drop_layers(arch, drop_layers)
    target = parameter_counts(arch)["non_embedding"] / reduction
    best = None
    for step in range(0, 241):
        s = math.exp(step * math.log(max(reduction, 1.0) * 16) / 240) if reduction > 1 else 1.0
        sizes = _sizes_at(arch, s, fixed, residual)
        drop = fewest - max(1, min(fewest, round(fewest / s))) if planned else drop_layers
        layers = {st: list(range(n - drop)) for st, n in arch.stacks.items()}
        n = parameter_counts(load_arch(bridge_config(arch, sizes, layers)))["non_embedding"]
        err = abs(math.log(max(n, 1) / target))
        if best is None or err < best[0] - 1e-12:
            best = (err, sizes, drop)
        if reduction == 1:
            break
    return {k: best[1][k] for k in SIZE_NAMES}, best[2]


def _group_key(group: str, kv: bool) -> str:
    base = "heads" if group == "attn" else f"{group}_heads"
    return ("kv_" + base if group == "attn" else f"{group}_kv_heads") if kv else base


def select(arch, unit_scores: dict, sizes: dict, dropped: dict | None = None) -> tuple[dict, dict]:
    """Kept coordinates (bridge.json `kept`) and retained importance shares (`retained`).
    `dropped` ({stack: [LLM layer indices]}) leaves those layers out: their `kept` entry is null."""
    dropped = dropped or {}
    res = top_k(unit_scores["residual"], sizes["hidden"])
    kept = {"residual": res, "layers": {}}
    ret = {"residual": retained(unit_scores["residual"], res), "layers": {}}
    rep = arch.dims["heads"] // arch.dims["kv_heads"]
    shared = set(arch.prune.get("shared_heads", []))
    for stack, n in arch.stacks.items():
        live = [i for i in range(n) if i not in set(dropped.get(stack, []))]
        groups = arch.head_groups(stack)
        # groups whose heads are one set per stack (T5: layer 0's relative position bias feeds all)
        pooled = {g: sum(unit_scores[(stack, i, g)] for i in live) for g in groups if g in shared}
        layers, rets = [], []
        for i in range(n):
            if i not in live:
                layers.append(None)
                rets.append(None)
                continue
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


def kept_layers(kept: dict) -> dict[str, list[int]]:
    """{stack: LLM layer indices the bridge keeps, in order}: bridge layer j is LLM layer kept_layers[stack][j]."""
    return {st: [i for i, e in enumerate(layers) if e is not None] for st, layers in kept["layers"].items()}


def layer_kept(kept: dict, stack: str | None, layer: int | None) -> dict:
    """{space: kept coordinates} for slicing one tensor (residual always; layer spaces in a layer)."""
    out = {"residual": kept["residual"]}
    if stack is not None:
        out.update({k: v for k, v in kept["layers"][stack][layer].items() if "." in k})
    return out


def unit_maps(arch, unit_scores: dict, kept: dict) -> list[dict]:
    """What `select` chose from, as plain data for prune-bridge --plot (surgery.plot.importance): per
    stack, one panel per head group and per neuron space, and one for the residual channels when they
    were pruned. A panel: {"stack", "units", "layers": LLM layer indices, "dropped": [bool per layer],
    "scores": [[float per unit] per layer], "kept": [[bool per unit] per layer]}. Heads are scored and
    kept per kv group (one column per group: with grouped-query attention the group's query heads go
    together); a layer --drop-layers left out keeps nothing."""
    panels = []
    if len(kept["residual"]) < arch.dims["hidden"]:
        res = set(kept["residual"])
        panels.append({"stack": "all layers", "units": "residual channels", "layers": ["all"], "dropped": [False],
                       "scores": [unit_scores["residual"].tolist()],
                       "kept": [[c in res for c in range(arch.dims["hidden"])]]})
    rep = arch.dims["heads"] // arch.dims["kv_heads"]
    for stack, n in arch.stacks.items():
        entries = kept["layers"][stack]
        kinds = [(g, _group_key(g, True), (f"{g} kv groups ({rep} heads each)" if rep > 1 else f"{g} heads"))
                 for g in arch.head_groups(stack)]
        kinds += [(s, s, f"{s} neurons") for s in arch.prune.get("neurons", {})]
        for unit, key, label in kinds:
            if (stack, 0, unit) not in unit_scores:  # a neuron space this stack does not have
                continue
            scores = [unit_scores[(stack, i, unit)].tolist() for i in range(n)]
            chosen = [set(e[key]) if e is not None else set() for e in entries]
            panels.append({"stack": stack, "units": label, "layers": list(range(n)),
                           "dropped": [e is None for e in entries], "scores": scores,
                           "kept": [[u in c for u in range(len(row))] for row, c in zip(scores, chosen)]})
    return panels
