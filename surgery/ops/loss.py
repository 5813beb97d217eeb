"""Token cross-entropy through the LM head, a chunk of tokens at a time.

    loss = (1/N) * sum over labelled tokens t of -log softmax(z_t)[y_t],   z_t = head(h_t)
    (N = tokens whose label is not -100; z_t then goes through the model's post-head ops, `post`, in
    order: softcap c -> c * tanh(z / c) (Gemma 2), scale s -> s * z (Cohere's logit_scale, Falcon-H1),
    divide s -> z / s (Granite's logits_scaling); which ops a model applies is its family file's data,
    arch.logit_ops, and a model whose ops are not known there takes the full-logits path instead)

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

Evaluation (chunked_scores) runs the same chunks without autograd and also takes each labelled
token's argmax, so loss and exact match never need the full logits either: at TinyLlama's vocabulary
and a batch of 8 x 512 tokens those are 0.5 GB in float32 (2 GB at Llama 3's 128k), before
cross-entropy's own float32 copy.
"""

from __future__ import annotations

IGNORE = -100  # the label the loss skips (transformers' and torch's convention)
CHUNK_ELEMENTS = 1 << 22  # logits per chunk: 16 MiB in float32 (131 tokens of a 32000-token vocabulary)


def chunk_tokens(vocab: int, elements: int | None = None) -> int:
    return max(1, (elements or CHUNK_ELEMENTS) // max(vocab, 1))


POST_OPS = {  # what a model may do to its LM head's output, as its forward does it: in the head's dtype
    "softcap": lambda z, c: (z / c).tanh() * c,
    "scale": lambda z, s: z * s,
    "divide": lambda z, s: z / s,
}


def _logits(head, post, h):
    """One chunk's logits z = head(h), then the model's post-head ops `post` ((op, value) pairs of
    POST_OPS, in order), in the head's dtype before any upcast, as the model's forward does."""
    z = head(h)
    for op, value in post:
        z = POST_OPS[op](z, value)
    return z


def _nll(z, y):
    """Summed cross-entropy of one chunk, in float32 as transformers does (float64 stays float64: the
    numerical checks run in it)."""
    import torch
    import torch.nn.functional as F

    return F.cross_entropy(z.to(torch.promote_types(z.dtype, torch.float32)), y, reduction="sum")


def _chunk_nll(head, post, h, y):
    return _nll(_logits(head, post, h), y)


def _labelled(hidden, labels):
    """(h [n, H], y [n] on h's device, keep, n): the labelled tokens only, in row-major order; keep is
    the bool mask of labelled positions, shaped like labels and on the labels' device (hidden may live
    on "meta" for memory counts, or on another device than the labels)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    keep = labels != IGNORE
    n = int(keep.sum())
    if n < y.numel():
        idx = keep.reshape(-1).nonzero().squeeze(1)
        h, y = h.index_select(0, idx.to(h.device)), y[idx]
    return h, y.to(h.device), keep, n


def chunked_nll(hidden, labels, head, vocab: int, *, post: tuple = (), elements: int | None = None):
    """(sum of token NLL as a float32 scalar, number of labelled tokens).

    hidden [..., H] is lined up with labels [...] (shift them first for a causal model: hidden[:, :-1]
    predicts labels[:, 1:]). head maps [n, H] -> [n, vocab]; post: the ops the model applies to its
    output ((op, value) pairs of POST_OPS). With autograd on, the sum is
    differentiable in hidden and in the head's parameters; at most `elements` logits exist at a time.
    """
    import torch
    from torch.utils.checkpoint import checkpoint

    h, y, _, n = _labelled(hidden, labels)
    total = torch.zeros((), dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
    if n == 0:
        return total + 0.0 * hidden.sum(), 0  # keeps the graph connected (a backward is still valid)
    step = chunk_tokens(vocab, elements)
    grad = torch.is_grad_enabled()
    for i in range(0, n, step):
        hc, yc = h[i:i + step], y[i:i + step]
        if grad:
            total = total + checkpoint(_chunk_nll, head, post, hc, yc, use_reentrant=False)
        else:
            total = total + _chunk_nll(head, post, hc, yc)
    return total, n


def chunked_scores(hidden, labels, head, vocab: int, *, post: tuple = (), elements: int | None = None):
    """Evaluation, without autograd: (sum of token NLL, labelled tokens, pred).

    The NLL is chunked_nll's. pred is shaped like labels (on their device): the argmax of each labelled
    token's logits, IGNORE where the label is IGNORE, so `pred == labels` holds at every position of a
    row exactly when the row is an exact match. The argmax is taken on the logits in the head's dtype
    (after the post-head ops), as `logits.argmax(-1)` on the model's full output would be; torch returns the
    first index of a tied maximum, on the full logits and here alike. Each token's logits are the same
    dot products as in the full [batch, seq, vocab] matmul, only over fewer rows; a BLAS may block a
    matmul of fewer rows differently, so in bf16/fp32 a logit could in principle round differently in
    the last bit and break an exact tie the other way. tests/test_eval_scores.py checks the counts are
    identical on every fixture family, benchmarks/eval_memory.py every argmax at TinyLlama widths.
    """
    import torch

    with torch.no_grad():
        h, y, keep, n = _labelled(hidden, labels)
        total = torch.zeros((), dtype=torch.promote_types(h.dtype, torch.float32), device=h.device)
        top = torch.empty(n, dtype=torch.long, device=h.device)
        step = chunk_tokens(vocab, elements)
        for i in range(0, n, step):
            z = _logits(head, post, h[i:i + step])
            total += _nll(z, y[i:i + step])
            top[i:i + step] = z.argmax(-1)
            del z  # the next chunk's logits replace these, never join them
        pred = torch.full(labels.shape, IGNORE, dtype=torch.long, device=keep.device)
        pred[keep] = top.to(keep.device)
    return total, n, pred
