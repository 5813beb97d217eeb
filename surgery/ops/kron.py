"""Nearest Kronecker product of a matrix (Van Loan & Pitsianis, 1993) and PEFT's LoKr factor shapes.

Van Loan & Pitsianis, "Approximation with Kronecker products", in Linear Algebra for Large Scale
and Real-Time Applications (1993): for M of shape [a*c, b*d] the problem

    min_{A in R^{a x b}, B in R^{c x d}}  || M - A (x) B ||_F

is a rank-1 problem in disguise. Cut M into an a x b grid of c x d blocks M_ij and stack
vec(M_ij) (row-major) as the rows of R(M) in R^{(a*b) x (c*d)}, row i*b + j. Because
(A (x) B)_ij = A[i, j] B, the rearrangement maps A (x) B to vec(A) vec(B)^T and is an isometry, so

    || M - A (x) B ||_F = || R(M) - vec(A) vec(B)^T ||_F,

minimised (Eckart-Young) by the leading singular pair s1 u1 v1^T of R(M):
    A = sqrt(s1) u1 reshaped [a, b],  B = sqrt(s1) v1 reshaped [c, d],
with squared error ||M||_F^2 - s1^2 = sum_{k>1} s_k^2.

PEFT's LoKr (Yeh et al., "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model
Evaluation", ICLR 2024) stores a Linear delta [out, in] as kron(lokr_w1 [out_l, in_m], lokr_w2
[out_k, in_n]) with out_l, out_k = factorization(out) and in_m, in_n = factorization(in);
`factorization` below reproduces peft.tuners.lokr.layer.factorization exactly.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m * n = dimension and m <= n, as PEFT's LoKr chooses them.

    factor > 0 dividing dimension: (factor, dimension // factor) as given (then m may exceed n).
    Otherwise: walk divisors m upward from 1 while m + n keeps shrinking and m <= factor
    (factor = -1 means no cap), i.e. the divisor pair nearest the square root.
    """
    if dimension < 1:
        raise ValueError(f"cannot factorize {dimension}")
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    cap = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > cap:
            break
        m, n = new_m, new_n
    return (m, n) if m <= n else (n, m)


def lokr_shapes(out_dim: int, in_dim: int, factor: int = -1) -> tuple[tuple[int, int], tuple[int, int]]:
    """(w1 shape, w2 shape) of a LoKr Linear layer: w1 [out_l, in_m], w2 [out_k, in_n]."""
    out_l, out_k = factorization(out_dim, factor)
    in_m, in_n = factorization(in_dim, factor)
    return (out_l, in_m), (out_k, in_n)


def rearrange(M, a: int, b: int, c: int, d: int):
    """R(M): [a*c, b*d] -> [a*b, c*d]; row i*b + j is the row-major vec of block (i, j)."""
    if tuple(M.shape) != (a * c, b * d):
        raise ValueError(f"matrix {tuple(M.shape)} is not [{a}*{c}, {b}*{d}]")
    return M.reshape(a, c, b, d).permute(0, 2, 1, 3).reshape(a * b, c * d)


@dataclass
class KronFit:
    A: object  # [a, b] float64
    B: object  # [c, d] float64
    sigma1: float  # leading singular value of R(M)
    norm: float  # ||M||_F
    error: float  # ||M - A (x) B||_F
    iterations: int = 0  # subspace iterations used (0: dense SVD)

    @property
    def rel_error(self) -> float:
        return self.error / self.norm if self.norm > 0 else 0.0


def leading_pair(R, block: int = 16, tol: float = 1e-8, max_iter: int = 100, seed: int = 0):
    """(sigma1, u1, v1, iterations) of R by block subspace iteration (Halko, Martinsson & Tropp 2011, Alg. 4.4).

    Why not torch.linalg.svd: a full SVD with vectors of a 4096 x 4096 float64 matrix takes minutes
    on a CPU, and we need one pair. Each iteration costs two products with R against `block`
    columns. What we report is the fit error e^2 = ||R||^2 - sigma^2, so we stop when e^2 moves
    less than `tol` relative (or than float64 noise, 1e-14 ||R||^2): a near-exact fit thus forces
    sigma1 to full precision, while a flat spectrum (a random-like delta, error near ||R||) stops
    early with an error already at its optimum. The start block comes from a generator seeded with
    `seed`, so results are reproducible. Matrices no wider than the block get a dense SVD (exact,
    cheap at that size). Invariant on return: R v1 = sigma1 u1.
    """
    m, n = R.shape
    with _serial_if_small(R.numel()):
        return _leading_pair(R, block, tol, max_iter, seed)


@contextmanager
def _serial_if_small(numel: int, limit: int = 1 << 20):
    """One torch thread for small matrices, restored afterwards.

    Why: the loop is many tiny BLAS/LAPACK calls; on a busy machine their thread pool contends for
    cores and a 64 x 64 fit took 14 s with two threads against 0.1 s with one (measured). Large
    matrices keep every thread: there the products dominate and parallelise.
    """
    import torch

    if numel >= limit or torch.get_num_threads() == 1:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _leading_pair(R, block, tol, max_iter, seed):
    import torch

    m, n = R.shape
    if min(m, n) <= block:
        U, S, Vh = torch.linalg.svd(R, full_matrices=False)
        return float(S[0]), U[:, 0], Vh[0], 0
    fro2 = float(torch.linalg.matrix_norm(R)) ** 2
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(R @ torch.randn(n, block, generator=g, dtype=R.dtype))
    prev, it = -1.0, 0
    for it in range(1, max_iter + 1):
        Z, _ = torch.linalg.qr(R.T @ Q)  # [n, block], orthonormal
        Q, T = torch.linalg.qr(R @ Z)  # R Z = Q T
        s2 = float(torch.linalg.matrix_norm(T, ord=2)) ** 2
        if abs(s2 - prev) <= max(tol * (fro2 - s2), 1e-14 * fro2):
            break
        prev = s2
    # Rayleigh-Ritz on the block: T = Ub S Vb^T gives R (Z Vb[:, 0]) = S0 (Q Ub[:, 0])
    Ub, S, Vh = torch.linalg.svd(T)
    return float(S[0]), Q @ Ub[:, 0], Z @ Vh[0], it


def nearest_kron(M, a_shape: tuple[int, int], b_shape: tuple[int, int]) -> KronFit:
    """Best A (x) B (A: a_shape, B: b_shape) to M in Frobenius norm, computed in float64.

    Sign: A and B are fixed up to (A, B) -> (-A, -B); we make the largest-magnitude entry of
    vec(A) positive (first such entry on ties) so the same input always gives the same factors.
    """
    import torch

    (a, b), (c, d) = a_shape, b_shape
    R = rearrange(M.detach().to(torch.float64), a, b, c, d)
    norm = float(torch.linalg.matrix_norm(R))
    if norm == 0.0:
        z = torch.zeros((), dtype=torch.float64)
        return KronFit(z.new_zeros(a, b), z.new_zeros(c, d), 0.0, 0.0, 0.0)
    s1, u, v, iters = leading_pair(R)
    k = int(torch.argmax(u.abs()))  # argmax returns the first maximum: a stable tie-break
    if u[k] < 0:
        u, v = -u, -v
    # measured, not ||M||^2 - s1^2, which cancels badly when the fit is near exact
    err = float(torch.linalg.matrix_norm(R - s1 * torch.outer(u, v)))
    root = s1 ** 0.5
    return KronFit((root * u).reshape(a, b), (root * v).reshape(c, d), s1, norm, err, iters)


def kron_params(M, factor: int = -1):
    """Nearest Kronecker fit of a Linear delta M [out, in] in PEFT LoKr's factor shapes."""
    w1_shape, w2_shape = lokr_shapes(int(M.shape[0]), int(M.shape[1]), factor)
    return nearest_kron(M, w1_shape, w2_shape)
