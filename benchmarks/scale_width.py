"""This session's numerics at TinyLlama-1.1B widths, against the float64 exact answer.

Two pieces changed on small fixtures only, checked here at real widths (hidden 2048, 32/4 heads,
MLP 5632, vocab 32000; 2 layers to keep the float64 reference cheap; random bf16 weights, 4 right-padded
texts of 256, 200, 130 and 64 tokens):

1. train.score.causal_mask: a right-padded causal batch runs without its attention mask. Its loss and
   gradient (of layer 0's q_proj weight) against the float64 masked answer, beside the masked bf16 run
   it replaced: dropping the mask must cost nothing measurable.
2. transfer --scale auto's probe (pipelines/transfer/scale.forward_pass): each LoRA module's relative
   effect ‖ΔW x‖/‖W x‖ and the loss on a bf16 model with peft's float32 adapter, against the same model
   and adapter in float64. The factors it chooses are ratios of these effects.
3. transfer's chunked moments (ops.project.Moments.add(chunk=memory.CHUNK_TOKENS), the default since
   one-layer windows): the float64 Gram and cross-Gram of paired bf16 activations at the MLP widths of
   TinyLlama (5632) and its half-width 0.2B SLM (2816), 1024 tokens, added 256 rows at a time,
   against the same sums in one float64 matmul (the exact answer for these bf16 inputs to ~1e-16).
4. tune-bridge --prefix (pipelines/bridge_prefix.py): the bf16 LLM with a LoRA on runs the texts once,
   its hidden states at layer 1's input are written in shards (the shard size cut so every batch is one)
   and read back as the token embedding of a bridge that is LLM layer 1 alone, every width kept: the
   bridge's loss against the LLM's own (bf16, the same computation: must agree to rounding) and against
   the float64 LLM with the same adapter (the exact answer).

    python benchmarks/scale_width.py
"""

from __future__ import annotations

import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4,
             num_hidden_layers=2, vocab_size=32000, head_dim=64, max_position_embeddings=2048, tie_word_embeddings=False)
LENGTHS = (256, 200, 130, 64)
TARGETS = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]


def batch(torch):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, SHAPE["vocab_size"], (len(LENGTHS), max(LENGTHS)), generator=g)
    mask = (torch.arange(max(LENGTHS)) < torch.tensor(LENGTHS)[:, None]).long()
    return ids, mask, ids.masked_fill(mask == 0, -100)


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def masks(torch, model, model64, ids, mask, labels) -> list[tuple[str, float, float]]:
    from surgery.train.score import aligned_logits, batch_nll, token_loss

    def loss_grad(m, fn):
        m.zero_grad()
        nll, n = fn(m)
        loss = nll / n
        loss.backward()
        w = m.model.layers[0].self_attn.q_proj.weight
        return float(loss.detach()), w.grad.detach().clone()

    full = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    exact_l, exact_g = loss_grad(model64, lambda m: token_loss(*aligned_logits(m, full, False)))
    rows = []
    for name, fn in (("masked (transformers' path, before)", lambda m: token_loss(*aligned_logits(m, full, False))),
                     ("no mask (causal_mask, the trainer's now)", lambda m: batch_nll(m, full, False))):
        l, g = loss_grad(model, fn)
        rows.append((name, abs(l - exact_l) / abs(exact_l), rel(g, exact_g)))
    return rows


def probe(torch, model, model64, ids, mask, labels):
    from peft import LoraConfig, get_peft_model

    from surgery.pipelines.transfer.scale import forward_pass

    cfg = LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS, init_lora_weights=False)
    torch.manual_seed(2)
    pm = get_peft_model(model, cfg)
    pm64 = get_peft_model(model64, cfg)
    pm64.load_state_dict({k: v.double() for k, v in pm.state_dict().items() if "lora_" in k}, strict=False)

    def layers(p):
        return {n.removeprefix("base_model.model."): m for n, m in p.named_modules() if hasattr(m, "lora_B") and "default" in m.lora_B}

    batches = [(ids, mask, labels)]
    with torch.no_grad():
        loss, eff = forward_pass(pm.eval(), batches, layers(pm))
        loss64, eff64 = forward_pass(pm64.eval(), batches, layers(pm64))
    errs = {n: abs(eff[n] - eff64[n]) / eff64[n] for n in eff64}
    adapter_dtype = next(iter(layers(pm).values())).lora_A["default"].weight.dtype
    return loss, loss64, errs, eff64, adapter_dtype


def moments(torch) -> dict[str, float]:
    """Chunked vs one-shot Moments at MLP widths: the relative error of each accumulated sum."""
    from surgery.ops.project import Moments
    from surgery.pipelines.transfer.memory import CHUNK_TOKENS

    g = torch.Generator().manual_seed(2)
    n_s, n_l, tokens = SHAPE["intermediate_size"] // 2, SHAPE["intermediate_size"], 1024
    xs = torch.randn(tokens, n_s, generator=g).to(torch.bfloat16)
    proj = torch.randn(n_s, n_l, generator=g) / n_s ** 0.5
    xl = (xs.float() @ proj + 0.1 * torch.randn(tokens, n_l, generator=g)).to(torch.bfloat16)
    chunked, exact = Moments(n_s, n_l), Moments(n_s, n_l)
    chunked.add(xs, xl, CHUNK_TOKENS)
    exact.add(xs, xl)
    out = {k: rel(getattr(chunked, k), getattr(exact, k)) for k in ("ss", "ll", "ls", "sq_l")}
    out.update({k: abs(getattr(chunked, k) - getattr(exact, k)) / getattr(exact, k) for k in ("tr_ss", "tr_ll")})
    return out


def prefix(torch, model, model64, ids, mask, labels) -> dict[str, float]:
    """The --prefix bridge's loss vs the bf16 LLM's and the float64 LLM's, all with the same LoRA."""
    import copy
    import tempfile

    from peft import PeftModel

    import surgery.pipelines.bridge_prefix as bp
    from fixtures.build import build_lora, build_tokenizer
    from surgery.kinds import kind_of
    from surgery.train.data import Example
    from surgery.train.score import batch_nll

    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as d:
        model.save_pretrained(f"{d}/llm")
        build_tokenizer(f"{d}/llm")  # load_base wants one; the texts are token ids already
        build_lora(f"{d}/llm", f"{d}/lora", targets=TARGETS, r=16, alpha=32)
        examples = [Example(ids[r, :n].tolist(), labels[r, :n].tolist(), False) for r, n in enumerate(LENGTHS)]
        bp.SHARD_BYTES = 1  # a shard per batch: the read-back crosses shards
        index = bp.write_states(f"{d}/llm", f"{d}/lora", kind_of(f"{d}/lora", "tune-bridge"), [examples], 1,
                                f"{d}/states", pad_id=0, batch_size=2)
        losses = {}
        with torch.no_grad():
            for name, m in (("llm", model), ("llm64", model64)):
                pm = PeftModel.from_pretrained(copy.deepcopy(m), f"{d}/lora").to(m.dtype)
                nll, n = batch_nll(pm, {"input_ids": ids, "attention_mask": mask, "labels": labels}, False)
                losses[name] = float(nll) / n
            bridge = PeftModel.from_pretrained(copy.deepcopy(model), f"{d}/lora")
            del bridge.base_model.model.model.layers[0]  # the bridge: LLM layer 1 alone, every width kept
            bridge.base_model.model.model.layers[0].self_attn.layer_idx = 0
            bridge.base_model.model.config.num_hidden_layers = 1
            bridge.base_model.model.set_input_embeddings(bp.cached_prefix(f"{d}/states", index, torch.bfloat16))
            nll, n = batch_nll(bridge, {"input_ids": ids, "attention_mask": mask, "labels": labels}, False)
            losses["bridge"] = float(nll) / n
            losses["shards"] = len(os.listdir(f"{d}/states"))
    return losses


def main() -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    t0 = time.time()
    cfg = LlamaConfig(**SHAPE, attn_implementation="sdpa")
    model64 = LlamaForCausalLM(cfg).to(torch.bfloat16).to(torch.float64)  # the bf16 model, held exactly
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.load_state_dict({k: v.to(torch.bfloat16) for k, v in model64.state_dict().items()})
    ids, mask, labels = batch(torch)
    p = prefix(torch, model, model64, ids, mask, labels)  # first: check 2's probe wraps `model` in peft in place
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; shape {SHAPE}; "
          f"texts of {LENGTHS} tokens, right-padded")
    print("\n| 1. attention mask (bf16) | loss, rel. error vs float64 masked | dL/dW_q (layer 0), rel. error |")
    print("|---|---:|---:|")
    for name, el, eg in masks(torch, model, model64, ids, mask, labels):
        print(f"| {name} | {el:.2e} | {eg:.2e} |")
    loss, loss64, errs, eff64, adt = probe(torch, model, model64, ids, mask, labels)
    worst = max(errs, key=errs.get)
    print(f"\n2. --scale auto's probe: bf16 model, {adt} adapter (peft's), LoRA r 16 on {','.join(TARGETS)}, "
          f"against float64: loss {loss:.5f} vs {loss64:.5f} (rel. error {abs(loss - loss64) / loss64:.2e}); "
          f"relative effect of {len(errs)} modules ({min(eff64.values()):.3f}-{max(eff64.values()):.3f}): "
          f"max rel. error {errs[worst]:.2e} ({worst}), mean {sum(errs.values()) / len(errs):.2e}")
    errs = moments(torch)
    print("\n3. transfer's chunked moments (256 rows at a time) vs one float64 matmul, MLP widths 2816 x 5632, "
          "1024 bf16 tokens: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
    print(f"\n4. tune-bridge --prefix, LoRA r 16 on {','.join(TARGETS)}, states read back from {p['shards']} shards: "
          f"bridge loss {p['bridge']:.6f}, bf16 LLM {p['llm']:.6f} (rel. {abs(p['bridge'] - p['llm']) / p['llm']:.2e}), "
          f"float64 LLM {p['llm64']:.6f} (rel. {abs(p['bridge'] - p['llm64']) / p['llm64']:.2e}; bf16 LLM's own "
          f"{abs(p['llm'] - p['llm64']) / p['llm64']:.2e})")
    print(f"\n{time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
