"""Training memory of one LoRA step, counted tensor by tensor on the meta device (no arithmetic).

What a step holds at the end of its forward pass (the peak of a step, before the backward frees
anything), for a model given by its config and LoRA of rank r on the modules `targets`:

    weights   every parameter's storage (bytes as stored; the LoRA matrices included, tied weights once)
    saved     every tensor autograd saves for the backward, each storage once, parameters not again
              (torch.autograd.graph.saved_tensors_hooks during the forward)
    trainable the LoRA parameters x 3: their gradients and AdamW's two moments (fp32)

at a stated batch of `batch` x `seq` tokens, with the trainer's own loss (surgery.train.score.batch_nll:
the LM head a chunk of tokens at a time, every token labelled, so an upper bound for prompt/completion
data). This is GPU memory without the CUDA context, allocator slack or the backward's transients: the
paper's Table 6-7 measure, and the one issue 16's ">= 5x below LoRA on the LLM" is stated in.

On "meta" no number is computed, so a 1.1B-shaped step is counted in about a second; device="cpu"
runs the same step for real (tests/test_memory_count.py: both give the same bytes). prefix=True counts
`tune-bridge --prefix`'s bridge, which reads stored hidden states and does not hold its token embedding.
Used by prune-bridge --memory-reduction (pipelines/bridge_memory.py) and the memory benchmarks.
torch, transformers and peft are imported inside the functions (`surgery --help` stays fast).
"""

from __future__ import annotations

from contextlib import contextmanager

# What each saved tensor is, from the innermost module running when autograd saved it (first match wins).
KINDS = (("lora", "linear inputs kept for LoRA (x for A, A·x for B)", lambda p: ".lora_" in p),
         ("norms", "norms (their input, 1/rms)", lambda p: "norm" in p.rsplit(".", 1)[-1] or p.rsplit(".", 1)[-1].startswith("ln")),
         ("attention", "attention (fused kernel: q, k, v, output, log-sum-exp; rotary tables)",
          lambda p: "attn" in p or "attention" in p),
         ("mlp", "MLP intermediates (gate, activation, up)", lambda p: "mlp" in p),
         ("loss", "loss (LM head input, labels)", lambda p: p == ""),
         ("other", "other", lambda p: True))


def kind_of(path: str) -> str:
    return next(k for k, _, match in KINDS if match(path))


def by_kind(saved: dict) -> dict:
    out = {k: 0 for k, _, _ in KINDS}
    for kind, b in saved.values():
        out[kind] += b
    return {k: v for k, v in out.items() if v}


@contextmanager
def saved_tensors(model):
    """Yields {storage: (kind, bytes)} of every tensor autograd saves while the block runs, each storage
    once and the model's parameters not at all (they are counted as weights)."""
    import torch

    params = {p.untyped_storage()._cdata for p in model.parameters()}
    saved: dict = {}
    stack = [""]
    handles = []
    for name, mod in model.named_modules():
        name = name.removeprefix("base_model.model.")
        handles.append(mod.register_forward_pre_hook(lambda m, a, n=name: (stack.append(n), None)[1]))
        handles.append(mod.register_forward_hook(lambda m, a, o, n=name: (stack.pop(), None)[1]))

    def pack(x):
        key = x.untyped_storage()._cdata
        if key not in params and key not in saved:
            saved[key] = (kind_of(stack[-1] if len(stack) > 1 else ""), x.untyped_storage().nbytes())
        return x

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            yield saved
    finally:
        for h in handles:
            h.remove()


@contextmanager
def fused_attention():
    """On the meta device, scaled_dot_product_attention saves what the fused kernels save.

    torch has no fused attention kernel for "meta", so there sdpa falls back to its math path, which
    saves the [batch, heads, seq, seq] probabilities and copies of q and k: an eager-attention count.
    On a real device the trainer gets a fused kernel (CPU flash attention, CUDA flash/efficient), which
    saves q, k and v (k and v with their own kv heads under grouped-query attention), the output and
    one log-sum-exp per query, and recomputes the probabilities in the backward. This stands in for
    it on meta tensors only (tests/test_memory_count.py: the meta count equals a real CPU step's)."""
    import torch

    F = torch.nn.functional
    real = F.scaled_dot_product_attention

    class Fused(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            b, h, t, d = q.shape
            out = q.new_empty(b, t, h, v.shape[-1]).transpose(1, 2)  # [b, t, h, d] storage, as the kernels write it
            ctx.save_for_backward(q, k, v, out, q.new_empty(b, h, t))
            return out

    def sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if q.device.type == "meta" and attn_mask is None and not dropout_p:
            return Fused.apply(q, k, v)
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


def without_embedding(model) -> None:
    """`tune-bridge --prefix`'s bridge: its token embedding replaced by the stored hidden states of the batch
    (bridge_prefix.cached_prefix), the embedding itself released: a stand-in module giving one fresh
    [batch, seq, hidden] tensor without gradient, as the stored states arrive. A tied head keeps the weight
    (it is the same parameter), so a tied LM head is still counted."""
    import torch

    emb = model.get_input_embeddings()
    hidden, dtype = emb.weight.shape[1], emb.weight.dtype

    class States(torch.nn.Module):
        def forward(self, ids):
            return torch.zeros(*ids.shape, hidden, dtype=dtype, device=ids.device)

    model.set_input_embeddings(States())


def step_bytes(config: dict, batch: int, seq: int, rank: int = 8, targets="all-linear", prefix: bool = False,
               device: str = "meta") -> dict:
    """{"weights", "saved", "trainable", "total", "params", "kinds"} of one LoRA step (see top) of the model
    `config` (a config.json dict) in float32, LoRA rank `rank` (alpha 2r, no dropout) on `targets` (peft's
    target_modules; "all-linear": every linear layer but the LM head). trainable = 3 x the LoRA's bytes
    (gradient + AdamW's two moments; the LoRA itself is in weights); kinds: saved bytes by KINDS."""
    import peft
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .score import batch_nll

    cfg = dict(config)
    cfg = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    cfg.pad_token_id = None  # GPT-2 looks for padding in the ids, which meta tensors do not hold
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if prefix:
        without_embedding(model)
    pm = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                                                    lora_dropout=0.0))
    pm.train()
    weights = {p.untyped_storage()._cdata: p.numel() * p.element_size() for p in pm.parameters()}
    lora = sum(p.numel() * p.element_size() for p in pm.parameters() if p.requires_grad)
    ids = torch.zeros(batch, seq, dtype=torch.long, device=device)
    labels = torch.zeros(batch, seq, dtype=torch.long)  # real: the loss selects labelled tokens by value
    with fused_attention(), saved_tensors(pm) as saved:
        batch_nll(pm, {"input_ids": ids, "labels": labels}, False)  # the trainer's loss (chunked LM head)
    w, s, t = sum(weights.values()), sum(b for _, b in saved.values()), 3 * lora
    return {"weights": w, "saved": s, "trainable": t, "total": w + s + t,
            "params": sum(p.numel() for p in pm.parameters()), "kinds": by_kind(saved)}
