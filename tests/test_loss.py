"""The chunked LM loss (surgery/ops/loss.py) against torch's and transformers' own: value and gradients,
label shifting, ignored labels, soft-capping, and that the full logits are never saved for backward."""

import pytest

from .test_prune import calib  # noqa: F401 (pytest fixture)
from .train_fixtures import task  # noqa: F401 (pytest fixture)


def _max_saved_numel(fn):
    """Run fn under a saved-tensor hook; the largest tensor autograd kept for backward."""
    import torch

    biggest = [0]

    def pack(t):
        biggest[0] = max(biggest[0], t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, biggest[0]


def test_chunks_match_one_cross_entropy_and_keep_no_logits():
    import torch
    import torch.nn.functional as F

    from surgery.ops.loss import IGNORE, chunked_nll

    g = torch.Generator().manual_seed(0)
    n, hdim, vocab = 37, 16, 50
    h = torch.randn(n, hdim, generator=g, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(hdim, vocab, dtype=torch.float64)
    y = torch.randint(0, vocab, (n,), generator=g)
    y[[0, 5, 6, 30]] = IGNORE
    ref = F.cross_entropy(head(h), y, ignore_index=IGNORE, reduction="sum")
    ref.backward()
    want = h.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()
    h.grad = head.weight.grad = head.bias.grad = None
    (nll, k), saved = _max_saved_numel(lambda: chunked_nll(h, y, head, vocab, elements=4 * vocab))  # 9 chunks
    nll.backward()
    assert k == n - 4
    assert torch.allclose(nll, ref, rtol=1e-12)
    for a, b in zip((h.grad, head.weight.grad, head.bias.grad), want):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    assert saved < 4 * vocab + 1  # the recomputation keeps at most one chunk's inputs, never [n, vocab]
    # every label ignored: zero, and a backward still runs
    nll, k = chunked_nll(h, torch.full_like(y, IGNORE), head, vocab)
    nll.backward()
    assert k == 0 and float(nll) == 0.0


def test_post_head_ops_are_applied_in_order_before_the_loss():
    import torch
    import torch.nn.functional as F

    from surgery.ops.loss import chunked_nll, chunked_scores

    g = torch.Generator().manual_seed(1)
    h = torch.randn(9, 8, generator=g) * 30
    head = torch.nn.Linear(8, 11, bias=False)
    y = torch.randint(0, 11, (9,), generator=g)
    z = torch.tanh(head(h) * 0.25 / 5.0) * 5.0 / 2.0
    post = (("scale", 0.25), ("softcap", 5.0), ("divide", 2.0))
    want = F.cross_entropy(z, y, reduction="sum")
    nll, _ = chunked_nll(h, y, head, 11, post=post, elements=22)
    assert torch.allclose(nll, want, rtol=1e-6)
    with torch.no_grad():
        nll, _, pred = chunked_scores(h, y, head, 11, post=post, elements=22)
    assert torch.allclose(nll, want, rtol=1e-6) and torch.equal(pred, z.argmax(-1))
    assert not torch.allclose(chunked_nll(h, y, head, 11, elements=22)[0], want, rtol=1e-3)  # the ops matter here


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2", "qwen3", "phi3"])
def test_batch_nll_equals_transformers_loss_and_gradients(fx, family):
    """Shifted labels, a masked prompt, right padding; every parameter trainable (tied heads included)."""
    import torch
    from transformers import AutoModelForCausalLM

    from surgery.train.score import batch_nll

    model = AutoModelForCausalLM.from_pretrained(fx.model(family), dtype=torch.float32)
    model.train()
    g = torch.Generator().manual_seed(2)
    V = model.config.vocab_size
    ids = torch.randint(3, V, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # padding
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt
    labels[mask == 0] = -100
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def grads():
        out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        return out

    torch.manual_seed(0)
    ref = model(**batch).loss
    ref.backward()
    want = grads()
    torch.manual_seed(0)
    nll, n = batch_nll(model, batch, False)
    (nll / n).backward()
    got = grads()
    assert n == int((labels[:, 1:] != -100).sum())
    assert torch.allclose(nll / n, ref, rtol=1e-5), (float(nll / n), float(ref))
    assert set(got) == set(want)
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-6), k
    assert model.get_output_embeddings().forward.__func__ is type(model.get_output_embeddings()).forward  # restored


def test_fisher_scores_are_the_same_with_and_without_chunks_and_micro_batches(fx, calib, tmp_path, monkeypatch):
    """prune-bridge's mask Fisher through the chunked loss (3 tokens a chunk) and micro-batches (one
    block each), also under accelerate's disk offload (whose hooks load the LM head again for each
    chunk's recompute) = through transformers' loss on the full logits of the whole batch."""
    import json
    import os

    import torch

    from surgery.arch import load_arch
    from surgery.io.model import load_model
    from surgery.ops import loss
    from surgery.pipelines import importance as imp
    from surgery.pipelines.calibration import to_device, token_blocks

    path = fx.model("llama")
    arch = load_arch(json.loads(open(os.path.join(path, "config.json")).read()))
    blocks, _ = token_blocks(path, calib, 4, 16, 0)
    with monkeypatch.context() as m:
        m.setattr(imp, "batch_loss", lambda model, b: model(**to_device(b, model), use_cache=False).loss)
        want = imp.fisher_mask(load_model(path), arch, blocks, batch_size=4)
    monkeypatch.setattr(loss, "CHUNK_ELEMENTS", 3 * arch.dims["vocab"])
    monkeypatch.setattr(imp, "MICRO_TOKENS", 16)  # and one block per backward pass
    got = imp.fisher_mask(load_model(path), arch, blocks, batch_size=4)
    model = load_model(path, dispatch="gpu", max_memory={"cpu": "250KB"}, offload_folder=str(tmp_path / "off"))
    assert "disk" in model.hf_device_map.values()
    offloaded = imp.fisher_mask(model, arch, blocks, batch_size=4)
    assert set(got) == set(want) == set(offloaded)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-12)
        torch.testing.assert_close(offloaded[k], want[k], rtol=1e-5, atol=1e-12)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_training_through_chunks_gives_the_same_adapter(fx, task, tmp_path, monkeypatch, family):
    """`surgery train` with the chunked loss (2 tokens a chunk) = with transformers' full logits."""
    import torch
    from safetensors.torch import load_file

    from surgery.ops import loss
    from surgery.train import loop, score

    from .conftest import run_cli

    train, _ = task
    args = ["--data", train, "--epochs", "1", "--lr", "1e-2", "--batch-size", "16", "--rank", "4", "--json"]

    def plain(model, batch, seq2seq, unwrapped=None):
        return score.token_loss(*score.aligned_logits(model, batch, seq2seq))

    with monkeypatch.context() as m:
        m.setattr(loop, "batch_nll", plain)
        assert run_cli("train", fx.model(family), "-o", tmp_path / "full", *args)[0] == 0
    monkeypatch.setattr(loss, "CHUNK_ELEMENTS", 2 * 1024)
    code, _, err = run_cli("train", fx.model(family), "-o", tmp_path / "chunked", *args)
    assert code == 0, err
    a, b = load_file(tmp_path / "full" / "adapter_model.safetensors"), load_file(tmp_path / "chunked" / "adapter_model.safetensors")
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6)
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)  # it did train


def test_right_padding_needs_no_mask_and_saves_none():
    """A right-padded batch runs without its attention mask (same loss, checked above against
    transformers' masked loss); a batch padded on the left keeps it."""
    import torch

    from surgery.train.score import causal_mask

    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    assert causal_mask(mask) is None and causal_mask(torch.ones(2, 3, dtype=torch.long)) is None
    left = torch.tensor([[1, 1, 1], [0, 1, 1]])
    assert causal_mask(left) is left and causal_mask(None) is None
    gap = torch.tensor([[1, 0, 1]])
    assert causal_mask(gap) is gap


def test_training_step_saves_no_attention_mask(fx):
    """With a right-padded batch no [batch, 1, seq, seq] tensor is kept for the backward."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from surgery.train.score import batch_nll

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(fx.model("llama"), dtype=torch.float32),
                           LoraConfig(r=4, target_modules="all-linear"))
    ids = torch.randint(3, model.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(20) < torch.tensor([[20], [11], [6]])).long()
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        nll, n = batch_nll(model, batch, False)
    assert n == 19 + 10 + 5
    assert not [s for s in shapes if len(s) == 4 and s[-2:] == (20, 20)], shapes
