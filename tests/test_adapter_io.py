"""The PEFT adapter format, read against adapters peft itself saved, and written for peft to load."""

import math

import pytest
import torch

from surgery.kinds.lora import modules as lora_modules
from surgery.errors import AdapterError
from surgery.io.adapter import Adapter, lora_config, lora_key, targets_module, write_adapter
from surgery.io.writer import OutputDir


def test_reads_peft_lora_with_patterns(fx):
    path = fx.lora("llama", targets=["q_proj", "v_proj", "down_proj"], name="pat", r=4, alpha=8,
                   rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3}, use_rslora=True)
    ad = Adapter.open(path)
    mods = {m.module: m for m in lora_modules(ad)}
    assert set(mods) == {f"model.layers.{i}.{p}" for i in range(2)
                         for p in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
    assert mods["model.layers.0.self_attn.q_proj"].scaling == pytest.approx(8 / math.sqrt(4))
    assert mods["model.layers.0.self_attn.v_proj"].scaling == pytest.approx(3 / math.sqrt(4))
    assert mods["model.layers.1.mlp.down_proj"].scaling == pytest.approx(8 / math.sqrt(2))
    assert mods["model.layers.1.mlp.down_proj"].rank == 2


def test_reads_dora_and_modules_to_save(fx):
    path = fx.lora("qwen2", targets=["q_proj"], name="dora", use_dora=True, modules_to_save=["lm_head"])
    ad = Adapter.open(path)
    m = lora_modules(ad)[0]
    assert m.magnitude is not None and m.magnitude.shape == (m.B.shape[0],)
    assert set(ad.modules_to_save()) == {"lm_head"}


def test_gpt2_lora_is_fan_in_fan_out(fx):
    ad = Adapter.open(fx.lora("gpt2", targets=["c_attn"], name="c"))
    m = lora_modules(ad)[0]
    assert m.fan_in_fan_out and m.A.shape == (4, 64) and m.B.shape == (192, 4)


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_reads_prompt_learning(fx, tmp_path, kind):
    from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(fx.model("llama"))
    cfg = (PromptTuningConfig if kind == "prompt" else PrefixTuningConfig)(task_type="CAUSAL_LM", num_virtual_tokens=5)
    get_peft_model(model, cfg).save_pretrained(tmp_path / kind)
    ad = Adapter.open(str(tmp_path / kind))
    emb = ad.prompt_embeddings()
    assert emb.shape[0] == 5
    # prefix: layers x (k, v) x kv_heads*head_dim (GQA shrinks the kv width)
    assert emb.shape[1] == (64 if kind == "prompt" else 2 * 2 * (2 * 16))


def test_written_adapter_loads_in_peft_without_missing_keys(fx, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = fx.model("llama")
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(2):
        mod = f"model.layers.{i}.self_attn.q_proj"
        tensors[lora_key(mod, "lora_A.weight")] = torch.randn(2, 64, generator=g)
        tensors[lora_key(mod, "lora_B.weight")] = torch.randn(64, 2, generator=g)
    with OutputDir(str(tmp_path / "ad")) as od:
        write_adapter(od, lora_config(base, 2, 4, ["q_proj"]), tensors)
        od.commit()
    model = AutoModelForCausalLM.from_pretrained(base)
    pm = PeftModel.from_pretrained(model, str(tmp_path / "ad"))
    sd = pm.state_dict()
    got = sd["base_model.model.model.layers.1.self_attn.q_proj.lora_B.default.weight"]
    assert torch.equal(got, tensors[lora_key("model.layers.1.self_attn.q_proj", "lora_B.weight")])


def test_targets_module_rules():
    cfg = {"target_modules": ["q_proj"], "layers_to_transform": [1]}
    assert targets_module(cfg, "model.layers.1.self_attn.q_proj")
    assert not targets_module(cfg, "model.layers.0.self_attn.q_proj")
    assert targets_module({"target_modules": r".*\.(q|v)_proj"}, "model.layers.0.self_attn.v_proj")
    assert not targets_module({"target_modules": r".*\.(q|v)_proj"}, "model.layers.0.self_attn.k_proj")


def test_model_passed_as_adapter(fx):
    with pytest.raises(AdapterError, match="model directory, not an adapter"):
        Adapter.open(fx.model("llama"))
