"""How faithfully `surgery transfer` ports a LoRA, side by side over LLMs that hide the SLM.

For each case: build the fixture SLM + a LoRA on every linear, expand the SLM into an LLM
(fixtures/expand.py: width, depth, silent units × `silent`), port the LoRA with each map kind,
and report the error of the adapter's effect on held-out token ids,
    ||(LLM+ported − LLM) − (SLM+LoRA − SLM)|| / ||SLM+LoRA − SLM||,
plus wall time. silent > 0 makes the extra units near-silent random, so the LLM no longer contains
the SLM exactly (the base mismatch ||LLM − SLM|| / ||SLM+LoRA − SLM|| is shown beside it).

    HF_HUB_OFFLINE=1 python benchmarks/transfer_fidelity.py [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (family, width, depth, silent, readers): readers = 1 gives the extra heads and neurons live reading
# weights that write nothing (issue 16), so the LLM still computes the SLM exactly
CASES = [("llama", 2, 2, 0.0, 0.0), ("llama", 3, 1, 0.0, 0.0), ("gpt2", 2, 2, 0.0, 0.0), ("llama", 2, 2, 0.01, 0.0),
         ("gpt2", 2, 2, 0.01, 0.0), ("llama", 3, 3, 0.0, 1.0), ("gpt2", 3, 2, 0.0, 1.0)]


def logits(base, ids, adapter=None):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float64)
    if adapter:
        m = PeftModel.from_pretrained(m, adapter)
    with torch.no_grad():
        return m.eval()(input_ids=ids).logits


def main() -> None:
    import torch
    import transformers

    from fixtures import build_lora, build_model
    from fixtures.corpus import documents
    from fixtures.expand import expand_model
    from surgery.pipelines.transfer import transfer

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=tempfile.mkdtemp(prefix="transfer-bench-"))
    root = ap.parse_args().out
    calib = os.path.join(root, "calib.txt")
    os.makedirs(root, exist_ok=True)
    with open(calib, "w") as f:
        f.write("\n".join(documents(64, seed=3)))
    ids = torch.randint(4, 384, (4, 32), generator=torch.Generator().manual_seed(123))
    print(f"machine: {platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print("| SLM | width | depth | silent | readers | map | base mismatch | error of the effect | transfer time |")
    print("|---|---|---|---|---|---|---|---|---|")
    for family, width, depth, silent, readers in CASES:
        slm = os.path.join(root, family)
        if not os.path.exists(slm):
            build_model(family, slm)
            build_lora(slm, slm + "-lora")
        llm = os.path.join(root, f"{family}-x{width}-d{depth}-s{silent}-r{readers}")
        expand_model(slm, llm, width=width, depth=depth, silent=silent, seed=7, force=True, readers=readers)
        base, want = logits(slm, ids), logits(slm, ids, slm + "-lora")
        effect = (want - base).norm()
        llm_base = logits(llm, ids)
        mismatch = float((llm_base - base).norm() / effect)
        for kind in ("activations", "embeddings"):
            out = llm + f"-{kind}"
            t = time.time()
            transfer(slm + "-lora", llm, out, data=calib, map_kind=kind, samples=64, scale="none", force=True)  # the port itself
            dt = time.time() - t
            err = float(((logits(llm, ids, out) - llm_base) - (want - base)).norm() / effect)
            print(f"| {family} | ×{width} | ×{depth} | {silent} | {readers} | {kind} | {mismatch:.2e} | {err:.2e} | {dt:.1f} s |",
                  flush=True)


if __name__ == "__main__":
    main()
