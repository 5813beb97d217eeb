"""tune-bridge --rank: the kept layers' LoRA modules grow before tuning, the start's delta and scaling unchanged."""

import json

import pytest

from .conftest import run_cli
from .test_prune import FAST, calib  # noqa: F401 (calib: pytest fixture)
from .train_fixtures import one_thread, task  # noqa: F401 (pytest fixtures)

TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def last_layer(fx, calib, tmp_path_factory):  # noqa: F811
    """LLM layer 0 of 2 dropped (--drop-by first), layer 1 pruned to half its neurons: the bridge is layer 1."""
    from surgery.pipelines.prune import prune_bridge

    out = tmp_path_factory.mktemp("rank") / "bridge"
    prune_bridge(fx.model("llama"), out, calib, reduction=1, drop_layers=1, drop_by="first", intermediate_size=64, **FAST)
    return str(out)


def test_grow_rank_by_hand():
    import torch

    from surgery.ops.lora import grow_rank

    A, B = torch.randn(3, 50), torch.randn(7, 3)
    A2, B2 = grow_rank(A, B, 8, torch.Generator().manual_seed(0))
    assert A2.shape == (8, 50) and B2.shape == (7, 8)
    assert torch.equal(A2[:3], A) and torch.equal(B2[:, :3], B) and not B2[:, 3:].any()
    assert torch.allclose(B2 @ A2, B @ A, atol=1e-6)
    new = A2[3:]  # peft's lora_A init: kaiming_uniform_(a=sqrt(5)) on [r, in], i.e. U(+-1/sqrt(in))
    assert new.abs().max() <= 50 ** -0.5 and new.abs().max() > 0.9 * 50 ** -0.5 and new.std() > 0.5 * (50 ** -0.5) / 3 ** 0.5
    ref = torch.empty(5, 50)
    torch.nn.init.kaiming_uniform_(ref, a=5 ** 0.5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(new, ref)  # same draws as torch's own initialiser under the same generator
    assert torch.equal(grow_rank(A, B, 8, torch.Generator().manual_seed(0))[0], A2)  # seeded


@pytest.mark.parametrize("rslora", [False, True])
def test_grown_start_keeps_the_delta_and_loads_in_peft(fx, task, last_layer, one_thread, tmp_path, rslora):  # noqa: F811
    """lr 0: the tune moves nothing, so the lifted adapter is the grown start. Layer 1's modules have rank 12,
    layer 0's (dropped) keep 4, every module's s B A is the input's, and peft loads it (rank_pattern /
    alpha_pattern) with every key, computing the input adapter's logits."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from surgery.io.adapter import Adapter
    from surgery.kinds.lora import modules as lora_modules
    from surgery.pipelines.tune_bridge import tune_bridge
    from surgery.train.loop import TrainConfig

    src = fx.lora("llama", targets=TARGETS, name="rank", use_rslora=rslora)
    train, _ = task
    out = tmp_path / "grown"
    s = tune_bridge(src, last_layer, train, str(out), cfg=TrainConfig(epochs=1, lr=0.0, batch_size=16), prefix=True, rank=12)
    assert s["rank"] == 12 and json.loads((out / "tune_bridge.json").read_text())["rank"] == 12
    before, after = lora_modules(Adapter.open(src)), lora_modules(Adapter.open(str(out)))
    assert [m.module for m in before] == [m.module for m in after]
    for a, b in zip(before, after):
        assert b.rank == (12 if ".layers.1." in a.module else 4), a.module
        assert b.scaling == pytest.approx(a.scaling, rel=1e-12)
        assert torch.allclose(b.scaling * b.B @ b.A, a.scaling * a.B @ a.A, atol=1e-6), a.module
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert set(cfg["rank_pattern"].values()) == {12} and len(cfg["rank_pattern"]) == len(TARGETS)

    llm = fx.model("llama")
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    logits = {}
    for name, path in (("src", src), ("out", str(out))):
        pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llm, dtype=torch.float32), path)
        loaded = {k.replace(".default", ""): v for k, v in pm.state_dict().items() if "lora_" in k}
        assert loaded.keys() == Adapter.open(path).tensors.keys()  # no missing, no unexpected key
        for k, v in Adapter.open(path).tensors.items():
            assert torch.equal(loaded[k], v), k
        if name == "out":
            for m in after:  # peft's own scaling of each module is the one surgery reads
                assert pm.get_submodule("base_model.model." + m.module).scaling["default"] == pytest.approx(m.scaling)
        logits[name] = pm(ids).logits
    assert torch.allclose(logits["out"], logits["src"], atol=1e-5)


def test_grown_adapter_trains_and_works_with_eval_merge_refine(fx, task, last_layer, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from surgery.io.adapter import Adapter

    llm, src = fx.model("llama"), fx.lora("llama", targets=TARGETS, name="rank")
    train, dev = task
    out = tmp_path / "tuned"
    code, o, err = run_cli("tune-bridge", "--adapter", src, "--bridge", last_layer, "--data", train, "--eval", dev, "--prefix",
                           "--rank", "8", "-o", out, "--epochs", "1", "--lr", "1e-2", "--batch-size", "16", "--json")
    assert code == 0, err
    s = json.loads(o)
    assert s["after"]["loss"] < s["before"]["loss"] and s["rank"] == 8
    grown = {k: v for k, v in Adapter.open(str(out)).tensors.items() if ".layers.1." in k and "lora_B" in k}
    assert grown and all(v.shape[1] == 8 and v[:, 4:].any() for v in grown.values())  # the new directions trained

    code, o, err = run_cli("eval", llm, "--data", dev, "--adapter", out, "--json")
    assert code == 0, err
    assert json.loads(o)["loss"] == pytest.approx(s["after"]["loss"], rel=0.2)  # the lift of a kept-width layer
    code, _, err = run_cli("merge-lora", llm, out, "-o", tmp_path / "merged", "--dtype", "float32")
    assert code == 0, err
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(llm, dtype=torch.float32), str(out))
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    assert torch.allclose(merged(ids).logits, pm(ids).logits, atol=1e-4)
    code, _, err = run_cli("refine", "--adapter", out, "--llm", llm, "--data", train, "-o", tmp_path / "refined",
                           "--steps", "2", "--max-length", "32")
    assert code == 0, err
    r = Adapter.open(str(tmp_path / "refined"))
    assert r.config["rank_pattern"] == Adapter.open(str(out)).config["rank_pattern"]
    assert {k: v.shape for k, v in r.tensors.items()} == {k: v.shape for k, v in Adapter.open(str(out)).tensors.items()}


def test_rank_errors(fx, task, last_layer, tmp_path):
    from fixtures import build_bottleneck

    train, _ = task
    src = fx.lora("llama", targets=TARGETS, name="rank")
    code, _, err = run_cli("tune-bridge", "--adapter", src, "--bridge", last_layer, "--data", train, "--rank", "2",
                           "-o", tmp_path / "o")
    assert code == 2 and "--rank 2 is below the rank 4" in err and "pass --rank >= 4" in err and "Traceback" not in err
    bn = str(tmp_path / "bn")
    build_bottleneck(fx.model("llama"), bn)
    code, _, err = run_cli("tune-bridge", "--adapter", bn, "--bridge", last_layer, "--data", train, "--rank", "8",
                           "-o", tmp_path / "o")
    assert code == 2 and "bottleneck adapter" in err and "leave out --rank" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_evidence_counts_refine_on_the_grown_adapter(fx, task, last_layer, one_thread, tmp_path):  # noqa: F811
    """benchmarks/evidence/memory.py with tune-bridge --rank (run.KEEP_RANK): refine's row holds the LLM with the
    adapter tune-bridge --rank writes (rank R on the layers the bridge kept, the adapter's rank elsewhere)."""
    from benchmarks.evidence.memory import _kept_pattern, _rank_of, _refined, inference_bytes
    from surgery.io.adapter import Adapter
    from surgery.io.checkpoint import Checkpoint
    from surgery.pipelines.tune_bridge import tune_bridge
    from surgery.train.loop import TrainConfig

    assert _rank_of(["--rank", "12"]) == 12 and _rank_of([]) is None
    llm, src = fx.model("llama"), fx.lora("llama", name="all")  # every linear layer, rank 4
    train, _ = task
    tune_bridge(src, last_layer, train, str(tmp_path / "g"), cfg=TrainConfig(epochs=1, lr=0.0, batch_size=16), prefix=True, rank=12)
    grown = sum(t.numel() * t.element_size() for t in Adapter.open(str(tmp_path / "g")).tensors.values())
    ck = Checkpoint.open(llm)
    base = sum(ck.nbytes(k) for k in ck.keys())
    count = inference_bytes(llm, 4, 8, rank=4, rank_pattern=_kept_pattern(llm, last_layer, 12))
    assert _kept_pattern(llm, last_layer, 12) == {r"model\.layers\.1\..*": 12}
    assert count["weights"] == base + grown
    # refine --layers (section 11: the layers the bridge dropped): one direction tensor, the largest of those layers'
    assert _refined(llm, last_layer, "untuned") == {"layers": {0}} and _refined(llm, last_layer, None) is None
    some = inference_bytes(llm, 4, 8, rank=4, rank_pattern=_kept_pattern(llm, last_layer, 12), layers={"layers": {0}})
    layer0 = [t for k, t in Adapter.open(src).tensors.items() if ".layers.0." in k]
    assert some["weights"] == count["weights"] and some["lora_state"] == max(t.numel() * 4 for t in layer0)
    assert some["lora_state"] < count["lora_state"]


def test_grows_an_adapter_with_rank_and_alpha_patterns(fx, task, last_layer, one_thread, tmp_path):  # noqa: F811
    """The input's own patterns (q_proj rank 8, v_proj alpha 3) stay for the dropped layer; the grown modules'
    exact entries come first, so peft and surgery give them rank R with their old scaling. --rank below the
    largest kept rank (q_proj's 8) is refused."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from surgery.io.adapter import Adapter
    from surgery.kinds.lora import modules as lora_modules
    from surgery.pipelines.tune_bridge import tune_bridge
    from surgery.train.loop import TrainConfig

    src = fx.lora("llama", targets=TARGETS, name="pat", rank_pattern={"q_proj": 8}, alpha_pattern={"v_proj": 3})
    train, _ = task
    code, _, err = run_cli("tune-bridge", "--adapter", src, "--bridge", last_layer, "--data", train, "--rank", "6",
                           "-o", tmp_path / "o")
    assert code == 2 and "--rank 6 is below the rank 8" in err and "q_proj" in err
    out = tmp_path / "grown"
    tune_bridge(src, last_layer, train, str(out), cfg=TrainConfig(epochs=1, lr=0.0, batch_size=16), prefix=True, rank=12)
    before, after = lora_modules(Adapter.open(src)), lora_modules(Adapter.open(str(out)))
    for a, b in zip(before, after):
        assert b.rank == (12 if ".layers.1." in a.module else a.rank) and b.scaling == pytest.approx(a.scaling), a.module
    assert {m.module.rsplit(".", 1)[1]: m.rank for m in before if ".layers.0." in m.module} == {"q_proj": 8, "v_proj": 4, "down_proj": 4}
    ids = torch.tensor([[1, 5, 9, 14, 3, 7]])
    logits = [PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(fx.model("llama"), dtype=torch.float32), p)(ids).logits
              for p in (src, str(out))]
    assert torch.allclose(logits[0], logits[1], atol=1e-5)


def test_rank_defaults_to_the_planned_bridge_rank(fx, calib, task, one_thread, tmp_path):  # noqa: F811
    """A bridge prune-bridge --memory-reduction planned with --bridge-rank R is tuned at R without --rank (the
    step then holds what the plan counted); --rank still decides; a plan at the adapter's rank changes nothing."""
    from surgery.pipelines.prune import prune_bridge
    from surgery.pipelines.tune_bridge import tune_bridge
    from surgery.train.loop import TrainConfig

    src = fx.lora("llama", targets=TARGETS, name="planned")
    train, _ = task
    cfg = lambda: TrainConfig(epochs=1, lr=0.0, batch_size=16)  # noqa: E731
    for bridge_rank, asked, want, by in ((12, None, 12, "bridge.json"), (12, 6, 6, "--rank"), (None, None, None, "the adapter")):
        bridge = tmp_path / f"b{bridge_rank}"
        prune_bridge(fx.model("llama"), bridge, calib, memory_reduction=2.5, train_batch=4, train_length=32,
                     bridge_rank=bridge_rank, **FAST)
        out = tmp_path / f"t{bridge_rank}-{asked}"
        s = tune_bridge(src, str(bridge), train, str(out), cfg=cfg(), rank=asked)
        assert (s["rank"], s["rank_set_by"]) == (want, by)
        assert json.loads((out / "tune_bridge.json").read_text())["rank_set_by"] == by


def test_a_hostile_planned_rank_is_refused_in_one_line(fx, calib, task, tmp_path):  # noqa: F811
    """bridge.json is read like any stranger's file: a planned bridge_rank that is not a rank is one error line."""
    import shutil

    from surgery.pipelines.prune import prune_bridge

    bridge = tmp_path / "b"
    prune_bridge(fx.model("llama"), bridge, calib, memory_reduction=2.5, train_batch=4, train_length=32, bridge_rank=12, **FAST)
    meta = json.loads((bridge / "bridge.json").read_text())
    for bad in ("12", -3, 2.5):
        meta["memory"]["bridge_rank"] = bad
        (bridge / "bridge.json").write_text(json.dumps(meta))
        src = fx.lora("llama", targets=TARGETS, name="hostile")
        train, _ = task
        out = tmp_path / "out"
        code, _, err = run_cli("tune-bridge", "--adapter", src, "--bridge", bridge, "--data", train, "-o", out, "--epochs", "0.1")
        assert code != 0 and "bridge_rank" in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1 and not out.exists()
    shutil.rmtree(bridge)
