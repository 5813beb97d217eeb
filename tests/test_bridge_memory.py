"""prune-bridge --memory-reduction (pipelines/bridge_memory.py) and tune-bridge's automatic --prefix.

The plan's promise: the bridge's `tune-bridge --prefix` step holds at most 1/M of LoRA on the LLM's step
(tensor count, surgery.train.memory), and one more MLP neuron (or kv group) would not fit; the count it
records equals the evidence's own (benchmarks.evidence.memory.training_bytes) on the bridge it wrote."""

import json

import pytest

from .conftest import run_cli
from .test_prune import FAST, calib  # noqa: F401 (calib: pytest fixture)
from .train_fixtures import one_thread, task  # noqa: F401 (pytest fixtures)

SHAPE = dict(batch=4, seq=32)


def _arch(path):
    from surgery.arch import load_arch

    with open(f"{path}/config.json") as f:
        return load_arch(json.load(f))


def _count(arch, depth, kv, inter, rank=8):
    """The bridge's step counted afresh (not through the planner): the LLM's last `depth` layers at these widths."""
    from surgery.pipelines.bridge_plan import bridge_config
    from surgery.train.memory import step_bytes

    d, (st, n), = arch.dims, *arch.stacks.items()
    sizes = {"hidden": d["hidden"], "heads": kv * d["heads"] // d["kv_heads"], "kv_heads": kv, "intermediate": inter}
    cfg = bridge_config(arch, sizes, {st: list(range(n - depth, n))})
    return step_bytes(cfg, SHAPE["batch"], SHAPE["seq"], rank, prefix=depth < n)["total"]


@pytest.mark.parametrize("m, depth, kv, full_layer", [(4, 1, 1, False), (2.5, 1, 2, False), (1.5, 1, 2, True)])
def test_the_plan_fits_and_one_more_unit_would_not(fx, m, depth, kv, full_layer):
    """llama fixture (2 layers, 2 kv groups, 128 neurons) at 4 x 32 tokens: M=4 keeps 1 kv group and a few
    neurons, 2.5 both groups and about half the neurons, 1.5 the whole last layer (and not two)."""
    from surgery.pipelines.bridge_memory import plan_by_memory
    from surgery.train.memory import step_bytes

    arch = _arch(fx.model("llama"))
    p = plan_by_memory(arch, m, SHAPE["batch"], SHAPE["seq"])
    s, rec = p["sizes"], p["record"]
    llm = step_bytes(arch.config, SHAPE["batch"], SHAPE["seq"], 8)["total"]
    budget = llm / m
    assert rec["llm_lora_bytes"] == llm and rec["ratio"] == llm / rec["bridge_bytes"] >= m
    assert (arch.stacks["layers"] - p["drop"], s["kv_heads"], s["hidden"]) == (depth, kv, arch.dims["hidden"])
    assert rec["bridge_bytes"] == _count(arch, depth, s["kv_heads"], s["intermediate"]) <= budget
    if full_layer:
        assert s["intermediate"] == arch.dims["intermediate"] and s["kv_heads"] == arch.dims["kv_heads"]
        assert _count(arch, 2, kv, arch.dims["intermediate"]) > budget  # a second whole layer would not fit
    else:
        assert _count(arch, 1, kv, s["intermediate"] + 1) > budget  # one more neuron would not fit
    if kv < arch.dims["kv_heads"]:
        assert _count(arch, 1, kv + 1, 1) > budget  # nor one more kv group, even with a single neuron


def test_the_plans_count_is_the_evidences_on_the_bridge_it_wrote(fx, calib, tmp_path):  # noqa: F811
    """Untied llama and tied qwen2 (its LM head is the embedding, held under --prefix): bridge.json's counts
    equal benchmarks/evidence/memory.training_bytes on the written bridge (prefix=True) and on the LLM; the
    bridge keeps the LLM's last layer at the planned widths, chosen by the Fisher scores."""
    from benchmarks.evidence.memory import training_bytes
    from surgery.pipelines.prune import prune_bridge

    for fam in ("llama", "qwen2"):
        llm = fx.model(fam)
        out = tmp_path / fam
        r = prune_bridge(llm, out, calib, memory_reduction=2.5, train_batch=SHAPE["batch"], train_length=SHAPE["seq"],
                         **FAST)
        meta = json.loads((out / "bridge.json").read_text())
        mem = meta["memory"]
        assert mem["bridge_bytes"] == training_bytes(str(out), SHAPE["batch"], SHAPE["seq"], prefix=True)["total"]
        assert mem["llm_lora_bytes"] == training_bytes(llm, SHAPE["batch"], SHAPE["seq"])["total"]
        assert mem["bridge_bytes"] * 2.5 <= mem["llm_lora_bytes"]
        assert meta["layers"]["dropped"] == {"layers": [0]} and meta["layers"]["drop_by"] == "first"
        assert meta["reduction"] is None and meta["sizes"] == r["sizes"]
        cfg = json.loads((out / "config.json").read_text())
        assert (cfg["num_hidden_layers"], cfg["intermediate_size"]) == (1, meta["sizes"]["intermediate"])
        assert len(meta["kept"]["layers"]["layers"][1]["mlp.inner"]) == meta["sizes"]["intermediate"]


def test_bridge_rank_is_counted(fx):
    """A higher rank on the kept layers (tune-bridge --rank) costs memory: the same M keeps fewer neurons."""
    from surgery.pipelines.bridge_memory import plan_by_memory

    arch = _arch(fx.model("llama"))
    r8, r16 = (plan_by_memory(arch, 2, SHAPE["batch"], SHAPE["seq"], bridge_rank=r) for r in (8, 16))
    assert r16["sizes"]["intermediate"] < r8["sizes"]["intermediate"]
    assert r16["record"]["bridge_bytes"] == _count(arch, 1, r16["sizes"]["kv_heads"], r16["sizes"]["intermediate"], rank=16)
    assert r16["record"]["llm_lora_bytes"] == r8["record"]["llm_lora_bytes"]  # the LLM's LoRA stays rank 8


@pytest.mark.parametrize("args, message", [
    (["--memory-reduction", "2", "--reduction", "4"], "cannot be combined with --reduction"),
    (["--memory-reduction", "2", "--intermediate-size", "8"], "cannot be combined with --intermediate-size"),
    (["--memory-reduction", "2", "--residual", "prune"], "cannot be combined with --residual prune"),
    (["--memory-reduction", "2", "--drop-layers", "1"], "cannot be combined with --drop-layers 1"),
    (["--memory-reduction", "2", "--drop-by", "similarity"], "cannot be combined with --drop-by similarity"),
    (["--memory-reduction", "40"], "no bridge fits; the smallest (the last layer with 1 kv group and 1 neuron) holds"),
    (["--memory-reduction", "0.5"], "--memory-reduction 0.5 is not a number >= 1"),
    (["--train-shape", "4x32"], "--train-shape only applies with --memory-reduction"),
    (["--memory-reduction", "2", "--train-shape", "4by32"], "--train-shape '4by32' is not BATCHxTOKENS"),
    (["--memory-reduction", "2", "--bridge-rank", "0"], "--bridge-rank 0 must be at least 1"),
    (["--memory-reduction", "nan"], "--memory-reduction nan is not a number >= 1"),
])
def test_errors_are_one_line_and_write_nothing(fx, calib, tmp_path, args, message):  # noqa: F811
    out = tmp_path / "b"
    code, _, err = run_cli("prune-bridge", fx.model("llama"), "-o", out, "--data", calib, "--samples", "4",
                           "--seq-len", "32", *args)
    assert code != 0 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()
    if "no bridge fits" in message:  # says the largest M any bridge meets, and it is met
        best = float(err.rsplit("use --memory-reduction ", 1)[1].split()[0])
        code, _, err = run_cli("prune-bridge", fx.model("llama"), "-o", out, "--data", calib, "--samples", "4",
                               "--seq-len", "32", "--memory-reduction", str(best), "--json")
        assert code == 0, err
        assert json.loads((out / "bridge.json").read_text())["sizes"]["intermediate"] == 1


def test_a_family_without_a_usable_prefix_is_refused(fx, calib, tmp_path):  # noqa: F811
    code, _, err = run_cli("prune-bridge", fx.model("gpt2"), "-o", tmp_path / "b", "--data", calib, "--memory-reduction", "2")
    assert code != 0 and "which gpt2 cannot use" in err and "use --reduction R instead" in err


def test_tune_bridge_prefix_is_automatic(fx, calib, task, tmp_path):  # noqa: F811
    """Neither --prefix nor --no-prefix: on for a bridge that dropped the LLM's first layers (--memory-reduction's,
    --drop-by first's), off for one that kept layer 0; --no-prefix still turns it off; the output says which."""
    from surgery.pipelines.prune import prune_bridge

    llm = fx.model("llama")
    src = fx.lora("llama", targets=["q_proj", "v_proj", "down_proj"], name="auto-prefix")
    first, last = tmp_path / "first", tmp_path / "last"
    prune_bridge(llm, first, calib, memory_reduction=2.5, train_batch=4, train_length=32, **FAST)
    # a bridge that drops the LLM's last layer (layer 0 kept): a plain tune
    from surgery.pipelines import prune

    orig = prune.choose_dropped
    prune.choose_dropped = lambda arch, scores, n: {"layers": [1]}
    try:
        prune_bridge(llm, last, calib, reduction=2, drop_layers=1, **FAST)
    finally:
        prune.choose_dropped = orig
    train, dev = task
    runs = {}
    for name, bridge, flags in (("auto-on", first, []), ("auto-off", last, []), ("no-prefix", first, ["--no-prefix"])):
        code, out, err = run_cli("tune-bridge", "--adapter", src, "--bridge", bridge, "--data", train, "-o",
                                 tmp_path / name, "--epochs", "1", "--batch-size", "16", *flags, "--json")
        assert code == 0, err
        runs[name] = json.loads(out)["prefix"]
        assert json.loads((tmp_path / name / "tune_bridge.json").read_text())["prefix_layers"] == runs[name]["layers"]
    assert runs["auto-on"] == {"on": True, "layers": 1, "set_by": "auto",
                               "why": "the bridge dropped the LLM's first 1 layer"}
    assert runs["auto-off"]["on"] is False and runs["auto-off"]["set_by"] == "auto"
    assert "not only the LLM's first ones" in runs["auto-off"]["why"]
    assert runs["no-prefix"] == {"on": False, "layers": 0, "set_by": "--no-prefix", "why": "asked"}
    code, out, err = run_cli("tune-bridge", "--adapter", src, "--bridge", first, "--data", train, "-o",
                             tmp_path / "table", "--epochs", "1", "--batch-size", "16")
    assert code == 0 and "on: the LLM's layer 0 ran forward only (auto: the bridge dropped the" in " ".join(out.split()), out


def test_prefix_default_rule():
    """The rule itself, on bridge.json's records: a leading run dropped (and only that) turns it on."""
    from surgery.arch import load_arch
    from fixtures.build import FAMILIES, _config
    from surgery.pipelines.bridge_prefix import prefix_default

    arch = load_arch(_config("llama", **{k: v for k, v in FAMILIES["llama"].items() if k != "model_type"}).to_dict())
    gpt2 = load_arch(_config("gpt2", **{k: v for k, v in FAMILIES["gpt2"].items() if k != "model_type"}).to_dict())

    def meta(dropped, hidden=64):
        return {"layers": {"llm": {"layers": 4}, "dropped": {"layers": dropped}},
                "sizes": {"hidden": hidden}, "llm_sizes": {"hidden": 64}}

    assert prefix_default(meta([0, 1]), arch)[0] is True
    assert prefix_default(meta([]), arch) == (False, "the bridge keeps the LLM's layer 0")
    assert prefix_default(meta([1, 2]), arch)[0] is False and prefix_default(meta([0, 2]), arch)[0] is False
    on, why = prefix_default(meta([0], hidden=32), arch)  # a narrow residual: --prefix would be refused
    assert not on and "residual" in why
    on, why = prefix_default({**meta([0]), "layers": {"llm": {"h": 4}, "dropped": {"h": [0]}}}, gpt2)
    assert not on and "wpe" in why
    assert prefix_default({}, arch)[0] is False  # a bridge.json without layer records dropped none


def test_kv_counts_the_config_refuses_are_skipped():
    """llama's config refuses a hidden size that is not whole heads: 64 wide with 4 heads a group takes 1, 2 or
    4 kv groups, not 3 (12 heads). The plan only counts accepted ones (before, its bisection tried 3 and failed
    inside transformers), and the next accepted count beyond its choice does not fit."""
    from fixtures.build import _config
    from surgery.arch import load_arch
    from surgery.pipelines.bridge_memory import plan_by_memory
    from surgery.pipelines.bridge_plan import kv_choices
    from surgery.train.memory import step_bytes

    arch = load_arch(_config("llama", hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=16,
                             num_key_value_heads=4, head_dim=4, vocab_size=384, tie_word_embeddings=False).to_dict())
    assert kv_choices(arch, 64) == [1, 2, 4]
    p = plan_by_memory(arch, 3, SHAPE["batch"], SHAPE["seq"])
    budget = step_bytes(arch.config, SHAPE["batch"], SHAPE["seq"], 8)["total"] / 3
    assert (p["drop"], p["sizes"]["kv_heads"], p["sizes"]["heads"]) == (1, 2, 8)
    assert p["record"]["bridge_bytes"] == _count(arch, 1, 2, p["sizes"]["intermediate"]) <= budget
    assert _count(arch, 1, 4, 1) > budget and _count(arch, 1, 2, p["sizes"]["intermediate"] + 1) > budget
