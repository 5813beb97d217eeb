"""LoKr delta: a Kronecker product of two (optionally low-rank) factors.

LoKr (Yeh et al., 2024, "Navigating Text-To-Image Customization: From LyCORIS Fine-Tuning to Model
Evaluation", arXiv:2309.14859; PEFT's LoKrLayer.get_delta_weight):

    w1 = lokr_w1            or  lokr_w1_a @ lokr_w1_b
    w2 = lokr_w2            or  lokr_w2_a @ lokr_w2_b
                            or  einsum("ijkl,ip,jr->prkl", lokr_t2, lokr_w2_a, lokr_w2_b)  (Tucker/CP)
    ΔW = (α / r) · kron(w1, w2), reshaped to the layer's weight shape.

Merge is W += ΔW and unmerge W −= ΔW through surgery.ops.lora.fold, like every adapter kind.
"""

from __future__ import annotations


def _factor(params: dict, which: int):
    full, a, b = f"lokr_w{which}", f"lokr_w{which}_a", f"lokr_w{which}_b"
    if full in params:
        return params[full].float()
    if which == 2 and "lokr_t2" in params:
        import torch

        return torch.einsum("ijkl,ip,jr->prkl", params["lokr_t2"].float(), params[a].float(), params[b].float())
    if a in params and b in params:
        return params[a].float() @ params[b].float()
    raise KeyError(f"LoKr factor w{which} needs {full} or {a} and {b}")


def lokr_delta(params: dict, scaling: float, shape: tuple):
    """ΔW = scaling · kron(w1, w2) in float32, reshaped to `shape` (the base weight's shape).

    params maps peft's names (lokr_w1, lokr_w1_a, lokr_w1_b, lokr_w2, lokr_w2_a, lokr_w2_b, lokr_t2)
    to tensors; only those present are used.
    """
    import torch

    w1, w2 = _factor(params, 1), _factor(params, 2)
    if w2.ndim == 4:  # conv kernels: w1 is lifted to 4-D so kron keeps the kernel axes from w2
        w1 = w1[:, :, None, None]
    return (torch.kron(w1, w2.contiguous()) * float(scaling)).reshape(tuple(shape))
