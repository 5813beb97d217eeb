"""Truncated SVD of a weight delta and the LoRA factors it gives.

Eckart–Young–Mirsky (1936): for Δ = U Σ Vᵀ, the best rank-r approximation in Frobenius norm is
U_r Σ_r V_rᵀ, with error ‖Δ − Δ_r‖_F² = Σ_{i>r} σ_i². LoRA factors split Σ evenly:
B = U_r Σ_r^½ [out, r], A = Σ_r^½ V_rᵀ [r, in], so B A = Δ_r and scaling α/r = 1.

For large matrices we use randomized block Krylov iteration (Musco & Musco, NeurIPS 2015,
"Randomized Block Krylov Methods for Stronger and Faster Approximate SVD"): an orthonormal basis K
of span[ΔΔᵀΩ, (ΔΔᵀ)²Ω, …, (ΔΔᵀ)^(q+1) Ω], then Rayleigh–Ritz on ΔΔᵀ restricted to K. Unlike plain
subspace iteration (torch.svd_lowrank), it reaches the Eckart–Young error to ~1e-6 relative even for
flat spectra (a random full-rank delta) in a handful of matmuls. Small matrices, or a Krylov space
that would not be much smaller than the matrix, use the exact SVD instead.

The basis is built and kept in float64 with a checked Gram–Schmidt (_orthonormal_against): a float32
basis loses orthogonality at real widths (5632×2048) when Δ's spectrum drops under float32
resolution, and a non-orthonormal basis gives factors worse than no adapter. The factors are the SVD
of the orthogonal projection UUᵀΔ, so their error ‖Δ‖² − ΣS² is exact and never exceeds ‖Δ‖.
With verify (the default), the float64 Gram matrix of the short side drives the iteration and its
eigenvalues give the whole spectrum: each result is checked against the Eckart–Young optimum and a
miss falls back to the exact SVD. Every SVD goes through the Gram eigendecomposition (svd_gram). Δ
itself may be given in float32: the float64 products with it promote it a block at a time (mm64,
gram64), so no float64 copy of a whole delta is ever made.
"""

from __future__ import annotations

from typing import NamedTuple

BLOCK_OVERSAMPLE = 16
KRYLOV_DEPTH = 14
VERIFY_TOL = 1e-3  # a rank-r error may exceed the Eckart–Young optimum by this much (relative to ‖Δ‖)
ORTHO_TOL = 1e-10  # a new Krylov block must be this orthogonal to the basis so far


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
GRAM_BLOCK_BYTES = 16 << 20  # the Gram's rank-k updates want wider blocks to run at BLAS-3 speed


def _blocks64(D, nbytes: int = 0):
    """(start, float64 copy of D[start : start + k]) over row blocks of a 2-D D, reusing one scratch
    buffer: fresh tensor-sized float64 copies would cost more page faults than the arithmetic."""
    import torch

    step = max(1, (nbytes or BLOCK_BYTES) // (8 * max(D.shape[1], 1)))
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


def gram64(D):
    """D Dᵀ in float64 for D [m, n] of any float dtype, accumulated over blocks of D's long side (each
    promoted to float64 in a reused scratch buffer: never a float64 copy of the whole D)."""
    import torch

    if D.dtype == torch.float64:
        return D @ D.T
    m = D.shape[0]
    G = torch.zeros(m, m, dtype=torch.float64)
    C, transposed = _by_rows(D)
    if transposed:  # C = Dᵀ [n, m], contiguous: G = Σ over row blocks of C of blkᵀ blk
        for _, blk in _blocks64(C, GRAM_BLOCK_BYTES):
            G.addmm_(blk.T, blk)
        return G
    step = max(1, GRAM_BLOCK_BYTES // (8 * max(m, 1)))
    scratch = torch.empty(m, min(step, D.shape[1]), dtype=torch.float64)
    for j in range(0, D.shape[1], step):
        blk = scratch[:, : min(step, D.shape[1] - j)]
        blk.copy_(D[:, j: j + step])
        G.addmm_(blk, blk.T)
    return G


def _orthonormal_against(P, Y, g):
    """An orthonormal basis of Y's part outside span(P) (P orthonormal, float64), orthogonal to P to ~1e-15.

    Block classical Gram–Schmidt, QR, and a second pass on the unit-norm result if the check
    PᵀQ ≈ 0 fails ("twice is enough", Giraud et al. 2005). When Y lies (numerically) inside span(P), the Krylov
    space is exhausted: what is left of Y is rounding noise, and QR would scale that noise up into
    columns that are unit-norm but *not* orthogonal to P. (That was the float32 failure at width 5632:
    a merged LoRA's delta has a few large singular values over a bf16-rounding floor ~1e-4 below, the
    floor sank under float32 resolution, and ‖KᵀK − I‖ reached 8.) Such a block is replaced by fresh
    random directions: the space already holds all of range(Δ) that matters, and Rayleigh–Ritz stays
    valid for any orthonormal basis.
    """
    import torch

    Q, _ = torch.linalg.qr(Y - P @ (P.T @ Y))
    for attempt in range(4):
        C = P.T @ Q  # the check costs one product; a second Gram–Schmidt pass only when it fails
        if float(C.abs().max()) <= ORTHO_TOL:
            return Q
        if attempt == 1:  # still not orthogonal after re-orthogonalizing a unit-norm block: exhausted
            Q = torch.randn(Q.shape, generator=g, dtype=torch.float64)
            C = P.T @ Q
        Q, _ = torch.linalg.qr(Q - P @ C)
    raise ArithmeticError("block Krylov: could not extend an orthonormal basis")  # needs m ≤ dim K; excluded


def _block_krylov(apply, m: int, rank: int, seed: int):
    """Orthonormal U [m, rank] spanning the top left singular subspace of Δ, given apply(Q) = Δ Δᵀ Q
    (float64 [m, b] in and out). The basis K and the images Δ Δᵀ K are float64 panels (m × b(q+1),
    small next to Δ), so K stays orthonormal to rounding whatever Δ's spectrum; only the products
    with Δ may run in float32.

    Rayleigh–Ritz on Δ Δᵀ needs H = Kᵀ (Δ Δᵀ K); every Δ Δᵀ Q_i is already computed while building
    the basis (before orthogonalization), so H costs one extra block product instead of Kᵀ Δ.
    """
    import torch

    b = rank + BLOCK_OVERSAMPLE
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(apply(torch.randn(m, b, generator=g, dtype=torch.float64)))
    K = torch.empty(m, b * (KRYLOV_DEPTH + 1), dtype=torch.float64)
    images = torch.empty_like(K)
    K[:, :b] = Q
    for i in range(KRYLOV_DEPTH + 1):
        Y = images[:, i * b: (i + 1) * b]
        Y.copy_(apply(Q))
        if i == KRYLOV_DEPTH:
            break
        Q = _orthonormal_against(K[:, : (i + 1) * b], Y, g)
        K[:, (i + 1) * b: (i + 2) * b] = Q
    H = K.T @ images
    _, V = torch.linalg.eigh((H + H.T) / 2)
    return K @ V.flip(1)[:, :rank]


def use_randomized(shape: tuple, rank: int) -> bool:
    """Krylov space dimension (rank+p)(q+1) must be well below the short side to pay off."""
    return (rank + BLOCK_OVERSAMPLE) * (KRYLOV_DEPTH + 1) * 2 <= min(shape)


class LowRank(NamedTuple):
    """Top-r SVD of Δ (float64) with its relative error ‖Δ − U S Vh‖/‖Δ‖ and, when the spectrum was
    computed, the Eckart–Young optimum √(Σ_{i>r} σ_i²)/‖Δ‖ and the singular values (descending)."""

    U: object
    S: object
    Vh: object
    method: str
    error: float
    optimum: float | None
    spectrum: object = None


def _project(D, U, dd: float):
    """SVD of the orthogonal projection U Uᵀ D for U [m, r] orthonormal: W = Uᵀ D = U₂ S Vh, so the
    factors are (U U₂, S, Vh) and ‖D − U Uᵀ D‖² = ‖D‖² − ΣS² — never more than ‖D‖²."""
    U2, S, Vh = svd_gram(mm64(U.T, D))
    err = max(dd - float(S.square().sum()), 0.0) ** 0.5 / dd ** 0.5 if dd > 0 else 0.0
    return U @ U2, S, Vh, err


def truncated_svd(delta, rank: int, seed: int = 0, *, verify: bool = True, tol: float = VERIFY_TOL) -> LowRank:
    """Top-`rank` SVD of delta in float64; randomized (block Krylov) when it is as accurate and faster.

    verify: compute the whole spectrum (eigenvalues of the float64 Gram matrix of the short side, which
    also drives the Krylov iteration) and check the error against the Eckart–Young optimum; a miss by
    more than `tol` falls back to the exact SVD of that matrix (method "exact (fallback)"). Without
    verify, the products run on Δ in float32 and only ‖Δ − UUᵀΔ‖ ≤ ‖Δ‖ is guaranteed (a projection).
    """
    import torch

    rank = max(1, min(rank, *delta.shape))
    if delta.shape[0] > delta.shape[1]:  # work in the short side's space: smaller Gram and basis
        r = truncated_svd(delta.T, rank, seed, verify=verify, tol=tol)
        return r._replace(U=r.Vh.T, Vh=r.U.T)
    m = delta.shape[0]
    dd = sumsq64(delta)
    if not use_randomized(tuple(delta.shape), rank):
        U, S, Vh = svd_gram(delta.double())
        opt = float(S[rank:].square().sum()) ** 0.5 / dd ** 0.5 if dd > 0 else 0.0
        return LowRank(U[:, :rank], S[:rank], Vh[:rank], "exact", opt, opt, S)
    D = delta.float() if delta.dtype != torch.float64 else delta  # no copy when Δ is already float32
    if not verify:
        def apply(Q):
            return (D @ (D.T @ Q.to(D.dtype))).double()

        U, S, Vh, err = _project(D, _block_krylov(apply, m, rank, seed), dd)
        return LowRank(U, S, Vh, "krylov", err, None)
    G = gram64(D)
    lam = torch.linalg.eigvalsh(G).flip(0).clamp_min(0)  # σ², descending
    opt = float(lam[rank:].sum()) ** 0.5 / dd ** 0.5 if dd > 0 else 0.0
    spectrum = lam.sqrt()
    U, S, Vh, err = _project(D, _block_krylov(lambda Q: G @ Q, m, rank, seed), dd)
    if err <= opt + tol:
        return LowRank(U, S, Vh, "krylov", err, opt, spectrum)
    _, V = torch.linalg.eigh(G)
    U, S, Vh, err = _project(D, V.flip(1)[:, :rank].contiguous(), dd)
    return LowRank(U, S, Vh, "exact (fallback)", err, opt, spectrum)


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
