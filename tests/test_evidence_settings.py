"""benchmarks/evidence/run.py --epochs: one epochs value for every backprop stage of the table (a fair
table never trains the method's stages longer than the LoRA baselines), and compare.py's fairness check."""

import threading

import pytest

from benchmarks.evidence import run
from benchmarks.evidence.compare import compare


def _bench(monkeypatch, epochs=None, dropped="0,1,2"):
    """A Bench whose stages only record their command lines (the list it returns)."""
    monkeypatch.setattr(run, "cli_has", lambda command, flag: True)
    b = run.Bench.__new__(run.Bench)
    b.slm, b.llm, b.work, b.s, b.log = "P/slm", "P/llm", "W", run.settings(False, epochs), print
    b._guard, b._locks, b.tag, b.ttag = threading.Lock(), {}, "", "-scaled"
    b.bridges = {"keep": ["--residual", "keep"], "narrow": ["--residual", "prune"]}
    b.data = lambda task: ("train.jsonl", "dev.jsonl", "calib.jsonl")
    b.dropped = lambda task: dropped
    seen = []

    def stage(rec, args):
        seen.append(args)
        return {"out": {"after": {}, "before": {}}}

    b.stage = stage
    return b, seen


def _commands(monkeypatch, epochs):
    b, seen = _bench(monkeypatch, epochs)
    b.seed_chain("verb", 0)
    return {(a[0], a[a.index("-o") + 1]): a[a.index("--epochs") + 1] for a in seen if "--epochs" in a}


@pytest.mark.parametrize("epochs, expect", [(None, str(run.FULL["epochs"])), (7, "7")])
def test_epochs_reaches_every_train_and_tune_bridge_stage_alike(monkeypatch, epochs, expect):
    got = _commands(monkeypatch, epochs)
    assert got.pop(("train", "W/verb/s0/fresh")) == "0"  # the zero-init adapter: no training
    kinds = {k for k, _ in got}
    assert kinds == {"train", "tune-bridge"} and len(got) == 5  # SLM, LLM, zero-init, bridge, narrow
    assert set(got.values()) == {expect}


def test_epochs_below_one_is_refused_and_defaults_stay():
    with pytest.raises(SystemExit, match="--epochs 1 or more"):
        run.settings(False, 0)
    assert run.settings(False)["epochs"] == run.FULL["epochs"] and run.settings(True)["epochs"] == run.QUICK["epochs"]


def _results(slm, llm):
    def rec(a):
        return {"out": {"accuracy": a, "loss": 1.0}}

    seed = {"slm_lora": rec(slm), "llm_lora": rec(llm), "method": {"eval": rec(0.4)}}
    return {"tasks": {"verb": {"zero_shot": rec(0.0), "seeds": [seed, seed]}}}


def test_compare_flags_a_weaker_baseline():
    text, v = compare(_results(0.3, 0.6), _results(0.3, 0.61), ("E=3", "E=10"))
    assert v["fair"] and "method - SLM + LoRA at E=10: +10.0 / +10.0" in text
    text, v = compare(_results(0.3, 0.6), _results(0.29, 0.7), ("E=3", "E=10"))
    assert not v["fair"] and "WEAKER" in text


def test_keep_bridge_is_planned_by_memory_at_the_runs_shape(monkeypatch):
    """The residual-keeping bridge is prune-bridge's own --memory-reduction plan at the run's tune-bridge shape
    and rank (no --reduction: the two are exclusive), tuned with --prefix and --rank; the narrow one keeps
    --reduction and neither."""
    monkeypatch.setattr(run, "cli_has", lambda command, flag: True)
    pair = {"num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 384,
            "hidden_size": 128}
    s = dict(run.FULL)
    kinds = run.bridge_kinds(pair, s)
    keep = kinds["keep"]
    assert keep[:4] == ["--residual", "keep", "--drop-by", "first"]
    flags = dict(zip(keep[4::2], keep[5::2]))
    assert flags == {"--memory-reduction": "5", "--train-shape": f"{s['batch']}x{s['max_length']}",
                     "--bridge-rank": str(run.KEEP_RANK)}
    assert run.tune_args("keep") == ["--rank", str(run.KEEP_RANK)] and run.tune_args("narrow") == []
    assert run.tunes_with_prefix(keep) and not run.tunes_with_prefix(kinds["narrow"])
    bench = run.Bench.__new__(run.Bench)
    bench.bridges, bench.s = kinds, s
    assert bench.reduction("keep") == [] and bench.reduction("narrow") == ["--reduction", str(s["reduction"])]


def _arg(a, flag):
    return a[a.index(flag) + 1] if flag in a else None


def test_pre_refine_runs_on_the_dropped_layers_before_both_keep_bridge_tunes(monkeypatch):
    """Section 11's pre-refine: refine --layers (the layers the keep bridge drops) --lr PRE_REFINE_LR from the
    transferred start and from the zero-init one; the keep bridge's two tunes start from those outputs, the narrow
    bridge's from the transfer; the method's last refine stays on every layer at the settings' lr."""
    b, seen = _bench(monkeypatch)
    b.bridges["keep"] += ["--drop-by", "first"]  # the prefix bridge: refine's lr is the settings'
    b.seed_chain("verb", 0)
    refines = {_arg(a, "-o"): a for a in seen if a[0] == "refine"}
    tunes = {_arg(a, "-o"): _arg(a, "--adapter") for a in seen if a[0] == "tune-bridge"}
    pre, zpre = refines["W/verb/s0/pre-scaled"], refines["W/verb/s0/zero-init-pre"]
    assert _arg(pre, "--adapter") == "W/verb/s0/transfer-scaled" and _arg(zpre, "--adapter") == "W/verb/s0/fresh"
    for a in (pre, zpre):
        assert _arg(a, "--layers") == "0,1,2" and float(_arg(a, "--lr")) == run.PRE_REFINE_LR
    assert tunes == {"W/verb/s0/bridge-scaled": "W/verb/s0/pre-scaled", "W/verb/s0/zero-init": "W/verb/s0/zero-init-pre",
                     "W/verb/s0/narrow-scaled": "W/verb/s0/transfer-scaled"}
    method = refines["W/verb/s0/method-scaled"]
    assert _arg(method, "--layers") is None and float(_arg(method, "--lr")) == run.FULL["refine_lr"]
    # a keep bridge that drops no layer: no pre-refine, both tunes start as before section 11
    b, seen = _bench(monkeypatch, dropped=None)
    b.seed_chain("verb", 0)
    assert not any(a[0] == "refine" and "--layers" in a for a in seen)
    assert {_arg(a, "-o"): _arg(a, "--adapter") for a in seen if a[0] == "tune-bridge"}["W/verb/s0/bridge-scaled"] \
        == "W/verb/s0/transfer-scaled"


def test_dropped_reads_the_keep_bridges_bridge_json(monkeypatch, tmp_path):
    import json

    b, _ = _bench(monkeypatch)
    del b.dropped  # the real one
    b.bridge = lambda task, kind: {"dir": str(tmp_path)}
    for dropped, spec in (({"decoder": [0, 1, 2]}, "0,1,2"), ({"decoder": []}, None),
                          ({"encoder": [0], "decoder": [1, 2]}, "encoder:0,decoder:1,decoder:2")):
        (tmp_path / "bridge.json").write_text(json.dumps({"layers": {"dropped": dropped}}))
        assert b.dropped("verb") == spec


def test_seeds_setting():
    assert run.settings(False, seeds=5)["seeds"] == 5 and run.settings(False)["seeds"] == run.FULL["seeds"]
    with pytest.raises(SystemExit, match="--seeds 2 or more"):
        run.settings(False, seeds=1)
