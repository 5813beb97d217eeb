"""AdapterHub's directory layout: read as its save_adapter writes it, written so that load_adapter reads it."""

import json
import os

import pytest
import torch

from surgery.errors import AdapterError
from surgery.io.adapter import Adapter
from surgery.io.adapterhub import adapterhub_config, bn_config, is_adapterhub_dir, reduction_factor_for, write_adapterhub
from surgery.io.writer import OutputDir
from surgery.kinds.bottleneck import read_adapterhub

from .conftest import run_cli

# AdapterHub's SeqBnConfig ("pfeiffer" / "seq_bn") as adapters 1.3.0 saves it (BnConfig.to_dict()), by hand
PFEIFFER = {
    "adapter_residual_before_ln": False, "cross_adapter": False, "dropout": 0.0, "factorized_phm_W": True,
    "factorized_phm_rule": False, "hypercomplex_nonlinearity": "glorot-uniform", "init_weights": "bert",
    "init_weights_seed": None,
    "inv_adapter": None, "inv_adapter_reduction_factor": None, "is_parallel": False, "learn_phm": True,
    "leave_out": [], "ln_after": False, "ln_before": False, "mh_adapter": False, "non_linearity": "relu",
    "original_ln_after": True, "original_ln_before": True, "output_adapter": True, "phm_bias": True,
    "phm_c_init": "normal", "phm_dim": 4, "phm_init_range": 0.0001, "phm_layer": False, "phm_rank": 1,
    "reduction_factor": 16, "residual_before_ln": True, "scaling": 1.0, "shared_W_phm": False,
    "shared_phm_rule": True, "stochastic_depth": 0.0, "use_gating": False,
}


def site(prefix, name, r=4, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"{prefix}.adapters.{name}.adapter_down.0.weight": torch.randn(r, d, generator=g),
            f"{prefix}.adapters.{name}.adapter_down.0.bias": torch.randn(r, generator=g),
            f"{prefix}.adapters.{name}.adapter_up.weight": torch.randn(d, r, generator=g),
            f"{prefix}.adapters.{name}.adapter_up.bias": torch.randn(d, generator=g)}


def save_like_adapterhub(path, config, state_dict, model_type, name, version=True):
    """What loading.py's AdapterLoader.save does: build_full_config + json.dump(sort_keys) + torch.save."""
    os.makedirs(path)
    full = {"config": config, "hidden_size": 64, "model_class": "X", "model_name": "base", "model_type": model_type,
            "name": name}
    if version:
        full["version"] = "adapters.1.1.0"
    with open(os.path.join(path, "adapter_config.json"), "w", encoding="utf-8") as f:
        json.dump(full, f, indent=2, sort_keys=True)
    torch.save(state_dict, os.path.join(path, "pytorch_adapter.bin"))
    return str(path)


def test_reads_a_directory_saved_by_adapterhub(tmp_path):
    sd = {**site("transformer.h.0.output_adapters", "sst", seed=1), **site("transformer.h.1.output_adapters", "sst", seed=2)}
    path = save_like_adapterhub(tmp_path / "a", PFEIFFER, sd, "gpt2", "sst")
    assert is_adapterhub_dir(path)
    ad = read_adapterhub(path)
    assert ad.name == "sst" and ad.placements == {"transformer.h.0.output_adapters": ("layers", 0, "output_adapter"),
                                                  "transformer.h.1.output_adapters": ("layers", 1, "output_adapter")}
    w = ad.modules["transformer.h.1.output_adapters"]
    assert torch.equal(w["W_down"], sd["transformer.h.1.output_adapters.adapters.sst.adapter_down.0.weight"])
    assert torch.equal(w["b_up"], sd["transformer.h.1.output_adapters.adapters.sst.adapter_up.bias"])
    assert ad.flags == {"scaling": 1.0, "original_ln_before": True, "residual_before_ln": True, "original_ln_after": True}
    assert ad.num_parameters() == 2 * (4 * 64 + 4 + 64 * 4 + 64)


def test_reads_t5_sites_including_cross_attention_and_a_head_model_prefix(tmp_path):
    cfg = {**PFEIFFER, "mh_adapter": True, "cross_adapter": True, "original_ln_before": False, "non_linearity": "swish"}
    sd = {**site("encoder.block.1.layer.1", "t"), **site("decoder.block.0.layer.1", "t"),
          **site("transformer.decoder.block.1.layer.2", "t"), **site("decoder.block.1.layer.0", "t")}
    ad = read_adapterhub(save_like_adapterhub(tmp_path / "t", cfg, sd, "t5", "t"))
    assert ad.placements == {"encoder.block.1.layer.1": ("encoder", 1, "output_adapter"),
                             "decoder.block.0.layer.1": ("decoder", 0, "cross_adapter"),
                             "decoder.block.1.layer.2": ("decoder", 1, "output_adapter"),
                             "decoder.block.1.layer.0": ("decoder", 1, "mh_adapter")}


def test_files_without_version_get_adapterhubs_activation_rename(tmp_path):
    sd = site("model.layers.0.output_adapters", "old")
    ad = read_adapterhub(save_like_adapterhub(tmp_path / "o", {**PFEIFFER, "non_linearity": "gelu"}, sd, "llama", "old",
                                              version=False))
    assert ad.bn["non_linearity"] == "gelu_new"


def test_writer_produces_adapterhubs_layout_byte_for_byte(tmp_path):
    mods = {"model.layers.1.output_adapters": {k.rsplit(".adapters.x.", 1)[1]: v for k, v in
                                               site("model.layers.1.output_adapters", "x").items()}}
    mods = {m: {"W_down": w["adapter_down.0.weight"], "b_down": w["adapter_down.0.bias"], "W_up": w["adapter_up.weight"],
                "b_up": w["adapter_up.bias"]} for m, w in mods.items()}
    config = adapterhub_config("x", bn_config("pfeiffer"), {"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                           "_name_or_path": "base"}, hidden=64)
    for out in ("w1", "w2"):
        od = OutputDir(str(tmp_path / out))
        write_adapterhub(od, config, mods)
        od.commit()
    files = sorted(os.listdir(tmp_path / "w1"))
    assert files == ["adapter.safetensors", "adapter_config.json", "pytorch_adapter.bin"]
    for f in files:  # deterministic
        assert open(tmp_path / "w1" / f, "rb").read() == open(tmp_path / "w2" / f, "rb").read()
    text = open(tmp_path / "w1" / "adapter_config.json", encoding="utf-8").read()
    expected = {"config": PFEIFFER, "hidden_size": 64, "model_class": "LlamaForCausalLM", "model_name": "base",
                "model_type": "llama", "name": "x", "version": "adapters.1.3.0"}
    assert text == json.dumps(expected, indent=2, sort_keys=True)
    sd = torch.load(tmp_path / "w1" / "pytorch_adapter.bin", weights_only=True)
    assert sorted(sd) == sorted(site("model.layers.1.output_adapters", "x"))
    back = read_adapterhub(str(tmp_path / "w1"))
    assert torch.equal(back.modules["model.layers.1.output_adapters"]["W_up"], mods["model.layers.1.output_adapters"]["W_up"])


@pytest.mark.parametrize("change, word", [
    ({"is_parallel": True}, "is_parallel"), ({"ln_after": True}, "ln_after"), ({"use_gating": True}, "use_gating"),
    ({"phm_layer": True}, "phm_layer"), ({"inv_adapter": "nice"}, "inv_adapter"), ({"scaling": "learned"}, "scaling"),
    ({"residual_before_ln": "post_add"}, "residual_before_ln"), ({"architecture": "lora"}, "not a bottleneck"),
    ({"non_linearity": "nope"}, "unknown non_linearity")])
def test_refuses_configs_it_cannot_compute_the_same_way(tmp_path, change, word):
    path = save_like_adapterhub(tmp_path / "r", {**PFEIFFER, **change}, site("model.layers.0.output_adapters", "r"),
                                "llama", "r")
    with pytest.raises(AdapterError, match=word):
        read_adapterhub(path)


def test_bad_keys_are_named(tmp_path):
    p1 = save_like_adapterhub(tmp_path / "k", PFEIFFER, {**site("model.layers.0.output_adapters", "k"),
                                                         "model.layers.0.mlp.loras.k.lora_A": torch.zeros(2)}, "llama", "k")
    with pytest.raises(AdapterError, match="unrecognised key model.layers.0.mlp.loras.k.lora_A"):
        read_adapterhub(p1)
    p2 = save_like_adapterhub(tmp_path / "n", PFEIFFER, site("model.layers.0.output_adapters", "other"), "llama", "n")
    with pytest.raises(AdapterError, match="belongs to adapter 'other'"):
        read_adapterhub(p2)
    p3 = save_like_adapterhub(tmp_path / "m", PFEIFFER, site("model.layers.0.attention_adapters", "m"), "llama", "m")
    with pytest.raises(AdapterError, match="mh_adapter=false"):
        read_adapterhub(p3)


def test_merge_refusal_and_inspect(tmp_path):
    path = save_like_adapterhub(tmp_path / "i", PFEIFFER, {**site("model.layers.0.output_adapters", "i"),
                                                           **site("model.layers.1.output_adapters", "i")}, "llama", "i")
    with pytest.raises(AdapterError) as e:
        Adapter.open(path)
    assert str(e.value) == (f"{path} is a bottleneck adapter (AdapterHub layout); bottleneck adapters add modules and "
                            "cannot be merged into weights; use it with `surgery eval --adapter`")
    code, out, err = run_cli("inspect", path, "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["kind"] == "adapter" and info["type"] == "bottleneck" and info["config"] == "pfeiffer"
    assert info["reduction_factor"] == 16 and info["widths"] == [4] and info["placements"] == ["output_adapter"]
    assert info["layers"] == {"layers": [0, 1]} and info["parameters"] == 2 * (2 * 4 * 64 + 4 + 64)
    code, out, _ = run_cli("inspect", path)
    assert code == 0 and "bottleneck" in out


def test_reduction_factor_for_keeps_a_ported_width():
    for hidden in (64, 96, 100, 1600, 4096):
        for down in (1, 3, 4, 7, 48, 64):
            assert max(1, int(hidden // reduction_factor_for(hidden, down))) == down


def test_saved_then_loaded_adapter_computes_the_same_logits(fx, tmp_path):
    """The eval path: hook an adapter, save it AdapterHub-style, read it back, hook it again."""
    from surgery.arch import load_arch
    from surgery.train.bottleneck import attach_bottleneck

    from .test_bottleneck_hooks import load, logits

    m, arch = load(fx.model("t5"))
    bn = bn_config("houlsby", reduction_factor=16, cross_adapter=True)
    mods = attach_bottleneck(m, arch, bn, init="bert", seed=4)
    want = logits(m)
    mods.detach()
    od = OutputDir(str(tmp_path / "ah"))
    write_adapterhub(od, adapterhub_config("task", bn, m.config.to_dict(), arch.dims["hidden"]), mods.site_weights())
    od.commit()
    ad = read_adapterhub(str(tmp_path / "ah"))
    again = attach_bottleneck(m, load_arch(m.config.to_dict()), ad.bn, weights=ad.modules, name=ad.name)
    assert torch.equal(logits(m), want)
    again.detach()
