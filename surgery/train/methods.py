"""Load a base model for training and evaluation.

What a method puts on the model, and how it is saved and re-attached, is its kind's business
(surgery.kinds: wrap, save, attach); this module only loads.
"""

from __future__ import annotations


def load_base(model_dir: str, dtype=None):
    """(model, tokenizer, arch) for a checkpoint directory; the model in float32 unless told."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from ..arch import arch_of
    from ..io.checkpoint import Checkpoint
    from ..io.tokenizer import load_tokenizer

    ck = Checkpoint.open(model_dir)  # checks the directory and gives a clear error first
    arch = arch_of(ck)
    config = AutoConfig.from_pretrained(ck.path)
    cls = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = cls.from_pretrained(ck.path, dtype=dtype or torch.float32)
    return model, load_tokenizer(ck.path), arch
