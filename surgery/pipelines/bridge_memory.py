"""prune-bridge --memory-reduction M: size a bridge by the training memory of its tune-bridge step.

`--reduction R` plans by parameter count; what limits a user is memory. This plans the bridge whose
`tune-bridge --prefix` training step holds at most 1/M of what LoRA on the whole LLM holds at the same
shape (batch x tokens), both counted tensor by tensor by surgery.train.memory.step_bytes: weights held,
tensors autograd saves, the LoRA's gradient and AdamW moments. Under --prefix the bridge holds no token
embedding (a tied LM head is that embedding, and is counted).

The bridge keeps the LLM's *last* layers (prune-bridge's --drop-by first), in this order, which is the
evidence's (docs/method-experiments.md §8-9: on the evidence pair a second kv group bought more than
neurons, and under the 5x cap every deeper, thinner bridge scored below one wide layer):
  1. the last layer, with as many kv groups (each with all its query heads) as fit beside one MLP neuron,
  2. then as many MLP neurons as fit;
  3. only when the whole last layer fits, the layer before it, by the same rule, and so on.
A bridge has one width per config (one `intermediate_size`, one head count for every layer), so a
partly kept second layer would narrow the first: depth therefore grows by whole layers, d + 1 layers
only when d + 1 whole layers fit, and widths are cut only in a one-layer bridge. Which heads and
neurons are kept is still prune-bridge's Fisher selection; only the sizes come from here.

Each candidate is counted on the meta device (no arithmetic): the count grows with depth, kv groups and
neurons, so each is found by bisection, a dozen or two counts in all (about a second at TinyLlama-1.1B's
shape, most of it the LLM's own count).
"""

from __future__ import annotations

from ..errors import ShapeError
from .bridge_plan import bridge_config, kv_choices
from .bridge_prefix import extra_embedding

TARGETS = "all-linear"  # LoRA on every linear layer (peft's all-linear: the LM head excluded), the LLM's and the bridge's


def check_family(arch) -> None:
    """The plan is for a bridge tuned with tune-bridge --prefix: a decoder-only family whose embedding
    output is the token embedding alone (bridge_prefix.prefix_layers refuses the others at tune time)."""
    if len(arch.stacks) != 1:
        raise ShapeError(f"--memory-reduction plans a bridge for tune-bridge --prefix, which needs a decoder-only "
                         f"model; {arch.family} has {len(arch.stacks)} stacks", "use --reduction R instead")
    if extra := extra_embedding(arch):
        raise ShapeError(f"--memory-reduction plans a bridge for tune-bridge --prefix, which {arch.family} cannot use "
                         f"(it adds {extra} to the token embedding)", "use --reduction R instead")


def plan_by_memory(arch, memory_reduction: float, batch: int, seq: int, lora_rank: int = 8,
                   bridge_rank: int | None = None) -> dict:
    """{"sizes", "drop", "record"}: the bridge's widths, the LLM layers it drops from the front (it keeps
    the last ones), and what bridge.json records under "memory" (the budget, both counts, the shape).

    memory_reduction M: the bridge's tune-bridge --prefix step holds at most 1/M of LoRA on the LLM's step,
    both at batch x seq tokens; lora_rank: the LoRA on the LLM's every linear layer; bridge_rank: the rank
    the bridge's kept layers train with (tune-bridge --rank; default lora_rank)."""
    import math

    from ..train.memory import step_bytes

    bridge_rank = lora_rank if bridge_rank is None else bridge_rank
    if not (math.isfinite(memory_reduction) and memory_reduction >= 1):
        raise ShapeError(f"--memory-reduction {memory_reduction} is not a number >= 1",
                         "the bridge's step holds 1/M of LoRA on the LLM's; use M >= 1")
    for name, v in (("batch", batch), ("tokens", seq), ("--lora-rank", lora_rank), ("--bridge-rank", bridge_rank)):
        if v < 1:
            raise ShapeError(f"{name} {v} must be at least 1", "give a positive whole number")
    check_family(arch)
    (stack, n_layers), = arch.stacks.items()
    d = arch.dims
    rep = d["heads"] // d["kv_heads"]
    llm = step_bytes(arch.config, batch, seq, lora_rank, TARGETS)
    budget = llm["total"] / memory_reduction
    seen: dict = {}

    def count(depth: int, kv: int, inter: int) -> int:
        if (depth, kv, inter) not in seen:
            sizes = {"hidden": d["hidden"], "heads": kv * rep, "kv_heads": kv, "intermediate": inter}
            cfg = bridge_config(arch, sizes, {stack: list(range(n_layers - depth, n_layers))})
            # every layer kept: the prefix is empty and tune-bridge --prefix is a plain tune, holding the embedding
            seen[(depth, kv, inter)] = step_bytes(cfg, batch, seq, bridge_rank, TARGETS, prefix=depth < n_layers)["total"]
        return seen[(depth, kv, inter)]

    def fits(depth, kv, inter):
        return count(depth, kv, inter) <= budget

    def most(lo: int, hi: int, ok) -> int:
        """The largest n in lo..hi with ok(n), given ok(lo) and ok monotone (true, then false)."""
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if ok(mid) else (lo, mid - 1)
        return lo

    full = d["kv_heads"], d["intermediate"]
    depth = 0  # whole layers that fit: doubling, then bisection (deep candidates cost the most to count)
    if fits(1, *full):
        depth = 1
        while depth < n_layers and fits(min(2 * depth, n_layers), *full):
            depth = min(2 * depth, n_layers)
        if depth < n_layers:
            depth = most(depth, min(2 * depth, n_layers) - 1, lambda n: fits(n, *full))
    if depth:
        kv, inter = full
    else:
        depth = 1
        if not fits(1, 1, 1):
            best = math.floor(llm["total"] / count(1, 1, 1) * 100) / 100
            raise ShapeError(f"--memory-reduction {memory_reduction:g}: no bridge fits; the smallest (the last layer with 1 "
                             f"kv group and 1 neuron) holds {count(1, 1, 1):,} bytes at {batch} x {seq} tokens against "
                             f"LoRA on the LLM's {llm['total']:,}, at most {best:.2f}x less",
                             f"use --memory-reduction {best:.2f} or less")
        # kv groups first, beside a single neuron: among the counts the config accepts (fits(1, 1, 1) above, and
        # 1 is always one: a group's heads divide the width whenever all the LLM's heads do)
        kvs = kv_choices(arch, d["hidden"])
        kv = kvs[most(0, len(kvs) - 1, lambda j: fits(1, kvs[j], 1))]
        inter = most(1, d["intermediate"], lambda i: fits(1, kv, i))  # then neurons
    sizes = {"hidden": d["hidden"], "heads": kv * rep, "kv_heads": kv, "intermediate": inter}
    bridge = count(depth, kv, inter)
    record = {"memory_reduction": float(memory_reduction), "batch": batch, "seq_len": seq, "lora_rank": lora_rank,
              "bridge_rank": bridge_rank, "targets": TARGETS, "llm_lora_bytes": llm["total"],
              "budget_bytes": int(budget), "bridge_bytes": bridge, "ratio": llm["total"] / bridge,
              "prefix": depth < n_layers, "counts": len(seen)}
    return {"sizes": sizes, "drop": n_layers - depth, "record": record}
