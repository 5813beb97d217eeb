"""surgery tune-bridge on AdapterHub bottleneck adapters: restrict to the bridge, tune, lift back."""

import json

import pytest
import torch

from surgery.io.adapterhub import bn_config, read_adapterhub

from .conftest import run_cli
from .train_fixtures import one_thread, task  # noqa: F401 (pytest fixtures)


def _adapter(llm_dir, out, kind="houlsby"):
    """An LLM adapter as `surgery transfer` would leave it (random, with a visible effect)."""
    from surgery.kinds.bottleneck import save_bottleneck
    from surgery.train.bottleneck import attach_bottleneck
    from surgery.train.methods import load_base

    model, _, arch = load_base(llm_dir)
    bn = bn_config(kind, reduction_factor=16)
    mods = attach_bottleneck(model, arch, bn, name="task", seed=3)
    mods.detach()
    return save_bottleneck(out, "task", bn, mods.site_weights(), model.config.to_dict(), arch.dims["hidden"], base=llm_dir)


@pytest.fixture(scope="module")
def bridge(fx, tmp_path_factory):
    from fixtures.bridge import build_bridge

    return build_bridge(fx.model("llama"), str(tmp_path_factory.mktemp("bridge") / "llama"), fraction=0.5, seed=3)


@pytest.mark.parametrize("kind", ["houlsby", "pfeiffer"])
def test_output_differs_only_at_bridge_coordinates_and_evaluates_on_the_llm(fx, task, bridge, tmp_path, kind):
    llm = fx.model("llama")
    src = _adapter(llm, str(tmp_path / "src"), kind)
    out = tmp_path / "tuned"
    train, dev = task
    code, o, err = run_cli("tune-bridge", "--adapter", src, "--bridge", bridge, "--data", train, "--eval", dev,
                           "-o", out, "--epochs", "1", "--lr", "1e-2", "--batch-size", "16", "--json")
    assert code == 0, err
    s = json.loads(o)
    assert s["kind"] == "bottleneck" and s["after"]["loss"] < s["before"]["loss"]
    r = 64 // 16  # per site: W_down [r, 32], b_down [r], W_up [32, r], b_up [32] on the 32-wide bridge
    assert s["modules"] == {"houlsby": 4, "pfeiffer": 2}[kind] and s["trainable"] == s["modules"] * (2 * 32 * r + r + 32)
    a, b = read_adapterhub(src), read_adapterhub(str(out))
    assert b.bn == a.bn and b.config["hidden_size"] == 64 and set(b.modules) == set(a.modules)
    kept = json.load(open(f"{bridge}/bridge.json"))["kept"]["residual"]
    drop = [i for i in range(64) if i not in kept]
    changed = 0
    for m in a.modules:
        wa, wb = a.modules[m], b.modules[m]
        assert torch.equal(wa["W_down"][:, drop], wb["W_down"][:, drop])
        assert torch.equal(wa["W_up"][drop], wb["W_up"][drop]) and torch.equal(wa["b_up"][drop], wb["b_up"][drop])
        changed += int((wa["W_down"][:, kept] != wb["W_down"][:, kept]).sum() + (wa["W_up"][kept] != wb["W_up"][kept]).sum())
    assert changed > 0
    code, o, err = run_cli("eval", llm, "--adapter", out, "--data", dev, "--json")
    assert code == 0, err
    code, o0, err = run_cli("eval", llm, "--adapter", src, "--data", dev, "--json")
    assert json.loads(o)["loss"] != json.loads(o0)["loss"]


def test_a_bridge_that_keeps_everything_equals_training_on_the_llm(fx, task, tmp_path):
    """No pruning: tune-bridge must reproduce training the adapter on the LLM itself."""
    from fixtures.bridge import build_bridge
    from surgery.kinds.bottleneck import attach_saved
    from surgery.pipelines.tune_bridge import tune_bridge
    from surgery.train.bottleneck import WithBottleneck
    from surgery.train.data import load_examples
    from surgery.train.loop import TrainConfig, train_loop
    from surgery.train.methods import load_base

    llm = fx.model("llama")
    src = _adapter(llm, str(tmp_path / "src"))
    full = {"residual": list(range(64)), "layers": {"layers": [{"heads": [0, 1, 2, 3], "kv_heads": [0, 1]}] * 2}}
    br = build_bridge(llm, str(tmp_path / "bridge"), kept=full)
    cfg = TrainConfig(epochs=1, lr=1e-2, batch_size=16, seed=7)
    train, _ = task
    tune_bridge(src, br, train, str(tmp_path / "tuned"), cfg=cfg)

    model, tok, arch = load_base(llm)
    wb = WithBottleneck(model, attach_saved(model, arch, src))
    train_loop(wb, load_examples(train, tok, seq2seq=False), cfg, pad_id=0, seq2seq=False)
    direct = wb.bottleneck.site_weights()
    tuned = read_adapterhub(str(tmp_path / "tuned")).modules
    assert set(tuned) == set(direct)
    for m in tuned:
        for k in tuned[m]:
            assert torch.allclose(tuned[m][k], direct[m][k], atol=1e-6), (m, k)
    assert not torch.equal(tuned[m]["W_up"], read_adapterhub(src).modules[m]["W_up"])


def test_errors(fx, task, bridge, tmp_path):
    train, _ = task
    src = _adapter(fx.model("gpt2"), str(tmp_path / "g"))
    code, _, err = run_cli("tune-bridge", "--adapter", src, "--bridge", bridge, "--data", train, "-o", tmp_path / "o")
    assert code == 2 and "is a gpt2 adapter but the LLM is llama" in err
    wide = _adapter(fx.model("llama", hidden_size=96), str(tmp_path / "w"))
    code, _, err = run_cli("tune-bridge", "--adapter", wide, "--bridge", bridge, "--data", train, "-o", tmp_path / "o")
    assert code == 2 and "reads width [96] but the LLM's hidden size is 64" in err
    assert not (tmp_path / "o").exists()
