"""extract-lora: exact at full rank, Eckart–Young optimal at rank r, loads and runs in peft."""

import json

import pytest
import torch

from surgery.errors import AdapterError, ArchitectureError
from surgery.ops.lowrank import energy_rank, lora_factors, relative_error, truncated_svd, use_randomized
from surgery.pipelines.extract import extract_lora

from .conftest import run_cli


def _tuned(base, out, targets, seed=0, bias=False, embed=False):
    """base + a random full-rank delta on the named linear weights (and their biases), saved by transformers."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cls = AutoModelForSeq2SeqLM if AutoConfig.from_pretrained(base).is_encoder_decoder else AutoModelForCausalLM
    m = cls.from_pretrained(base, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if any(name.endswith(f"{t}.weight") for t in targets) or (bias and any(name.endswith(f"{t}.bias") for t in targets)):
                p.add_(0.02 * torch.randn(p.shape, generator=g))
        if embed:
            m.get_input_embeddings().weight.add_(0.01)
    m.save_pretrained(out)
    return m.eval()


def _peft_logits(base, adapter, ids, **kw):
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cls = AutoModelForSeq2SeqLM if AutoConfig.from_pretrained(base).is_encoder_decoder else AutoModelForCausalLM
    pm = PeftModel.from_pretrained(cls.from_pretrained(base, dtype=torch.float32), adapter).eval()
    with torch.no_grad():
        return pm(input_ids=ids, **kw).logits


IDS = torch.arange(4, 40).view(2, 18) % 300 + 4


@pytest.mark.parametrize("family,targets,kw", [
    ("llama", ["q_proj", "k_proj", "o_proj", "down_proj"], {}),
    ("gpt2", ["attn.c_attn", "mlp.c_fc"], {}),  # Conv1D and fused q|k|v: where mergekit's extract crashes
    ("t5", ["SelfAttention.q", "EncDecAttention.v", "wo"], {"decoder_input_ids": IDS[:, :5]}),
])
def test_full_rank_reproduces_tuned(fx, tmp_path, family, targets, kw):
    base = fx.model(family)
    tuned = _tuned(base, str(tmp_path / "t"), targets)
    info = extract_lora(base, str(tmp_path / "t"), str(tmp_path / "a"), rank=256, targets=targets)
    assert info["not_carried"] == [] and max(r["rel_error"] for r in info["modules"]) < 1e-6
    with torch.no_grad():
        want = tuned(input_ids=IDS, **kw).logits
    assert torch.allclose(_peft_logits(base, str(tmp_path / "a"), IDS, **kw), want, atol=1e-4)


def test_rank_r_error_is_eckart_young_optimum(fx, tmp_path):
    base = fx.model("mistral")
    _tuned(base, str(tmp_path / "t"), ["q_proj", "up_proj"])
    info = extract_lora(base, str(tmp_path / "t"), str(tmp_path / "a"), rank=3, targets=["q_proj", "up_proj"])
    from surgery.io.checkpoint import Checkpoint

    cb, ct = Checkpoint.open(base), Checkpoint.open(str(tmp_path / "t"))
    for row in info["modules"]:
        k = row["module"] + ".weight"
        s = torch.linalg.svdvals(ct.read(k).double() - cb.read(k).double())
        opt = float(s[3:].square().sum().sqrt() / s.square().sum().sqrt())
        assert row["rank"] == 3 and row["rel_error"] == pytest.approx(opt, abs=1e-6)


@pytest.fixture
def one_thread():
    """LAPACK on 2 threads of a shared 2-core machine is 30× slower (spin-waiting); these sizes need 1."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_randomized_svd_reaches_the_optimum_on_a_flat_spectrum(one_thread):
    g = torch.Generator().manual_seed(0)
    D = torch.randn(600, 700, generator=g, dtype=torch.float64)  # random: the hardest (flattest) spectrum
    assert use_randomized(D.shape, 2)
    for verify in (True, False):
        U, S, Vh, method, err, opt_reported, _ = truncated_svd(D, 2, verify=verify)
        assert method == "krylov"
        A, B = lora_factors(U, S, Vh)
        s = torch.linalg.svdvals(D)
        opt = float(s[2:].square().sum().sqrt() / s.square().sum().sqrt())
        assert relative_error(D, A, B) == pytest.approx(opt, abs=1e-6) and err == pytest.approx(relative_error(D, A, B), abs=1e-9)
        assert opt_reported is None if not verify else opt_reported == pytest.approx(opt, abs=1e-12)
    assert relative_error(D, A, B) == pytest.approx(float((D - B @ A).norm() / D.norm()), abs=1e-9)
    assert energy_rank(torch.tensor([3.0, 2.0, 1.0]), 13 / 14) == 2 and energy_rank(torch.tensor([3.0, 2.0, 1.0]), 0.95) == 3


def _bf16_delta(kind: str, m: int = 2640, n: int = 960):
    """tuned − base of two bf16 matrices, [m, n] (TinyLlama's 5632×2048 MLP aspect, at ~half width)."""
    g = torch.Generator().manual_seed(0)
    base = (0.002 * torch.randn(m, n, generator=g)).bfloat16()  # small weights: a low bf16 rounding floor
    if kind == "merged-lora":  # rank 16, σ ≈ 1, over the rounding floor ~2000× below
        delta = torch.randn(m, 16, generator=g) * 0.02 @ (torch.randn(16, n, generator=g) / n ** 0.5)
    else:  # slowly decaying spectrum σ_i ∝ i^-0.5
        U, _ = torch.linalg.qr(torch.randn(m, n, generator=g))
        V, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
        delta = (U * (0.05 * torch.arange(1, n + 1) ** -0.5)) @ V.T
    return (base.float() + delta).bfloat16().float() - base.float()


@pytest.mark.parametrize("kind", ["merged-lora", "slow-decay"])
def test_krylov_reaches_the_optimum_at_real_aspect_in_bf16(one_thread, kind):
    """The float32 Krylov basis of the old code lost orthogonality on the merged-LoRA delta (‖KᵀK − I‖ ≫ 1) and
    wrote factors with relative error 4.7, worse than no adapter; the float64 basis reaches Eckart–Young."""
    d = _bf16_delta(kind)
    s = torch.linalg.svdvals(d.double())
    opt = float(s[16:].square().sum().sqrt() / s.square().sum().sqrt())
    for verify in (True, False):
        res = truncated_svd(d, 16, verify=verify)
        A, B = lora_factors(res.U, res.S, res.Vh)
        assert res.method == "krylov" and relative_error(d, A, B) == pytest.approx(opt, abs=1e-7)
        assert res.error == pytest.approx(opt, abs=1e-7) and float(res.S[0]) == pytest.approx(float(s[0]), rel=1e-9)
        if verify:
            assert res.optimum == pytest.approx(opt, abs=1e-9)
            assert torch.allclose(res.spectrum, s, rtol=1e-6, atol=1e-9 * float(s[0]))


def test_a_miss_falls_back_to_the_exact_svd(one_thread, monkeypatch):
    """If the randomized basis misses the optimum by more than 1e-3, the exact SVD replaces it (never a worse row)."""
    from surgery.ops import lowrank as L

    g = torch.Generator().manual_seed(1)
    d = torch.randn(600, 700, generator=g) * torch.logspace(0, -3, 700)
    monkeypatch.setattr(L, "_block_krylov", lambda apply, m, rank, seed: torch.linalg.qr(torch.randn(m, rank, dtype=torch.float64))[0])
    res = L.truncated_svd(d, 2)
    assert res.method == "exact (fallback)" and res.error == pytest.approx(res.optimum, abs=1e-9)
    assert L.truncated_svd(d, 2, verify=False).error > 0.01 + res.optimum  # unverified: the bad basis stands


def test_an_adapter_worse_than_none_is_an_error_and_writes_nothing(fx, tmp_path, monkeypatch):
    from surgery.ops import lowrank as L
    from surgery.pipelines import extract as E

    base = fx.model("llama")
    _tuned(base, str(tmp_path / "t"), ["q_proj"])

    def broken(delta, rank, seed=0, verify=True):  # B A = 9 Δ: relative error 8
        r = L.truncated_svd(delta, rank, seed, verify=verify)
        return r._replace(S=r.S * 9, error=0.0)

    monkeypatch.setattr(E, "truncated_svd", broken)
    code, out, err = run_cli("extract-lora", base, tmp_path / "t", "-o", tmp_path / "a", "--rank", "64", "--targets", "q_proj")
    assert code != 0 and "worse than no adapter; nothing was written" in err and "Traceback" not in err
    assert not (tmp_path / "a").exists()


def test_qwen2_bias_deltas_are_applied_by_peft(fx, tmp_path):
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from peft.utils import load_peft_weights
    from transformers import AutoModelForCausalLM

    base = fx.model("qwen2")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    tuned = _tuned(base, str(tmp_path / "t"), targets, bias=True)
    info = extract_lora(base, str(tmp_path / "t"), str(tmp_path / "a"), rank=64, targets=targets)
    assert info["lora_bias"]
    with torch.no_grad():
        want = tuned(input_ids=IDS).logits
    assert torch.allclose(_peft_logits(base, str(tmp_path / "a"), IDS), want, atol=1e-4)
    # every saved key lands in the peft model, and every lora parameter is in the file
    cfg = LoraConfig.from_pretrained(str(tmp_path / "a"))
    pm = get_peft_model(AutoModelForCausalLM.from_pretrained(base), cfg)
    res = set_peft_model_state_dict(pm, load_peft_weights(str(tmp_path / "a")))
    assert not res.unexpected_keys and not [k for k in res.missing_keys if "lora_" in k]
    # peft's merge_and_unload refuses lora_bias on bias-less o_proj; merge-lora folds it (zero biases skipped)
    from surgery.pipelines.merge import merge_lora

    merge_lora(base, [str(tmp_path / "a")], str(tmp_path / "m"))
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m")).state_dict()
    assert max((merged[k] - v).abs().max().item() for k, v in tuned.state_dict().items()) < 1e-5


def test_energy_mode_picks_ranks_and_peft_loads_patterns(fx, tmp_path):
    base = fx.model("llama")
    tuned = _tuned(base, str(tmp_path / "t"), ["v_proj", "gate_proj"], embed=True)
    code, out, err = run_cli("extract-lora", base, tmp_path / "t", "-o", tmp_path / "a", "--energy", "0.999999",
                             "--targets", "v_proj", "--targets", "gate_proj", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert {r["rank"] for r in info["modules"]} == {32, 64}  # full rank of each shape
    assert info["not_carried"] == ["model.embed_tokens.weight"]
    cfg = json.load(open(tmp_path / "a" / "adapter_config.json"))
    assert cfg["r"] == 64 and set(cfg["rank_pattern"].values()) == {32}
    with torch.no_grad():
        tuned.get_input_embeddings().weight.sub_(0.01)  # the untargeted embedding change is not carried
        want = tuned(input_ids=IDS).logits
    assert torch.allclose(_peft_logits(base, str(tmp_path / "a"), IDS), want, atol=1e-4)


def test_table_and_errors(fx, tmp_path):
    base = fx.model("llama")
    _tuned(base, str(tmp_path / "t"), ["q_proj"])
    code, out, err = run_cli("extract-lora", base, tmp_path / "t", "-o", tmp_path / "a", "--rank", "4", "--targets", "q_proj")
    assert code == 0 and "model.layers.1.self_attn.q_proj" in out and "rel. error" in out
    with pytest.raises(AdapterError, match="exactly one of --rank and --energy"):
        extract_lora(base, str(tmp_path / "t"), str(tmp_path / "b"))
    with pytest.raises(AdapterError, match="no linear module"):
        extract_lora(base, str(tmp_path / "t"), str(tmp_path / "b"), rank=2, targets=["nothing"])
    with pytest.raises(ArchitectureError, match="base is llama but tuned is gpt2"):
        extract_lora(base, fx.model("gpt2"), str(tmp_path / "b"), rank=2)


def test_float64_products_on_float32_delta_match_a_float64_copy():
    """mm64 / sumsq64 promote Δ a block at a time; the results are those of a float64 copy of Δ."""
    from surgery.ops import lowrank as L

    g = torch.Generator().manual_seed(0)
    D = torch.randn(130, 70, generator=g)
    old = L.BLOCK_BYTES
    L.BLOCK_BYTES = 8 * 130 * 3  # many blocks, the last one short
    try:
        for d in (D, D.T):  # contiguous, and a transposed view (blocked over its columns)
            Lm = torch.randn(5, d.shape[0], generator=g, dtype=torch.float64)
            assert torch.allclose(L.mm64(Lm, d), Lm @ d.double(), rtol=1e-12, atol=1e-12)
            assert L.sumsq64(d) == pytest.approx(float(d.double().square().sum()), rel=1e-13)
    finally:
        L.BLOCK_BYTES = old
