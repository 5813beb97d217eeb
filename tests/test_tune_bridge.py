"""surgery tune-bridge: W_down restriction, training on the bridge, lifting back into the LLM's coordinates."""

import json

import pytest

from surgery.kinds.lora import modules as lora_modules

from .conftest import run_cli
from .train_fixtures import one_thread, task  # noqa: F401 (pytest fixtures)

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def bridges(fx, tmp_path_factory):
    from fixtures.bridge import build_bridge

    root = tmp_path_factory.mktemp("bridges")
    return {f: build_bridge(fx.model(f), str(root / f), fraction=0.5, seed=3) for f in ("llama", "gpt2")}


def test_restrict_and_lift_by_hand():
    import torch

    from surgery.ops.bridge import lift, restrict

    A, B = torch.randn(2, 5), torch.randn(4, 2)
    I, O = torch.tensor([0, 3]), torch.tensor([1, 2])
    Ab, Bb = restrict(A, B, I, O)
    assert torch.allclose(Bb @ Ab, (B @ A)[O][:, I])  # W_down of dW is dW's kept block
    A2, B2 = lift(A, B, I, O, Ab, Ab + 1, Bb, Bb - 2)
    assert torch.equal(A2[:, [1, 2, 4]], A[:, [1, 2, 4]]) and torch.allclose(A2[:, I], A[:, I] + 1)
    assert torch.equal(B2[[0, 3]], B[[0, 3]]) and torch.allclose(B2[O], B[O] - 2)


@pytest.mark.parametrize("family,targets", [("llama", LLAMA_TARGETS), ("gpt2", ["c_attn", "c_proj", "c_fc"])])
def test_output_loads_on_the_llm_and_differs_only_at_bridge_coordinates(fx, task, bridges, tmp_path, family, targets):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from surgery.io.adapter import Adapter

    llm = fx.model(family)
    src = fx.lora(family, targets=targets, name="tb")
    out = tmp_path / "tuned"
    train, dev = task
    code, o, err = run_cli("tune-bridge", "--adapter", src, "--bridge", bridges[family], "--data", train, "--eval", dev,
                           "-o", out, "--epochs", "1", "--lr", "1e-2", "--batch-size", "16", "--log-every", "1", "--json")
    assert code == 0, err
    s = json.loads(o)
    assert s["after"]["loss"] < s["before"]["loss"] and s["bridge_parameters"] < s["llm_parameters"] / 2
    hist = json.loads((out / "tune_bridge.json").read_text())["history"]
    assert [st for st, _ in hist["train_loss"]] == [1, 2, 3, 4] and [e["step"] for e in hist["evals"]] == [4]

    base = AutoModelForCausalLM.from_pretrained(llm, dtype=torch.float32)
    pm = PeftModel.from_pretrained(base, str(out))
    a_in, a_out = Adapter.open(src), Adapter.open(str(out))
    assert a_out.config == a_in.config and set(a_out.tensors) == set(a_in.tensors)
    loaded = {k.replace(".default", ""): v for k, v in pm.state_dict().items() if "lora_" in k}
    kept = json.load(open(f"{bridges[family]}/bridge.json"))["kept"]
    changed = 0
    for m_in, m_out in zip(lora_modules(a_in), lora_modules(a_out)):
        I, O = _expected_positions(family, m_in.module, kept)
        ain, aout = m_in.A, m_out.A
        mask_a = torch.zeros_like(ain, dtype=torch.bool)
        mask_a[:, I] = True
        mask_b = torch.zeros_like(m_in.B, dtype=torch.bool)
        mask_b[O, :] = True
        assert torch.equal(aout[~mask_a], ain[~mask_a]) and torch.equal(m_out.B[~mask_b], m_in.B[~mask_b]), m_in.module
        changed += int((aout[mask_a] != ain[mask_a]).sum() + (m_out.B[mask_b] != m_in.B[mask_b]).sum())
        assert torch.equal(loaded[f"base_model.model.{m_in.module}.lora_A.weight"], aout)
    assert changed > 0


def _expected_positions(family, module, kept):
    """Kept input/output positions written out by hand from the layouts (independent of axis_indices)."""
    layer = kept["layers"]["layers"][int(module.split(".")[2])]
    res = kept["residual"]
    if family == "llama":  # q: 4 heads x 16, k/v: 2 kv heads x 16, hidden 64, mlp 128
        q = [h * 16 + j for h in layer["heads"] for j in range(16)]
        kv = [h * 16 + j for h in layer["kv_heads"] for j in range(16)]
        inner = layer["mlp.inner"]
        table = {"q_proj": (res, q), "k_proj": (res, kv), "v_proj": (res, kv), "o_proj": (q, res),
                 "gate_proj": (res, inner), "up_proj": (res, inner), "down_proj": (inner, res)}
    else:  # gpt2: c_attn writes q|k|v fused, each 4 heads x 16 = 64 wide
        q = [h * 16 + j for h in layer["heads"] for j in range(16)]
        table = {"attn.c_attn": (res, q + [64 + c for c in q] + [128 + c for c in q]), "attn.c_proj": (q, res),
                 "mlp.c_fc": (res, layer["mlp.inner"]), "mlp.c_proj": (layer["mlp.inner"], res)}
    key = next(k for k in table if module.endswith(k))
    return table[key]


def test_a_bridge_that_keeps_everything_equals_training_on_the_llm(fx, task, tmp_path):
    """No pruning: W_down is the identity, so tune-bridge must reproduce LoRA training on the LLM itself."""
    import torch
    from peft import PeftModel

    from fixtures.bridge import build_bridge
    from surgery.io.adapter import Adapter
    from surgery.pipelines.tune_bridge import tune_bridge
    from surgery.train.data import load_examples
    from surgery.train.loop import TrainConfig, train_loop
    from surgery.train.methods import load_base

    llm = fx.model("llama")
    src = fx.lora("llama", targets=["q_proj", "v_proj", "down_proj"], name="full")
    full = {"residual": list(range(64)), "layers": {"layers": [{"heads": [0, 1, 2, 3], "kv_heads": [0, 1]}] * 2}}
    bridge = build_bridge(llm, str(tmp_path / "bridge"), kept=full)
    cfg = TrainConfig(epochs=1, lr=1e-2, batch_size=16, seed=7)
    train, _ = task
    tune_bridge(src, bridge, train, str(tmp_path / "tuned"), cfg=cfg)

    model, tok, _ = load_base(llm)
    pm = PeftModel.from_pretrained(model, src, is_trainable=True)
    train_loop(pm, load_examples(train, tok, seq2seq=False), cfg, pad_id=0, seq2seq=False)
    direct = {k.replace(".default", ""): v for k, v in pm.state_dict().items() if "lora_" in k}
    tuned = Adapter.open(str(tmp_path / "tuned")).tensors
    assert set(tuned) == set(direct)
    for k, v in tuned.items():
        assert torch.allclose(v, direct[k], atol=1e-6), k
        assert not torch.equal(v, Adapter.open(src).tensors[k]) or "lora_B" in k


def test_errors(fx, task, bridges, tmp_path):
    train, _ = task
    llama_lora = fx.lora("llama", targets=["q_proj"], name="e")
    code, _, err = run_cli("tune-bridge", "--adapter", llama_lora, "--bridge", fx.model("llama"), "--data", train, "-o", tmp_path / "o")
    assert code == 2 and "has no bridge.json" in err and "prune-bridge" in err
    code, _, err = run_cli("tune-bridge", "--adapter", fx.lora("gpt2", targets=["c_attn"], name="e"), "--bridge",
                           bridges["llama"], "--data", train, "-o", tmp_path / "o")
    assert code == 2 and "transformer.h.0.attn.c_attn is not a linear layer of this llama LLM" in err
    code, _, err = run_cli("tune-bridge", "--adapter", llama_lora, "--bridge", bridges["llama"], "--data", train,
                           "-o", tmp_path / "o", "--llm", tmp_path / "nowhere")
    assert code == 2 and "pass --llm" in err
    code, _, err = run_cli("tune-bridge", "--adapter", fx.lora("llama", targets=["q_proj"], name="dora", use_dora=True),
                           "--bridge", bridges["llama"], "--data", train, "-o", tmp_path / "o")
    assert code == 2 and "dora is not supported by tune-bridge (supported: lora, bottleneck)" in err
    assert not (tmp_path / "o").exists()
