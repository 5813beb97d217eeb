"""fixtures.expand: the expanded LLM computes exactly what the SLM computes, and `kept` says where."""

import json

import pytest

CASES = [("llama", 2, 1), ("llama", 3, 2), ("qwen2", 2, 1), ("gpt2", 2, 2), ("gpt2", 3, 1)]


def _logits(path, ids):
    import torch
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64, output_loading_info=True)
    assert not any(info.values()), info
    with torch.no_grad():
        return model.eval()(ids).logits


@pytest.fixture(scope="module")
def ids():
    import torch

    return torch.randint(4, 384, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("family,width,depth,readers", [c + (0.0,) for c in CASES] + [("llama", 3, 2, 1.0), ("gpt2", 2, 1, 1.0)],
                         ids=str)
def test_expansion_is_exact(fx, tmp_path, ids, family, width, depth, readers):
    from surgery.arch import arch_of
    from surgery.io.checkpoint import Checkpoint

    from fixtures.expand import expand_model

    slm = fx.model(family)
    out = tmp_path / "llm"
    kept = expand_model(slm, str(out), width=width, depth=depth, seed=1, readers=readers)
    a, b = Checkpoint.open(slm), Checkpoint.open(str(out))
    if readers:  # the extra heads' and neurons' reading weights are live (non-zero) …
        q = b.read(next(t.name for t in arch_of(b).linears() if t.layer == 0 and t.in_dims == ("residual",)))
        assert (q != 0).float().mean() > 0.7  # (a kept row is zero off the SLM's residual channels)
    sa, sb = arch_of(a), arch_of(b)
    assert sb.dims["hidden"] == width * sa.dims["hidden"] and sb.dims["kv_heads"] == width * sa.dims["kv_heads"]
    assert sb.stacks["layers"] == depth * sa.stacks["layers"]
    la, lb = _logits(slm, ids), _logits(str(out), ids)
    assert (la - lb).abs().max() < 1e-5 * la.abs().max()
    # the kept layout: sorted, right sizes, heads whole and grouped as in GQA
    assert kept["residual"] == sorted(set(kept["residual"])) and len(kept["residual"]) == sa.dims["hidden"]
    layers = kept["layers"]["layers"]
    assert len(layers) == sb.stacks["layers"]
    group = sa.dims["heads"] // sa.dims["kv_heads"]
    for entry in layers:
        assert len(entry["heads"]) == sa.dims["heads"] and len(entry["mlp.inner"]) == sa.dims["intermediate"]
        assert sorted({h // group for h in entry["heads"]}) == entry["kv_heads"]
        hd = sa.dims["head_dim"]
        assert entry["attn.k"] == [h * hd + j for h in entry["kv_heads"] for j in range(hd)]
    meta = json.loads((out / "expand.json").read_text())
    assert meta["kept"] == kept and meta["layer_map"]["layers"][-1] == sa.stacks["layers"] - 1


def test_kept_coordinates_hold_every_weight(fx, tmp_path):
    """Restricting each linear of the first (copied) layer to `kept` loses nothing: it is the SLM's, permuted."""
    import torch

    from surgery.arch import arch_of
    from surgery.io.checkpoint import Checkpoint
    from surgery.ops.slice import select

    from fixtures.expand import expand_model

    slm = fx.model("llama")
    kept = expand_model(slm, str(tmp_path / "llm"), width=2, depth=2, seed=3)
    a, b = Checkpoint.open(slm), Checkpoint.open(str(tmp_path / "llm"))
    arch = arch_of(b)
    for t in arch.linears():
        if t.layer is None or t.layer % 2:
            continue
        w = b.read(t.name)
        sub = select(w, arch, t.dims, {**kept["layers"]["layers"][t.layer], "residual": kept["residual"]})
        ref = a.read(t.name.replace(f".{t.layer}.", f".{t.layer // 2}."))
        assert sub.shape == ref.shape
        assert torch.allclose(torch.linalg.svdvals(sub), torch.linalg.svdvals(ref), atol=1e-5)
        assert torch.allclose(w.norm(), ref.norm())  # nothing outside the kept coordinates


def test_silent_units_perturb_slightly_and_deterministically(fx, tmp_path, ids):
    from fixtures.expand import expand_model

    slm = fx.model("llama")
    k1 = expand_model(slm, str(tmp_path / "a"), width=2, silent=0.01, seed=5)
    k2 = expand_model(slm, str(tmp_path / "b"), width=2, silent=0.01, seed=5)
    assert k1 == k2
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    la, lb = _logits(slm, ids), _logits(str(tmp_path / "a"), ids)
    err = (la - lb).abs().max() / la.abs().max()
    assert 1e-6 < err < 0.1
