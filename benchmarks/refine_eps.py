"""How far the SPSA estimate (L(θ+εz) − L(θ−εz))/(2ε) is from autograd's z·∇L, per ε (docs/refine.md, --eps).

On the fixture llama with a LoRA on every linear layer, in float64 so the only error is the
central difference's own (third-order) term: that is what chooses ε, independent of float32 noise.
Autograd is used here only as the reference.

    .venv/bin/python -m benchmarks.refine_eps        # ~20 s
"""

from __future__ import annotations

import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    sys.path.insert(0, ROOT)
    import torch
    from peft import PeftModel

    from fixtures import build_lora, build_model
    from fixtures.tasks import write_task
    from surgery.ops.mezo import directions, spsa_estimate
    from surgery.train.data import collate, load_examples
    from surgery.train.methods import load_base
    from surgery.train.score import aligned_logits, token_loss

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        build_model("llama", f"{d}/llama")
        build_lora(f"{d}/llama", f"{d}/lora", targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        train, _ = write_task("colour", f"{d}/tasks", n_train=16, n_dev=4)
        model, tok, _ = load_base(f"{d}/llama")
        model.double()
        pm = PeftModel.from_pretrained(model, f"{d}/lora", is_trainable=True).eval()
        params = [p for _, p in sorted(pm.named_parameters()) if p.requires_grad]
        batch = collate(load_examples(train, tok, seq2seq=False)[:8], 0, False)

        def loss():
            nll, n = token_loss(*aligned_logits(pm, batch, False))
            return nll / n

        grads = torch.autograd.grad(loss(), params)
        print(f"LoRA on the fixture llama: {sum(p.numel() for p in params)} parameters, "
              f"|theta|_rms {torch.cat([p.detach().flatten() for p in params]).pow(2).mean().sqrt():.4f}")
        print(f"{'seed':>4} {'z.grad (autograd)':>18} " + " ".join(f"{'eps ' + format(e, 'g'):>12}" for e in (1e-1, 1e-2, 1e-3, 1e-4)))
        pm.requires_grad_(False)
        for seed in (0, 1, 2):
            exact = sum(float((g * z.double()).sum()) for g, z in zip(grads, directions(params, seed)))
            rel = []
            with torch.inference_mode():
                for eps in (1e-1, 1e-2, 1e-3, 1e-4):
                    est = spsa_estimate(params, lambda: float(loss()), seed, eps)
                    rel.append(abs(est - exact) / abs(exact))
            print(f"{seed:>4} {exact:18.5f} " + " ".join(f"{r:12.2%}" for r in rel))
        print("(relative error of the SPSA estimate against autograd)")


if __name__ == "__main__":
    main()
