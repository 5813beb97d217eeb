"""The one tokenizer loader, and the check that every token id fits the model's embedding.

A tokenizer can know more tokens than the model has embedding rows: a qwen2 config with a 101-token
vocabulary gets Qwen2Tokenizer's added `<|endoftext|>` as id 101, and the first forward pass dies
with `IndexError: index out of range` deep inside torch. `load_tokenizer` reads the model's
vocab_size from its config.json and refuses special tokens we feed the model (BOS, EOS, PAD, UNK)
that fall outside it; `check_ids` does the same for every tokenized document, naming the token.
"""

from __future__ import annotations

import os
import weakref

from ..errors import CheckpointError, DataError
from .jsonfile import load_json

FIX = "copy the model's tokenizer files (tokenizer.json, tokenizer_config.json, ...) next to its config.json"
# tokenizer -> (vocab_size, model dir); weak, so a tokenizer's limit dies with it
_LIMITS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def model_vocab_size(model_dir: str) -> int | None:
    """vocab_size from a model directory's config.json (top level or text_config), or None."""
    path = os.path.join(model_dir, "config.json")
    if not os.path.isfile(path):
        return None
    cfg = load_json(path, CheckpointError, "restore the file from the original model")
    for c in (cfg, cfg.get("text_config") or {}):
        v = c.get("vocab_size") if isinstance(c, dict) else None
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None


def load_tokenizer(model_dir: str, *, offsets: bool = False, pad: bool = False):
    """AutoTokenizer of a model directory, checked against its vocab_size.

    offsets: require a fast tokenizer (character offsets, for pairing two tokenizations).
    pad: give a tokenizer without a pad token its EOS (or UNK) as one, for batching."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model_dir)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a missing or broken tokenizer
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        raise CheckpointError(f"{model_dir} has no usable tokenizer ({type(e).__name__}{': ' + first if first else ''})",
                              FIX) from None
    if offsets and not getattr(tok, "is_fast", False):
        raise CheckpointError(f"the tokenizer of {model_dir} is not a fast tokenizer",
                              "pairing tokens needs character offsets; save a tokenizer.json beside the model")
    if pad and tok.pad_token is None:  # padding only fills batches; padded positions are masked out
        tok.pad_token = tok.eos_token or tok.unk_token
    vocab = model_vocab_size(model_dir)
    if vocab is not None:
        _LIMITS[tok] = (vocab, model_dir)
        for role in ("bos", "eos", "pad", "unk"):
            i = getattr(tok, f"{role}_token_id", None)
            if isinstance(i, int) and not 0 <= i < vocab:
                raise CheckpointError(f"{model_dir}: the tokenizer's {role} token {getattr(tok, f'{role}_token')!r} has id {i}, "
                                      f"but the model's vocab_size is {vocab}",
                                      "use the tokenizer the model was trained with, or resize the model's embeddings")
    return tok


def vocab_limit(tok) -> int | None:
    """The model's vocab_size for a tokenizer from load_tokenizer (ids must be below it), else None."""
    limit = _LIMITS.get(tok)
    return limit[0] if limit else None


def check_ids(tok, ids, where: str):
    """`ids` (a list or tensor of token ids from `tok`), or a DataError naming the first token the model
    has no embedding for. A no-op for tokenizers not loaded by load_tokenizer."""
    limit = _LIMITS.get(tok)
    if limit is None:
        return ids
    vocab, model_dir = limit
    flat = ids.flatten().tolist() if hasattr(ids, "flatten") else ids
    bad = next((i for i in flat if not 0 <= i < vocab), None)
    if bad is not None:
        raise DataError(f"{where}: the tokenizer of {model_dir} turns {tok.convert_ids_to_tokens(bad)!r} into id {bad}, "
                        f"but the model's vocab_size is {vocab}",
                        "use the tokenizer the model was trained with, or remove that token from the data")
    return ids
