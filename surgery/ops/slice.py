"""Index arithmetic for kept coordinates: the W_down of a bridge is a coordinate selection.

A bridge keeps, per space (residual; per layer attn.q/k/v/o, mlp.inner, ...), a sorted list of the
LLM's coordinates. A tensor axis may be a fused concatenation of spaces (GPT-2's c_attn is
q|k|v), so the kept positions along that axis are each space's kept coordinates shifted by the
sizes of the spaces before it.
"""

from __future__ import annotations


def axis_indices(arch, axis: tuple, kept: dict):
    """LongTensor of positions kept along `axis` (a tuple of space names) of one layer.

    `kept` maps space name -> list of kept coordinates for that layer (residual included).
    A space absent from `kept` is kept whole.
    """
    import torch

    parts, offset = [], 0
    for space in axis:
        size = arch.space_size(space)
        idx = kept.get(space)
        parts.append(torch.arange(size) + offset if idx is None else torch.as_tensor(idx, dtype=torch.long) + offset)
        offset += size
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


def select(tensor, arch, dims: tuple, kept: dict):
    """Restrict every axis of `tensor` (whose axes are `dims`) to its kept positions."""
    out = tensor
    for ax, axis in enumerate(dims):
        out = out.index_select(ax, axis_indices(arch, axis, kept))
    return out


def heads_to_coords(heads, head_size: int) -> list[int]:
    """Whole heads -> the coordinates they own (head h owns [h*head_size, (h+1)*head_size))."""
    return [h * head_size + j for h in sorted(heads) for j in range(head_size)]


def bridge_layer(kept: dict, stack: str, layer: int) -> int | None:
    """The bridge's index of LLM layer `layer` of `stack`, or None if the bridge dropped it."""
    layers = kept["layers"][stack]
    return None if layers[layer] is None else sum(e is not None for e in layers[:layer])


def bridge_name(arch, stack: str | None, layer: int | None, name: str, kept: dict) -> str | None:
    """The bridge's name for the LLM's module/tensor `name` of (stack, layer): layers renumber when
    the bridge dropped some. None when the bridge dropped that layer; globals keep their name."""
    if stack is None:
        return name
    j = bridge_layer(kept, stack, layer)
    if j is None:
        return None
    prefix = arch.spec["stacks"][stack]["prefix"]
    return prefix.format(i=j) + name[len(prefix.format(i=layer)):]


def bridge_layer_ids(arch, kept: dict, ids) -> list[int]:
    """AdapterHub-style layer ids (counted across stacks) of the LLM -> the bridge's, dropping the
    ids of dropped layers (e.g. a bottleneck config's leave_out)."""
    out, offset, boffset = [], 0, 0
    for stack, n in arch.stacks.items():
        for i in range(n):
            j = bridge_layer(kept, stack, i)
            if offset + i in set(ids) and j is not None:
                out.append(boffset + j)
        offset += n
        boffset += sum(e is not None for e in kept["layers"][stack])
    return sorted(out)
