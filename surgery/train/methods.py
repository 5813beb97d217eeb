"""Load a base model and its tokenizer for training and evaluation.

What a method puts on the model, and how it is saved and re-attached, is its kind's business
(surgery.kinds: wrap, save, attach); this module only loads.
"""

from __future__ import annotations

from ..errors import CheckpointError


def load_base(model_dir: str, placement=None):
    """(model, tokenizer, arch) for a checkpoint directory, loaded by io.model.load_model (dtype and
    device from `placement`; by default float32 on the CPU, or the checkpoint's dtype with a GPU)."""
    from transformers import AutoTokenizer

    from ..arch import arch_of
    from ..io.checkpoint import Checkpoint
    from ..io.model import load_model

    ck = Checkpoint.open(model_dir)  # checks the directory and gives a clear error first
    arch = arch_of(ck)
    model = load_model(ck.path, placement)
    try:
        tok = AutoTokenizer.from_pretrained(ck.path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{ck.path} has no usable tokenizer ({e})",
                              "copy the tokenizer files (tokenizer.json, tokenizer_config.json) next to config.json") from e
    return model, tok, arch
