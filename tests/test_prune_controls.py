"""prune-bridge additions the evidence benchmark needed: a random-importance control, and llama
bridge widths that transformers' LlamaConfig accepts (hidden a multiple of the heads)."""

import json
import os

import pytest

from surgery.errors import ShapeError

from .test_prune import FAST, calib  # noqa: F401  (the shared calibration fixture)


def _arch(path):
    from surgery.arch import load_arch

    with open(os.path.join(path, "config.json")) as f:
        return load_arch(json.load(f))


@pytest.mark.parametrize("reduction", [4, 16, 64])
@pytest.mark.parametrize("residual", ["keep", "prune"])
def test_llama_bridge_widths_are_whole_heads_and_construct(fx, reduction, residual):
    from transformers import AutoConfig

    from surgery.arch import load_arch
    from surgery.pipelines.bridge_plan import bridge_config, parameter_counts, plan_sizes

    arch = _arch(fx.model("llama", hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32))
    sizes = plan_sizes(arch, reduction, {}, residual=residual)
    assert sizes["hidden"] % sizes["heads"] == 0 and 0 < sizes["hidden"] <= 128
    cfg = dict(bridge_config(arch, sizes))
    # the reduction is applied: about 1/R of the non-embedding parameters, or, where one kv group
    # of the residual-keeping bridge already costs more than that, the smallest widths there are
    share = parameter_counts(load_arch(cfg))["non_embedding"] / parameter_counts(arch)["non_embedding"]
    if residual == "prune" or reduction == 4:
        assert 0.9 < share * reduction < 1.2, share
        assert sizes["hidden"] == 128 if residual == "keep" else sizes["hidden"] < 128
    else:
        assert sizes == {"hidden": 128, "heads": 2, "kv_heads": 1, "intermediate": 1}
    AutoConfig.for_model(cfg.pop("model_type"), **cfg)  # LlamaConfig validates hidden % heads


def test_llama_r64_bridge_is_written_and_loads(fx, calib, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from surgery.pipelines.prune import prune_bridge

    llm = fx.model("llama", hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    r = prune_bridge(llm, tmp_path / "b", calib, reduction=64, residual="prune", **FAST)
    model, info = AutoModelForCausalLM.from_pretrained(r["output"], dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.hidden_size % model.config.num_attention_heads == 0


def test_llama_fixed_hidden_that_is_not_whole_heads_is_refused(fx, calib, tmp_path):
    from surgery.pipelines.prune import prune_bridge

    with pytest.raises(ShapeError, match="not a multiple of 2 heads"):
        prune_bridge(fx.model("llama"), tmp_path / "o", calib, hidden_size=31, num_attention_heads=2, residual="prune")


def test_random_importance_is_seeded_and_differs_from_magnitude(fx, calib, tmp_path):
    from surgery.pipelines.prune import prune_bridge

    llm = fx.model("llama")
    a = prune_bridge(llm, tmp_path / "a", calib, reduction=4, importance="random", seed=1, **FAST)
    b = prune_bridge(llm, tmp_path / "b", calib, reduction=4, importance="random", seed=1, **FAST)
    c = prune_bridge(llm, tmp_path / "c", calib, reduction=4, importance="random", seed=2, **FAST)
    m = prune_bridge(llm, tmp_path / "m", calib, reduction=4, importance="magnitude", seed=1, **FAST)
    assert a["importance"] == "random" and a["sizes"] == m["sizes"]
    assert a["kept"] == b["kept"]
    assert a["kept"] != c["kept"] and a["kept"] != m["kept"]
    with open(os.path.join(a["output"], "model.safetensors"), "rb") as f, \
            open(os.path.join(b["output"], "model.safetensors"), "rb") as g:
        assert f.read() == g.read()


@pytest.mark.parametrize("reduction", [4, 16])
def test_planned_depth_shares_the_reduction_with_heads_and_neurons(fx, reduction):
    """--drop-layers auto (the default): with the residual kept, depth is divided by the same factor
    as the kv groups and neurons, so no dimension is cut to a sliver (widths alone keep 1-2 neurons
    of 128 per layer at R 16 here); the bridge still holds about 1/R of the non-embedding parameters."""
    from surgery.arch import load_arch
    from surgery.pipelines.bridge_plan import bridge_config, parameter_counts, plan_bridge

    arch = _arch(fx.model("llama", num_hidden_layers=4, hidden_size=128, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=32, intermediate_size=384))
    wide, none = plan_bridge(arch, reduction, {}, "keep", 0)
    sizes, drop = plan_bridge(arch, reduction, {}, "keep", None)
    assert none == 0 and 1 <= 4 - drop < 4
    assert sizes["intermediate"] >= 3 * wide["intermediate"]
    n = parameter_counts(load_arch(bridge_config(arch, sizes, {"layers": list(range(4 - drop))})))["non_embedding"]
    assert 0.75 < n * reduction / parameter_counts(arch)["non_embedding"] < 1.33
    # the narrow bridge, explicit widths and an explicit count keep their depth
    assert plan_bridge(arch, reduction, {}, "prune", None)[1] == 0
    assert plan_bridge(arch, reduction, {"intermediate": 8}, "keep", None)[1] == 0
    assert plan_bridge(arch, reduction, {}, "keep", 1)[1] == 1


def test_drop_layers_auto_is_recorded_and_a_bad_count_is_refused(fx, calib, tmp_path):
    from surgery.pipelines.prune import prune_bridge

    llm = fx.model("llama", num_hidden_layers=4)
    r = prune_bridge(llm, tmp_path / "a", calib, reduction=16, **FAST)
    assert r["layers"]["drop_planned"] and r["layers"]["bridge"]["layers"] < 4
    assert sum(len(v) for v in r["layers"]["dropped"].values()) == 4 - r["layers"]["bridge"]["layers"]
    r0 = prune_bridge(llm, tmp_path / "b", calib, reduction=16, drop_layers=0, **FAST)
    assert not r0["layers"]["drop_planned"] and r0["layers"]["bridge"]["layers"] == 4
    with pytest.raises(ShapeError, match="neither 'auto' nor a count"):
        prune_bridge(llm, tmp_path / "c", calib, drop_layers="two")
    assert not os.path.exists(tmp_path / "c")
