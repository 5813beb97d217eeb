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
