"""Nearest-Kronecker fit at realistic layer sizes: subspace iteration against a dense SVD, side by side.

For each delta kind (Kronecker + 1% noise, a rank-16 LoRA product, dense Gaussian) and size it
times `surgery.ops.kron.kron_params` (seeded block subspace iteration) and, where affordable, the
dense route (`torch.linalg.svd` of the rearranged matrix), and compares the reached relative error
with the optimum sqrt(sum_{k>1} s_k^2)/||ΔW|| from the exact singular values.

    python -m benchmarks.kron_bench [--sizes 1024 2048] [--dense-max 1024] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import time


def deltas(n: int, g):
    import torch

    from surgery.ops.kron import lokr_shapes

    (a, b), (c, d) = lokr_shapes(n, n)
    K = torch.kron(torch.randn(a, b, generator=g), torch.randn(c, d, generator=g))
    yield "kron + 1% noise", K + 0.01 * K.norm() / n * torch.randn(n, n, generator=g)
    yield "LoRA rank 16", torch.randn(n, 16, generator=g) @ torch.randn(16, n, generator=g)
    yield "dense Gaussian", torch.randn(n, n, generator=g)


def main() -> None:
    import torch

    from surgery.ops.kron import kron_params, lokr_shapes, rearrange

    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048])
    ap.add_argument("--dense-max", type=int, default=1024, help="largest size also timed with a dense SVD")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"load {os.getloadavg()[0]:.1f}")
    print("| ΔW | kind | iterations | time (s) | rel. error | optimal | dense SVD (s) | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    for n in args.sizes:
        (a, b), (c, d) = lokr_shapes(n, n)
        for kind, M in deltas(n, g):
            t = time.perf_counter()
            fit = kron_params(M)
            t_it = time.perf_counter() - t
            R = rearrange(M.double(), a, b, c, d)
            S = torch.linalg.svdvals(R)
            opt = float(S[1:].norm() / S.norm())
            dense = speed = "-"
            if n <= args.dense_max:
                t = time.perf_counter()
                torch.linalg.svd(R, full_matrices=False)
                t_d = time.perf_counter() - t
                dense, speed = f"{t_d:.2f}", f"{t_d / t_it:.1f}x"
            print(f"| {n}x{n} | {kind} | {fit.iterations} | {t_it:.2f} | {fit.rel_error:.6f} | {opt:.6f} | {dense} | {speed} |",
                  flush=True)


if __name__ == "__main__":
    main()
