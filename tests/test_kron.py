"""Nearest Kronecker product (Van Loan–Pitsianis) and PEFT's LoKr factor rule."""

import pytest
import torch

from surgery.ops.kron import factorization, kron_params, leading_pair, lokr_shapes, nearest_kron, rearrange


def test_factorization_matches_peft():
    from peft.tuners.lokr.layer import factorization as peft_factorization

    for dim in list(range(1, 300)) + [768, 2048, 4096, 11008, 14336]:
        for f in (-1, 1, 2, 3, 4, 8, 16, 7, 64):
            assert factorization(dim, f) == peft_factorization(dim, f), (dim, f)


def test_rearrangement_matches_block_definition():
    a, b, c, d = 2, 3, 4, 5
    M = torch.randn(a * c, b * d, generator=torch.Generator().manual_seed(0))
    R = rearrange(M, a, b, c, d)
    for i in range(a):
        for j in range(b):
            assert torch.equal(R[i * b + j], M[i * c:(i + 1) * c, j * d:(j + 1) * d].reshape(-1))


def test_exact_kronecker_delta_comes_back_exact():
    g = torch.Generator().manual_seed(1)
    A, B = torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randn(8, 32, generator=g, dtype=torch.float64)
    fit = nearest_kron(torch.kron(A, B), (8, 4), (8, 32))
    assert fit.rel_error < 1e-12
    assert torch.allclose(torch.kron(fit.A, fit.B), torch.kron(A, B), atol=1e-12)


def test_dense_delta_gets_the_optimal_error():
    g = torch.Generator().manual_seed(2)
    M = torch.randn(64, 128, generator=g)
    fit = kron_params(M)
    (a, b), (c, d) = lokr_shapes(64, 128)
    assert (fit.A.shape, fit.B.shape) == ((a, b), (c, d)) == ((8, 8), (8, 16))
    S = torch.linalg.svdvals(rearrange(M.double(), a, b, c, d))
    err = float(torch.linalg.matrix_norm(M.double() - torch.kron(fit.A, fit.B)))
    # Eckart–Young on the rearranged matrix: the error is the norm of the discarded singular values
    assert fit.iterations > 0  # the subspace-iteration path, checked against a dense SVD
    assert err == pytest.approx(float(S[1:].norm()), rel=1e-9)
    # converged on the error (what is reported); sigma1 itself to what that needs
    assert fit.error == pytest.approx(err, rel=1e-12) and fit.sigma1 == pytest.approx(float(S[0]), rel=1e-6)
    # and no nearby factor pair does better
    for _ in range(5):
        A2 = fit.A + 1e-3 * torch.randn(fit.A.shape, generator=g, dtype=torch.float64)
        assert float(torch.linalg.matrix_norm(M.double() - torch.kron(A2, fit.B))) > err


def test_sign_is_deterministic_and_zero_delta_is_zero():
    M = torch.randn(16, 16, generator=torch.Generator().manual_seed(3))
    f1, f2 = kron_params(M), kron_params(-(-M))
    assert torch.equal(f1.A, f2.A) and torch.equal(f1.B, f2.B)
    assert float(f1.A.reshape(-1)[f1.A.abs().argmax()]) > 0
    z = kron_params(torch.zeros(16, 16))
    assert z.error == 0.0 and not z.A.any()


def test_subspace_iteration_finds_the_leading_pair():
    g = torch.Generator().manual_seed(4)
    # a decaying spectrum, as structured fine-tune deltas have: the pair must match a dense SVD
    U, _ = torch.linalg.qr(torch.randn(300, 300, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64))
    S = 0.9 ** torch.arange(200, dtype=torch.float64)
    R = U[:, :200] @ torch.diag(S) @ V.T
    s1, u, v, iters = leading_pair(R, tol=1e-16)  # tight: down to float64 noise
    assert 0 < iters < 100 and s1 == pytest.approx(1.0, rel=1e-12)
    assert abs(float(u @ U[:, 0])) == pytest.approx(1.0, abs=1e-10) and abs(float(v @ V[:, 0])) == pytest.approx(1.0, abs=1e-10)
    assert torch.allclose(R @ v, s1 * u, atol=1e-10)
