"""Calibration data for prune-bridge: text file -> token blocks -> batches -> loss (the model itself is
loaded by surgery.io.model.load_model).

The data file is read by surgery.io.data (the same reader transfer uses): one document a line, or
JSON lines in a .jsonl/.json file. Documents are tokenized with the LLM's own tokenizer, joined with its EOS token, and cut into
blocks of seq_len tokens; `samples` blocks are drawn with a seeded generator (in file order when
there are no more than that). Causal models predict every block token; encoder-decoder models read
the first half of the block and predict the second (a prefix-LM objective).
"""

from __future__ import annotations

from ..errors import DataError
from ..io.data import documents
from ..io.progress import progress
from ..io.tokenizer import check_ids, load_tokenizer


def token_blocks(model_dir: str, data: str, samples: int, seq_len: int, seed: int, max_len: int | None = None):
    """LongTensor [n, L] of calibration blocks (n <= samples) and the block length used."""
    import torch

    if samples < 1 or seq_len < 2:
        raise DataError(f"--samples {samples} / --seq-len {seq_len} are too small", "use at least 1 sample of 2 tokens")
    tok = load_tokenizer(model_dir)
    docs = documents(data, tokenizer=tok)  # the tokenizer renders chat records with its template
    eos = tok.eos_token_id
    ids: list[int] = []
    for d in docs:
        ids.extend(tok(d, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    check_ids(tok, ids, data)
    L = min(seq_len, max_len or seq_len, len(ids))
    if L < 2:
        raise DataError(f"calibration data {data} tokenizes to {len(ids)} tokens", "give it more text")
    blocks = torch.tensor(ids[: len(ids) // L * L], dtype=torch.long).view(-1, L)
    if blocks.shape[0] > samples:
        g = torch.Generator().manual_seed(seed)
        pick = torch.randperm(blocks.shape[0], generator=g)[:samples].sort().values
        blocks = blocks[pick]
    return blocks, L


def batches(blocks, batch_size: int, encoder_decoder: bool, description: str | None = None):
    """Model keyword arguments for each batch (labels included, so the model returns its loss).
    With a description, the pass reports progress (surgery/io/progress.py: a bar, or log lines)."""
    n = -(-blocks.shape[0] // batch_size)
    with progress(n, description or "", unit="batches", enabled=None if description else False) as advance:
        for i in range(0, blocks.shape[0], batch_size):
            b = blocks[i:i + batch_size]
            if encoder_decoder:
                h = b.shape[1] // 2
                yield {"input_ids": b[:, :h].contiguous(), "labels": b[:, h:].contiguous()}
            else:
                yield {"input_ids": b, "labels": b}
            advance(1)


def to_device(batch: dict, model) -> dict:
    dev = model.get_input_embeddings().weight.device
    return {k: v.to(dev) for k, v in batch.items()}


def batch_loss(model, batch: dict):
    """The model's mean token NLL on one batch (what `model(**batch).loss` is). A causal model's goes
    through the chunked LM loss (train.score.batch_nll, ops/loss.py), so neither the forward nor the
    Fisher backward ever holds the [tokens, vocabulary] logits: at TinyLlama's shape they weigh more
    than a block's activations."""
    b = to_device(batch, model)
    if model.config.is_encoder_decoder:
        return model(**b, use_cache=False).loss
    from ..train.score import batch_nll

    nll, n = batch_nll(model, b, False, use_cache=False)
    return nll / max(n, 1)


def mean_loss(model, blocks, batch_size: int) -> float:
    """Mean next-token NLL of `model` on the calibration blocks (batches are equal-sized blocks)."""
    import torch

    total, n = 0.0, 0
    with torch.no_grad():
        for b in batches(blocks, batch_size, model.config.is_encoder_decoder, "calibration loss"):
            k = b["labels"].numel()
            total += float(batch_loss(model, b)) * k
            n += k
    return total / max(n, 1)
