"""Bottleneck adapters hooked into unmodified transformers models of every family."""

import pytest
import torch

from surgery.arch import load_arch
from surgery.errors import AdapterError
from surgery.io.adapterhub import bn_config
from surgery.train.bottleneck import attach_bottleneck

from .conftest import FAMILY_NAMES


def load(path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cfg = AutoConfig.from_pretrained(path)
    cls = AutoModelForSeq2SeqLM if cfg.is_encoder_decoder else AutoModelForCausalLM
    m = cls.from_pretrained(path, dtype=torch.float32).eval()
    return m, load_arch(m.config.to_dict())


def logits(m):
    ids = torch.tensor([[5, 17, 9, 40, 2, 77]])
    kw = {"decoder_input_ids": ids[:, :4]} if m.config.is_encoder_decoder else {}
    with torch.no_grad():
        return m(input_ids=ids, **kw).logits


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_zero_up_leaves_logits_unchanged_and_random_changes_them(fx, family):
    m, arch = load(fx.model(family))
    ref = logits(m)
    n_layers = sum(arch.stacks.values())
    for kind in ("houlsby", "pfeiffer"):
        bn = bn_config(kind, reduction_factor=8, cross_adapter=len(arch.stacks) > 1)
        mods = attach_bottleneck(m, arch, bn, init="mam_adapter", seed=1)  # W_up = 0, b_up = 0
        per_layer = {"houlsby": 2, "pfeiffer": 1}[kind]
        assert len(mods.sites) == per_layer * n_layers + (arch.stacks.get("decoder", 0) if bn["cross_adapter"] else 0)
        assert all(a.adapter_down[0].weight.shape == (8, 64) for a in mods.adapters.values())
        assert torch.equal(logits(m), ref)
        with torch.no_grad():
            for a in mods.adapters.values():
                a.adapter_up.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
        assert (logits(m) - ref).abs().max() > 1e-3
        assert not any("adapter" in k for k in m.state_dict())  # nothing added to the model itself
        mods.detach()
        assert torch.equal(logits(m), ref)


def _capture(m, arch, site):
    """x entering the site's sublayer and its output h, on the plain model."""
    got = {}
    a = m.get_submodule(site.residual).register_forward_pre_hook(lambda mod, args: got.__setitem__("x", args[0]))
    b = m.get_submodule(site.output).register_forward_hook(
        lambda mod, args, out: got.__setitem__("h", out if isinstance(out, torch.Tensor) else out[0]))
    logits(m)
    a.remove(), b.remove()
    return got["x"], got["h"]


@pytest.mark.parametrize("kind", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_one_adapter_changes_logits_as_computed_by_hand(fx, family, kind):
    m, arch = load(fx.model(family))
    last = [s for s in arch.bottleneck_sites() if s.placement == "output_adapter"][-1]  # feeds the final norm
    x, h = _capture(m, arch, last)
    bn = bn_config(kind, reduction_factor=16, mh_adapter=False, leave_out=[0], non_linearity="swish")
    mods = attach_bottleneck(m, arch, bn, init="bert", seed=3)
    assert list(mods.sites) == [last.module]
    with torch.no_grad():
        mods.adapters[last.module.replace(".", "-")].adapter_up.bias.normal_(0, 0.1)
    w = mods.site_weights()[last.module]
    f = lambda z: torch.nn.functional.silu(z @ w["W_down"].T + w["b_down"]) @ w["W_up"].T + w["b_up"]  # noqa: E731
    # Houlsby: y = x + h + f(h); Pfeiffer: y = (x + h) + f(x + h)
    y = x + h + f(h) if kind == "houlsby" else (x + h) + f(x + h)
    final_norm = m.model.norm if family == "llama" else m.transformer.ln_f
    with torch.no_grad():
        want = m.lm_head(final_norm(y))
    assert torch.allclose(logits(m), want, atol=1e-5)
    mods.detach()


def test_loaded_weights_must_match_the_sites(fx):
    m, arch = load(fx.model("llama"))
    bn = bn_config("pfeiffer", reduction_factor=16)
    mods = attach_bottleneck(m, arch, bn, init="bert")
    w = mods.site_weights()
    mods.detach()
    with pytest.raises(AdapterError, match="missing: \\['model.layers.0.attention_adapters'"):
        attach_bottleneck(m, arch, bn_config("houlsby", reduction_factor=16), weights=w)
    again = attach_bottleneck(m, arch, bn, weights=w)
    assert w and set(again.site_weights()) == set(w)  # every site came back (an empty dict would pass all())
    assert all(torch.equal(again.site_weights()[k]["W_up"], w[k]["W_up"]) for k in w)
    again.detach()
