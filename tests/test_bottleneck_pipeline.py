"""The glue transfer / tune-bridge / eval call for bottleneck adapters, on real fixture models."""

import pytest
import torch

from surgery.arch import load_arch
from surgery.errors import AdapterError
from surgery.io.adapterhub import bn_config, read_adapterhub
from surgery.kinds.bottleneck import attach_saved, lift_sites, port_sites, restrict_sites, save_bottleneck
from surgery.train.bottleneck import attach_bottleneck

from .test_bottleneck_hooks import load, logits


@pytest.fixture(scope="module")
def slm_adapter(fx, tmp_path_factory):
    m, arch = load(fx.model("llama"))
    bn = bn_config("houlsby", reduction_factor=16, leave_out=[1])
    mods = attach_bottleneck(m, arch, bn, init="bert", seed=5)
    want = logits(m)
    mods.detach()
    out = str(tmp_path_factory.mktemp("bn") / "slm-adapter")
    save_bottleneck(out, "task", bn, mods.site_weights(), m.config.to_dict(), 64, base=fx.model("llama"))
    return out, want


def test_saved_adapter_is_used_by_eval(fx, slm_adapter):
    path, want = slm_adapter
    m, arch = load(fx.model("llama"))
    mods = attach_saved(m, arch, path)
    assert torch.equal(logits(m), want) and set(mods.sites) == {"model.layers.0.attention_adapters",
                                                                 "model.layers.0.output_adapters"}
    mods.detach()
    g, garch = load(fx.model("gpt2"))
    with pytest.raises(AdapterError, match="is a llama adapter but the model is gpt2"):
        attach_saved(g, garch, path)


def test_port_to_a_wider_deeper_llm_then_bridge_round_trip(fx, slm_adapter, tmp_path):
    path, _ = slm_adapter
    ad = read_adapterhub(path)
    llm_dir = fx.model("llama", hidden_size=96, num_hidden_layers=4)
    llm, llm_arch = load(llm_dir)
    with pytest.raises(AdapterError, match="reads width \\[64\\] but the model's hidden size is 96"):
        attach_saved(llm, llm_arch, path)
    idx = torch.randperm(96, generator=torch.Generator().manual_seed(0))[:64]
    E = torch.eye(96)[:, idx]  # SLM coordinate j sits at LLM coordinate idx[j]
    ported, leave_out = port_sites(ad, llm_arch, {"layers": [0, 0, 1, 1]}, lambda *a: (E.T, E))
    assert leave_out == [2, 3]  # SLM layer 1 had no adapters, so LLM layers 2 and 3 have none
    assert sorted(ported) == sorted(f"model.layers.{i}.{p}_adapters" for i in (0, 1) for p in ("attention", "output"))
    src = ad.modules["model.layers.0.output_adapters"]
    got = ported["model.layers.1.output_adapters"]
    assert torch.equal(got["W_down"][:, idx], src["W_down"]) and torch.equal(got["b_up"][idx], src["b_up"])
    out = str(tmp_path / "llm-adapter")
    save_bottleneck(out, ad.name, dict(ad.bn, leave_out=leave_out), ported, llm.config.to_dict(), 96, base=llm_dir)
    back = read_adapterhub(out)
    assert back.bn["reduction_factor"] == 24 and back.bn["leave_out"] == [2, 3]
    mods = attach_saved(llm, llm_arch, out)  # AdapterHub's width rule gives the same r = 4 on hidden 96
    assert (logits(llm) != 0).any()
    mods.detach()
    # tune-bridge: restrict to the kept residual coordinates, "tune", lift back
    kept = sorted(idx.tolist())
    bridge = restrict_sites(ported, kept)
    tuned = {m: {k: v + 0.01 for k, v in w.items()} for m, w in bridge.items()}
    lifted = lift_sites(ported, bridge, tuned, kept)
    again = restrict_sites(lifted, kept)
    assert all(torch.equal(again[m][k], tuned[m][k]) for m in tuned for k in tuned[m])
