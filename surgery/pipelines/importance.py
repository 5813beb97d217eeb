"""Importance of every prunable unit, accumulated in hooks so no gradient copy of the model exists.

Scores are float64 vectors in one dict:
  ("residual",)                 one per residual channel (shared by every layer and stack)
  (stack, i, space)             one per coordinate of a per-layer space (mlp.inner, attn.q, ...)
  (stack, i, "heads:" + group)  one per query head (from head masks)
  (stack, i, "layer")           fisher-mask only: one per layer, a scalar mask on everything the
                                layer writes into the residual stream (for --drop-by fisher)
`units()` turns them into what is selected: residual channels, grouped-query groups, neurons.
The formulas are in surgery/ops/fisher.py.

Memory: the gradient passes recompute one block at a time (torch.utils.checkpoint around every
block's forward, non-reentrant so masks and hooks inside the block run again in the recompute),
so the backward holds the blocks' inputs plus one block's activations, not the whole model's; the
loss goes through the LM head a chunk of tokens at a time (calibration.batch_loss), so neither do
the full logits exist.
"""

from __future__ import annotations

from contextlib import contextmanager

from ..ops.fisher import axis_scores, heads_to_groups, per_head, unit_mask
from .calibration import batch_loss, batches

METHODS = ("fisher-mask", "fisher-param", "magnitude", "random")


def _add(scores: dict, key, v) -> None:
    scores[key] = v.clone() if key not in scores else scores[key] + v


def accumulate_tensor(scores: dict, arch, spec, sq) -> None:
    """Add a squared tensor's row/column sums to the scores of the spaces its axes live in."""
    for space, v in axis_scores(sq, spec.dims, arch):
        if space == "residual":
            _add(scores, ("residual",), v)
        elif spec.stack is not None:
            _add(scores, (spec.stack, spec.layer, space), v)


def magnitude(ck, arch) -> dict:
    """Gradient-free baseline: squared weights, streamed one stored tensor at a time."""
    scores: dict = {}
    for spec in arch.stored_tensors():
        accumulate_tensor(scores, arch, spec, ck.read(spec.name).float().pow(2))
    return scores


def random_scores(ck, arch, seed: int) -> dict:
    """Control: the units `magnitude` scores, scored by seeded uniform noise instead. Any importance
    worth its cost must beat it (the evidence benchmark's ablation)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(v.shape, generator=g, dtype=torch.float64) for k, v in magnitude(ck, arch).items()}


def _module_of(model, spec):
    name = spec.module or spec.name.rsplit(".", 1)[0]
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _mask_hooks(model, arch, masks: dict) -> list:
    """Multiplicative masks (ones) on the units' outputs; returns the hook handles."""
    import torch

    def on_output(mask, layer_mask=None):
        def h(mod, args, out):
            y = unit_mask(out, mask.to(out.device))
            return y if layer_mask is None else unit_mask(y, layer_mask.to(out.device))
        return h

    def on_input(mask, head: int):
        def pre(mod, args):
            x = args[0]
            m = mask.to(x.device)
            x = unit_mask(x.unflatten(-1, (-1, head)), m[:, None].expand(-1, head)).flatten(-2) if head > 1 else unit_mask(x, m)
            return (x, *args[1:])
        return pre

    res = masks[("residual",)] = torch.ones(arch.dims["hidden"], dtype=torch.float32, requires_grad=True)
    neurons = arch.prune.get("neurons", {})
    handles, written = [], set()
    for t in arch.tensors():
        mod = _module_of(model, t) if (t.role == "embedding" or t.module) else None
        if mod is None:
            continue
        # every write into the residual stream is masked, so m_c scales channel c of the stream
        if (t.role == "embedding" or t.out_dims == ("residual",)) and id(mod) not in written and t.role != "bias":
            written.add(id(mod))
            lm = None
            if t.stack is not None:  # and one scalar per layer over all its writes (a layer's Fisher)
                lm = masks.setdefault((t.stack, t.layer, "layer"), torch.ones(1, requires_grad=True))
            handles.append(mod.register_forward_hook(on_output(res, lm)))
        if not t.module or len(t.in_dims) != 1:
            continue
        space = t.in_dims[0]
        spec = arch.spec["spaces"][space]
        if space in neurons:
            m = masks[(t.stack, t.layer, space)] = torch.ones(arch.space_size(space), requires_grad=True)
            handles.append(mod.register_forward_pre_hook(on_input(m, 1)))
        elif "head" in spec and not arch.is_kv(space):  # attention output before o_proj / c_proj
            hs = arch.head_size(space)
            key = (t.stack, t.layer, "heads:" + space.split(".")[0])
            m = masks[key] = torch.ones(arch.space_size(space) // hs, requires_grad=True)
            handles.append(mod.register_forward_pre_hook(on_input(m, hs)))
    return handles


@contextmanager
def block_checkpointing(model, arch):
    """Recompute every block's activations in the backward (torch.utils.checkpoint, non-reentrant):
    the forward keeps only each block's inputs, so backward memory follows one block."""
    from torch.utils.checkpoint import checkpoint

    wrapped = []
    for stack, n in arch.stacks.items():
        for i in range(n):
            mod = model.get_submodule(arch.spec["stacks"][stack]["prefix"].format(i=i).rstrip("."))
            had, inner = "forward" in mod.__dict__, mod.forward  # accelerate's hook may have replaced it

            def fwd(*args, _inner=inner, **kwargs):
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

            mod.forward = fwd
            wrapped.append((mod, had, inner))
    try:
        yield
    finally:
        for mod, had, inner in wrapped:
            if had:
                mod.forward = inner
            else:
                del mod.forward


MICRO_TOKENS = 256  # tokens per backward pass of fisher_mask (its activations scale with them)


def _micro_batches(batch: dict, tokens: int):
    """(part, share of the batch) for slices of `tokens` tokens or fewer (at least one block each).
    Every block has the same length and no ignored label, so the batch's mean loss is the
    share-weighted sum of the parts' means, and the sum of their gradients is the batch's gradient."""
    rows, length = batch["input_ids"].shape
    step = max(1, tokens // length)
    for i in range(0, rows, step):
        part = {k: v[i:i + step] for k, v in batch.items()}
        yield part, part["input_ids"].shape[0] / rows


def fisher_mask(model, arch, blocks, batch_size: int) -> dict:
    """Mean over batches of (dL/dm)^2 for every structural mask; parameters never get gradients.
    A batch's dL/dm is accumulated over micro-batches of MICRO_TOKENS tokens (mask gradients add up
    across backward passes), so the activations follow the micro-batch, not --batch-size."""
    for p in model.parameters():
        p.requires_grad_(False)
    masks: dict = {}
    handles = _mask_hooks(model, arch, masks)
    scores, n = {}, 0
    try:
        for b in batches(blocks, batch_size, model.config.is_encoder_decoder, "Fisher scores"):
            with block_checkpointing(model, arch):
                for part, share in _micro_batches(b, MICRO_TOKENS):
                    (batch_loss(model, part) * share).backward()
            for key, m in masks.items():
                _add(scores, key, m.grad.double().pow(2))
                m.grad = None
            n += 1
    finally:
        for h in handles:
            h.remove()
    return {k: v / max(n, 1) for k, v in scores.items()}


def fisher_param(model, arch, blocks, batch_size: int) -> dict:
    """LST's per-parameter Fisher, reduced to rows/columns in a post-accumulate hook that frees
    each gradient as soon as it is complete: at most one parameter's gradient exists at a time."""
    by_name = arch.by_name()
    scores: dict = {}
    handles = []

    def hook(spec):
        def h(p):
            accumulate_tensor(scores, arch, spec, p.grad.float().pow(2))
            p.grad = None
        return h

    for name, p in model.named_parameters():
        spec = by_name.get(name)
        p.requires_grad_(spec is not None)
        if spec is not None:
            handles.append(p.register_post_accumulate_grad_hook(hook(spec)))
    n = 0
    try:
        for b in batches(blocks, batch_size, model.config.is_encoder_decoder, "Fisher scores"):
            with block_checkpointing(model, arch):
                batch_loss(model, b).backward()
            n += 1
    finally:
        for h in handles:
            h.remove()
        for p in model.parameters():
            p.requires_grad_(False)
    return {k: v / max(n, 1) for k, v in scores.items()}


def layer_fisher(scores: dict, arch) -> dict:
    """{(stack, i): Fisher of the layer's scalar mask} from fisher_mask's scores (--drop-by fisher)."""
    return {(st, i): float(scores[(st, i, "layer")].sum()) for st, n in arch.stacks.items() for i in range(n)}


def units(arch, scores: dict) -> dict:
    """Scores of what is selected: {"residual": [hidden], (stack, i, group): [kv groups],
    (stack, i, neuron space): [n]}. A group's score sums its query heads and its kv head."""
    import torch

    out = {"residual": scores.get(("residual",), torch.zeros(arch.dims["hidden"], dtype=torch.float64))}
    heads, kv = arch.dims["heads"], arch.dims["kv_heads"]
    for stack, n in arch.stacks.items():
        for i in range(n):
            for group, spaces in arch.head_groups(stack).items():
                q = torch.zeros(heads, dtype=torch.float64)
                g = torch.zeros(kv, dtype=torch.float64)
                if (stack, i, "heads:" + group) in scores:
                    q += scores[(stack, i, "heads:" + group)]
                for s in spaces:
                    if (stack, i, s) in scores:
                        v = per_head(scores[(stack, i, s)], arch.head_size(s))
                        if arch.is_kv(s):
                            g += v
                        else:
                            q += v
                out[(stack, i, group)] = heads_to_groups(q, kv) + g
            for space in arch.prune.get("neurons", {}):
                if any(space in ax.split("|") for t in arch.spec["layer"][stack] for ax in t["dims"]):
                    out[(stack, i, space)] = scores.get((stack, i, space),
                                                        torch.zeros(arch.space_size(space), dtype=torch.float64))
    return out
