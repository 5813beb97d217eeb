"""What a model does to its logits after the LM head is family data (arch.logit_ops): the chunked LM head
(ops/loss.py) applies exactly those ops, and a model whose ops are not known takes its own full logits,
never the chunked path without them. Cohere (logit_scale, transformers' CohereForCausalLM) is the
reference for an op the installed families lack."""

import json

import pytest

SCALE = 3.0  # Cohere's logit_scale (default 0.0625); any value but 1 changes every loss


@pytest.fixture(scope="module")
def cohere():
    import torch
    from transformers import CohereConfig, CohereForCausalLM

    torch.manual_seed(0)
    config = CohereConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          logit_scale=SCALE, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return CohereForCausalLM(config).eval()


@pytest.fixture(scope="module")
def batch():
    import torch

    ids = torch.randint(3, 97, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0  # right padding
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100  # a prompt
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _family(tmp_path, logits):
    """A user family file claiming model_type cohere (the llama map; score only reads its "logits")."""
    from surgery.arch import FAMILY_DIR

    spec = json.load(open(f"{FAMILY_DIR}/llama.json"))
    spec.update(family="cohere-test", model_types=["cohere"], logits=logits)
    path = tmp_path / f"cohere-{len(list(tmp_path.glob('cohere-*')))}.json"  # a new name: family files are cached by path
    path.write_text(json.dumps(spec))
    return str(path)


@pytest.fixture
def families():
    from surgery.arch import use_family_files

    yield use_family_files
    use_family_files([])


def _reference(model, batch):
    import torch

    with torch.no_grad():
        out = model(**batch)
    n = int((batch["labels"][:, 1:] != -100).sum())
    return float(out.loss), n


def test_installed_families_declare_their_ops(fx):
    from surgery.arch import logit_ops

    assert logit_ops({"model_type": "gemma2", "final_logit_softcapping": 30.0}) == (("softcap", 30.0),)
    assert logit_ops({"model_type": "gemma2", "final_logit_softcapping": None}) == ()
    assert logit_ops({"model_type": "llama"}) == ()
    assert logit_ops({"model_type": "llama", "logit_scale": 0.5}) is None  # a post-head key llama does not declare
    assert logit_ops({"model_type": "cohere", "logit_scale": 0.5}) is None  # no family file


def test_an_unknown_post_head_op_takes_the_full_logits(cohere, batch, capsys, monkeypatch):
    import torch

    import surgery.arch
    from surgery.train import score

    want, n = _reference(cohere, batch)
    with torch.no_grad():
        nll, k = score.batch_nll(cohere, batch, False)
        nll2, k2, exact = score.batch_scores(cohere, batch, False)
    assert k == k2 == n and abs(float(nll) / n - want) < 1e-6 and abs(float(nll2) / n - want) < 1e-6
    assert "'cohere'" in capsys.readouterr().err
    # the chunked path without the scale is what this replaces, and it is wrong
    monkeypatch.setattr(surgery.arch, "logit_ops", lambda config: ())
    with torch.no_grad():
        assert abs(float(score.batch_nll(cohere, batch, False)[0]) / n - want) > 1e-2


def test_a_declared_op_is_applied_by_the_chunked_head(cohere, batch, families, tmp_path, monkeypatch):
    import torch

    from surgery.arch import logit_ops
    from surgery.errors import ArchitectureError
    from surgery.train import score

    families([_family(tmp_path, [{"op": "scale", "value": "logit_scale"}])])
    assert logit_ops(cohere.config.to_dict()) == (("scale", SCALE),)
    monkeypatch.setattr(score, "aligned_logits", None)  # the full-logits path is not taken
    want, n = _reference(cohere, batch)
    with torch.no_grad():
        logits = cohere(**batch).logits[:, :-1]
        right = score.exact_matches(logits, batch["labels"][:, 1:])
        nll, k = score.batch_nll(cohere, batch, False)
        nll2, k2, exact = score.batch_scores(cohere, batch, False)
    assert k == k2 == n and abs(float(nll) / n - want) < 1e-6 and abs(float(nll2) / n - want) < 1e-6
    assert exact == right

    families([_family(tmp_path, [])])  # a family that does not declare the config's logit_scale
    assert logit_ops(cohere.config.to_dict()) is None
    families([_family(tmp_path, [{"op": "clamp", "value": "logit_scale"}])])
    with pytest.raises(ArchitectureError, match="op 'clamp', not one of softcap, scale, divide"):
        score.post_head_ops(cohere)
