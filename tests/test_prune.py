"""prune-bridge: Fisher-information structured pruning into a standard bridge checkpoint."""

import hashlib
import json
import os

import pytest

from surgery.errors import DataError, ShapeError

from .conftest import run_cli

FAST = dict(samples=4, seq_len=32, batch_size=4, force=True)


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    from fixtures.corpus import documents

    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n".join(documents(48, seed=3)) + "\n")
    return str(path)


def _load(path):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cls = AutoModelForSeq2SeqLM if AutoConfig.from_pretrained(path).is_encoder_decoder else AutoModelForCausalLM
    model, info = cls.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def _logits(model, ids):
    import torch

    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(input_ids=ids, decoder_input_ids=ids[:, :5]).logits
        return model(input_ids=ids).logits


def _ids(n=2, length=12):
    import torch

    return torch.randint(4, 384, (n, length), generator=torch.Generator().manual_seed(5))


def _digest(path):
    h = {}
    for root, _, files in os.walk(path):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                h[os.path.relpath(os.path.join(root, f), path)] = hashlib.sha256(fh.read()).hexdigest()
    return h


def _kl(p_logits, q_logits) -> float:
    lp, lq = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral", "qwen2", "t5", "phi3", "qwen3"])
def test_keep_everything_reproduces_the_llm_exactly(fx, calib, tmp_path, family):
    import torch

    from surgery.pipelines.prune import prune_bridge

    llm = fx.model(family)
    r = prune_bridge(llm, tmp_path / "b", calib, reduction=1, **FAST)
    assert r["parameters"]["bridge"] == r["parameters"]["llm"]
    assert r["kept"]["residual"] == list(range(64))
    ids = _ids()
    assert torch.equal(_logits(_load(llm), ids), _logits(_load(tmp_path / "b"), ids))
    assert r["calibration_loss"]["bridge"] == r["calibration_loss"]["llm"]


@pytest.mark.parametrize("family,extra", [("gpt2", ["--drop-layers", "1"]), ("qwen2", []), ("t5", []), ("phi3", []),
                                          ("qwen3", []), ("qwen2", ["--residual", "prune"]),
                                          ("t5", ["--residual", "prune"])])
def test_reduction_4_loads_runs_and_keeps_a_quarter(fx, calib, tmp_path, family, extra):
    """--reduction 4 keeps about a quarter of the non-embedding parameters; by default every residual
    channel (GPT-2 keeps every head with its residual, so it reaches 1/4 only by dropping a layer)."""
    import torch

    from surgery.arch import load_arch

    llm = fx.model(family)
    before = _digest(llm)
    code, out, err = run_cli("prune-bridge", llm, "-o", tmp_path / "b", "--data", calib, "--reduction", "4",
                             "--samples", "4", "--seq-len", "32", *extra)
    assert code == 0, err
    assert "importance mass retained per layer" in out and "calibration loss" in out and "non-embedding" in out
    assert _digest(llm) == before  # the input is untouched
    b = tmp_path / "b"
    man = json.loads((b / "bridge.json").read_text())
    model = _load(b)
    n = sum(p.numel() for p in model.parameters())
    p = man["parameters"]
    assert n == p["bridge"]
    vocab = ("embed_tokens", "shared.", "wte.", "wpe.", "lm_head.")  # named_parameters lists tied weights once
    emb = sum(w.numel() for k, w in model.named_parameters() if any(v in k for v in vocab))
    assert p["bridge_non_embedding"] == n - emb
    assert 0.2 < p["bridge_non_embedding"] / p["llm_non_embedding"] < 0.3
    assert torch.isfinite(_logits(model, _ids())).all()
    assert (b / "tokenizer.json").exists()
    arch = load_arch(json.loads((b / "config.json").read_text()))
    assert {k: arch.dims[k] for k in man["sizes"]} == man["sizes"]
    assert man["format"] == "surgery.bridge/1" and man["source"] == os.path.abspath(llm)
    assert man["residual"] == ("prune" if "prune" in extra else "keep")
    if man["residual"] == "keep":
        assert man["kept"]["residual"] == list(range(64)) and man["norms"] == {}
    else:
        assert len(man["kept"]["residual"]) == man["sizes"]["hidden"] < 64
    assert len(man["kept"]["residual"]) == man["sizes"]["hidden"] == len(set(man["kept"]["residual"]))
    assert man["layers"]["bridge"] == {st: len([e for e in lay if e]) for st, lay in man["kept"]["layers"].items()}
    rep = man["llm_sizes"]["heads"] // man["llm_sizes"]["kv_heads"]
    for stack, layers in man["kept"]["layers"].items():
        layers = [lay for lay in layers if lay is not None]
        for lay in layers:
            assert lay["mlp.inner"] == sorted(lay["mlp.inner"]) and len(lay["mlp.inner"]) == man["sizes"]["intermediate"]
            # whole grouped-query groups: every kept kv head brings all its query heads
            assert lay["heads"] == [k * rep + j for k in lay["kv_heads"] for j in range(rep)]
            assert len(lay["attn.q"]) == len(lay["heads"]) * arch.dims["head_dim"]
        if stack in ("encoder", "decoder"):  # T5: layer 0's relative bias serves every layer
            assert len({tuple(lay["heads"]) for lay in layers}) == 1


def test_same_inputs_give_byte_identical_output(fx, calib, tmp_path):
    """Twice the same command -> the same bytes, also when calibration goes through accelerate."""
    from surgery.pipelines.prune import prune_bridge

    llm = fx.model("llama")
    prune_bridge(llm, tmp_path / "a", calib, reduction=4, **FAST)
    prune_bridge(llm, tmp_path / "b", calib, reduction=4, device_map="auto", **FAST)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")


@pytest.mark.parametrize("family,importance,silent", [("qwen2", "fisher-mask", 0.02), ("llama", "fisher-param", 0.0)])
def test_a_hidden_small_model_is_found_again(fx, calib, tmp_path, monkeypatch, family, importance, silent):
    """An LLM that hides a small model among near-silent units is pruned back to the small one."""
    import torch

    from surgery.pipelines import importance as imp
    from surgery.pipelines.prune import prune_bridge

    expand = pytest.importorskip("fixtures.expand", reason="fixtures/expand.py (branch transfer) is missing")
    slm = fx.model(family)
    big = tmp_path / "big"
    truth = expand.expand_model(slm, str(big), width=2, silent=silent, seed=1)
    sizes = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, residual="prune")
    r = prune_bridge(big, tmp_path / "bridge", calib, importance=importance, **sizes, **FAST)
    assert r["kept"]["residual"] == truth["residual"]
    for got, want in zip(r["kept"]["layers"]["layers"], truth["layers"]["layers"]):
        assert {k: got[k] for k in want} == want

    # a random cut of the same sizes, through the same recalibration and writer
    real_units = imp.units

    def random_units(arch, scores):
        g = torch.Generator().manual_seed(0)
        return {k: torch.rand(v.shape, generator=g, dtype=torch.float64) for k, v in real_units(arch, scores).items()}

    monkeypatch.setattr(imp, "units", random_units)
    prune_bridge(big, tmp_path / "random", calib, importance=importance, **sizes, **FAST)
    ids = _ids()
    ref = _logits(_load(big), ids)
    kl_found, kl_random = _kl(ref, _logits(_load(tmp_path / "bridge"), ids)), _kl(ref, _logits(_load(tmp_path / "random"), ids))
    assert kl_random > 1e-3
    assert kl_found < 0.02 * kl_random, (kl_found, kl_random)


def test_fisher_param_matches_squared_gradients_and_holds_one_gradient(fx, calib, monkeypatch):
    """Hooked row/column Fisher = the same sums over explicit .grad; never two gradients at once."""
    import torch

    from surgery.arch import load_arch
    from surgery.ops.fisher import axis_scores
    from surgery.pipelines import importance as imp
    from surgery.pipelines.calibration import load_model, token_blocks

    path = fx.model("llama")
    arch = load_arch(json.loads(open(os.path.join(path, "config.json")).read()))
    blocks, _ = token_blocks(path, calib, 4, 16, 0)
    model = load_model(path)
    live = []
    real = imp.accumulate_tensor

    def spy(scores, arch_, spec, sq):
        live.append(sum(p.grad is not None for p in model.parameters()))
        real(scores, arch_, spec, sq)

    monkeypatch.setattr(imp, "accumulate_tensor", spy)
    got = imp.fisher_param(model, arch, blocks, batch_size=4)  # one batch: Fisher = grad^2
    assert max(live) == 1 and all(p.grad is None for p in model.parameters())

    ref_model = load_model(path)
    ref_model(input_ids=blocks, labels=blocks).loss.backward()
    want: dict = {}
    for name, p in ref_model.named_parameters():
        spec = arch.by_name()[name]
        for space, v in axis_scores(p.grad.pow(2), spec.dims, arch):
            key = ("residual",) if space == "residual" else (spec.stack, spec.layer, space)
            if space == "residual" or spec.stack is not None:
                want[key] = want.get(key, 0) + v
    assert set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-12)


def test_fisher_mask_equals_weight_times_gradient(fx, calib):
    """dL/dm for a head (neuron) mask = sum of W * dL/dW over the o_proj (down_proj) columns it owns."""
    import torch

    from surgery.arch import load_arch
    from surgery.pipelines import importance as imp
    from surgery.pipelines.calibration import load_model, token_blocks

    path = fx.model("llama")
    arch = load_arch(json.loads(open(os.path.join(path, "config.json")).read()))
    blocks, _ = token_blocks(path, calib, 4, 16, 0)
    model = load_model(path)
    got = imp.fisher_mask(model, arch, blocks, batch_size=4)  # blocks recomputed in backward; ref: plain backward
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    ref = load_model(path)
    ref(input_ids=blocks, labels=blocks).loss.backward()
    for i in range(2):
        layer = ref.model.layers[i]
        o = (layer.self_attn.o_proj.weight * layer.self_attn.o_proj.weight.grad).sum(0).reshape(4, 16).sum(1)
        torch.testing.assert_close(got[("layers", i, "heads:attn")], o.double().pow(2), rtol=1e-4, atol=1e-12)
        d = (layer.mlp.down_proj.weight * layer.mlp.down_proj.weight.grad).sum(0)
        torch.testing.assert_close(got[("layers", i, "mlp.inner")], d.double().pow(2), rtol=1e-4, atol=1e-12)
        # the layer's scalar mask scales both its residual writes: dL/dm = sum W * dW over o_proj and down_proj
        lay = o.sum() + d.sum()
        torch.testing.assert_close(got[("layers", i, "layer")], lay.double().pow(2).reshape(1), rtol=1e-4, atol=1e-12)
    assert got[("residual",)].shape == (64,) and bool((got[("residual",)] > 0).all())


def test_norm_recalibration_is_exact_when_dropped_channels_are_silent():
    import torch

    from surgery.ops.fisher import norm_correction, recalibrate_norm

    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 8, dtype=torch.float64, generator=g)
    kept = [0, 2, 3, 6]
    x[:, [1, 4, 5, 7]] = 0.0
    gain = torch.rand(8, dtype=torch.float64, generator=g) + 0.5
    r, s, n = norm_correction(x, kept, "rms")
    g2, _ = recalibrate_norm(gain[kept], None, r / n, s / n)
    full = gain * x / x.pow(2).mean(-1, keepdim=True).sqrt()
    part = g2.double() * x[:, kept] / x[:, kept].pow(2).mean(-1, keepdim=True).sqrt()
    torch.testing.assert_close(part, full[:, kept], rtol=1e-6, atol=1e-6)
    # LayerNorm: tokens a_t * [u, v] + b_t; the kept u has another mean and spread, fixed by (ratio, shift)
    u, v = torch.randn(4, dtype=torch.float64, generator=g), torch.randn(4, dtype=torch.float64, generator=g) + 1.0
    a, b = torch.rand(50, 1, dtype=torch.float64, generator=g) + 0.1, torch.randn(50, 1, dtype=torch.float64, generator=g)
    z = a * torch.cat([u, v]) + b
    bias = torch.randn(8, dtype=torch.float64, generator=g)
    r, s, n = norm_correction(z, [0, 1, 2, 3], "layer")
    g2, b2 = recalibrate_norm(gain[:4], bias[:4], r / n, s / n)
    full = torch.nn.functional.layer_norm(z, (8,), gain, bias, eps=0.0)[:, :4]
    part = torch.nn.functional.layer_norm(z[:, :4], (4,), g2.double(), b2.double(), eps=0.0)
    torch.testing.assert_close(part, full, rtol=1e-5, atol=1e-5)


def test_data_errors_name_the_line(tmp_path, fx):
    from surgery.io.data import documents

    bad = tmp_path / "d.jsonl"
    bad.write_text('{"text": "a"}\n\n{"text": 3}\n')
    with pytest.raises(DataError, match=r"d.jsonl:3: \"text\" is a number, not a string"):
        documents(str(bad))
    bad.write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(DataError, match=r"d.jsonl:2: not valid JSON"):
        documents(str(bad))
    empty = tmp_path / "e.txt"
    empty.write_text("\n  \n")
    code, _, err = run_cli("prune-bridge", fx.model("llama"), "-o", tmp_path / "o", "--data", empty)
    assert code != 0 and "has no text" in err and "Traceback" not in err and not (tmp_path / "o").exists()


def test_size_requests_that_break_the_family_are_refused(fx, calib, tmp_path):
    from surgery.pipelines.prune import prune_bridge

    with pytest.raises(ShapeError, match="multiple of 2"):
        prune_bridge(fx.model("qwen2"), tmp_path / "o", calib, num_attention_heads=3)
    with pytest.raises(ShapeError, match="head_dim"):
        prune_bridge(fx.model("gpt2"), tmp_path / "o", calib, hidden_size=40, residual="prune")
    with pytest.raises(ShapeError, match="add --residual prune"):  # the default bridge keeps the residual
        prune_bridge(fx.model("llama"), tmp_path / "o", calib, hidden_size=32)
    with pytest.raises(ShapeError, match="keeps all 4 heads"):
        prune_bridge(fx.model("gpt2"), tmp_path / "o", calib, num_attention_heads=2)
    with pytest.raises(ShapeError, match="drop-layers 2 is outside 0..1"):
        prune_bridge(fx.model("llama"), tmp_path / "o", calib, drop_layers=2)
    with pytest.raises(ShapeError, match="outside"):
        prune_bridge(fx.model("llama"), tmp_path / "o", calib, intermediate_size=999)
    assert not (tmp_path / "o").exists()


def test_a_family_whose_map_says_unsupported_is_refused(fx, calib, tmp_path):
    code, _, err = run_cli("prune-bridge", fx.model("gemma"), "-o", tmp_path / "o", "--data", calib)
    assert code == 2 and "does not support gemma" in err and "sqrt(hidden_size)" in err and not (tmp_path / "o").exists()


def test_sharded_bfloat16_llm_keeps_dtype_and_values(fx, calib, tmp_path):
    """Keeping everything copies every tensor bit for bit, in the LLM's dtype, from any shard layout."""
    import torch

    from surgery.io.checkpoint import Checkpoint
    from surgery.pipelines.prune import prune_bridge

    llm = fx.model("llama", dtype="bfloat16", max_shard_size="100KB")
    src = Checkpoint.open(llm)
    assert len(src.shards) > 1
    prune_bridge(llm, tmp_path / "b", calib, reduction=1, importance="magnitude", **FAST)
    out = Checkpoint.open(tmp_path / "b")
    assert sorted(out.keys()) == sorted(src.keys())
    for k in src.keys():
        a, b = src.read(k), out.read(k)
        assert b.dtype == torch.bfloat16 and torch.equal(a, b), k
