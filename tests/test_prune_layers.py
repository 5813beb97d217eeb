"""prune-bridge --drop-layers: whole layers left out (ranked by block similarity or a layer mask's
Fisher), the bridge renumbered as a standard checkpoint, and tune-bridge leaving a dropped layer's
adapter as it was."""

import json
import os
import warnings

import pytest

from .test_prune import FAST, _ids, _load, _logits, calib  # noqa: F401 (calib: pytest fixture)
from .train_fixtures import one_thread, task  # noqa: F401 (pytest fixtures)


def _noop_layer(src: str, out: str, layer: int) -> str:
    """A copy of a llama fixture whose `layer` writes nothing into the residual stream (an identity)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[layer].self_attn.o_proj.weight.zero_()
        model.model.layers[layer].mlp.down_proj.weight.zero_()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def noop(fx, tmp_path_factory):
    return _noop_layer(fx.model("llama"), str(tmp_path_factory.mktemp("noop") / "llm"), layer=1)


@pytest.mark.parametrize("drop_by", ["similarity", "fisher"])
def test_a_no_op_layer_is_the_one_dropped_and_nothing_changes(noop, calib, tmp_path, drop_by):
    """Keeping every width and dropping an identity layer reproduces the LLM exactly."""
    import torch

    from surgery.pipelines.prune import prune_bridge

    r = prune_bridge(noop, tmp_path / "b", calib, reduction=1, drop_layers=1, drop_by=drop_by, **FAST)
    assert r["layers"]["dropped"] == {"layers": [1]} and r["layers"]["bridge"] == {"layers": 1}
    assert r["kept"]["layers"]["layers"][1] is None and r["layers"]["scores"]["layers"][1] < 1e-12
    bridge = _load(tmp_path / "b")  # no missing or unexpected keys
    assert bridge.config.num_hidden_layers == 1
    ids = _ids()
    torch.testing.assert_close(_logits(bridge, ids), _logits(_load(noop), ids), rtol=1e-5, atol=1e-5)
    assert r["parameters"]["bridge_non_embedding"] < r["parameters"]["llm_non_embedding"] / 1.9


@pytest.mark.parametrize("family", ["mistral", "gpt2", "t5"])
def test_dropping_the_first_layer_renumbers_and_loads(fx, calib, tmp_path, monkeypatch, family):
    """Bridge layer 0 is LLM layer 1 (sliced); T5's relative position bias, which only layer 0 holds
    and every layer uses, moves to the bridge's new first layer; per-layer config lists follow."""
    import torch

    from surgery.arch import load_arch
    from surgery.io.checkpoint import Checkpoint
    from surgery.pipelines import prune
    from surgery.pipelines.bridge_plan import layer_kept
    from surgery.ops.slice import select

    monkeypatch.setattr(prune, "choose_dropped", lambda arch, scores, n: {st: [0] for st in arch.stacks})
    llm = fx.model(family)
    r = prune.prune_bridge(llm, tmp_path / "b", calib, reduction=2, drop_layers=1, **FAST)
    model = _load(tmp_path / "b")
    assert torch.isfinite(_logits(model, _ids())).all()
    src, out = Checkpoint.open(llm), Checkpoint.open(tmp_path / "b")
    arch = load_arch(src.config)
    for t in arch.stored_tensors():
        if t.stack is None or t.layer != 1:
            continue
        prefix = arch.spec["stacks"][t.stack]["prefix"]
        bname = prefix.format(i=0) + t.name[len(prefix.format(i=1)):]
        want = select(src.read(t.name), arch, t.dims, layer_kept(r["kept"], t.stack, 1))
        assert torch.equal(out.read(bname), want), t.name
    if family == "t5":
        name = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        t = arch.by_name()[name]
        assert torch.equal(out.read(name), select(src.read(name), arch, t.dims, layer_kept(r["kept"], "encoder", 1)))
    if "layer_types" in src.config:
        assert out.config["layer_types"] == src.config["layer_types"][1:]


@pytest.mark.parametrize("dropped", [0, 1])
def test_tune_bridge_leaves_a_dropped_layers_adapter_as_given(fx, calib, task, tmp_path, monkeypatch, dropped):
    """Dropping layer 0 renumbers layer 1 to 0 in the bridge, so its per-layer rank must follow."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from surgery.io.adapter import Adapter
    from surgery.pipelines import prune
    from surgery.pipelines.tune_bridge import tune_bridge
    from surgery.train.loop import TrainConfig

    from fixtures import build_lora

    monkeypatch.setattr(prune, "choose_dropped", lambda arch, scores, n: {"layers": [dropped]})
    llm = fx.model("llama")
    src = str(tmp_path / "lora")  # a per-layer rank pattern: layer indices move in the bridge
    build_lora(llm, src, targets=["q_proj", "v_proj", "down_proj"], r=4, rank_pattern={"model.layers.1.mlp.down_proj": 2})
    prune.prune_bridge(llm, tmp_path / "b", calib, reduction=2, drop_layers=1, **FAST)
    train, dev = task
    with warnings.catch_warnings(record=True) as caught:  # a pattern for a dropped layer: peft must not warn
        warnings.simplefilter("always")
        s = tune_bridge(src, str(tmp_path / "b"), train, str(tmp_path / "tuned"), eval_data=dev, prefix=False,
                        cfg=TrainConfig(epochs=1, lr=1e-2, batch_size=16, seed=0))
    assert not [str(w.message) for w in caught if "peft" in w.filename], [str(w.message) for w in caught]
    assert s["modules"] == 3 and s["after"]["loss"] < s["before"]["loss"]
    a, b = Adapter.open(src), Adapter.open(str(tmp_path / "tuned"))
    assert a.config == b.config and set(a.tensors) == set(b.tensors)
    assert a.tensors["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"].shape[0] == 2
    for k in a.tensors:  # the dropped layer keeps its adapter bit for bit; the other was tuned
        assert torch.equal(a.tensors[k], b.tensors[k]) == (f".layers.{dropped}." in k), k
    base = AutoModelForCausalLM.from_pretrained(llm, dtype=torch.float32)
    PeftModel.from_pretrained(base, str(tmp_path / "tuned"))  # loads on the LLM


def test_bottleneck_sites_of_a_dropped_layer_stay_as_given(fx, noop, calib, task, tmp_path):
    import torch

    from surgery.kinds.bottleneck import read_adapterhub
    from surgery.pipelines.prune import prune_bridge
    from surgery.pipelines.tune_bridge import tune_bridge
    from surgery.train.loop import TrainConfig

    from .test_tune_bridge_bottleneck import _adapter  # noqa: E402

    src = _adapter(noop, str(tmp_path / "src"), "houlsby")
    prune_bridge(noop, tmp_path / "b", calib, reduction=2, drop_layers=1, **FAST)
    train, _ = task
    s = tune_bridge(src, str(tmp_path / "b"), train, str(tmp_path / "tuned"),
                    cfg=TrainConfig(epochs=1, lr=1e-2, batch_size=16, seed=0))
    assert s["modules"] == 4
    a, b = read_adapterhub(src), read_adapterhub(str(tmp_path / "tuned"))
    assert set(a.modules) == set(b.modules)
    for m in a.modules:
        same = all(torch.equal(a.modules[m][k], b.modules[m][k]) for k in a.modules[m])
        assert same == (".layers.1." in m), m
    assert os.path.exists(tmp_path / "tuned" / "tune_bridge.json")
    json.loads((tmp_path / "b" / "bridge.json").read_text())


def test_fisher_streams_through_accelerate_disk_offload(fx, calib, tmp_path):
    """The 70B plan (docs/prune-bridge.md): accelerate offloads blocks to disk under a --max-memory
    budget and the block-wise recompute runs through its hooks, giving the same scores."""
    import torch

    from surgery.arch import load_arch
    from surgery.pipelines import importance as imp
    from surgery.io.model import load_model
    from surgery.pipelines.calibration import token_blocks

    path = fx.model("llama")
    arch = load_arch(json.loads(open(os.path.join(path, "config.json")).read()))
    blocks, _ = token_blocks(path, calib, 4, 16, 0)
    want = imp.fisher_mask(load_model(path), arch, blocks, batch_size=4)
    model = load_model(path, dispatch="gpu", max_memory={"cpu": "250KB"}, offload_folder=str(tmp_path / "off"))
    assert "disk" in model.hf_device_map.values()
    got = imp.fisher_mask(model, arch, blocks, batch_size=4)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-12)


def test_max_memory_flag_offloads_and_writes_the_same_bridge(fx, calib, tmp_path):
    from .conftest import run_cli
    from .test_prune import _digest

    llm = fx.model("llama")
    args = ["--data", calib, "--reduction", "4", "--samples", "4", "--seq-len", "32", "--json"]
    assert run_cli("prune-bridge", llm, "-o", tmp_path / "a", *args)[0] == 0
    code, _, err = run_cli("prune-bridge", llm, "-o", tmp_path / "b", "--max-memory", "cpu=250KB", *args)
    assert code == 0, err
    a, b = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert a == b and not any(".offload" in k for k in b)
    code, _, err = run_cli("prune-bridge", llm, "-o", tmp_path / "c", "--max-memory", "cpu", *args)
    assert code != 0 and "is not DEVICE=SIZE" in err
