"""(IA)³, the kind added through the registry alone: merge = peft's merge_and_unload, unmerge restores,
train learns and eval loads it, inspect describes it, transfer refuses it by the registry's word."""

import json
import os

import pytest
import torch

from surgery.errors import AdapterError, NumericsError
from surgery.pipelines.merge import merge_lora, unmerge_lora

from .conftest import run_cli
from .train_fixtures import one_thread, task  # noqa: F401 (pytest fixtures)


def _cls(path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if AutoConfig.from_pretrained(path).is_encoder_decoder else AutoModelForCausalLM


def build_ia3(base: str, out: str, targets=None, feedforward=None, seed: int = 0) -> str:
    """A PEFT IA3 adapter saved by peft itself, its vectors moved well away from the identity."""
    from peft import IA3Config, get_peft_model

    model = _cls(base).from_pretrained(base, dtype=torch.float32)
    cfg = IA3Config(target_modules=targets, feedforward_modules=feedforward)  # None: peft's per-model defaults
    pm = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "ia3_l" in name:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
    pm.peft_config["default"].base_model_name_or_path = base
    pm.save_pretrained(out)
    return out


@pytest.mark.parametrize("family,kw", [("llama", {"attention_bias": True}), ("gpt2", {}), ("t5", {})])
def test_merge_equals_peft_and_unmerge_restores(fx, tmp_path, family, kw):
    from peft import PeftModel

    base = fx.model(family, **kw)
    ad = build_ia3(base, str(tmp_path / "ia3"))
    merge_lora(base, [ad], str(tmp_path / "m"))
    ours, info = _cls(base).from_pretrained(str(tmp_path / "m"), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ref = PeftModel.from_pretrained(_cls(base).from_pretrained(base, dtype=torch.float32), ad).merge_and_unload()
    a, b = ours.state_dict(), ref.state_dict()
    orig = _cls(base).from_pretrained(base, dtype=torch.float32).state_dict()
    assert set(a) == set(b)
    assert max((a[k] - b[k]).abs().max().item() for k in b) <= 1e-6
    changed = {k.rsplit(".", 2)[-2] + "." + k.rsplit(".", 1)[-1] for k in b if not torch.equal(b[k], orig[k])}
    if family == "llama":  # k/v weights and their biases (output scaled), down_proj's weight (input scaled)
        assert changed == {"k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias", "down_proj.weight"}
    unmerge_lora(str(tmp_path / "m"), ad, str(tmp_path / "u"))
    back = _cls(base).from_pretrained(str(tmp_path / "u"), dtype=torch.float32).state_dict()
    assert max((back[k] - orig[k]).abs().max().item() for k in orig) <= 1e-5


def test_weight_interpolates_and_zero_scaling_cannot_be_unmerged(fx, tmp_path):
    from safetensors.torch import load_file, save_file

    from surgery.io.checkpoint import Checkpoint

    base = fx.model("llama")
    ad = build_ia3(base, str(tmp_path / "ia3"), targets=["k_proj"], feedforward=[])
    merge_lora(base, [ad], str(tmp_path / "half"), weights=[0.5])
    f = os.path.join(ad, "adapter_model.safetensors")
    l = load_file(f)["base_model.model.model.layers.0.self_attn.k_proj.ia3_l"]
    W = Checkpoint.open(base).read("model.layers.0.self_attn.k_proj.weight")
    got = Checkpoint.open(str(tmp_path / "half")).read("model.layers.0.self_attn.k_proj.weight")
    assert torch.allclose(got, W * (1 + 0.5 * (l - 1)), atol=1e-6)  # l is [out, 1]: rows scale

    sd = load_file(f)
    sd["base_model.model.model.layers.0.self_attn.k_proj.ia3_l"][3, 0] = 0.0
    save_file(sd, f)
    merge_lora(base, [ad], str(tmp_path / "z"))
    with pytest.raises(NumericsError, match="zero entries"):
        unmerge_lora(str(tmp_path / "z"), ad, str(tmp_path / "zu"))


def test_shape_mismatch_and_refusals(fx, tmp_path):
    ad = build_ia3(fx.model("llama"), str(tmp_path / "ia3"))
    with pytest.raises(AdapterError, match="not a linear layer"):
        merge_lora(fx.model("gpt2"), [ad], str(tmp_path / "x"))
    code, _, err = run_cli("transfer", "--slm", ad, "--llm", fx.model("llama"), "-o", tmp_path / "t")
    assert code == 2 and "ia3 is not supported by transfer (supported: lora, prompt, prefix, bottleneck)" in err
    code, out, err = run_cli("inspect", ad, "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["type"] == "ia3" and info["peft_type"] == "IA3" and info["layers"] == [0, 1]
    assert info["module_types"] == ["mlp.down_proj", "self_attn.k_proj", "self_attn.v_proj"]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_train_learns_and_eval_loads_it(fx, task, tmp_path, family):
    from surgery.pipelines.evaluate import evaluate
    from surgery.pipelines.train import train_adapter
    from surgery.train.loop import TrainConfig

    train, _ = task
    s = train_adapter(fx.model(family), train, str(tmp_path / "a"), method="ia3",
                      cfg=TrainConfig(epochs=2, lr=5e-2, batch_size=16, seed=0))
    assert s["method"] == "ia3" and s["after"]["loss"] < s["before"]["loss"]
    cfg = json.load(open(tmp_path / "a" / "adapter_config.json"))
    # peft's own per-model choice, from the family map: k, v (GPT-2: fused c_attn) + the MLP's down projection
    want = {"llama": (["mlp.down_proj", "self_attn.k_proj", "self_attn.v_proj"], ["mlp.down_proj"]),
            "gpt2": (["attn.c_attn", "mlp.c_proj"], ["mlp.c_proj"])}[family]
    assert sorted(cfg["target_modules"]) == want[0] and sorted(cfg["feedforward_modules"]) == want[1]
    e = evaluate(fx.model(family), train, adapter=str(tmp_path / "a"))
    assert e["loss"] == pytest.approx(s["after"]["loss"], rel=1e-5)
