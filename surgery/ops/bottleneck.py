"""Bottleneck adapters: the function, its port to a wider model, and its bridge restriction/lift.

Houlsby et al. 2019 ("Parameter-Efficient Transfer Learning for NLP") insert after a sublayer
    Adapter(z) = z + W_up σ(W_down z + b_down) + b_up          W_down: [r, d], W_up: [d, r]
with a bottleneck width r = d // reduction_factor. Houlsby place one after the attention and one
after the feed-forward sublayer of every layer; Pfeiffer et al. 2021 ("AdapterFusion") keep only
the feed-forward one. AdapterHub (Pfeiffer et al. 2020) wires them into a block as follows, with
h the sublayer output (after its dropout) and x the residual stream entering the sublayer:

    a = h + x  if original_ln_before else h          what the bottleneck reads
    r = h      if residual_before_ln else a          what its own skip connection carries
    o = r + s·(W_up σ(W_down a + b_down) + b_up)     s = the config's float `scaling` (1.0)
    y = o + x  if original_ln_after  else o          the block's new residual stream

(pre-LN models pass no layer norm to the adapter layer, so original_ln_* only add x). Houlsby's
config (original_ln_before=False) gives y = x + Adapter(h); Pfeiffer's (original_ln_before=True)
gives y = Adapter(x + h): the adapter acts on the stream after the feed-forward add.

Either way a, r, o and y all live in the residual space, so a port needs one map per side:

    W_down,llm = W_down,slm · P_in      P_in:  [d_slm, d_llm]  reads LLM coordinates as SLM ones
    W_up,llm   = P_out · W_up,slm       P_out: [d_llm, d_slm]  writes SLM coordinates into the LLM
    b_up,llm   = P_out · b_up,slm       b_down and the width r are unchanged

With the transfer convention x_llm ≈ P x_slm, P_out = P and P_in = P⁺ (for an isometric embedding
P = E with EᵀE = I, P_in = Eᵀ). Then f_llm(E z) = E f_slm(z) exactly, so Adapter_llm(E z) =
E Adapter_slm(z): the ported adapter computes the embedded SLM adapter on embedded inputs.

A bridge keeps some LLM residual coordinates; its adapter is the LLM adapter restricted to them
(W_down's columns, W_up's rows, b_up's entries), like a LoRA's A columns and B rows.
"""

from __future__ import annotations

PARAMS = ("W_down", "b_down", "W_up", "b_up")


def activation(name: str):
    """The callable AdapterHub uses for `non_linearity` (transformers' ACT2FN; 'leakyrelu' special)."""
    import torch
    from transformers.activations import ACT2FN

    key = (name or "linear").lower()
    if key == "leakyrelu":
        return torch.nn.functional.leaky_relu
    if key not in ACT2FN:
        raise KeyError(key)
    return ACT2FN[key]


def bottleneck(z, W_down, b_down, W_up, b_up, act, scaling: float = 1.0, dropout: float = 0.0,
               training: bool = False):
    """s · (W_up σ(W_down z + b_down) + b_up): the adapter's update, without its skip connection.

    AdapterHub applies its `dropout` here, after the scaling, in training only.
    """
    import torch

    u = act(torch.nn.functional.linear(z, W_down, b_down))
    out = scaling * torch.nn.functional.linear(u, W_up, b_up)
    return torch.nn.functional.dropout(out, dropout, training) if training and dropout else out


def adapter(z, W_down, b_down, W_up, b_up, act, scaling: float = 1.0):
    """Adapter(z) = z + s · (W_up σ(W_down z + b_down) + b_up)  (Houlsby et al. 2019, eq. in §2.1)."""
    return z + bottleneck(z, W_down, b_down, W_up, b_up, act, scaling)


def _site_o(h, x, weights, act, scaling, original_ln_before, residual_before_ln, dropout=0.0, training=False):
    a = h + x if original_ln_before else h
    r = h if residual_before_ln else a
    return r + bottleneck(a, weights["W_down"], weights["b_down"], weights["W_up"], weights["b_up"], act, scaling,
                          dropout, training)


def site_output(h, x, weights: dict, act, scaling: float = 1.0, original_ln_before: bool = False,
                residual_before_ln: bool = True, original_ln_after: bool = True, dropout: float = 0.0,
                training: bool = False):
    """The block's new residual stream y at one adapter site, as AdapterHub computes it (see module doc)."""
    o = _site_o(h, x, weights, act, scaling, original_ln_before, residual_before_ln, dropout, training)
    return o + x if original_ln_after else o


def site_sublayer(h, x, weights: dict, act, scaling: float = 1.0, original_ln_before: bool = False,
                  residual_before_ln: bool = True, original_ln_after: bool = True, dropout: float = 0.0,
                  training: bool = False):
    """What replaces h so that the block's own `x + h` yields y: o, or o − x without original_ln_after.

    With W_up = 0, b_up = 0 and residual_before_ln (both presets) this is h itself, bit for bit.
    """
    o = _site_o(h, x, weights, act, scaling, original_ln_before, residual_before_ln, dropout, training)
    return o if original_ln_after else o - x


def port_bottleneck(W_down, b_down, W_up, b_up, P_in, P_out) -> dict:
    """W_down·P_in, b_down, P_out·W_up, P_out·b_up (module doc), computed in float32.

    W_down [r, d_slm], W_up [d_slm, r]; P_in [d_slm, d_llm] (LLM -> SLM coordinates);
    P_out [d_llm, d_slm] (SLM -> LLM coordinates).
    """
    import torch

    f = torch.float32
    if W_down.shape[1] != P_in.shape[0] or W_up.shape[0] != P_out.shape[1]:
        raise ValueError(f"W_down {tuple(W_down.shape)} / W_up {tuple(W_up.shape)} do not fit "
                         f"P_in {tuple(P_in.shape)} / P_out {tuple(P_out.shape)}")
    P_in, P_out = P_in.to(f), P_out.to(f)
    return {"W_down": W_down.to(f) @ P_in, "b_down": b_down.to(f).clone(),
            "W_up": P_out @ W_up.to(f), "b_up": P_out @ b_up.to(f)}


def restrict_bottleneck(weights: dict, kept_in, kept_out) -> dict:
    """The adapter of a bridge that keeps LLM residual coordinates `kept_in` (read) / `kept_out` (written)."""
    import torch

    i = torch.as_tensor(kept_in, dtype=torch.long)
    o = torch.as_tensor(kept_out, dtype=torch.long)
    return {"W_down": weights["W_down"].index_select(1, i), "b_down": weights["b_down"].clone(),
            "W_up": weights["W_up"].index_select(0, o), "b_up": weights["b_up"].index_select(0, o)}


def lift_bottleneck(old_llm: dict, old_bridge: dict, new_bridge: dict, kept_in, kept_out) -> dict:
    """Scatter the bridge's update (new − old) back onto the LLM adapter at the kept coordinates.

    Coordinates the bridge dropped keep the LLM's values. Done in float64 and rounded once to the
    LLM adapter's dtype, so restrict(lift(...)) returns `new_bridge` exactly when
    old_bridge = restrict(old_llm).
    """
    import torch

    i = torch.as_tensor(kept_in, dtype=torch.long)
    o = torch.as_tensor(kept_out, dtype=torch.long)
    d = torch.float64
    out = {}
    for name in PARAMS:
        base = old_llm[name].to(d).clone()
        delta = new_bridge[name].to(d) - old_bridge[name].to(d)
        if name == "W_down":
            base[:, i] += delta
        elif name == "b_down":
            base += delta
        else:  # W_up rows and b_up entries live in the written (residual) space
            base[o] += delta
        out[name] = base.to(old_llm[name].dtype)
    return out
