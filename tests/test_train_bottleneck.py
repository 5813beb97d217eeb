"""surgery train --method bottleneck (Houlsby / Pfeiffer) and surgery eval --adapter on AdapterHub directories."""

import json

import pytest
import torch

from surgery.kinds.bottleneck import read_adapterhub

from .conftest import run_cli
from .train_fixtures import one_thread, task  # noqa: F401 (pytest fixtures)


@pytest.mark.parametrize("family,kind,rf,sites", [("gpt2", "houlsby", "8", 4), ("t5", "pfeiffer", "16", 4)])
def test_trains_saves_adapterhub_and_eval_reproduces(fx, task, tmp_path, family, kind, rf, sites):
    train, dev = task
    out = tmp_path / "a"
    code, o, err = run_cli("train", fx.model(family), "--data", train, "--eval", dev, "-o", out, "--method", "bottleneck",
                           "--adapter-config", kind, "--reduction-factor", rf, "--epochs", "1", "--lr", "3e-2",
                           "--batch-size", "16", "--json")
    assert code == 0, err
    s = json.loads(o)
    assert s["after"]["loss"] < s["before"]["loss"]
    r = 64 // int(rf)
    assert s["trainable"] == sites * (2 * 64 * r + r + 64)  # only the adapters train
    ad = read_adapterhub(str(out))
    assert ad.bn["reduction_factor"] == int(rf) and ad.name == "adapter" and len(ad.modules) == sites
    assert ad.bn["mh_adapter"] == (kind == "houlsby") and ad.config["model_name"] == fx.model(family)
    assert json.load(open(out / "training.json"))["adapter_config"] == kind
    code, o, err = run_cli("eval", fx.model(family), "--adapter", out, "--data", dev, "--json")
    assert code == 0, err
    e = json.loads(o)
    assert e["loss"] == pytest.approx(s["after"]["loss"], rel=1e-5) and e["correct"] == s["after"]["correct"]


def test_same_seed_same_bytes_and_base_untouched(fx, task, tmp_path):
    from surgery.pipelines.evaluate import evaluate
    from surgery.pipelines.train import train_adapter
    from surgery.train.loop import TrainConfig

    train, _ = task
    cfg = TrainConfig(epochs=1, lr=3e-2, batch_size=16)
    for name in ("a", "b"):
        train_adapter(fx.model("llama"), train, str(tmp_path / name), method="bottleneck", cfg=cfg)
    for f in ("adapter.safetensors", "pytorch_adapter.bin", "adapter_config.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    w = read_adapterhub(str(tmp_path / "a")).modules["model.layers.0.attention_adapters"]
    assert w["W_down"].shape == (4, 64) and torch.isfinite(w["W_up"]).all()  # default reduction factor 16
    plain = evaluate(fx.model("llama"), train)
    with_ad = evaluate(fx.model("llama"), train, adapter=str(tmp_path / "a"))
    assert with_ad["loss"] < plain["loss"]


def test_errors(fx, task, tmp_path):
    train, _ = task
    code, _, err = run_cli("train", fx.model("llama"), "--data", train, "-o", tmp_path / "o", "--method", "bottleneck",
                           "--adapter-config", "compacter")
    assert code == 2 and "unknown --adapter-config 'compacter'; choose one of houlsby, pfeiffer" in err
    assert not (tmp_path / "o").exists()
    ad = tmp_path / "g"
    assert run_cli("train", fx.model("gpt2"), "--data", train, "-o", ad, "--method", "adapter", "--epochs", "0.1")[0] == 0
    code, _, err = run_cli("eval", fx.model("llama"), "--adapter", ad, "--data", train)
    assert code == 2 and "is a gpt2 adapter but the model is llama" in err
