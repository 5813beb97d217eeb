"""BitFit deltas: which tensors changed, and how much of a fine-tune's delta lies outside the biases.

Ben Zaken, Ravfogel & Goldberg, "BitFit: Simple Parameter-efficient Fine-tuning for
Transformer-based Masked Language-models", ACL 2022: train only the bias terms b (plus the task
head), so theta_tuned = theta_base + Δ with Δ zero outside the biases, and the delta to store is
the tuned biases themselves. For an arbitrary fine-tune, split Δ = Δ_bias + Δ_other; a bias-only
extraction drops Δ_other, whose share of the whole delta is

    outside = ||Δ_other||_F / ||Δ||_F,   ||Δ||_F^2 = ||Δ_bias||_F^2 + ||Δ_other||_F^2

(Frobenius norms summed over tensors, computed in float64).
"""

from __future__ import annotations


def same_bits(a, b) -> bool:
    """True when two tensors have the same dtype, shape and bytes (so -0.0 != 0.0, NaN == same NaN)."""
    import torch

    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return bool(torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)))


def delta_sq_norm(base, tuned) -> float:
    """||tuned - base||_F^2 in float64."""
    import torch

    d = tuned.to(torch.float64) - base.to(torch.float64)
    return float(torch.dot(d.reshape(-1), d.reshape(-1)))


def norm_split(bias_sq: float, other_sq: float) -> dict:
    """The report of how a delta's norm splits between biases and everything else."""
    total_sq = bias_sq + other_sq
    return {
        "bias_norm": bias_sq ** 0.5,
        "other_norm": other_sq ** 0.5,
        "total_norm": total_sq ** 0.5,
        # share of ||Δ||_F a bias-only extraction drops (0 for a true BitFit fine-tune)
        "outside_fraction": (other_sq / total_sq) ** 0.5 if total_sq > 0 else 0.0,
    }
