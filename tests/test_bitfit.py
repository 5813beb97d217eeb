"""extract-bitfit / apply-bitfit: bias-only deltas round-trip bit-exactly; the norm report is honest."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from .conftest import run_cli


def _tensors(path):
    from surgery.io.checkpoint import Checkpoint

    ck = Checkpoint.open(str(path))
    return {k: ck.read(k) for k in ck.keys()}


def _tune(base, out, cls_name="AutoModelForCausalLM", weight=None, **kw):
    from fixtures import build_bias_tuned

    return build_bias_tuned(base, str(out), also=(weight,) if weight else (), cls=cls_name, **kw)


def _same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("family,kw", [("gpt2", {}), ("qwen2", {"dtype": "bfloat16"}), ("llama", {"attention_bias": True})])
def test_bias_only_fine_tune_round_trips_bit_exactly(fx, tmp_path, family, kw):
    from transformers import AutoModelForCausalLM

    base = fx.model(family, **kw)
    tuned = _tune(base, tmp_path / "tuned")
    code, out, err = run_cli("extract-bitfit", base, tuned, "-o", tmp_path / "d", "--json")
    assert code == 0, err
    m = json.loads(out)
    want, got = _tensors(tuned), _tensors(base)
    changed = sorted(k for k in want if not _same_bits(want[k], got[k]))
    assert sorted(k["name"] for k in m["kept"]) == changed and all(k.endswith(".bias") for k in changed)
    assert m["heads"] == [] and m["norms"]["outside_fraction"] == 0.0 and m["norms"]["changed_other"] == 0
    delta = load_file(str(tmp_path / "d" / "bitfit.safetensors"))
    assert set(delta) == set(changed)
    assert m["sizes"]["delta_bytes"] == sum(t.numel() * t.element_size() for t in delta.values()) and m["sizes"]["fraction"] < 0.05

    code, _, err = run_cli("apply-bitfit", base, tmp_path / "d", "-o", tmp_path / "r")
    assert code == 0, err
    back = _tensors(tmp_path / "r")
    assert set(back) == set(want) and all(_same_bits(back[k], want[k]) for k in want)
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path / "r", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_task_head_is_kept_and_restored(fx, tmp_path):
    from transformers import AutoModelForSequenceClassification

    base = fx.model("qwen2")
    tuned = _tune(base, tmp_path / "tuned", "AutoModelForSequenceClassification", num_labels=3)
    code, out, err = run_cli("extract-bitfit", base, tuned, "-o", tmp_path / "d", "--json")
    assert code == 0, err
    m = json.loads(out)
    assert m["heads"] == ["score.weight"] and {k["name"]: k["kind"] for k in m["kept"]}["score.weight"] == "head"
    code, _, err = run_cli("apply-bitfit", base, tmp_path / "d", "-o", tmp_path / "r")
    assert code == 0, err
    want, back = _tensors(tuned), _tensors(tmp_path / "r")
    assert set(back) == set(want) and all(_same_bits(back[k], want[k]) for k in want)
    assert json.loads((tmp_path / "r" / "config.json").read_text()) == json.loads((tmp_path / "tuned" / "config.json").read_text())
    model, info = AutoModelForSequenceClassification.from_pretrained(tmp_path / "r", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and model.config.num_labels == 3


def test_resized_embeddings_are_kept_whole(fx, tmp_path):
    from transformers import AutoModelForCausalLM

    base = fx.model("gpt2")
    model = AutoModelForCausalLM.from_pretrained(base)
    model.resize_token_embeddings(model.config.vocab_size + 8)  # a tokenizer grown during fine-tuning
    model.save_pretrained(tmp_path / "grown")
    tuned = _tune(str(tmp_path / "grown"), tmp_path / "tuned")
    code, out, err = run_cli("extract-bitfit", base, tuned, "-o", tmp_path / "d", "--json")
    assert code == 0, err
    assert json.loads(out)["heads"] == ["transformer.wte.weight"]
    code, _, err = run_cli("apply-bitfit", base, tmp_path / "d", "-o", tmp_path / "r")
    assert code == 0, err
    want, back = _tensors(tuned), _tensors(tmp_path / "r")
    assert set(back) == set(want) and all(_same_bits(back[k], want[k]) for k in want)
    _, info = AutoModelForCausalLM.from_pretrained(tmp_path / "r", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_norm_report_shows_what_a_bias_only_delta_drops(fx, tmp_path):
    base = fx.model("gpt2")
    w = "transformer.h.1.mlp.c_fc.weight"
    tuned = _tune(base, tmp_path / "tuned", weight=w)
    code, out, err = run_cli("extract-bitfit", base, tuned, "-o", tmp_path / "d")
    assert code == 0, err
    assert "not restore" in out and "transformer.h.1.mlp.c_fc.weight" in out
    m = json.loads((tmp_path / "d" / "bitfit.json").read_text())
    a, b = _tensors(base), _tensors(tuned)
    sq = {k: float(((b[k].double() - a[k].double()) ** 2).sum()) for k in a}
    bias_sq = sum(v for k, v in sq.items() if k.endswith(".bias"))
    n = m["norms"]
    assert n["other_norm"] == pytest.approx(sq[w] ** 0.5, rel=1e-12)
    assert n["outside_fraction"] == pytest.approx((sq[w] / (sq[w] + bias_sq)) ** 0.5, rel=1e-12)
    assert n["changed_other"] == 1 and n["largest_other"][0][0] == w
    # applying restores the biases but not the weight, as reported
    run_cli("apply-bitfit", base, tmp_path / "d", "-o", tmp_path / "r")
    back = _tensors(tmp_path / "r")
    assert _same_bits(back[w], a[w]) and _same_bits(back["transformer.h.1.mlp.c_fc.bias"], b["transformer.h.1.mlp.c_fc.bias"])


def test_model_without_biases_gets_a_clear_message(fx, tmp_path):
    code, _, err = run_cli("extract-bitfit", fx.model("t5"), fx.model("t5"), "-o", tmp_path / "d")
    assert code == 2 and "t5 model without bias terms" in err and "extract-krona" in err
    assert not (tmp_path / "d").exists()


def test_apply_refuses_a_different_base(fx, tmp_path):
    base = fx.model("qwen2")
    code, _, err = run_cli("extract-bitfit", base, _tune(base, tmp_path / "tuned"), "-o", tmp_path / "d")
    assert code == 0, err  # the refusal below must be about the base, not a missing delta
    code, _, err = run_cli("apply-bitfit", fx.model("gpt2"), tmp_path / "d", "-o", tmp_path / "r")
    assert code == 2 and "is not the base this delta was extracted from" in err and f"pass {base}" in err
    # an identical copy of the base is accepted
    shutil.copytree(base, tmp_path / "copy")
    code, _, err = run_cli("apply-bitfit", tmp_path / "copy", tmp_path / "d", "-o", tmp_path / "r")
    assert code == 0, err
