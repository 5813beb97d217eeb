"""surgery refine --layers: MeZO perturbs and updates only the chosen layers' adapter tensors.

The other tensors must come back bit for bit; every layer (the default, `all`, or a list naming every
layer) must give the bytes refine wrote before the flag existed; bad specs are one line and no output.
"""

import hashlib
import json
import os

import pytest
import torch

from .conftest import run_cli
from .test_prune import FAST, calib  # noqa: F401 (calib: pytest fixture)
from .train_fixtures import one_thread, task  # noqa: F401 (pytest fixtures)

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _refine(adapter, llm, task, out, *extra):
    train, dev = task
    return run_cli("refine", "--adapter", adapter, "--llm", llm, "--data", train, "--eval", dev, "-o", out,
                   "--steps", "10", "--lr", "1e-2", "--batch-size", "16", "--keep-last", "--json", *extra)


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _split(tensors: dict, layer: int):
    """(names in `layer`, names elsewhere) of an adapter's tensors, by their keys' layer prefix."""
    inside = {k for k in tensors if f".layers.{layer}." in k}
    return inside, set(tensors) - inside


def test_every_layer_is_refine_without_the_flag_byte_for_byte(fx, task, tmp_path):
    """No flag, `--layers all` and a list of every layer perturb the same tensors in the same order with the
    same z: the same bytes. One layer perturbs fewer tensors, so its z (and its adapter) differ: the check can fail."""
    llm, src = fx.model("llama"), fx.lora("llama", targets=TARGETS, name="layers")
    outs = {}
    for name, extra in (("none", ()), ("all", ("--layers", "all")), ("list", ("--layers", "0-1")),
                        ("comma", ("--layers", "1,0")), ("one", ("--layers", "1"))):
        code, o, err = _refine(src, llm, task, tmp_path / name, *extra)
        assert code == 0, err
        outs[name] = json.loads(o)
    sha = {n: _sha(tmp_path / n / "adapter_model.safetensors") for n in outs}
    assert sha["none"] == sha["all"] == sha["list"] == sha["comma"]
    assert sha["one"] != sha["none"]
    assert outs["none"]["layers"] == "all" and outs["list"]["layers"] == {"layers": [0, 1]}
    total = outs["none"]["trainable"]
    assert outs["list"]["trainable"] == outs["none"]["adapter_parameters"] == total
    assert outs["one"]["layers"] == {"layers": [1]} and 0 < outs["one"]["trainable"] < total
    log = json.load(open(tmp_path / "one" / "refine.json"))
    assert log["layers"] == {"layers": [1]} and log["trainable"] == outs["one"]["trainable"]
    assert log["adapter_parameters"] == total


def test_unselected_tensors_come_back_bit_identical(fx, task, tmp_path):
    from surgery.io.adapter import Adapter

    llm, src = fx.model("llama"), fx.lora("llama", targets=TARGETS, name="layers")
    code, o, err = _refine(src, llm, task, tmp_path / "out", "--layers", "1")
    assert code == 0, err
    s = json.loads(o)
    a, b = Adapter.open(src).tensors, Adapter.open(str(tmp_path / "out")).tensors
    moved, kept = _split(a, 1)
    assert moved and kept and set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in kept)
    assert all(not torch.equal(a[k], b[k]) for k in moved)
    assert s["trainable"] == sum(a[k].numel() for k in moved)
    assert s["after"]["loss"] != s["before"]["loss"]


@pytest.mark.parametrize("kind", ["houlsby", "pfeiffer"])
def test_bottleneck_sites_follow_their_layer(fx, task, tmp_path, kind):
    from fixtures import build_bottleneck
    from surgery.kinds.bottleneck import read_adapterhub

    llm = fx.model("llama")
    src = str(tmp_path / "src")
    build_bottleneck(llm, src, kind=kind)
    code, o, err = _refine(src, llm, task, tmp_path / "out", "--layers", "0")
    assert code == 0, err
    a, b = read_adapterhub(src), read_adapterhub(str(tmp_path / "out"))
    layer = {m: a.placements[m][1] for m in a.modules}
    assert set(layer.values()) == {0, 1}
    for m, w in a.modules.items():
        same = [torch.equal(w[k], b.modules[m][k]) for k in w]
        assert all(same) if layer[m] == 1 else not any(same), (m, same)
    assert json.loads(o)["trainable"] == sum(t.numel() for m, w in a.modules.items() if layer[m] == 0 for t in w.values())


def test_untuned_reads_the_layers_the_bridge_dropped(fx, task, calib, tmp_path):  # noqa: F811
    """A tune-bridge output whose bridge kept LLM layer 1 alone: `untuned` refines layer 0 and gives back
    layer 1's tuned tensors as they are; the same bytes as `--layers 0`."""
    from surgery.io.adapter import Adapter
    from surgery.pipelines.prune import prune_bridge
    from surgery.pipelines.tune_bridge import tune_bridge
    from surgery.train.loop import TrainConfig

    llm = fx.model("llama")
    bridge = tmp_path / "bridge"
    prune_bridge(llm, bridge, calib, reduction=1, drop_layers=1, drop_by="first", **FAST)
    tuned = str(tmp_path / "tuned")
    tune_bridge(fx.lora("llama", targets=TARGETS, name="layers"), str(bridge), task[0], tuned,
                cfg=TrainConfig(epochs=1, lr=1e-2, batch_size=16, seed=0, progress=False))
    code, o, err = _refine(tuned, llm, task, tmp_path / "untuned", "--layers", "untuned")
    assert code == 0, err
    assert json.loads(o)["layers"] == {"layers": [0]}
    code, _, err = _refine(tuned, llm, task, tmp_path / "zero", "--layers", "0")
    assert code == 0, err
    assert _sha(tmp_path / "untuned" / "adapter_model.safetensors") == _sha(tmp_path / "zero" / "adapter_model.safetensors")
    a, b = Adapter.open(tuned).tensors, Adapter.open(str(tmp_path / "untuned")).tensors
    moved, kept = _split(a, 0)
    assert all(torch.equal(a[k], b[k]) for k in kept) and not any(torch.equal(a[k], b[k]) for k in moved)


def test_bad_specs_are_one_line_and_write_nothing(fx, task, tmp_path):
    llm, src = fx.model("llama"), fx.lora("llama", targets=TARGETS, name="layers")
    only0 = fx.lora("llama", targets=TARGETS, name="layer0", layers_to_transform=[0])
    cases = [
        ((src, "x"), "cannot read 'x'"),
        ((src, "2-1"), "cannot read '2-1'"),
        ((src, "0,"), "cannot read ''"),
        ((src, "-1"), "cannot read '-1'"),
        ((src, "2"), "layer 2 is out of range (the LLM has 2 layers: 0-1)"),
        ((src, "0-5"), "layer 5 is out of range"),
        ((src, "decoder:0"), "the LLM has no stack 'decoder'"),
        ((src, "untuned"), "tune_bridge.json is missing"),
        ((only0, "1"), "the adapter has no tensor in those layers"),
    ]
    for (adapter, spec), msg in cases:
        code, _, err = _refine(adapter, llm, task, tmp_path / "o", "--layers", spec)
        assert code != 0 and msg in err and len(err.strip().splitlines()) == 1, (spec, err)
        assert not os.path.exists(tmp_path / "o") and not [p for p in os.listdir(tmp_path) if p != "o"], spec


@pytest.mark.parametrize("dropped", [[-1], [True], [0.0], "0", {"0": 1}])
def test_untuned_refuses_a_tampered_bridge_json(fx, task, tmp_path, dropped):
    """bridge.json comes with the adapter: a negative, boolean, float or non-list layer index is one error line."""
    import shutil

    llm, src = fx.model("llama"), fx.lora("llama", targets=TARGETS, name="layers")
    tuned, bridge = tmp_path / "tuned", tmp_path / "bridge"
    shutil.copytree(src, tuned)
    bridge.mkdir()
    (bridge / "bridge.json").write_text(json.dumps({"layers": {"dropped": {"layers": dropped}}}))
    (tuned / "tune_bridge.json").write_text(json.dumps({"bridge": str(bridge)}))
    code, _, err = _refine(str(tuned), llm, task, tmp_path / "o", "--layers", "untuned")
    assert code != 0 and "malformed" in err and len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "o")
