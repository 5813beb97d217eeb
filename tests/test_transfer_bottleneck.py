"""surgery transfer for AdapterHub bottleneck adapters: the exact-expansion property, as for LoRA."""

import json

import pytest
import torch

from surgery.arch import load_arch
from surgery.errors import AdapterError
from surgery.io.adapterhub import bn_config, read_adapterhub
from surgery.kinds.bottleneck import attach_saved, save_bottleneck
from surgery.train.bottleneck import attach_bottleneck

from .conftest import run_cli
from .test_transfer import FAST, calib, expanded, ids  # noqa: F401  (module fixtures)


def _model(path):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return m, load_arch(m.config.to_dict())


def _logits(path, ids, adapter=None):
    m, arch = _model(path)
    mods = attach_saved(m, arch, adapter) if adapter else None
    with torch.no_grad():
        out = m(input_ids=ids).logits
    if mods:
        mods.detach()
    return out


@pytest.fixture(scope="module")
def slm_adapter(fx, tmp_path_factory):
    """(family, kind) -> an SLM adapter with a clear effect (bert init, W_up scaled up), saved as AdapterHub does."""
    cache = {}

    def get(family, kind):
        if (family, kind) not in cache:
            m, arch = _model(fx.model(family))
            bn = bn_config(kind, reduction_factor=8)
            mods = attach_bottleneck(m, arch, bn, seed=3)
            with torch.no_grad():
                for a in mods.adapters.values():
                    a.adapter_up.weight.mul_(20)
                    a.adapter_up.bias.normal_(0, 0.05, generator=torch.Generator().manual_seed(4))
            mods.detach()
            out = str(tmp_path_factory.mktemp("bn") / f"{family}-{kind}")
            save_bottleneck(out, "task", bn, mods.site_weights(), m.config.to_dict(), arch.dims["hidden"],
                            base=fx.model(family))
            cache[(family, kind)] = out
        return cache[(family, kind)]

    return get


def _relative_error(slm, ad, llm, out, ids):
    base, want, got = _logits(slm, ids), _logits(slm, ids, ad), _logits(llm, ids, out)
    effect = (want - base).norm()
    assert effect > 1e-2  # the adapter does something
    return float((got - want).norm() / effect)


@pytest.mark.parametrize("family,kind,width,depth", [("llama", "houlsby", 2, 2), ("gpt2", "houlsby", 2, 2),
                                                     ("llama", "pfeiffer", 2, 1)], ids=str)
def test_exact_expansion_reproduces_the_adapter(fx, tmp_path, calib, ids, expanded, slm_adapter,  # noqa: F811
                                                family, kind, width, depth):
    """LLM = SLM hidden at permuted positions (GQA groups intact) + pass-through layers: within 1 %."""
    from surgery.pipelines.transfer import transfer

    slm, llm, ad = fx.model(family), expanded(family, width, depth), slm_adapter(family, kind)
    out = str(tmp_path / "out")
    info = transfer(ad, llm, out, data=calib, **FAST)
    assert info["kind"] == "bottleneck"
    assert _relative_error(slm, ad, llm, out, ids) < 0.01
    back = read_adapterhub(out)
    src = read_adapterhub(ad)
    n_llm = load_arch(json.load(open(f"{llm}/config.json"))).stacks
    assert len(back.modules) == len(src.modules) * depth  # every LLM layer of a block carries the adapter
    assert back.bn["reduction_factor"] == 8 * width and back.config["hidden_size"] == 64 * width
    assert {w["W_down"].shape[0] for w in back.modules.values()} == {8}  # bottleneck width r kept
    assert back.config["model_name"] == llm and sum(n_llm.values()) == 2 * depth
    if depth > 1:  # pass-through layers write nothing, so their adapters are zero
        silent = [m for m, (_, j, _) in back.placements.items() if j % depth]
        assert silent and all(float(back.modules[m]["W_up"].abs().max()) == 0 for m in silent)


def test_depth_first_leaves_the_other_layers_out(fx, tmp_path, calib, expanded, slm_adapter):  # noqa: F811
    from surgery.pipelines.transfer import transfer

    out = str(tmp_path / "out")
    info = transfer(slm_adapter("llama", "houlsby"), expanded("llama", 2, 2), out, data=calib, depth="first", **FAST)
    assert info["layers_used"] == {"layers": [[0], [2]]}
    back = read_adapterhub(out)
    assert back.bn["leave_out"] == [1, 3] and {j for _, j, _ in back.placements.values()} == {0, 2}


def test_cli_and_errors(fx, tmp_path, calib, expanded, slm_adapter):  # noqa: F811
    ad = slm_adapter("gpt2", "houlsby")
    code, out, err = run_cli("transfer", "--slm", ad, "--llm", expanded("gpt2", 2, 2), "-o", tmp_path / "o",
                             "--data", calib, "--samples", "8", "--seq-len", "32")
    assert code == 0, err
    assert "bottleneck →" in out and "out.attn" in out and "to_slm" in out
    code, _, err = run_cli("transfer", "--slm", ad, "--llm", fx.model("llama"), "-o", tmp_path / "o2", "--data", calib)
    assert code != 0 and "gpt2" in err and "llama" in err and "family" in err
    from surgery.pipelines.transfer import transfer

    with pytest.raises(AdapterError, match="reads width \\[64\\] but the SLM's hidden size is 128"):
        transfer(ad, expanded("gpt2", 2, 2), str(tmp_path / "o3"), slm_base=expanded("gpt2", 2, 2), data=calib, **FAST)
