"""extract-krona end to end: tuned checkpoints and LoRA adapters in, PEFT LoKr adapters out."""

import json

import pytest
import torch

from surgery.kinds.lora import modules as lora_modules
from surgery.io.adapter import Adapter
from surgery.ops.kron import kron_params, lokr_shapes

from .conftest import run_cli


def _auto(path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cls = AutoModelForSeq2SeqLM if AutoConfig.from_pretrained(path).is_encoder_decoder else AutoModelForCausalLM
    return cls.from_pretrained(path, dtype=torch.float32, output_loading_info=True)


def _tune(base, out, edits):
    """Save base + edits[name] (a function of the base weight) as a tuned checkpoint."""
    model, _ = _auto(base)
    sd = model.state_dict()
    with torch.no_grad():
        for name, f in edits.items():
            sd[name].copy_(f(sd[name]))
    model.save_pretrained(out)
    return str(out)


def _merged(base, adapter):
    from peft import PeftModel

    model, _ = _auto(base)
    pm = PeftModel.from_pretrained(model, adapter)
    # the adapter must load whole: every tensor we wrote is a parameter peft now holds
    sd = pm.state_dict()
    for key, t in Adapter.open(adapter).tensors.items():
        mod, _, param = key.rpartition(".")
        loaded = f"{mod}.{param}.default" if param.startswith("lokr_") else f"{mod}.modules_to_save.default.{param}"
        assert torch.equal(sd[loaded], t), key
    return pm.merge_and_unload().state_dict()


@pytest.mark.parametrize("family,q,dense,norm", [
    ("llama", "model.layers.1.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.norm.weight"),
    ("t5", "decoder.block.1.layer.1.EncDecAttention.q", "encoder.block.0.layer.1.DenseReluDense.wo",
     "encoder.final_layer_norm.weight"),
])
def test_tuned_model_kronecker_delta_is_exact_and_merges_in_peft(fx, tmp_path, family, q, dense, norm):
    base = fx.model(family)
    g = torch.Generator().manual_seed(0)
    base_sd = _auto(base)[0].state_dict()
    (w1, w2) = lokr_shapes(*base_sd[q + ".weight"].shape)
    A, B = torch.randn(w1, generator=g), torch.randn(w2, generator=g)
    Dd = 0.05 * torch.randn(base_sd[dense + ".weight"].shape, generator=g)
    tuned = _tune(base, tmp_path / "tuned", {q + ".weight": lambda w: w + torch.kron(A, B),
                                              dense + ".weight": lambda w: w + Dd, norm: lambda w: w + 0.5})
    out = tmp_path / "lokr"
    code, stdout, err = run_cli("extract-krona", base, tuned, "-o", out, "--json")
    assert code == 0, err
    rep = json.loads(stdout)
    rows = {r["module"]: r for r in rep["modules"]}
    assert set(rows) == {q, dense} and rep["alpha"] == rep["r"]
    assert rows[q]["rel_error"] < 1e-6
    # a norm scale is not a linear layer: reported as not captured, with its delta norm
    assert [n for n, _ in rep["not_captured"]] == [norm]
    assert rep["not_captured"][0][1] == pytest.approx(0.5 * base_sd[norm].numel() ** 0.5, rel=1e-6)
    # the dense delta gets the optimal (Van Loan–Pitsianis) error
    tuned_sd = _auto(tuned)[0].state_dict()
    exact = (tuned_sd[dense + ".weight"].double() - base_sd[dense + ".weight"].double())
    fit = kron_params(exact)
    assert rows[dense]["rel_error"] == pytest.approx(fit.rel_error, rel=1e-9) and 0.5 < fit.rel_error < 1
    assert rows[dense]["compression"] == pytest.approx(exact.numel() / (fit.A.numel() + fit.B.numel()))

    merged = _merged(base, str(out))
    assert torch.allclose(merged[q + ".weight"], tuned_sd[q + ".weight"], atol=1e-5)
    want = base_sd[dense + ".weight"].double() + torch.kron(fit.A, fit.B)
    assert torch.allclose(merged[dense + ".weight"].double(), want, atol=1e-5)
    untouched = [k for k in base_sd if not k.startswith((q, dense))]
    assert all(torch.equal(merged[k], base_sd[k]) for k in untouched)

    # determinism: the same command writes byte-identical files
    code, _, _ = run_cli("extract-krona", base, tuned, "-o", tmp_path / "again")
    assert code == 0
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        assert (out / f).read_bytes() == (tmp_path / "again" / f).read_bytes()


def test_lora_adapter_as_source_with_factor(fx, tmp_path):
    base = fx.model("llama")
    lora = fx.lora("llama", targets=["q_proj", "v_proj"], name="kr", modules_to_save=["lm_head"])
    out = tmp_path / "lokr"
    code, stdout, err = run_cli("extract-krona", base, lora, "-o", out, "--factor", "4", "--targets", "q_proj", "--json")
    assert code == 0, err
    rep = json.loads(stdout)
    assert rep["source"] == "lora" and rep["modules_to_save"] == ["lm_head"] and [r["module"] for r in rep["modules"]] == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    assert rep["modules"][0]["w1"] == [4, 4] and rep["modules"][0]["w2"] == [16, 16]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["decompose_factor"] == 4 and cfg["alpha"] == cfg["r"]
    merged = _merged(base, str(out))
    base_sd = _auto(base)[0].state_dict()
    ad = Adapter.open(lora)
    assert torch.equal(merged["lm_head.weight"], ad.modules_to_save()["lm_head"]["weight"])
    for m in lora_modules(ad):
        if "q_proj" not in m.module:
            continue
        fit = kron_params(m.scaling * (m.B.double() @ m.A.double()), 4)
        want = base_sd[m.module + ".weight"].double() + torch.kron(fit.A, fit.B)
        assert torch.allclose(merged[m.module + ".weight"].double(), want, atol=1e-5)


def test_gpt2_conv1d_goes_through_merge_lora(fx, tmp_path):
    """PEFT's LoKr cannot wrap Conv1D: the adapter is written for `surgery merge-lora`, which folds it
    in the Conv1D [in, out] orientation (fused c_attn included)."""
    from surgery.io.checkpoint import Checkpoint

    base, lora = fx.model("gpt2"), fx.lora("gpt2", targets=["c_attn", "c_fc"], name="c")
    code, out, err = run_cli("extract-krona", base, lora, "-o", tmp_path / "k")
    assert code == 0, err
    assert "merge-lora" in out and "transformer.h.0.attn.c_attn" in out
    code, _, err = run_cli("merge-lora", base, tmp_path / "k", "-o", tmp_path / "m")
    assert code == 0, err
    b, m = Checkpoint.open(base), Checkpoint.open(str(tmp_path / "m"))
    ad = Adapter.open(lora)
    for mod in lora_modules(ad):
        fit = kron_params(mod.scaling * (mod.B.double() @ mod.A.double()), -1)  # [out, in]
        want = b.read(mod.module + ".weight").double() + torch.kron(fit.A, fit.B).T  # Conv1D stores [in, out]
        assert torch.allclose(m.read(mod.module + ".weight").double(), want, atol=1e-5), mod.module
    untouched = "transformer.h.0.attn.c_proj.weight"
    assert torch.equal(m.read(untouched), b.read(untouched))


def test_bad_targets_and_unchanged_model(fx, tmp_path):
    base = fx.model("llama")
    code, _, err = run_cli("extract-krona", base, base, "-o", tmp_path / "o", "--targets", "nope")
    assert code == 2 and "match no linear module" in err and "q_proj" in err
    tuned = _tune(base, tmp_path / "same", {})
    code, _, err = run_cli("extract-krona", base, tuned, "-o", tmp_path / "o")
    assert code == 2 and "differs from BASE" in err
