"""merge-lora / unmerge-lora against peft's own merge_and_unload and the unmerged peft forward."""

import json
import os

import pytest
import torch

from surgery.kinds.lora import modules as lora_modules
from surgery.errors import AdapterError, NumericsError
from surgery.io.checkpoint import Checkpoint
from surgery.pipelines.merge import DORA_NORMS, merge_lora, unmerge_lora

from .conftest import FAMILY_NAMES, MORE_FAMILIES, run_cli

ALL = {"gpt2": ["c_attn", "c_proj", "c_fc"], "t5": None}


def _cls(path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if AutoConfig.from_pretrained(path).is_encoder_decoder else AutoModelForCausalLM


def _load(path):
    model, info = _cls(path).from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def _peft(base, adapter):
    from peft import PeftModel

    return PeftModel.from_pretrained(_load(base), adapter).eval()


def _logits(model, family):
    ids = torch.arange(4, 40).view(2, 18) % 300 + 4
    kw = {"decoder_input_ids": ids[:, :7]} if family == "t5" else {}
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def _close_sd(ours, ref, atol=1e-5):
    a, b = ours.state_dict(), ref.state_dict()
    assert set(a) == set(b)
    worst = max((a[k] - b[k]).abs().max().item() for k in b)
    assert worst <= atol, worst


@pytest.mark.parametrize("family", FAMILY_NAMES + MORE_FAMILIES)
def test_merge_equals_peft_and_unmerge_restores(fx, tmp_path, family):
    base = fx.model(family)
    ad = fx.lora(family, targets=ALL.get(family), name="m")
    merge_lora(base, [ad], str(tmp_path / "m"))
    ours = _load(str(tmp_path / "m"))
    pm = _peft(base, ad)
    assert torch.allclose(_logits(ours, family), _logits(pm, family), atol=1e-4)
    _close_sd(ours, pm.merge_and_unload())
    unmerge_lora(str(tmp_path / "m"), ad, str(tmp_path / "u"))
    _close_sd(_load(str(tmp_path / "u")), _load(base))


@pytest.mark.parametrize("family,targets", [("llama", ["q_proj", "v_proj", "down_proj"]), ("gpt2", ["c_attn", "c_fc"])])
def test_dora_rslora_patterns_match_peft_and_roundtrip(fx, tmp_path, family, targets):
    base = fx.model(family)
    pat = {targets[-1]: 2}
    ad = fx.lora(family, targets=targets, name="dora", use_dora=True, use_rslora=True, rank_pattern=pat,
                 alpha_pattern={targets[0]: 3})
    merge_lora(base, [ad], str(tmp_path / "m"))
    assert os.path.exists(tmp_path / "m" / DORA_NORMS)
    pm = _peft(base, ad)
    ours = _load(str(tmp_path / "m"))
    assert torch.allclose(_logits(ours, family), _logits(pm, family), atol=1e-4)
    _close_sd(ours, pm.merge_and_unload())
    unmerge_lora(str(tmp_path / "m"), ad, str(tmp_path / "u"))
    _close_sd(_load(str(tmp_path / "u")), _load(base))
    # without the recorded norms a DoRA merge is not invertible: refuse, and say why
    os.remove(tmp_path / "m" / DORA_NORMS)
    with pytest.raises(AdapterError, match="row norms"):
        unmerge_lora(str(tmp_path / "m"), ad, str(tmp_path / "u2"))


def test_lokr_and_modules_to_save_match_peft(fx, tmp_path):
    from peft import LoKrConfig, get_peft_model

    base = fx.model("llama")
    torch.manual_seed(0)
    pm = get_peft_model(_load(base), LoKrConfig(r=4, alpha=6, target_modules=["q_proj", "down_proj", "o_proj"],
                                                decompose_both=True, decompose_factor=4, modules_to_save=["lm_head"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lokr" in n or "modules_to_save" in n:
                p.add_(0.1 * torch.randn_like(p))
    pm.save_pretrained(str(tmp_path / "lokr"))
    merge_lora(base, [str(tmp_path / "lokr")], str(tmp_path / "m"))
    ref = _peft(base, str(tmp_path / "lokr"))
    ours = _load(str(tmp_path / "m"))
    assert torch.allclose(_logits(ours, "llama"), _logits(ref, "llama"), atol=1e-4)
    _close_sd(ours, ref.merge_and_unload())


def test_weighted_adapters_are_linear(fx, tmp_path):
    base = fx.model("mistral")
    a1 = fx.lora("mistral", targets=["q_proj", "up_proj"], name="w1", seed=1)
    a2 = fx.lora("mistral", targets=["q_proj", "k_proj"], name="w2", seed=2)
    merge_lora(base, [a1, a2], str(tmp_path / "m"), weights=[0.5, -2.0])
    b = _load(base).state_dict()
    d1, d2 = _peft(base, a1).merge_and_unload().state_dict(), _peft(base, a2).merge_and_unload().state_dict()
    ours = _load(str(tmp_path / "m")).state_dict()
    for k in b:
        assert torch.allclose(ours[k], b[k] + 0.5 * (d1[k] - b[k]) - 2.0 * (d2[k] - b[k]), atol=1e-5), k


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_tied_lm_head_is_untied_and_keeps_meaning(fx, tmp_path, family):
    base = fx.model(family)
    ad = fx.lora(family, targets=["lm_head"], name="head")
    code, out, err = run_cli("merge-lora", base, ad, "-o", tmp_path / "m")
    assert code == 0, err
    assert "untied lm_head.weight" in err and "tie_word_embeddings is set false" in err
    cfg = json.load(open(tmp_path / "m" / "config.json"))
    assert cfg["tie_word_embeddings"] is False
    ours = _load(str(tmp_path / "m"))
    # the adapter's meaning: base embeddings in, adapted head out (peft's unmerged forward)
    assert torch.allclose(_logits(ours, family), _logits(_peft(base, ad), family), atol=1e-4)
    emb = ours.get_input_embeddings().weight
    assert torch.equal(emb, _load(base).get_input_embeddings().weight)


def test_bf16_rounds_once_and_unmerge_within_rounding(fx, tmp_path):
    base = fx.model("llama", dtype="bfloat16")
    ad = fx.lora("llama", targets=["q_proj", "gate_proj"], name="bf", model_kw={"dtype": "bfloat16"})
    merge_lora(base, [ad], str(tmp_path / "m"))
    ck, m = Checkpoint.open(base), Checkpoint.open(str(tmp_path / "m"))
    key = "model.layers.0.self_attn.q_proj.weight"
    from surgery.io.adapter import Adapter

    lm = {x.module: x for x in lora_modules(Adapter.open(ad))}["model.layers.0.self_attn.q_proj"]
    want = (ck.read(key).float() + lm.scaling * lm.B.float() @ lm.A.float()).to(torch.bfloat16)
    assert m.dtype(key) == torch.bfloat16 and torch.equal(m.read(key), want)
    unmerge_lora(str(tmp_path / "m"), ad, str(tmp_path / "u"))
    u, b = Checkpoint.open(str(tmp_path / "u")).read(key).float(), ck.read(key).float()
    # two roundings to bf16 (8 bits of mantissa): within 2 ulps of the larger magnitude
    assert ((u - b).abs() <= 2 * 2.0 ** -8 * torch.maximum(b.abs(), want.float().abs()) + 1e-6).all()


def test_dtype_override_and_sharding(fx, tmp_path):
    base, ad = fx.model("llama"), fx.lora("llama", targets=["v_proj"], name="sh")
    info = merge_lora(base, [ad], str(tmp_path / "m"), dtype="float16", max_shard_size="200KB")
    assert info["shards"] > 1 and os.path.exists(tmp_path / "m" / "model.safetensors.index.json")
    ck = Checkpoint.open(str(tmp_path / "m"))
    assert set(ck.dtypes()) == {"float16"}
    assert json.load(open(tmp_path / "m" / "config.json")).get("dtype", "float16") == "float16"


def test_nan_refused_naming_module(fx, tmp_path):
    from safetensors.torch import load_file, save_file

    ad = fx.lora("llama", targets=["q_proj"], name="nan")
    bad = tmp_path / "bad"
    bad.mkdir()
    sd = load_file(os.path.join(ad, "adapter_model.safetensors"))
    k = next(k for k in sd if "layers.1" in k and "lora_B" in k)
    sd[k][0, 0] = float("inf")
    save_file(sd, str(bad / "adapter_model.safetensors"))
    (bad / "adapter_config.json").write_text(open(os.path.join(ad, "adapter_config.json")).read())
    with pytest.raises(NumericsError, match=r"model\.layers\.1\.self_attn\.q_proj.*NaN/inf"):
        merge_lora(fx.model("llama"), [str(bad)], str(tmp_path / "m"))
    assert not os.path.exists(tmp_path / "m")


def test_cli_errors_are_one_line(fx, tmp_path):
    code, _, err = run_cli("merge-lora", fx.model("llama"), fx.lora("gpt2", targets=["c_attn"], name="g"), "-o", tmp_path / "x")
    assert code == 2 and err.count("\n") == 1 and "transformer.h.0.attn.c_attn is not a linear layer" in err
    code, _, err = run_cli("merge-lora", fx.model("llama"), fx.lora("llama", targets=["q_proj"], name="e"),
                           "-o", fx.model("llama"))
    assert code == 2 and "overlaps input" in err


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transposed", [False, True])
def test_fold_rounded_matches_whole_float32_fold(dtype, transposed):
    """The row-blocked in-place fold rounds once: within half an ulp (plus float32 noise) of the exact sum,
    and, bar a float32 ulp in a few products (BLAS may order a short block's sums differently), the bits
    of whole weight to float32, add each delta, round."""
    from surgery.ops import lora as L

    g = torch.Generator().manual_seed(0)
    shape = (70, 300) if not transposed else (300, 70)  # stored layout; Conv1D stores [in, out]
    w = (0.02 * torch.randn(shape, generator=g)).to(dtype)
    deltas = [L.LowRankDelta(torch.randn(4, 300, generator=g).to(dtype), torch.randn(70, 4, generator=g).to(dtype), s, transposed)
              for s in (0.5, -1.25)]
    for sign in (1, -1):
        ref, exact = w.float(), w.double()
        for d in deltas:
            ref = L.fold(ref, d, sign)
            dd = d.B.double() @ d.A.double()
            exact += sign * d.scale * (dd.T if transposed else dd)
        old = L.BLOCK_BYTES
        L.BLOCK_BYTES = 4 * 300 * 7  # several blocks, the last one short
        try:
            got = L.fold_rounded(w.clone(), deltas, sign)
        finally:
            L.BLOCK_BYTES = old
        eps = torch.finfo(dtype).eps
        assert torch.all((got.double() - exact).abs() <= exact.abs() * eps * 0.5 * 1.001 + 1e-5)
        assert (got != ref.to(dtype)).float().mean() < 0.001
        assert torch.equal(L.fold_rounded(w.clone(), deltas, sign), L.fold_rounded(w.clone(), deltas, sign))  # deterministic
