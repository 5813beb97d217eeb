"""Evaluation through the chunked LM head (train/score.batch_scores, ops/loss.chunked_scores) against the
full-logits path it replaces: the same loss as transformers' (or peft's) own, the same exact-match count
as the argmax of the model's full [batch, seq, vocab] logits, and no tensor of more than one chunk of
logits. Every causal fixture family, gemma2 with a soft cap that bites, a LoRA, prompt tuning (virtual
tokens), an accelerate-dispatched model with its head offloaded to disk; T5 keeps the plain path.

Half the completions are the model's own greedy continuation (right by construction), the other half
have their last token changed (wrong), so the count is known exactly; text records add to the loss only.
Ties: the chunked argmax runs on the same logits over fewer rows (the first maximal index, as torch's
argmax on the full logits); a BLAS could round a row differently when blocking fewer rows, so an exact
tie could in principle break the other way in bf16/fp32. On these fixtures the counts must be identical.
"""

import pytest

from .train_fixtures import one_thread  # noqa: F401 (pytest fixture)

CHUNK_ROWS = 3  # tokens per chunk in these tests: chunks cross row boundaries

CASES = ["gpt2", "llama", "qwen2", "mistral", "gemma2-softcap", "t5", "llama-lora", "gpt2-prompt", "llama-offload"]


def _model(fx, case, tmp_path):
    import torch
    from peft import PeftModel, PromptTuningConfig, get_peft_model

    from surgery.io.model import load_model

    family, _, variant = case.partition("-")
    if variant == "softcap":  # Gemma 2's default cap (30) barely touches a tiny model's logits; 1.0 does
        return load_model(fx.model(family, final_logit_softcapping=1.0))
    if variant == "offload":  # accelerate's hooks: the LM head's weight comes from disk for each call
        model = load_model(fx.model(family), dispatch="gpu", max_memory={"cpu": "250KB"},
                           offload_folder=str(tmp_path / "off"))
        assert model.hf_device_map.get("lm_head") == "disk", model.hf_device_map
        return model
    model = load_model(fx.model(family))
    if variant == "lora":
        return PeftModel.from_pretrained(model, fx.lora(family))
    if variant == "prompt":
        torch.manual_seed(0)
        return get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    return model


def _next_token(model, prompt, done, seq2seq) -> int:
    """Greedy decoding's next token, from the full logits of one unpadded row."""
    import torch

    ids = torch.tensor([prompt if seq2seq else prompt + done])
    if seq2seq:  # the decoder reads its targets shifted right: position len(done) predicts the next one
        return int(model(input_ids=ids, labels=torch.tensor([done + [0]])).logits[0, len(done)].argmax())
    return int(model(input_ids=ids).logits[0, -1].argmax())


def _examples(model, vocab, seq2seq):
    """12 prompt/completion examples, every other one right, and (causal) 2 text examples."""
    import torch

    from surgery.train.data import IGNORE, Example

    g = torch.Generator().manual_seed(7)
    out, right = [], 0
    with torch.no_grad():
        for i in range(12):
            prompt = torch.randint(4, vocab, (int(torch.randint(3, 10, (1,), generator=g)),), generator=g).tolist()
            done = []
            for _ in range(1 + i % 4):
                done.append(_next_token(model, prompt, done, seq2seq))
            if i % 2:
                done[-1] = 4 + (done[-1] - 3) % (vocab - 4)  # another token: this row must count as wrong
            else:
                right += 1
            out.append(Example(prompt, done, True) if seq2seq else Example(prompt + done, [IGNORE] * len(prompt) + done, True))
        if not seq2seq:
            for n in (6, 11):
                ids = torch.randint(4, vocab, (n,), generator=g).tolist()
                out.append(Example(ids, list(ids), False))
    return out, right


def _reference(model, examples, pad, seq2seq, batch_size, virtual=False):
    """The path before: the model's own loss and its full logits' argmax, batch by batch.

    virtual: prompt tuning, where peft's own loss also scores a row's first token, predicted from the
    virtual tokens alone; surgery never scores it (its labels are shifted within the real tokens, in
    training as in evaluation), so here that label is ignored too."""
    import torch

    from surgery.train.data import collate

    total, tokens, right = 0.0, 0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            batch = collate(chunk, pad, seq2seq)
            if virtual:
                batch["labels"][:, 0] = -100
            out = model(**batch)
            z, y = out.logits, batch["labels"]
            if not seq2seq:
                z, y = z[:, -batch["input_ids"].shape[1]:][:, :-1], y[:, 1:]
            n = int((y != -100).sum())
            total += float(out.loss) * n
            tokens += n
            ok = ((z.argmax(-1) == y) | (y == -100)).all(-1)
            right += sum(bool(r) for r, e in zip(ok, chunk) if e.completion)
    return total / tokens, tokens, right


class _LogitRows:
    """The most rows of any contiguous tensor whose last dimension is the vocabulary that an op
    produces while active: logits, their softmax, their upcast (a transposed weight is a view, not
    contiguous, and is skipped)."""

    def __init__(self, vocab):
        from torch.utils._python_dispatch import TorchDispatchMode

        rows = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                import torch
                from torch.utils._pytree import tree_flatten

                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == vocab and t.is_contiguous():
                        rows.most = max(rows.most, t.numel() // vocab)
                return out

        self.most, self.mode = 0, Mode()


@pytest.mark.parametrize("case", CASES)
def test_eval_equals_the_full_logits_path(fx, tmp_path, monkeypatch, case):
    from surgery.ops import loss
    from surgery.train.data import pad_id_of
    from surgery.train.score import evaluate_examples

    model = _model(fx, case, tmp_path).eval()
    config = model.config
    vocab, seq2seq = config.vocab_size, bool(config.is_encoder_decoder)
    examples, right = _examples(model, vocab, seq2seq)
    pad = pad_id_of(None, config)
    want_loss, want_tokens, want_right = _reference(model, examples, pad, seq2seq, 5, case.endswith("prompt"))
    assert want_right == right  # the reference itself counts the constructed answers

    monkeypatch.setattr(loss, "CHUNK_ELEMENTS", CHUNK_ROWS * vocab)
    seen = _LogitRows(vocab)
    with seen.mode:
        got = evaluate_examples(model, examples, batch_size=5, pad_id=pad, seq2seq=seq2seq)
    assert got["correct"] == right and got["scored"] == 12 and got["accuracy"] == 0.5
    assert got["tokens"] == want_tokens and got["examples"] == len(examples)
    assert got["loss"] == pytest.approx(want_loss, rel=1e-5)
    if seq2seq:  # T5's plain path: its decoder logits are as long as the targets
        assert seen.most >= 5
    else:
        assert seen.most <= CHUNK_ROWS, seen.most
        ref = _LogitRows(vocab)
        with ref.mode:
            _reference(model, examples[:5], pad, seq2seq, batch_size=5)
        assert ref.most >= 5 * 6  # the detector sees the full logits of the path before
    head = model.get_output_embeddings()
    assert "forward" not in head.__dict__ or case.endswith("offload")  # the head's own forward is back


def test_chunked_scores_argmax_and_ignored_labels():
    """pred: the argmax at labelled positions, IGNORE elsewhere; the argmax of a tie is the first maximal
    index, as torch's argmax of the full logits; the sum equals one cross-entropy."""
    import torch
    import torch.nn.functional as F

    from surgery.ops.loss import IGNORE, chunked_scores

    g = torch.Generator().manual_seed(3)
    b, L, H, V = 3, 7, 8, 13
    h = torch.randn(b, L, H, generator=g, dtype=torch.float64)
    head = torch.nn.Linear(H, V, dtype=torch.float64)
    z = head(h).detach()
    y = torch.randint(0, V, (b, L), generator=g)
    y[1, :3] = IGNORE
    nll, n, pred = chunked_scores(h, y, head, V, elements=2 * V)  # chunks of 2 tokens
    assert n == b * L - 3 and pred.shape == y.shape and pred.dtype == torch.long
    assert torch.equal(pred, z.argmax(-1).masked_fill(y == IGNORE, IGNORE))
    want = F.cross_entropy(z.reshape(-1, V), y.reshape(-1), ignore_index=IGNORE, reduction="sum")
    assert torch.allclose(nll, want, rtol=1e-12)
    flat = lambda x: torch.zeros(x.shape[0], V, dtype=x.dtype)  # noqa: E731 (every logit tied)
    _, _, pred = chunked_scores(h[:1, :2], torch.tensor([[5, IGNORE]]), flat, V)
    assert pred.tolist() == [[0, IGNORE]]  # the first maximal index
