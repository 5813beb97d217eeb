"""Training and evaluation data: records (read by surgery.io.data) -> token ids and labels -> padded batches.

Two record kinds (one per line, all lines of a file the same kind; a plain-text file is `text` records):
  {"text": ...}                     language-model loss on every token;
  {"prompt": ..., "completion": ...} loss on the completion tokens only.
Causal models see prompt+completion concatenated, with the prompt's labels set to -100 (ignored by
the loss). Encoder-decoder models (T5) read the prompt in the encoder and predict the completion.
The prompt and completion are tokenized separately so the boundary between them is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import DataError
from ..io.data import Record, read_records
from ..io.tokenizer import check_ids

IGNORE = -100  # label value the loss skips (transformers' and torch's convention)
MAX_LENGTH = 512  # tokens per example unless --max-length says otherwise (train, tune-bridge, refine, eval)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # causal: same length as input_ids; seq2seq: the decoder's targets
    completion: bool  # True for prompt/completion records (scored by exact match)


def encode(records: list[Record], tokenizer, *, seq2seq: bool, max_length: int) -> list[Example]:
    """Tokenize records. Over-long prompts lose their start (the completion is what is scored)."""
    out = []
    for rec in records:
        pair = rec.pair(tokenizer)
        if pair is not None:
            prompt, completion = pair
            # The prompt gets the tokenizer's usual specials (BOS for Llama); the completion none in
            # causal models (it continues the prompt), its EOS in seq2seq models (T5 ends targets so).
            p = check_ids(tokenizer, tokenizer(prompt, add_special_tokens=True)["input_ids"], rec.where)
            c = check_ids(tokenizer, tokenizer(completion, add_special_tokens=seq2seq)["input_ids"], rec.where)
            if not c:
                raise DataError(f"{rec.where}: the completion {completion[:40]!r} has no tokens", "use a non-empty completion")
            c = c[:max_length]
            if seq2seq:
                out.append(Example(p[-max_length:], c, True))
            else:
                p = p[max(0, len(p) + len(c) - max_length):]
                out.append(Example(p + c, [IGNORE] * len(p) + c, True))
        else:
            if seq2seq:
                raise DataError(f"{rec.where} is a {rec.kind.name} record but the model is encoder-decoder",
                                "give encoder-decoder models {\"prompt\", \"completion\"} records")
            ids = tokenizer(rec.document(tokenizer), add_special_tokens=True)["input_ids"][:max_length]
            check_ids(tokenizer, ids, rec.where)
            if len(ids) < 2:
                raise DataError(f"{rec.where} has fewer than 2 tokens", "a language-model loss needs at least two tokens")
            out.append(Example(ids, list(ids), False))
    return out


def load_examples(path: str, tokenizer, *, seq2seq: bool, max_length: int = MAX_LENGTH) -> list[Example]:
    """Training or evaluation examples of a data file (read by surgery.io.data, one kind per file)."""
    return encode(read_records(path), tokenizer, seq2seq=seq2seq, max_length=max_length)


def collate(examples: list[Example], pad_id: int, seq2seq: bool) -> dict:
    """Right-pad a batch; padded label positions are IGNORE, padded inputs are masked out."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    lw = max(len(e.labels) for e in examples)
    labels = torch.full((len(examples), lw), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, : len(e.input_ids)] = 1
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pad_id_of(tokenizer, config) -> int:
    for v in (getattr(tokenizer, "pad_token_id", None), getattr(config, "pad_token_id", None),
              getattr(config, "eos_token_id", None)):
        if isinstance(v, int):
            return v
    return 0
