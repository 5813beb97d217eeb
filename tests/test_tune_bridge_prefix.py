"""prune-bridge --drop-by first and tune-bridge --prefix: the kept layers read the LLM's own hidden state."""

import json

import pytest

from .conftest import run_cli
from .test_prune import FAST, calib  # noqa: F401 (calib: pytest fixture)
from .test_prune_layers import noop  # noqa: F401 (pytest fixture)
from .train_fixtures import one_thread, task  # noqa: F401 (pytest fixtures)

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def first_dropped(fx, calib, tmp_path_factory):  # noqa: F811
    """Every width kept, LLM layer 0 of 2 dropped: the bridge is LLM layer 1 alone."""
    from surgery.pipelines.prune import prune_bridge

    out = tmp_path_factory.mktemp("prefix") / "bridge"
    r = prune_bridge(fx.model("llama"), out, calib, reduction=1, drop_layers=1, drop_by="first", **FAST)
    assert r["layers"]["dropped"] == {"layers": [0]} and r["layers"]["drop_by"] == "first"
    return str(out)


def test_prefix_reproduces_training_the_kept_layer_on_the_llm(fx, task, first_dropped, tmp_path):  # noqa: F811
    """With every width kept, the bridge fed the LLM's layer-0 output is the LLM itself: tuning it must equal
    LoRA training on the LLM with layer 0's adapter frozen, and the lift must leave layer 0's adapter as given."""
    import torch
    from peft import PeftModel

    from surgery.io.adapter import Adapter
    from surgery.pipelines.tune_bridge import tune_bridge
    from surgery.train.data import load_examples
    from surgery.train.loop import TrainConfig, train_loop
    from surgery.train.methods import load_base

    llm = fx.model("llama")
    src = fx.lora("llama", targets=TARGETS, name="prefix")
    cfg = TrainConfig(epochs=1, lr=1e-2, batch_size=16, seed=7)
    train, dev = task
    s = tune_bridge(src, first_dropped, train, str(tmp_path / "tuned"), eval_data=dev, cfg=cfg, prefix=True)
    assert json.loads((tmp_path / "tuned" / "tune_bridge.json").read_text())["prefix_layers"] == 1
    assert not [p for p in tmp_path.iterdir() if "prefix" in p.name]  # the stored states are removed

    model, tok, _ = load_base(llm)
    pm = PeftModel.from_pretrained(model, src, is_trainable=True)
    for n, p in pm.named_parameters():
        p.requires_grad_("lora_" in n and ".layers.1." in n)
    train_loop(pm, load_examples(train, tok, seq2seq=False), cfg, pad_id=0, seq2seq=False)
    direct = {k.replace(".default", ""): v for k, v in pm.state_dict().items() if "lora_" in k}
    given, tuned = Adapter.open(src).tensors, Adapter.open(str(tmp_path / "tuned")).tensors
    assert set(tuned) == set(direct)
    for k, v in tuned.items():
        if ".layers.0." in k:
            assert torch.equal(v, given[k]), k
        else:
            assert torch.allclose(v, direct[k], atol=1e-6), k
            assert not torch.equal(v, given[k]) or "lora_B" in k
    # on the bridge before tuning = the LLM with the adapter: the same dev loss
    from surgery.train.score import evaluate_examples

    base = PeftModel.from_pretrained(load_base(llm)[0], src)
    ref = evaluate_examples(base, load_examples(dev, tok, seq2seq=False), batch_size=16, pad_id=0, seq2seq=False)
    assert abs(s["before"]["loss"] - ref["loss"]) < 1e-5


def test_an_empty_prefix_is_a_plain_tune(fx, task, calib, noop, tmp_path):  # noqa: F811
    """A bridge that keeps the LLM's layer 0 (nothing dropped, or a later layer dropped) computes the LLM's hidden
    state there itself, the embedding output: --prefix is then a plain tune, byte for byte, said in one note."""
    from surgery.io.adapter import Adapter
    from surgery.pipelines.prune import prune_bridge

    train, _ = task
    src = fx.lora("llama", targets=TARGETS, name="prefix-e")
    last, whole = tmp_path / "last", tmp_path / "whole"
    prune_bridge(noop, last, calib, reduction=1, drop_layers=1, **FAST)  # the identity layer 1 is the one dropped
    prune_bridge(fx.model("llama"), whole, calib, reduction=2, drop_layers=0, **FAST)
    for bridge in (last, whole):
        outs = {}
        for flag in ("--prefix", None):
            out = tmp_path / f"{bridge.name}-{flag}"
            code, _, err = run_cli("tune-bridge", "--adapter", src, "--bridge", bridge, "--data", train, "-o", out,
                                   "--epochs", "1", "--batch-size", "32", *([flag] if flag else []))
            assert code == 0, err
            assert ("the prefix is empty, this is a plain tune" in err) == bool(flag), err
            outs[flag] = Adapter.open(str(out)).tensors
            assert json.loads((out / "tune_bridge.json").read_text())["prefix_layers"] == 0
        assert outs["--prefix"].keys() == outs[None].keys()
        assert all(v.equal(outs[None][k]) for k, v in outs["--prefix"].items())


def test_prefix_is_refused_where_it_cannot_be_honoured(fx, task, calib, tmp_path):  # noqa: F811
    """A narrow residual cannot take the LLM's hidden state (even at layer 0: the bridge's embedding is a slice of
    the LLM's), and GPT-2's stored state already holds the position embeddings the bridge would add again."""
    from surgery.pipelines.prune import prune_bridge

    train, _ = task
    narrow, gpt2 = tmp_path / "narrow", tmp_path / "gpt2"
    prune_bridge(fx.model("llama"), narrow, calib, reduction=2, residual="prune", drop_layers=0, **FAST)
    prune_bridge(fx.model("gpt2"), gpt2, calib, reduction=1, drop_layers=1, drop_by="first", **FAST)
    for bridge, src, says in ((narrow, fx.lora("llama", targets=TARGETS, name="prefix-n"), "residual is 48 wide, the LLM's 64"),
                              (gpt2, fx.lora("gpt2", name="prefix-g"), "adds transformer.wpe.weight to the token embedding")):
        code, _, err = run_cli("tune-bridge", "--adapter", src, "--bridge", bridge, "--data", train, "-o", tmp_path / "o",
                               "--prefix")
        assert code == 2 and says in err, err
        assert not (tmp_path / "o").exists()


def test_states_are_written_in_shards(fx, task, tmp_path, monkeypatch):  # noqa: F811
    """The prefix pass writes a shard every SHARD_BYTES instead of holding every record's state until the
    end; what the bridge reads back is the same whatever the shard size."""
    import torch

    import surgery.pipelines.bridge_prefix as bp
    from surgery.kinds import kind_of
    from surgery.train.data import collate, load_examples
    from surgery.train.methods import load_base

    llm, src = fx.model("llama"), fx.lora("llama", targets=TARGETS, name="prefix-s")
    _, tok, _ = load_base(llm)
    examples = load_examples(task[0], tok, seq2seq=False)[:12]
    kind = kind_of(src, "tune-bridge")
    read = {}
    for shard_bytes in (bp.SHARD_BYTES, 1):
        monkeypatch.setattr(bp, "SHARD_BYTES", shard_bytes)
        path = str(tmp_path / f"states-{shard_bytes}")
        index = bp.write_states(llm, src, kind, [examples], 1, path, pad_id=0, batch_size=5)
        shards = sorted(p.name for p in (tmp_path / f"states-{shard_bytes}").iterdir())
        assert len(shards) == (1 if shard_bytes > 1 else 3), shards  # 1 byte: a shard per batch of 5, 5, 2
        read[shard_bytes] = bp.cached_prefix(path, index, torch.float32)(collate(examples, 0, False)["input_ids"])
    assert torch.equal(read[1], read[max(read)])


def test_prefix_holds_neither_the_bridge_during_the_pass_nor_its_embedding_while_training(fx, task, first_dropped,
                                                                                          tmp_path, monkeypatch):  # noqa: F811
    """The prefix pass runs before the bridge is loaded (it holds the LLM and a shard), and the bridge trains
    without its token embedding, which nothing reads under --prefix; the result is unchanged by either."""
    import gc
    import os
    import weakref
    from pathlib import Path

    import surgery.pipelines.bridge_prefix as bp
    import surgery.pipelines.tune_bridge as tb
    import surgery.train.methods as methods
    from surgery.train.loop import TrainConfig

    src = fx.lora("llama", targets=TARGETS, name="prefix-h")
    train, dev = task
    embeddings, seen = [], {}
    load, write, fit = methods.load_base, bp.write_states, tb.fit

    def loading(path, placement=None):
        model, tok, arch = load(path, placement)
        if os.path.samefile(path, first_dropped):
            embeddings.append(weakref.ref(model.get_input_embeddings().weight))
        return model, tok, arch

    def writing(*a, **k):
        seen["bridge loaded at the pass"] = bool(embeddings)
        return write(*a, **k)

    def fitting(pm, *a, **k):
        gc.collect()
        seen["embedding alive at fit"] = any(r() is not None for r in embeddings)
        seen["embedding parameters"] = sum(p.numel() for p in pm.get_input_embeddings().parameters())
        return fit(pm, *a, **k)

    monkeypatch.setattr(methods, "load_base", loading)
    monkeypatch.setattr(tb, "load_base", loading)
    monkeypatch.setattr(bp, "write_states", writing)
    monkeypatch.setattr(tb, "fit", fitting)
    s = tb.tune_bridge(src, first_dropped, train, str(tmp_path / "tuned"), eval_data=dev, prefix=True,
                       cfg=TrainConfig(epochs=1, lr=1e-2, batch_size=16, seed=3))
    assert embeddings and seen == {"bridge loaded at the pass": False, "embedding alive at fit": False,
                                   "embedding parameters": 0}
    vocab, hidden = (json.loads((Path(first_dropped) / "config.json").read_text())[k] for k in ("vocab_size", "hidden_size"))
    assert s["bridge_parameters"] == json.loads((Path(first_dropped) / "bridge.json").read_text())["parameters"]["bridge"] - vocab * hidden
