"""Token cross-entropy through the LM head, a chunk of tokens at a time.

    loss = (1/N) * sum over labelled tokens t of -log softmax(z_t)[y_t],   z_t = head(h_t)
    (N = tokens whose label is not -100; with soft-capping z_t = c * tanh(head(h_t) / c))

is what transformers computes from a model's logits (ForCausalLMLoss: logits upcast to float32,
labels shifted by one, ignore_index -100, mean over the labelled tokens). The logits are the largest
activation a language model has: tokens x vocabulary in float32, plus their softmax and gradient in
the backward, 0.4 GB for one batch of 1024 tokens over a 32000-token vocabulary, more than a whole
TinyLlama block. Here they exist one chunk at a time: every chunk runs under torch.utils.checkpoint,
so its forward keeps nothing but its inputs, and the backward recomputes that chunk's logits, takes
their gradient and frees them before the next chunk. Tokens without a label are dropped before the
head, so prompt tokens cost no logits at all.

The head is a callable (the LM head module's own forward), so bias, tied weights, LoRA on the head
and accelerate's offload hooks all behave as in the model; its weight gets its gradient summed over
the chunks when it is trainable.
"""

from __future__ import annotations

IGNORE = -100  # the label the loss skips (transformers' and torch's convention)
CHUNK_ELEMENTS = 1 << 22  # logits per chunk: 16 MiB in float32 (131 tokens of a 32000-token vocabulary)


def chunk_tokens(vocab: int, elements: int | None = None) -> int:
    return max(1, (elements or CHUNK_ELEMENTS) // max(vocab, 1))


def _chunk_nll(head, softcap, h, y):
    import torch
    import torch.nn.functional as F

    z = head(h)
    if softcap:  # Gemma 2: in the head's dtype, before the upcast, as its forward does
        z = torch.tanh(z / softcap) * softcap
    # float32 as transformers does (float64 stays float64: the numerical checks run in it)
    return F.cross_entropy(z.to(torch.promote_types(z.dtype, torch.float32)), y, reduction="sum")


def chunked_nll(hidden, labels, head, vocab: int, *, softcap: float | None = None, elements: int | None = None):
    """(sum of token NLL as a float32 scalar, number of labelled tokens).

    hidden [..., H] is lined up with labels [...] (shift them first for a causal model: hidden[:, :-1]
    predicts labels[:, 1:]). head maps [n, H] -> [n, vocab]. With autograd on, the sum is
    differentiable in hidden and in the head's parameters; at most `elements` logits exist at a time.
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    keep = y != IGNORE  # on the labels' device: hidden may live on "meta" (memory counts) or elsewhere
    n = int(keep.sum())
    if n < y.numel():
        idx = keep.nonzero().squeeze(1)
        h, y = h.index_select(0, idx.to(h.device)), y[idx]
    y = y.to(h.device)
    total = torch.zeros((), dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
    if n == 0:
        return total + 0.0 * hidden.sum(), 0  # keeps the graph connected (a backward is still valid)
    step = chunk_tokens(vocab, elements)
    grad = torch.is_grad_enabled()
    for i in range(0, n, step):
        hc, yc = h[i:i + step], y[i:i + step]
        if grad:
            total = total + checkpoint(_chunk_nll, head, softcap, hc, yc, use_reentrant=False)
        else:
            total = total + _chunk_nll(head, softcap, hc, yc)
    return total, n
