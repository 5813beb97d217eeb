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
