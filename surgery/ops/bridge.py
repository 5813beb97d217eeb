"""W_down and its inverse for a LoRA module: restrict to a bridge's coordinates, lift the update back.

Jin, Zhang & Zong (EMNLP 2023), Algorithm 1, steps 4-8: the parameter-efficient modules are
projected onto the bridge model g (a pruned LLM) with a linear projection W_down, fine-tuned
together with g, and plugged back into the LLM. A bridge keeps a subset of every space's
coordinates, so W_down is a coordinate selection. For a LoRA module dW = s * B A
(A: [r, in], B: [out, r]) with kept input positions I and output positions O:

    restrict:  A_b = A[:, I],   B_b = B[O, :]          (so dW_b = dW[O, I], exactly)
    lift:      A'[:, I] = A[:, I] + (A_b_new - A_b_old),  B'[O, :] = B[O, :] + (B_b_new - B_b_old),
               every other entry of A and B unchanged.

The lift adds the learned update rather than overwriting, so coordinates the bridge never saw keep
what transfer put there, and a bridge that keeps everything reproduces training on the LLM itself.
"""

from __future__ import annotations


def restrict(A, B, in_idx, out_idx):
    """(A[:, in_idx], B[out_idx, :]) as float32 copies."""
    return A.float().index_select(1, in_idx).clone(), B.float().index_select(0, out_idx).clone()


def lift(A, B, in_idx, out_idx, A_old, A_new, B_old, B_new):
    """A and B with the bridge's learned change added at the kept positions, rounded once to their dtype."""
    A2, B2 = A.float().clone(), B.float().clone()
    A2[:, in_idx] += A_new.float() - A_old.float()
    B2[out_idx, :] += B_new.float() - B_old.float()
    return A2.to(A.dtype), B2.to(B.dtype)
