"""Load a base model and its tokenizer for training and evaluation.

What a method puts on the model, and how it is saved and re-attached, is its kind's business
(surgery.kinds: wrap, save, attach); this module only loads.
"""

from __future__ import annotations

from ..arch import arch_of
from ..io.checkpoint import Checkpoint
from ..io.model import load_model
from ..io.tokenizer import load_tokenizer


def load_base(model_dir: str, placement=None):
    """(model, tokenizer, arch) for a checkpoint directory, loaded by io.model.load_model (dtype and
    device from `placement`; by default float32 on the CPU, or the checkpoint's dtype with a GPU)."""
    ck = Checkpoint.open(model_dir)  # checks the directory and gives a clear error first
    arch = arch_of(ck)
    return load_model(ck.path, placement), load_tokenizer(ck.path), arch
