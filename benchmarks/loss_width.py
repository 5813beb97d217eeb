"""The chunked LM-head loss (surgery/ops/loss.py) at TinyLlama-1.1B's widths, against the exact answer.

    python benchmarks/loss_width.py [--batch 4 --seq 256]

Random bf16 final hidden states [batch, seq, 2048] and a bf16 LM head [32000, 2048] (std 0.02, as
the scale benchmark's models), one causal batch with a quarter of the labels masked (-100). The
exact answer is float64 cross-entropy over the full logits; the rows compare, with its value and its
gradients on the hidden states and on the head's weight:
  chunked   chunked_nll on the bf16 tensors (what the trainer and prune-bridge run)
  full      transformers' recipe on the same bf16 tensors: full logits upcast to float32, one
            F.cross_entropy (what the chunked loss replaces)
Relative errors are |a - exact| / |exact| (norms for gradients). Chunking must cost no accuracy:
its errors should equal the full path's (both are set by the bf16 head), not exceed them.
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    import torch
    import torch.nn.functional as F

    from surgery.ops.loss import chunked_nll

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    a = ap.parse_args()
    torch.manual_seed(0)
    H, V = 2048, 32000
    hidden = torch.randn(a.batch, a.seq, H).to(torch.bfloat16)
    weight = (torch.randn(V, H) * 0.02).to(torch.bfloat16)
    labels = torch.randint(0, V, (a.batch, a.seq))
    labels[torch.rand(a.batch, a.seq) < 0.25] = -100
    y = labels[:, 1:]

    def grads(fn, dtype):
        h = hidden.to(dtype).clone().requires_grad_()  # a fresh leaf per path: gradients must not accumulate
        w = weight.to(dtype).clone().requires_grad_()
        t0 = time.time()
        loss = fn(h, w)
        loss.backward()
        return loss.detach().double(), h.grad.double(), w.grad.double(), time.time() - t0

    def exact(h, w):
        return F.cross_entropy((h[:, :-1] @ w.T).reshape(-1, V), y.reshape(-1), ignore_index=-100)

    def full(h, w):
        return F.cross_entropy((h[:, :-1] @ w.T).float().reshape(-1, V), y.reshape(-1), ignore_index=-100)

    def chunked(h, w):
        nll, n = chunked_nll(h[:, :-1], y, lambda x: x @ w.T, V)
        return nll / n

    ref = grads(exact, torch.float64)
    print(f"TinyLlama widths: hidden {H}, vocab {V}, batch {a.batch} x {a.seq}, bf16, 25 % labels masked; "
          f"exact loss {ref[0].item():.6f}")
    print("| path | rel. error loss | rel. error dL/dh | rel. error dL/dW | seconds |")
    print("|---|---:|---:|---:|---:|")
    for name, fn in (("full (transformers' recipe)", full), ("chunked (ops/loss.py)", chunked)):
        got = grads(fn, torch.bfloat16)
        errs = [float((g - r).norm() / r.norm()) for g, r in zip(got[:3], ref[:3])]
        print(f"| {name} | {errs[0]:.2e} | {errs[1]:.2e} | {errs[2]:.2e} | {got[3]:.1f} |")


if __name__ == "__main__":
    main()
