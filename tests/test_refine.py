"""surgery refine: MeZO (forward-only) tuning of an adapter on the LLM itself.

The SPSA estimate is checked against autograd's directional derivative (autograd only here, as the
reference); the run must leave the LLM untouched, never enable autograd, reproduce itself from its
seed, lower the loss, and write an adapter that loads like the input.
"""

import hashlib
import json
import os

import pytest
import torch

from .conftest import run_cli
from .train_fixtures import one_thread, task  # noqa: F401 (pytest fixtures)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ---- ops: the direction and the estimate ---------------------------------------------------


def test_the_direction_is_regenerated_from_its_seed():
    from surgery.ops.mezo import add_direction_, directions, step_seeds

    params = [torch.zeros(3, 4), torch.zeros(5)]
    z1 = [z.clone() for z in directions(params, 7)]
    z2 = list(directions(params, 7))
    assert all(torch.equal(a, b) for a, b in zip(z1, z2))
    assert not torch.equal(z1[0], next(directions(params, 8)))
    add_direction_(params, 7, 0.5)  # θ += 0.5·z: what was added is the regenerated z
    assert all(torch.equal(p, 0.5 * z) for p, z in zip(params, z1))
    add_direction_(params, 7, -0.5)
    assert all(torch.equal(p, torch.zeros_like(p)) for p in params)
    assert step_seeds(3, 5) == step_seeds(3, 5) and step_seeds(3, 5) != step_seeds(4, 5)
    assert step_seeds(3, 8)[:5] == step_seeds(3, 5)  # more steps extend a run, they do not reshuffle it


def test_spsa_step_on_a_quadratic_is_an_exact_directional_step():
    """L(θ) = ½‖θ − c‖²: the central difference is exact, so g = z·(θ − c) and θ moves by −lr·g·z."""
    from surgery.ops.mezo import directions, spsa_step

    torch.manual_seed(0)
    c = torch.randn(10, dtype=torch.float64)
    theta = torch.randn(10, dtype=torch.float64)
    start = theta.clone()
    z = next(directions([theta], 11)).double()
    lp, lm, g = spsa_step([theta], lambda: 0.5 * float(((theta - c) ** 2).sum()), 11, lr=0.1, eps=1e-3)
    assert g == pytest.approx(float(z @ (start - c)), rel=1e-9)
    assert torch.allclose(theta, start - 0.1 * g * z, atol=1e-12)


def test_several_directions_average_their_estimates_and_one_is_a_plain_step():
    """k directions at the same θ: θ moves by −(lr/k)·Σ g_i·z_i with each g_i = z_i·(θ − c) (exact on a
    quadratic); k = 1 is spsa_step exactly, so --directions 1 reproduces earlier runs."""
    from surgery.ops.mezo import directions, spsa_multi_step, spsa_step

    torch.manual_seed(0)
    c = torch.randn(10, dtype=torch.float64)
    start = torch.randn(10, dtype=torch.float64)
    theta = start.clone()
    loss = lambda: 0.5 * float(((theta - c) ** 2).sum())  # noqa: E731
    zs = [next(directions([theta], s)).double() for s in (3, 4, 5)]
    spsa_multi_step([theta], loss, [3, 4, 5], lr=0.3, eps=1e-3)
    want = start - 0.1 * sum(float(z @ (start - c)) * z for z in zs)
    assert torch.allclose(theta, want, atol=1e-9)
    a, b = start.clone(), start.clone()
    spsa_step([a], lambda: 0.5 * float(((a - c) ** 2).sum()), 9, lr=0.1, eps=1e-3)
    spsa_multi_step([b], lambda: 0.5 * float(((b - c) ** 2).sum()), [9], lr=0.1, eps=1e-3)
    assert torch.equal(a, b)


def test_spsa_estimate_matches_autograd_on_a_tiny_llm_with_lora(fx, task):
    """(L(θ+εz) − L(θ−εz))/(2ε) = z·∇L + O(ε²), on the fixture llama with its LoRA, in float64."""
    from peft import PeftModel

    from surgery.ops.mezo import directions, spsa_estimate
    from surgery.train.data import collate, load_examples
    from surgery.io.model import Placement
    from surgery.train.methods import load_base
    from surgery.train.zeroth import batch_loss

    model, tok, _ = load_base(fx.model("llama"), Placement(dtype="float64"))
    pm = PeftModel.from_pretrained(model, fx.lora("llama", targets=TARGETS), is_trainable=True).eval()
    params = [p for _, p in sorted(pm.named_parameters()) if p.requires_grad]
    batch = collate(load_examples(task[0], tok, seq2seq=False)[:8], 0, False)

    def slope(seed):  # the reference: autograd's gradient contracted with the seed's z
        from surgery.train.score import aligned_logits

        logits, labels = aligned_logits(pm, batch, False)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        grads = torch.autograd.grad(loss, params)
        return sum(float((g * z.double()).sum()) for g, z in zip(grads, directions(params, seed)))

    exact, other = slope(5), slope(6)
    before = [p.detach().clone() for p in params]
    pm.requires_grad_(False)
    with torch.inference_mode():
        est = spsa_estimate(params, lambda: batch_loss(pm, batch, False), 5, eps=1e-4)
    assert abs(exact) > 0.1 and abs(exact - other) > 0.1  # a real slope, and another z gives another one
    assert est == pytest.approx(exact, rel=1e-4)
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(before, params))  # +ε, −2ε, +ε returns θ


# ---- the loop: no autograd, the LLM untouched ----------------------------------------------


def test_refine_never_enables_autograd_and_changes_only_the_adapter(fx, task):
    from surgery.kinds import get
    from surgery.train.data import load_examples
    from surgery.train.methods import load_base
    from surgery.train.zeroth import RefineConfig, mezo_loop

    model, tok, arch = load_base(fx.model("llama"))
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    model.requires_grad_(False)
    wrapped, params = get("lora", "refine").tunable(model, fx.lora("llama", targets=TARGETS), arch)
    start = [p.clone() for p in params]
    seen = []
    model.get_input_embeddings().register_forward_hook(
        lambda m, i, o: seen.append((torch.is_grad_enabled(), torch.is_inference_mode_enabled(), o.requires_grad)))
    examples = load_examples(task[0], tok, seq2seq=False)
    mezo_loop(wrapped, params, examples, RefineConfig(steps=4, batch_size=8, lr=1e-2), pad_id=0, seq2seq=False)
    assert seen == [(False, True, False)] * 8  # two forward passes per step, all in inference mode
    assert not any(p.requires_grad for p in wrapped.parameters())
    base = wrapped.get_base_model().state_dict()
    lora = [k for k in base if "lora_" in k]
    assert len(lora) == len(params) == 2 * 2 * len(TARGETS)
    for k, v in frozen.items():  # peft renames wrapped layers' weights to <module>.base_layer.weight
        k2 = k if k in base else k.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        assert torch.equal(base[k2], v), k
    assert all(not torch.equal(a, p) for a, p in zip(start, params))


# ---- the command ---------------------------------------------------------------------------


def _refine(adapter, llm, task, out, *extra):
    train, dev = task
    return run_cli("refine", "--adapter", adapter, "--llm", llm, "--data", train, "--eval", dev, "-o", out,
                   "--steps", "30", "--lr", "1e-2", "--batch-size", "16", "--log-every", "10", "--json", *extra)


def test_refine_lora_lowers_the_loss_reproducibly_and_loads_in_peft(fx, task, tmp_path):
    from peft import PeftModel

    from surgery.train.methods import load_base

    llm, src = fx.model("llama"), fx.lora("llama", targets=TARGETS)
    llm_files = {f: _sha(os.path.join(llm, f)) for f in os.listdir(llm)}
    code, o, err = _refine(src, llm, task, tmp_path / "a")
    assert code == 0, err
    s = json.loads(o)
    assert s["kind"] == "lora" and s["steps"] == 30 and s["evaluated_on"] == "eval"
    assert s["after"]["loss"] < s["before"]["loss"] - 0.01
    log = json.load(open(tmp_path / "a" / "refine.json"))
    assert [st for st, _ in log["history"]["train_loss"]] == [10, 20, 30] and log["eps"] == 1e-3
    assert log["after"] == s["after"] and log["trainable"] == s["trainable"]
    assert {f: _sha(os.path.join(llm, f)) for f in os.listdir(llm)} == llm_files  # the LLM is never written
    # the same seed gives byte-identical files; another seed another adapter
    code, _, err = _refine(src, llm, task, tmp_path / "b")
    assert code == 0, err
    for f in ("adapter_model.safetensors", "adapter_config.json", "refine.json"):
        assert _sha(tmp_path / "a" / f) == _sha(tmp_path / "b" / f), f
    code, _, err = _refine(src, llm, task, tmp_path / "c", "--seed", "1")
    assert code == 0, err
    assert _sha(tmp_path / "a" / "adapter_model.safetensors") != _sha(tmp_path / "c" / "adapter_model.safetensors")
    # the output is the input's format: same config, keys, shapes and dtypes; peft loads it exactly
    assert json.load(open(tmp_path / "a" / "adapter_config.json")) == json.load(open(os.path.join(src, "adapter_config.json")))
    model, _, _ = load_base(llm)
    pm = PeftModel.from_pretrained(model, src)
    res = pm.load_adapter(str(tmp_path / "a"), adapter_name="refined")
    assert not res.unexpected_keys and not [k for k in res.missing_keys if "lora_" in k]
    code, o, err = run_cli("eval", llm, "--adapter", tmp_path / "a", "--data", task[1], "--json")
    assert code == 0, err
    assert json.loads(o)["loss"] == pytest.approx(s["after"]["loss"], rel=1e-6)


NO_ALLOCATOR = """
import sys, torch
import surgery.io.allocator as allocator
allocator.return_freed_memory = lambda: False  # glibc's default: freed activations stay resident
torch.set_num_threads(1)  # as the one_thread fixture in the parent
from surgery.cli import main
sys.argv = ["surgery", *sys.argv[1:]]
main()
"""


def test_freed_memory_goes_back_before_loading_and_changes_no_byte(fx, task, tmp_path, monkeypatch):
    """refine returns freed activations to the OS (io/allocator.py: a fixed mmap threshold) before it loads
    the LLM: without it glibc keeps them resident and refine's RSS crept ~60-200 MB above inference's at
    TinyLlama's widths (docs/benchmarks.md). The setting is the allocator's only: the adapter a run
    writes is byte for byte the one a process on glibc's default writes."""
    import subprocess
    import sys

    import surgery.pipelines.refine as pipeline

    calls = []
    real_free, real_load = pipeline.return_freed_memory, pipeline.load_base
    monkeypatch.setattr(pipeline, "return_freed_memory", lambda: calls.append("free") or real_free())
    monkeypatch.setattr(pipeline, "load_base", lambda *a, **k: calls.append("load") or real_load(*a, **k))
    llm, src = fx.model("llama"), fx.lora("llama", targets=TARGETS)
    args = ["refine", "--adapter", src, "--llm", llm, "--data", task[0], "-o", None, "--steps", "6", "--lr", "1e-2",
            "--batch-size", "16", "--eval-every", "3", "--seed", "3"]
    code, _, err = run_cli(*[tmp_path / "with" if a is None else a for a in args])
    assert code == 0, err
    assert calls == ["free", "load"]
    r = subprocess.run([sys.executable, "-c", NO_ALLOCATOR, *[str(tmp_path / "without" if a is None else a) for a in args]],
                       capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        assert _sha(tmp_path / "with" / f) == _sha(tmp_path / "without" / f), f


@pytest.mark.parametrize("kind", ["houlsby", "pfeiffer"])
def test_refine_bottleneck_lowers_the_loss_and_keeps_the_adapterhub_layout(fx, task, tmp_path, kind):
    from fixtures import build_bottleneck
    from surgery.kinds.bottleneck import read_adapterhub

    llm = fx.model("llama")
    src = str(tmp_path / "src")
    build_bottleneck(llm, src, kind=kind)
    code, o, err = _refine(src, llm, task, tmp_path / "out")
    assert code == 0, err
    s = json.loads(o)
    assert s["kind"] == "bottleneck" and s["after"]["loss"] < s["before"]["loss"] - 0.01
    a, b = read_adapterhub(src), read_adapterhub(str(tmp_path / "out"))
    assert b.config == a.config and set(b.modules) == set(a.modules)
    for m in a.modules:
        for k in a.modules[m]:
            assert b.modules[m][k].shape == a.modules[m][k].shape and b.modules[m][k].dtype == a.modules[m][k].dtype
    assert sorted(os.listdir(tmp_path / "out")) == sorted(os.listdir(src) + ["refine.json"])
    code, o, err = run_cli("eval", llm, "--adapter", tmp_path / "out", "--data", task[1], "--json")
    assert code == 0, err
    assert json.loads(o)["loss"] == pytest.approx(s["after"]["loss"], rel=1e-6)


def _lokr(base, out):
    """A PEFT LoKr adapter with both factors non-zero (peft's default init makes the delta zero)."""
    from peft import LoKrConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                        LoKrConfig(r=4, alpha=8, target_modules=TARGETS, init_weights=False))
    pm.save_pretrained(out)
    return out


@pytest.mark.parametrize("kind", ["dora", "lokr", "ia3"])
def test_refine_other_peft_kinds(fx, task, tmp_path, kind):
    """Every PEFT-format kind that lists refine: the loss falls, the output has the input's keys and config."""
    from surgery.io.adapter import Adapter

    from .test_ia3 import build_ia3

    llm = fx.model("llama")
    src = {"dora": lambda: fx.lora("llama", targets=TARGETS, name="dora", use_dora=True),
           "lokr": lambda: _lokr(llm, str(tmp_path / "src")),
           "ia3": lambda: build_ia3(llm, str(tmp_path / "src"))}[kind]()
    # (IA)³ rescales the random fixture's near-uniform outputs (loss ≈ ln 384) only a little: a larger
    # step, and any fall counts
    code, o, err = _refine(src, llm, task, tmp_path / "out", *(["--lr", "0.2"] if kind == "ia3" else []))
    assert code == 0, err
    s = json.loads(o)
    assert s["kind"] == kind and s["kept_step"] == 30
    assert s["after"]["loss"] < s["before"]["loss"] - (0.001 if kind == "ia3" else 0.005)
    a, b = Adapter.open(src), Adapter.open(str(tmp_path / "out"))
    assert a.config == b.config and {k: (t.shape, t.dtype) for k, t in a.tensors.items()} == \
        {k: (t.shape, t.dtype) for k, t in b.tensors.items()}
    assert s["trainable"] == sum(t.numel() for t in a.tensors.values())


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_refine_lora_on_other_families(fx, task, tmp_path, family):
    """GPT-2's Conv1D layers (fan_in_fan_out) and an encoder-decoder (the completion is the decoder's target)."""
    llm, src = fx.model(family), fx.lora(family)
    code, o, err = _refine(src, llm, task, tmp_path / "out")
    assert code == 0, err
    s = json.loads(o)
    assert s["family"] == family and s["kept_step"] == 30 and s["after"]["loss"] < s["before"]["loss"] - 0.005


# ---- bad input: one line, no output --------------------------------------------------------


def test_bad_input_is_one_line_and_writes_nothing(fx, task, tmp_path):
    llm, src = fx.model("llama"), fx.lora("llama", targets=TARGETS)
    gpt2_lora = fx.lora("gpt2")
    cases = [
        ((src, llm, task, tmp_path / "o", "--steps", "0"), "--steps 0 is out of range"),
        ((src, llm, task, tmp_path / "o", "--lr", "-1"), "--lr -1.0 is out of range"),
        ((src, llm, task, tmp_path / "o", "--backoff", "0"), "--backoff 0.0 is out of range"),
        ((str(tmp_path / "nope"), llm, task, tmp_path / "o"), "does not exist"),
        ((llm, llm, task, tmp_path / "o"), "is a model directory, not an adapter"),
        ((gpt2_lora, llm, task, tmp_path / "o"), "does not fit this LLM"),
        ((src, llm, (str(tmp_path / "missing.jsonl"), task[1]), tmp_path / "o"), "does not exist"),
        ((src, llm, task, tmp_path / "o", "--lr", "1e30"), "non-finite"),
        ((fx.model("llama") + "-no-such-dir", llm, task, tmp_path / "o"), "does not exist"),
    ]
    for args, msg in cases:
        code, _, err = _refine(*args)
        assert code != 0 and msg in err and len(err.strip().splitlines()) == 1, (args, err)
        assert not os.path.exists(tmp_path / "o")
    code, _, err = _refine(src, llm, task, llm)  # never over an input
    assert code != 0 and len(err.strip().splitlines()) == 1


def test_keep_best_never_writes_an_adapter_worse_than_its_input(fx, task, tmp_path):
    """A learning rate that only makes things worse: --keep-best (the default) gives back the input's
    weights and says so; --keep-last writes the damaged adapter."""
    from surgery.io.adapter import Adapter

    llm, src = fx.model("llama"), fx.lora("llama", targets=TARGETS)
    code, o, err = _refine(src, llm, task, tmp_path / "best", "--lr", "3", "--steps", "10")
    assert code == 0, err
    s = json.loads(o)
    assert s["kept_step"] == 0 and s["after"] == s["before"]
    a, b = Adapter.open(src).tensors, Adapter.open(str(tmp_path / "best")).tensors
    assert all(torch.equal(a[k], b[k]) for k in a)
    code, o, err = _refine(src, llm, task, tmp_path / "last", "--lr", "3", "--steps", "10", "--keep-last")
    assert code == 0, err
    s = json.loads(o)
    assert s["kept_step"] == 10 and s["after"]["loss"] > s["before"]["loss"]
    # with periodic evaluations the best of them is kept
    code, o, err = _refine(src, llm, task, tmp_path / "mid", "--eval-every", "10")
    assert code == 0, err
    s = json.loads(o)
    log = json.load(open(tmp_path / "mid" / "refine.json"))
    evals = {e["step"]: e["loss"] for e in log["history"]["evals"]}
    assert sorted(evals) == [10, 20, 30] and s["kept_step"] in evals
    assert s["after"]["loss"] == min(evals.values()) <= s["before"]["loss"]
    # a worse evaluation than the best so far restores the best state and halves lr
    code, o, err = _refine(src, llm, task, tmp_path / "backoff", "--lr", "20", "--eval-every", "10")
    assert code == 0, err
    s = json.loads(o)
    assert s["lr_schedule"][:3] == [[0, 20.0], [10, 10.0], [20, 5.0]] and s["after"]["loss"] <= s["before"]["loss"]


def test_the_evidence_measures_refine_at_its_default_steps():
    """docs/results.md reports refine "at its defaults": the evidence's step count must be RefineConfig's
    (docs/method-experiments.md measured the default on the evidence pair)."""
    from benchmarks.evidence.run import FULL
    from surgery.train.zeroth import RefineConfig

    assert FULL["refine_steps"] == RefineConfig().steps
