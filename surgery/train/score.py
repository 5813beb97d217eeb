"""Token losses and exact-match accuracy from one forward pass (teacher forcing).

loss = -(1/N) * sum over labelled tokens t of log p(y_t | y_<t, x)   (N = labelled tokens, the same
token-weighted mean transformers computes); perplexity = exp(loss).
Exact match: a prompt/completion example is correct when, under teacher forcing, the argmax token at
every completion position equals the completion token. For greedy decoding this is the same test as
"the greedy continuation starts with the completion": if every argmax matches, greedy decoding
reproduces the completion token by token; at the first mismatch it leaves it.
"""

from __future__ import annotations

from contextlib import contextmanager

from ..io.progress import progress
from .data import IGNORE, collate


def aligned_logits(model, batch: dict, seq2seq: bool, **kwargs):
    """Logits [b, L, V] lined up with batch["labels"] (shifted for causal models); kwargs go to the model.

    Prompt tuning prepends virtual tokens to a causal model's input, so its logits are longer
    than the input; the last L positions are the ones that belong to the real tokens.
    """
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"], **kwargs)
    logits = out.logits
    labels = batch["labels"].to(logits.device)  # a dispatched model's logits leave on its last device
    if seq2seq:
        return logits, labels
    logits = logits[:, -batch["input_ids"].shape[1]:]
    return logits[:, :-1], labels[:, 1:]


def token_loss(logits, labels):
    """(sum of token NLL, number of labelled tokens), in float32 (float64 for a float64 model)."""
    import torch
    import torch.nn.functional as F

    nll = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)).reshape(-1, logits.shape[-1]), labels.reshape(-1),
                          ignore_index=IGNORE, reduction="sum")
    return nll, int((labels != IGNORE).sum())


@contextmanager
def _head_inputs(head):
    """For the duration, the LM head records its input (the final hidden states, after the last norm
    and any scaling the model applies before its head) and returns empty logits; yields (the recorded
    inputs, the head's own forward, accelerate's hooks included)."""
    had, inner = "forward" in head.__dict__, head.forward
    seen = []

    def fwd(x, *args, **kwargs):
        seen.append(x)
        return x.new_empty(*x.shape[:-1], 0)

    head.forward = fwd
    try:
        yield seen, inner
    finally:
        if had:
            head.forward = inner
        else:
            del head.forward


def causal_mask(mask):
    """None for a right-padded batch (every row's mask is ones, then zeros), else the mask itself.

    Under causal attention no real token sees a later position, so the padding at the end of a row
    changes only the padding's own outputs, whose labels are ignored: the loss and its gradients are
    the same without the mask (tests/test_loss.py checks them against transformers' masked loss).
    Without one, sdpa runs its causal fused kernel, which keeps no [batch, 1, seq, seq] mask for the
    backward (with a mask the CPU kernel saves it; CUDA's flash kernel takes none at all)."""
    if mask is None or mask.dim() != 2:
        return mask
    import torch

    lengths = mask.sum(-1, keepdim=True)
    right_padded = torch.equal(mask.bool(), torch.arange(mask.shape[1], device=mask.device) < lengths)
    return None if right_padded else mask


def post_head_ops(model) -> tuple | None:
    """The ops `model` applies to its LM head's output (arch.logit_ops, from its family file), or None when
    they are not known: the caller then takes the model's own full logits (said once per model type)."""
    from ..arch import logit_ops
    from ..errors import ArchitectureError
    from ..log import note
    from ..ops.loss import POST_OPS

    config = model.config.to_dict()
    ops = logit_ops(config)
    unknown = [op for op, _ in ops or () if op not in POST_OPS]
    if unknown:
        raise ArchitectureError(f"model_type {config.get('model_type')!r}: its family file's \"logits\" names op "
                                f"{unknown[0]!r}, not one of {', '.join(POST_OPS)}", "fix the family file (docs/arch.md)")
    if ops is None and config.get("model_type") not in _FULL_LOGITS_NOTED:
        _FULL_LOGITS_NOTED.add(config.get("model_type"))
        note(f"model_type {config.get('model_type')!r}: what it does to the logits after its LM head is not in a "
             "family file, so its losses use its full logits (more memory; see docs/arch.md, \"logits\")")
    return ops


_FULL_LOGITS_NOTED: set = set()


def _at_head(model, batch: dict, unwrapped=None, **kwargs):
    """Run a causal model up to its LM head: (final hidden states [b, L-1, H] lined up with the shifted
    labels [b, L-1], the head's forward, the vocabulary size)."""
    base = unwrapped if unwrapped is not None else model
    config = base.config
    with _head_inputs(base.get_output_embeddings()) as (seen, head):
        model(input_ids=batch["input_ids"], attention_mask=causal_mask(batch.get("attention_mask")), **kwargs)
    L = batch["input_ids"].shape[1]
    h = seen[-1][:, -L:]  # prompt tuning prepends virtual tokens: the last L positions are the real ones
    return h[:, :-1], batch["labels"][:, 1:], head, config.vocab_size


def batch_nll(model, batch: dict, seq2seq: bool, unwrapped=None, **kwargs):
    """(sum of token NLL, labelled tokens) of one teacher-forced batch: token_loss(*aligned_logits(...))
    without ever holding the full logits. A causal model runs up to its LM head, whose input feeds
    ops.loss.chunked_nll (a chunk of tokens at a time; prompt and padding tokens skip the head). T5, and a
    model whose post-head ops are not known (post_head_ops), take the plain path. `unwrapped`: the model
    itself when `model` is a distributed wrapper around it."""
    post = None if seq2seq else post_head_ops(unwrapped if unwrapped is not None else model)
    if post is None:
        return token_loss(*aligned_logits(model, batch, seq2seq, **kwargs))
    from ..ops.loss import chunked_nll

    h, labels, head, vocab = _at_head(model, batch, unwrapped, **kwargs)
    return chunked_nll(h, labels, head, vocab, post=post)


def batch_scores(model, batch: dict, seq2seq: bool) -> tuple:
    """(sum of token NLL, labelled tokens, per-row exact match) of one teacher-forced batch, no autograd.

    A causal model goes through ops.loss.chunked_scores as batch_nll goes through chunked_nll: loss and
    argmax on the labelled positions only, a chunk at a time, never the [batch, seq, vocab] logits, and
    no key/value cache (nothing is generated). T5's decoder logits are only as long as its targets: it
    keeps the plain path, as does a model whose post-head ops are not known (post_head_ops)."""
    post = None if seq2seq else post_head_ops(model)
    if post is None:
        logits, labels = aligned_logits(model, batch, seq2seq, **({} if seq2seq else {"use_cache": False}))
        return (*token_loss(logits, labels), exact_matches(logits, labels))
    from ..ops.loss import chunked_scores

    h, labels, head, vocab = _at_head(model, batch, use_cache=False)
    nll, n, pred = chunked_scores(h, labels, head, vocab, post=post)
    return nll, n, [bool(r) for r in (pred == labels.to(pred.device)).all(-1)]


def exact_matches(logits, labels) -> list[bool]:
    """Per row: every labelled position's argmax equals its label."""
    pred = logits.argmax(-1)
    keep = labels != IGNORE
    ok = (pred == labels) | ~keep
    return [bool(r) for r in ok.all(-1)]


def evaluate_examples(model, examples, *, batch_size: int, pad_id: int, seq2seq: bool, description: str | None = None) -> dict:
    """loss, perplexity, accuracy (None without prompt/completion records), examples, tokens; with a
    description, progress is reported (not inside training, whose own bar is showing)."""
    import math

    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, tokens, right, scored = 0.0, 0, 0, 0
    n_batches = -(-len(examples) // batch_size)
    with torch.no_grad(), progress(n_batches, description or "", unit="batches", enabled=None if description else False) as advance:
        for i in range(0, len(examples), batch_size):
            advance(1)
            chunk = examples[i:i + batch_size]
            batch = {k: v.to(device) for k, v in collate(chunk, pad_id, seq2seq).items()}
            nll, n, exact = batch_scores(model, batch, seq2seq)
            total += float(nll)
            tokens += n
            for e, ok in zip(chunk, exact):
                if e.completion:
                    scored += 1
                    right += ok
    if was_training:
        model.train()
    loss = total / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "accuracy": right / scored if scored else None,
            "correct": right, "scored": scored, "examples": len(examples), "tokens": tokens}
