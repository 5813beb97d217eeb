"""`surgery eval`: loss, perplexity and exact-match accuracy of a model (with an optional adapter) on JSONL.

Accuracy is exact match under teacher forcing (surgery.train.score): a prompt/completion record
counts as correct when the argmax token at every completion position is the completion's token,
which is exactly "greedy decoding reproduces the completion". Text records count toward the loss only.
"""

from __future__ import annotations

import os

from ..io.allocator import return_freed_memory
from ..kinds import kind_of
from ..train.data import MAX_LENGTH, load_examples, pad_id_of
from ..train.loop import place
from ..train.methods import load_base
from ..train.score import evaluate_examples


def evaluate(model_dir: str, data: str, *, adapter: str | None = None, batch_size: int = 8,
             max_length: int = MAX_LENGTH, placement=None) -> dict:
    """Loss, perplexity and exact-match accuracy of `model_dir` (with `adapter` applied, if given) on the
    JSONL `data`, as the dict `surgery eval --json` prints. placement: dtype and device (io.model)."""
    kind = kind_of(adapter, "eval") if adapter else None
    return_freed_memory()  # freed activations leave the RSS at once (io/allocator.py), as in refine
    model, tok, arch = load_base(model_dir, placement)
    seq2seq = bool(model.config.is_encoder_decoder)
    examples = load_examples(data, tok, seq2seq=seq2seq, max_length=max_length)
    if adapter:
        model = kind.attach(model, adapter, arch)
    model = place(model, placement)
    metrics = evaluate_examples(model, examples, batch_size=batch_size, pad_id=pad_id_of(tok, model.config),
                                seq2seq=seq2seq, description="eval")
    if hasattr(model, "bottleneck"):  # hooks off: the base model computes what it did before
        model.bottleneck.detach()
    return {"model": os.path.abspath(model_dir), "adapter": os.path.abspath(adapter) if adapter else None,
            "data": os.path.abspath(data), "family": arch.family, **metrics}
