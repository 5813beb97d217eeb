"""Training and evaluation data: JSONL records -> token ids and labels -> padded batches.

Two record kinds (one per line, all lines of a file the same kind):
  {"text": ...}                     language-model loss on every token;
  {"prompt": ..., "completion": ...} loss on the completion tokens only.
Causal models see prompt+completion concatenated, with the prompt's labels set to -100 (ignored by
the loss). Encoder-decoder models (T5) read the prompt in the encoder and predict the completion.
The prompt and completion are tokenized separately so the boundary between them is exact.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from ..errors import DataError

IGNORE = -100  # label value the loss skips (transformers' and torch's convention)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # causal: same length as input_ids; seq2seq: the decoder's targets
    completion: bool  # True for prompt/completion records (scored by exact match)


def read_jsonl(path: str) -> tuple[list[dict], str]:
    """Records of a JSONL file and their kind ("text" or "completion"); DataError names the bad line."""
    if not os.path.isfile(path):
        raise DataError(f"data file {path} does not exist", "pass a JSONL file with {\"text\"} or {\"prompt\",\"completion\"} per line")
    records, kind = [], None
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}:{n} is not valid JSON ({e})", "write one JSON object per line") from e
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{n} is a {type(rec).__name__}, not an object", "write one JSON object per line")
            if isinstance(rec.get("prompt"), str) and isinstance(rec.get("completion"), str):
                this = "completion"
            elif isinstance(rec.get("text"), str):
                this = "text"
            else:
                raise DataError(f"{path}:{n} has neither a string \"text\" nor string \"prompt\" and \"completion\" (keys: {sorted(rec)})",
                                "give each line {\"text\": ...} or {\"prompt\": ..., \"completion\": ...}")
            if kind is None:
                kind = this
            elif this != kind:
                raise DataError(f"{path}:{n} is a {this} record but earlier lines are {kind} records",
                                "keep one record kind per file")
            if this == "completion" and not rec["completion"]:
                raise DataError(f"{path}:{n} has an empty completion", "every completion needs at least one token")
            records.append(rec)
    if not records:
        raise DataError(f"data file {path} has no records", "write at least one JSON line")
    return records, kind


def encode(records: list[dict], tokenizer, *, seq2seq: bool, max_length: int, where: str = "data") -> list[Example]:
    """Tokenize records. Over-long prompts lose their start (the completion is what is scored)."""
    out = []
    for n, rec in enumerate(records, 1):
        if "prompt" in rec and "completion" in rec:
            # The prompt gets the tokenizer's usual specials (BOS for Llama); the completion none in
            # causal models (it continues the prompt), its EOS in seq2seq models (T5 ends targets so).
            p = tokenizer(rec["prompt"], add_special_tokens=True)["input_ids"]
            c = tokenizer(rec["completion"], add_special_tokens=seq2seq)["input_ids"]
            if not c:
                raise DataError(f"{where}:{n}: the completion {rec['completion']!r} has no tokens", "use a non-empty completion")
            c = c[:max_length]
            if seq2seq:
                out.append(Example(p[-max_length:], c, True))
            else:
                p = p[max(0, len(p) + len(c) - max_length):]
                out.append(Example(p + c, [IGNORE] * len(p) + c, True))
        else:
            if seq2seq:
                raise DataError(f"{where}:{n} is a {{\"text\"}} record but the model is encoder-decoder",
                                "give encoder-decoder models {\"prompt\", \"completion\"} records")
            ids = tokenizer(rec["text"], add_special_tokens=True)["input_ids"][:max_length]
            if len(ids) < 2:
                raise DataError(f"{where}:{n} has fewer than 2 tokens", "a language-model loss needs at least two tokens")
            out.append(Example(ids, list(ids), False))
    return out


def load_examples(path: str, tokenizer, *, seq2seq: bool, max_length: int = 512) -> list[Example]:
    records, _ = read_jsonl(path)
    return encode(records, tokenizer, seq2seq=seq2seq, max_length=max_length, where=path)


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
