"""The tensor count (surgery.train.memory, which benchmarks/train_memory.py uses): on the meta device (how the 1.1B shapes are counted) it
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

    import surgery.train.memory as tm

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


def test_a_prefix_bridge_is_counted_without_its_token_embedding(fx):
    """tune-bridge --prefix does not hold the bridge's token embedding: both counts (the evidence's
    training_bytes on a checkpoint, train_memory's on the meta device) drop exactly its bytes, and the saved
    activations stay (the first norm saves the stored state as it saved the embedding's output)."""
    import json
    import os

    from benchmarks.evidence.memory import training_bytes

    model = fx.model("llama")
    with open(os.path.join(model, "config.json")) as f:
        cfg = json.load(f)
    emb = cfg["vocab_size"] * cfg["hidden_size"] * 4
    full, prefix = (training_bytes(model, 2, 16, prefix=p) for p in (False, True))
    assert full["weights"] - prefix["weights"] == emb
    assert (full["activations"], full["lora_state"]) == (prefix["activations"], prefix["lora_state"])
    small = _config("llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=384, tie_word_embeddings=False).to_dict()
    full, prefix, real = (tensor_count(small, LLAMA, 2, 16, device=d, prefix=p)
                          for d, p in (("meta", False), ("meta", True), ("cpu", True)))
    assert full["weights"] - prefix["weights"] == 384 * 64 * 4 and full["saved"] == prefix["saved"] and prefix == real


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
