"""The family maps describe real transformers models exactly."""

import pytest

from surgery.arch import load_arch
from surgery.errors import ArchitectureError
from surgery.io.checkpoint import Checkpoint

from .conftest import FAMILY_NAMES, MORE_FAMILIES

VARIANTS = [(f, {}) for f in FAMILY_NAMES + MORE_FAMILIES] + [
    ("t5", {"feed_forward_proj": "gated-gelu", "tie_word_embeddings": False}),
    ("llama", {"attention_bias": True, "mlp_bias": True, "tie_word_embeddings": True}),
    ("qwen2", {"tie_word_embeddings": False}),
    ("qwen3", {"attention_bias": True, "tie_word_embeddings": True}),
    ("gemma", {"attention_bias": True, "tie_word_embeddings": False}),
    ("gemma2", {"tie_word_embeddings": False}),
    ("phi3", {"tie_word_embeddings": True}),
]


@pytest.mark.parametrize("family,kw", VARIANTS, ids=lambda v: str(v))
def test_map_matches_checkpoint_and_model(fx, family, kw):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
    from transformers.pytorch_utils import Conv1D

    path = fx.model(family, **kw)
    ck = Checkpoint.open(path)
    arch = load_arch(ck.config)
    stored = {t.name: t for t in arch.stored_tensors()}
    assert set(stored) == set(ck.keys())
    for name, t in stored.items():
        assert arch.shape(t) == ck.shape(name), name
    cls = AutoModelForSeq2SeqLM if arch.family == "t5" else AutoModelForCausalLM
    model = cls.from_pretrained(path, dtype=torch.float32)
    mods = dict(model.named_modules())
    for t in arch.linears():
        m = mods[t.module]
        assert isinstance(m, (torch.nn.Linear, Conv1D)), t.module
        assert isinstance(m, Conv1D) == t.transposed, t.module
        assert tuple(m.weight.shape) == arch.shape(t)
    # every nn.Linear/Conv1D of the model is in the map (nothing a LoRA could touch is missing)
    linear_names = {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}
    assert linear_names == {t.module for t in arch.linears()}
    assert arch.num_parameters() == sum(p.numel() for p in model.parameters())
    # ties the map claims are ties the model has
    params = dict(model.named_parameters(remove_duplicate=False))
    for a, b in arch.tied().items():
        assert params[a].data_ptr() == params[b].data_ptr(), (a, b)


def test_unknown_family_says_how_to_add_one():
    with pytest.raises(ArchitectureError, match="add a family file"):
        load_arch({"model_type": "bert"})


def test_missing_field_is_named():
    with pytest.raises(ArchitectureError, match="hidden"):
        load_arch({"model_type": "llama", "num_attention_heads": 4, "intermediate_size": 8, "vocab_size": 10,
                   "num_hidden_layers": 1})


def test_fused_and_transposed_layout_of_gpt2(fx):
    arch = load_arch(Checkpoint.open(fx.model("gpt2")).config)
    c_attn = arch.by_module()["transformer.h.0.attn.c_attn"]
    assert c_attn.transposed and c_attn.out_dims == ("attn.q", "attn.k", "attn.v")
    assert c_attn.in_dims == ("residual",)
