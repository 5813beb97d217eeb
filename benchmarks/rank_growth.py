"""tune-bridge --rank at real widths: growing a LoRA's rank leaves its delta unchanged (ops.lora.grow_rank).

The new rows of A are random and the new columns of B are zero, so B' A' = B A holds exactly on paper;
in float32 GEMMs the zeros change the summation's blocking, so this measures what is left, per module of
TinyLlama-1.1B's shapes (hidden 2048, kv 256, MLP 5632), rank 8 grown to 16 / 64 / 256, against the
exact delta in float64, beside the float32 delta of the ungrown pair (the floor: what rounding costs
anyway). The LoRA factors are drawn at a trained adapter's scale (A ~ U(+-1/sqrt(in)), B ~ N(0, 0.01)).

    python benchmarks/rank_growth.py
"""

from __future__ import annotations

SHAPES = {"q_proj": (2048, 2048), "k_proj": (256, 2048), "v_proj": (256, 2048), "o_proj": (2048, 2048),
          "gate_proj": (5632, 2048), "up_proj": (5632, 2048), "down_proj": (2048, 5632)}


def main() -> None:
    import platform
    import time

    import torch

    from surgery.ops.lora import grow_rank

    torch.manual_seed(0)
    print(f"machine: {platform.machine()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print("| module | out x in | grown to | max abs(B'A' - BA64) / max abs(BA64) | ungrown float32, same measure |")
    print("|---|---|---:|---:|---:|")
    worst = 0.0
    for name, (out, inp) in SHAPES.items():
        A = torch.empty(8, inp).uniform_(-inp ** -0.5, inp ** -0.5)
        B = torch.randn(out, 8) * 0.01
        exact = B.double() @ A.double()
        scale = exact.abs().max().item()
        floor = ((B @ A).double() - exact).abs().max().item() / scale
        for rank in (16, 64, 256):
            A2, B2 = grow_rank(A, B, rank, torch.Generator().manual_seed(rank))
            assert torch.equal(A2[:8], A) and torch.equal(B2[:, :8], B) and not B2[:, 8:].any()
            err = ((B2 @ A2).double() - exact).abs().max().item() / scale
            worst = max(worst, err - floor)
            print(f"| {name} | {out} x {inp} | {rank} | {err:.2e} | {floor:.2e} |")
    print(f"\nlargest excess over the ungrown float32 delta: {worst:.2e}")


if __name__ == "__main__":
    main()
