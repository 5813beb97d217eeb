"""LoRA and DoRA deltas, and the one fold (merge W += Δ / unmerge W -= Δ) every adapter kind shares.

LoRA (Hu et al., 2021, arXiv:2106.09685): a frozen weight W [out, in] gains ΔW = s · B A with
A [r, in], B [out, r] and s = α/r (rsLoRA, Kalajdzievski 2023: s = α/√r). PEFT keeps A and B in
this orientation even for GPT-2's Conv1D, whose *stored* weight is [in, out] (fan_in_fan_out), so
the delta is transposed to the stored layout: ΔW_stored = (s · B A)ᵀ.

DoRA (Liu et al., 2024, arXiv:2402.09353): W' = m ⊙ (W + ΔW) / ‖W + ΔW‖, the norm taken per output
unit (per row of the [out, in] matrix; peft calls it column-wise after its transpose). Merging is
W' = f ⊙ (W + ΔW) with f = m / n, n = ‖W + ΔW‖; unmerging is W = W' / f − ΔW, which needs n.
n is *not* recoverable from W' (its rows have norm |m| whatever n was), so unmerge needs the n
recorded at merge time; only the row directions of W + ΔW can be recovered without it.

Everything here is float32 in, float32 out (bias deltas too): callers round once to the stored dtype.
"""

from __future__ import annotations


def lora_delta(A, B, scaling: float, fan_in_fan_out: bool = False):
    """ΔW = scaling · B @ A in float32, in the stored orientation ([in, out] when fan_in_fan_out)."""
    d = (B.float() @ A.float()) * float(scaling)
    return d.T if fan_in_fan_out else d


def grow_rank(A, B, rank: int, generator):
    """(A, B) at a higher `rank` with the same B A: the new rows of A [r, in] drawn as peft draws a fresh
    lora_A (kaiming_uniform_ with a=√5 on an [r, in] weight: U(±1/√in)), the new columns of B [out, r]
    zero. Training then moves the new directions from zero, as a fresh LoRA's do. In A's and B's dtypes
    (the old entries unchanged), so the lift rounds to the adapter's own dtype."""
    import torch

    extra = rank - A.shape[0]
    bound = 1.0 / A.shape[1] ** 0.5
    new_a = torch.empty(extra, A.shape[1]).uniform_(-bound, bound, generator=generator)
    return torch.cat([A, new_a.to(A.dtype)]), torch.cat([B, torch.zeros(B.shape[0], extra, dtype=B.dtype)], dim=1)


def lora_bias_delta(bias, scaling: float):
    """peft's lora_bias: lora_B carries a bias that the base bias absorbs as scaling · b."""
    return bias.float() * float(scaling)


def dora_norm(weight, delta, fan_in_fan_out: bool = False):
    """n = ‖W + ΔW‖ per output unit (float32 [out]); weight and delta in the stored orientation."""
    import torch

    full = weight.float() + delta
    return torch.linalg.norm(full.T if fan_in_fan_out else full, dim=1)


def dora_factor(magnitude, norm, fan_in_fan_out: bool = False):
    """f = m / n shaped to broadcast over the stored weight (a column when [out, in], a row when [in, out])."""
    f = magnitude.float() / norm
    return f.view(1, -1) if fan_in_fan_out else f.view(-1, 1)


class LowRankDelta:
    """ΔW = scale · B A kept as its factors (B [out, r], A [r, in], float32), stored-orientation aware.

    fold adds it with one addmm into the weight, never materialising ΔW: for a rank-16 LoRA on a
    4352×1536 weight that saves a 27 MB buffer and a pass over it per module.
    """

    def __init__(self, A, B, scale: float, fan_in_fan_out: bool = False):
        # kept in the adapter's dtype until used: float32 copies of every module's factors at once
        # would grow with the model
        self.A, self.B, self.scale, self.fan_in_fan_out = A, B, float(scale), fan_in_fan_out

    def dense(self):
        return lora_delta(self.A, self.B, self.scale, self.fan_in_fan_out)

    def add_to(self, weight, alpha: float):
        A, B = self.A.float(), self.B.float()
        if self.fan_in_fan_out:  # (B A)ᵀ = Aᵀ Bᵀ
            return weight.addmm_(A.T, B.T, alpha=alpha * self.scale)
        return weight.addmm_(B, A, alpha=alpha * self.scale)

    def add_rows_to(self, block, lo: int, alpha: float, factors=None):
        """block += alpha · ΔW[lo : lo + len(block)] (rows of the *stored* orientation), factors = float32 (A, B)."""
        A, B = factors if factors is not None else (self.A.float(), self.B.float())
        hi = lo + block.shape[0]
        if self.fan_in_fan_out:
            return block.addmm_(A.T[lo:hi], B.T, alpha=alpha * self.scale)
        return block.addmm_(B[lo:hi], A, alpha=alpha * self.scale)


BLOCK_BYTES = 1 << 20  # float32 rows per block: stays in L2, so each element is read and written once


def fold_rounded(weight, deltas, sign: int = 1):
    """W ← round(W + Σ ±ΔW) in place on a bf16/fp16 weight, for LowRankDelta deltas, a block of rows at a time.

    The same sums as converting the whole weight to float32, adding each delta and rounding once
    (every step is element-wise or row-local; BLAS may order a short block's rank-r sums differently,
    a float32 ulp), without a float32 copy of the weight: one pass over memory instead of four
    (allocate, convert, add, round), which is what a merge spends its time on.
    """
    import torch

    if sign not in (1, -1):
        raise ValueError("sign must be +1 (merge) or -1 (unmerge)")
    rows, cols = weight.shape
    step = max(1, BLOCK_BYTES // (4 * max(cols, 1)))
    factors = [(d, (d.A.float(), d.B.float())) for d in deltas]
    scratch = torch.empty(min(step, rows), cols, dtype=torch.float32)
    for lo in range(0, rows, step):
        src = weight[lo: lo + step]
        blk = scratch[: src.shape[0]]
        blk.copy_(src)
        for d, f in factors:
            d.add_rows_to(blk, lo, sign, f)
        src.copy_(blk)
    return weight


def fold(weight, delta, sign: int = 1, factor=None):
    """The shared merge/unmerge step on a float32 weight the caller owns (updated in place when it can).

    merge (sign=+1):   W' = W + ΔW            or, DoRA,  W' = f ⊙ (W + ΔW)
    unmerge (sign=-1): W  = W' − ΔW           or, DoRA,  W  = W' / f − ΔW
    delta is a dense tensor or a LowRankDelta.
    """
    if sign not in (1, -1):
        raise ValueError("sign must be +1 (merge) or -1 (unmerge)")
    if factor is None:
        if isinstance(delta, LowRankDelta):
            return delta.add_to(weight, sign)
        return weight.add_(delta, alpha=sign)
    if isinstance(delta, LowRankDelta):
        delta = delta.dense()
    return factor * (weight + delta) if sign > 0 else weight / factor - delta
