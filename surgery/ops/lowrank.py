"""Truncated SVD of a weight delta and the LoRA factors it gives.

Eckart–Young–Mirsky (1936): for Δ = U Σ Vᵀ, the best rank-r approximation in Frobenius norm is
U_r Σ_r V_rᵀ, with error ‖Δ − Δ_r‖_F² = Σ_{i>r} σ_i². LoRA factors split Σ evenly:
B = U_r Σ_r^½ [out, r], A = Σ_r^½ V_rᵀ [r, in], so B A = Δ_r and scaling α/r = 1.

For large matrices we use randomized block Krylov iteration (Musco & Musco, NeurIPS 2015,
"Randomized Block Krylov Methods for Stronger and Faster Approximate SVD"): an orthonormal basis K
of span[ΔΩ, (ΔΔᵀ)ΔΩ, …, (ΔΔᵀ)^q ΔΩ], then the exact SVD of the small Kᵀ Δ (Rayleigh–Ritz).
Unlike plain subspace iteration (torch.svd_lowrank), it reaches the Eckart–Young error to ~1e-6
relative even for flat spectra (a random full-rank delta) in a handful of matmuls. Small matrices,
or a Krylov space that would not be much smaller than the matrix, use the exact SVD instead.
Decompositions run in float64 (the Krylov matmuls that only pick the subspace in float32); every
SVD goes through the Gram eigendecomposition (svd_gram). Δ itself may be given in float32: the
float64 products with it (the final projection Uᵀ Δ, the error terms) promote it a block of rows at
a time (mm64), so no float64 copy of a whole delta is ever made.
"""

from __future__ import annotations

BLOCK_OVERSAMPLE = 16
KRYLOV_DEPTH = 14


def svd_gram(D):
    """Thin SVD (U, S, Vh), singular values descending, through the eigendecomposition of the Gram matrix
    of the short side: D Dᵀ = U Σ² Uᵀ and Vh = Σ⁻¹ Uᵀ D.

    Why not torch.linalg.svd: LAPACK's syevd on the Gram matrix is several times faster than gesdd for the
    same size, and far less hurt by oversubscribed cores (on a loaded 2-core machine a 352×352 gesdd took
    4.5 s, the eigh of its Gram 0.3 s). In float64 the squared spectrum costs accuracy
    only for σ below ~1e-8·σ_max, which contribute nothing measurable to a truncation; directions with
    σ ≈ 0 get a zero row in Vh instead of a division by zero.
    """
    import torch

    if D.shape[0] > D.shape[1]:
        U, S, Vh = svd_gram(D.T)
        return Vh.T, S, U.T
    lam, V = torch.linalg.eigh(D @ D.T)
    lam, V = lam.flip(0), V.flip(1)
    S = lam.clamp_min(0).sqrt()
    W = V.T @ D  # = Σ Vh
    keep = S > S[0] * 1e-12 if S.numel() and S[0] > 0 else torch.zeros_like(S, dtype=torch.bool)
    inv = torch.where(keep, 1.0 / torch.where(keep, S, torch.ones_like(S)), torch.zeros_like(S))
    return V, S, W * inv[:, None]


BLOCK_BYTES = 2 << 20  # float64 scratch for promoting Δ (one buffer per call, reused: cache-sized)


def _blocks64(D):
    """(start, float64 copy of D[start : start + k]) over row blocks of a 2-D D, reusing one scratch
    buffer: fresh tensor-sized float64 copies would cost more page faults than the arithmetic."""
    import torch

    step = max(1, BLOCK_BYTES // (8 * max(D.shape[1], 1)))
    scratch = torch.empty(min(step, D.shape[0]), D.shape[1], dtype=torch.float64)
    for i in range(0, D.shape[0], step):
        src = D[i: i + step]
        blk = scratch[: src.shape[0]]
        blk.copy_(src)
        yield i, blk


def _by_rows(D):
    """D, or D.T when D is a transposed view of a contiguous tensor (so row blocks are contiguous)."""
    return (D.T, True) if D.dim() == 2 and not D.is_contiguous() and D.T.is_contiguous() else (D, False)


def mm64(L, D):
    """L @ D in float64 for L float64 [k, m] and D [m, n] of any float dtype, promoting D one block at a
    time (a float64 copy of a large Δ costs more memory traffic than the product itself)."""
    import torch

    L = L.double()
    if D.dtype == torch.float64:
        return L @ D
    C, transposed = _by_rows(D)
    if transposed:  # C = Dᵀ [n, m]: column blocks of the product
        out = torch.empty(C.shape[0], L.shape[0], dtype=torch.float64)
        for j, blk in _blocks64(C):
            torch.mm(blk, L.T, out=out[j: j + blk.shape[0]])
        return out.T
    out = torch.zeros(L.shape[0], D.shape[1], dtype=torch.float64)
    for i, blk in _blocks64(D):
        out.addmm_(L[:, i: i + blk.shape[0]], blk)
    return out


def sumsq64(D) -> float:
    """‖D‖_F² accumulated in float64 (no squared or float64 copy of D)."""
    import torch

    if D.dtype == torch.float64:
        return float(torch.linalg.vector_norm(D)) ** 2
    D, _ = _by_rows(D.reshape(1, -1) if D.dim() < 2 else D)
    total = 0.0
    for _, blk in _blocks64(D):
        total += float(torch.linalg.vector_norm(blk)) ** 2
    return total


def _block_krylov(D, rank: int, seed: int):
    """D float32 [m, n] with m ≤ n. The Krylov matmuls and the small projected
    matrix run in float32 (they only choose a subspace); its eigendecomposition and the factors
    (U_rᵀ D, mm64) are float64, so the error is the subspace's, not float32's.

    Rayleigh–Ritz on D Dᵀ needs H = Kᵀ (D Dᵀ K); every D Dᵀ Q_i is already computed while building
    the basis (before orthogonalization), so H costs one extra block product instead of Kᵀ D.
    """
    import torch

    m, n = D.shape
    b = rank + BLOCK_OVERSAMPLE
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(D @ torch.randn(n, b, generator=g, dtype=D.dtype))
    # basis and images in two preallocated panels: Gram–Schmidt against all earlier blocks is then
    # one tall-skinny product pair instead of one small product per block
    K = torch.empty(m, b * (KRYLOV_DEPTH + 1), dtype=D.dtype)
    images = torch.empty_like(K)
    K[:, :b] = Q
    for i in range(KRYLOV_DEPTH + 1):
        Y = images[:, i * b: (i + 1) * b]
        torch.mm(D, D.T @ Q, out=Y)
        if i == KRYLOV_DEPTH:
            break
        P, Y = K[:, : (i + 1) * b], Y.clone()
        for _ in range(2):  # block Gram–Schmidt twice: one pass loses orthogonality in floating point
            Y -= P @ (P.T @ Y)
        Q, _ = torch.linalg.qr(Y)
        K[:, (i + 1) * b: (i + 2) * b] = Q
    H = (K.T @ images).double()
    lam, V = torch.linalg.eigh((H + H.T) / 2)
    U = K.double() @ V.flip(1)[:, :rank]
    W = mm64(U.T, D)  # Σ Vh: rows orthogonal with norms σ_i
    S = W.norm(dim=1)
    return U, S, W / torch.where(S > 0, S, torch.ones_like(S))[:, None]


def use_randomized(shape: tuple, rank: int) -> bool:
    """Krylov space dimension (rank+p)(q+1) must be well below the short side to pay off."""
    return (rank + BLOCK_OVERSAMPLE) * (KRYLOV_DEPTH + 1) * 2 <= min(shape)


def truncated_svd(delta, rank: int, seed: int = 0):
    """Top-`rank` (U [m,r], S [r], Vh [r,n]) of delta in float64; randomized when it is as accurate and faster.

    Returns (U, S, Vh, method) with method "exact" or "krylov".
    """
    rank = max(1, min(rank, *delta.shape))
    if not use_randomized(tuple(delta.shape), rank):
        U, S, Vh = svd_gram(delta.double())
        return U[:, :rank], S[:rank], Vh[:rank], "exact"
    D = delta.float()  # no copy when Δ is already float32
    # the Krylov basis lives in the short side's space: cheaper QR and projection
    if D.shape[0] > D.shape[1]:
        U, S, Vh = _block_krylov(D.T, rank, seed)
        return Vh.T, S, U.T, "krylov"
    U, S, Vh = _block_krylov(D, rank, seed)
    return U, S, Vh, "krylov"


def energy_rank(singular_values, energy: float) -> int:
    """Smallest r with Σ_{i≤r} σ_i² ≥ energy · Σ σ_i² (at least 1)."""
    import torch

    e = singular_values.double().square()
    total = float(e.sum())
    if total == 0.0:
        return 1
    cum = torch.cumsum(e, 0) / total
    return max(1, int((cum < energy - 1e-12).sum()) + 1)


def spectrum_svd(delta):
    """Exact thin SVD (U, S, Vh) in float64: needed when the rank is chosen from the whole spectrum."""
    return svd_gram(delta.double())


def lora_factors(U, S, Vh):
    """B = U Σ^½, A = Σ^½ Vh (float64): B @ A is the truncated delta and scaling is 1."""
    r = S.clamp_min(0).sqrt()
    return Vh * r[:, None], U * r[None, :]


def relative_error(delta, A, B) -> float:
    """‖Δ − B A‖_F / ‖Δ‖_F without forming B A: ‖Δ‖² − 2⟨BᵀΔ, A⟩ + tr((BᵀB)(AAᵀ))."""
    A, B = A.double(), B.double()
    dd = sumsq64(delta)
    if dd == 0.0:
        return 0.0
    cross = float((mm64(B.T, delta) * A).sum())
    ba = float(((B.T @ B) * (A @ A.T)).sum())
    return max(dd - 2 * cross + ba, 0.0) ** 0.5 / dd ** 0.5
