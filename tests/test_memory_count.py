"""benchmarks/train_memory.py's tensor count: on the meta device (how the 1.1B shapes are counted) it
must equal what a real CPU training step saves, attention included (torch's meta sdpa would otherwise
count the eager math path's [batch, heads, seq, seq] probabilities, which the fused kernels never keep)."""

import pytest

from benchmarks.train_memory import tensor_count
from fixtures.build import _config

LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.mark.parametrize("kv", [4, 2])  # multi-head and grouped-query attention
def test_meta_count_equals_a_real_cpu_step(kv, monkeypatch):
    from contextlib import nullcontext

    import torch

    import benchmarks.train_memory as tm

    torch.manual_seed(0)
    cfg = _config("llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=kv, vocab_size=384, tie_word_embeddings=False).to_dict()
    batch, seq = 3, 40
    real, meta = (tensor_count(cfg, LLAMA, batch, seq, device=d) for d in ("cpu", "meta"))
    assert meta == real
    # without the stand-in, meta counts the math path: every layer's probabilities (less the output and
    # log-sum-exp the fused kernels keep instead)
    monkeypatch.setattr(tm, "fused_attention", nullcontext)
    probs, out = 2 * batch * 4 * seq * seq * 4, 2 * batch * seq * (64 + 4) * 4
    assert tensor_count(cfg, LLAMA, batch, seq)["saved"] - real["saved"] >= probs - out


def test_training_bytes_with_a_frozen_layer(tmp_path):
    """benchmarks/evidence/memory.training_bytes(frozen=...): a layer whose LoRA is not trained holds its
    LoRA as weights (no gradient, no AdamW moments) and saves no LoRA inputs for a backward, while the
    layers before it still get their gradient through it (method_experiments --cascade counts this)."""
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks.evidence.memory import training_bytes

    torch.manual_seed(0)
    cfg = _config("llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=384, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    both = training_bytes(str(tmp_path), 2, 16)
    first = training_bytes(str(tmp_path), 2, 16, frozen=(".layers.1.",))
    lora_1 = both["lora_state"] // 3 // 2  # the two layers' LoRA are the same size
    assert first["lora_state"] == both["lora_state"] - 3 * lora_1
    assert first["weights"] == both["weights"]  # held either way, counted once
    assert 0 < first["kinds"]["lora"] < both["kinds"]["lora"]
    assert first["total"] < both["total"]
    # edit runs before the LoRA goes on: a layer swapped in gets LoRA like any other
    seen = []
    training_bytes(str(tmp_path), 2, 16, edit=lambda m: seen.append(type(m.model.layers[1]).__name__))
    assert seen == ["LlamaDecoderLayer"]
