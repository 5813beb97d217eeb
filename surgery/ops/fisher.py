"""Importance scores for structured pruning and the choice of what a bridge keeps.

Fisher information (Jin, Zhang & Zong, EMNLP 2023, after Ladder Side-Tuning, Sung et al. 2022):

    F = 1/|D| * sum_i (d log p(y_i | x_i) / d theta)^2

* per parameter (LST, "fisher-param"): the score of a unit (a residual channel, a head, an MLP
  neuron) is the sum of F over the rows and columns of every weight the unit owns;
* per structural mask (Kwon et al., "A Fast Post-Training Pruning Framework for Transformers",
  NeurIPS 2022, "fisher-mask"): a multiplicative mask m = 1 on the unit's output, F_m = mean of
  (dL/dm)^2; it measures what the unit contributes to the loss now.
* "magnitude": the same reduction as fisher-param with W^2 in place of the squared gradient.

Everything here is pure tensor math on float64 score vectors.
"""

from __future__ import annotations


def axis_scores(sq, dims: tuple, arch) -> list[tuple[str, object]]:
    """Reduce a squared tensor (grad^2 or W^2) to one score per coordinate of each axis space.

    Axis a's vector is sq summed over every other axis; a fused axis (GPT-2's q|k|v) is split
    back into its spaces. Returns [(space, vector)] for every axis.
    """
    out = []
    for a, axis in enumerate(dims):
        other = [d for d in range(sq.ndim) if d != a]
        v = sq.sum(dim=other) if other else sq
        v = v.double().cpu()  # scores live on the CPU whatever device the layer is on
        start = 0
        for space in axis:
            n = arch.space_size(space)
            out.append((space, v[start:start + n]))
            start += n
    return out


def per_head(coord_scores, head_size: int):
    """Coordinate scores of a head space -> one score per head (head h owns a block of head_size)."""
    return coord_scores.reshape(-1, head_size).sum(dim=1)


def heads_to_groups(head_scores, kv_heads: int):
    """Query-head scores -> grouped-query group scores (HF repeat_kv: head h reads kv head h // rep)."""
    return head_scores.reshape(kv_heads, -1).sum(dim=1)


def top_k(scores, k: int) -> list[int]:
    """Indices of the k highest scores, ascending; ties go to the lower index (stable, deterministic)."""
    import torch

    order = torch.sort(-scores.double(), stable=True).indices[:k]
    return sorted(int(i) for i in order)


def retained(scores, kept: list[int]) -> float:
    """Share of importance mass kept: sum(scores[kept]) / sum(scores) (1.0 when nothing is known)."""
    total = float(scores.double().sum())
    if total <= 0.0:
        return 1.0 if len(kept) == scores.numel() else len(kept) / max(1, scores.numel())
    return float(scores.double()[kept].sum()) / total


def norm_correction(x, kept, kind: str):
    """Per-token statistics for recalibrating a norm that will see only the kept channels.

    x: [..., hidden] activations at the norm's input in the full model. With every channel kept
    the full and kept statistics coincide and the correction is exactly (1, 0).
      rms:   gain'  = gain * E[rms_kept / rms_full]                 (rms = sqrt(mean x^2))
      layer: gain'  = gain * E[std_kept / std_full],
             bias'  = bias + gain * E[(mean_kept - mean_full) / std_full]
    so that gain' * (x_c - mean_kept) / std_kept + bias' ~= gain * (x_c - mean_full) / std_full + bias
    on the kept channels. Returns (sum of ratios, sum of shifts, token count) to be pooled.
    """
    x = x.detach().double().reshape(-1, x.shape[-1])
    xk = x[:, kept]
    if kind == "rms":
        full = x.pow(2).mean(dim=1).sqrt()
        part = xk.pow(2).mean(dim=1).sqrt()
        ratio = part / full.clamp_min(1e-30)
        shift = ratio.new_zeros(ratio.shape)
    else:
        full = x.std(dim=1, unbiased=False)
        part = xk.std(dim=1, unbiased=False)
        ratio = part / full.clamp_min(1e-30)
        shift = (xk.mean(dim=1) - x.mean(dim=1)) / full.clamp_min(1e-30)
    return float(ratio.sum()), float(shift.sum()), x.shape[0]


def block_influence(x_in, x_out):
    """Block influence of a layer (Men et al., "ShortGPT", 2024): 1 - cos(x_in, x_out) per token,
    between the residual stream entering and leaving the layer. A layer whose output is nearly its
    input (low influence) changes the model least when dropped. Returns (sum over tokens, token count)."""
    import torch

    a = x_in.detach().float().reshape(-1, x_in.shape[-1])
    b = x_out.detach().float().reshape(-1, x_out.shape[-1])
    cos = torch.nn.functional.cosine_similarity(a, b, dim=-1)
    return float((1.0 - cos.double()).sum()), a.shape[0]


def recalibrate_norm(gain, bias, ratio: float, shift: float):
    """Apply a pooled correction (see norm_correction) to a sliced gain (and bias, for LayerNorm)."""
    g = gain.float() * ratio
    b = None if bias is None else bias.float() + gain.float() * shift
    return g, b


def _mask_fn():
    import torch

    class UnitMask(torch.autograd.Function):
        """y = x * m evaluated at m = 1 (where the Fisher of a mask is taken): the output is x
        itself, so the next layer's saved input is x's storage and the mask costs no activation
        memory; backward gives dL/dm = sum over tokens of g * x and dL/dx = g * m."""

        @staticmethod
        def forward(ctx, x, m):
            ctx.save_for_backward(x, m)
            return x.view_as(x)

        @staticmethod
        def backward(ctx, g):
            x, m = ctx.saved_tensors
            gm = (g.to(m.dtype) * x.to(m.dtype)).reshape(-1, *m.shape).sum(0) if ctx.needs_input_grad[1] else None
            return g * m.to(g.dtype), gm

    return UnitMask


_UNIT_MASK = None


def unit_mask(x, m):
    """Multiply the last axis of x (viewed as [..., *m.shape]) by the mask m, which must be all ones."""
    global _UNIT_MASK
    if _UNIT_MASK is None:
        _UNIT_MASK = _mask_fn()
    return _UNIT_MASK.apply(x, m)
